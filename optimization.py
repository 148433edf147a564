"""Ahead-of-time compilation of the pipeline's transformer, one program per preset, one copy of the weights.

`optimize_pipeline_(pipe, settings)` is the whole story:
  1. decide attention backend and quantization from the hardware (each fallback is logged and reported);
  2. per distinct preset shape, record the transformer's real inputs with `spaces.aoti_capture`;
  3. quantize, `torch.export` and compile with AOTInductor through `spaces.aoti_compile_and_save`;
  4. load every package with `spaces.aoti_load_from_package_dir`, whose programs read the module's own
     parameters as user-managed constants, and install a dispatcher that picks the program by input shape.
Packages go to a cache directory keyed by everything that makes a program valid, so a restart with the
same key loads instead of compiling.
"""
from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import spaces
import torch

from settings import Preset, Settings

log = logging.getLogger("aot-space")

# Why each option: coordinate-descent tuning picks better Triton tile sizes for FLUX's large matmuls at a
# few minutes of compile; epilogue fusion off avoids slow fused matmul epilogues seen with AOTI on Hopper;
# 1x1 convs as matmuls matter only for the VAE-like parts. CPU compiles ignore the Triton options.
INDUCTOR_CONFIGS = {
    "conv_1x1_as_mm": True,
    "epilogue_fusion": False,
    "coordinate_descent_tuning": True,
    "coordinate_descent_check_all_directions": True,
}
# Bump when a change here alters what a compiled program contains, to invalidate old caches.
CACHE_FORMAT = 1
CAPTURE_PROMPT = "a photo of an astronaut riding a horse on the moon"
FP8_MIN_CAPABILITY = (8, 9)
FA3_CAPABILITY = (9, 0)  # FlashAttention-3 is Hopper-only: not Ampere, not Ada, not Blackwell (sm_100/120)


class UnsupportedShape(ValueError):
    """The transformer was called with a shape no compiled program serves."""


# ---------------------------------------------------------------------------------------------------
# Hardware decisions: pure functions of (request, hardware), unit-tested on CPU.
# ---------------------------------------------------------------------------------------------------
def choose_quantization(requested: str, device: str, capability: tuple[int, int] | None) -> tuple[str, str]:
    """Returns (mode, reason). An explicit request the hardware cannot honour is a startup error."""
    fp8_ok = device == "cuda" and capability is not None and capability >= FP8_MIN_CAPABILITY
    if requested == "fp8" and not fp8_ok:
        raise ValueError(f"QUANTIZATION=fp8 needs a CUDA GPU with compute capability >= 8.9; this is "
                         f"{device} {capability or ''}. Use QUANTIZATION=auto, int8 or none.")
    if requested == "auto":
        if fp8_ok:
            return "fp8", f"auto: compute capability {capability} >= 8.9"
        return "none", f"fallback: fp8 needs CUDA with compute capability >= 8.9, this is {device} {capability or ''}".strip()
    return requested, "requested"


def choose_attention(requested: str, device: str, capability: tuple[int, int] | None,
                     hub_online: bool) -> tuple[str, str]:
    """Returns (backend, reason). "sdpa" means torch's scaled_dot_product_attention, which picks its own
    flash / cuDNN / efficient kernel per call and runs everywhere."""
    if requested != "auto":
        return requested, "requested"
    if device != "cuda":
        return "sdpa", f"fallback: FlashAttention-3 needs a Hopper GPU, this is {device}"
    if capability != FA3_CAPABILITY:
        return "sdpa", f"fallback: FlashAttention-3 needs compute capability 9.0 (Hopper), this is {capability}"
    if not hub_online:
        return "sdpa", "fallback: FlashAttention-3 comes from the hub through `kernels`, and the hub is offline"
    return "_flash_3_hub", "auto: Hopper GPU with hub access"


def choose_compile(requested: str, device: str) -> tuple[str, str]:
    if requested == "auto":
        if device == "cuda":
            return "aoti", "auto: CUDA GPU"
        return "none", "off on CPU by default (COMPILE=aoti compiles the tiny model too, ~20 s per shape)"
    return requested, "requested"


