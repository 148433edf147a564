"""Qwen-Image: an MMDiT on Qwen2.5-VL prompt embeddings, with true classifier-free guidance."""
from __future__ import annotations

import re

from aot.family import Defaults, Family, Guidance, RealSize, Text

# The VAE downsamples 8x and the transformer packs 2x2 latent patches into one token.
MULTIPLE = 16


def defaults(pipe) -> Defaults:
    # 512 text tokens, the pipeline's default (it accepts up to 1024)
    return Defaults(steps=50, guidance=4.0, guidance_kind=Guidance.CFG, max_sequence_length=512)


def text_spec(args: tuple, kwargs: dict, length: int) -> dict:
    """A block's text axis, dynamic: the prompt embeddings and the text half of the rotary table.

    Not the whole transformer: its rotary tables are cached per text length as a Python int, so torch.export
    fixes the length (measured on CPU: "specialized it to be a constant"). Padding to a fixed length instead
    is exact (the mask hides it), but a masked attention call costs the fast kernels: 376.8 against 321.6 ms
    per eager step on an H100 at 1328x1328 (benchmarks/RESULTS.md, run 12)."""
    import torch

    text = torch.export.Dim("text_tokens", min=1, max=length)
    spec = torch.utils._pytree.tree_map(lambda _: None, kwargs)
    spec["encoder_hidden_states"] = {1: text}
    spec["image_rotary_emb"] = (None, {0: text})
    return spec


def prompt_tokens(pipe, prompt: str) -> int:
    # What the transformer sees: the prompt inside the template (its edges may merge differently than alone)
    # less the dropped system part, so the template's tail (5 tokens in Qwen's vocabulary) counts too
    ids = pipe.tokenizer(pipe.prompt_template_encode.format(prompt))["input_ids"]
    return len(ids) - pipe.prompt_template_encode_start_idx


def _tokenizer(words=()):
    """A byte-level BPE tokenizer: all 256 byte symbols are tokens, plus merges that make each of `words`
    (byte-level pieces) one token, as Qwen's 150k vocabulary does for the template's common words."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens, merges = [*specials, *sorted(pre_tokenizers.ByteLevel.alphabet())], []
    for word in words:
        for end in range(2, len(word) + 1):  # grow each word one symbol at a time: "Ġt"+"h", "Ġth"+"e"
            if word[:end] not in tokens:
                tokens.append(word[:end])
                merges.append((word[:end - 1], word[end - 1]))
    tokenizer = Qwen2Tokenizer(vocab={tok: i for i, tok in enumerate(tokens)}, merges=merges)
    tokenizer.add_tokens(specials[1:], special_tokens=True)  # matched whole, before the byte-level split
    return tokenizer


def build_tiny():
    """A Qwen-Image pipeline with random weights and every part tiny, built offline. Its images are noise."""
    import torch
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    hidden = 32
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=hidden, axes_dims_rope=(4, 6, 6),  # the rope axes split the head dim
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(vocab_size=512, hidden_size=hidden, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         # multimodal rope: its three sections split half the head dim (8), as 16/24/24 do 64
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                         bos_token_id=0, eos_token_id=2, pad_token_id=0),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=hidden,
                           fullatt_block_indexes=[0]),
        image_token_id=509, video_token_id=510, vision_start_token_id=508, vision_end_token_id=511,
    ))
    # Three temporal-downsample flags: the 8x spatial factor, as the real VAE; 16 latent channels.
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True, True])
    torch.random.set_rng_state(generator_state)
    for module in (transformer, text_encoder, vae):
        module.eval()  # built from configs, they start in training mode: dropout would make outputs random
    # The pipeline always passes `mu` (resolution-dependent shift) to the scheduler, which needs dynamic shifting.
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=_tokenizer(),
                             transformer=transformer)
    fit_tokenizer_(pipe)
    return pipe.to(torch.float32)


def fit_tokenizer_(pipe, specials=()) -> None:
    """Gives `pipe` a tiny tokenizer that makes its template's system part exactly the tokens the pipeline drops
    (`prompt_template_encode_start_idx`), as Qwen's does: the template's words single tokens. `specials`: more
    tokens matched whole (Qwen-Image-Edit's vision markers)."""
    # The pipeline drops the template's first `prompt_template_encode_start_idx` tokens (its system part, and an
    # edit's "user" line up to its image): give the template's words single tokens so that this part has exactly
    # that many, as with Qwen's.
    prefix = pipe.prompt_template_encode.split("{}")[0]
    pieces = [piece for chunk in re.split(r"<\|\w+\|>", prefix)
              for piece, _ in pipe.tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(chunk)]
    words = [p for p in pieces if len(p) > 1] + ["assistant"]
    # words after a space ("Ġcolor") first: a merge of two bare letters made earlier ("c", "o" for "color") would
    # apply inside them first, and their own chain of merges would no longer reach the whole word
    tokenizer = _tokenizer(sorted(words, key=lambda word: not word.startswith("Ġ")))
    tokenizer.add_tokens(list(specials), special_tokens=True)
    pipe.register_modules(tokenizer=tokenizer)
    drop = len(pipe.tokenizer(prefix.split("<|vision_start|>")[0])["input_ids"])
    if drop != pipe.prompt_template_encode_start_idx:
        raise RuntimeError(f"the tiny tokenizer makes the template's system part {drop} tokens, not "
                           f"{pipe.prompt_template_encode_start_idx}")


REAL_SIZE = RealSize(  # as released, as we read the published configs; the VAE class's defaults are the real VAE
    params_b=20.4,
    transformer=dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                     num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56)),
    text_encoders={"text_encoder": {  # Qwen2.5-VL 7B
        None: dict(tie_word_embeddings=False),
        "text_config": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                            num_key_value_heads=4, vocab_size=152064),
        "vision_config": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                              fullatt_block_indexes=[7, 15, 23, 31])}},
)

QWEN_IMAGE = Family(
    name="qwen-image",
    pipelines=("QwenImagePipeline",),
    presets="square=1328x1328,landscape=1664x928,portrait=928x1664",
    tiny_presets="square=64x64,landscape=112x64,portrait=64x112",  # 4x4, 7x4, 4x7 tokens
    multiple=MULTIPLE,
    text=Text.DYNAMIC,
    defaults=defaults,
    build_tiny=build_tiny,
    prompt_tokens=prompt_tokens,
    # img_shapes=[[(frames, height, width)]] reaches the transformer as Python ints: its rotary tables (and the
    # text positions' offset, max(height, width) // 2) are baked into the exported program.
    shares_programs_by_token_count=False,
    step_cost=1.0,  # 306.0 ms at 1328x1328, 180 ms per 1024x1024 of pixels, as FLUX.1-dev (RESULTS.md run 12)
    negative_prompt_arg="negative_prompt",
    guidance_arg="true_cfg_scale",
    text_spec=text_spec,
    # the text stream's projections: a few dozen rows against thousands of image rows, so bf16 costs little
    keep_bf16=("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "txt_mlp"),
    regional_only=("its rotary tables are cached per text length, which a whole-model export fixes; blocks take any "
                   "length"),
    real_size=REAL_SIZE,
)
