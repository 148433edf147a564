"""Video families, on Wan's tiny random-weight pipeline (MODEL_ID=tiny-wan: two experts, as Wan 2.2 A14B):
AoT-compiled on CPU at block scope (the default), compiled matches eager at every preset for both experts, each
expert's programs read that expert's own weights (one copy each), and the compile work is shared (one program per
token count, installed on both experts).

One compile per program for the module: `wan` is compiled once and every test reads it.
"""
import dataclasses
import re

import numpy as np
import pytest
import torch

from aot.families import WAN, WAN_5B, WAN_I2V
from aot.memory import measure_footprint
from aot.model import experts
from aot.programs import ShapeDispatch
from conftest import Compiled, rel_err, served_app, tiny_model

TOLERANCE = 1e-4  # fp32, compiled vs eager
PROMPT = "a red cube spinning"


class WanCompiled(Compiled):
    """tiny-wan after `optimize_pipeline_`, with both experts' eager outputs at every preset (on the first expert's
    captured inputs: the experts share an architecture) and a whole run through both experts, recorded before."""

    def __init__(self, **overrides):
        super().__init__(**{"model_id": "tiny-wan", **overrides})

    def check_model(self) -> None:
        assert self.model.family.name == "wan" and len(experts(self.pipe)) == 2

    def record_eager(self) -> None:
        self.eager_experts = self.run_experts()
        self.eager_latents = self.latents()

    def run_experts(self) -> dict[tuple[str, str], torch.Tensor]:
        with torch.inference_mode():
            return {(name, preset): expert(*args, **kwargs)[0].clone()
                    for name, expert in zip(("transformer", "transformer_2"), experts(self.pipe))
                    for preset, (args, kwargs) in self.inputs.items()}

    def latents(self) -> torch.Tensor:
        """Two steps at the first preset: the first on the high-noise expert, the second on the low-noise one."""
        generator = torch.Generator().manual_seed(5)
        with torch.inference_mode():
            return self.model.outputs(self.model(PROMPT, self.model.presets[0], steps=2, generator=generator,
                                                 output_type="latent"))


@pytest.fixture(scope="module")
def wan() -> WanCompiled:
    return WanCompiled()


def _dispatchers(module: torch.nn.Module) -> dict[torch.nn.Module, ShapeDispatch]:
    return {m: m.__dict__["forward"] for m in module.modules() if isinstance(m.__dict__.get("forward"), ShapeDispatch)}


def test_compiled_matches_eager_at_every_preset_on_both_experts(wan):
    assert wan.report.compile == "aoti" and wan.report.compile_scope == "blocks", wan.report.fallbacks
    compiled = wan.run_experts()
    assert {preset for _, preset in compiled} == {p.name for p in wan.model.presets}
    for key, out in compiled.items():
        assert torch.isfinite(out).all(), key
        assert rel_err(out, wan.eager_experts[key]) <= TOLERANCE, key
    # the experts differ, so matching each one's eager output checks that each runs its own weights
    for preset in wan.inputs:
        assert rel_err(compiled["transformer", preset], compiled["transformer_2", preset]) > 1e-2


def test_a_run_through_both_experts_matches_eager(wan):
    calls = {name: 0 for name in ("transformer", "transformer_2")}
    hooks = [expert.register_forward_pre_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
             for name, expert in zip(calls, experts(wan.pipe))]
    try:
        latents = wan.latents()
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == {"transformer": 2, "transformer_2": 2}  # one step each, two calls a step (true CFG)
    assert rel_err(latents, wan.eager_latents) <= TOLERANCE


def test_the_experts_share_the_compile_work_and_each_reads_its_own_weights(wan):
    # 64x32x5 and 32x64x5 are 16 tokens, 48x48x5 is 18: two programs, compiled once for both experts
    assert wan.report.programs == [{"image_tokens": 16, "resolutions": ["64x32x5", "32x64x5"]},
                                   {"image_tokens": 18, "resolutions": ["48x48x5"]}]
    assert wan.report.cuda_graphs == "off"
    for expert in experts(wan.pipe):
        dispatchers = _dispatchers(expert)
        assert sorted(map(id, dispatchers)) == sorted(map(id, expert.blocks))
        for block, dispatch in dispatchers.items():
            own = {t.untyped_storage().data_ptr() for t in block.state_dict().values()}
            for _, program, _ in dispatch.programs:
                assert {t.untyped_storage().data_ptr() for t in program.weights.values()} == own
    # no weight is stored twice: the experts' storages are disjoint, and the programs add none
    first, second = ({t.untyped_storage().data_ptr() for t in e.state_dict().values()} for e in experts(wan.pipe))
    assert not first & second
    packages = {program.model.archive_file for e in experts(wan.pipe) for d in _dispatchers(e).values()
                for _, program, _ in d.programs}
    assert len(packages) == 2  # one package per program, installed on both experts' blocks


