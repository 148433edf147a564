"""Step caching (STEP_CACHE, aot/step_cache.py) on the tiny FLUX pipeline: diffusers' cache hooks around the regional
programs, compiled once here (AOT_SCOPE=model asked, blocks compiled, and said why) at one preset, against the same
cache run eagerly: the same latents, the same calls skipped, and the skipped blocks' programs not called. Also the
setting's validation, which families each cache runs on, and the app's banner and per-image details.
"""
import contextlib
import importlib.util
import inspect
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import optimization
from aot import step_cache
from aot.model import load_model
from aot.programs import ShapeDispatch
from aot.report import Report
from conftest import ROOT, rel_err, settings_for
from settings import StepCache, parse_step_cache

TOLERANCE = 1e-4  # fp32, compiled vs eager
PRESET = "landscape=80x48"  # one preset: one program per block class
PROMPT, SEED, STEPS = "a red cube", 5, 6
# On this prompt, seed and preset, the first block's output changes by 0.22-0.52 (relative mean absolute change)
# from one full call to the next (measured): with 0.45 calls 1, 2, 4 and 5 are skipped, every decision at least 0.07
# from the threshold, so compiled and eager decide alike.
FBC = "fbc:0.45"
FBC_FULL = 2
# TaylorSeer computes its first 3 calls, then one in every INTERVAL: calls 0, 1, 2 and 4 of 6
TAYLORSEER, TAYLORSEER_FULL = "taylorseer:2", 4


def _start(cache_dir: Path, **overrides):
    """A fresh tiny FLUX pipeline at PRESET after `optimize_pipeline_`: (model, report)."""
    settings = settings_for(**{"presets": PRESET, "aot_cache_dir": cache_dir, **overrides})
    model = load_model(settings)
    return model, optimization.optimize_pipeline_(model, settings)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("step-cache-aot")


@pytest.fixture(scope="module")
def compiled(cache_dir):
    """The one compile: whole-model scope asked for, with First Block Cache."""
    return _start(cache_dir, compile="aoti", aot_scope="model", step_cache=FBC)


@pytest.fixture(scope="module")
def eager(cache_dir):
    return _start(cache_dir, compile="none", step_cache=FBC)


@pytest.fixture(scope="module")
def uncached(cache_dir):
    return _start(cache_dir, compile="none")


def _image(model) -> tuple[torch.Tensor, step_cache.Counts | None]:
    """One STEPS-step image as latents, and its counts (None without a step cache)."""
    preset = model.presets[0]
    with torch.inference_mode(), step_cache.counting(model.pipe.transformer) as counts:
        generator = torch.Generator().manual_seed(SEED)
        latents = model(PROMPT, preset, STEPS, generator=generator, output_type="latent").images
    return latents, counts


@contextlib.contextmanager
def _swapped(model, value: str):
    """The transformer with another step cache in place of its own, for the duration."""
    transformer = model.pipe.transformer
    own = Report(device="cpu", dtype="float32", step_cache=_running(transformer))
    transformer.disable_cache()
    step_cache.enable_(transformer, Report(device="cpu", dtype="float32", step_cache=value))
    try:
        yield
    finally:
        transformer.disable_cache()
        step_cache.enable_(transformer, own)


def _running(transformer) -> str:
    """The enabled diffusers config, as STEP_CACHE names it."""
    config = transformer._cache_config
    return f"fbc:{config.threshold}" if hasattr(config, "threshold") else f"taylorseer:{config.cache_interval}"


# --- the setting ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("", StepCache()), ("off", StepCache()), ("fbc", StepCache("fbc")),
    (" FBC:0.08 ", StepCache("fbc", threshold=0.08)),
    ("fbc:1", StepCache("fbc", threshold=1.0)), ("taylorseer", StepCache("taylorseer")),
    ("taylorseer:4", StepCache("taylorseer", interval=4)),
])
def test_step_cache_values_parse(text, expected):
    assert parse_step_cache(text) == expected
    assert parse_step_cache(str(expected)) == expected  # the report names it the way the setting does
    assert settings_for(step_cache=text).step_cache == expected


@pytest.mark.parametrize("text", ["on", "fcb", "fbc:", "fbc:0", "fbc:-0.1", "fbc:1.5", "fbc:nan", "fbc:x",
                                  "taylorseer:1", "taylorseer:2.5", "off:1", "teacache"])
