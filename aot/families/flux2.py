"""FLUX.2: [dev] (Mistral 3 text encoder, embedded guidance) and [klein] (Qwen3 text encoder; distilled or base).

Both share `Flux2Transformer2DModel` and its VAE: 8x downsampling, then 2x2 patches, so 16 px per image token
as in FLUX.1. Image positions reach the transformer as id tensors (`img_ids`), so presets with equal token
counts share a program. Both pipelines pad the prompt to `max_sequence_length` and the transformer gets no
text mask, so the padding is part of the input: one fixed text length.

Both draw from the prompt alone, or take reference images (`image`, a list). Each reference's latent tokens are
appended after the output's, its ids set apart by a time offset (10, 20, ... in their first axis), so a call's image
tokens are the output's plus each reference's, at the size the pipeline gives it (`reference_size`, which mirrors it);
the text stays at its padded length. The pipelines resize references themselves, in the same code in both.
"""
from __future__ import annotations

import math

from aot.family import Defaults, Family, Guidance, RealSize, Text
from settings import Preset

PRESETS = "square=1024x1024,portrait=832x1216,landscape=1216x832"
TINY_PRESETS = "square=64x64,portrait=48x80,landscape=80x48"  # 16, 15 and 15 image tokens
MULTIPLE = 16

# How many references: BFL's editing guide (docs.bfl.ai, "Reference images per model") recommends at most 6 for [dev]
# and takes up to 4 for [klein] 4B and 9B; diffusers' pipelines set no limit. Each reference of about 1 MP adds 4096
# tokens, so [dev]'s largest edit carries 7 x 4096 = 28672 image tokens, [klein]'s 20480.
MAX_REFERENCES_DEV = 6
MAX_REFERENCES_KLEIN = 4
# The pipelines' resize of a reference (diffusers 0.42.1): scaled down to this area (`_resize_to_target_area`) when
# larger, then each side cut down to a multiple of 16 by a centred crop; a smaller one is only cut
REFERENCE_AREA = 1024 * 1024
MIN_REFERENCE_SIDE = 64  # `Flux2ImageProcessor.check_image_input` refuses a smaller side
# Why one program: an edit's tokens are the output's plus up to 6 references' of any size up to 1 MP, each cut to whole
# tokens: thousands of sums. One program over the range (the smallest preset alone to the largest with every
# reference at 1 MP) is one compile; the dispatcher refuses a call outside it.
WHY_DYNAMIC = ("an edit's tokens are its output's plus each reference image's, at the size the pipeline gives it: "
               "one program over the range rather than one per sum")

# Text tokens of the tiny pipelines, which their tokenizers declare as `model_max_length`: fewer text tokens
# make a smaller transformer call. Real tokenizers declare far more, so real checkpoints get the pipelines' 512.
TINY_TEXT_TOKENS = 128


def _max_text(pipe) -> int:
    tokenizer = getattr(pipe.tokenizer, "tokenizer", pipe.tokenizer)  # [dev]'s is a processor around it
    return min(pipe.tokenizer_max_length, tokenizer.model_max_length)


def _dev_defaults(pipe) -> Defaults:
    # BFL's recipe for [dev], also the pipeline's defaults: 50 steps, guidance 4 fed to the transformer as an
    # embedding (a transformer without the guidance embedder would ignore it)
    kind = Guidance.EMBEDDED if pipe.transformer.config.guidance_embeds else Guidance.NONE
    return Defaults(steps=50, guidance=4.0, guidance_kind=kind, max_sequence_length=_max_text(pipe))


def _klein_defaults(pipe) -> Defaults:
    if pipe.config.is_distilled:  # klein 4B/9B: step-distilled, the pipeline ignores guidance
        return Defaults(steps=4, guidance=1.0, guidance_kind=Guidance.NONE, max_sequence_length=_max_text(pipe))
    # klein base: true CFG, a second transformer call on the empty prompt when guidance > 1
    return Defaults(steps=50, guidance=4.0, guidance_kind=Guidance.CFG, max_sequence_length=_max_text(pipe))


def reference_size(width: int, height: int, presets: tuple) -> Preset:
    """The size both pipelines give a reference image of `width` x `height`, named as a resolution (`presets` unused:
    the pipeline picks it from the input alone); test: the same as diffusers' at 1:4 to 4:1."""
    if width * height > REFERENCE_AREA:  # `_resize_to_target_area`'s own arithmetic
        scale = math.sqrt(REFERENCE_AREA / (width * height))
        width, height = int(width * scale), int(height * scale)
    width, height = width - width % MULTIPLE, height - height % MULTIPLE
    return Preset(f"{width}x{height}", width, height)