# ---------------------------------------------------------------------------------------------------
# The report shown in the status panel and returned by the /status API.
# ---------------------------------------------------------------------------------------------------
@dataclass
class Report:
    device: str
    dtype: str
    attention: str = "sdpa"
    attention_reason: str = ""
    quantization: str = "none"
    quantization_reason: str = ""
    compile: str = "none"
    compile_reason: str = ""
    compile_source: str = ""  # "compiled now" | "loaded from cache"
    compile_seconds: float = 0.0
    cache_key: str = ""
    programs: list[dict] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)

    def fallback(self, what: str, reason: str) -> None:
        """Every degradation goes through here: logged once, kept for the UI and the API."""
        message = f"{what}: {reason}"
        log.warning("FALLBACK %s", message)
        self.fallbacks.append(message)

    def as_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------
# Dispatch: one program per image-token count, all reading the same weights.
# ---------------------------------------------------------------------------------------------------
class ShapeDispatch:
    """Replaces `transformer.forward`: routes each call to the program compiled for its image-token count.

    Programs are spaces' lazy AOTI models, which load their package on first use and cache it per
    `contextvars` context. Gradio runs every request in a fresh context copy, so all calls are run in
    one private context here: the package is loaded once, not once per request.
    """

    def __init__(self, programs: dict[int, object], dynamic_range: tuple[int, int] | None = None):
        self.programs = dict(programs)
        self.dynamic_range = dynamic_range  # (min, max) tokens served by the single dynamic program
        self._context = contextvars.copy_context()
        self._lock = threading.Lock()

    def program_for(self, tokens: int):
        if self.dynamic_range is not None:
            low, high = self.dynamic_range
            if low <= tokens <= high:
                return next(iter(self.programs.values()))
        elif tokens in self.programs:
            return self.programs[tokens]
        raise UnsupportedShape(f"no compiled program for {tokens} image tokens; compiled: {self.served()}")

    def served(self) -> str:
        if self.dynamic_range is not None:
            return f"{self.dynamic_range[0]}..{self.dynamic_range[1]} tokens"
        return ", ".join(str(t) for t in sorted(self.programs))

    def __call__(self, *args, **kwargs):
        program = self.program_for(kwargs["hidden_states"].shape[1])
        with self._lock:
            return self._context.run(program, *args, **kwargs)


# ---------------------------------------------------------------------------------------------------
# Capture, quantize, export, compile, load.
# ---------------------------------------------------------------------------------------------------
def capture_inputs(pipe, preset: Preset, max_sequence_length: int) -> tuple[tuple, dict]:
    """The transformer's real call for one preset, recorded without running the transformer."""
    with spaces.aoti_capture(pipe.transformer) as call:
        pipe(CAPTURE_PROMPT, width=preset.width, height=preset.height, num_inference_steps=1,
             max_sequence_length=max_sequence_length, output_type="latent")
    return call.args, call.kwargs


def quantize_(transformer: torch.nn.Module, mode: str) -> None:
    if mode == "none":
        return
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Int8WeightOnlyConfig, PerRow
    from torchao.quantization import quantize_ as torchao_quantize_

    config = {
        "fp8": lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
        "int8": lambda: Int8WeightOnlyConfig(),
    }[mode]()
    torchao_quantize_(transformer, config)


def cache_key(pipe, settings: Settings, report: Report, token_counts: list[int], max_sequence_length: int) -> dict:
    """Everything that makes a compiled program valid. A program built under any other value is not reused."""
    if report.device == "cuda":
        arch = "sm_%d%d" % torch.cuda.get_device_capability()
    else:
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        arch = f"cpu-{platform.machine()}-{pick_vec_isa()}"
    return {
        "format": CACHE_FORMAT,
        "model_id": settings.model_id,
        "revision": settings.revision or getattr(pipe.transformer.config, "_commit_hash", None) or "",
        "transformer_config": hashlib.sha256(
            json.dumps(dict(pipe.transformer.config), sort_keys=True, default=str).encode()).hexdigest()[:16],
        "torch": torch.__version__,
        "arch": arch,
        "dtype": report.dtype,
        "quantization": report.quantization,
        "attention": report.attention,
        "dynamic_shapes": settings.dynamic_shapes,
        "image_tokens": token_counts,
        "text_tokens": max_sequence_length,
        "inductor": INDUCTOR_CONFIGS,
    }


