"""The Gradio app on the tiny model, compiled: input validation, the API through gradio_client, seeds, examples,
downloads, status."""
import dataclasses
import hashlib
import importlib.util
import inspect
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest
import torch
from PIL import Image

from aot import panel
from conftest import cpu
from aot.model import load_pipeline
from aot.zerogpu import FIXED_SECONDS, PROGRAM_LOAD_SECONDS
from assets import shapes
from conftest import ROOT, SESSION_DIR, tiny_model
from settings import MAX_SEED, Settings, parse_presets

GOOD = dict(prompt="a lighthouse at dusk", resolution="48x80", seed=1234, randomize_seed=False, steps=2, guidance=3.5,
            negative_prompt="")


@pytest.mark.parametrize("change, message", [
    ({"prompt": ""}, "Prompt is empty"),
    ({"prompt": "   \n\t "}, "Prompt is empty"),
    ({"prompt": None}, "Prompt is empty"),
    ({"prompt": "x" * 5000}, "the limit is 2000"),
    ({"prompt": "word " * 300}, "reads at most 512"),
    ({"resolution": "1000x1000"}, "Allowed: 64x64, 48x80, 80x48"),
    ({"resolution": None}, "Unknown resolution"),
    ({"steps": 0}, "Steps must be from 1 to 50"),
    ({"steps": 51}, "Steps must be from 1 to 50"),
    ({"steps": 2.5}, "Steps must be a whole number"),
    ({"steps": math.nan}, "Steps must be a whole number"),
    ({"guidance": math.nan}, "Guidance must be a finite number"),
    ({"guidance": math.inf}, "Guidance must be a finite number"),
    ({"guidance": -1}, "Guidance must be from 0 to 20"),
    ({"guidance": "3"}, "Guidance must be a finite number"),
    ({"seed": -1}, f"Seed must be from 0 to {MAX_SEED}"),
    ({"seed": MAX_SEED + 1}, f"Seed must be from 0 to {MAX_SEED}"),
    ({"seed": 1.5}, "Seed must be a whole number"),
    ({"seed": "42"}, "Seed must be a whole number"),
    ({"randomize_seed": "yes"}, "randomize_seed must be true or false"),
])
def test_bad_input_gets_a_clear_error_and_the_next_request_works(app, change, message):
    with pytest.raises(gr.Error, match=message):
        app.generate(**{**GOOD, **change})
    path, seed, details = app.generate(**GOOD)
    assert _size(path) == (48, 80) and seed == 1234 and "2 steps" in details


def _size(path: str) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def test_negative_prompt_on_a_model_without_cfg_is_refused_and_the_next_request_works(app):
    # the cleaned request: prompt, preset, seed, steps, guidance, negative prompt, LoRA, notes for the user
    assert app.validate(**GOOD) == ("a lighthouse at dusk", app.PRESETS["48x80"], 1234, 2, 3.5, "", "none", [])
    with pytest.raises(gr.Error, match="This flux model takes no negative prompt"):
        app.generate(**{**GOOD, "negative_prompt": "blurry"})
    path, seed, details = app.generate(**GOOD)
    assert _size(path) == (48, 80) and seed == 1234 and "2 steps" in details


def test_words_the_demo_model_never_read_are_named_in_the_details(app, monkeypatch):
    assert app._vocabulary_hint() is None and app._unknown_words("a tiny astronaut") == []  # no list for tiny models
    monkeypatch.setattr(app, "VOCABULARY", frozenset(shapes.VOCABULARY))  # as the demo model serves
    _, _, details = app.generate(**{**GOOD, "prompt": "A tiny astronaut hatching from an egg on the moon, 3 of them"})
    assert details.endswith(" | note: not in the demo's vocabulary: "
                            "tiny, astronaut, hatching, from, egg, moon, 3, them")
    _, _, details = app.generate(**{**GOOD, "prompt": "A red circle on the left, and a blue square at the top."})
    assert "note" not in details
    hint = app._vocabulary_hint()
    assert all(word in hint for word in (*shapes.SHAPES, *shapes.COLOURS, "on the left", "in the centre", "background"))


def test_a_user_mistake_logs_one_line_and_no_traceback(client, caplog, capfd):
    """Gradio prints the traceback of a gr.Error raised in a handler unless told not to: 35 lines for a typo."""
    from gradio_client.exceptions import AppError

    capfd.readouterr()
    with caplog.at_level(logging.INFO, logger="aot-space"), pytest.raises(AppError, match="Prompt is empty"):
        client.predict(**{**GOOD, "prompt": " "}, api_name="/generate")
    assert [r.getMessage() for r in caplog.records if r.name == "aot-space"] == [
        "user error: Prompt is empty: describe the image you want."]
    assert "Traceback" not in capfd.readouterr().err


