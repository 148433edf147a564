"""LTX-2: `LTX2Pipeline`, text to video with its sound track; a Gemma 3 text encoder read through two connectors
(one for each stream), a video VAE (32x in space, 8x in time), an audio VAE and a vocoder, and
`LTX2VideoTransformer3DModel`, which denoises the video and the audio latents together.

What sets it apart for AoT compilation:
- One block class (`LTX2VideoTransformerBlock`) carries both streams: video and audio self-attention, their text
  cross-attention, and the audio-to-video and video-to-audio cross-attention. Regional programs cover the audio stream
  with the video's, and go by the video's token count (frames x height x width / 32²) with the audio's beside it.
- The audio's token count follows the clip's length in seconds (frames / frame rate x 25 audio latents a second), so
  the frame rate the pipeline is called with is part of a program's shape: it stays at the model's own (`Video.fps`),
  and the MP4 is played at that rate (another rate would put the sound out of step with the picture).
- The transformer's forward takes the grid (frames, height, width, audio frames) and the frame rate as Python numbers:
  a whole-model program bakes them in, so two presets never share one.
- Guidance: CFG runs the negative and the positive prompt as one batch of two. The pipeline's defaults add
  spatio-temporal guidance (STG: a third call, batch one, with one block perturbed) and modality-isolation guidance
  (a fourth, batch one, without the audio-video cross-attention): each another shape or another block program. The
  family serves CFG alone, and keeps the sound track's guidance at the pipeline's own 7.0 at every request, so that
  every step is the one batched call its programs were compiled for, whatever the video's guidance.
- Gemma pads every prompt to 1024 tokens: the text length is fixed.
- Image to video (`ltx2-i2v`, `LTX2ImageToVideoPipeline`): the pipeline re-encodes the image as H.264 (CRF 33 with
  LTX-2's Gemma), resizes it to the requested size and holds the first latent frame at it; that frame's tokens get
  timestep 0, so the video's timestep is one per token, (batch, tokens), where text to video's is one per video. The
  tokens are text to video's; the programs are their own, captured with the image.
- The distilled recipe (RECIPE=distilled, `DISTILLED`), as diffusers' LTX-2 docs run a distilled checkpoint: 8 steps
  at half the width and height, the x2 latent upsampler (`LTX2LatentUpsamplePipeline`), 3 steps at the size asked
  for. Without guidance, so every step is one call of batch one: the programs of both stages' shapes are their own,
  not the CFG batch of two's. Image to video too, as diffusers' i2v pipeline runs two stages: stage 1 holds the first
  latent frame at the image, resized to stage 1's size; stage 2, given the upsampled latents, reads no image and keeps
  their first frame clean (no noise, timestep 0, no scheduler step), so the video starts at stage 1's image frame
  upsampled, not at the image encoded at the full size. Both stages' programs are captured with the image: a timestep
  per token at batch one.
"""
from __future__ import annotations

import contextlib
import dataclasses

from aot.families.tokens import byte_vocabulary
from aot.family import FIRST_FRAME_INPUT, Defaults, Family, Guidance, RealSize, Text, TwoStage, Video

MAX_TEXT = 1024  # the pipeline's max_sequence_length: Gemma's embeddings are padded to it
TINY_TEXT = 64  # the tiny tokenizer's model_max_length: fewer text tokens make a smaller transformer call
AUDIO_GUIDANCE = 7.0  # the pipeline's audio_guidance_scale default, which the LTX-2 authors set above the video's

# CFG alone (the module docstring says why); the audio stream's guidance stays at its default
CALL_ARGS = dict(audio_guidance_scale=AUDIO_GUIDANCE, stg_scale=0.0, audio_stg_scale=0.0,
                 spatio_temporal_guidance_blocks=None, modality_scale=1.0, audio_modality_scale=1.0)


