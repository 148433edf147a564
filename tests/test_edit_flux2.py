"""FLUX.2 reference images (tiny-flux2 and tiny-flux2-klein, the pipelines' `image` list): the family's reference
sizes are the pipelines' own, one program over a dynamic image-token range matches eager with one reference and with
as many as the family takes, a call past the range is refused, and the app serves references through gradio_client,
refusing too many and too small ones.

[dev] and [klein] resize references in the same code and feed the same transformer class; they differ in the text
encoder and the guidance (embedded for [dev], true CFG for klein base: two calls a step). So each is compiled once, at
one scope: [dev] whole-model (the transformer's ids dynamic), [klein] regional, the default (double and single blocks'
rotary tables and streams dynamic); the app serves [klein] from its programs."""
import inspect
import math

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image

import optimization
from aot.families.flux2 import FLUX2, FLUX2_KLEIN, MIN_REFERENCE_SIDE, MULTIPLE, REFERENCE_AREA, reference_size
from aot.images import MAX_ASPECT
from conftest import Compiled, image_tokens_per_call, rel_err, served_app, tiny_model
from settings import Preset

TOLERANCE = 1e-4  # fp32, compiled vs eager, as tests/test_families.py
STEPS = 2
PROMPT = "the cat of picture 1 on the sofa of picture 2"
# The references of the runs, as many as each family takes: the first over 1 MP, which the pipeline scales down
REFERENCE_SIZES = ((1100, 1000), (100, 70), (64, 200), (300, 90), (128, 128), (90, 300))


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    data = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(data, "RGB")


# --- the family's reference sizes are the pipelines' own ---------------------------------------------------------
class _Sized:
    """Stands in for a PIL image where only its size is read: `_resize_to_target_area` reads `size` and resizes."""

    def __init__(self, size):
        self.size = size

    def resize(self, size, resample=None):
        return _Sized(size)


def test_reference_sizes_are_the_pipelines_own_at_every_aspect_ratio():
    """Each aspect ratio aot/images.py lets in, in steps of a thousandth, at 3000 rows (scaled down to 1 MP) through
    the pipelines' own `_resize_to_target_area`, then cut to multiples of 16; no reference maps to more tokens than
    the programs' range counts one at."""
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

    most = tiny_model(model_id="tiny-flux2-klein").max_input_tokens
    assert most == 4096 == FLUX2.image_tokens(*_size(reference_size(1024, 1024, ())))
    steps = int((MAX_ASPECT - 1 / MAX_ASPECT) * 1000)
    for width in (round(3000 / MAX_ASPECT) + i * 3 for i in range(steps + 1)):
        scaled = Flux2ImageProcessor._resize_to_target_area(_Sized((width, 3000)), REFERENCE_AREA).size
        want = tuple(side - side % MULTIPLE for side in scaled)
        got = reference_size(width, 3000, ())
        assert _size(got) == want and got.name == f"{want[0]}x{want[1]}", width
        assert FLUX2.image_tokens(*want) <= most, width


def _size(preset: Preset) -> tuple[int, int]:
    return preset.width, preset.height


# Sizes around each edge of the rule: 1 MP exactly and just over, sides just past a multiple of 16, 1:4 and 4:1,
# phone photos, and small ones that are only cut
EDGE_SIZES = [(64, 64), (64, 256), (256, 64), (100, 70), (777, 333), (1000, 1000), (1024, 1024), (1025, 1024),
              (1040, 1008), (1449, 725), (2048, 512), (2049, 513), (512, 2048), (1080, 1920), (1920, 1080),
              (4032, 3024), (3024, 4032), (4000, 1000), (1000, 4000), (1800, 1200), (700, 1600)]


@pytest.mark.parametrize("name", ["flux2", "flux2-klein"])
def test_the_pipeline_gives_each_reference_the_familys_size(name, monkeypatch):
    """The pipeline's own step on real images, all in one call, stopped before its VAE: each reference's size as it
    reaches the latents; and its own smallest side and widest aspect ratio, against the family's and aot/images.py's."""
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

    pipe = tiny_model(model_id=f"tiny-{name}").pipe
    reached = []

    class Reached(Exception):
        pass

    def stop(images, **_):
        reached.extend((image.shape[3], image.shape[2]) for image in images)
        raise Reached

    monkeypatch.setattr(pipe, "prepare_image_latents", stop)
    with torch.inference_mode(), pytest.raises(Reached):
        pipe(prompt=PROMPT, image=[Image.new("RGB", size) for size in EDGE_SIZES], num_inference_steps=1)
    assert reached == [_size(reference_size(*size, ())) for size in EDGE_SIZES]
    checks = inspect.signature(Flux2ImageProcessor.check_image_input).parameters
    assert checks["min_side_length"].default == MIN_REFERENCE_SIDE == FLUX2.min_image_side
    assert checks["max_aspect_ratio"].default >= MAX_ASPECT


# --- compiled equals eager, one reference and as many as the family takes ----------------------------------------
class ReferencesCompiled(Compiled):
    """A FLUX.2 tiny pipeline after `optimize_pipeline_`, its eager edits recorded before."""

    def __init__(self, name: str, **overrides):
        self.name = name
        super().__init__(model_id=f"tiny-{name}", **overrides)

    def check_model(self) -> None:
        assert self.model.family.name == self.name and [p.name for p in self.model.presets] == [
            "64x64", "48x80", "80x48"]

    def record_eager(self) -> None:
        presets, most = self.model.presets, self.model.family.max_images
        self.runs = {"text to image": dict(preset=presets[1]),
                     "one reference": dict(preset=presets[1], images=(_noise(*REFERENCE_SIZES[1]),)),
                     f"{most} references": dict(preset=presets[2], images=tuple(
                         _noise(*size, seed=i) for i, size in enumerate(REFERENCE_SIZES[:most])))}
        self.eager_latents = {name: self.latents(**run) for name, run in self.runs.items()}

    def latents(self, preset: Preset, images=()) -> torch.Tensor:
        generator = torch.Generator().manual_seed(5)
        with torch.inference_mode():
            return self.model(PROMPT, preset, steps=STEPS, generator=generator, output_type="latent",
                              images=images).images


