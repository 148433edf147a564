"""The app in a real browser: headless Chromium, driven through Playwright, at a laptop's 1280x800 and a phone's
390 px, against the compiled tiny model and, for the examples' pictures and the README's screenshots, the demo model
(what `python app.py` serves). The result must be in view without scrolling, also after picking an example far
below it; the demo model's words must show where the prompt is typed; seeds must do what the controls say; examples
must show what they make and follow the chosen resolution; an error must not outstay the next request; and the
console must stay silent.

Needs Debian's `chromium` (Playwright cannot download its own browsers here); `.ci/run` installs it.
Screenshots go to test-artifacts/; with UPDATE_SCREENSHOTS=1 the two README ones also go to assets/screenshots/.
"""
import dataclasses
import hashlib
import importlib.util
import io
import os
from pathlib import Path

import pytest
from PIL import Image, ImageChops
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
from playwright.sync_api import expect

from conftest import ROOT

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = ROOT / "test-artifacts"
SCREENSHOTS = ROOT / "assets" / "screenshots"
GENERATION_TIMEOUT_MS = 60_000
DESKTOP, PHONE = {"width": 1280, "height": 800}, {"width": 390, "height": 844}

# Installed before each generation: records every status tracker (Gradio's progress display) that showed, by the
# id of its component, and when the image's tracker went idle again after showing.
WATCH_PROGRESS = """() => {
  const state = window.progress = {shown: new Set(), done: false};
  const check = () => {
    for (const tracker of document.querySelectorAll('[data-testid="status-tracker"]')) {
      const owner = tracker.closest('[id]')?.id;
      if (!tracker.classList.contains('hide')) state.shown.add(owner);
      else if (owner === 'image' && state.shown.has('image')) state.done = true;
    }
  };
  new MutationObserver(check).observe(document.body, {attributes: true, childList: true, subtree: true,
                                                      attributeFilter: ['class']});
}"""


@pytest.fixture(scope="module")
def browser(client, app):
    if not os.path.exists(CHROMIUM):
        # CI installs it; a developer without it gets a skip that says how to run this test
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"{CHROMIUM} missing: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def demo_app():
    """app.py as `python app.py` starts with no MODEL_ID: the demo model, eager (compiling it would add 80 s), served
    beside the tiny app in this process. Loads in about a second."""
    with pytest.MonkeyPatch.context() as env:
        env.delenv("MODEL_ID")
        env.setenv("COMPILE", "none")
        spec = importlib.util.spec_from_file_location("app_demo", ROOT / "app.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    assert module.SETTINGS.model_id == "demo", module.SETTINGS
    module.demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True, css=module.CSS)
    yield module
    module.demo.close()


@pytest.fixture
def open_page(browser, app):
    """Opens an app (the tiny one unless told) at a viewport size; at the end, asserts the console had no warning
    or error."""
    pages = []

    def open_at(viewport: dict, served=app):
        page = browser.new_page(viewport=viewport)
        page.console = []
        page.on("console",
                lambda msg: msg.type in ("warning", "error") and page.console.append(f"{msg.type}: {msg.text}"))
        page.on("pageerror", lambda err: page.console.append(f"uncaught: {err}"))
        page.goto(served.demo.local_url)
        page.locator("#prompt textarea").wait_for()
        pages.append(page)
        return page

    yield open_at
    for page in pages:
        assert page.console == [], page.console
        page.close()


def _generate(page, start) -> dict:
    """Runs `start()`, waits for the image's progress to show and end, and returns what the page then shows."""
    page.evaluate(WATCH_PROGRESS)
    start()
    page.wait_for_function("window.progress.done", timeout=GENERATION_TIMEOUT_MS)
    image = page.locator("#image img")
    expect(image).to_be_visible()
    expect(page.locator("#used-seed input")).to_be_visible()
    png = page.request.get(image.get_attribute("src")).body()
    return {
        "size": tuple(image.evaluate("img => [img.naturalWidth, img.naturalHeight]")),
        "png": png,
        "sha256": hashlib.sha256(png).hexdigest(),
        "seed": page.locator("#used-seed input").input_value(),
        "details": page.locator("#details textarea").input_value(),
        "progress_shown_on": page.evaluate("[...window.progress.shown]"),
        "download_name": page.locator("#image a[download]").get_attribute("download"),
    }


