"""FLUX.1 ([dev], [schnell], Krea [dev]): `FluxPipeline`, CLIP + T5 text encoders, double and single blocks."""
from __future__ import annotations

import torch

from aot.family import Defaults, Family, Guidance, RealSize, Text
from aot.families.tokens import byte_vocabulary


def defaults(pipe) -> Defaults:
    # [dev] embeds guidance; [schnell] does not, is timestep-distilled for 1-4 steps, and its T5 was trained
    # with 256 tokens. No model reads more text than its T5 tokenizer allows (the demo model's: 48); a pipeline
    # loaded without its tokenizers (low-VRAM tests build one) keeps the family's length.
    limit = getattr(pipe.tokenizer_2, "model_max_length", None) or 512
    if pipe.transformer.config.guidance_embeds:
        return Defaults(steps=28, guidance=3.5, guidance_kind=Guidance.EMBEDDED, max_sequence_length=min(512, limit))
    return Defaults(steps=4, guidance=0.0, guidance_kind=Guidance.NONE, max_sequence_length=min(256, limit))


def prompt_tokens(pipe, prompt: str) -> int:
    return len(pipe.tokenizer_2(prompt).input_ids)  # T5 reads the whole prompt; CLIP only its first 77 tokens


def clip_note(pipe, prompt: str) -> str | None:
    limit = pipe.tokenizer.model_max_length
    if len(pipe.tokenizer(prompt).input_ids) > limit:
        return f"the CLIP encoder reads only the first {limit} tokens; T5 reads the whole prompt"
    return None


def dynamic_spec(kwargs: dict, dim, text: int) -> dict:
    """Marks the image-token axis of a captured call dynamic (DYNAMIC_SHAPES=1); everything else stays static."""
    spec = torch.utils._pytree.tree_map(lambda _: None, kwargs)
    spec["hidden_states"] = {1: dim}
    if "img_ids" in kwargs:  # the whole model
        spec["img_ids"] = {0: dim}
    else:  # a block: its rotary embeddings cover text + image tokens
        spec["image_rotary_emb"] = tuple({0: dim + text} for _ in kwargs["image_rotary_emb"])
    return spec


def build_tiny():
    """Two text encoders, the MMDiT transformer with one double and one single block, a small VAE."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    chars = byte_vocabulary()
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    clip_vocab = {tok: i for i, tok in enumerate(tokens)}
    tokenizer = CLIPTokenizer(vocab=clip_vocab, merges=[], model_max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=32,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    t5_vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0), *((c, -2.0) for c in chars)]
    tokenizer_2 = T5TokenizerFast(vocab=t5_vocab, extra_ids=0, model_max_length=512)
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(t5_vocab), d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035, sample_size=32,
    )
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                        transformer=transformer)


# FLUX.1 [dev] as released: transformer 11.9B, T5-XXL encoder 4.76B, CLIP-L 0.12B, VAE 0.08B
REAL_VAE = dict(  # FLUX.1's VAE, which Z-Image reuses
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, block_out_channels=(128, 256, 512, 512),
    layers_per_block=2, norm_num_groups=32, sample_size=1024, use_quant_conv=False, use_post_quant_conv=False,
    shift_factor=0.1159, scaling_factor=0.3611,
)
REAL_SIZE = RealSize(
    params_b=11.9,
    transformer=dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                     num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                     guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
    text_encoders={
        "text_encoder": {None: dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                    num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
                                    hidden_act="quick_gelu")},  # CLIP-L
        "text_encoder_2": {None: dict(  # T5-XXL's encoder
            vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
            feed_forward_proj="gated-gelu", is_gated_act=True, dense_act_fn="gelu_new",
            relative_attention_num_buckets=32, relative_attention_max_distance=128)},
    },
    vae=REAL_VAE,
    scheduler=dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                   max_image_seq_len=4096),
)

FLUX = Family(
    name="flux",
    pipelines=("FluxPipeline",),
    presets="square=1024x1024,portrait=832x1216,landscape=1216x832",
    tiny_presets="square=64x64,portrait=48x80,landscape=80x48",
    multiple=16,  # 8x VAE, 2x2 patches
    text=Text.FIXED,  # T5 embeddings are padded to max_sequence_length
    defaults=defaults,
    build_tiny=build_tiny,
    prompt_tokens=prompt_tokens,
    prompt_note=clip_note,
    dynamic_spec=dynamic_spec,
    real_size=REAL_SIZE,
)
