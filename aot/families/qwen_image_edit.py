"""Qwen-Image-Edit: `QwenImageEditPipeline` (one input image) and `QwenImageEditPlusPipeline` (2509, 2511: up to
three), Qwen-Image's transformer, text encoder and VAE. Everything but the inputs is Qwen-Image's.

Each input image enters twice. Its vision tokens (Qwen2.5-VL's vision tower) sit inside the text stream, so the text
length grows with the images: Qwen-Image's text axis is dynamic already, here up to the prompt's tokens and each
image's vision tokens at most (`image_text_tokens`). And its VAE latents are appended after the output's tokens, so
a call's image tokens are the output's plus each input's.

Programs: the transformer builds its rotary tables from `img_shapes`, a Python list of (frames, height, width) with
one entry per image (the output's, then each input's): a whole-model program would bake that list in, one program
per combination of output preset and input sizes. Qwen-Image compiles its blocks alone already (`regional_only`);
blocks take the tables as tensors, so one block program with a dynamic image-token axis (and the dynamic text axis)
serves every edit, whatever the list. The pipeline resizes each input itself to about 1 MP at its aspect ratio,
with no argument to turn that off (`resizes_inputs`); `image_size` mirrors its rule, so the range of the program,
and a call's tokens, are known before the call, and the dispatcher refuses what it does not cover."""
from __future__ import annotations

import dataclasses
import math

from aot.families import qwen_image
from aot.families.qwen_image import QWEN_IMAGE
from settings import Preset

# The pipelines' VAE_IMAGE_SIZE (diffusers 0.42.1): each input's area for its latents, whatever the output's size;
# Edit hands the vision tower the same image, Edit Plus one of CONDITION_IMAGE_SIZE
INPUT_AREA = 1024 * 1024
CONDITION_AREA = 384 * 384
VISION = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>")  # Qwen2.5-VL's markers
# Around each image's vision tokens in the text: "Picture N: " and the start and end markers (EditPlus; Edit has
# the markers alone), in Qwen's vocabulary about 5 tokens; bounded here by its characters, which the tiny tokenizer
# spells a byte each at worst
WRAPPER_TOKENS = len("Picture 3: ") + 2
WHY_DYNAMIC = ("an edit's tokens are its output's plus each input image's, at the size the pipeline resizes it to; "
               "and the transformer's img_shapes list has an entry per image: one block program over the range")


def calculate_dimensions(width: int, height: int) -> tuple[int, int]:
    """The pipelines' `calculate_dimensions(VAE_IMAGE_SIZE, width / height)`: about 1 MP at the input's aspect
    ratio, each side rounded to 32 pixels (test: the same as diffusers')."""
    ratio = width / height
    side = math.sqrt(INPUT_AREA * ratio)
    return round(side / 32) * 32, round(side / ratio / 32) * 32


def input_size(width: int, height: int, presets: tuple) -> Preset:
    """The size the pipeline resizes an input of `width` x `height` to, named as a resolution: not one of the
    presets (`presets` unused), since the pipeline picks it from the input alone."""
    w, h = calculate_dimensions(width, height)
    return Preset(f"{w}x{h}", w, h)


def vision_tokens(area: int):
    """Vision tokens one input adds to the text at most, where the pipeline hands the processor the input at about
    `area` pixels: that area, or the processor's pixel cap if lower, over the pixels per token (14-pixel patches
    merged 2x2), a row and a column more for each of the two roundings of its sides (to 32 pixels by the pipeline,
    to 28 by the processor) at up to 4:1, and the words around them."""
    def image_text_tokens(pipe) -> int:
        processor = pipe.processor.image_processor
        token = processor.patch_size * processor.merge_size
        pixels = min(area, processor.size["longest_edge"])  # the processor's max_pixels
        rounding = 2 * math.ceil(2.5 * math.sqrt(pixels) / token + 1)  # 2.5 sqrt(pixels): both sides at 4:1
        return pixels // token**2 + rounding + WRAPPER_TOKENS

    return image_text_tokens


def dynamic_spec(kwargs: dict, dim, text: int) -> dict:
    """A block's image-token axis: the image stream, its half of the rotary table, and with 2511's zero_cond_t its
    modulation index. The text axis, whose tables are apart from the image's (`text` unused), comes from Qwen-Image's
    `text_spec` (aot/programs.py merges the two)."""
    import torch

    spec = torch.utils._pytree.tree_map(lambda _: None, kwargs)
    spec["hidden_states"] = {1: dim}
    spec["image_rotary_emb"] = ({0: dim}, None)
    if kwargs.get("modulate_index") is not None:
        spec["modulate_index"] = {1: dim}
    return spec


def _build(pipeline_class):
    """tiny-qwen-image's transformer, text encoder (with its tiny vision tower) and VAE in `pipeline_class`, with a
    Qwen2-VL processor built offline: the tiny tokenizer with the vision markers, and an image processor capped at
    16 vision tokens per image (Qwen's own allows thousands)."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    base = qwen_image.build_tiny().components
    pipe = pipeline_class(processor=None, **base)
    qwen_image.fit_tokenizer_(pipe, VISION)
    config = pipe.text_encoder.config
    ids = {name: pipe.tokenizer.convert_tokens_to_ids(token) for name, token in zip(
        ("vision_start_token_id", "image_token_id", "vision_end_token_id", "video_token_id"), VISION)}
    for name, token_id in ids.items():  # the vision tower's embeddings replace these ids in the text
        setattr(config, name, token_id)
    side = 14 * 2  # a patch of 14 pixels, merged 2x2 into one token
    images = Qwen2VLImageProcessor(min_pixels=side * side, max_pixels=16 * side * side)
    pipe.register_modules(processor=Qwen2VLProcessor(image_processor=images, tokenizer=pipe.tokenizer,
                                                     video_processor=Qwen2VLVideoProcessor()))
    return pipe


def build_tiny_edit():
    from diffusers import QwenImageEditPipeline

    return _build(QwenImageEditPipeline)


def build_tiny_edit_plus():
    from diffusers import QwenImageEditPlusPipeline

    return _build(QwenImageEditPlusPipeline)


QWEN_IMAGE_EDIT = dataclasses.replace(
    QWEN_IMAGE,
    name="qwen-image-edit",
    pipelines=("QwenImageEditPipeline",),
    build_tiny=build_tiny_edit,
    max_images=1,
    min_images=1,  # the pipeline reads its output size from the input: it draws nothing without one
    image_size=input_size,
    resized_to="the pipeline's own size for its aspect ratio (about 1 MP)",
    resizes_inputs=True,
    image_text_tokens=vision_tokens(INPUT_AREA),
    dynamic_spec=dynamic_spec,
    dynamic_tokens=WHY_DYNAMIC,
)
QWEN_IMAGE_EDIT_PLUS = dataclasses.replace(
    QWEN_IMAGE_EDIT,
    name="qwen-image-edit-plus",
    pipelines=("QwenImageEditPlusPipeline",),
    build_tiny=build_tiny_edit_plus,
    max_images=3,  # the model card's: best with one to three input images
    image_text_tokens=vision_tokens(CONDITION_AREA),
)
