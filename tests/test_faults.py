"""Faults, each injected through a setting or a monkeypatch, and what the app does about them: it keeps
serving, degraded where it must be, and says so in the status panel and the /status API.

A corrupt compiled-artifact cache (recompiled with a warning) is covered in tests/test_cache.py:
test_truncated_artifact_is_rebuilt_with_a_warning and test_damaged_entries_are_not_trusted.
"""
import importlib.util
import os
import subprocess
import sys

import pytest
import spaces
import torch
from PIL import Image

import optimization
from aot.model import load_model
from aot.programs import ShapeDispatch
from conftest import ROOT, settings_for

REQUEST = dict(prompt="a lighthouse at dusk", resolution="80x48", seed=99, randomize_seed=False, steps=2, guidance=3.5,
               negative_prompt="")


@pytest.fixture
def fresh_app(monkeypatch, tmp_path):
    """Starts another copy of app.py, as the Space would, with the environment given; closes its server after."""
    started = []

    def start(**env):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        spec = importlib.util.spec_from_file_location(f"app_under_fault_{len(started)}", ROOT / "app.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        started.append(module)
        return module

    yield start
    for module in started:
        module.demo.close()


def _status_api(module) -> dict:
    from gradio_client import Client

    module.demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    return Client(module.demo.local_url, verbose=False).predict(api_name="/status")


def test_failed_aot_compile_serves_eager_and_says_why(fresh_app, monkeypatch, tmp_path):
    def compiler_fails(*args, **kwargs):
        raise RuntimeError("C++ compile error: simulated compiler crash")

    monkeypatch.setattr(spaces, "aoti_compile_and_save", compiler_fails)
    app = fresh_app(COMPILE="aoti", AOT_CACHE_DIR=str(tmp_path))

    reason = ("compile: AoT compilation failed, serving eager "
              "(RuntimeError: C++ compile error: simulated compiler crash)")
    assert app.REPORT.compile == "none" and reason in app.REPORT.fallbacks
    # plain eager modules
    assert not any("forward" in module.__dict__ for module in app.MODEL.pipe.transformer.modules())
    assert not list(tmp_path.rglob("*.pt2")) and not list(tmp_path.glob("*/manifest.json"))  # nothing half-written
    banner = app._status_markdown()
    assert "eager (not compiled)" in banner and f"fallback: {reason}" in banner
    status = _status_api(app)
    assert status["compile"] == "none" and reason in status["fallbacks"]
    path, seed, details = app.generate(**REQUEST)
    assert Image.open(path).size == (80, 48) and seed == 99 and details.startswith("80x48, 2 steps")


def test_unloadable_attention_kernel_falls_back_to_sdpa_and_still_compiles(fresh_app, compiled_blocks):
    # offline (HF_HUB_OFFLINE=1) and on CPU, the FlashAttention-3 hub kernel cannot be fetched: the probe finds out
    app = fresh_app(ATTENTION="_flash_3_hub")

    assert app.REPORT.attention == "sdpa"
    [fallback] = [f for f in app.REPORT.fallbacks if f.startswith("attention: _flash_3_hub failed on the device")]
    assert "offline" in fallback and "fastest that ran: sdpa" in fallback
    # with SDPA the programs are the ones the session compiled: same key, loaded from the cache
    assert app.REPORT.compile == "aoti" and app.REPORT.cache_keys == compiled_blocks.report.cache_keys
    banner = app._status_markdown()
    assert "attention `sdpa`" in banner and "fallback: attention: _flash_3_hub failed on the device" in banner
    assert _status_api(app)["attention"] == "sdpa"
    path, seed, _ = app.generate(**REQUEST)
    assert Image.open(path).size == (80, 48) and seed == 99


def _fail_once_inside_the_transformer(monkeypatch, app, error: Exception):
    """The transformer's first block runs its compiled program and then raises `error`, once."""
    block = app.MODEL.pipe.transformer.transformer_blocks[0]
    dispatch = block.forward
    assert isinstance(dispatch, ShapeDispatch)  # regional, the default: the fault is raised on the compiled path
    raised = []

    def forward(*args, **kwargs):
        out = dispatch(*args, **kwargs)
        if not raised:
            raised.append(error)
            raise error
        return out

    monkeypatch.setattr(block, "forward", forward)
    return raised


@pytest.mark.parametrize("error, message", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
     "The GPU ran out of memory for this request. Try a smaller resolution or fewer steps."),
    (RuntimeError("simulated kernel failure"), "Generation failed: RuntimeError: simulated kernel failure"),
])
def test_generation_error_reaches_the_user_and_the_next_request_succeeds(client, app, monkeypatch, error, message):
    from gradio_client.exceptions import AppError

    reference, _, _ = client.predict(**REQUEST, api_name="/generate")
    raised = _fail_once_inside_the_transformer(monkeypatch, app, error)
    with pytest.raises(AppError) as failure:
        client.predict(**REQUEST, api_name="/generate")
    assert raised == [error] and str(failure.value) == message
    path, seed, _ = client.predict(**REQUEST, api_name="/generate")
    with Image.open(path) as image, Image.open(reference) as before:
        assert seed == 99 and image.tobytes() == before.tobytes()


def test_unloadable_model_id_exits_with_one_clear_message():
    env = {**os.environ, "MODEL_ID": "nobody/no-such-model", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "app.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    message = result.stderr.strip().splitlines()[-2:]
    assert message[0].startswith("Could not load MODEL_ID='nobody/no-such-model': "), result.stderr[-3000:]
    assert "unset MODEL_ID to run the tiny demo" in message[1]
    assert "Running on" not in result.stdout


def test_attention_backend_that_installs_but_cannot_run_falls_back_to_sdpa_without_compiling():
    """cuDNN attention is accepted on CPU but has no kernel there: the startup probe catches it."""
    settings = settings_for(compile="none", attention="_native_cudnn")
    model = load_model(settings)
    report = optimization.optimize_pipeline_(model, settings)
    assert report.attention == "sdpa" and report.compile == "none"
    assert any(f.startswith("attention: _native_cudnn failed on the device") for f in report.fallbacks)
    latents = model("a fox", model.presets[0], steps=2, output_type="latent").images
    assert latents.shape[1] == 16  # 64x64: 16 image tokens
    assert torch.isfinite(latents).all()