def defaults(pipe) -> Defaults:
    # the pipeline's own defaults (its docstring's example): 30 steps, guidance 3.0
    return Defaults(steps=30, guidance=3.0, guidance_kind=Guidance.CFG,
                    max_sequence_length=min(MAX_TEXT, pipe.tokenizer.model_max_length))


def prompt_tokens(pipe, prompt: str) -> int:
    return len(pipe.tokenizer(prompt.strip()).input_ids)


def call_args(width: int, height: int) -> dict:
    return CALL_ARGS


def audio_rate(pipe) -> int:
    return pipe.vocoder.config.output_sampling_rate


def distilled_schedules() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """diffusers' DISTILLED_SIGMA_VALUES and STAGE_2_DISTILLED_SIGMA_VALUES: Lightricks' two stages' schedules."""
    from diffusers.pipelines.ltx2.utils import DISTILLED_SIGMA_VALUES, STAGE_2_DISTILLED_SIGMA_VALUES

    return tuple(DISTILLED_SIGMA_VALUES), tuple(STAGE_2_DISTILLED_SIGMA_VALUES)


# The distilled model is trained to run without guidance (Lightricks' distilled pipeline runs none). The pipeline's
# CFG is on where the video's guidance or the sound's is above 1, and the sound's defaults to 7.0, so diffusers' own
# example still runs CFG on the sound: both at 1.0 make each step one call of batch one. STG and modality guidance
# stay off as in CALL_ARGS.
DISTILLED_CALL_ARGS = dict(audio_guidance_scale=1.0)


def distilled_defaults(pipe) -> Defaults:
    first, second = DISTILLED.steps
    return Defaults(steps=first + second, guidance=1.0, guidance_kind=Guidance.NONE,
                    max_sequence_length=min(MAX_TEXT, pipe.tokenizer.model_max_length),
                    fixed_steps=f"the distilled recipe runs {first} steps, then {second} after upsampling, on fixed "
                                "sigma schedules")


def _upsampling_pipeline(pipe, latent_upsampler):
    from diffusers.pipelines.ltx2 import LTX2LatentUpsamplePipeline

    return LTX2LatentUpsamplePipeline(vae=pipe.vae, latent_upsampler=latent_upsampler)


def load_upsampler(pipe, source: str, revision: str | None):
    """The latent upsampler in `source`'s `latent_upsampler` folder, in the VAE's dtype, over the pipeline's VAE;
    refused unless it makes the VAE's latents twice as large in space alone (LTX-2.3 also has an x1.5 one)."""
    from diffusers.pipelines.ltx2.latent_upsampler import LTX2LatentUpsamplerModel

    upsampler = LTX2LatentUpsamplerModel.from_pretrained(source, subfolder=DISTILLED.upsampler_folder,
                                                         revision=revision, dtype=pipe.vae.dtype)
    config = upsampler.config
    if config.in_channels != pipe.vae.config.latent_channels:
        raise ValueError(f"it takes {config.in_channels} latent channels, the VAE makes "
                         f"{pipe.vae.config.latent_channels}")
    if not config.spatial_upsample or config.temporal_upsample or (
            config.use_rational_resampler and config.rational_spatial_scale != DISTILLED.scale):
        raise ValueError(f"it is not an x{DISTILLED.scale} spatial upsampler (spatial_upsample "
                         f"{config.spatial_upsample}, temporal_upsample {config.temporal_upsample}, rational scale "
                         f"{config.rational_spatial_scale if config.use_rational_resampler else 'none'})")
    return _upsampling_pipeline(pipe, upsampler)


def build_tiny_upsampler(pipe):
    """An x2 latent upsampler over tiny-ltx2's 8 latent channels: 32 wide (its GroupNorms take 32 groups), one
    residual block on each side of the upsampling, random weights."""
    from diffusers.pipelines.ltx2.latent_upsampler import LTX2LatentUpsamplerModel

    upsampler = LTX2LatentUpsamplerModel(in_channels=pipe.vae.config.latent_channels, mid_channels=32,
                                         num_blocks_per_stage=1)
    return _upsampling_pipeline(pipe, upsampler.eval().to(pipe.vae.dtype))


