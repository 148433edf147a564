"""The Gradio app on the tiny model, compiled: input validation, the API through gradio_client, status."""
import hashlib
import math

import gradio as gr
import pytest
from PIL import Image

from aot.model import load_pipeline
from settings import MAX_SEED, Settings


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
    image, seed, details = app.generate(**GOOD)
    assert image.size == (48, 80) and seed == 1234 and "2 steps" in details


def test_negative_prompt_on_a_model_without_cfg_is_refused_and_the_next_request_works(app):
    # the cleaned request: prompt, preset, seed, steps, guidance, negative prompt, notes for the user
    assert app.validate(**GOOD) == ("a lighthouse at dusk", app.PRESETS["48x80"], 1234, 2, 3.5, "", [])
    with pytest.raises(gr.Error, match="This flux model takes no negative prompt"):
        app.generate(**{**GOOD, "negative_prompt": "blurry"})
    image, seed, details = app.generate(**GOOD)
    assert image.size == (48, 80) and seed == 1234 and "2 steps" in details


def test_long_clip_prompt_is_served_with_a_visible_note(app):
    image, _, details = app.generate(**{**GOOD, "prompt": "a " * 100})
    assert image.size == (48, 80)
    assert "CLIP encoder reads only the first 77 tokens" in details


def test_randomized_seed_is_returned_and_reproduces_the_image(app):
    image, seed, _ = app.generate(**{**GOOD, "randomize_seed": True})
    assert 0 <= seed <= MAX_SEED
    again, _, _ = app.generate(**{**GOOD, "seed": seed})
    assert again.tobytes() == image.tobytes()


def _digest(path: str) -> str:
    with Image.open(path) as image:
        return hashlib.sha256(image.tobytes()).hexdigest() + f"{image.size}"


def test_generate_api_returns_image_and_seed_and_is_deterministic(client):
    results = [client.predict(**{**GOOD, "resolution": res}, api_name="/generate") for res in ("64x64", "80x48", "80x48")]
    sizes = []
    for path, seed, details in results:
        with Image.open(path) as image:
            sizes.append(image.size)
        assert seed == 1234 and details.startswith(f"{sizes[-1][0]}x{sizes[-1][1]}, 2 steps")
    assert sizes == [(64, 64), (80, 48), (80, 48)]
    assert _digest(results[1][0]) == _digest(results[2][0])
    assert _digest(results[0][0]) != _digest(results[1][0])


def test_api_call_from_the_readme_needs_no_negative_prompt(client):
    """The README's client call, which predates the negative prompt: an optional parameter stays optional."""
    path, seed, details = client.predict(prompt="a lighthouse at dusk", resolution="80x48", seed=42,
                                         randomize_seed=False, steps=2, guidance=3.5, api_name="/generate")
    assert seed == 42 and details.startswith("80x48, 2 steps") and Image.open(path).size == (80, 48)


def test_api_rejects_bad_input_and_keeps_serving(client):
    from gradio_client.exceptions import AppError

    # payloads reach validate() as sent (preprocess=False), which names the allowed values
    with pytest.raises(AppError, match=r"Unknown resolution '1x1'. Allowed: 64x64, 48x80, 80x48"):
        client.predict(**{**GOOD, "resolution": "1x1"}, api_name="/generate")
    path, seed, _ = client.predict(**GOOD, api_name="/generate")
    assert seed == 1234 and Image.open(path).size == (48, 80)


def test_status_api_says_what_runs(client, compiled_model):
    status = client.predict(api_name="/status")
    assert status["model_id"] == "tiny" and status["demo_model"] is True and status["family"] == "flux"
    assert status["defaults"] == {"steps": 28, "guidance": 3.5, "guidance_kind": "embedded", "max_prompt_tokens": 512}
    assert status["compile"] == "aoti" and status["compile_scope"] == "model"
    assert status["compile_source"] == "loaded from cache"
    assert status["cache_keys"] == compiled_model.report.cache_keys
    assert status["resolutions"] == ["64x64", "48x80", "80x48"]
    assert [p["image_tokens"] for p in status["programs"]] == [15, 16]
    assert any(f.startswith("attention: FlashAttention-3 needs a Hopper GPU") for f in status["fallbacks"])
    assert status["memory"]["low_vram"] is False and status["memory"]["reason"] == "no GPU memory limit to plan for"
    assert status["device"] == "cpu" and status["dtype"] == "float32"


def test_ui_labels_the_demo_model_and_shows_fallbacks(app):
    banner = app._status_markdown()
    assert "Demo model" in banner and "random weights" in banner and "MODEL_ID" in banner
    assert "fallback: attention" in banner and "loaded from cache in" in banner


def test_gpu_duration_scales_with_the_family_step_cost(app, monkeypatch):
    import dataclasses

    monkeypatch.setattr(app, "SERVED_SHAPES", {(1024, 1024)})
    base = app.gpu_seconds("p", 1024, 1024, 0, 50, 3.5) - 10  # less the fixed 10 s
    monkeypatch.setattr(app, "FAMILY", dataclasses.replace(app.FAMILY, step_cost=3.0))
    assert app.gpu_seconds("p", 1024, 1024, 0, 50, 3.5) - 10 in (3 * base, 3 * base + 1, 3 * base + 2)


def test_gpu_duration_grows_with_steps_and_resolution_and_covers_a_first_load(app, monkeypatch):
    monkeypatch.setattr(app, "SERVED_SHAPES", {(1024, 1024), (1216, 1216)})
    assert app.gpu_seconds("p", 1024, 1024, 0, 4, 3.5) < app.gpu_seconds("p", 1024, 1024, 0, 50, 3.5)
    assert app.gpu_seconds("p", 1024, 1024, 0, 28, 3.5) < app.gpu_seconds("p", 1216, 1216, 0, 28, 3.5)
    assert app.gpu_seconds("p", 832, 1216, 0, 28, 3.5) >= app.gpu_seconds("p", 1024, 1024, 0, 28, 3.5) + 85  # not served yet


def test_unloadable_model_id_stops_with_one_clear_message():
    settings = Settings.from_env({"MODEL_ID": "nobody/no-such-model"}, has_cuda=False)
    with pytest.raises(SystemExit) as stop:
        load_pipeline(settings)
    message = str(stop.value)
    assert "MODEL_ID='nobody/no-such-model'" in message and "unset MODEL_ID" in message
    assert len(message.splitlines()) <= 3