def test_video_presets_carry_frames_the_vae_makes():
    from settings import check_frames, parse_presets

    presets = parse_presets("landscape=832x480x81,short=832x480x33", 16)
    assert [(p.name, p.size, p.frames) for p in presets] == [("832x480x81", "832x480", 81),
                                                             ("832x480x33", "832x480", 33)]
    check_frames(presets, WAN.video, "wan")
    for text, message in [("a=832x480x80", "must be 4k\\+1 .* at most 81"), ("a=832x480x85", "at most 81"),
                          ("a=832x480", "wan makes videos; give WIDTHxHEIGHTxFRAMES, e.g. 832x480x81")]:
        with pytest.raises(ValueError, match=message):
            check_frames(parse_presets(text, 16), WAN.video, "wan")
    with pytest.raises(ValueError, match="flux makes images; give WIDTHxHEIGHT"):
        check_frames(parse_presets("a=64x64x5", 16), None, "flux")
    with pytest.raises(ValueError, match="LABEL=WIDTHxHEIGHTxFRAMES"):
        parse_presets("a=64x64x5x2", 16)
    assert WAN.tokens(presets[0]) == 21 * 52 * 30  # 81 frames are 21 latent frames of 52x30 tokens


def test_the_memory_plan_counts_both_experts():
    model = tiny_model(model_id="tiny-wan")
    first, second = experts(model.pipe)
    footprint = measure_footprint(model.pipe, model.max_image_tokens)
    assert footprint.transformer["none"] == sum(
        t.numel() * t.element_size() for e in (first, second) for t in [*e.parameters(), *e.buffers()])
    assert len(footprint.blocks["fp8"]) == len(first.blocks) + len(second.blocks) == 4
    # neither expert is counted again among the always-resident rest
    vae = model.pipe.vae
    assert footprint.other == sum(t.numel() * t.element_size() for t in [*vae.parameters(), *vae.buffers()])


# --- the app serving tiny-wan through gradio_client --------------------------------------------------------------
@pytest.fixture(scope="module")
def wan_app(wan):
    """(app module, gradio client): app.py with MODEL_ID=tiny-wan, loading `wan`'s programs from the cache."""
    yield from served_app("wan", {"MODEL_ID": "tiny-wan", "AOT_CACHE_DIR": wan.settings.cache_dir})


REQUEST = dict(prompt="a red cube spinning", resolution="64x32", seed=7, randomize_seed=False, steps=2)


def _decoded(result) -> tuple[list[np.ndarray], int, tuple[int, int], str]:
    """A returned video's frames, its frame rate, (width, height) and pixel format, decoded with PyAV."""
    import av

    path = result["video"] if isinstance(result, dict) else result
    assert path.endswith(".mp4"), path
    with av.open(path) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        return (frames, int(stream.average_rate), (stream.width, stream.height),
                f"{stream.codec_context.name} {stream.codec_context.pix_fmt}")


def test_app_serves_a_video_refuses_bad_frames_and_serves_the_next(wan_app):
    from gradio_client.exceptions import AppError

    app, client = wan_app
    status = client.predict(api_name="/status")
    assert status["compile_source"] == "loaded from cache" and status["resolutions"] == ["64x32", "32x64", "48x48"]
    assert status["output"] == {"kind": "video", "format": "mp4 (H.264, yuv420p)", "max_frames": 81, "frame_step": 4,
                                "frames": {"64x32": [5], "32x64": [5], "48x48": [5]}, "fps": 16, "max_fps": 60}
    assert status["defaults"]["steps"] == 40 and status["defaults"]["guidance"] == 4.0
    video, seed, details = client.predict(**REQUEST, frames=5, fps=8, api_name="/generate")
    frames, fps, size, codec = _decoded(video)
    assert (len(frames), fps, size, codec) == (5, 8, (64, 32), "h264 yuv420p")
    assert seed == 7 and details.startswith("64x32, 5 frames at 8 fps, 2 steps")
    for bad, message in [(4, r"Frames: 4 frames: the count must be 4k\+1 \(1, 5, 9, ...\) and at most 81"),
                         (85, "Frames must be from 1 to 81; got 85"),
                         (9, r"64x32 is served at 5 frames, each a compiled program of its own; got 9. "
                             r"PRESETS=label=64x32x9 adds it")]:
        with pytest.raises(AppError, match=message):
            client.predict(**REQUEST, frames=bad, api_name="/generate")
    # served again: the same seed, the same frames (at the same fps: x264's rate control reads the frame rate)
    again, _, _ = client.predict(**REQUEST, fps=8, api_name="/generate")  # frames left out: the size's 5
    assert all(np.array_equal(a, b) for a, b in zip(_decoded(again)[0], frames, strict=True))
    other, _, _ = client.predict(**{**REQUEST, "seed": 8}, api_name="/generate")
    other_frames, fps, _, _ = _decoded(other)
    assert fps == 16 and len(other_frames) == 5 and not np.array_equal(other_frames[0], frames[0])


