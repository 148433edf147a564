"""Z-Image (Turbo): `ZImagePipeline`, one single-stream DiT over [image tokens, caption tokens], a Qwen3 encoder.

What sets it apart for AoT compilation:
- The transformer takes lists of per-image tensors, positionally: `x` is [C, 1, H, W] latents that it
  patchifies with Python ints, so every latent grid is its own whole-model program.
- `cap_feats` are the prompt's hidden states with the padding already dropped: their length follows the
  prompt. The transformer rounds it up to a multiple of 32 with a learned pad token that attention does not
  mask, and starts the image's RoPE positions after the rounded length: padding the prompt ourselves changes
  the image. The text axis stays dynamic.
"""
from __future__ import annotations

import torch

from aot.families.flux import REAL_VAE
from aot.families.flux2 import QWEN3_4B
from aot.family import Defaults, Family, Guidance, RealSize, Text

MAX_TEXT = 512  # the pipeline's max_sequence_length: it truncates the templated prompt there


def defaults(pipe) -> Defaults:
    # Turbo is step-distilled: the model card runs 9 steps (one transformer call each in this pipeline) and
    # guidance_scale 0.0, which turns the pipeline's CFG branch off.
    return Defaults(steps=9, guidance=0.0, guidance_kind=Guidance.NONE, max_sequence_length=MAX_TEXT)


def prompt_tokens(pipe, prompt: str) -> int:
    # The whole chat-templated prompt reaches the transformer (the pipeline drops only the padding). Not
    # truncated here, so that a prompt the pipeline would cut at MAX_TEXT counts as too long.
    text = pipe.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                              add_generation_prompt=True, enable_thinking=True)
    return len(pipe.tokenizer(text).input_ids)


def dynamic_shapes(args: tuple, kwargs: dict, max_text: int = MAX_TEXT) -> dict:
    """torch.export's `dynamic_shapes` for a captured call of the transformer or of one block, text axis dynamic.
    Both are called positionally, hence `args`; the keys are the names of the arguments passed.

    The transformer exports only with strict=True (non-strict specializes `len(cap_feat)`), after one eager
    call: strict export cannot trace the RoPE cache's first fill, non-strict leaves fake tensors in it."""
    if "return_dict" in kwargs:  # the transformer: forward(x, t, cap_feats, ...)
        names = ("x", "t", "cap_feats")
        # A named Dim is refused: the rounding's `if pad_len > 0` guards "not a multiple of 32". AUTO keeps that
        # guard, which the compiled program does not check and does not need (pad_len 0 gives the same result).
        text = torch.export.Dim.AUTO(min=1, max=max_text)
        spec = {"x": [None] * len(args[0]), "cap_feats": [{0: text} for _ in args[2]]}
    else:  # a ZImageTransformerBlock: forward(x, attn_mask, freqs_cis, adaln_input, ...)
        names = ("x", "attn_mask", "freqs_cis", "adaln_input", "noise_mask", "adaln_noisy", "adaln_clean")
        # x and freqs_cis share the sequence axis: image and/or caption tokens, each padded to a multiple of 32.
        # A plain Dim: 32 * Dim fails on a one-chunk caption, whose multiplier 1 gets specialized.
        seq = torch.export.Dim("tokens", min=32, max=args[0].shape[1] + max_text + 31)
        spec = {"x": {1: seq}, "freqs_cis": {1: seq}}
    return {**{name: spec.get(name) for name in names[:len(args)]}, **{name: None for name in kwargs}}


# Qwen's chat format, without the real template's tool-call and thinking branches.
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny():
    """A Z-Image-architecture pipeline with random weights, small enough for a CPU, built offline."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3Model

    # Byte-level BPE without merges: the 256 byte symbols are the vocabulary, so any UTF-8 prompt tokenizes,
    # one token per byte. The chat markers are added as whole tokens, matched before the byte split.
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate([*specials, *sorted(pre_tokenizers.ByteLevel.alphabet())])}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_tokens(specials[1:], special_tokens=True)
    tokenizer.chat_template = _CHAT_TEMPLATE

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    # The pipeline reads hidden_states[-2]: with 2 layers, the first layer's output rather than the embeddings.
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=MAX_TEXT, pad_token_id=0, eos_token_id=0,
    ))
    transformer = ZImageTransformer2DModel(
        in_channels=4, dim=32, n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
        axes_dims=[4, 6, 6],  # sums to the head dim (16); the RoPE tables keep the real lengths
    )
    for pad in (transformer.x_pad_token, transformer.cap_pad_token):
        torch.nn.init.normal_(pad)  # zeros when built, learned in the real model: make the padding count
    # Four blocks: the real 8x downsampling, so the tiny model keeps the real 16-pixel token (8 x patch 2).
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=0.3611, shift_factor=0.1159, sample_size=32,
    )
    torch.random.set_rng_state(generator_state)
    for module in (transformer, text_encoder, vae):
        module.eval()  # built from configs, they start in training mode
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
    )
    return pipe.to(torch.float32)


REAL_SIZE = RealSize(  # Z-Image Turbo as released, as we read the published configs: FLUX.1's VAE, Qwen3-4B
    params_b=6.2,
    transformer=dict(in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2, n_heads=30, n_kv_heads=30,
                     cap_feat_dim=2560, axes_dims=[32, 48, 48]),
    text_encoders={"text_encoder": QWEN3_4B},
    vae=REAL_VAE,
)

Z_IMAGE = Family(
    name="z-image",
    pipelines=("ZImagePipeline",),
    presets="square=1024x1024,portrait=832x1216,landscape=1216x832",
    tiny_presets="square=64x64,portrait=48x80,landscape=80x48",
    multiple=16,  # the VAE downsamples 8x, the transformer packs 2x2 latent patches into one token
    text=Text.DYNAMIC,
    defaults=defaults,
    build_tiny=build_tiny,
    prompt_tokens=prompt_tokens,
    shares_programs_by_token_count=False,  # the latent's [C, F, H, W] shape is patchified with Python ints
    text_spec=dynamic_shapes,
    one_program=True,
    step_cost=0.9,  # 157.9 ms a step eagerly against FLUX.1-dev's 182.8 (RESULTS.md run 12)
    regional_only=("a whole-model export fixes the caption length unless traced strictly (torch.export "
                   "specializes len(cap_feat)); the blocks take any length"),
    real_size=REAL_SIZE,
)
