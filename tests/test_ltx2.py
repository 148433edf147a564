"""LTX-2, on its tiny random-weight pipeline (MODEL_ID=tiny-ltx2): one transformer denoising a video and its sound
track together, AoT-compiled on CPU at block scope (the default); compiled matches eager at every preset on both
streams, and the app returns an MP4 whose sound track is the pipeline's, decoded back with PyAV.

One compile per program for the module: `ltx2` is compiled once and every test reads it.
"""
from pathlib import Path

import numpy as np
import pytest
import torch

from aot.families import FAMILIES, LTX2, LTX2_I2V, Defaults, Guidance
from aot.model import Model
from aot.programs import ShapeDispatch
from aot.video import Clip, encode
from aot.zerogpu import FIXED_SECONDS, MARGIN, Durations, Timing
from conftest import Compiled, rel_err, served_app, tiny_model
from settings import check_frames, parse_presets

TOLERANCE = 1e-4  # fp32, compiled vs eager
PROMPT = "a drum rolling down stairs"


class LTX2Compiled(Compiled):
    """tiny-ltx2 after `optimize_pipeline_`, with the transformer's eager video and audio outputs at every preset and
    a whole run's latents, recorded before."""

    def __init__(self, **overrides):
        super().__init__(**{"model_id": "tiny-ltx2", **overrides})

    def check_model(self) -> None:
        assert self.model.family.name == "ltx2"

    def record_eager(self) -> None:
        self.eager_streams = self.run_streams()
        self.eager_latents = self.latents()

    def run_streams(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The transformer's (video, audio) outputs at every preset's captured call."""
        with torch.inference_mode():
            return {preset: tuple(t.clone() for t in self.pipe.transformer(*args, **kwargs)[:2])
                    for preset, (args, kwargs) in self.inputs.items()}

    def latents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Two steps at the first preset, as (video, audio) latents."""
        generator = torch.Generator().manual_seed(5)
        with torch.inference_mode():
            result = self.model(PROMPT, self.model.presets[0], steps=2, generator=generator, output_type="latent")
        return result.frames, result.audio


@pytest.fixture(scope="module")
def ltx2() -> LTX2Compiled:
    return LTX2Compiled()


def test_compiled_matches_eager_at_every_preset_on_both_streams(ltx2):
    assert ltx2.report.compile == "aoti" and ltx2.report.compile_scope == "blocks", ltx2.report.fallbacks
    compiled = ltx2.run_streams()
    assert set(compiled) == {p.name for p in ltx2.model.presets}
    for preset, streams in compiled.items():
        for stream, out, eager in zip(("video", "audio"), streams, ltx2.eager_streams[preset]):
            assert torch.isfinite(out).all() and rel_err(out, eager) <= TOLERANCE, (preset, stream)
    for out, eager in zip(ltx2.latents(), ltx2.eager_latents):
        assert rel_err(out, eager) <= TOLERANCE


def test_every_block_runs_one_program_per_video_token_count(ltx2):
    # one block class carries both streams: its programs are all there is (no audio-only block list)
    assert list(ltx2.report.cache_keys) and ltx2.pipe.transformer._repeated_blocks == ["LTX2VideoTransformerBlock"]
    blocks = ltx2.pipe.transformer.transformer_blocks
    patched = [m for m in ltx2.pipe.transformer.modules() if isinstance(m.__dict__.get("forward"), ShapeDispatch)]
    assert sorted(map(id, patched)) == sorted(map(id, blocks))
    # 96x64x9 and 64x96x9 are 2 latent frames of 6 tokens, 64x64x9 of 4; each with the same 9 audio tokens
    assert ltx2.report.programs == [{"image_tokens": 8, "resolutions": ["64x64x9"]},
                                    {"image_tokens": 12, "resolutions": ["96x64x9", "64x96x9"]}]


def test_presets_are_8k_plus_1_frames_at_multiples_of_32():
    presets = parse_presets(LTX2.presets, LTX2.multiple)
    check_frames(presets, LTX2.video, "ltx2")
    assert [LTX2.tokens(p) for p in presets] == [16 * 24 * 16] * 2  # 121 frames: 16 latent frames of 24x16 tokens
    with pytest.raises(ValueError, match=r"must be 8k\+1 .* at most 121"):
        check_frames(parse_presets("a=768x512x77", 32), LTX2.video, "ltx2")
    with pytest.raises(ValueError, match="multiples of 32"):
        parse_presets("a=784x512x121", 32)


def test_a_step_counts_its_batched_cfg_call_as_two_batch_one_calls_at_every_guidance():
    ltx2 = Model(None, LTX2, Defaults(30, 3.0, Guidance.CFG, 1024), parse_presets(LTX2.presets, LTX2.multiple))
    qwen = Model(None, next(f for f in FAMILIES if f.name == "qwen-image"), Defaults(50, 4.0, Guidance.CFG, 1024), ())
    for guidance in (0.0, 1.0, 3.0):  # the sound track's guidance keeps CFG on
        assert ltx2.step_calls(guidance) == (1, 2) and ltx2.batch_one_calls(guidance) == 2, guidance
    assert [qwen.step_calls(g) for g in (1.0, 4.0)] == [(1, 1), (2, 1)]
    # a step timed at the default guidance and a request at guidance 1 count the same work: the startup timing
    # (optimization.py `time_presets`) divides a step by these calls, a request multiplies by them
    step_s, calls = 0.8, ltx2.batch_one_calls(ltx2.defaults.guidance)
    preset = ltx2.presets[0]
    durations = Durations({preset.name: Timing(step_s / calls, 0.0)}, True, 1.0, 1.0, 0.0, tokens=LTX2.tokens)
    at_1, at_3 = (durations.task_seconds(preset, 10, ltx2.batch_one_calls(g), False, False) for g in (1.0, 3.0))
    assert at_1 == at_3 == pytest.approx(FIXED_SECONDS + 10 * step_s * MARGIN)


def test_the_pipeline_makes_one_call_of_batch_two_a_step_at_guidance_1_and_3():
    """The family's `cfg_batched` and `cfg_always` against LTX2Pipeline itself, eagerly."""
    model = tiny_model(model_id="tiny-ltx2")
    batches = []
    hook = model.pipe.transformer.register_forward_pre_hook(
        lambda _, args, kwargs: batches.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)
    try:
        for guidance in (1.0, 3.0):
            batches.clear()
            with torch.inference_mode():
                model(PROMPT, model.presets[-1], steps=2, guidance=guidance, output_type="latent")
            calls, batch = model.step_calls(guidance)
            assert batches == [batch] * (calls * 2) == [2, 2], guidance
    finally:
        hook.remove()


def test_step_caches_are_refused_with_the_reason():
    from aot.step_cache import choose
    from settings import parse_step_cache

    model = tiny_model(model_id="tiny-ltx2")
    for method, why in [("fbc", "First Block Cache does not know one of its block classes"),
                        ("taylorseer", "audio_proj_out would read the zeros its skipped blocks return")]:
        decision = choose(parse_step_cache(method), model)
        assert decision.value == "off" and decision.fell_back and why in decision.reason, method


def test_a_sound_track_is_encoded_beside_the_frames(tmp_path: Path):
    rate, samples = 8000, 2640
    wave = 0.5 * np.sin(2 * np.pi * 440 * np.arange(samples) / rate)
    path = encode(Clip.of(np.random.rand(9, 64, 96, 3), (np.stack([wave, -wave]), rate)), 24, tmp_path / "a.mp4")
    frames, fps, size, sound = _decoded(str(path))
    assert (len(frames), fps, size) == (9, 24, (96, 64))
    assert sound == ("aac", rate, 2, samples)


# --- the app serving tiny-ltx2 through gradio_client -------------------------------------------------------------
@pytest.fixture(scope="module")
def ltx2_app(ltx2):
    """(app module, gradio client): app.py with MODEL_ID=tiny-ltx2, loading `ltx2`'s programs from the cache."""
    yield from served_app("ltx2", {"MODEL_ID": "tiny-ltx2", "AOT_CACHE_DIR": ltx2.settings.cache_dir})


REQUEST = dict(prompt=PROMPT, resolution="96x64", seed=7, randomize_seed=False, steps=2)


def _decoded(result) -> tuple[list[np.ndarray], int, tuple[int, int], tuple | None]:
    """A returned video's frames, frame rate and (width, height), and its sound track's (codec, sample rate,
    channels, samples) or None, decoded with PyAV."""
    import av

    path = result["video"] if isinstance(result, dict) else result
    assert path.endswith(".mp4"), path
    with av.open(path) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        audio = container.streams.audio[0] if container.streams.audio else None
        # the stream's duration is the track's own length: AAC decodes whole frames of 1024 samples past it
        sound = audio and (audio.codec_context.name, audio.sample_rate, audio.channels,
                           round(audio.duration * audio.time_base * audio.sample_rate))
        return frames, int(stream.average_rate), (stream.width, stream.height), sound


def test_app_serves_a_video_with_its_sound_refuses_bad_input_and_serves_the_next(ltx2_app):
    from gradio_client.exceptions import AppError

    app, client = ltx2_app
    status = client.predict(api_name="/status")
    assert status["compile_source"] == "loaded from cache"
    assert status["output"]["format"] == "mp4 (H.264, yuv420p, AAC at 8000 Hz)"
    assert status["output"]["frames"] == {"96x64": [9], "64x96": [9], "64x64": [9]} and status["output"]["fps"] == 24
    video, seed, details = client.predict(**REQUEST, frames=9, api_name="/generate")
    frames, fps, size, sound = _decoded(video)
    assert (len(frames), fps, size, seed) == (9, 24, (96, 64), 7)
    # the pipeline's track: 9 latent audio frames (9 frames / 24 fps x 25 a second), decoded to 4 x 9 - 3 mel frames
    # (the causal decoder drops three), each 80 samples at the tiny vocoder's 8 kHz
    assert sound == ("aac", 8000, 2, (4 * 9 - 3) * 80)
    for bad, message in [(dict(frames=5), r"Frames: 5 frames: the count must be 8k\+1 \(1, 9, 17, ...\)"),
                         (dict(frames=17), "96x64 is served at 9 frames"),
                         (dict(fps=30), "sound track is made for 24 fps; give 24 or leave fps out. Got 30")]:
        with pytest.raises(AppError, match=message):
            client.predict(**REQUEST, **bad, api_name="/generate")
    again, _, _ = client.predict(**REQUEST, api_name="/generate")  # frames left out: the size's 9
    assert all(np.array_equal(a, b) for a, b in zip(_decoded(again)[0], frames, strict=True))
    assert _decoded(again)[3] == sound


# --- LTX-2 image to video (MODEL_ID=tiny-ltx2-i2v): the first latent frame held at the image, a timestep per token --
def first_frame():
    """An input image of another aspect ratio than any preset's: the pipeline stretches it to the call's size."""
    from PIL import Image

    return Image.new("RGB", (96, 160), (200, 30, 30))


class LTX2I2VCompiled(LTX2Compiled):
    """tiny-ltx2-i2v after `optimize_pipeline_` at one preset, a whole run from an image recorded eagerly before."""

    def __init__(self):
        super().__init__(model_id="tiny-ltx2-i2v", presets="landscape=96x64x9")

    def check_model(self) -> None:
        assert self.model.family is LTX2_I2V

    def latents(self) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(5)
        with torch.inference_mode():
            result = self.model(PROMPT, self.model.presets[0], steps=2, generator=generator, output_type="latent",
                                images=(first_frame(),))
        return result.frames, result.audio


@pytest.fixture(scope="module")
def ltx2_i2v() -> LTX2I2VCompiled:
    return LTX2I2VCompiled()


def test_i2v_gives_each_token_its_timestep_and_compiled_matches_eager(ltx2_i2v):
    preset = ltx2_i2v.model.presets[0]
    kwargs = ltx2_i2v.inputs[preset.name][1]
    assert kwargs["timestep"].shape == (2, LTX2_I2V.tokens(preset))  # CFG's batch of two, one per video token
    assert ltx2_i2v.model.max_image_tokens == LTX2_I2V.tokens(preset)  # the image adds none
    for stream, out, eager in zip(("video", "audio"), ltx2_i2v.run_streams()[preset.name],
                                  ltx2_i2v.eager_streams[preset.name]):
        assert rel_err(out, eager) <= TOLERANCE, stream
    for stream, out, eager in zip(("video", "audio"), ltx2_i2v.latents(), ltx2_i2v.eager_latents):
        assert rel_err(out, eager) <= TOLERANCE, stream


@pytest.fixture(scope="module")
def ltx2_i2v_app(ltx2_i2v):
    yield from served_app("ltx2-i2v", {"MODEL_ID": "tiny-ltx2-i2v", "PRESETS": "landscape=96x64x9",
                                       "AOT_CACHE_DIR": ltx2_i2v.settings.cache_dir})


def test_i2v_app_makes_a_video_from_an_image_and_refuses_a_request_without_one(ltx2_i2v_app, tmp_path):
    import av
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError
    from PIL import Image

    _, client = ltx2_i2v_app
    request = dict(prompt=PROMPT, resolution="96x64", seed=7, randomize_seed=False, steps=2)
    path = tmp_path / "first.png"
    Image.new("RGB", (96, 160), (200, 30, 30)).save(path)
    video, _, details = client.predict(**request, image=handle_file(str(path)), api_name="/generate")
    with av.open(video["video"] if isinstance(video, dict) else video) as container:
        stream = container.streams.video[0]
        assert (stream.frames or len(list(container.decode(stream))), stream.width, stream.height) == (9, 96, 64)
    assert "input 96x160 resized to 96x64" in details
    with pytest.raises(AppError, match="This ltx2-i2v model makes its video from an image: give at least 1"):
        client.predict(**request, api_name="/generate")


def test_app_serves_a_negative_prompt_at_guidance_1_where_the_sound_track_still_runs_cfg(ltx2_app):
    app, client = ltx2_app
    assert app.TAKES_NEGATIVE_PROMPT
    videos = [client.predict(**REQUEST, guidance=1.0, negative_prompt=negative, api_name="/generate")[0]
              for negative in ("", "silence, a blurry picture")]
    (plain, _, _, plain_sound), (with_it, _, _, sound) = map(_decoded, videos)
    assert plain_sound == sound  # the same track's shape, and the negative prompt reached the pipeline:
    assert not all(np.array_equal(a, b) for a, b in zip(plain, with_it, strict=True))


def test_a_fused_lora_changes_both_streams_as_diffusers_loading_it_does(tmp_path):
    """LORAS on LTX-2: nothing refuses it; the fused weights give diffusers' own outputs with the LoRA loaded."""
    import optimization
    from aot.programs import capture_inputs
    from conftest import settings_for
    from test_lora import make_lora

    path = make_lora(tmp_path, "ltx2", 7, family="ltx2")
    reference = tiny_model(model_id="tiny-ltx2")
    args, kwargs = capture_inputs(reference, reference.pipe.transformer, reference.presets[0])
    with torch.inference_mode():
        plain = reference.pipe.transformer(*args, **kwargs)[:2]
        reference.pipe.load_lora_weights(str(tmp_path), weight_name=path.name)
        expected = reference.pipe.transformer(*args, **kwargs)[:2]
    env = dict(model_id="tiny-ltx2", loras=str(path), compile="none")
    model = tiny_model(**env)
    report = optimization.optimize_pipeline_(model, settings_for(**env))
    assert report.fallbacks == [] and report.loras, report.fallbacks
    with torch.inference_mode():
        fused = model.pipe.transformer(*args, **kwargs)[:2]
    for stream, out, want, before in zip(("video", "audio"), fused, expected, plain):
        assert rel_err(out, want) <= TOLERANCE and rel_err(out, before) > 1e-3, stream


# --- RECIPE=distilled: 8 steps at half the size, the x2 latent upsampler, 3 steps at the preset (issue 30) ----------
STAGES = ("96x64x9, 64x96x9", "192x128x9, 128x192x9")  # each program's sizes: the first stages', the outputs'


class LTX2DistilledCompiled(LTX2Compiled):
    """tiny-ltx2 under RECIPE=distilled after `optimize_pipeline_`, a request's latents recorded eagerly before."""

    def __init__(self, **overrides):
        super().__init__(recipe="distilled", **overrides)

    def check_model(self) -> None:
        assert self.model.recipe is LTX2.distilled and self.model.upsampler is not None

    def record_eager(self) -> None:
        self.eager_latents = self.latents()

    def latents(self, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole request at the first preset (192x128x9): stage 2's video and sound latents."""
        generator = torch.Generator().manual_seed(5)
        with torch.inference_mode():
            result = self.model(PROMPT, self.model.presets[0], self.model.defaults.steps, generator=generator,
                                output_type="latent", **kwargs)
        return result.frames, result.audio


@pytest.fixture(scope="module")
def ltx2_distilled() -> LTX2DistilledCompiled:
    return LTX2DistilledCompiled()


@pytest.fixture(scope="module")
def distilled() -> Model:
    """tiny-ltx2 under RECIPE=distilled, eager, not optimized."""
    return tiny_model(model_id="tiny-ltx2", recipe="distilled")


def _served_by(monkeypatch) -> set[str]:
    """From now on, the sizes of each program a block call runs (its label), added to the set returned."""
    from aot.programs import matches, named_inputs, signature

    served, real = set(), ShapeDispatch.program_for

    def program_for(self, args, kwargs):
        actual = signature(named_inputs(self.module, args, kwargs))
        served.update(label for expected, _, label in self.programs if matches(expected, actual))
        return real(self, args, kwargs)

    monkeypatch.setattr(ShapeDispatch, "program_for", program_for)
    return served


def test_distilled_compiles_both_stages_sizes_runs_both_and_matches_eager(ltx2_distilled, monkeypatch):
    report = ltx2_distilled.report
    assert report.compile == "aoti" and report.fallbacks == [], report.fallbacks
    # each program serves a stage of both outputs: 2 latent frames of 6 tokens at stage 1, of 24 (four times) at stage 2
    assert report.programs == [{"image_tokens": 12, "resolutions": STAGES[0].split(", ")},
                               {"image_tokens": 48, "resolutions": STAGES[1].split(", ")}]
    assert report.recipe == "distilled" and report.recipe_reason.startswith(
        "8 steps at 96x64, x2 upsampled (eager), 3 steps at 192x128; ")
    served = _served_by(monkeypatch)
    for out, eager in zip(ltx2_distilled.latents(), ltx2_distilled.eager_latents, strict=True):
        assert torch.isfinite(out).all() and rel_err(out, eager) <= TOLERANCE
    assert served == set(STAGES)  # the installed programs served both stages' calls
    # the video: 192x128, twice stage 1's 96x64 on each side, at the 9 frames asked for, with its sound track
    generator = torch.Generator().manual_seed(5)
    with torch.inference_mode():
        result = ltx2_distilled.model(PROMPT, ltx2_distilled.model.presets[0], 11, generator=generator)
    assert result.frames.shape == (1, 9, 128, 192, 3) and result.audio.shape[:2] == (1, 2)


def test_distilled_programs_are_keyed_apart_from_the_standard_recipes(ltx2_distilled):
    """The same size's standard program takes CFG's batch of two: a cache shared by both recipes keeps both."""
    import dataclasses

    import optimization
    from aot.cache import cache_key, key_digest

    report, model = ltx2_distilled.report, ltx2_distilled.model
    keys = [key_digest(cache_key(model.pipe, "ltx2", "tiny-ltx2", None, dataclasses.replace(report, recipe=recipe),
                                 report.hardware, "blocks", 12, False, report.text, optimization.INDUCTOR_CONFIGS))
            for recipe in ("distilled", "standard")]
    assert keys[0] in report.cache_keys and keys[1] not in report.cache_keys


def test_a_distilled_request_is_one_bar_of_11_steps_one_call_of_batch_one_each_and_one_video_per_seed(
        distilled, monkeypatch):
    bars, steps, calls = [], [], []
    real = distilled.pipe.progress_bar

    def progress_bar(*args, **kwargs):
        bar = real(*args, **kwargs)
        bars.append((bar.total, bar.disable))
        return bar

    monkeypatch.setattr(distilled.pipe, "progress_bar", progress_bar)
    hook = distilled.pipe.transformer.register_forward_pre_hook(
        lambda _, args, kwargs: calls.append(tuple(kwargs["hidden_states"].shape[:2])), with_kwargs=True)
    try:
        def request(seed: int, **kwargs) -> np.ndarray:
            with torch.inference_mode():
                return distilled(PROMPT, distilled.presets[0], 11, generator=torch.Generator().manual_seed(seed),
                                 **kwargs).frames
        video = request(7, callback_on_step_end=lambda pipe, i, t, tensors: steps.append(i) or {})
    finally:
        hook.remove()
    assert bars == [(11, False), (8, True), (3, True)]  # one bar shown, the stages' own off
    assert steps == list(range(11))  # one numbering, as one pipeline call's
    assert calls == [(1, 12)] * 8 + [(1, 48)] * 3  # no CFG: batch one, at stage 1's tokens, then stage 2's
    assert video.shape == (1, 9, 128, 192, 3)
    assert np.array_equal(request(7), video) and not np.array_equal(request(8), video)
    with pytest.raises(ValueError, match="RECIPE=distilled takes 11 steps, no guidance"):
        distilled(PROMPT, distilled.presets[0], 8)
    with pytest.raises(ValueError, match="This ltx2 model takes no input image; got 1"):  # text to video only
        distilled(PROMPT, distilled.presets[0], 11, images=(first_frame(),))


def test_distilled_durations_count_each_stage_at_its_tokens_without_cfg(distilled):
    first, second = (size for size, _ in distilled.stages(distilled.presets[0]))
    assert distilled.stages(distilled.presets[0]) == [(first, 8), (second, 3)]
    assert (first.size, second.size, distilled.batch_one_calls(distilled.defaults.guidance)) == ("96x64", "192x128", 1)
    timed = Durations({first.name: Timing(0.5, 9.0), second.name: Timing(3.0, 10.0)}, True, LTX2.step_cost, 1.0, 0.0,
                      tokens=LTX2.tokens, stages=distilled.stages, fixed_steps=True)
    assert timed.task_seconds(second, 11, 1, False, False) == pytest.approx((10.0 + 8 * 0.5 + 3 * 3.0) * MARGIN)
    # before anything is timed: an H100's call at each stage's tokens, attention quadratic
    from aot.zerogpu import H100_CALL_SECONDS, step_work

    estimated = Durations({}, True, LTX2.step_cost, 1.0, 0.0, tokens=LTX2.tokens, stages=distilled.stages)
    per_call = H100_CALL_SECONDS[True] * LTX2.step_cost
    assert estimated.task_seconds(second, 11, 1, False, False) == pytest.approx(
        FIXED_SECONDS + per_call * (8 * step_work(12) + 3 * step_work(48)))
    # the steps are fixed: ZeroGPU's limit takes all 11 or none, and says so
    slow = Durations({first.name: Timing(20.0, 1.0), second.name: Timing(40.0, 1.0)}, True, 1.0, 1.0, 0.0,
                     limited=True, tokens=LTX2.tokens, stages=distilled.stages, fixed_steps=True)
    assert slow.most_steps(second, 11, 1) == 0
    with pytest.raises(ValueError, match=r"11 steps at 192x128x9 need about \d+ s of GPU, .*, which are fixed; put a "
                                         "smaller size"):
        slow.default_steps(second, 11, 1)


def test_the_memory_plan_counts_the_upsampler_and_stage_2s_tokens(distilled):
    from aot.memory import measure_footprint, resident_bytes

    (upsampler,) = distilled.extra_modules
    weights = sum(t.numel() * t.element_size() for t in [*upsampler.parameters(), *upsampler.buffers()])
    with_it = resident_bytes(distilled.pipe, distilled.extra_modules)
    assert weights and with_it - resident_bytes(distilled.pipe) == weights
    plain, planned = (measure_footprint(distilled.pipe, distilled.max_image_tokens, extra=extra)
                      for extra in ((), distilled.extra_modules))
    assert planned.other - plain.other == weights
    first, second = (size for size, _ in distilled.stages(distilled.presets[0]))
    assert planned.image_tokens == LTX2.tokens(second) == 4 * LTX2.tokens(first)


@pytest.mark.parametrize("env, message", [
    ({"UPSAMPLER_ID": "Lightricks/LTX-2"}, "UPSAMPLER_ID is set but RECIPE=standard runs no latent upsampler"),
    ({"RECIPE": "distilled", "UPSAMPLER_ID": "Lightricks/LTX-2"}, "MODEL_ID=tiny-ltx2 builds its own tiny upsampler"),
    ({"RECIPE": "distilled", "WORLD_SIZE": "2", "PARALLEL": "ulysses", "COMPILE": "none"},
     "RECIPE=distilled with 2 ranks"),
    ({"RECIPE": "turbo"}, "RECIPE='turbo' is not one of standard, distilled"),
])
def test_distilled_settings_that_conflict_stop_startup(env, message):
    from settings import Settings

    with pytest.raises(ValueError, match=message):
        Settings.from_env({"MODEL_ID": "tiny-ltx2", **env}, has_cuda=False)


@pytest.mark.parametrize("env, message", [
    (dict(model_id="tiny"), "RECIPE=distilled: the flux family has no distilled recipe .families with one: ltx2, "
                            "ltx2-i2v.; set RECIPE=standard"),
    (dict(model_id="tiny-ltx2", presets="a=96x64x9"), r"multiples of 64 \(RECIPE=distilled: a preset is the output, "
                                                      r"and stage 1 runs at 1/2 of each side, in multiples of 32\)"),
])
def test_distilled_is_refused_where_it_cannot_run(env, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(recipe="distilled", **env)


def test_the_upsampler_is_loaded_from_its_folder_and_a_missing_or_unfit_one_stops_startup(distilled, tmp_path):
    from diffusers.pipelines.ltx2.latent_upsampler import LTX2LatentUpsamplerModel

    from aot.model import load_model
    from conftest import settings_for

    (upsampler,) = distilled.extra_modules
    upsampler.save_pretrained(tmp_path / "fits" / "latent_upsampler")
    LTX2LatentUpsamplerModel(in_channels=16, mid_channels=32, num_blocks_per_stage=1).save_pretrained(
        tmp_path / "wider" / "latent_upsampler")
    model_dir = tmp_path / "distilled-model"  # the pipeline is given: only the upsampler is read from disk
    for folder in (model_dir, tmp_path / "empty"):  # neither with a latent_upsampler folder
        folder.mkdir()
    for upsampler_id, message in [
            (None, f"needs a latent upsampler in the `latent_upsampler` folder of MODEL_ID='{model_dir}'"),
            (tmp_path / "empty", f"folder of UPSAMPLER_ID='{tmp_path / 'empty'}', and none that fits could be loaded"),
            (tmp_path / "wider", "it takes 16 latent channels, the VAE makes 8")]:
        settings = settings_for(model_id=model_dir, recipe="distilled", **{"upsampler_id": upsampler_id or ""})
        with pytest.raises(SystemExit, match=message):
            load_model(settings, distilled.pipe)
    model = load_model(settings_for(model_id=model_dir, recipe="distilled", upsampler_id=tmp_path / "fits"),
                       distilled.pipe)
    (loaded,) = model.extra_modules
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), upsampler.state_dict().values(),
                                                 strict=True))
    assert model.upsampler.vae is distilled.pipe.vae  # over the pipeline's own VAE