def test_long_clip_prompt_is_served_with_a_visible_note(app):
    path, _, details = app.generate(**{**GOOD, "prompt": "a " * 100})
    assert _size(path) == (48, 80)
    assert "CLIP encoder reads only the first 77 tokens" in details


def test_randomized_seed_is_returned_and_reproduces_the_image(app):
    path, seed, _ = app.generate(**{**GOOD, "randomize_seed": True})
    assert 0 <= seed <= MAX_SEED
    again, _, _ = app.generate(**{**GOOD, "seed": seed})
    assert _digest(again) == _digest(path)


def test_the_png_is_named_after_prompt_and_seed_and_records_them(app):
    path, _, _ = app.generate(**{**GOOD, "prompt": "A Lighthouse, at dusk! (v2)"})
    assert Path(path).name == "a-lighthouse-at-dusk-v2-seed1234.png"
    assert Path(path).parent.parent == SESSION_DIR / "gradio"  # in Gradio's own cache, as its images are
    with Image.open(path) as image:
        assert image.info["prompt"] == "A Lighthouse, at dusk! (v2)" and image.info["seed"] == "1234"
    assert [app._slug(text) for text in ("../../etc/passwd", "$(touch x)", "??", "風の谷 2")] == [
        "etc-passwd", "touch-x", "image", "風の谷-2"]


def _digest(path: str) -> str:
    with Image.open(path) as image:
        return hashlib.sha256(image.tobytes()).hexdigest() + f"{image.size}"


def test_generate_api_returns_image_and_seed_and_is_deterministic(client):
    results = [client.predict(**{**GOOD, "resolution": res}, api_name="/generate")
               for res in ("64x64", "80x48", "80x48")]
    sizes = []
    for path, seed, details in results:
        with Image.open(path) as image:
            sizes.append(image.size)
        assert seed == 1234 and details.startswith(f"{sizes[-1][0]}x{sizes[-1][1]}, 2 steps")
    assert sizes == [(64, 64), (80, 48), (80, 48)]
    assert _digest(results[1][0]) == _digest(results[2][0])
    assert _digest(results[0][0]) != _digest(results[1][0])


def test_api_call_with_a_seed_alone_gets_that_seed_and_the_documented_defaults(client, app):
    path, seed, details = client.predict(prompt="a lighthouse at dusk", seed=42, api_name="/generate")
    assert seed == 42 and details.startswith("64x64, 28 steps") and _size(path) == (64, 64)


def test_page_api_and_generate_share_one_default_for_every_parameter(client, app):
    """The API's defaults are the page's starting values; they must be generate()'s own, /status's and the
    README's (a seed sent is the seed used unless randomize_seed is true)."""
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert set(endpoints) == {"/generate", "/status"}  # examples and the seed toggle are the page's own
    api = endpoints["/generate"]["parameters"]
    from_api = {p["parameter_name"]: p["parameter_default"] for p in api if p["parameter_has_default"]}
    # generate()'s input images are parameters only of a family that takes images: this one is text-only
    from_code = {name: p.default for name, p in inspect.signature(app.generate).parameters.items()
                 if p.default is not inspect.Parameter.empty and name != "progress" and not name.startswith("image")}
    assert from_api == from_code == {"resolution": "64x64", "seed": 0, "randomize_seed": False, "steps": 28,
                                     "guidance": 3.5, "negative_prompt": "", "lora": "none"}
    defaults = app.status()["defaults"]
    assert (defaults["seed"], defaults["randomize_seed"], defaults["steps"]) == (0, False, 28)


def test_api_rejects_bad_input_and_keeps_serving(client):
    from gradio_client.exceptions import AppError

    # payloads reach validate() as sent (preprocess=False), which names the allowed values
    with pytest.raises(AppError, match=r"Unknown resolution '1x1'. Allowed: 64x64, 48x80, 80x48"):
        client.predict(**{**GOOD, "resolution": "1x1"}, api_name="/generate")
    path, seed, _ = client.predict(**GOOD, api_name="/generate")
    assert seed == 1234 and Image.open(path).size == (48, 80)


