"""Images in: every untrusted input image refused with what is allowed or converted as stated (aot/images.py), and
FLUX.1 Kontext (tiny-flux-kontext) compiled on CPU, matching eager with an input image at every preset, and served
by the app through gradio_client."""
import struct
import zlib

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image

import optimization
from aot import images
from aot.families.flux_kontext import FLUX_KONTEXT, PREFERRED
from aot.images import BadImage
from conftest import ROOT, Compiled, image_tokens_per_call, rel_err, served_app
from settings import Preset, parse_presets

TOLERANCE = 1e-4  # fp32, compiled vs eager, as tests/test_families.py
STEPS = 2


def _png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header that claims `width` x `height` pixels, with one tiny compressed row after it: a
    decompression bomb's shape, a few dozen bytes on disk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 4))
            + chunk(b"IEND", b""))


def _noise(mode: str = "RGB", size=(64, 48)) -> Image.Image:
    bands = len(Image.new(mode, (1, 1)).getbands())
    data = np.random.default_rng(0).integers(0, 256, (size[1], size[0], bands), dtype=np.uint8)
    return Image.fromarray(data.squeeze(-1) if bands == 1 else data, mode)


def _saved(tmp_path, image: Image.Image, name: str, **options) -> str:
    path = tmp_path / name
    image.save(path, **options)
    return str(path)


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes(b"just some text, not an image\n"), "Not an image this Space reads. Allowed formats: PNG"),
    (lambda p: p.write_bytes(_png_claiming(50_000, 50_000)), "claims more than 50,000,000 pixels"),
    (lambda p: p.write_bytes(_png_claiming(8_000, 8_000)), "claims more than 50,000,000 pixels"),  # PIL's warning
    (lambda p: _noise(size=(1, 1)).save(p, "PNG"), "1 x 1 pixels; each side must be at least 32"),
    (lambda p: _noise(size=(400, 40)).save(p, "PNG"), r"aspect ratio of 10.0:1; allowed: up to 4:1"),
    (lambda p: _noise().save(p, "TIFF"), "Allowed formats: PNG, JPEG"),  # a format Pillow reads, not served
])
def test_an_unservable_image_is_refused_with_what_is_allowed(tmp_path, make, message):
    path = tmp_path / "upload"
    make(path)
    with pytest.raises(BadImage, match=message):
        images.load(str(path))


def test_a_truncated_file_is_refused(tmp_path):
    whole = tmp_path / "whole.png"
    _noise(size=(128, 128)).save(whole)
    cut = tmp_path / "cut.png"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(BadImage, match="truncated or corrupt.*Upload the whole file"):
        images.load(str(cut))
    assert images.load(str(whole)).notes == ()  # the same file whole is served as it is


def _transparent(mode: str) -> Image.Image:
    """Half transparent (the left half), in `mode`."""
    image = _noise("RGBA")
    alpha = np.full((48, 64), 255, np.uint8)
    alpha[:, :32] = 0
    image.putalpha(Image.fromarray(alpha, "L"))
    return image.convert(mode) if mode != "RGBA" else image


@pytest.mark.parametrize("build, name, note", [
    (lambda: _noise("CMYK"), "cmyk.jpg", "CMYK converted to RGB (its colour profile not applied)"),
    (lambda: _noise().convert("P"), "palette.png", "palette (P) converted to RGB"),
    (lambda: _noise("L"), "grey.png", "L converted to RGB"),
    (lambda: Image.fromarray(np.full((48, 64), 65535, np.uint16)), "deep.png", "16-bit greyscale"),
    (lambda: _transparent("RGBA"), "rgba.png", "RGBA transparency composited on white"),
    (lambda: _transparent("LA"), "la.png", "LA transparency composited on white"),
    (lambda: _noise().convert("RGBA"), "opaque.png", "RGBA (fully opaque) converted to RGB"),
])
def test_other_modes_are_converted_to_rgb_and_say_so(tmp_path, build, name, note):
    checked = images.load(_saved(tmp_path, build(), name))
    assert checked.image.mode == "RGB" and checked.image.size == (64, 48)
    assert len(checked.notes) == 1 and checked.notes[0].startswith(note), checked.notes