# the app serving tiny-ltx2 under RECIPE=distilled, loading `ltx2_distilled`'s programs from the cache
@pytest.fixture(scope="module")
def ltx2_distilled_app(ltx2_distilled):
    yield from served_app("ltx2-distilled", {"MODEL_ID": "tiny-ltx2", "RECIPE": "distilled",
                                             "AOT_CACHE_DIR": ltx2_distilled.settings.cache_dir})


def test_app_serves_the_distilled_recipe_at_its_fixed_steps_and_asks_for_both_stages(ltx2_distilled_app):
    from gradio_client.exceptions import AppError

    app, client = ltx2_distilled_app
    status = client.predict(api_name="/status")
    assert status["compile_source"] == "loaded from cache" and status["fallbacks"] == []
    assert status["recipe"] == "distilled" and "8 steps at 64x96, x2 upsampled (eager), 3 steps at 128x192" in status[
        "recipe_reason"]
    assert status["resolutions"] == ["192x128", "128x192"]
    assert {p["image_tokens"] for p in status["programs"]} == {12, 48}
    assert status["defaults"]["steps"] == 11 and status["defaults"]["guidance_kind"] == "none"
    assert status["defaults"]["fixed_steps"].startswith("the distilled recipe runs 8 steps, then 3 after upsampling")
    request = dict(prompt=PROMPT, resolution="192x128", seed=7, randomize_seed=False)
    video, seed, details = client.predict(**request, api_name="/generate")
    frames, fps, size, sound = _decoded(video)
    assert (len(frames), fps, size, seed) == (9, 24, (192, 128), 7) and sound[:3] == ("aac", 8000, 2)
    assert "11 steps (8 at 96x64, 3 at 192x128)" in details
    # the seed's frames, as the request made them: two MP4s of equal frames can differ here (x264's decisions on these
    # noisy tiny frames changed between encodes in the server's process, seen while writing this test)
    made = [app._image(PROMPT, 192, 128, 7, 11, 1.0, frames=9).frames for _ in range(2)]
    assert made[0].shape == (9, 128, 192, 3) and np.array_equal(*made)
    assert client.predict(**request, steps=11, api_name="/generate")[1] == 7
    for bad, message in [(dict(steps=8), "Steps: the distilled recipe runs 8 steps, then 3 after upsampling, on fixed "
                                         "sigma schedules; give 11 or leave steps out. Got 8."),
                         (dict(guidance=3.0), "guidance-distilled and takes no guidance; use 1.0"),
                         (dict(negative_prompt="blurry"), "takes no negative prompt")]:
        with pytest.raises(AppError, match=message):
            client.predict(**request, **bad, api_name="/generate")
    # a request asks ZeroGPU for 8 calls at stage 1's size and 3 at stage 2's, each as timed at startup
    timings, preset = status["timings"], app.PRESETS["192x128x9"]
    call = {name: timings[name]["call_s"] * MARGIN for name in ("96x64x9", "192x128x9")}
    assert app.DURATIONS.task_seconds(preset, 11, 1, False, False) == pytest.approx(
        max(FIXED_SECONDS, timings["192x128x9"]["fixed_s"] * MARGIN) + 8 * call["96x64x9"] + 3 * call["192x128x9"])


