"""Every knob of the template, read from the environment once.

One source of truth: the allowed input ranges and the compile options live here; a model family's own facts
(its native resolutions, steps, guidance, text length) live in `aot/families/`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_MODEL_ID = "black-forest-labs/FLUX.1-dev"
TINY_PREFIX = "tiny-"  # MODEL_ID=tiny-<family>: that family's built-in random-weight pipeline, offline
TINY_MODEL_ID = "tiny"  # an alias: Settings.model_id reads tiny-flux, so both make one cache key
# MODEL_ID=demo, and the default with no MODEL_ID, no GPU and no Space: a tiny FLUX.1-family model trained on plain
# shapes (assets/train_demo.py), loaded from this folder like any saved pipeline
DEMO_MODEL_ID = "demo"
DEMO_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "demo-model")
DEMO_PRESETS = "square=128x128,portrait=96x160,landscape=160x96"  # the sizes it is trained at: 60-64 image tokens

MAX_SEED = 2**31 - 1
MAX_STEPS = 50
MAX_GUIDANCE = 20.0
MAX_PROMPT_CHARS = 2000  # a cheap bound before tokenising; the token limit is checked too
MAX_FPS = 60  # a video's frame rate: only the encoding's, the frames are the same at any

QUANTIZATION_CHOICES = ("auto", "fp8", "int8", "int4", "none")
# Low-VRAM mode (optimization.choose_memory_plan): "auto" turns it on when the pipeline does not fit the GPU,
# "on" forces it, "stream" forces streaming the transformer's blocks from host memory, "off" never.
LOW_VRAM_CHOICES = ("auto", "on", "stream", "off")
COMPILE_CHOICES = ("auto", "aoti", "none")
# "blocks" (the default): regional AoT, one program per repeated block class: three FLUX presets compile in 47 s
# cold against 237 s per whole-model program, and load in 3 s; replayed through CUDA graphs a step runs at the whole
# model's speed (H100, fp8: 99.0 against 98.05 ms, benchmarks/RESULTS.md run 16). "model": one program for the whole
# transformer.
AOT_SCOPE_CHOICES = ("blocks", "model")
# CUDA_GRAPHS: replay each compiled call shape from a CUDA graph (aot/graphs.py); "auto" is on for CUDA where no step
# cache or low-VRAM streaming decides per call what runs
CUDA_GRAPHS_CHOICES = ("auto", "on", "off")
# "auto" picks by hardware; "sdpa" is torch's own scaled_dot_product_attention; the rest are diffusers
# attention backends (`AttentionBackendName`) such as "_native_cudnn", "_native_flash" or "_flash_3_hub".
ATTENTION_DEFAULT = "auto"
# Several ranks (WORLD_SIZE > 1, README "Several GPUs"): "auto" splits each image across them with Ulysses.
PARALLEL_CHOICES = ("auto", "off", "ulysses", "ring")
# ZEROGPU_SIZE: ZeroGPU's task size on a shared card (aot/zerogpu.py, README "ZeroGPU today"): "large" is half the
# card, "xlarge" all of it at twice the quota; "auto" takes large when the memory plan fits it
ZEROGPU_SIZE_CHOICES = ("auto", "large", "xlarge")
# STEP_CACHE: diffusers' First Block Cache or TaylorSeer around the block programs (aot/step_cache.py, README
# "Step caching"), each with its one parameter: "fbc:THRESHOLD", "taylorseer:INTERVAL"
STEP_CACHE_CHOICES = ("off", "fbc", "taylorseer")
# PROMPT_CACHE: the prompts whose embeddings are kept (aot/prompts.py, README "Prompt cache"); 0 keeps none. 16 holds
# the examples, the blank negative prompt of a true-CFG family and a dozen visitors' current prompts
PROMPT_CACHE_DEFAULT = 16
# LORAS and LORA_CHOICES (aot/lora.py, README "LoRAs"): a LoRA of a higher rank is refused. A LoRA is worth its
# name while its factors are small beside the layers they change: at 256, four times the rank-64 LoRA the figures
# are measured with, FLUX.1's 3072-wide projections already take 1/6 of their own size in factors. Higher, it is a
# fine-tune better served as its own MODEL_ID, and its factors, read whole into host memory at startup, grow with it.
LORA_MAX_RANK = 256
# The LoRA file's safetensors metadata key whose JSON object sets the defaults a fused (distillation) LoRA needs,
# e.g. {"steps": 8, "guidance": 1.0}; a LORAS entry's own ;steps=N;guidance=G options win over it
LORA_DEFAULTS_KEY = "aot_space.defaults"
LORA_NONE = "none"  # the choice that serves the base weights (with LORAS fused, if any)
# RECIPE: "standard" calls the pipeline once at the requested size; "distilled" runs a family's distilled two-stage
# recipe (`Family.distilled`: LTX-2's 8 steps at half the size, an x2 latent upsampler, 3 steps at the size asked for)
# on a distilled checkpoint. Its presets name the output
RECIPE_CHOICES = ("standard", "distilled")
# A LORAS entry's expert=, for a pipeline of two experts: the high-noise one, the low-noise one or both (aot/lora.py).
# Wan 2.2's distillation LoRAs come as one file per expert
EXPERTS = ("high", "low", "both")


@dataclass(frozen=True)
class Preset:
    label: str
    width: int
    height: int
    frames: int = 0  # a video's frame count; 0 for an image

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def name(self) -> str:
        return f"{self.size}x{self.frames}" if self.frames else self.size

    @property
    def choice(self) -> str:
        return f"{self.label} {self.name}"


def parse_presets(text: str, multiple: int, why: str = "") -> tuple[Preset, ...]:
    """`LABEL=WIDTHxHEIGHT` entries (images), or `LABEL=WIDTHxHEIGHTxFRAMES` (videos: `check_frames` says which).
    `why`: the reason for `multiple`, where it is not the model's own token size."""
    presets = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        label, _, size = item.rpartition("=")
        parts = size.lower().split("x")
        if len(parts) not in (2, 3) or not all(part.strip().isdigit() for part in parts):
            raise ValueError(f"PRESETS entry {item!r} is not LABEL=WIDTHxHEIGHT (an image, e.g. square=1024x1024) or "
                             "LABEL=WIDTHxHEIGHTxFRAMES (a video, e.g. landscape=832x480x81)")
        width, height, *frames = map(int, parts)
        if width <= 0 or height <= 0 or width % multiple or height % multiple:
            raise ValueError(f"PRESETS entry {item!r}: width and height must be positive multiples of {multiple}"
                             + (f" ({why})" if why else ""))
        if frames and frames[0] <= 0:
            raise ValueError(f"PRESETS entry {item!r}: the frame count must be positive")
        presets.append(Preset(label or size, width, height, *frames))
    if not presets:
        raise ValueError("PRESETS is empty: give at least one LABEL=WIDTHxHEIGHT")
    if len({(p.width, p.height, p.frames) for p in presets}) != len(presets) or len(
            {p.label for p in presets}) != len(presets):
        raise ValueError(f"PRESETS has duplicates: {text!r}; give each label and each WIDTHxHEIGHT once")
    return tuple(presets)