# --- a video request's GPU duration ------------------------------------------------------------------------------
A14B_ON_HALF_A_CARD = dict(timings={}, compiled=True, step_cost=WAN.step_cost, slowdown=4.0, weight_gib=30.0,
                           factor=1.5, limited=True, tokens=WAN.tokens)  # estimated: nothing measured yet


def test_the_estimate_grows_with_the_frames_and_faster_for_attention():
    from aot.zerogpu import Durations, step_work
    from settings import parse_presets

    plan = Durations(**A14B_ON_HALF_A_CARD)
    long, short = parse_presets("long=832x480x81,short=832x480x33", WAN.multiple)
    assert (WAN.tokens(long), WAN.tokens(short)) == (21 * 1560, 9 * 1560)  # latent frames x 52x30 tokens

    def call(preset):
        return plan.task_seconds(preset, 2, 1, False, False) - plan.task_seconds(preset, 1, 1, False, False)

    assert call(long) / call(short) == pytest.approx(step_work(21 * 1560) / step_work(9 * 1560))
    assert call(long) / call(short) > 21 / 9 * 1.2  # attention's quadratic part: more than the tokens' ratio


def test_a_default_past_zerogpus_maximum_gets_the_steps_that_fit():
    from aot.zerogpu import MAX_TASK_SECONDS, Durations
    from settings import parse_presets

    plan = Durations(**A14B_ON_HALF_A_CARD)
    long, short = parse_presets("long=832x480x81,short=832x480x33", WAN.multiple)
    # 40 steps of two calls (true CFG) at 32,760 tokens: about 10 s a call on half an RTX Pro 6000, estimated
    steps, why = plan.default_steps(long, 40, 2)
    assert steps == 12 and why == ("40 steps at 832x480x81 need about 850 s of GPU, past ZeroGPU's 300 s per "
                                   "request: the default is 12 steps, which fit")
    assert plan.granted(plan.worst_case(long, 12, 2)) <= MAX_TASK_SECONDS < plan.granted(plan.worst_case(long, 13, 2))
    assert plan.default_steps(short, 40, 2) == (40, None)  # 14,040 tokens fit
    assert plan.too_long([long, short], long, 40, 2).endswith("use at most 12 steps at 832x480x81 or 40 steps at "
                                                              "832x480x33")
    with pytest.raises(ValueError, match="1 steps at 832x480x81 need about .* even at 1 step; put a smaller size or "
                                         "fewer frames first in PRESETS"):
        dataclasses.replace(plan, slowdown=100.0).default_steps(long, 40, 2)
    assert dataclasses.replace(plan, limited=False).default_steps(long, 40, 2) == (40, None)  # off ZeroGPU


def test_app_lowers_a_default_past_zerogpus_maximum_and_refuses_a_request_past_it(wan, monkeypatch):
    """tiny-wan as if on ZeroGPU with 3 s a call measured at every preset: 40 steps of two calls are past 300 s."""
    from gradio_client.exceptions import AppError

    from aot import zerogpu
    from aot.zerogpu import Timing

    measured = zerogpu.durations
    timings = {p: Timing(3.0, 1.0) for p in ("64x32x5", "32x64x5", "48x48x5")}
    monkeypatch.setattr(zerogpu, "durations", lambda report, family, gib, *inputs: dataclasses.replace(
        measured(report, family, gib, *inputs), timings=timings, factor=1.5, limited=True))
    served = served_app("wan-zerogpu", {"MODEL_ID": "tiny-wan", "AOT_CACHE_DIR": wan.settings.cache_dir})
    app, client = next(served)
    try:
        monkeypatch.undo()
        # a new worker: 12 s, then 7.8 s a step; 36 steps ask 294 s once spaces' 1.5 counts, 37 would ask 302
        status = client.predict(api_name="/status")
        assert status["defaults"]["steps"] == app.DEFAULTS.steps == 36
        past = r"40 steps at 64x32x5 need about 32\d s of GPU, past ZeroGPU's 300 s per request"
        assert [f for f in status["fallbacks"] if re.fullmatch(f"default steps: {past}: the default is 36 steps, "
                                                                 "which fit", f)]
        with pytest.raises(AppError, match=f"{past}; use at most 36 steps at 64x32x5\\.$"):
            client.predict(**{**REQUEST, "steps": 40}, api_name="/generate")
        _, _, details = client.predict(prompt=PROMPT, api_name="/generate")  # the defaults: served
        assert details.startswith("64x32, 5 frames at 16 fps, 36 steps")
    finally:
        served.close()