def _key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _program_dirs(root: Path) -> dict[int, Path]:
    return {int(p.name.removeprefix("tokens-")): p for p in root.glob("tokens-*") if p.is_dir()}


def read_cached(root: Path, key: dict) -> dict[int, Path] | None:
    """The program directories under `root` if its manifest matches `key` and every package is intact."""
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest["key"] != json.loads(json.dumps(key)):
            log.warning("AOT cache at %s was built for another key; recompiling", root)
            return None
        dirs = _program_dirs(root)
        for name, digest in manifest["sha256"].items():
            if _sha256(root / name) != digest:
                raise ValueError(f"{name} does not match its checksum")
        if sorted(dirs) != sorted(key["image_tokens"]) and not key["dynamic_shapes"]:
            raise ValueError("programs missing")
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
        log.warning("AOT cache at %s is unusable (%s); recompiling", root, err)
        return None
    return dirs


def compile_programs(pipe, settings: Settings, token_presets: dict[int, Preset], max_sequence_length: int,
                     out_dir: Path) -> None:
    """Capture, export and AOT-compile the (already quantized) transformer; one package per token count."""
    captured = {tokens: capture_inputs(pipe, preset, max_sequence_length) for tokens, preset in token_presets.items()}
    if settings.dynamic_shapes:
        # One program over the image-token axis, traced at the largest preset. Inductor cannot assume the
        # length, so some kernels are slower than in the static programs.
        tokens = max(captured)
        args, kwargs = captured[tokens]
        dim = torch.export.Dim("image_tokens", min=min(captured), max=max(2 * tokens, 16))
        shapes = {name: None for name in kwargs}
        shapes["hidden_states"] = {1: dim}
        shapes["img_ids"] = {0: dim}
        captured = {tokens: (args, kwargs)}
        specs = {tokens: shapes}
    else:
        specs = {tokens: None for tokens in captured}
    for tokens, (args, kwargs) in captured.items():
        t0 = time.perf_counter()
        exported = torch.export.export(pipe.transformer, args=args, kwargs=kwargs, dynamic_shapes=specs[tokens])
        t1 = time.perf_counter()
        spaces.aoti_compile_and_save(out_dir / f"tokens-{tokens}", exported, inductor_configs=INDUCTOR_CONFIGS)
        log.info("compiled %d-token program: export %.1f s, compile %.1f s", tokens, t1 - t0, time.perf_counter() - t1)


def install_programs_(transformer: torch.nn.Module, program_dirs: dict[int, Path],
                      dynamic_range: tuple[int, int] | None = None) -> ShapeDispatch:
    """Loads each package against the module's own parameters and installs the shape dispatcher."""
    programs = {}
    for tokens, path in sorted(program_dirs.items()):
        spaces.aoti_load_from_package_dir(transformer, path)  # sets transformer.forward to a lazy program
        programs[tokens] = transformer.forward
    dispatch = ShapeDispatch(programs, dynamic_range)
    transformer.forward = dispatch
    return dispatch