def frames_refused(frames: int, max_frames: int, step: int) -> str | None:
    """Why a video of `frames` frames cannot be made (its VAE makes `step` * k + 1 frames, at most `max_frames`), or
    None. One rule for PRESETS and for requests."""
    if not 1 <= frames <= max_frames or (frames - 1) % step:
        return (f"{frames} frames: the count must be {step}k+1 (1, {1 + step}, {1 + 2 * step}, ...) and at most "
                f"{max_frames}")
    return None


def check_frames(presets: tuple[Preset, ...], video, family: str) -> None:
    """Every preset of a video family (`video`: its aot.family.Video) gives a frame count the VAE makes; an image
    family's give none."""
    for preset in presets:
        if video is None and preset.frames:
            raise ValueError(f"PRESETS entry {preset.label}={preset.name}: {family} makes images; give WIDTHxHEIGHT")
        if video is not None and not preset.frames:
            raise ValueError(f"PRESETS entry {preset.label}={preset.name}: {family} makes videos; give "
                             f"WIDTHxHEIGHTxFRAMES, e.g. {preset.name}x{video.max_frames}")
        why = video is not None and frames_refused(preset.frames, video.max_frames, video.frame_step)
        if why:
            raise ValueError(f"PRESETS entry {preset.label}={preset.name}: {why}")


