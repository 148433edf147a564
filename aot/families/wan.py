"""Wan (2.1 14B and 1.3B, 2.2 T2V-A14B; and 2.2 TI2V-5B as `wan-5b`): `WanPipeline`, text to video; a UMT5 encoder, a
3D-causal VAE (8x in space, 4x in time; 2.2 TI2V-5B's 16x in space) and `WanTransformer3DModel`. Wan 2.2 I2V-A14B as
`wan-i2v`: `WanImageToVideoPipeline`, image to video.

What sets it apart for AoT compilation:
- Wan 2.2 A14B has two experts of one architecture: `transformer` denoises the steps at or above `boundary_ratio` x
  1000, `transformer_2` the rest. Both are compiled once (the same programs, aot/model.py `experts`), each program
  reading its own expert's weights.
- The transformer computes its rotary table from the latent's shape, so a whole-model program bakes the (frames,
  height, width) grid in as Python ints. Its blocks see token sequences and the rotary table as tensors: regional
  programs (the default) go by the token count, frames x height x width / 16², and two presets with the same count
  (832x480 and 480x832) share one. A frame count is part of that count: each served frame count is its own preset
  (WxHxF), and a request asks for one of them.
- UMT5 pads every prompt to 512 tokens: the text length is fixed.
- Wan 2.2 TI2V-5B (`expand_timesteps`) is its own entry: its VAE's 16x and 48 latent channels make 32-pixel tokens,
  and its clips are 121 frames at 24 fps. It gives every token its own timestep: the blocks' time embedding is a
  (batch, tokens, 6, width) tensor, so its programs differ from the other Wans' and are keyed by the token count alike.
- Wan 2.2 I2V-A14B's image is the video's first frame: the pipeline resizes it to the requested size (stretching it to
  that aspect ratio), encodes it with the VAE as a clip of that frame and blank ones, and hands the transformer the
  noise's 16 latent channels with 4 of a first-frame mask (one per frame the VAE folds into a latent frame) and that
  clip's 16 beside them: 36 in, 16 out. The tokens, and with them the programs, are text to video's. Wan 2.1's I2V
  also reads the image through a CLIP encoder (`image_dim`): 257 more tokens beside the prompt's, which no entry serves.
"""
from __future__ import annotations

import dataclasses

from aot.families.tokens import byte_vocabulary
from aot.family import FIRST_FRAME_INPUT, Defaults, Family, Guidance, RealSize, Text, Video

MAX_TEXT = 512  # the pipeline's max_sequence_length: UMT5's embeddings are padded to it
# I2V's channels beside the noise's: a first-frame mask (one per frame in a latent frame: the VAE's 4x in time) and
# the VAE's 16 latent channels of the first frame followed by blank ones (`WanImageToVideoPipeline.prepare_latents`)
I2V_CONDITION = 4 + 16
I2V_BOUNDARY = 0.9  # Wan 2.2 I2V-A14B's expert boundary (Wan-AI's wan_i2v_A14B.py: boundary = 0.900)


def defaults(pipe) -> Defaults:
    if pipe.transformer_2 is not None:
        # Wan2.2-T2V-A14B-Diffusers' example: 40 steps, guidance 4.0 on the high-noise expert, 3.0 on the low-noise one
        return Defaults(steps=40, guidance=4.0, guidance_kind=Guidance.CFG, max_sequence_length=MAX_TEXT,
                        guidance_2=3.0)
    # Wan 2.1's examples and Wan 2.2 TI2V-5B's: 50 steps at guidance 5.0 (the pipeline's own defaults)
    return Defaults(steps=50, guidance=5.0, guidance_kind=Guidance.CFG, max_sequence_length=MAX_TEXT)


def defaults_i2v(pipe) -> Defaults:
    # Wan-AI's wan_i2v_A14B.py: 40 steps at guidance 3.5 on both experts (so no guidance_2: the pipeline's own is the
    # same value)
    return Defaults(steps=40, guidance=3.5, guidance_kind=Guidance.CFG, max_sequence_length=MAX_TEXT)


