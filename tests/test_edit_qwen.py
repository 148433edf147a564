"""Qwen-Image-Edit Plus (tiny-qwen-image-edit-plus, up to three input images): the family's input sizes are the
pipeline's own, one block program over dynamic image and text axes matches eager with one and with three input
images, and the app serves several images through gradio_client, refusing too many and serving the next.

The pipeline resizes every input to about 1 MP whatever the output's size, so even the tiny pipeline's edits carry
about 4100 image tokens per input: one preset (PRESETS) keeps start-up's timing to one call of each length."""
import math

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image

import optimization
from aot.families.qwen_image_edit import QWEN_IMAGE_EDIT, QWEN_IMAGE_EDIT_PLUS, calculate_dimensions
from aot.model import load_model
from conftest import ROOT, Compiled, image_tokens_per_call, rel_err, served_app, settings_for, tiny_model
from settings import Preset

TOLERANCE = 1e-4  # fp32, compiled vs eager, as tests/test_families.py
STEPS = 2
PRESET = "square=64x64"
PROMPT = "put the cat on the sofa"


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    data = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(data, "RGB")


def test_input_sizes_are_the_pipelines_own():
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus

    assert pipeline_qwenimage_edit_plus.VAE_IMAGE_SIZE == 1024 * 1024
    for width, height in [(1000, 1000), (4032, 3024), (3024, 4032), (1080, 1920), (500, 1300), (2000, 501), (37, 41)]:
        ratio = width / height
        assert calculate_dimensions(width, height) == pipeline_qwenimage_edit_plus.calculate_dimensions(
            1024 * 1024, ratio)
        assert calculate_dimensions(width, height) == pipeline_qwenimage_edit.calculate_dimensions(
            1024 * 1024, ratio)[:2]
    assert (QWEN_IMAGE_EDIT.max_images, QWEN_IMAGE_EDIT_PLUS.max_images) == (1, 3)
    assert QWEN_IMAGE_EDIT.min_images == QWEN_IMAGE_EDIT_PLUS.min_images == 1