@contextlib.contextmanager
def _one_progress_bar(pipe, total: int):
    """One progress bar of `total` steps, made as the pipeline makes its own (its progress bar settings), with the
    pipeline's own bars off inside: a page following tqdm sees one bar for both stages."""
    saved = dict(getattr(pipe, "_progress_bar_config", {}))
    with pipe.progress_bar(total=total) as bar:
        pipe.set_progress_bar_config(**{**saved, "disable": True})
        try:
            yield bar
        finally:
            pipe.set_progress_bar_config(**saved)


def _counted(bar, callback, before: int):
    """A step callback for one stage that moves the bar, and calls the request's `callback` (if any) with the step's
    number among both stages' (`before` steps came first), as one call of the pipeline would."""
    def on_step(pipe, step: int, timestep, tensors: dict) -> dict:
        bar.update()
        return callback(pipe, before + step, timestep, tensors) if callback else {}

    return on_step


def run_distilled(model, prompt: str, preset, generator=None, callback_on_step_end=None, images: tuple = (),
                  **kwargs):
    """A request under the distilled recipe: the prompt encoded once for both stages; stage 1 at half the size to
    latents (the video's and the sound's), from the first frame in `images` for image to video; the video's upsampled
    x2 (eager: a conv net, a small share of a step); stage 2 at `preset` from them, re-noised to its schedule's first
    sigma (the i2v pipeline keeps their first frame clean), the sound's carried on. One seeded generator draws both
    stages' noise, so a seed makes one video. `kwargs` reach stage 2, whose result is the request's."""
    import torch

    (first, steps_1), (second, steps_2) = model.stages(preset)
    sigmas_1, sigmas_2 = model.recipe.schedules()
    with torch.no_grad():  # as the pipeline encodes: no graph kept of Gemma's activations
        embeds, mask, _, _ = model.pipe.encode_prompt(prompt, do_classifier_free_guidance=False,
                                                      max_sequence_length=model.defaults.max_sequence_length)
    text = dict(prompt_embeds=embeds, prompt_attention_mask=mask)
    with _one_progress_bar(model.pipe, steps_1 + steps_2) as bar:
        video, audio = model.stage(None, first, steps_1, generator=generator, images=images, sigmas=list(sigmas_1),
                                   output_type="latent", return_dict=False,
                                   callback_on_step_end=_counted(bar, callback_on_step_end, 0), **text)
        # no image: given latents, the i2v pipeline neither reads nor encodes one (its first frame is stage 1's)
        return model.stage(None, second, steps_2, generator=generator, latents=model.upsample(video),
                           audio_latents=audio, noise_scale=sigmas_2[0], sigmas=list(sigmas_2),
                           callback_on_step_end=_counted(bar, callback_on_step_end, steps_1), **text, **kwargs)