def unserved_i2v(pipe) -> str | None:
    if any(expert.config.image_dim for expert in (pipe.transformer, pipe.transformer_2) if expert is not None):
        return ("Wan 2.1's image to video reads the image through a CLIP encoder too (the transformer's image_dim): "
                "257 tokens beside the prompt's, which this template does not compile. Served: Wan 2.2 I2V-A14B "
                "(Wan-AI/Wan2.2-I2V-A14B-Diffusers), which takes the image as latent channels alone.")
    if is_ti2v(pipe):
        return ("Wan 2.2 TI2V-5B's image to video (expand_timesteps) is not served. Load it as its model repository "
                "does, WanPipeline (wan-5b), for text to video.")
    return None


def is_ti2v(pipe) -> bool:
    """Wan 2.2 TI2V-5B: a timestep per token, which only its 16x VAE's pipeline sets."""
    return bool(pipe.config.expand_timesteps)


def prompt_tokens(pipe, prompt: str) -> int:
    return len(pipe.tokenizer(prompt).input_ids)


def _tiny_pipeline(experts: int, latent_channels: int, vae, pipeline_class: str = "WanPipeline",
                   condition_channels: int = 0, **pipeline):
    """`experts` tiny transformers of one architecture over `latent_channels` (and `condition_channels` more in), a UMT5
    encoder of one layer, `vae`, in a `pipeline_class`."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from transformers import T5TokenizerFast, UMT5Config, UMT5EncoderModel

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0), *((c, -2.0) for c in byte_vocabulary())]
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=MAX_TEXT)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4, relative_attention_num_buckets=8,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    ))
    transformers = [WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
        in_channels=latent_channels + condition_channels, out_channels=latent_channels, text_dim=32, freq_dim=32,
        ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ) for _ in range(experts)]
    return getattr(diffusers, pipeline_class)(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformers[0],
        transformer_2=transformers[1] if experts == 2 else None, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        **pipeline)


def _tiny_vae():
    """The real 8x spatial and 4x temporal factors and 16 latent channels."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True])


def build_tiny():
    """Two experts of one tiny architecture (as A14B), a UMT5 encoder of one layer, `_tiny_vae`."""
    # A14B's boundary: the first step (t = 1000) runs the high-noise expert, later ones (t < 875) the low-noise one
    return _tiny_pipeline(2, 16, _tiny_vae(), boundary_ratio=0.875)


def build_tiny_i2v():
    """tiny-wan's parts in a WanImageToVideoPipeline, its experts taking the first frame's 20 channels beside the
    noise's 16 (`I2V_CONDITION`), and I2V-A14B's boundary: again the first of two steps on the high-noise expert."""
    return _tiny_pipeline(2, 16, _tiny_vae(), "WanImageToVideoPipeline", I2V_CONDITION, boundary_ratio=I2V_BOUNDARY)


# Wan 2.2's VAE (TI2V-5B): 2x2 pixel patches of 12 channels in, three 2x downsamplings, 48 latent channels: 16x in
# space. Its latents' per-channel mean and std matter only for decoding trained latents: random weights take 0 and 1
WAN22_VAE = dict(z_dim=48, is_residual=True, patch_size=2, in_channels=12, out_channels=12, scale_factor_spatial=16,
                 temperal_downsample=[False, True, True], latents_mean=[0.0] * 48, latents_std=[1.0] * 48)