def test_an_invalid_step_cache_names_the_variable_and_the_allowed_values(text):
    allowed = r"is not one of off, fbc, fbc:THRESHOLD .* taylorseer, taylorseer:INTERVAL"
    with pytest.raises(ValueError, match=rf"^STEP_CACHE='.*' {allowed}"):
        settings_for(step_cache=text)


def test_a_step_cache_with_several_ranks_is_refused():
    with pytest.raises(ValueError, match=r"^STEP_CACHE=fbc with 2 ranks \(WORLD_SIZE\)"):
        settings_for(step_cache="fbc", world_size=2, compile="none")


# --- compiled with the cache ----------------------------------------------------------------------------------
def test_model_scope_with_a_step_cache_compiles_blocks_and_says_why(compiled, cache_dir):
    _, report = compiled
    assert (report.compile, report.compile_scope, report.step_cache) == ("aoti", "blocks", FBC)
    assert "FirstBlockCacheConfig(threshold=0.45)" in report.step_cache_reason
    assert report.fallbacks == [(f"compile scope: regional programs for STEP_CACHE={FBC}: it skips blocks, and a "
                                 "whole-model program has none")]
    assert report.compile_source == "compiled now"
    assert report.programs == [{"image_tokens": 15, "resolutions": ["80x48"]}]
    key = json.loads((cache_dir / report.cache_keys[0] / "manifest.json").read_text())["key"]
    assert key["scope"] == "blocks"
    # the very programs AOT_SCOPE=blocks compiles: a start without the cache loads them instead of compiling
    _, plain = _start(cache_dir, compile="aoti", aot_scope="blocks")
    assert plain.compile_source == "loaded from cache" and plain.cache_keys == report.cache_keys
    assert plain.step_cache == "off" and plain.fallbacks == []


def test_compiled_with_the_cache_matches_eager_with_the_cache(compiled, eager):
    (compiled_latents, compiled_counts), (eager_latents, eager_counts) = _image(compiled[0]), _image(eager[0])
    assert eager[1].step_cache == FBC and eager[1].compile == "none" and eager[1].fallbacks == []
    assert (compiled_counts.calls, compiled_counts.full) == (eager_counts.calls, eager_counts.full) == (STEPS, FBC_FULL)
    assert torch.isfinite(compiled_latents).all()
    assert rel_err(compiled_latents, eager_latents) <= TOLERANCE


def _dispatch(block: torch.nn.Module) -> ShapeDispatch:
    """The block's program dispatcher, under the cache's hooks (and the counter's)."""
    assert not isinstance(block.forward, ShapeDispatch)  # the hooks wrap it
    dispatch = inspect.unwrap(block.forward)
    assert isinstance(dispatch, ShapeDispatch)
    return dispatch


def test_the_cache_skips_steps_and_its_hooks_call_the_programs(compiled, uncached):
    transformer = compiled[0].pipe.transformer
    first, last = transformer.transformer_blocks[0], transformer.single_transformer_blocks[-1]
    calls = {first: 0, last: 0}
    dispatchers = {block: _dispatch(block) for block in calls}
    for block, dispatch in dispatchers.items():
        def program_for(args, kwargs, _pick=dispatch.program_for, _block=block):
            calls[_block] += 1
            return _pick(args, kwargs)
        dispatch.program_for = program_for
    eager_code = []  # a block's own layers run only in eager code, never inside its program
    handles = [block.attn.register_forward_pre_hook(lambda *_: eager_code.append(1)) for block in calls]
    try:
        latents, counts = _image(compiled[0])
    finally:
        for dispatch in dispatchers.values():
            del dispatch.program_for
        for handle in handles:
            handle.remove()
    assert (counts.calls, counts.full) == (STEPS, FBC_FULL)
    assert calls == {first: STEPS, last: FBC_FULL} and eager_code == []
    # skipping changed the image, a little: random weights, so this drift says nothing about quality
    reference, none = _image(uncached[0])
    assert none is None and uncached[1].step_cache == "off"
    assert 1e-4 < rel_err(latents, reference) < 0.05


def test_taylorseer_composes_with_the_programs_too(compiled, eager):
    results = {}
    for name, (model, _) in {"compiled": compiled, "eager": eager}.items():
        with _swapped(model, TAYLORSEER):
            results[name] = _image(model)
        assert _running(model.pipe.transformer) == FBC  # its own cache is back
    (compiled_latents, compiled_counts), (eager_latents, eager_counts) = results["compiled"], results["eager"]
    assert (compiled_counts.calls, compiled_counts.full) == (STEPS, TAYLORSEER_FULL)
    assert (eager_counts.calls, eager_counts.full) == (STEPS, TAYLORSEER_FULL)
    assert rel_err(compiled_latents, eager_latents) <= TOLERANCE