@dataclass(frozen=True)
class LoraSpec:
    """One LORAS or LORA_CHOICES entry: `repo_or_path[:weight_name][@revision][=scale][;option=value...]`."""

    source: str  # a Hub repo id, or a local file or folder
    weight_name: str | None = None  # the .safetensors file in the repo or folder
    revision: str | None = None
    scale: float = 1.0
    steps: int | None = None  # LORAS only: the default steps it is made for (a distillation LoRA)
    guidance: float | None = None  # LORAS only: the default guidance (1.0 turns true CFG off)
    # LORAS only, and only for a pipeline of two experts (Wan 2.2 A14B): which one it is fused into, `high` (the
    # high-noise `transformer`), `low` (`transformer_2`) or `both` (EXPERTS)
    expert: str | None = None
    label: str = ""  # LORA_CHOICES only: its name in the page and the API; default: the file's name

    @property
    def name(self) -> str:
        stem = (self.weight_name or self.source).rstrip("/").rsplit("/", 1)[-1]
        return self.label or stem.removesuffix(".safetensors")

    def __str__(self) -> str:
        return (self.source + (f":{self.weight_name}" if self.weight_name else "")
                + (f"@{self.revision}" if self.revision else "") + (f"={self.scale:g}" if self.scale != 1 else ""))


def parse_loras(text: str, name: str) -> tuple[LoraSpec, ...]:
    """LORAS or LORA_CHOICES (`name`): comma-separated `repo_or_path[:weight_name][@revision][=scale]` entries, each
    with options after `;`: steps=N, guidance=G and expert=high|low|both (LORAS), name=LABEL (LORA_CHOICES)."""
    usage = (f"give {name} as comma-separated repo_or_path[:weight_name][@revision][=scale] entries, e.g. "
             "ByteDance/Hyper-SD:Hyper-FLUX.1-dev-8steps-lora.safetensors=0.125")
    options = {"LORAS": ("steps", "guidance", "expert"), "LORA_CHOICES": ("name",)}[name]
    specs = []
    for entry in filter(None, (part.strip() for part in text.split(","))):
        main, *extra = (part.strip() for part in entry.split(";"))
        fields = {}
        for option in extra:
            key, sep, value = option.partition("=")
            if key not in options or not sep or not value:
                raise ValueError(f"{name} entry {entry!r}: option {option!r} is not one of "
                                 f"{', '.join(o + '=...' for o in options)}")
            try:
                fields[{"name": "label"}.get(key, key)] = {"steps": int, "guidance": float}.get(key, str)(value)
            except ValueError:
                raise ValueError(f"{name} entry {entry!r}: {option!r} needs a number") from None
        rest, sep, scale = main.rpartition("=")
        if sep:
            try:
                fields["scale"] = float(scale)
            except ValueError:
                raise ValueError(f"{name} entry {entry!r}: scale {scale!r} is not a number; {usage}") from None
            main = rest
        main, sep, revision = main.partition("@")
        source, sep_name, weight_name = main.partition(":")
        if not source or (sep and not revision) or (sep_name and not weight_name):
            raise ValueError(f"{name} entry {entry!r}: {usage}")
        spec = LoraSpec(source, weight_name or None, revision or None, **fields)
        if not 0 < abs(spec.scale) <= 10 or (spec.steps is not None and not 1 <= spec.steps <= MAX_STEPS) or (
                spec.guidance is not None and not 0 <= spec.guidance <= MAX_GUIDANCE):
            raise ValueError(f"{name} entry {entry!r}: the scale must be non-zero and at most 10 in size, steps from 1 "
                             f"to {MAX_STEPS}, guidance from 0 to {MAX_GUIDANCE}")
        if spec.expert is not None and spec.expert not in EXPERTS:
            raise ValueError(f"{name} entry {entry!r}: expert={spec.expert} is not one of {', '.join(EXPERTS)}")
        specs.append(spec)
    names = [spec.name for spec in specs]
    if name == "LORA_CHOICES" and (len(set(names)) != len(names) or LORA_NONE in names):
        raise ValueError(f"LORA_CHOICES names {', '.join(names)}: each must be unique and not {LORA_NONE!r}; give "
                         "one with ;name=LABEL")
    return tuple(specs)


@dataclass(frozen=True)
class StepCache:
    """STEP_CACHE: the method and its one parameter; None takes diffusers' default for it."""

    method: str = "off"
    threshold: float | None = None  # fbc: relative change of the first block's output below which steps skip
    interval: int | None = None  # taylorseer: one full evaluation every `interval` steps, once warmed up

    def __str__(self) -> str:
        value = self.threshold if self.method == "fbc" else self.interval
        return self.method if value is None else f"{self.method}:{value}"