# --- RECIPE=distilled for image to video (MODEL_ID=tiny-ltx2-i2v): the image in stage 1, its frame held in stage 2 --
I2V_OUTPUT = "landscape=192x128x9"  # one output: its two stages' programs, at 12 and 48 tokens


@pytest.fixture(scope="module")
def distilled_i2v() -> Model:
    """tiny-ltx2-i2v under RECIPE=distilled at one output, eager, not optimized."""
    return tiny_model(model_id="tiny-ltx2-i2v", recipe="distilled", presets=I2V_OUTPUT)


def test_distilled_i2v_holds_the_image_in_stage_1_and_its_upsampled_frame_in_stage_2(distilled_i2v, monkeypatch):
    """The chain against LTX2ImageToVideoPipeline itself: stage 1 encodes the image as the first latent frame; stage 2,
    given the upsampled latents, re-noises every frame but that one and never steps it; the sound is carried on."""
    import inspect

    model, pipe = distilled_i2v, distilled_i2v.pipe
    sigma_2 = model.recipe.schedules()[1][0]
    calls, upsampled, video_in, audio_in = [], [], [], []

    def upsample(latents):
        upsampled.append((latents.clone(), real_upsample(latents)))
        return upsampled[-1][1]

    def spy(real, into):
        """`real` as it was, each call's `latents` and `noise_scale` added to `into`."""
        signature = inspect.signature(real)

        def prepare(*args, **kwargs):
            given = signature.bind(*args, **kwargs).arguments
            into.append((given["latents"], given["noise_scale"]))
            return real(*args, **kwargs)
        return prepare

    real_upsample = model.upsample
    monkeypatch.setattr(model, "upsample", upsample)
    monkeypatch.setattr(pipe, "prepare_latents", spy(pipe.prepare_latents, video_in))
    monkeypatch.setattr(pipe, "prepare_audio_latents", spy(pipe.prepare_audio_latents, audio_in))
    hook = pipe.transformer.register_forward_pre_hook(
        lambda _, args, kwargs: calls.append(kwargs["timestep"].clone()), with_kwargs=True)

    def request(seed: int, **kwargs):
        with torch.inference_mode():
            return model(PROMPT, model.presets[0], 11, generator=torch.Generator().manual_seed(seed),
                         images=(first_frame(),), **kwargs)
    try:
        latents = request(7, output_type="latent").frames
    finally:
        hook.remove()
    # batch one, a timestep per video token: the first latent frame's (6 tokens at 96x64, 24 at 192x128) at 0
    assert [tuple(t.shape) for t in calls] == [(1, 12)] * 8 + [(1, 48)] * 3
    for t in calls:
        frame = t.shape[1] // 2
        assert (t[:, :frame] == 0).all() and (t[:, frame:] > 0).all()
    # stage 1 drew from noise and the image; stage 2 took the upsampled latents and stage 1's sound, re-noised to its
    # schedule's first sigma
    (stage_1, upsampled_latents), = upsampled
    assert [(given is None, scale) for given, scale in video_in] == [(True, 0.0), (False, sigma_2)]
    assert video_in[1][0] is upsampled_latents and (stage_1.shape[-2:], upsampled_latents.shape[-2:]) == ((2, 3),
                                                                                                           (4, 6))
    assert audio_in[0][0] is None and audio_in[1][0].ndim == 4 and audio_in[1][1] == sigma_2
    # stage 2 kept the upsampled first frame as it was and refined the rest
    assert torch.allclose(latents[:, :, 0], upsampled_latents[:, :, 0], atol=1e-6)
    assert rel_err(latents[:, :, 1:], upsampled_latents[:, :, 1:]) > 0.1
    # another seed: stage 1's first frame is still the image's, the rest is another video
    upsampled.clear()
    request(8, output_type="latent")
    (other, _), = upsampled
    assert torch.equal(other[:, :, 0], stage_1[:, :, 0]) and not torch.equal(other[:, :, 1:], stage_1[:, :, 1:])
    video = request(7).frames
    assert video.shape == (1, 9, 128, 192, 3) and np.array_equal(request(7).frames, video)
    for images, message in [((), r"This ltx2-i2v model makes its video from an image: give at least 1 input image "
                                 r"\(up to 1\); got 0"),
                            ((first_frame(),) * 2, "This ltx2-i2v model takes at most 1 input image; got 2")]:
        with pytest.raises(ValueError, match=message):
            model(PROMPT, model.presets[0], 11, images=images)


