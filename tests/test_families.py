"""Every model family in `aot.families.FAMILIES` (those drawing from a prompt alone),
on its tiny random-weight pipeline (MODEL_ID=tiny-<name>),
AoT-compiled on CPU with whole-model scope (or regional, where a family says it must be and reports it) at its
tiny presets: compiled matches eager (the transformer's captured inputs and whole pipeline runs), each preset
runs its own program, all programs read one copy of the weights, a shape outside the presets is refused, and
the app serves the family from the cache.

One compile per family per session: `family` is a session fixture per family, its programs go to the
session's cache, and the app started for the family loads them from there.
"""
import contextlib
import hashlib
import json
import math
import re

import pytest
import torch
from PIL import Image

import optimization
from aot.families import Guidance
from aot.programs import ShapeDispatch, compile_targets
from conftest import TEXT_FAMILIES, Compiled, eager_outputs, rel_err, served_app
from settings import Preset, parse_presets

TOLERANCE = 1e-4  # fp32, compiled vs eager
STEPS = 2
PROMPT = "a red cube"
LONGER_PROMPT = "a red cube on a wooden table beside a window, soft morning light, photographed from above"
NEGATIVE_PROMPT = "blurry, low quality"
OFF_PRESET = Preset("off-preset", 160, 160)  # a multiple of 16, no tiny preset; Z-Image pads it to its own length


def _takes_negative_prompt(family) -> bool:
    return family.negative_prompt_arg is not None


class FamilyCompiled(Compiled):
    """A family's tiny pipeline after `optimize_pipeline_` (whole-model scope, the session's cache), with the
    transformer's eager outputs at every preset and eager pipeline runs recorded before compiling."""

    def __init__(self, name: str):
        self.name = name
        super().__init__(model_id=f"tiny-{name}", aot_scope="model")

    def check_model(self) -> None:
        family = self.model.family
        assert family.name == self.name and self.settings.tiny_family == self.name
        assert self.model.presets == parse_presets(family.tiny_presets, family.multiple)

    def record_eager(self) -> None:
        self.runs = self.pipeline_runs()
        self.eager_latents = {name: self.latents(**run) for name, run in self.runs.items()}

    def pipeline_runs(self) -> dict[str, dict]:
        """Whole-pipeline runs to compare, by name: the arguments of one `Model` call each."""
        model, family = self.model, self.model.family
        other = model.presets[-1]  # not square; one preset for all, so that their transformer calls compare
        runs = {"default": dict(prompt=PROMPT, preset=other),
                "longer prompt": dict(prompt=LONGER_PROMPT, preset=other)}
        if model.defaults.guidance_kind is Guidance.CFG:
            runs["guidance 1: one transformer call per step"] = dict(prompt=PROMPT, preset=other, guidance=1.0)
            if _takes_negative_prompt(family):
                runs["negative prompt, guidance 4: true CFG"] = dict(prompt=PROMPT, preset=other, guidance=4.0,
                                                                     negative_prompt=NEGATIVE_PROMPT)
        return runs

    def latents(self, prompt: str, preset: Preset, **kwargs) -> torch.Tensor:
        """A whole `STEPS`-step pipeline run, as latents, with a fixed generator."""
        generator = torch.Generator().manual_seed(5)
        with torch.inference_mode():
            return self.model(prompt, preset, steps=STEPS, generator=generator, output_type="latent", **kwargs).images


@pytest.fixture(scope="session", params=[family.name for family in TEXT_FAMILIES])
def family(request) -> FamilyCompiled:
    return FamilyCompiled(request.param)


def _served(compiled: FamilyCompiled) -> str:
    """The resolutions each program serves, as the dispatcher names them."""
    return "; ".join(", ".join(program["resolutions"]) for program in compiled.report.programs)


def test_compiled_matches_eager_at_every_preset(family):
    outputs = family.run()
    assert set(outputs) == {p.name for p in family.model.presets}
    for name, out in outputs.items():
        assert torch.isfinite(out).all(), name
        assert rel_err(out, family.eager[name]) <= TOLERANCE, name