@pytest.fixture(scope="module")
def dev() -> ReferencesCompiled:
    return ReferencesCompiled("flux2", aot_scope="model")


@pytest.fixture(scope="module")
def klein() -> ReferencesCompiled:
    return ReferencesCompiled("flux2-klein")


def _edits_match_eager(compiled: ReferencesCompiled, scope: str) -> None:
    model, report = compiled.model, compiled.report
    most = model.family.max_images
    assert report.compile_scope == scope and report.programs == [
        {"image_tokens": f"15..{16 + most * 4096}", "resolutions": ["64x64", "48x80", "80x48"]}]
    assert any(note.startswith(f"programs: one over a dynamic image-token range for {model.family.name}")
               for note in report.notes)
    calls = STEPS * (2 if model.does_cfg(model.defaults.guidance) else 1)
    for name, run in compiled.runs.items():
        with image_tokens_per_call(model.pipe.transformer) as lengths:
            latents = compiled.latents(**run)
        assert torch.isfinite(latents).all(), name
        assert rel_err(latents, compiled.eager_latents[name]) <= TOLERANCE, name
        sizes = [run["preset"], *(model.input_preset(*image.size) for image in run.get("images", ()))]
        assert lengths == [sum(model.family.image_tokens(s.width, s.height) for s in sizes)] * calls, name
    # the reference reached the transformer: the edit differs from text to image at the same preset
    assert rel_err(compiled.eager_latents["one reference"], compiled.eager_latents["text to image"]) > 1e-3


def test_dev_edits_match_eager_through_one_whole_model_program(dev):
    _edits_match_eager(dev, "model")


def test_klein_edits_match_eager_through_one_regional_program(klein):
    _edits_match_eager(klein, "blocks")


def test_a_call_past_the_programs_range_is_refused(klein):
    high = optimization.token_range(klein.model)[1]
    side = MULTIPLE * math.ceil(math.sqrt(high + 1))  # an output alone past the range's top
    with pytest.raises(optimization.UnsupportedShape,
                       match=r"no compiled program for inputs .*compiled for: 64x64, 48x80, 80x48"):
        klein.latents(Preset("off-preset", side, side))


# --- the app serving tiny-flux2-klein through gradio_client ------------------------------------------------------
@pytest.fixture(scope="module")
def klein_app(klein):
    """(app module, gradio client): app.py with MODEL_ID=tiny-flux2-klein, loading `klein`'s programs."""
    yield from served_app("flux2-klein", {"MODEL_ID": "tiny-flux2-klein", "AOT_CACHE_DIR": klein.settings.cache_dir})


EDIT = dict(prompt=PROMPT, resolution="48x80", seed=7, randomize_seed=False, steps=STEPS, guidance=4.0)


def _saved(tmp_path, image: Image.Image, name: str) -> str:
    path = tmp_path / name
    image.save(path)
    return str(path)


def _pixels(path: str) -> bytes:
    with Image.open(path) as image:
        return image.tobytes()


def test_app_serves_references_refuses_too_many_and_too_small_and_serves_the_next(klein_app, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    app, client = klein_app
    status = client.predict(api_name="/status")
    assert status["compile_source"] == "loaded from cache"
    inputs = status["inputs"]
    assert inputs["images"] == 4 and inputs["image_args"] == ["image", "image_2", "image_3", "image_4"]
    assert inputs["image_required"] is False and inputs["min_side"] == MIN_REFERENCE_SIDE
    assert inputs["resized_to"] == FLUX2_KLEIN.resized_to
    parameters = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/generate"]["parameters"]
    assert [p["parameter_name"] for p in parameters][-4:] == ["image", "image_2", "image_3", "image_4"]
    first, second = _saved(tmp_path, _noise(100, 70), "a.png"), _saved(tmp_path, _noise(64, 200, 1), "b.png")
    path, seed, details = client.predict(**EDIT, image=handle_file(first), image_2=handle_file(second),
                                         api_name="/generate")
    with Image.open(path) as out:
        assert out.size == (48, 80)
    assert seed == 7 and "input 100x70 resized to 96x64" in details and "input_2 64x200 resized to 64x192" in details
    text_only, _, text_details = client.predict(**EDIT, api_name="/generate")  # no reference: text to image
    assert "input" not in text_details and _pixels(text_only) != _pixels(path)
    upload = {"path": first}  # as Gradio hands an upload to the handler: a fifth reference, past [klein]'s four
    with pytest.raises(gr.Error, match="takes at most 4 input images; got 5"):
        app.generate(**EDIT, image=upload, image_2=upload, image_3=upload, image_4=upload, image_5=upload)
    small = _saved(tmp_path, _noise(40, 100), "small.png")  # aot/images.py takes it; the pipeline would refuse it
    with pytest.raises(AppError, match="image_2: The image is 40 x 100 pixels; each side must be at least 64."):
        client.predict(**EDIT, image=handle_file(first), image_2=handle_file(small), api_name="/generate")
    again, _, _ = client.predict(**EDIT, image=handle_file(first), image_2=handle_file(second), api_name="/generate")
    assert _pixels(again) == _pixels(path)  # served again, the same edit
