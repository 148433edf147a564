"""Input images are untrusted: `load` checks one file and normalises it to an RGB image, stating every conversion;
anything it cannot serve raises `BadImage` with what is allowed. Pure: it reads the file it is given (a path in
Gradio's own cache) and writes nothing."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

# The formats decoded at all: what phones, browsers and screenshots make. Pillow would open dozens more, and some
# of them hand the file to other programs (EPS to Ghostscript); an upload never reaches those.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # JPEG includes MPO, some cameras' multi-picture JPEGs
# Pixels an input may claim, read from its header before anything is decoded: a 48-megapixel phone photo
# (8064x6048) fits; decoded with alpha it is 200 MB of host memory, and one request runs at a time. A few-kB file
# claiming 50,000 x 50,000 pixels (a decompression bomb: 10 GB decoded) is refused unread.
MAX_PIXELS = 50_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # Pillow's own guard, at open, in this whole process: the one check of it
# The pipeline resizes an input to a ~1 MP resolution of its aspect ratio: a side under this carries too little to
# edit (a 1x1 image is a colour), and past this aspect ratio the nearest preset (Kontext's widest is 1568x672,
# 2.33:1) distorts the picture past use.
MIN_SIDE = 32
MAX_ASPECT = 4.0
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white, as a page shows them
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I")  # greyscale above 8 bits: Pillow opens 16-bit PNGs as "I" or "I;16"


class BadImage(ValueError):
    """An input image this Space does not serve; the message says what is allowed."""


@dataclass(frozen=True)
class Checked:
    image: Image.Image  # RGB, upright, decoded
    notes: tuple[str, ...]  # each conversion made, for the image's details


def check_count(given: int, most: int, family: str, least: int = 0, video: bool = False) -> None:
    """Refuses more input images than the family takes, or fewer than it needs (a `video` family: its first frame)."""
    if given > most:
        allowed = "no input image" if most == 0 else f"at most {most} input image{'s' if most > 1 else ''}"
        raise BadImage(f"This {family} model takes {allowed}; got {given}.")
    if given < least:
        raise BadImage(f"This {family} model {'makes its video from' if video else 'edits'} an image: give at least "
                       f"{least} input image"
                       f"{'s' if least > 1 else ''} (up to {most}); got {given}.")


def load(path: str, min_side: int = MIN_SIDE) -> Checked:
    """The image at `path`, checked by its header (each side at least `min_side`), then decoded (its first frame),
    turned upright by its EXIF orientation and converted to RGB."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # over MAX_PIXELS: refused below
            image = Image.open(path, formats=FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage(f"The image claims more than {MAX_PIXELS:,} pixels; the limit is {MAX_PIXELS:,} "
                       "(about 8000 x 6000).") from None
    except UnidentifiedImageError:
        raise BadImage(f"Not an image this Space reads. Allowed formats: {', '.join(FORMATS)}.") from None
    with image:
        _check_size(*image.size, min_side)
        notes = []
        frames = getattr(image, "n_frames", 1)
        if frames > 1:
            notes.append(f"animated {image.format}: its first of {frames} frames used")
        try:
            image.load()
        except (OSError, SyntaxError, ValueError) as err:  # Pillow's words for a truncated or corrupt file
            raise BadImage(f"The image file is truncated or corrupt ({err}). Upload the whole file.") from None
        try:
            orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
            if orientation != 1:
                image = ImageOps.exif_transpose(image)
        except Exception as err:  # noqa: BLE001 - any unreadable EXIF block means the same to the user
            raise BadImage(f"The image's EXIF data is corrupt ({type(err).__name__}). Save it again without it.") \
                from None
        if orientation != 1:
            notes.append(f"EXIF orientation {orientation} applied")
        return Checked(_rgb(image, notes), tuple(notes))


def _check_size(width: int, height: int, min_side: int) -> None:
    """The header's size (its pixels: Pillow's guard, at MAX_PIXELS, refused those on opening)."""
    if min(width, height) < min_side:
        raise BadImage(f"The image is {width} x {height} pixels; each side must be at least {min_side}.")
    if max(width, height) / min(width, height) > MAX_ASPECT:
        raise BadImage(f"The image is {width} x {height} pixels, an aspect ratio of "
                       f"{max(width, height) / min(width, height):.1f}:1; allowed: up to {MAX_ASPECT:g}:1.")


def _rgb(image: Image.Image, notes: list[str]) -> Image.Image:
    """`image` in RGB, each conversion added to `notes`."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in SIXTEEN_BIT:  # Pillow's own conversion clips at 255 (most of a 16-bit image turns white): scaled
        scaled = (np.asarray(image, dtype=np.float64) / 257).clip(0, 255).round().astype(np.uint8)
        notes.append(f"16-bit greyscale ({mode}) scaled to 8-bit RGB")
        return Image.fromarray(scaled, "L").convert("RGB")
    if mode == "P":  # a palette's transparency, if any, becomes alpha first
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        notes.append("palette (P) converted to RGB")
        if image.mode == "RGB":
            return image
    elif mode in ("LA", "La", "PA", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        alpha = image.getchannel("A")
        if alpha.getextrema()[0] < 255:
            background = Image.new("RGB", image.size, BACKGROUND)
            background.paste(image.convert("RGB"), mask=alpha)
            notes.append(f"{'' if mode == 'P' else mode + ' '}transparency composited on white".lstrip())
            return background
        if mode != "P":
            notes.append(f"{mode} (fully opaque) converted to RGB")
        return image.convert("RGB")
    try:
        converted = image.convert("RGB")
    except ValueError as err:
        raise BadImage(f"Image mode {mode} cannot be served ({err}). Save it as 8-bit RGB.") from None
    notes.append(f"{mode} converted to RGB{' (its colour profile not applied)' if mode == 'CMYK' else ''}")
    return converted
