"""The app in a real browser: headless Chromium, driven through Playwright, against the compiled tiny model.

Needs Debian's `chromium` (Playwright cannot download its own browsers here); `.ci/run` installs it.
Screenshots go to test-artifacts/.
"""
import hashlib
import os
import re

import pytest

from conftest import ROOT

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = ROOT / "test-artifacts"
GENERATION_TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def browser_page(client, app):
    """(page, console errors) on the app's launched server."""
    if not os.path.exists(CHROMIUM):
        # CI installs it; a developer without it gets a skip that says how to run this test
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"{CHROMIUM} missing: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        errors = []
        page.on("console", lambda msg: msg.type == "error" and errors.append(msg.text))
        page.on("pageerror", lambda err: errors.append(f"uncaught: {err}"))
        page.goto(app.demo.local_url)
        yield page, errors
        browser.close()


def _generate(page, start) -> dict:
    """Starts a generation with `start()` and waits until the image's progress tracker is idle again."""
    from playwright.sync_api import expect

    with page.expect_response(lambda r: "/queue/join" in r.url and r.request.method == "POST") as joined:
        start()
    assert joined.value.ok, joined.value.status
    expect(page.locator("#image [data-testid='status-tracker']").first).to_have_class(
        re.compile(r"\bhide\b"), timeout=GENERATION_TIMEOUT_MS)
    image = page.locator("#image img")
    expect(image).to_be_visible()
    src = image.get_attribute("src")
    return {
        "size": tuple(image.evaluate("img => [img.naturalWidth, img.naturalHeight]")),
        "sha256": hashlib.sha256(page.request.get(src).body()).hexdigest(),
        "seed": page.locator("#used-seed input").input_value(),
        "details": page.locator("#details textarea").input_value(),
    }


def test_prompt_resolution_and_fixed_seed_in_a_real_browser(browser_page):
    page, console_errors = browser_page
    prompt = page.locator("#prompt textarea")
    prompt.fill("a lighthouse at dusk")
    first = _generate(page, lambda: prompt.press("Enter"))
    page.screenshot(path=ARTIFACTS / "browser-1-enter.png", full_page=True)
    assert first["size"] == (64, 64) and first["details"].startswith("64x64, ")

    page.locator("#resolution").get_by_label("portrait 48x80").check()
    second = _generate(page, lambda: page.locator("#generate").click())
    page.screenshot(path=ARTIFACTS / "browser-2-portrait.png", full_page=True)
    assert second["size"] == (48, 80) and second["details"].startswith("48x80, ")

    page.locator("#advanced").get_by_text("Advanced").click()
    page.locator("#randomize input[type=checkbox]").uncheck()
    page.locator("#seed input").fill("4242")
    fixed = [_generate(page, lambda: page.locator("#generate").click()) for _ in range(2)]
    page.screenshot(path=ARTIFACTS / "browser-3-fixed-seed.png", full_page=True)
    assert fixed[0]["seed"] == fixed[1]["seed"] == "4242"
    assert fixed[0]["size"] == fixed[1]["size"] == (48, 80)
    assert fixed[0]["sha256"] == fixed[1]["sha256"]

    assert console_errors == []