def _scope(family: FamilyCompiled) -> str:
    """Whole-model scope was asked for; a family that only compiles regionally says so and compiles blocks."""
    return "blocks" if family.model.family.regional_only else "model"


def _dispatchers(family: FamilyCompiled) -> dict[torch.nn.Module, ShapeDispatch]:
    return {m: m.__dict__["forward"] for m in family.pipe.transformer.modules()
            if isinstance(m.__dict__.get("forward"), ShapeDispatch)}


@contextlib.contextmanager
def _recording(family: FamilyCompiled):
    """Records the label (the resolutions it serves) of every program any dispatcher picks."""
    labels = []
    dispatchers = _dispatchers(family)
    for dispatch in dispatchers.values():
        def program_for(args, kwargs, _pick=dispatch.program_for, _dispatch=dispatch):
            program = _pick(args, kwargs)
            labels.append(next(label for _, candidate, label in _dispatch.programs if candidate is program))
            return program
        dispatch.program_for = program_for
    try:
        yield labels
    finally:
        for dispatch in dispatchers.values():
            del dispatch.program_for


def test_the_transformer_dispatches_to_one_program_per_preset_shape(family):
    report, transformer = family.report, family.pipe.transformer
    assert (report.family, report.compile, report.compile_scope) == (family.name, "aoti", _scope(family))
    regional = [f for f in report.fallbacks if f.startswith(f"compile scope: regional programs for {family.name}")]
    assert len(regional) == (_scope(family) == "blocks")  # reported exactly when the scope was changed
    # flux: the session fixture compiled_model (MODEL_ID=tiny is tiny-flux) compiled these very programs first
    assert report.compile_source == ("loaded from cache" if family.was_cached else "compiled now")
    assert len(report.cache_keys) == len(report.programs)
    groups = optimization.program_groups(family.model, _scope(family), dynamic=False)
    assert [program["resolutions"] for program in report.programs] == [[p.name for p in g] for g in groups.values()]
    assert sorted(r for program in report.programs for r in program["resolutions"]) == sorted(
        p.name for p in family.model.presets)
    dispatchers = _dispatchers(family)
    if _scope(family) == "model":  # the transformer's forward, nothing else
        assert list(dispatchers) == [transformer]
    else:  # every block of every repeated class, nothing else
        blocks = [block for name in compile_targets(transformer, "blocks") for block in transformer.get_submodule(name)]
        assert sorted(map(id, dispatchers)) == sorted(map(id, blocks))
    for dispatch in dispatchers.values():
        assert [label for _, _, label in dispatch.programs] == _served(family).split("; ")
    # each preset runs the program compiled for it (portrait and landscape may share one), on every patched module
    picked = {}
    with _recording(family) as labels:
        for name, inputs in family.inputs.items():
            labels.clear()
            eager_outputs(family.pipe, {name: inputs})
            picked[name] = set(labels)
    assert all(len(used) == 1 and name in next(iter(used)).split(", ") for name, used in picked.items()), picked
    # so no program is unreachable: every dispatcher's programs have distinct input signatures
    for module, dispatch in dispatchers.items():
        signatures = [json.dumps(sig) for sig, _, _ in dispatch.programs]
        assert len(set(signatures)) == len(signatures), f"{type(module).__name__}: programs with equal signatures"