def dynamic_spec(kwargs: dict, dim, text: int) -> dict:
    """The image-token axis of a captured call: the whole transformer's image stream and ids (batch, tokens, 4); a
    block's rotary tables, which hold the `text` tokens before the image's; a double block's image stream, or a single
    block's stream, the text and the image in one."""
    import torch

    spec = torch.utils._pytree.tree_map(lambda _: None, kwargs)
    if "img_ids" in kwargs:
        spec["hidden_states"] = spec["img_ids"] = {1: dim}
        return spec
    both = dim + text
    spec["image_rotary_emb"] = ({0: both}, {0: both})
    spec["hidden_states"] = {1: both if kwargs["encoder_hidden_states"] is None else dim}
    return spec


def _dev_prompt_tokens(pipe, prompt: str) -> int:
    # The pipeline's own chat formatting (system message included), without its padding and truncation.
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input

    messages = format_input([prompt], system_message=pipe.system_message)
    ids = pipe.tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=True, return_dict=True)
    return len(ids["input_ids"][0])


def _klein_prompt_tokens(pipe, prompt: str) -> int:
    text = pipe.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                              add_generation_prompt=True, enable_thinking=False)
    return len(pipe.tokenizer(text)["input_ids"])


# ---------------------------------------------------------------------------------------------------
# Tiny random-weight pipelines: same classes and code paths as the real ones, noise for images.
# ---------------------------------------------------------------------------------------------------
TEXT_WIDTH = 16  # the pipelines stack 3 hidden layers of the text encoder: the transformer reads 3x this


def _tiny_transformer(guidance_embeds: bool):
    from diffusers import Flux2Transformer2DModel

    # 4 rope axes (time, height, width, sequence) must add up to the head dim
    return Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=3 * TEXT_WIDTH, axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=guidance_embeds,
    )


def _tiny_vae():
    from diffusers import AutoencoderKLFlux2

    # four blocks keep the real 8x factor; 4 latent channels become the transformer's 16 after 2x2 patching
    return AutoencoderKLFlux2(
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
        sample_size=64,
    )


def _text_layers(hidden_states_layers) -> dict:
    # The pipelines read fixed hidden-state indices ((10, 20, 30) for [dev], (9, 18, 27) for klein) unless the
    # caller passes `text_encoder_out_layers`, so the tiny encoder is deep enough for them, and narrow.
    return dict(hidden_size=TEXT_WIDTH, intermediate_size=32, num_hidden_layers=max(hidden_states_layers),
                num_attention_heads=2, num_key_value_heads=1, head_dim=8)


def _byte_vocab(specials: list[str]) -> dict[str, int]:
    # Byte-level BPE with no merges: every byte of any prompt is one token, so nothing is ever unknown. It sees
    # bytes through printable stand-ins (a space is "Ġ"), hence this alphabet rather than tokens.byte_vocabulary.
    from tokenizers import pre_tokenizers

    return {tok: i for i, tok in enumerate([*specials, *sorted(pre_tokenizers.ByteLevel.alphabet())])}


def build_tiny_dev():
    """Flux2Pipeline with a Mistral 3 text encoder, whose Pixtral vision tower is one layer of width 16.

    The real [dev] tokenizer is a PixtralProcessor, which transformers only builds with torchvision; the
    pipeline only calls `apply_chat_template` on it, which a plain tokenizer has, so the tiny one is that.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig,
                              PixtralVisionConfig, PreTrainedTokenizerFast)

    specials = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[IMG]"]
    vocab = _byte_vocab(specials)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>", model_max_length=TINY_TEXT_TOKENS)
    tokenizer.add_special_tokens({"additional_special_tokens": specials[4:]})
    # Mistral's layout minus the system message, which byte by byte would fill more than the 128 tokens.
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages if m.role == 'user' %}[INST]"
        "{% for part in m.content if part.type == 'text' %}{{ part.text }}{% endfor %}[/INST]{% endfor %}"
    )

    text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(
        text_config=MistralConfig(vocab_size=len(vocab), pad_token_id=vocab["<pad>"], **_text_layers((10, 20, 30))),
        vision_config=PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, head_dim=8, image_size=32, patch_size=16),
        image_token_index=vocab["[IMG]"],
    ))
    return Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=_tiny_vae(),
        text_encoder=text_encoder, tokenizer=tokenizer, transformer=_tiny_transformer(guidance_embeds=True),
    )


def build_tiny_klein():
    """Flux2KleinPipeline with a Qwen3 text encoder, the base (non-distilled) kind so that CFG is exercised."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from transformers import Qwen2TokenizerFast, Qwen3Config, Qwen3ForCausalLM

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    vocab = _byte_vocab(specials)
    tokenizer = Qwen2TokenizerFast(vocab=vocab, merges=[], model_max_length=TINY_TEXT_TOKENS)
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    # Qwen3's layout, including the empty thinking block it writes when thinking is off
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
    )

    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(vocab), pad_token_id=vocab["<|endoftext|>"], eos_token_id=vocab["<|im_end|>"],
        tie_word_embeddings=True, **_text_layers((9, 18, 27)),
    ))
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=_tiny_vae(),
        text_encoder=text_encoder, tokenizer=tokenizer, transformer=_tiny_transformer(guidance_embeds=False),
        is_distilled=False,
    )