def test_distilled_i2v_durations_and_memory_plan_count_both_stages_and_no_input_tokens(distilled_i2v):
    from aot.memory import measure_footprint
    from aot.zerogpu import H100_CALL_SECONDS, step_work

    model = distilled_i2v
    (first, steps_1), (second, steps_2) = model.stages(model.presets[0])
    assert (first.size, steps_1, second.size, steps_2) == ("96x64", 8, "192x128", 3)
    # a first frame adds no tokens to either stage's calls: the durations count the stages' own
    given = model.input_tokens([first_frame().size])
    assert given == model.input_tokens(image.size for image in model.needed_images()) == 0
    estimated = Durations({}, True, LTX2_I2V.step_cost, 1.0, 0.0, tokens=LTX2_I2V.tokens, stages=model.stages,
                          fixed_steps=True)
    assert estimated.task_seconds(second, 11, 1, False, False, input_tokens=given) == pytest.approx(
        FIXED_SECONDS + H100_CALL_SECONDS[True] * LTX2_I2V.step_cost * (8 * step_work(12) + 3 * step_work(48)))
    # the plan: stage 2's tokens, the upsampler beside the pipeline
    assert model.max_image_tokens == LTX2_I2V.tokens(second) == 4 * LTX2_I2V.tokens(first) == 48
    (upsampler,) = model.extra_modules
    plain, planned = (measure_footprint(model.pipe, model.max_image_tokens, extra=extra)
                      for extra in ((), model.extra_modules))
    assert planned.image_tokens == 48 and planned.other - plain.other == sum(
        t.numel() * t.element_size() for t in [*upsampler.parameters(), *upsampler.buffers()])