def test_sixteen_bit_is_scaled_not_clipped_and_alpha_lands_on_white(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (48, 1))
    grey = np.asarray(images.load(_saved(tmp_path, Image.fromarray(ramp), "ramp.png")).image)
    assert grey[0, 0].tolist() == [0, 0, 0] and grey[0, -1].tolist() == [255, 255, 255]
    assert 100 < grey[0, 32, 0] < 155  # the middle of the ramp stays grey (Pillow's convert turns it white)
    rgb = np.asarray(images.load(_saved(tmp_path, _transparent("RGBA"), "rgba.png")).image)
    assert (rgb[:, :32] == 255).all()  # the transparent half is the stated white background
    palette = _transparent("RGBA").convert("P")  # a palette with a transparent entry
    checked = images.load(_saved(tmp_path, palette, "p.png", transparency=palette.getpixel((0, 0))))
    assert checked.notes == ("palette (P) converted to RGB", "transparency composited on white")


def test_exif_orientation_is_applied_and_said(tmp_path):
    image = _noise(size=(64, 40))
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    checked = images.load(_saved(tmp_path, image, "phone.jpg", exif=exif))
    assert checked.image.size == (40, 64) and checked.notes == ("EXIF orientation 6 applied",)


@pytest.mark.parametrize("name, fmt", [("anim.gif", "GIF"), ("anim.webp", "WEBP"), ("anim.png", "PNG")])
def test_an_animated_image_gives_its_first_frame_and_says_so(tmp_path, name, fmt):
    frames = [Image.new("RGB", (64, 48), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    path = _saved(tmp_path, frames[0], name, format=fmt, save_all=True, append_images=frames[1:], duration=100,
                  **({"lossless": True} if fmt == "WEBP" else {}))
    checked = images.load(path)
    assert checked.image.getpixel((10, 10)) == (255, 0, 0)
    assert checked.notes[0] == f"animated {fmt}: its first of 3 frames used"


def test_more_images_than_the_family_takes_are_refused():
    images.check_count(1, 1, "flux-kontext")
    with pytest.raises(BadImage, match="This flux model takes no input image; got 1."):
        images.check_count(1, 0, "flux")
    with pytest.raises(BadImage, match="takes at most 1 input image; got 2."):
        images.check_count(2, 1, "flux-kontext")
    with pytest.raises(BadImage, match="takes at most 3 input images; got 4."):
        images.check_count(4, 3, "qwen-image-edit-plus", 1)
    with pytest.raises(BadImage, match=r"edits an image: give at least 1 input image \(up to 3\); got 0."):
        images.check_count(0, 3, "qwen-image-edit-plus", 1)


# --- FLUX.1 Kontext: the family's resize mirrors the pipeline's; compiled equals eager with an input image --------
def test_kontext_presets_and_resize_are_the_pipelines_own():
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    assert list(PREFERRED) == PREFERRED_KONTEXT_RESOLUTIONS
    presets = parse_presets(FLUX_KONTEXT.presets, FLUX_KONTEXT.multiple)
    for width, height in [(1000, 1000), (4032, 3024), (3024, 4032), (1080, 1920), (500, 1300), (2000, 900), (37, 41)]:
        aspect = width / height  # FluxKontextPipeline.__call__'s choice with _auto_resize
        _, want_w, want_h = min((abs(aspect - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
        picked = FLUX_KONTEXT.image_size(width, height, presets)
        assert (picked.width, picked.height) == (want_w, want_h), (width, height)
    for preset in presets:  # pinned to the preset's area, the pipeline's output rescale keeps the preset
        area = FLUX_KONTEXT.call_args(preset.width, preset.height)["max_area"]
        aspect = preset.width / preset.height
        assert (round((area * aspect) ** 0.5), round((area / aspect) ** 0.5)) == (preset.width, preset.height)


def _edits(presets) -> dict[str, dict]:
    """Whole-pipeline runs: at each preset an edit whose input (5 times larger, another aspect ratio) is resized
    to the next preset; the largest edit (square on square: the range's top); text to image."""
    runs = {}
    for i, preset in enumerate(presets):
        ref = presets[(i + 1) % len(presets)]
        runs[f"edit at {preset.name}"] = dict(preset=preset, images=(_noise(size=(ref.width * 5, ref.height * 5)),))
    square = presets[0]
    runs["largest edit"] = dict(preset=square, images=(_noise(size=(square.width, square.height)),))
    runs["text to image"] = dict(preset=presets[-1])
    return runs


class KontextCompiled(Compiled):
    """tiny-flux-kontext after `optimize_pipeline_` (whole-model scope), its eager edits recorded before."""

    def __init__(self):
        super().__init__(model_id="tiny-flux-kontext", aot_scope="model")

    def check_model(self) -> None:
        assert self.model.family is FLUX_KONTEXT and self.model.presets == parse_presets(
            FLUX_KONTEXT.tiny_presets, FLUX_KONTEXT.multiple)

    def record_eager(self) -> None:
        self.runs = _edits(self.model.presets)
        self.eager_latents = {name: self.latents(**run) for name, run in self.runs.items()}

    def latents(self, preset: Preset, images=()) -> torch.Tensor:
        generator = torch.Generator().manual_seed(5)
        with torch.inference_mode():
            return self.model("make it blue", preset, steps=STEPS, generator=generator, output_type="latent",
                              images=images).images


@pytest.fixture(scope="session")
def kontext() -> KontextCompiled:
    return KontextCompiled()


def test_kontext_edits_match_eager_through_one_dynamic_program(kontext):
    model, report = kontext.model, kontext.report
    assert report.programs == [{"image_tokens": "15..32", "resolutions": ["64x64", "48x80", "80x48"]}]
    assert any(note.startswith("programs: one over a dynamic image-token range for flux-kontext") for note in
               report.notes)
    for name, run in kontext.runs.items():
        with image_tokens_per_call(model.pipe.transformer) as lengths:  # the output's and the input's
            latents = kontext.latents(**run)
        assert torch.isfinite(latents).all(), name
        assert rel_err(latents, kontext.eager_latents[name]) <= TOLERANCE, name
        preset, given = run["preset"], run.get("images", ())
        refs = [model.input_preset(*image.size) for image in given]  # known before the call
        expected = sum(FLUX_KONTEXT.image_tokens(p.width, p.height) for p in [preset, *refs])
        assert lengths == [expected] * STEPS, name
    # the input reached the transformer: the edit differs from text to image at the same preset
    edit = kontext.eager_latents[f"edit at {model.presets[-1].name}"]
    assert rel_err(edit, kontext.eager_latents["text to image"]) > 1e-3


def test_kontext_refuses_what_no_program_covers(kontext):
    with pytest.raises(optimization.UnsupportedShape, match=r"no compiled program for inputs .*compiled for: 64x64"):
        kontext.latents(Preset("off-preset", 160, 160))  # 100 tokens, over the range's 32


# --- the app serving tiny-flux-kontext through gradio_client ------------------------------------------------------
@pytest.fixture(scope="session")
def kontext_app(kontext):
    """(app module, gradio client): app.py with MODEL_ID=tiny-flux-kontext, loading `kontext`'s program."""
    yield from served_app("flux-kontext", {"MODEL_ID": "tiny-flux-kontext", "AOT_SCOPE": "model",
                                           "AOT_CACHE_DIR": kontext.settings.cache_dir})


EDIT = dict(prompt="make the cube blue", resolution="48x80", seed=7, randomize_seed=False, steps=STEPS, guidance=2.5)


def test_app_serves_an_edit_refuses_a_bad_image_and_serves_the_next(kontext_app, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    app, client = kontext_app
    status = client.predict(api_name="/status")
    assert status["compile_source"] == "loaded from cache" and status["inputs"]["images"] == 1
    assert status["inputs"]["max_pixels"] == images.MAX_PIXELS and status["inputs"]["formats"][0] == "PNG"
    assert status["inputs"]["image_args"] == ["image"] and status["inputs"]["image_required"] is False
    parameters = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/generate"]["parameters"]
    assert parameters[-1]["parameter_name"] == "image" and parameters[-1]["parameter_has_default"]  # as before
    photo = _transparent("RGBA").resize((96, 160))  # portrait, with alpha
    path, seed, details = client.predict(**EDIT, image=handle_file(_saved(tmp_path, photo, "in.png")),
                                         api_name="/generate")
    with Image.open(path) as out:
        assert out.size == (48, 80)
    assert seed == 7 and "RGBA transparency composited on white" in details
    assert "input 96x160 resized to 48x80" in details
    text_only, _, text_details = client.predict(**EDIT, api_name="/generate")  # no image: text to image
    assert "input" not in text_details and _pixels(text_only) != _pixels(path)
    for bad, message in [(_png_claiming(50_000, 50_000), "claims more than 50,000,000 pixels"),
                         (b"GIF89a not really", "Not an image this Space reads")]:
        upload = tmp_path / "bad.png"
        upload.write_bytes(bad)
        with pytest.raises(AppError, match=message):
            client.predict(**EDIT, image=handle_file(str(upload)), api_name="/generate")
    again, _, _ = client.predict(**EDIT, image=handle_file(_saved(tmp_path, photo, "in.png")), api_name="/generate")
    assert _pixels(again) == _pixels(path)  # served again, the same edit


def test_an_edit_example_brings_its_input_picture_and_makes_that_edit(kontext_app):
    app, _ = kontext_app
    rows = app._examples()
    assert rows[0] == [str(app.DEMO_THUMBNAILS / "example-1.png"), "make the circle blue"] == [
        str(app.DEMO_THUMBNAILS / app.EDIT_EXAMPLES[0][0]), app.EXAMPLES[0]]
    assert all(Image.open(picture).size == (128, 128) for picture, _ in rows)  # shipped, and in the allowed range
    path, seed, details = app.example((0, rows[0]), "48x80")
    with Image.open(path) as out:
        assert out.size == (48, 80)
    assert "input 128x128 resized to 64x64" in details  # the picture went in, resized to its nearest preset
    assert app.example((0, rows[0]), "48x80") == (path, seed, details + ", example shown again")


def _pixels(path: str) -> bytes:
    with Image.open(path) as image:
        return image.tobytes()


def test_a_text_only_family_has_no_image_input_and_refuses_one(app, client, tmp_path):
    assert app.FAMILY.max_images == 0 and client.predict(api_name="/status")["inputs"] == {"text": True, "images": 0}
    parameters = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/generate"]["parameters"]
    assert "image" not in [parameter["parameter_name"] for parameter in parameters]
    path, _, _ = client.predict(prompt="a lighthouse", resolution="48x80", steps=STEPS, api_name="/generate")
    assert _pixels(path)
    upload = {"path": _saved(tmp_path, _noise(), "in.png")}  # as Gradio hands an upload to the handler
    with pytest.raises(gr.Error, match="This flux model takes no input image; got 1."):
        app.generate(prompt="a lighthouse", resolution="48x80", steps=STEPS, image=upload)


def test_readme_edit_snippet_runs_as_written(kontext_app, monkeypatch):
    import re

    app, _ = kontext_app
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)
    [snippet] = [block for block in blocks if "handle_file(" in block and "image_2" not in block]  # Kontext's
    monkeypatch.chdir(ROOT)  # its picture's path is the repo's
    namespace = {}
    exec(compile(snippet.replace("http://127.0.0.1:7860/", app.demo.local_url), "README.md", "exec"), namespace)
    assert namespace["seed"] == 0 and "input 128x128 resized to 64x64" in namespace["details"]