def test_pipeline_runs_match_eager(family):
    """Whole pipeline runs, compiled vs eager, all at one preset: a longer prompt (where the text length follows
    the prompt, as for Qwen-Image, one program must serve it exactly: padded and masked, or a dynamic text axis),
    and for CFG families guidance 1 (one call a step) and true CFG with a negative prompt (two calls a step, texts
    of two lengths)."""
    model, transformer = family.model, family.pipe.transformer
    calls = []  # the run of every transformer call
    hook = transformer.register_forward_pre_hook(lambda *_: calls.append(run_name))
    try:
        with _recording(family) as labels:
            for run_name, run in family.runs.items():
                latents = family.latents(**run)
                assert torch.isfinite(latents).all(), run_name
                assert rel_err(latents, family.eager_latents[run_name]) <= TOLERANCE, run_name
    finally:
        hook.remove()
    for run_name, run in family.runs.items():  # true CFG: two transformer calls per step
        per_step, _ = model.step_calls(run.get("guidance", model.defaults.guidance))
        assert calls.count(run_name) == per_step * STEPS, run_name
    if model.defaults.guidance_kind is Guidance.CFG:
        assert any(model.does_cfg(run.get("guidance", model.defaults.guidance)) for run in family.runs.values())
    # one preset, so one program served every prompt length: padded, fixed or a dynamic text axis
    assert labels and len(set(labels)) == 1, set(labels)
    # the runs differ where they should: otherwise matching eager would prove less than it seems
    pipe, entry = family.pipe, model.family
    assert entry.prompt_tokens(pipe, LONGER_PROMPT) > entry.prompt_tokens(pipe, PROMPT)
    for run_name in family.runs:
        if run_name != "default":
            assert rel_err(family.eager_latents[run_name], family.eager_latents["default"]) > 1e-3, run_name


def _weight_tensors(compiled: FamilyCompiled) -> list[torch.Tensor]:
    """Every tensor any installed program reads, plus the module's own parameters and buffers."""
    tensors = list(compiled.pipe.transformer.state_dict().values())
    for dispatch in _dispatchers(compiled).values():
        for _, program, _ in dispatch.programs:
            tensors += list(program.weights.values())
    return tensors


def test_programs_share_one_copy_of_the_weights(family):
    params = family.pipe.transformer.state_dict().values()
    one_copy = sum(t.untyped_storage().nbytes() for t in {t.untyped_storage().data_ptr(): t for t in params}.values())
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in _weight_tensors(family)}
    assert sum(storages.values()) == one_copy
    # the programs really hold references: each program of each patched module, all of that module's tensors
    dispatchers = _dispatchers(family)
    entry = family.model.family  # one program for every preset (one_program, or a dynamic range), or one per shape
    fewest = 1 if entry.one_program or entry.dynamic_tokens else 2
    assert dispatchers and all(len(d.programs) == len(family.report.programs) >= fewest for d in dispatchers.values())
    held = sum(len(dispatch.programs) * len(module.state_dict()) for module, dispatch in dispatchers.items())
    assert held > 0 and len(_weight_tensors(family)) == len(params) + held


def test_a_shape_outside_the_presets_is_refused(family):
    """Refused by the dispatcher; except where a family's programs take any size (Z-Image's block sequence
    axis is dynamic over image and text): there the one program serves it (the app still offers presets only).
    Where the programs take a range of image tokens (an editing family's, which FLUX.2's references of up to 1 MP
    make wider than any preset), the shape is just past its top."""
    assert OFF_PRESET.name not in {p.name for p in family.model.presets}
    off = OFF_PRESET
    if family.model.family.dynamic_tokens:
        side = 16 * math.ceil(math.sqrt(optimization.token_range(family.model)[1] + 1))
        off = Preset("off-preset", side, side)
    if family.model.family.one_program:
        latents = family.latents(PROMPT, OFF_PRESET)
        assert torch.isfinite(latents).all() and torch.equal(latents, family.latents(PROMPT, OFF_PRESET))
        assert latents.numel() > family.latents(**family.runs["default"]).numel()  # 160x160 is larger than any preset
    else:
        served = re.escape(_served(family))
        with pytest.raises(optimization.UnsupportedShape,
                           match=rf"^no compiled program for inputs .+ \(compiled for: {served}\)$"):
            family.latents(PROMPT, off)
    # and the presets are still served, exactly
    assert rel_err(family.latents(**family.runs["default"]), family.eager_latents["default"]) <= TOLERANCE


# --- the app, started for the family, serving its programs from the session's cache -------------------------
@pytest.fixture(scope="session")
def family_app(family):
    """(app module, gradio client): a fresh copy of app.py with MODEL_ID=tiny-<name>, as the Space starts it, at the
    family fixture's scope (AOT_SCOPE=model), so that it loads those programs rather than compiling others."""
    yield from served_app(family.name, {"MODEL_ID": f"tiny-{family.name}", "COMPILE": "aoti", "AOT_SCOPE": "model",
                                        "AOT_CACHE_DIR": family.settings.cache_dir})


