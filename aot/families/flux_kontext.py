"""FLUX.1 Kontext [dev]: `FluxKontextPipeline`, FLUX.1's transformer, text encoders and VAE, editing an input image.

The input image's latent tokens are appended after the output's (ids marked 1 in their first axis), so a call sees
output tokens + reference tokens; the text stays at its padded length. Everything but the inputs is FLUX.1's."""
from __future__ import annotations

import dataclasses

from aot.families import flux
from aot.family import Defaults

# FluxKontextPipeline's PREFERRED_KONTEXT_RESOLUTIONS (diffusers 0.42.1), the sizes Kontext was trained at, all about
# 1 MP: written out here, since the family entries are read before diffusers is imported (test: the same list)
PREFERRED = ((672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
             (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688),
             (1568, 672))
# Why one program: an edit's image tokens are its output's plus its input's, each at one of the 17 sizes above
# (4042 to 4150 tokens): 42 different sums, and 9 more for text to image. Static programs would be 51 compiles at a
# cold start (FLUX's is minutes each on an H100); one program over the whole range, 4042..8300 tokens, is one, and
# the guide's Kontext Space does the same. The dispatcher refuses any call outside the range.
WHY_DYNAMIC = ("an edit's tokens are its output's plus its input image's, each at any preset: one program over the "
               "range rather than one per sum")


def defaults(pipe) -> Defaults:
    return dataclasses.replace(flux.defaults(pipe), guidance=2.5)  # the model card's and diffusers' examples' value


def nearest_preset(width: int, height: int, presets: tuple):
    """The preset an input image of `width` x `height` is resized to: as `FluxKontextPipeline.__call__` picks among
    its preferred resolutions with `_auto_resize` (the smallest difference in aspect ratio, ties to the narrower),
    here among the served presets, which are those resolutions unless PRESETS says otherwise."""
    aspect = width / height
    return min(presets, key=lambda p: (abs(aspect - p.width / p.height), p.width, p.height))


def call_args(width: int, height: int) -> dict:
    """The pipeline rescales its output to `max_area` (1 MP unless given) at the asked aspect ratio: pinned to the
    preset's own area, the output is the preset. Its own resize of the input, to its 1 MP list, is turned off: the
    input comes resized to a served preset (`nearest_preset`), which the programs cover."""
    return {"max_area": width * height, "_auto_resize": False}


def build_tiny():
    """tiny-flux's components in a FluxKontextPipeline: the same transformer, text encoders and VAE."""
    from diffusers import FluxKontextPipeline

    return FluxKontextPipeline(**flux.build_tiny().components)


FLUX_KONTEXT = dataclasses.replace(
    flux.FLUX,
    name="flux-kontext",
    pipelines=("FluxKontextPipeline",),
    presets=",".join(f"{w / h:.2f}:1={w}x{h}" for w, h in PREFERRED),
    tiny_presets="square=64x64,portrait=48x80,landscape=80x48",  # 16, 15 and 15 tokens; an edit, up to 32
    defaults=defaults,
    build_tiny=build_tiny,
    max_images=1,
    image_size=nearest_preset,
    resized_to="the resolution nearest its aspect ratio",
    call_args=call_args,
    dynamic_tokens=WHY_DYNAMIC,
)