# --- Wan 2.2 TI2V-5B (MODEL_ID=tiny-wan-5b): one transformer, a timestep per token, a 16x VAE ---------------------
class Wan5BCompiled(Compiled):
    """tiny-wan-5b after `optimize_pipeline_`, with a whole 2-step run recorded eagerly before."""

    def __init__(self):
        super().__init__(model_id="tiny-wan-5b")

    def check_model(self) -> None:
        assert self.model.family is WAN_5B and len(experts(self.pipe)) == 1 and self.pipe.config.expand_timesteps

    def record_eager(self) -> None:
        self.eager_latents = self.latents()

    latents = WanCompiled.latents


@pytest.fixture(scope="module")
def wan_5b() -> Wan5BCompiled:
    return Wan5BCompiled()


def test_wan_5b_is_its_own_family_with_its_16x_vae_and_24_fps():
    from settings import parse_presets

    assert (WAN_5B.multiple, WAN_5B.video.fps, WAN_5B.video.max_frames) == (32, 24, 121)
    landscape, portrait = parse_presets(WAN_5B.presets, WAN_5B.multiple)
    assert (landscape.name, portrait.name) == ("1280x704x121", "704x1280x121")
    assert WAN_5B.tokens(landscape) == WAN_5B.tokens(portrait) == 31 * 40 * 22  # latent frames x 40x22 tokens
    with pytest.raises(ValueError, match="multiples of 32"):
        parse_presets("a=624x624x81", WAN_5B.multiple)  # the A14B's square


def test_wan_5b_compiled_matches_eager_at_every_preset_and_in_a_run(wan_5b):
    assert wan_5b.report.compile_scope == "blocks", wan_5b.report.fallbacks
    # a timestep per token: the time embedding the blocks see has a token axis
    (args, kwargs), = [wan_5b.inputs[p.name] for p in wan_5b.model.presets[:1]]
    timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    assert timestep.ndim == 2 and timestep.shape[1] == WAN_5B.tokens(wan_5b.model.presets[0])
    # 64x32x5 and 32x64x5 are 4 tokens each: one program
    assert wan_5b.report.programs == [{"image_tokens": 4, "resolutions": ["64x32x5", "32x64x5"]}]
    compiled = wan_5b.run()
    for preset, out in compiled.items():
        assert rel_err(out, wan_5b.eager[preset]) <= TOLERANCE, preset
    assert rel_err(wan_5b.latents(), wan_5b.eager_latents) <= TOLERANCE


# --- Wan 2.2 I2V-A14B (MODEL_ID=tiny-wan-i2v): the image is the video's first frame, in latent channels ------------
I2V_PRESETS = "landscape=64x32x5,portrait=32x64x5"  # 16 tokens each: one program, compiled once for both experts


def _frame(colour, size=(96, 160)):
    from PIL import Image

    return Image.new("RGB", size, colour)


class WanI2VCompiled(WanCompiled):
    """tiny-wan-i2v after `optimize_pipeline_` at two presets of one program, with both experts' eager outputs and two
    whole runs from two first frames recorded before."""

    FRAMES = {"red": _frame((200, 30, 30)), "green": _frame((30, 200, 30))}

    def __init__(self):
        super().__init__(model_id="tiny-wan-i2v", presets=I2V_PRESETS)

    def check_model(self) -> None:
        assert self.model.family is WAN_I2V
        assert [expert.config.in_channels for expert in experts(self.pipe)] == [16 + 4 + 16] * 2  # noise, mask, frame

    def record_eager(self) -> None:
        super().record_eager()
        self.eager_runs = {name: self.latents(image) for name, image in self.FRAMES.items()}

    def latents(self, image=FRAMES["red"]) -> torch.Tensor:
        """Two steps at the first preset from `image` (96x160: the pipeline stretches it to 64x32), one per expert."""
        generator = torch.Generator().manual_seed(5)
        with torch.inference_mode():
            return self.model.outputs(self.model(PROMPT, self.model.presets[0], steps=2, generator=generator,
                                                 images=(image,), output_type="latent"))