def _interrupted(pipe, step, timestep, kwargs):  # a pipeline callback: the image fails after its third step
    if step == 2:
        raise RuntimeError("interrupted")
    return {}


def test_a_failed_image_does_not_hand_its_cache_state_to_the_next(eager):
    """TaylorSeer counts steps: the next image would start at the failed one's fourth, predicting its first."""
    model, _ = eager
    with _swapped(model, TAYLORSEER):
        expected, _ = _image(model)
        with pytest.raises(RuntimeError, match="interrupted"), step_cache.counting(model.pipe.transformer):
            model(PROMPT, model.presets[0], STEPS, generator=torch.Generator().manual_seed(SEED), output_type="latent",
                  callback_on_step_end=_interrupted)
        latents, counts = _image(model)
    assert (counts.calls, counts.full) == (STEPS, TAYLORSEER_FULL) and torch.equal(latents, expected)


# --- which families each cache runs on ------------------------------------------------------------------------
@pytest.mark.parametrize("family, method, why_not", [
    ("flux", "fbc", None), ("flux", "taylorseer", None), ("qwen-image", "fbc", None),
    ("flux2-klein", "taylorseer", None),
    ("flux2-klein", "fbc", "pairs the first block's outputs with the last's"),
    ("flux2", "taylorseer", "Flux2Pipeline does not enter the transformer's cache_context"),
    ("z-image", "fbc", "ZImageTransformer2DModel has no diffusers cache hooks"),
])
def test_each_family_runs_a_cache_or_says_why_not(family, method, why_not):
    model = load_model(settings_for(model_id=f"tiny-{family}", compile="none"))
    decision = step_cache.choose(StepCache(method), model)
    if why_not is None:
        assert decision.value.startswith(f"{method}:") and not decision.fell_back
        return
    assert decision.value == "off" and decision.fell_back
    assert decision.reason.startswith(f"STEP_CACHE={method} is not supported for the {family} family: ")
    assert why_not in decision.reason
    transformer = model.pipe.transformer
    if hasattr(transformer, "enable_cache"):  # what refusing spares: the hooks fail in the middle of an image
        transformer.enable_cache(step_cache.diffusers_config(StepCache(method)))
        with pytest.raises((TypeError, ValueError)):
            model("a red cube", model.presets[0], 2, output_type="latent")


def test_an_unsupported_family_serves_without_the_cache_and_reports_it(cache_dir):
    model, report = _start(cache_dir, model_id="tiny-z-image", presets="", compile="none", step_cache="fbc")
    assert report.step_cache == "off"
    with step_cache.counting(model.pipe.transformer) as counts:
        assert counts is None
    assert report.fallbacks == [("step_cache: STEP_CACHE=fbc is not supported for the z-image family: "
                                 "ZImageTransformer2DModel has no diffusers cache hooks (enable_cache)")]


# --- the app --------------------------------------------------------------------------------------------------
def test_the_app_shows_the_cache_and_each_image_s_full_calls(compiled, cache_dir):
    with pytest.MonkeyPatch.context() as env:
        for name, value in {"COMPILE": "aoti", "AOT_SCOPE": "blocks", "STEP_CACHE": FBC, "PRESETS": PRESET,
                            "AOT_CACHE_DIR": str(cache_dir)}.items():
            env.setenv(name, value)
        spec = importlib.util.spec_from_file_location("app_with_step_cache", ROOT / "app.py")
        app = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(app)
    assert app.REPORT.compile_source == "loaded from cache" and app.status()["step_cache"] == FBC
    assert f"attention `sdpa`, step cache `{FBC}`, quantization" in app._status_markdown()
    path, seed, details = app.generate(PROMPT, "80x48", SEED, False, STEPS, app.DEFAULTS.guidance)
    assert seed == SEED and details.startswith(f"80x48, {STEPS} steps, ")
    assert details.endswith(f", step cache: {FBC_FULL} of {STEPS} transformer calls ran in full")
    with Image.open(path) as image:
        assert "step_cache" not in image.info and image.info["seed"] == str(SEED)