class LTX2DistilledI2VCompiled(LTX2DistilledCompiled):
    """tiny-ltx2-i2v under RECIPE=distilled at one output after `optimize_pipeline_`, a request from an image recorded
    eagerly before."""

    def __init__(self):
        super().__init__(model_id="tiny-ltx2-i2v", presets=I2V_OUTPUT)

    def check_model(self) -> None:
        assert self.model.family is LTX2_I2V and self.model.recipe is LTX2_I2V.distilled

    def latents(self, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        return super().latents(images=(first_frame(),), **kwargs)


@pytest.fixture(scope="module")
def ltx2_distilled_i2v() -> LTX2DistilledI2VCompiled:
    return LTX2DistilledI2VCompiled()


def test_distilled_i2v_compiles_both_stages_with_a_timestep_per_token_and_matches_eager(ltx2_distilled_i2v,
                                                                                        monkeypatch):
    report, model = ltx2_distilled_i2v.report, ltx2_distilled_i2v.model
    assert report.compile == "aoti" and report.fallbacks == [], report.fallbacks
    # captured with the image, at batch one: a timestep per token, as the chain's stage 2 calls it too
    assert ltx2_distilled_i2v.inputs["192x128x9"][1]["timestep"].shape == (1, 48)
    assert report.programs == [{"image_tokens": 12, "resolutions": ["96x64x9"]},
                               {"image_tokens": 48, "resolutions": ["192x128x9"]}]
    assert set(report.timings) == {"96x64x9", "192x128x9"}  # start-up timed both, the upsampler with stage 1's image
    served = _served_by(monkeypatch)
    for stream, out, eager in zip(("video", "audio"), ltx2_distilled_i2v.latents(), ltx2_distilled_i2v.eager_latents,
                                  strict=True):
        assert torch.isfinite(out).all() and rel_err(out, eager) <= TOLERANCE, stream
    assert served == {"96x64x9", "192x128x9"}  # the installed programs served both stages' calls
    with pytest.raises(ValueError, match="makes its video from an image"):
        model(PROMPT, model.presets[0], 11)


@pytest.fixture(scope="module")
def ltx2_distilled_i2v_app(ltx2_distilled_i2v):
    yield from served_app("ltx2-distilled-i2v", {"MODEL_ID": "tiny-ltx2-i2v", "RECIPE": "distilled",
                                                 "PRESETS": I2V_OUTPUT,
                                                 "AOT_CACHE_DIR": ltx2_distilled_i2v.settings.cache_dir})


def test_app_serves_distilled_i2v_from_an_image_at_its_fixed_steps_and_refuses_a_request_without_one(
        ltx2_distilled_i2v_app, tmp_path):
    import gradio as gr
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    app, client = ltx2_distilled_i2v_app
    status = client.predict(api_name="/status")
    assert status["compile_source"] == "loaded from cache" and status["fallbacks"] == []
    assert status["recipe"] == "distilled" and status["defaults"]["steps"] == 11
    assert status["inputs"]["image_required"] and status["inputs"]["resized_to"].startswith(
        "stage 1's size, 1/2 of each side of the requested resolution")
    # the page: the image input, and the Steps slider at 11, locked
    page = list(app.demo.blocks.values())
    assert [b.label for b in page if isinstance(b, gr.Image) and b.elem_id == "input-image"] == ["Input image"]
    (steps,) = [b for b in page if isinstance(b, gr.Slider) and b.label == "Steps"]
    assert (steps.value, steps.interactive) == (11, False)
    path = tmp_path / "first.png"
    first_frame().save(path)
    request = dict(prompt=PROMPT, resolution="192x128", seed=7, randomize_seed=False)
    video, seed, details = client.predict(**request, image=handle_file(str(path)), api_name="/generate")
    frames, fps, size, sound = _decoded(video)
    assert (len(frames), fps, size, seed) == (9, 24, (192, 128), 7) and sound[:3] == ("aac", 8000, 2)
    assert "11 steps (8 at 96x64, 3 at 192x128)" in details and "input 96x160 resized to 96x64" in details
    with pytest.raises(AppError, match="This ltx2-i2v model makes its video from an image: give at least 1"):
        client.predict(**request, api_name="/generate")
    again, seed, _ = client.predict(**request, image=handle_file(str(path)), api_name="/generate")
    assert seed == 7 and _decoded(again)[2] == (192, 128)  # still serving
    # the seed's frames, as the request made them (the distilled app test says why not the MP4s)
    made = [app._image(PROMPT, 192, 128, 7, 11, 1.0, images=(first_frame(),), frames=9).frames for _ in range(2)]
    assert made[0].shape == (9, 128, 192, 3) and np.array_equal(*made)
    # a request asks ZeroGPU for 8 calls at stage 1's size and 3 at stage 2's; its image adds none
    timings, preset = status["timings"], app.PRESETS["192x128x9"]
    call = {name: timings[name]["call_s"] * MARGIN for name in ("96x64x9", "192x128x9")}
    assert app.DURATIONS.task_seconds(preset, 11, 1, False, False, input_tokens=app.MODEL.input_tokens(
        [first_frame().size])) == pytest.approx(
        max(FIXED_SECONDS, timings["192x128x9"]["fixed_s"] * MARGIN) + 8 * call["96x64x9"] + 3 * call["192x128x9"])