@pytest.mark.parametrize("name", ["qwen-image-edit", "qwen-image-edit-plus"])
def test_the_text_axis_covers_every_inputs_vision_tokens(name):
    """At the aspect ratios allowed, each input's vision tokens (and the words around them) within the bound the
    programs' text axis is built from. The condition images are the pipelines' own: the VAE's image (Edit) or one
    of about 384 x 384 (Edit Plus)."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import CONDITION_IMAGE_SIZE, calculate_dimensions

    model = tiny_model(model_id=f"tiny-{name}")
    family, pipe = model.family, model.pipe
    for width, height in [(4000, 1000), (1000, 4000), (1000, 1000), (1000, 1001), (148, 37)]:
        size = calculate_dimensions(CONDITION_IMAGE_SIZE if family.max_images > 1 else 1024 * 1024, width / height)
        condition = [_noise(*size)] * family.max_images
        with torch.inference_mode():
            embeds, _ = pipe.encode_prompt(PROMPT, image=condition if family.max_images > 1 else condition[0])
        added = embeds.shape[1] - family.prompt_tokens(pipe, PROMPT)
        assert 0 < added <= family.max_images * family.image_text_tokens(pipe), (width, height)


class EditPlusCompiled(Compiled):
    """tiny-qwen-image-edit-plus at one preset after `optimize_pipeline_` (regional: Qwen-Image's only scope), its
    eager edits recorded before."""

    def __init__(self):
        super().__init__(model_id="tiny-qwen-image-edit-plus", presets=PRESET)

    def check_model(self) -> None:
        assert self.model.family is QWEN_IMAGE_EDIT_PLUS and [p.name for p in self.model.presets] == ["64x64"]

    def record_eager(self) -> None:
        self.runs = {"one image": (_noise(300, 200),),
                     "three images": (_noise(300, 200), _noise(96, 160, 1), _noise(128, 128, 2))}
        self.eager_latents = {name: self.latents(images) for name, images in self.runs.items()}

    def latents(self, images, preset: Preset | None = None) -> torch.Tensor:
        generator = torch.Generator().manual_seed(5)
        with torch.inference_mode():  # guidance 1: one transformer call per step
            return self.model(PROMPT, preset or self.model.presets[0], steps=STEPS, guidance=1.0,
                              generator=generator, output_type="latent", images=images).images


@pytest.fixture(scope="session")
def edit_plus() -> EditPlusCompiled:
    return EditPlusCompiled()


def test_edits_match_eager_through_one_block_program(edit_plus):
    model, report = edit_plus.model, edit_plus.report
    low, high = optimization.token_range(model)
    assert report.compile_scope == "blocks" and report.programs == [
        {"image_tokens": f"{low}..{high}", "resolutions": ["64x64"]}]
    assert high >= 16 + 3 * 4160  # three inputs of about 1 MP: 4096 tokens and the rounding of their sides
    assert report.text.startswith(f"dynamic axis up to {model.max_text_tokens} tokens")
    for name, images in edit_plus.runs.items():
        with image_tokens_per_call(model.pipe.transformer) as lengths:
            latents = edit_plus.latents(images)
        assert torch.isfinite(latents).all(), name
        assert rel_err(latents, edit_plus.eager_latents[name]) <= TOLERANCE, name
        inputs = [model.input_preset(*image.size) for image in images]  # at the size the pipeline picks
        assert lengths == [16 + sum(p.width * p.height // 256 for p in inputs)] * STEPS, name
    assert any(note.startswith("programs: one over a dynamic image-token range for qwen-image-edit-plus") for note in
               report.notes)
    # the two more inputs reached the transformer (random tiny weights: a small difference, well past the tolerance)
    assert rel_err(edit_plus.eager_latents["one image"], edit_plus.eager_latents["three images"]) > 3 * TOLERANCE


def test_an_edit_past_the_programs_range_is_refused(edit_plus):
    high = optimization.token_range(edit_plus.model)[1]
    side = 16 * math.ceil(math.sqrt(high))  # an output alone past the range's top
    with pytest.raises(optimization.UnsupportedShape, match=r"no compiled program for inputs .*compiled for: 64x64"):
        edit_plus.latents((_noise(64, 64),), Preset("off-preset", side, side))


# --- the app serving tiny-qwen-image-edit-plus through gradio_client ----------------------------------------------
@pytest.fixture(scope="session")
def edit_plus_app(edit_plus):
    """(app module, gradio client): app.py with MODEL_ID=tiny-qwen-image-edit-plus, loading `edit_plus`'s program."""
    yield from served_app("qwen-image-edit-plus", {"MODEL_ID": "tiny-qwen-image-edit-plus", "PRESETS": PRESET,
                                                   "AOT_CACHE_DIR": edit_plus.settings.cache_dir})


EDIT = dict(prompt=PROMPT, resolution="64x64", seed=7, randomize_seed=False, steps=STEPS, guidance=1.0)


def _saved(tmp_path, image: Image.Image, name: str) -> str:
    path = tmp_path / name
    image.save(path)
    return str(path)


def test_app_serves_several_images_refuses_too_many_and_serves_the_next(edit_plus_app, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    app, client = edit_plus_app
    status = client.predict(api_name="/status")
    assert status["compile_source"] == "loaded from cache"
    assert status["inputs"]["images"] == 3 and status["inputs"]["image_args"] == ["image", "image_2", "image_3"]
    assert status["inputs"]["image_required"] is True
    parameters = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/generate"]["parameters"]
    assert [p["parameter_name"] for p in parameters][-3:] == ["image", "image_2", "image_3"]
    first, second = _saved(tmp_path, _noise(300, 200), "a.png"), _saved(tmp_path, _noise(96, 160, 1), "b.png")
    path, seed, details = client.predict(**EDIT, image=handle_file(first), image_2=handle_file(second),
                                         api_name="/generate")
    with Image.open(path) as out:
        assert out.size == (64, 64)
    assert seed == 7 and "input 300x200 resized to 1248x832" in details
    assert "input_2 96x160 resized to 800x1312" in details
    with pytest.raises(AppError, match="edits an image: give at least 1 input image"):
        client.predict(**EDIT, api_name="/generate")
    upload = {"path": first}  # as Gradio hands an upload to the handler: a fourth image, past the family's three
    with pytest.raises(gr.Error, match="takes at most 3 input images; got 4"):
        app.generate(**EDIT, image=upload, image_2=upload, image_3=upload, image_4=upload)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"GIF89a not really")
    with pytest.raises(AppError, match="image_2: Not an image this Space reads"):
        client.predict(**EDIT, image=handle_file(first), image_2=handle_file(str(bad)), api_name="/generate")
    again, _, _ = client.predict(**EDIT, image=handle_file(first), image_2=handle_file(second), api_name="/generate")
    with Image.open(again) as one, Image.open(path) as other:
        assert one.tobytes() == other.tobytes()  # served again, the same edit


def test_readme_several_images_snippet_runs_as_written(edit_plus_app, monkeypatch):
    import re

    app, _ = edit_plus_app
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)
    [snippet] = [block for block in blocks if "image_2=handle_file(" in block]
    monkeypatch.chdir(ROOT)  # its pictures' paths are the repo's
    namespace = {}
    exec(compile(snippet.replace("http://127.0.0.1:7860/", app.demo.local_url), "README.md", "exec"), namespace)
    assert "input 128x128 resized to 1024x1024" in namespace["details"]
    assert "input_2 128x128 resized to 1024x1024" in namespace["details"]


def test_2511s_zero_timestep_for_references_matches_eager(tmp_path):
    """Qwen-Image-Edit-2511's transformer (`zero_cond_t`): the reference tokens are modulated at timestep 0, so each
    block takes a doubled `temb` and a `modulate_index` along the image tokens, which the block program's dynamic
    image axis must carry too (aot/families/qwen_image_edit.py `dynamic_spec`)."""
    settings = settings_for(model_id="tiny-qwen-image-edit-plus", presets=PRESET, aot_cache_dir=str(tmp_path))
    model = load_model(settings)
    transformer = model.pipe.transformer
    torch.manual_seed(0)
    model.pipe.register_modules(transformer=type(transformer).from_config(transformer.config, zero_cond_t=True).eval())
    images = (_noise(300, 200),)  # one reference: its 4096-odd tokens are what a CPU run can afford twice

    def latents():
        with torch.inference_mode():
            return model(PROMPT, model.presets[0], steps=STEPS, guidance=1.0, images=images, output_type="latent",
                         generator=torch.Generator().manual_seed(5)).images

    indexes = []
    block = model.pipe.transformer.transformer_blocks[0]
    hook = block.register_forward_pre_hook(lambda _, args, kwargs: indexes.append(kwargs["modulate_index"]),
                                           with_kwargs=True)
    eager = latents()
    hook.remove()
    inputs = sum(p.width * p.height // 256 for p in (model.input_preset(*image.size) for image in images))
    assert [index.shape[1] for index in indexes] == [16 + inputs] * STEPS and int(indexes[0].sum()) == inputs
    report = optimization.optimize_pipeline_(model, settings)
    assert report.compile == "aoti" and report.compile_scope == "blocks", report.fallbacks
    compiled = latents()
    assert torch.isfinite(compiled).all() and rel_err(compiled, eager) <= TOLERANCE
