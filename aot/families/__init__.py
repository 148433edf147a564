"""Model families: everything that differs between FLUX.1, FLUX.2, Qwen-Image, Z-Image, Wan, ... lives here.

Adding a family is one file in this folder that defines one `Family(...)` (its types: aot/family.py) and lists it
in `FAMILIES` below. The rest of the template reads these entries and nothing else about a model.
"""
from __future__ import annotations

from aot.families.flux import FLUX
from aot.families.flux2 import FLUX2, FLUX2_KLEIN
from aot.families.flux_kontext import FLUX_KONTEXT
from aot.families.ltx2 import LTX2, LTX2_I2V
from aot.families.qwen_image import QWEN_IMAGE
from aot.families.qwen_image_edit import QWEN_IMAGE_EDIT, QWEN_IMAGE_EDIT_PLUS
from aot.families.wan import WAN, WAN_5B, WAN_I2V
from aot.families.z_image import Z_IMAGE
from aot.family import Defaults, Family, Guidance, RealSize, Text, Video

__all__ = ["FAMILIES", "Defaults", "Family", "Guidance", "RealSize", "Text", "Video", "family_named"]

FAMILIES: tuple[Family, ...] = (FLUX, FLUX_KONTEXT, FLUX2, FLUX2_KLEIN, QWEN_IMAGE, QWEN_IMAGE_EDIT,
                                QWEN_IMAGE_EDIT_PLUS, Z_IMAGE, WAN, WAN_5B, WAN_I2V, LTX2,
                                LTX2_I2V)


def family_named(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise SystemExit(f"MODEL_ID=tiny-{name}: no such family. Tiny pipelines: "
                     + ", ".join(f"tiny-{f.name}" for f in FAMILIES))