def build_tiny_5b():
    """One tiny transformer over 48 latent channels, a timestep per token, and a VAE with Wan 2.2's 16x spatial and
    4x temporal factors."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan(base_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1, **WAN22_VAE)
    return _tiny_pipeline(1, 48, vae, expand_timesteps=True)


UMT5_XXL = {None: dict(  # google/umt5-xxl's encoder, as Wan ships it
    vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32, relative_attention_max_distance=128)}

TRANSFORMER = dict(patch_size=(1, 2, 2), attention_head_dim=128, text_dim=4096, freq_dim=256, cross_attn_norm=True,
                   qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)

REAL_SIZE = RealSize(  # Wan 2.2 T2V-A14B as released, as we read its configs: two 14B experts (each built alike)
    params_b=14.3,
    transformer=dict(TRANSFORMER, num_attention_heads=40, in_channels=16, out_channels=16, ffn_dim=13824,
                     num_layers=40),
    text_encoders={"text_encoder": UMT5_XXL},
    vae=dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True]),
    text_tokens=MAX_TEXT,
)

REAL_SIZE_5B = RealSize(  # Wan 2.2 TI2V-5B as released, as we read its configs (Wan-AI's wan_ti2v_5B.py agrees)
    params_b=5.0,
    transformer=dict(TRANSFORMER, num_attention_heads=24, in_channels=48, out_channels=48, ffn_dim=14336,
                     num_layers=30),
    text_encoders={"text_encoder": UMT5_XXL},
    vae=dict(WAN22_VAE, base_dim=160, decoder_base_dim=256, dim_mult=[1, 2, 4, 4], num_res_blocks=2),
    pipeline=dict(expand_timesteps=True),
    text_tokens=MAX_TEXT,
)

WAN = Family(
    name="wan",
    pipelines=("WanPipeline",),
    serves=lambda pipe: not is_ti2v(pipe),
    presets="landscape=832x480x81,portrait=480x832x81,square=624x624x81",
    tiny_presets="landscape=64x32x5,portrait=32x64x5,square=48x48x5",
    multiple=16,  # the VAE downsamples 8x, the transformer packs 2x2 latent patches into one token
    text=Text.FIXED,
    defaults=defaults,
    build_tiny=build_tiny,
    prompt_tokens=prompt_tokens,
    shares_programs_by_token_count=False,  # the rotary table comes from the latent's shape, as Python ints
    negative_prompt_arg="negative_prompt",
    guidance_2_arg="guidance_scale_2",
    # Per token, an A14B expert's 14.3B parameters against FLUX.1-dev's 11.9B, from the configs. Measured on the H100
    # (RESULTS.md run 26, 832x480x81): a call is 0.94 of this estimate's eager figure and 1.15 of its compiled one, so
    # it errs long by 4-28% (Wan 2.1 1.3B's estimates come out about ten times too long)
    step_cost=1.2,
    video=Video(fps=16, max_frames=81),  # 5 s at 16 fps: the released models' clip
    # An A14B expert's eager call at 832x480x81 (32,760 tokens): 3.47 GiB at its peak, counted on the meta device by
    # torch's MemTracker (attention as flash attention's output, no tokens x tokens scores), not measured on a GPU;
    # Wan 2.1 1.3B, narrower, needs less
    activation_bytes_per_token=111 * 1024,
    real_size=REAL_SIZE,
)

WAN_5B = dataclasses.replace(
    WAN,
    name="wan-5b",
    serves=is_ti2v,
    presets="landscape=1280x704x121,portrait=704x1280x121",  # Wan2.2-TI2V-5B's 720p, both ways
    tiny_presets="landscape=64x32x5,portrait=32x64x5",
    multiple=32,  # the VAE downsamples 16x, the transformer packs 2x2 latent patches into one token
    build_tiny=build_tiny_5b,
    guidance_2_arg=None,  # one transformer
    # per token: 5.0B parameters against FLUX.1-dev's 11.9B gave 0.45, but the H100 measured 0.45 of the estimate's
    # eager call and 0.49 of its compiled one (RESULTS.md run 26, 1280x704x121): 0.5, so that it never under-asks
    step_cost=0.5,
    video=Video(fps=24, max_frames=121),  # 5 s at 24 fps: the released model's clip
    # Measured on the H100 (RESULTS.md run 25, eager bf16 at 1280x704x121, 27,280 tokens): 10.6 GiB above the weights
    # while serving, its VAE's decode of 121 frames at 720p included: 300 KiB a token beside `DECODE_BYTES`' 3 GiB.
    # The call alone counts 5.07 GiB on the meta device (its timestep per token gives each block a (tokens, 6, width)
    # float32 modulation, 1.9 GiB of it): the 16x VAE's decode holds more than FLUX's 3 GiB
    activation_bytes_per_token=300 * 1024,
    real_size=REAL_SIZE_5B,
)

WAN_I2V = dataclasses.replace(
    WAN,
    name="wan-i2v",
    pipelines=("WanImageToVideoPipeline",),
    serves=None,
    unserved=unserved_i2v,
    defaults=defaults_i2v,
    build_tiny=build_tiny_i2v,
    **FIRST_FRAME_INPUT,
    real_size=dataclasses.replace(REAL_SIZE, transformer=dict(REAL_SIZE.transformer, in_channels=16 + I2V_CONDITION)),
)