def build_tiny():
    """A Gemma 3 of one layer (its vision tower too: the pipeline's class has one), connectors of one layer each, a
    transformer of two blocks, a video VAE with the real 32x spatial and 8x temporal factors, and an audio VAE and
    vocoder whose rates agree: 16 kHz mel frames at hop 160 (100 a second, as released), upsampled 80x to 8 kHz."""
    from diffusers import (AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video, FlowMatchEulerDiscreteScheduler,
                           LTX2Pipeline, LTX2VideoTransformer3DModel)
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, GemmaTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    vocab = {token: i for i, token in enumerate([*specials, *byte_vocabulary(), "▁"])}
    tokenizer = GemmaTokenizerFast(vocab=vocab, merges=[], model_max_length=TINY_TEXT)
    text_encoder = Gemma3ForConditionalGeneration(Gemma3Config(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, sliding_window=8,
                         pad_token_id=0, eos_token_id=1, bos_token_id=2),
        vision_config=dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                           image_size=8, patch_size=4),
        mm_tokens_per_image=4, image_token_index=len(vocab) - 1,
    ))
    caption_channels = text_encoder.config.text_config.hidden_size
    connectors = LTX2TextConnectors(
        caption_channels=caption_channels, text_proj_in_factor=text_encoder.config.text_config.num_hidden_layers + 1,
        video_connector_num_attention_heads=2, video_connector_attention_head_dim=8, video_connector_num_layers=1,
        video_connector_num_learnable_registers=None, audio_connector_num_attention_heads=2,
        audio_connector_attention_head_dim=8, audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=None,
        connector_rope_base_seq_len=32, rope_double_precision=False, rope_type="split",
    )
    transformer = LTX2VideoTransformer3DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        audio_in_channels=8, audio_out_channels=8, audio_num_attention_heads=2, audio_attention_head_dim=4,
        audio_cross_attention_dim=8, num_layers=2, caption_channels=caption_channels, rope_double_precision=False,
        rope_type="split",
    )
    # the class computes its factors as if every down block scaled space and time alike (64x, 16x); its blocks make
    # 32x and 8x (one spatial, one temporal, two both, after a 4x4 patch): the factors the pipeline assumes by default
    vae = AutoencoderKLLTX2Video(latent_channels=8, block_out_channels=(8, 8, 8, 8),
                                 decoder_block_out_channels=(8, 16, 32),  # each upsampler halves the channels
                                 layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1),
                                 spatial_compression_ratio=32, temporal_compression_ratio=8)
    audio_vae = AutoencoderKLLTX2Audio(
        base_channels=8, output_channels=2, ch_mult=(1,), num_res_blocks=1, attn_resolutions=None, in_channels=2,
        resolution=32, latent_channels=2, norm_type="pixel", causality_axis="height", dropout=0.0,
        mid_block_add_attention=False, sample_rate=16000, mel_hop_length=160, is_causal=True, mel_bins=16,
    )
    vocoder = LTX2Vocoder(in_channels=2 * 16, hidden_channels=32, out_channels=2, upsample_kernel_sizes=[16, 20],
                          upsample_factors=[8, 10], resnet_kernel_sizes=[3], resnet_dilations=[[1, 3, 5]],
                          output_sampling_rate=8000)
    return LTX2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, audio_vae=audio_vae,
                        text_encoder=text_encoder, tokenizer=tokenizer, connectors=connectors, transformer=transformer,
                        vocoder=vocoder)


GEMMA3_12B = {"text_config": dict(  # google/gemma-3-12b-it's language model, which LTX-2 reads all 49 hidden states of
    vocab_size=262208, hidden_size=3840, intermediate_size=15360, num_hidden_layers=48, num_attention_heads=16,
    num_key_value_heads=8, head_dim=256, sliding_window=1024)}

# LTX-2 (ltx-2-19b-dev, 19B on its model card) as released: the configs diffusers' scripts/convert_ltx2_to_diffusers.py
# writes for version "2.0" (Lightricks/LTX-2's diffusers folders; its connectors/config.json agrees). diffusers' class
# defaults are those sizes; the entries below are where they differ.
SPLIT_ROPE = dict(rope_type="split")  # the classes default to "interleaved"
REAL_SIZE = RealSize(
    params_b=18.88,  # 48 blocks, 4096 wide for video and 2048 for audio (5.7B of it)
    transformer=SPLIT_ROPE,
    text_encoders={"text_encoder": GEMMA3_12B},
    # build_tiny says why the two factors; the released decoder is not causal (the class defaults to causal)
    vae=dict(spatial_compression_ratio=32, temporal_compression_ratio=8, decoder_causal=False),
    # the connectors read Gemma's 49 hidden states of 3840 and hand the transformer 3840 wide embeddings; the audio VAE
    # makes the audio stream's 128 channels (8 latent channels x 64 mel bins / 4) and 25 tokens a second (16 kHz, hop
    # 160, 4x in time); the vocoder turns its 64 mel bins a channel into 24 kHz sound (240x)
    components=dict(connectors=SPLIT_ROPE, audio_vae={}, vocoder={}),
    text_tokens=MAX_TEXT,
    # the class defaults: 128 latent channels, 1024 wide, 4 residual blocks before and after its x2 spatial upsampling
    # (diffusers' sizes for LTX-2's upsampler; the released latent_upsampler/config.json not read here)
    upsampler={},
)