def test_status_api_says_what_runs(client, compiled_blocks):
    status = client.predict(api_name="/status")
    assert status["model_id"] == "tiny-flux" and status["family"] == "flux"  # MODEL_ID=tiny is short for it
    assert status["demo_model"] is True and status["weights"] == "random"  # a stand-in that draws noise
    assert status["defaults"] == {"steps": 28, "guidance": 3.5, "guidance_kind": "embedded", "max_prompt_tokens": 512,
                                  "seed": 0, "randomize_seed": False}
    assert status["compile"] == "aoti" and status["compile_scope"] == "blocks"
    assert status["compile_source"] == "loaded from cache"
    assert status["cache_keys"] == compiled_blocks.report.cache_keys
    assert status["resolutions"] == ["64x64", "48x80", "80x48"]
    assert [p["image_tokens"] for p in status["programs"]] == [15, 16]
    # what a CPU cannot run is a note, not a fallback: nothing here degraded
    assert status["notes"] == ["quantization: fp8 needs CUDA with compute capability >= 8.9, this is cpu",
                               "attention: no faster attention kernel for cpu",
                               "cuda_graphs: CUDA graphs need a CUDA GPU"]
    assert status["cuda_graphs"] == "off" and status["graphs"] == {}
    assert status["fallbacks"] == []
    assert status["memory"]["low_vram"] is False and status["memory"]["reason"] == "no GPU memory limit to plan for"
    assert status["device"] == "cpu" and status["dtype"] == "float32"
    # start-up, step by step: both programs came from the session's cache, then were installed and warmed up
    startup = status["startup"]
    assert [(p["resolutions"], p["source"]) for p in startup["programs"]] == [("48x80, 80x48", "cached"),
                                                                              ("64x64", "cached")]
    assert {"model_load_s", "install_s", "warm_up_s"} <= set(startup) and status["hub_upload"] == {}
    # every preset timed on this device at startup: what each request's ZeroGPU duration is made of
    assert set(status["timings"]) == {"64x64", "48x80", "80x48"}
    assert all(t["call_s"] >= 0 and t["fixed_s"] >= 0 for t in status["timings"].values())
    assert status["durations"]["source"] == "measured on this device" and status["durations"]["duration_factor"] == 1
    assert status["hardware"]["device"] == "cpu" and status["zerogpu_size"] == ""


def test_banner_names_what_the_space_does_and_keeps_expected_choices_apart_from_fallbacks(app, monkeypatch):
    assert panel.title(app.SETTINGS) == "Text to image with tiny\u2011flux, random weights"
    assert panel.headline(app.REPORT) == "AoT compiled on CPU · 2 program(s), loaded from cache"
    banner = app._status_markdown()
    assert "Demo model" in banner and "random weights" in banner and "MODEL_ID" in banner
    assert "As expected on this hardware:\n\n- quantization: fp8 needs CUDA" in banner
    assert "- attention: no faster attention kernel for cpu" in banner
    assert "loaded from cache in" in banner and "fallback" not in banner.lower()
    assert "Start-up: model load " in banner and "48x80, 80x48 cached " in banner and "warm-up " in banner
    monkeypatch.setattr(app.REPORT, "fallbacks", ["compile: AoT compilation failed, serving eager (simulated)"])
    monkeypatch.setattr(app.REPORT, "compile", "none")
    assert panel.headline(app.REPORT) == "Not compiled, so slower, on CPU · 1 fallback"
    assert "- fallback: compile: AoT compilation failed" in app._status_markdown()


def _flux_sized(app, monkeypatch, **durations) -> None:
    """The app serving FLUX.1's presets, each request's time estimated from an H100's step (none measured here)."""
    presets = parse_presets("square=1024x1024,portrait=832x1216,big=1216x1216", multiple=16)
    monkeypatch.setattr(app, "PRESETS", {preset.name: preset for preset in presets})
    monkeypatch.setattr(app, "DURATIONS", dataclasses.replace(app.DURATIONS, timings={}, compiled=True, slowdown=1.0,
                                                              **durations))


def test_gpu_duration_scales_with_the_family_step_cost(app, monkeypatch):
    _flux_sized(app, monkeypatch)
    monkeypatch.setattr(app, "SERVED_SHAPES", {(1024, 1024)})
    base = app.gpu_seconds("p", 1024, 1024, 0, 50, 3.5) - FIXED_SECONDS
    monkeypatch.setattr(app, "DURATIONS", dataclasses.replace(app.DURATIONS, step_cost=3.0))
    assert app.gpu_seconds("p", 1024, 1024, 0, 50, 3.5) - FIXED_SECONDS in range(3 * base - 2, 3 * base + 1)


def test_gpu_duration_grows_with_steps_and_resolution_and_covers_a_first_load(app, monkeypatch):
    _flux_sized(app, monkeypatch, weight_gib=20.0)
    monkeypatch.setattr(app, "SERVED_SHAPES", {(1024, 1024), (1216, 1216)})
    assert app.gpu_seconds("p", 1024, 1024, 0, 4, 3.5) < app.gpu_seconds("p", 1024, 1024, 0, 50, 3.5)
    assert app.gpu_seconds("p", 1024, 1024, 0, 28, 3.5) < app.gpu_seconds("p", 1216, 1216, 0, 28, 3.5)
    served = app.gpu_seconds("p", 1024, 1024, 0, 28, 3.5)
    # a shape this worker has not run: its program loads first
    assert app.gpu_seconds("p", 832, 1216, 0, 28, 3.5) >= served + PROGRAM_LOAD_SECONDS
    # a new worker (nothing served yet) also copies the weights to the GPU first, at 1 s per GiB
    monkeypatch.setattr(app, "SERVED_SHAPES", set())
    assert app.gpu_seconds("p", 1024, 1024, 0, 28, 3.5) >= served + PROGRAM_LOAD_SECONDS + 4 + 20