def optimize_pipeline_(pipe, settings: Settings, max_sequence_length: int) -> Report:
    """Makes `pipe.transformer` fast in place and reports what was done and what fell back."""
    device = pipe.transformer.device.type
    capability = torch.cuda.get_device_capability() if device == "cuda" else None
    report = Report(device=f"cuda: {torch.cuda.get_device_name()} sm_{capability[0]}{capability[1]}" if capability else device,
                    dtype=str(pipe.transformer.dtype).removeprefix("torch."))

    hub_online = os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes")
    report.attention, report.attention_reason = choose_attention(settings.attention, device, capability, hub_online)
    if report.attention != "sdpa":
        try:
            pipe.transformer.set_attention_backend(report.attention)
        except Exception as err:  # noqa: BLE001 - a missing kernel or package: any failure means "use SDPA"
            report.fallback("attention", f"{report.attention} unavailable ({type(err).__name__}: {err}); using sdpa")
            pipe.transformer.set_attention_backend("native")
            report.attention = "sdpa"
    elif report.attention_reason.startswith("fallback"):
        report.fallback("attention", report.attention_reason.removeprefix("fallback: "))

    report.compile, report.compile_reason = choose_compile(settings.compile, device)
    report.quantization, report.quantization_reason = choose_quantization(settings.quantization, device, capability)
    if report.quantization_reason.startswith("fallback"):
        report.fallback("quantization", report.quantization_reason.removeprefix("fallback: "))
    try:
        quantize_(pipe.transformer, report.quantization)
    except Exception as err:  # noqa: BLE001 - serve unquantized rather than not at all, and say so
        report.fallback("quantization", f"{report.quantization} failed ({type(err).__name__}: {err}); unquantized")
        report.quantization = "none"
    if report.compile == "none":
        if report.compile_reason.startswith("off"):
            report.fallback("compile", report.compile_reason)
        return report

    token_presets: dict[int, Preset] = {}
    for preset in settings.presets:
        token_presets.setdefault(preset.image_tokens(pipe.vae_scale_factor * 2), preset)
    key = cache_key(pipe, settings, report, sorted(token_presets), max_sequence_length)
    report.cache_key = _key_digest(key)
    root = Path(settings.cache_dir) / report.cache_key
    t0 = time.perf_counter()
    try:
        program_dirs = read_cached(root, key)
        if program_dirs is None:
            # Only picklable values cross into the GPU worker; the pipeline is reached through the closure.
            @spaces.GPU(duration=1500)
            def compile_on_gpu(root: str) -> None:
                _compile_into_cache(pipe, settings, token_presets, max_sequence_length, Path(root), key)

            compile_on_gpu(str(root))
            program_dirs = _program_dirs(root)
            report.compile_source = "compiled now"
        else:
            report.compile_source = "loaded from cache"
        dynamic_range = (min(token_presets), max(2 * max(token_presets), 16)) if settings.dynamic_shapes else None
        dispatch = install_programs_(pipe.transformer, program_dirs, dynamic_range)
        _warm_up(pipe, dispatch, token_presets, max_sequence_length)
    except Exception as err:  # noqa: BLE001 - the app must keep serving, eagerly, and say why
        report.fallback("compile", f"AoT compilation failed, serving eager ({type(err).__name__}: {err})")
        _restore_eager_(pipe.transformer)
        report.compile, report.compile_source = "none", ""
        return report
    report.compile_seconds = round(time.perf_counter() - t0, 1)
    report.programs = [{"image_tokens": tokens, "resolutions": [p.name for p in settings.presets
                                                               if p.image_tokens(pipe.vae_scale_factor * 2) == tokens]}
                       for tokens in sorted(token_presets)]
    log.info("AoT: %s in %.1f s, cache key %s, programs %s", report.compile_source, report.compile_seconds,
             report.cache_key, dispatch.served())
    return report


def _compile_into_cache(pipe, settings, token_presets, max_sequence_length, root: Path, key: dict) -> None:
    """Compiles into a temporary directory and renames it into place, so a crash never leaves a
    half-written cache entry that looks complete."""
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
    try:
        compile_programs(pipe, settings, token_presets, max_sequence_length, staging)
        packages = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*.pt2"))
        manifest = {"key": key, "sha256": {name: _sha256(staging / name) for name in packages}}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1))
        shutil.rmtree(root, ignore_errors=True)
        staging.rename(root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _warm_up(pipe, dispatch: ShapeDispatch, token_presets: dict[int, Preset], max_sequence_length: int) -> None:
    """Loads every program now (not on the first request) and proves each runs and gives finite output."""
    for tokens, preset in token_presets.items():
        args, kwargs = capture_inputs(pipe, preset, max_sequence_length)
        with torch.inference_mode():
            out = dispatch(*args, **kwargs)[0]
        if not torch.isfinite(out).all():
            raise RuntimeError(f"the {tokens}-token program returned non-finite values")


def _restore_eager_(transformer: torch.nn.Module) -> None:
    transformer.__dict__.pop("forward", None)