def _request(app, **changes) -> dict:
    preset = app.MODEL.presets[-1]
    return dict(dict(prompt="a lighthouse at dusk", resolution=preset.name, seed=4242, randomize_seed=False,
                     steps=STEPS, guidance=app.DEFAULTS.guidance, negative_prompt=""), **changes)


def _image(path: str) -> tuple[tuple[int, int], str]:
    with Image.open(path) as image:
        return image.size, hashlib.sha256(image.tobytes()).hexdigest()


def test_app_status_names_the_family_and_loads_its_programs_from_the_cache(family, family_app):
    app, client = family_app
    status = client.predict(api_name="/status")
    assert status["family"] == family.name and status["model_id"] == f"tiny-{family.name}"
    assert status["demo_model"] is True and status["compile"] == "aoti" and status["compile_scope"] == _scope(family)
    assert status["compile_source"] == "loaded from cache"  # nothing compiled a second time
    assert status["cache_keys"] == family.report.cache_keys and status["programs"] == family.report.programs
    assert status["resolutions"] == [p.name for p in family.model.presets]
    assert status["defaults"]["guidance_kind"] == family.model.defaults.guidance_kind.value
    assert f"({family.name} family)" in app._status_markdown()


def test_app_same_seed_gives_the_same_image(family, family_app):
    app, client = family_app
    preset = app.MODEL.presets[-1]
    results = [client.predict(**_request(app), api_name="/generate") for _ in range(2)]
    for path, seed, details in results:
        assert seed == 4242 and details.startswith(f"{preset.name}, {STEPS} steps")
        assert _image(path)[0] == (preset.width, preset.height)
    assert _image(results[0][0]) == _image(results[1][0])
    other_seed, _, _ = client.predict(**_request(app, seed=4243), api_name="/generate")
    assert _image(other_seed) != _image(results[0][0])


def test_app_negative_prompt_is_served_or_refused_by_the_family(family, family_app):
    from gradio_client.exceptions import AppError

    app, client = family_app
    takes_it = family.model.defaults.guidance_kind is Guidance.CFG and _takes_negative_prompt(family.model.family)
    assert app.TAKES_NEGATIVE_PROMPT == takes_it
    if takes_it:
        with_it, seed, _ = client.predict(**_request(app, negative_prompt=NEGATIVE_PROMPT), api_name="/generate")
        without, _, _ = client.predict(**_request(app), api_name="/generate")
        assert seed == 4242 and _image(with_it)[1] != _image(without)[1]  # it reached the pipeline
        if not family.model.does_cfg(1.0):  # where the pipeline would drop it
            with pytest.raises(AppError, match="reads a negative prompt only at guidance above 1 .* Got guidance 1.0"):
                client.predict(**_request(app, negative_prompt=NEGATIVE_PROMPT, guidance=1.0), api_name="/generate")
    else:
        with pytest.raises(AppError, match=f"This {re.escape(family.name)} model .*takes no negative prompt"):
            client.predict(**_request(app, negative_prompt=NEGATIVE_PROMPT), api_name="/generate")
    path, seed, details = client.predict(**_request(app), api_name="/generate")  # and the next request is served
    preset = app.MODEL.presets[-1]
    assert seed == 4242 and _image(path)[0] == (preset.width, preset.height) and details.startswith(preset.name)


def test_app_guidance_is_used_or_refused_by_the_family(family, family_app):
    from gradio_client.exceptions import AppError

    app, client = family_app
    default, _, _ = client.predict(**_request(app), api_name="/generate")
    other = app.DEFAULTS.guidance + 1.5
    if family.model.defaults.guidance_kind is Guidance.NONE:  # guidance-distilled: any other value is an error
        with pytest.raises(AppError, match="takes no guidance"):
            client.predict(**_request(app, guidance=other), api_name="/generate")
    else:
        changed, _, _ = client.predict(**_request(app, guidance=other), api_name="/generate")
        assert _image(changed)[1] != _image(default)[1]