def test_a_new_worker_is_sized_by_the_weights_as_stored():
    from torch.testing._internal.two_tensor import TwoTensor

    from aot.memory import _stored_bytes, resident_bytes
    from aot.quantize import quantize_

    pipe = tiny_model().pipe
    linears = [m.weight for m in pipe.transformer.modules() if type(m) is torch.nn.Linear]
    linear_bytes = sum(w.numel() * w.element_size() for w in linears)
    before = resident_bytes(pipe)
    quantize_(pipe.transformer, "int8")  # one byte a weight, plus a scale per row
    assert before - resident_bytes(pipe) >= linear_bytes * (1 - 1 / linears[0].element_size()) * 0.9
    weight = torch.zeros(16, 8, dtype=torch.bfloat16)
    assert _stored_bytes(TwoTensor(weight, weight.clone())) == 2 * 16 * 8 * 2  # a wrapper: the tensors inside


def test_unloadable_model_id_stops_with_one_clear_message():
    settings = Settings.from_env({"MODEL_ID": "nobody/no-such-model"}, has_cuda=False)
    with pytest.raises(SystemExit) as stop:
        load_pipeline(settings, cpu())
    message = str(stop.value)
    assert "MODEL_ID='nobody/no-such-model'" in message and "unset MODEL_ID" in message
    assert len(message.splitlines()) <= 3


def test_an_example_follows_the_chosen_resolution_and_is_made_once_per_resolution(app, monkeypatch):
    monkeypatch.setattr(app, "EXAMPLE_RESULTS", {})
    square, seed, details = app.example((0, [app.EXAMPLES[0]]), "64x64")
    assert _size(square) == (64, 64) and seed == app.DEFAULT_SEED and details.startswith("64x64, 28 steps")
    portrait, _, _ = app.example((0, [app.EXAMPLES[0]]), "48x80")
    assert _size(portrait) == (48, 80)
    assert app.example((0, [app.EXAMPLES[0]]), "64x64") == (square, seed, details + ", example shown again")
    with pytest.raises(gr.Error, match="Unknown resolution '1x1'"):
        app.example((0, [app.EXAMPLES[0]]), "1x1")
    assert set(app.EXAMPLE_RESULTS) == {(0, "64x64"), (0, "48x80")}


def test_examples_come_from_the_model_folder_when_it_has_them(app, monkeypatch, tmp_path):
    monkeypatch.setattr(app, "MODEL", SimpleNamespace(pipe=SimpleNamespace(name_or_path=str(tmp_path))))
    assert app._example_prompts() == app.REAL_MODEL_EXAMPLES  # no examples.txt yet
    (tmp_path / "examples.txt").write_text("a red circle on the left\n\n  a blue square at the top  \n")
    assert app._example_prompts() == ["a red circle on the left", "a blue square at the top"]
    monkeypatch.setattr(app, "MODEL", SimpleNamespace(pipe=SimpleNamespace(name_or_path=None)))  # built in memory
    assert app._example_prompts() == app.REAL_MODEL_EXAMPLES


def test_a_restart_with_other_presets_shows_examples_at_the_new_sizes(monkeypatch):
    """Examples are made by the running process: a Space restarted with other PRESETS never shows an older image,
    and nothing is kept on disk between starts (Gradio's examples cache stays empty)."""
    monkeypatch.setenv("PRESETS", "small=32x32,wide=64x32")
    monkeypatch.setenv("COMPILE", "none")  # eager: this start is about the examples, not the programs
    spec = importlib.util.spec_from_file_location("app_restarted", ROOT / "app.py")
    restarted = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(restarted)
    assert restarted.status()["resolutions"] == ["32x32", "64x32"]
    for resolution, size in [("32x32", (32, 32)), ("64x32", (64, 32))]:
        path, _, details = restarted.example((0, [restarted.EXAMPLES[0]]), resolution)
        assert _size(path) == size and not details.endswith("example shown again")
    with pytest.raises(gr.Error, match="Allowed: 32x32, 64x32"):
        restarted.example((0, [restarted.EXAMPLES[0]]), "64x64")
    examples_cache = SESSION_DIR / "examples"
    assert not examples_cache.exists() or not any(examples_cache.iterdir())  # conftest points Gradio there