DISTILLED = TwoStage(
    schedules=distilled_schedules,
    # the outputs: the docs' stage 1 is the family's 768x512, at 121 frames, so the videos are 1536x1024 and standing
    presets="landscape=1536x1024x121,portrait=1024x1536x121",
    # stage 1 at 96x64 and 64x96: the decoder's 2 latent pixels a side (stage 1 is decoded where the start-up times it)
    tiny_presets="landscape=192x128x9,portrait=128x192x9",
    defaults=distilled_defaults,
    call_args=DISTILLED_CALL_ARGS,
    load_upsampler=load_upsampler,
    build_tiny_upsampler=build_tiny_upsampler,
    run=run_distilled,
    upsampler_repo="Lightricks/LTX-2",  # diffusers' LTX-2 docs load the upsampler from there
)

LTX2 = Family(
    name="ltx2",
    pipelines=("LTX2Pipeline",),
    # the pipeline's default size, 768x512 at 121 frames (5 s at 24 fps), and the same size standing
    presets="landscape=768x512x121,portrait=512x768x121",
    # the decoder reflect-pads its latents: each side needs 2 latent pixels or more
    tiny_presets="landscape=96x64x9,portrait=64x96x9,square=64x64x9",
    multiple=32,  # the VAE downsamples 32x and the transformer takes one latent pixel per token
    text=Text.FIXED,
    defaults=defaults,
    build_tiny=build_tiny,
    prompt_tokens=prompt_tokens,
    shares_programs_by_token_count=False,  # the grid and the frame rate reach the transformer as Python numbers
    negative_prompt_arg="negative_prompt",
    # per token at batch one: measured on the H100 (RESULTS.md run 26, 768x512x121, CFG's batch of two), 1.22 of the
    # estimate's eager call and 1.09 of its compiled one; 1.25, so that neither under-asks ZeroGPU, which ends a task
    # at its duration (by parameters, 18.9B against FLUX.1-dev's 11.9B, it was 1.6: 46% long compiled)
    step_cost=1.25,
    # Activations: FLUX's measured image figure per token (3 GiB at 4096 tokens, its VAE's decode included). The call
    # alone counts 147 KiB a token at batch one on the meta device (torch's MemTracker, real sizes, 6,144 and 24,576
    # tokens alike), twice that in CFG's batch of two: 1.7 GiB at 768x512x121, under the image figure's 4.5; but the
    # VAE's decode at these sizes is unmeasured, and TI2V-5B's measured decode held more than FLUX's 3 GiB (RESULTS.md
    # run 25), so the higher figure stays
    cfg_batched=True,  # pipeline_ltx2.py concatenates the latents and the prompts in two: one call a step
    # its do_classifier_free_guidance: the video's guidance above 1 or the audio's, which CALL_ARGS keeps at 7.0
    cfg_always=f"the sound track's guidance stays at {AUDIO_GUIDANCE}",
    call_args=call_args,
    # 8k+1 frames: the VAE folds 8 frames into one latent frame after the first
    video=Video(fps=24, max_frames=121, frame_step=8, audio_rate=audio_rate),
    distilled=DISTILLED,
    real_size=REAL_SIZE,
)


def build_tiny_i2v():
    """tiny-ltx2's components in an LTX2ImageToVideoPipeline."""
    from diffusers import LTX2ImageToVideoPipeline

    return LTX2ImageToVideoPipeline(**build_tiny().components)


LTX2_I2V = dataclasses.replace(
    LTX2,
    name="ltx2-i2v",
    pipelines=("LTX2ImageToVideoPipeline",),
    build_tiny=build_tiny_i2v,
    **FIRST_FRAME_INPUT,
)
