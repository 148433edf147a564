"""Images in: every untrusted input image refused with what is allowed or converted as stated (aot/images.py), and
FLUX.1 Kontext (tiny-flux-kontext) compiled on CPU, matching eager with an input image at every preset, and served
by the app through gradio_client."""
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from aot import images
from aot.images import BadImage


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
