"""Every knob of the template, read from the environment once, plus the model it names.

One source of truth: the resolution presets, the allowed input ranges and the compile options all live
here, and `app.py` and `optimization.py` only read them.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger("aot-space")

DEFAULT_MODEL_ID = "black-forest-labs/FLUX.1-dev"
TINY_MODEL_ID = "tiny"  # the built-in random-weight pipeline: no download, no GPU

# Presets are (label, width, height). FLUX wants sides that are multiples of 16 (8x VAE, 2x2 patches).
REAL_PRESETS = "square=1024x1024,portrait=832x1216,landscape=1216x832"
TINY_PRESETS = "square=64x64,portrait=48x80,landscape=80x48"

MAX_SEED = 2**31 - 1
MAX_STEPS = 50
MAX_GUIDANCE = 20.0
MAX_PROMPT_CHARS = 2000  # a cheap bound before tokenising; the token limit is checked too

QUANTIZATION_CHOICES = ("auto", "fp8", "int8", "int4", "none")
# Low-VRAM mode (optimization.choose_memory_plan): "auto" turns it on when the pipeline does not fit the GPU,
# "on" forces it, "stream" forces streaming the transformer's blocks from host memory, "off" never.
LOW_VRAM_CHOICES = ("auto", "on", "stream", "off")
COMPILE_CHOICES = ("auto", "aoti", "none")
# "model": one program for the whole transformer, the fastest per step (H100, fp8: 98 ms vs 109 ms);
# "blocks": regional AoT, one program per repeated block class, half the compile time (102 s vs 199 s).
AOT_SCOPE_CHOICES = ("blocks", "model")
# "auto" picks by hardware; "sdpa" is torch's own scaled_dot_product_attention; the rest are diffusers
# attention backends (`AttentionBackendName`) such as "_native_cudnn", "_native_flash" or "_flash_3_hub".
ATTENTION_DEFAULT = "auto"


@dataclass(frozen=True)
class Preset:
    label: str
    width: int
    height: int

    @property
    def name(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def choice(self) -> str:
        return f"{self.label} {self.name}"

    def image_tokens(self, multiple: int = 16) -> int:
        """Sequence length the transformer sees: one token per `multiple` x `multiple` pixel patch."""
        return (self.width // multiple) * (self.height // multiple)


def parse_presets(text: str, multiple: int = 16) -> tuple[Preset, ...]:
    presets = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        label, _, size = item.rpartition("=")
        try:
            width, height = (int(v) for v in size.lower().split("x"))
        except ValueError:
            raise ValueError(f"PRESETS entry {item!r} is not LABEL=WIDTHxHEIGHT, e.g. square=1024x1024") from None
        if width <= 0 or height <= 0 or width % multiple or height % multiple:
            raise ValueError(f"PRESETS entry {item!r}: width and height must be positive multiples of {multiple}")
        presets.append(Preset(label or f"{width}x{height}", width, height))
    if not presets:
        raise ValueError("PRESETS is empty: give at least one LABEL=WIDTHxHEIGHT")
    if len({(p.width, p.height) for p in presets}) != len(presets) or len({p.label for p in presets}) != len(presets):
        raise ValueError(f"PRESETS has duplicates: {text!r}")
    return tuple(presets)


def _flag(env, name: str, default: bool) -> bool:
    value = env.get(name, "").strip().lower()
    if not value:
        return default
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={value!r}: use 1/0, true/false, yes/no or on/off")


def _choice(env, name: str, choices: tuple[str, ...], default: str) -> str:
    value = env.get(name, "").strip().lower() or default
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}")
    return value


def _positive(env, name: str) -> float | None:
    value = env.get(name, "").strip()
    if not value:
        return None
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not number > 0 or number == float("inf"):
        raise ValueError(f"{name}={value!r}: give a positive number of GiB, e.g. 24")
    return number


@dataclass(frozen=True)
class Settings:
    model_id: str
    revision: str | None
    presets: tuple[Preset, ...]
    quantization: str
    attention: str
    compile: str
    aot_scope: str
    dynamic_shapes: bool
    cache_dir: str
    hub_repo: str | None  # "owner/name@<commit>": precompiled packages to download; opt-in, pinned
    queue_size: int
    low_vram: str = "auto"
    vram_limit_gib: float | None = None  # plan for (and cap the process at) this much GPU memory
    demo_model_reason: str = ""  # why the tiny model runs, when it does

    @property
    def is_tiny(self) -> bool:
        return self.model_id == TINY_MODEL_ID

    @classmethod
    def from_env(cls, env=None, has_cuda: bool | None = None) -> Settings:
        env = os.environ if env is None else env
        if has_cuda is None:
            import torch

            has_cuda = torch.cuda.is_available()
        model_id = env.get("MODEL_ID", "").strip()
        reason = ""
        if not model_id:
            if has_cuda or env.get("SPACE_ID"):
                model_id = DEFAULT_MODEL_ID
            else:
                model_id = TINY_MODEL_ID
                reason = "no MODEL_ID, no GPU and not on a Space"
        elif model_id == TINY_MODEL_ID:
            reason = "MODEL_ID=tiny"
        tiny = model_id == TINY_MODEL_ID
        presets = parse_presets(env.get("PRESETS", "") or (TINY_PRESETS if tiny else REAL_PRESETS))
        settings = cls(
            model_id=model_id,
            revision=env.get("MODEL_REVISION", "").strip() or None,
            presets=presets,
            quantization=_choice(env, "QUANTIZATION", QUANTIZATION_CHOICES, "auto"),
            attention=env.get("ATTENTION", "").strip() or ATTENTION_DEFAULT,
            compile=_choice(env, "COMPILE", COMPILE_CHOICES, "auto"),
            aot_scope=_choice(env, "AOT_SCOPE", AOT_SCOPE_CHOICES, "model"),
            dynamic_shapes=_flag(env, "DYNAMIC_SHAPES", False),
            cache_dir=env.get("AOT_CACHE_DIR", "").strip() or os.path.join(os.getcwd(), ".aot-cache"),
            hub_repo=env.get("AOT_HUB_REPO", "").strip() or None,
            queue_size=int(env.get("QUEUE_SIZE", "32")),
            low_vram=_choice(env, "LOW_VRAM", LOW_VRAM_CHOICES, "auto"),
            vram_limit_gib=_positive(env, "VRAM_LIMIT_GIB"),
            demo_model_reason=reason,
        )
        settings.check()
        return settings

    def check(self) -> None:
        """Conflicting settings fail at startup rather than quietly doing something else."""
        if self.compile == "none" and self.dynamic_shapes:
            raise ValueError("DYNAMIC_SHAPES=1 needs compilation, but COMPILE=none")
        if self.compile == "none" and self.quantization in ("fp8",):
            raise ValueError("QUANTIZATION=fp8 without compilation runs 3x slower than bf16 (benchmarks/RESULTS.md); "
                             "set COMPILE=aoti or auto, or QUANTIZATION=none")
        if self.hub_repo is not None:
            repo, _, revision = self.hub_repo.partition("@")
            if repo.count("/") != 1 or len(revision) != 40 or not all(c in "0123456789abcdef" for c in revision):
                raise ValueError(f"AOT_HUB_REPO={self.hub_repo!r} must be OWNER/NAME@<40-hex commit>: compiled "
                                 "packages contain native code, so only a repo pinned to an exact commit is loaded")
            if self.compile == "none":
                raise ValueError("AOT_HUB_REPO is set but COMPILE=none")
        if self.low_vram == "stream" and self.quantization == "fp8":
            raise ValueError("LOW_VRAM=stream cannot stream fp8 weights (torchao tensors do not survive diffusers' "
                             "group offloading); use QUANTIZATION=int8, int4, none or auto")
        if self.queue_size < 1:
            raise ValueError("QUEUE_SIZE must be at least 1")


@dataclass(frozen=True)
class ModelDefaults:
    """What a pipeline needs per model family, derived from its config rather than its name."""

    steps: int
    guidance: float
    uses_guidance: bool
    max_sequence_length: int


def model_defaults(pipe) -> ModelDefaults:
    # FLUX.1-dev embeds guidance; FLUX.1-schnell does not, is timestep-distilled for 1-4 steps and its
    # text encoder was trained with 256 tokens.
    if pipe.transformer.config.guidance_embeds:
        return ModelDefaults(steps=28, guidance=3.5, uses_guidance=True, max_sequence_length=512)
    return ModelDefaults(steps=4, guidance=0.0, uses_guidance=False, max_sequence_length=256)


def build_tiny_pipeline():
    """A FLUX-architecture pipeline small enough for a laptop CPU, built from configs with random weights.

    It exercises the same code paths as FLUX.1-dev (two text encoders, the MMDiT transformer with its
    double and single blocks, the VAE) and needs no network. Its images are noise: it is a demo of the
    machinery, not of a model.
    """
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    # Byte-level vocabularies: every character of any prompt maps to some token, so no input is "unknown".
    chars = [chr(c) for c in range(32, 127)]
    clip_vocab = {tok: i for i, tok in enumerate(["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)])}
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
    torch.random.set_rng_state(generator_state)
    for module in (transformer, text_encoder, text_encoder_2, vae):
        module.eval()  # built from configs, they start in training mode: dropout would make outputs random
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    )
    return pipe.to(torch.float32)


def _first_line(err: Exception) -> str:
    # diffusers' loading errors point at "the stacktrace above", which this message replaces
    return (str(err).splitlines() or [""])[0].replace(" Please check out the root cause in the stacktrace above.", "")


def load_pipeline(settings: Settings):
    """The pipeline named by MODEL_ID, in host memory: bf16 when a GPU will run it, fp32 on CPU.
    `optimization.optimize_pipeline_` puts it on the GPU (whole, or in low-VRAM mode part by part).
    A model that cannot be loaded stops startup with one message that says which setting to change."""
    import torch

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if settings.is_tiny:
        log.warning("Running the built-in tiny random-weight FLUX pipeline (%s). Its images are noise. "
                    "Set MODEL_ID (e.g. %s) to serve a real model.", settings.demo_model_reason, DEFAULT_MODEL_ID)
        return build_tiny_pipeline()
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(settings.model_id, revision=settings.revision, dtype=dtype)
    except Exception as err:  # noqa: BLE001 - any failure here means the same thing to the user
        raise SystemExit(
            f"Could not load MODEL_ID={settings.model_id!r}"
            f"{f' at MODEL_REVISION={settings.revision!r}' if settings.revision else ''}: "
            f"{type(err).__name__}: {_first_line(err)}\n"
            "Check the id and revision, that the hub is reachable and that HF_TOKEN can read the repo (gated "
            "models such as FLUX.1-dev need their license accepted), or unset MODEL_ID to run the tiny demo."
        ) from None
    if not hasattr(pipe, "transformer"):
        raise SystemExit(f"MODEL_ID={settings.model_id!r} loaded a {type(pipe).__name__} without a transformer; "
                         "this template serves FLUX-style (transformer) pipelines.")
    return pipe