def _box(page, selector: str) -> dict:
    return page.locator(selector).first.bounding_box()


def _in_view(box: dict, viewport: dict) -> bool:
    return (box["x"] >= 0 and box["y"] >= 0 and box["x"] + box["width"] <= viewport["width"]
            and box["y"] + box["height"] <= viewport["height"])


def _screenshot(page, name: str, readme: bool = False) -> None:
    page.screenshot(path=ARTIFACTS / name)
    # Kept as RGB: the demo's flat drawings make a small PNG (40-80 KB), and a palette changed their colours
    if readme and os.environ.get("UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        with Image.open(ARTIFACTS / name) as shot:
            shot.convert("RGB").save(SCREENSHOTS / name, optimize=True)


def _pictures_loaded(page, count: int) -> list[int]:
    """Waits (up to 30 s) for `count` example pictures to have loaded; returns their natural widths, 0 for one that
    did not. They are brought into view first: the browser may defer an image below the fold, and a deferred image
    counts as `complete` with no pixels (as on a 390 px phone in CI)."""
    page.locator("#examples").scroll_into_view_if_needed()
    try:
        page.wait_for_function("n => { const imgs = [...document.querySelectorAll('#examples img')];"
                               " return imgs.length === n"
                               " && imgs.every(img => img.complete && img.naturalWidth > 0); }",
                               arg=count, timeout=30_000)
    except PlaywrightTimeoutError:
        pass  # the widths returned say which picture is missing
    return page.locator("#examples img").evaluate_all("imgs => imgs.map(img => img.naturalWidth)")


def _most_apart(png: bytes, path: str) -> int:
    """The largest difference of any pixel's channel between two images, 0 to 255."""
    with Image.open(io.BytesIO(png)) as made, Image.open(path) as shipped:
        return max(high for _, high in ImageChops.difference(made.convert("RGB"), shipped.convert("RGB")).getextrema())


def test_desktop_shows_every_preset_in_view_with_seed_and_details_beside_it(open_page, app):
    page = open_page(DESKTOP)
    expect(page.locator("#examples")).to_contain_text(app.EXAMPLES[0])
    expect(page.locator("#examples img")).to_have_count(0)  # the tiny model ships no pictures: examples as text
    expect(page.locator("#prompt")).not_to_contain_text("knows only")  # random weights: no words to list
    assert page.locator("#used-seed").count() == 0 and page.locator("#details").count() == 0  # nothing before an image
    page.locator("#prompt textarea").fill("a lighthouse at dusk")
    first = _generate(page, lambda: page.locator("#prompt textarea").press("Enter"))
    assert first["size"] == (64, 64) and first["details"].startswith("64x64, 28 steps, ")
    assert first["progress_shown_on"] == ["image"]  # not drawn over the seed and the details
    assert first["seed"] == "0" and first["download_name"] == "a-lighthouse-at-dusk-seed0.png"

    for label, size in [("portrait 48x80", (48, 80)), ("landscape 80x48", (80, 48)), ("square 64x64", (64, 64))]:
        page.locator("#resolution").get_by_label(label).check()
        shown = _generate(page, lambda: page.locator("#generate").click())
        assert shown["size"] == size and shown["progress_shown_on"] == ["image"]
        image, seed, details = _box(page, "#image img"), _box(page, "#used-seed"), _box(page, "#details")
        assert page.evaluate("window.scrollY") == 0
        for box in (image, seed, details):
            assert _in_view(box, DESKTOP), (label, box)
        assert image["height"] >= 400  # fitted to the window, not drawn at its 64 px
        assert seed["y"] >= image["y"] + image["height"] and details["y"] == seed["y"]  # right under the image
        assert _box(page, "#prompt")["x"] + _box(page, "#prompt")["width"] <= image["x"]  # controls beside it
        if label.startswith("portrait"):
            _screenshot(page, "tiny-desktop-1280x800.png")


def test_seed_controls_do_what_they_say(open_page):
    page = open_page(DESKTOP)
    page.locator("#prompt textarea").fill("a lighthouse at dusk")
    page.locator("#advanced").get_by_text("Advanced").click()
    seed_box, randomize = page.locator("#seed input"), page.locator("#randomize input[type=checkbox]")
    assert not randomize.is_checked() and seed_box.input_value() == "0"
    expect(seed_box).to_be_enabled()

    seed_box.fill("4242")
    fixed = [_generate(page, lambda: page.locator("#generate").click()) for _ in range(2)]
    assert fixed[0]["seed"] == fixed[1]["seed"] == "4242" and fixed[0]["sha256"] == fixed[1]["sha256"]
    assert fixed[0]["download_name"] == "a-lighthouse-at-dusk-seed4242.png"

    randomize.check()
    expect(seed_box).to_be_disabled()  # the box cannot claim a seed that will not be used
    randomized = [_generate(page, lambda: page.locator("#generate").click()) for _ in range(2)]
    assert all(0 <= int(shot["seed"]) < 2**31 for shot in randomized)
    assert len({fixed[0]["seed"], randomized[0]["seed"], randomized[1]["seed"]}) == 3
    assert randomized[0]["sha256"] != randomized[1]["sha256"]
    _screenshot(page, "seed-controls.png")

    randomize.uncheck()
    expect(seed_box).to_be_enabled()
    assert seed_box.input_value() == "4242"


def test_only_the_demo_model_at_its_own_presets_shows_the_shipped_pictures(app, demo_app, monkeypatch):
    assert app._thumbnails() == [None] * len(app.EXAMPLES)
    pictures = demo_app._thumbnails()
    assert len(pictures) == len(demo_app.EXAMPLES) and all(Path(path).is_file() for path in pictures)
    monkeypatch.setattr(demo_app, "SETTINGS", dataclasses.replace(demo_app.SETTINGS, presets_text="square=64x64"))
    assert demo_app._thumbnails() == [None] * len(demo_app.EXAMPLES)  # drawn at 128x128, not what it makes here


def test_examples_show_what_they_make_and_follow_the_chosen_resolution(open_page, demo_app, monkeypatch):
    monkeypatch.setattr(demo_app, "EXAMPLE_RESULTS", {})  # as a fresh start: none made yet
    page = open_page(DESKTOP, demo_app)
    _vocabulary_shown(page, demo_app, DESKTOP)
    shipped = demo_app._thumbnails()
    pictures, rows = page.locator("#examples img"), page.locator("#examples tbody tr")
    expect(pictures).to_have_count(len(shipped))
    assert _pictures_loaded(page, len(shipped)) == [128] * len(shipped)
    for i, path in enumerate(shipped):  # each beside its prompt, as shipped
        expect(rows.nth(i)).to_contain_text(demo_app.EXAMPLES[i])
        expect(rows.nth(i).locator("img")).to_be_visible()
        assert page.request.get(rows.nth(i).locator("img").get_attribute("src")).body() == Path(path).read_bytes()

    last = len(shipped) - 1  # the lowest on the page: the window scrolls a screen down to click it
    def pick():
        pictures.nth(last).click()

    square = _generate(page, pick)
    assert page.evaluate("window.scrollY") > 0
    _result_in_view(page, DESKTOP)
    assert page.locator("#prompt textarea").input_value() == demo_app.EXAMPLES[last]
    assert square["size"] == (128, 128) and square["seed"] == "0" and square["progress_shown_on"] == ["image"]
    assert _most_apart(square["png"], shipped[last]) <= 4  # its picture is what it makes (4: rounding on another CPU)

    page.locator("#resolution").get_by_label("portrait 96x160").check()  # a preset change: not the square image
    portrait = _generate(page, lambda: pictures.nth(2).click())
    assert portrait["size"] == (96, 160) and not portrait["details"].endswith("example shown again")
    _result_in_view(page, DESKTOP)
    page.evaluate("window.scrollTo(0, 0)")
    for selector in ("#prompt", "#image img", "#used-seed", "#details"):
        assert _in_view(_box(page, selector), DESKTOP), selector
    _screenshot(page, "desktop-1280x800.png", readme=True)

    page.locator("#resolution").get_by_label("square 128x128").check()
    again = _generate(page, pick)
    assert again["sha256"] == square["sha256"] and again["details"] == square["details"] + ", example shown again"


def _vocabulary_shown(page, demo_app, viewport: dict) -> None:
    """The demo model's words, in view with the page just opened, between the prompt's label and its box."""
    hint = page.locator("#prompt").get_by_text("The demo model knows only these words")
    expect(hint).to_have_text(demo_app._vocabulary_hint())
    for word in ("circle", "purple", "at the bottom", "on a blue background"):
        expect(hint).to_contain_text(word)
    assert page.evaluate("window.scrollY") == 0 and _in_view(hint.bounding_box(), viewport)
    assert hint.bounding_box()["y"] + hint.bounding_box()["height"] <= _box(page, "#prompt textarea")["y"]


def _result_in_view(page, viewport: dict) -> None:
    """The image, its seed and its details all in view, as the page shows them now."""
    for selector in ("#image img", "#used-seed", "#details"):
        assert _in_view(_box(page, selector), viewport), (selector, page.evaluate("window.scrollY"))


def test_phone_shows_the_demo_s_words_and_a_picked_example_s_result(open_page, demo_app):
    page = open_page(PHONE, demo_app)
    _vocabulary_shown(page, demo_app, PHONE)
    assert _pictures_loaded(page, len(demo_app.EXAMPLES)) == [128] * len(demo_app.EXAMPLES)
    page.locator("#resolution").get_by_label("portrait 96x160").check()
    picture = page.locator("#examples img").nth(3)
    picture.scroll_into_view_if_needed()
    assert _in_view(picture.bounding_box(), PHONE)
    shown = _generate(page, picture.click)
    assert shown["size"] == (96, 160) and page.locator("#prompt textarea").input_value() == demo_app.EXAMPLES[3]
    _result_in_view(page, PHONE)  # scrolled up from the examples to it
    page.evaluate("window.scrollTo(0, 0)")  # the page's top, with the words, still fits the portrait image
    assert _in_view(_box(page, "#image img"), PHONE) and _box(page, "#generate")["y"] < _box(page, "#image")["y"]
    _screenshot(page, "phone-390.png", readme=True)


def test_phone_puts_prompt_generate_and_result_first_under_a_one_line_banner(open_page):
    page = open_page(PHONE)
    banner = _box(page, "#status-banner")
    assert banner["height"] < 50  # one line; the details open on demand
    page.locator("#generate").click()  # no prompt: an error, over the title
    errors = page.get_by_test_id("toast-body")
    expect(errors).to_contain_text("Prompt is empty")
    page.locator("#prompt textarea").fill("a lighthouse at dusk")
    page.locator("#resolution").get_by_label("portrait 48x80").check()
    shown = _generate(page, lambda: page.locator("#generate").click())
    assert errors.count() == 0  # closed by the next request (it would show 10 s), not left over its image
    assert shown["size"] == (48, 80)
    assert page.locator("#image").get_by_text("Image", exact=True).count() == 0  # no label over the picture's corner
    selectors = ("#status-banner", "#prompt", "#generate", "#image", "#resolution")
    order = [_box(page, selector)["y"] for selector in selectors]
    assert order == sorted(order), order  # prompt, Generate, result, then the settings
    image = _box(page, "#image img")
    assert _in_view(image, PHONE) and image["width"] >= 250, image
    _screenshot(page, "tiny-phone-390.png")

    page.locator("#status-banner").get_by_text("AoT compiled").click()
    details = page.locator("#status-details")
    expect(details).to_contain_text("As expected on this hardware")
    expect(details).to_contain_text("no faster attention kernel for cpu")
    expect(page.locator("#status-json")).to_contain_text("model_id")
    _screenshot(page, "phone-390-details.png")