def parse_step_cache(text: str) -> StepCache:
    """STEP_CACHE's value: off, fbc, fbc:THRESHOLD, taylorseer or taylorseer:INTERVAL."""
    text = text.strip().lower() or "off"
    method, colon, value = text.partition(":")
    usage = (f"STEP_CACHE={text!r} is not one of off, fbc, fbc:THRESHOLD (a number above 0, at most 1, e.g. "
             "fbc:0.08), taylorseer, taylorseer:INTERVAL (a whole number of steps, at least 2, e.g. taylorseer:4)")
    if method not in STEP_CACHE_CHOICES or (method == "off" and colon):
        raise ValueError(usage)
    if not colon:
        return StepCache(method)
    try:
        number = float(value) if method == "fbc" else int(value)
    except ValueError:
        raise ValueError(usage) from None
    if method == "fbc" and 0 < number <= 1:
        return StepCache(method, threshold=number)
    if method == "taylorseer" and number >= 2:
        return StepCache(method, interval=number)
    raise ValueError(usage)


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


def _whole(env, name: str, default: int) -> int:
    value = env.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: give a whole number, e.g. {default}") from None


@dataclass(frozen=True)
class Settings:
    model_id: str
    revision: str | None
    presets_text: str  # PRESETS as given; "" = the family's native resolutions
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
    demo_model_reason: str = ""  # why the demo model or a tiny one runs, when one does
    parallel: str = "auto"  # context parallelism over the launch's ranks (aot/parallel.py)
    world_size: int = 1  # ranks in this launch: WORLD_SIZE, set by the launcher
    hub_upload: str | None = None  # "owner/name": upload what this start compiled there (a token with write access)
    step_cache: StepCache = StepCache()  # STEP_CACHE: diffusers' cache hooks, off by default
    prompt_cache: int = PROMPT_CACHE_DEFAULT  # PROMPT_CACHE: prompts whose embeddings are kept; 0 keeps none
    zerogpu_size: str = "auto"  # ZEROGPU_SIZE: large, xlarge, or auto (large when it fits)
    cuda_graphs: str = "auto"  # CUDA_GRAPHS: on, off, or auto (on where it applies)
    loras: tuple[LoraSpec, ...] = ()  # LORAS: fused into the weights before quantizing and compiling (aot/lora.py)
    lora_choices: tuple[LoraSpec, ...] = ()  # LORA_CHOICES: a visitor picks one, or none, per request
    recipe: str = "standard"  # RECIPE: standard, or distilled (a family's two-stage recipe)
    # UPSAMPLER_ID: the repo or folder whose `latent_upsampler` folder holds the distilled recipe's upsampler; None:
    # MODEL_ID's (at MODEL_REVISION)
    upsampler_id: str | None = None

    @property
    def tiny_family(self) -> str | None:
        """The family whose tiny pipeline runs, or None for a real model."""
        return self.model_id.removeprefix(TINY_PREFIX) if self.model_id.startswith(TINY_PREFIX) else None

    @property
    def demo_model(self) -> bool:
        """Whether a built-in stand-in runs (the trained demo model or a tiny random one) rather than a real model."""
        return self.model_id == DEMO_MODEL_ID or self.tiny_family is not None

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
                model_id = DEMO_MODEL_ID
                reason = "no MODEL_ID, no GPU and not on a Space"
        elif model_id in (TINY_MODEL_ID, DEMO_MODEL_ID) or model_id.startswith(TINY_PREFIX):
            reason = f"MODEL_ID={model_id}"
        if model_id == TINY_MODEL_ID:
            model_id = TINY_PREFIX + "flux"
        presets_text = env.get("PRESETS", "").strip()
        if presets_text:
            parse_presets(presets_text, multiple=1)  # the form now; the family's multiple once it is known
        settings = cls(
            model_id=model_id,
            revision=env.get("MODEL_REVISION", "").strip() or None,
            presets_text=presets_text,
            quantization=_choice(env, "QUANTIZATION", QUANTIZATION_CHOICES, "auto"),
            attention=env.get("ATTENTION", "").strip() or ATTENTION_DEFAULT,
            compile=_choice(env, "COMPILE", COMPILE_CHOICES, "auto"),
            aot_scope=_choice(env, "AOT_SCOPE", AOT_SCOPE_CHOICES, "blocks"),
            dynamic_shapes=_flag(env, "DYNAMIC_SHAPES", False),
            cache_dir=env.get("AOT_CACHE_DIR", "").strip() or os.path.join(os.getcwd(), ".aot-cache"),
            hub_repo=env.get("AOT_HUB_REPO", "").strip() or None,
            hub_upload=env.get("AOT_HUB_UPLOAD", "").strip() or None,
            queue_size=_whole(env, "QUEUE_SIZE", 32),
            low_vram=_choice(env, "LOW_VRAM", LOW_VRAM_CHOICES, "auto"),
            vram_limit_gib=_positive(env, "VRAM_LIMIT_GIB"),
            demo_model_reason=reason,
            parallel=_choice(env, "PARALLEL", PARALLEL_CHOICES, "auto"),
            world_size=_whole(env, "WORLD_SIZE", 1),
            step_cache=parse_step_cache(env.get("STEP_CACHE", "")),
            prompt_cache=_whole(env, "PROMPT_CACHE", PROMPT_CACHE_DEFAULT),
            zerogpu_size=_choice(env, "ZEROGPU_SIZE", ZEROGPU_SIZE_CHOICES, "auto"),
            cuda_graphs=_choice(env, "CUDA_GRAPHS", CUDA_GRAPHS_CHOICES, "auto"),
            loras=parse_loras(env.get("LORAS", ""), "LORAS"),
            lora_choices=parse_loras(env.get("LORA_CHOICES", ""), "LORA_CHOICES"),
            recipe=_choice(env, "RECIPE", RECIPE_CHOICES, "standard"),
            upsampler_id=env.get("UPSAMPLER_ID", "").strip() or None,
        )
        settings.check()
        return settings

    def check(self) -> None:
        """Conflicting settings fail at startup rather than quietly doing something else."""
        if self.compile == "none" and self.dynamic_shapes:
            raise ValueError("DYNAMIC_SHAPES=1 needs compilation, but COMPILE=none; set COMPILE=auto or aoti, "
                             "or DYNAMIC_SHAPES=0")
        if self.compile == "none" and self.quantization in ("fp8",):
            raise ValueError("QUANTIZATION=fp8 without compilation runs 3x slower than bf16 (benchmarks/RESULTS.md); "
                             "set COMPILE=aoti or auto, or QUANTIZATION=none")
        if self.hub_repo is not None:
            repo, _, revision = self.hub_repo.partition("@")
            if repo.count("/") != 1 or len(revision) != 40 or not all(c in "0123456789abcdef" for c in revision):
                raise ValueError(f"AOT_HUB_REPO={self.hub_repo!r} must be OWNER/NAME@<40-hex commit>: compiled "
                                 "packages contain native code, so only a repo pinned to an exact commit is loaded")
            if self.compile == "none":
                raise ValueError("AOT_HUB_REPO is set but COMPILE=none; set COMPILE=auto or aoti, or unset "
                                 "AOT_HUB_REPO")
        if self.hub_upload is not None:
            if self.hub_upload.count("/") != 1 or "@" in self.hub_upload or not all(self.hub_upload.split("/")):
                raise ValueError(f"AOT_HUB_UPLOAD={self.hub_upload!r} must be OWNER/NAME, the model repo to upload "
                                 "compiled programs to (no revision: each upload is a new commit, logged to pin)")
            if self.compile == "none":
                raise ValueError("AOT_HUB_UPLOAD is set but COMPILE=none: nothing is compiled to upload; set "
                                 "COMPILE=auto or aoti, or unset AOT_HUB_UPLOAD")
        if self.step_cache.method != "off" and self.world_size != 1:
            raise ValueError(f"STEP_CACHE={self.step_cache} with {self.world_size} ranks (WORLD_SIZE): First Block "
                             "Cache would decide to skip on each rank's share of the image alone, and neither cache is "
                             "tested under context parallelism; set STEP_CACHE=off, or run one process")
        if self.prompt_cache < 0:
            raise ValueError(f"PROMPT_CACHE={self.prompt_cache}: give a whole number of prompts, e.g. "
                             f"{PROMPT_CACHE_DEFAULT}, or 0 to keep none")
        if self.queue_size < 1:
            raise ValueError(f"QUEUE_SIZE={self.queue_size}: give a whole number of at least 1, e.g. 32")
        if self.world_size < 1:
            raise ValueError(f"WORLD_SIZE={self.world_size}: must be at least 1")
        if self.upsampler_id and self.recipe != "distilled":
            raise ValueError(f"UPSAMPLER_ID is set but RECIPE={self.recipe} runs no latent upsampler; set "
                             "RECIPE=distilled, or unset UPSAMPLER_ID")
        if self.upsampler_id and self.tiny_family:
            raise ValueError(f"UPSAMPLER_ID is set but MODEL_ID={self.model_id} builds its own tiny upsampler; unset "
                             "UPSAMPLER_ID")
        if self.recipe == "distilled" and self.world_size != 1:
            raise ValueError(f"RECIPE=distilled with {self.world_size} ranks (WORLD_SIZE): its two stages are not "
                             "tested under context parallelism; set RECIPE=standard, or run one process")
        # what conflicts with several ranks is checked by aot.parallel.join, which app.py calls next