# As released, as we read the published configs. The pipelines pad prompts to 512 tokens; the tiny tokenizers stop at
# TINY_TEXT_TOKENS.
REAL_SIZE_DEV = RealSize(
    params_b=32.2,
    transformer=dict(patch_size=1, in_channels=128, num_layers=8, num_single_layers=48, attention_head_dim=128,
                     num_attention_heads=48, joint_attention_dim=15360, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32),
                     guidance_embeds=True),
    text_encoders={"text_encoder": {  # Mistral Small 3.1 24B, with its Pixtral vision tower (unused for text)
        None: dict(tie_word_embeddings=False),  # its own output head, as released (the tiny one ties it)
        "text_config": dict(hidden_size=5120, intermediate_size=32768, num_hidden_layers=40, num_attention_heads=32,
                            num_key_value_heads=8, head_dim=128, vocab_size=131072),
        "vision_config": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              head_dim=64)}},
    text_tokens=512,
)
QWEN3_4B = {None: dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True)}
REAL_SIZE_KLEIN = RealSize(  # [klein] 4B, step-distilled (the tiny pipeline is klein base)
    params_b=3.9,
    transformer=dict(patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
                     num_attention_heads=24, joint_attention_dim=7680, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32),
                     guidance_embeds=False),
    text_encoders={"text_encoder": QWEN3_4B},
    pipeline=dict(is_distilled=True),
    text_tokens=512,
)

# What both take as reference images (their own resize, as it is: `resizes_inputs`), and one program for every edit
REFERENCES = dict(
    image_size=reference_size, resizes_inputs=True, input_area=REFERENCE_AREA, min_image_side=MIN_REFERENCE_SIDE,
    resized_to="its own size if at most 1 MP, else scaled down to 1 MP; each side cut to a multiple of 16",
    dynamic_spec=dynamic_spec, dynamic_tokens=WHY_DYNAMIC,
)

FLUX2 = Family(
    name="flux2", pipelines=("Flux2Pipeline",), presets=PRESETS, tiny_presets=TINY_PRESETS, multiple=MULTIPLE,
    text=Text.FIXED, defaults=_dev_defaults, build_tiny=build_tiny_dev, prompt_tokens=_dev_prompt_tokens,
    step_cost=3.0,  # 32B: 548.9 ms a step eagerly against FLUX.1-dev's 182.8 (RESULTS.md run 12)
    max_images=MAX_REFERENCES_DEV, **REFERENCES,
    real_size=REAL_SIZE_DEV,
)

# klein base does CFG against the empty prompt, hard-coded in the pipeline: no argument takes a negative prompt as
# text (only `negative_prompt_embeds`, a tensor), hence no `negative_prompt_arg`.
FLUX2_KLEIN = Family(
    name="flux2-klein", pipelines=("Flux2KleinPipeline",), presets=PRESETS, tiny_presets=TINY_PRESETS,
    multiple=MULTIPLE, text=Text.FIXED, defaults=_klein_defaults, build_tiny=build_tiny_klein,
    prompt_tokens=_klein_prompt_tokens,
    step_cost=0.6,  # the 4B: 82.3 ms, 0.45 of FLUX.1-dev's (RESULTS.md run 12); rounded up for the 9B, not measured
    max_images=MAX_REFERENCES_KLEIN, **REFERENCES,
    real_size=REAL_SIZE_KLEIN,
)