@pytest.fixture(scope="module")
def wan_i2v() -> WanI2VCompiled:
    return WanI2VCompiled()


def test_i2v_frame_adds_channels_not_tokens_and_compiled_matches_eager(wan_i2v):
    model = wan_i2v.model
    assert wan_i2v.report.programs == [{"image_tokens": 16, "resolutions": ["64x32x5", "32x64x5"]}]
    assert model.max_image_tokens == 16 and model.input_tokens([(96, 160)]) == 0
    assert model.input_preset(96, 160, model.presets[1]) == model.presets[1]  # the request's own size
    for preset in model.presets:
        hidden = wan_i2v.inputs[preset.name][1]["hidden_states"]
        assert hidden.shape == (1, 36, 2, preset.height // 8, preset.width // 8), preset.name
    compiled = wan_i2v.run_experts()
    for key, out in compiled.items():
        assert rel_err(out, wan_i2v.eager_experts[key]) <= TOLERANCE, key
    for preset in wan_i2v.inputs:
        assert rel_err(compiled["transformer", preset], compiled["transformer_2", preset]) > 1e-2
    for name, image in wan_i2v.FRAMES.items():
        latents = wan_i2v.latents(image)
        assert rel_err(latents, wan_i2v.eager_runs[name]) <= TOLERANCE, name
    # the frame reached the transformer: another one makes another video
    assert rel_err(wan_i2v.eager_runs["red"], wan_i2v.eager_runs["green"]) > 1e-3


def test_i2v_refuses_wan_21s_image_encoder_and_ti2v_5b_at_startup():
    from aot.model import build_tiny, family_of

    pipe = build_tiny(WAN_I2V)
    assert family_of(pipe) is WAN_I2V
    pipe.transformer.register_to_config(image_dim=1280)  # Wan 2.1 I2V's CLIP image embeddings
    with pytest.raises(SystemExit, match="WanImageToVideoPipeline: Wan 2.1's image to video reads the image through "
                                         "a CLIP encoder too .* Served: Wan 2.2 I2V-A14B"):
        family_of(pipe)
    pipe.transformer.register_to_config(image_dim=None)
    pipe.register_to_config(expand_timesteps=True)
    with pytest.raises(SystemExit, match="Wan 2.2 TI2V-5B's image to video \\(expand_timesteps\\) is not served"):
        family_of(pipe)


@pytest.fixture(scope="module")
def wan_i2v_app(wan_i2v):
    """(app module, gradio client): app.py with MODEL_ID=tiny-wan-i2v, loading `wan_i2v`'s program from the cache."""
    yield from served_app("wan-i2v", {"MODEL_ID": "tiny-wan-i2v", "PRESETS": I2V_PRESETS,
                                      "AOT_CACHE_DIR": wan_i2v.settings.cache_dir})


def test_i2v_app_makes_a_video_from_an_image_and_refuses_a_request_without_one(wan_i2v_app, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    app, client = wan_i2v_app
    status = client.predict(api_name="/status")
    assert status["compile_source"] == "loaded from cache" and status["inputs"]["image_required"] is True
    assert status["inputs"]["resized_to"] == WAN_I2V.resized_to
    path = tmp_path / "first.png"
    _frame((200, 30, 30)).save(path)
    video, seed, details = client.predict(**REQUEST, image=handle_file(str(path)), frames=5, api_name="/generate")
    frames, fps, size, _ = _decoded(video)
    assert (len(frames), fps, size, seed) == (5, 16, (64, 32), 7)
    assert details.startswith("64x32, 5 frames at 16 fps, 2 steps") and "input 96x160 resized to 64x32" in details
    with pytest.raises(AppError, match=r"This wan-i2v model makes its video from an image: give at least 1 input "
                                       r"image \(up to 1\); got 0\."):
        client.predict(**REQUEST, api_name="/generate")
    again, _, _ = client.predict(**REQUEST, image=handle_file(str(path)), api_name="/generate")  # served again
    assert all(np.array_equal(a, b) for a, b in zip(_decoded(again)[0], frames, strict=True))
    # the page asks for motion, and its examples are first frames with how they move
    assert app.INPUT_EXAMPLES is app.FIRST_FRAME_EXAMPLES and app.EXAMPLES[0] == app.FIRST_FRAME_EXAMPLES[0][1]
    assert app._examples()[0] == [str(app.DEMO_THUMBNAILS / "example-1.png"), app.EXAMPLES[0]]
    assert app.MADE == "a video"
