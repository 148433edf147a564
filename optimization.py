"""Ahead-of-time compilation of the pipeline's transformer: one program per preset shape, one copy of weights.

`optimize_pipeline_(pipe, settings, max_sequence_length)` is the whole story:
  0. put the pipeline on the GPU, or, when it does not fit (low-VRAM mode), quantize the transformer to
     fit and stream the text encoders (and if need be the transformer's blocks) from host memory;
  1. choose attention backend, quantization and compilation from the hardware (fallbacks are reported);
  2. for each distinct preset shape, record real inputs with `spaces.aoti_capture`;
  3. `torch.export` and compile with AOTInductor through `spaces.aoti_compile_and_save`, either the whole
     transformer or, regionally, one program per repeated block class;
  4. load the packages with `spaces.aoti_load_from_package_dir`, whose programs read the modules' own
     parameters as user-managed constants, and put a dispatcher on each patched module that picks the
     program from the input shape.
Packages live in a cache directory keyed by everything that makes a program valid: a restart with the same
key loads them instead of compiling.
"""
from __future__ import annotations

import contextvars
import gc
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
import torch.fx.experimental.proxy_tensor
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from settings import Preset, Settings

log = logging.getLogger("aot-space")

# Why each option: 1x1 convs as matmuls and no epilogue fusion follow the zerogpu-aoti recipe. Coordinate-
# descent tuning is forced off: it benchmarks every Triton kernel at compile time (~3 s each), which made
# fp8 compiles look stalled (benchmarks/RESULTS.md), and torchao's quantize_ turns it on globally otherwise.
INDUCTOR_CONFIGS = {
    "conv_1x1_as_mm": True,
    "epilogue_fusion": False,
    "coordinate_descent_tuning": False,
    "coordinate_descent_check_all_directions": False,
}
CACHE_FORMAT = 3  # bump when a change here alters what a compiled program contains
CAPTURE_PROMPT = "a photo of an astronaut riding a horse on the moon"
FP8_MIN_CAPABILITY = (8, 9)  # Ada and newer have fp8 tensor cores
GROUP_SIZE = 128  # int4: inputs per scale
GiB = 2**30
FA3_CAPABILITY = (9, 0)  # FlashAttention-3 is Hopper-only: not Ampere, Ada or Blackwell (sm_100/sm_120)


class UnsupportedShape(ValueError):
    """The transformer was called with a shape that no compiled program serves."""


# ---------------------------------------------------------------------------------------------------
# Hardware decisions: pure functions of (request, hardware), unit-tested on CPU.
# ---------------------------------------------------------------------------------------------------
def choose_quantization(requested: str, device: str, capability: tuple[int, int] | None) -> tuple[str, str]:
    """Returns (mode, reason). An explicit request the hardware cannot honour is a startup error."""
    fp8_ok = device == "cuda" and capability is not None and capability >= FP8_MIN_CAPABILITY
    if requested == "fp8" and not fp8_ok:
        raise ValueError(f"QUANTIZATION=fp8 needs a CUDA GPU with compute capability >= 8.9; this is "
                         f"{device} {capability or ''}. Use QUANTIZATION=auto, int8 or none.")
    if requested != "auto":
        return requested, "requested"
    if fp8_ok:
        return "fp8", f"auto: compute capability {capability} >= 8.9"
    return "none", f"fallback: fp8 needs CUDA with compute capability >= 8.9, this is {device} {capability or ''}".strip()


def choose_attention(requested: str, device: str, capability: tuple[int, int] | None,
                     hub_online: bool) -> tuple[str, str]:
    """Returns (backend, reason). "sdpa" is torch's scaled_dot_product_attention, which picks its own
    flash / cuDNN / memory-efficient kernel per call and runs everywhere."""
    if requested != "auto":
        return requested, "requested"
    if device != "cuda":
        return "sdpa", f"fallback: FlashAttention-3 needs a Hopper GPU, this is {device}"
    if capability != FA3_CAPABILITY:
        return "sdpa", f"fallback: FlashAttention-3 needs compute capability (9, 0) (Hopper), this is {capability}"
    if not hub_online:
        return "sdpa", "fallback: FlashAttention-3 comes from the hub through `kernels`, and the hub is offline"
    return "_flash_3_hub", "auto: Hopper GPU with hub access"


def choose_compile(requested: str, device: str) -> tuple[str, str]:
    if requested != "auto":
        return requested, "requested"
    if device == "cuda":
        return "aoti", "auto: CUDA GPU"
    return "none", "off on CPU by default (COMPILE=aoti compiles the tiny model too, ~20 s per program)"


# ---------------------------------------------------------------------------------------------------
# Memory: does the pipeline fit the GPU, and if not, the fastest way it does (low-VRAM mode).
# ---------------------------------------------------------------------------------------------------
ACTIVATION_BYTES_PER_TOKEN = 3 * GiB // 4096  # FLUX at 1024x1024: ~2.4 GiB above the weights (RESULTS.md)
SLACK_BYTES = GiB  # CUDA context, allocator fragmentation


@dataclass(frozen=True)
class Footprint:
    """Bytes the pipeline needs on the GPU, per transformer weight format ("none" = as loaded)."""

    transformer: dict[str, int]  # all its weights
    largest_block: dict[str, int]  # the largest repeated block: streaming holds about three on the GPU
    outside_blocks: dict[str, int]  # embedders and output layers: streamed as one group
    text_encoders: int  # all of them
    largest_text_block: int
    other: int  # the VAE and anything else: always resident
    activations: int

    def need(self, mode: str | None, stream: bool = False) -> int:
        """mode None: everything resident as loaded. Otherwise the low-VRAM layout: text encoders streamed,
        the transformer quantized to `mode`, and resident or streamed."""
        if mode is None:
            return self.transformer["none"] + self.text_encoders + self.other + self.activations + SLACK_BYTES
        weights = 3 * self.largest_block[mode] + self.outside_blocks[mode] if stream else self.transformer[mode]
        return weights + 2 * self.largest_text_block + self.other + self.activations + SLACK_BYTES


@dataclass(frozen=True)
class MemoryPlan:
    low_vram: bool = False
    quantization: str = ""  # the transformer's weight format; "" = not decided here
    stream: bool = False  # transformer blocks streamed from pinned host memory, one block ahead
    budget_gib: float | None = None
    need_gib: float = 0.0
    reason: str = ""


def choose_memory_plan(requested: str, quantization: str, footprint: Footprint, budget: int | None,
                       fp8_ok: bool) -> MemoryPlan:
    """Pure: the fastest layout that fits `budget` bytes. Candidates, fastest first (benchmarks/RESULTS.md,
    run 7): resident fp8 (where it runs), bf16, int8 (when fp8 does not run), int4; then streamed int8, int4,
    bf16. Text encoders are streamed in every low-VRAM layout."""
    gib = lambda n: round(n / GiB, 1)  # noqa: E731
    full = footprint.need(None)
    if requested == "off" or (budget is None and requested == "auto"):
        why = "LOW_VRAM=off" if requested == "off" else "no GPU memory limit to plan for"
        return MemoryPlan(budget_gib=budget and gib(budget), need_gib=gib(full), reason=why)
    if requested == "auto" and full <= budget:
        return MemoryPlan(budget_gib=gib(budget), need_gib=gib(full),
                          reason=f"fits: {gib(full)} of {gib(budget)} GiB")
    resident = ["fp8", "none", "int4"] if fp8_ok else ["none", "int8", "int4"]
    streamed = ["int8", "int4", "none"]
    if quantization != "auto":
        resident, streamed = [quantization], [quantization] if quantization != "fp8" else []
    candidates = ([] if requested == "stream" else [(m, False) for m in resident]) + [(m, True) for m in streamed]
    if not candidates:
        raise ValueError("QUANTIZATION=fp8 cannot be streamed; use int8, int4 or none with LOW_VRAM=stream")
    budget_text = f"{gib(budget)} GiB" if budget else "no known limit"
    why = (f"the whole pipeline needs {gib(full)} GiB, {budget_text} available" if requested == "auto"
           else f"LOW_VRAM={requested}")
    for mode, stream in candidates:
        need = footprint.need(mode, stream)
        if budget is None or need <= budget:
            return MemoryPlan(True, mode, stream, budget and gib(budget), gib(need), why)
    mode, stream = min(candidates, key=lambda candidate: footprint.need(*candidate))
    need = footprint.need(mode, stream)
    return MemoryPlan(True, mode, stream, gib(budget), gib(need),
                      f"{why}; nothing fits, so the smallest layout runs ({gib(need)} GiB): it may run out of memory")


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _weight_bytes(module: torch.nn.Module, mode: str) -> int:
    """The module's weights after quantizing its Linear layers to `mode`, without quantizing anything."""
    per_weight = {"none": None, "fp8": 1.0, "int8": 1.0, "int4": 0.5 + 4 / GROUP_SIZE}[mode]
    total = _bytes(module.buffers())
    for sub in module.modules():
        for name, p in sub.named_parameters(recurse=False):
            quantized = per_weight is not None and name == "weight" and _quantizable(sub, mode)
            total += int(p.numel() * per_weight + 4 * sub.out_features) if quantized else _bytes([p])
    return total


def _block_lists(module: torch.nn.Module) -> dict[str, torch.nn.ModuleList]:
    """The outermost ModuleLists, by name: a model's repeated blocks (not the lists inside a block)."""
    lists: dict[str, torch.nn.ModuleList] = {}
    for name, sub in module.named_modules():  # parents come before children
        if isinstance(sub, torch.nn.ModuleList) and len(sub) and not any(name.startswith(f"{n}.") for n in lists):
            lists[name] = sub
    return lists


def measure_footprint(pipe, settings: Settings) -> Footprint:
    modes = ("none", "fp8", "int8", "int4")
    transformer = pipe.transformer
    blocks = [block for blocks in _block_lists(transformer).values() for block in blocks]
    weights = {mode: _weight_bytes(transformer, mode) for mode in modes}
    block_bytes = {mode: [_weight_bytes(b, mode) for b in blocks] for mode in modes}
    texts = [m for name, m in pipe.components.items() if name.startswith("text_encoder") and m is not None]
    text_blocks = [block for text in texts for blocks in _block_lists(text).values() for block in blocks]
    multiple = pipe.vae_scale_factor * 2
    return Footprint(
        transformer=weights,
        largest_block={mode: max(block_bytes[mode], default=0) for mode in modes},
        outside_blocks={mode: weights[mode] - sum(block_bytes[mode]) for mode in modes},
        text_encoders=sum(_weight_bytes(t, "none") for t in texts),
        largest_text_block=max((_weight_bytes(b, "none") for b in text_blocks), default=0),
        other=sum(_weight_bytes(m, "none") for name, m in pipe.components.items()
                  if isinstance(m, torch.nn.Module) and name != "transformer" and m not in texts),
        activations=ACTIVATION_BYTES_PER_TOKEN * max(p.image_tokens(multiple) for p in settings.presets),
    )


def _stream_(module: torch.nn.Module, device: str) -> None:
    """diffusers' group offloading: each block's weights live in pinned host memory and are copied in on a
    side CUDA stream while the previous block computes, then dropped. It is applied to the module that
    holds the block list (T5's `encoder`, CLIP's `text_model.encoder`, the transformer itself: its nested
    mode breaks with streams in diffusers 0.42); whatever lies outside those stays resident."""
    from diffusers.hooks import apply_group_offloading

    holders = [module.get_submodule(name.rpartition(".")[0]) for name in _block_lists(module)]
    on_gpu = device == "cuda"
    streamed = set()
    for holder in dict.fromkeys(holders):
        if on_gpu:  # pin in place, one tensor at a time: diffusers would otherwise pin a second full copy
            for tensor in [*holder.parameters(), *holder.buffers()]:
                if not tensor.is_pinned():
                    tensor.data = tensor.data.pin_memory()
        apply_group_offloading(holder, onload_device=torch.device(device), offload_type="block_level",
                               num_blocks_per_group=1, use_stream=on_gpu, record_stream=on_gpu)
        streamed.update(map(id, [*holder.parameters(), *holder.buffers()]))
    for tensor in [*module.parameters(), *module.buffers()]:
        if id(tensor) not in streamed:
            tensor.data = tensor.data.to(device)


def plan_memory(pipe, settings: Settings, device: str, capability, report: Report) -> MemoryPlan:
    """Chooses the layout, applies VRAM_LIMIT_GIB as a hard cap on this process, and reports the choice."""
    if settings.quantization != "auto":  # the same startup error as without low-VRAM mode (fp8 on Ampere)
        choose_quantization(settings.quantization, device, capability)
    budget = None
    if device == "cuda" and not spaces.config.Config.zero_gpu:  # ZeroGPU's main process sees no real GPU
        total = torch.cuda.get_device_properties(0).total_memory
        budget = total
        if settings.vram_limit_gib:
            budget = min(total, int(settings.vram_limit_gib * GiB))
            torch.cuda.set_per_process_memory_fraction(budget / total)
    fp8_ok = capability is not None and capability >= FP8_MIN_CAPABILITY and report.compile == "aoti"
    plan = choose_memory_plan(settings.low_vram, settings.quantization, measure_footprint(pipe, settings), budget, fp8_ok)
    report.memory = asdict(plan)
    if plan.low_vram:
        layout = f"{plan.quantization} weights, {'streamed' if plan.stream else 'resident'}"
        report.fallback("memory", f"low-VRAM mode ({plan.reason}): {layout}, text encoders streamed; "
                                  f"needs about {plan.need_gib} GiB")
    return plan


def place_pipeline_(pipe, plan: MemoryPlan, device: str) -> None:
    """Puts the pipeline on `device`: whole, or in the low-VRAM layout `plan` describes."""
    if not plan.low_vram:
        pipe.to(device)
        return
    for name, module in pipe.components.items():
        if name.startswith("text_encoder") and module is not None:
            _stream_(module, device)
        elif isinstance(module, torch.nn.Module) and name != "transformer":
            module.to(device)
    transformer = pipe.transformer
    if plan.stream:
        quantize_(transformer, plan.quantization, work_device=device, result_device="cpu")
        _stream_(transformer, device)
    else:
        quantize_(transformer, plan.quantization, work_device=device, result_device=device)
        transformer.to(device)


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
    compile_scope: str = ""  # "model" | "blocks"
    compile_source: str = ""  # "compiled now" | "loaded from cache" | "1 of 2 programs compiled now, ..."
    compile_seconds: float = 0.0
    cache_keys: list[str] = field(default_factory=list)  # one cache entry per program
    programs: list[dict] = field(default_factory=list)
    memory: dict = field(default_factory=dict)  # the MemoryPlan: low-VRAM mode or not, and why
    fallbacks: list[str] = field(default_factory=list)

    def fallback(self, what: str, reason: str) -> None:
        """Every degradation goes through here: logged once, kept for the UI and the API."""
        message = f"{what}: {reason.splitlines()[0][:300]}"
        log.warning("FALLBACK %s", message)
        self.fallbacks.append(message)

    def as_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------
# Dispatch: one program per image-token count, all reading the same weights.
# ---------------------------------------------------------------------------------------------------
class ProgramRunner:
    """Runs compiled programs in one private `contextvars` context.

    spaces' lazy AOTI models load their package on first use and cache it per context. Gradio runs each
    request in a fresh context copy, so without this every request would load every package again.
    """

    def __init__(self):
        self._context = contextvars.copy_context()
        self._lock = threading.Lock()  # a context can be entered by one thread at a time

    def __call__(self, program, *args, **kwargs):
        with self._lock:
            return self._context.run(program, *args, **kwargs)


class ShapeDispatch:
    """Replaces a module's `forward`: routes each call to the program for its image-token count."""

    def __init__(self, programs: dict[int, object], runner: ProgramRunner, token_range: tuple[int, int] | None = None):
        self.programs = dict(programs)
        self.runner = runner
        self.token_range = token_range  # set when one dynamic-shape program serves a range of lengths

    def program_for(self, tokens: int):
        if self.token_range is not None and self.token_range[0] <= tokens <= self.token_range[1]:
            return next(iter(self.programs.values()))
        if self.token_range is None and tokens in self.programs:
            return self.programs[tokens]
        served = (f"{self.token_range[0]}..{self.token_range[1]}" if self.token_range
                  else ", ".join(map(str, sorted(self.programs))))
        raise UnsupportedShape(f"no compiled program for {tokens} image tokens (compiled: {served})")

    def __call__(self, *args, **kwargs):
        return self.runner(self.program_for(kwargs["hidden_states"].shape[1]), *args, **kwargs)


# ---------------------------------------------------------------------------------------------------
# Capture, quantize, export, compile, load.
# ---------------------------------------------------------------------------------------------------
def compile_targets(transformer: torch.nn.Module, scope: str) -> dict[str, torch.nn.Module]:
    """What to export, keyed by the submodule name that `spaces.aoti_compile_and_save` files it under.

    "model": the whole transformer (key ""). "blocks": regional compilation, one program per repeated
    block class (diffusers lists them in `_repeated_blocks`), traced on the first block of its
    `ModuleList` and installed on every block there, each block reading its own weights.
    """
    if scope == "model":
        return {"": transformer}
    repeated = getattr(transformer, "_repeated_blocks", ())
    targets = {name: module[0] for name, module in transformer.named_children()
               if isinstance(module, torch.nn.ModuleList) and len(module) and type(module[0]).__name__ in repeated}
    if not targets:
        raise ValueError(f"{type(transformer).__name__} declares no repeated blocks; use AOT_SCOPE=model")
    return targets


def capture_inputs(pipe, module: torch.nn.Module, preset: Preset, max_sequence_length: int) -> tuple[tuple, dict]:
    """`module`'s real first call for one preset, recorded without running it."""
    with spaces.aoti_capture(module) as call:
        pipe(CAPTURE_PROMPT, width=preset.width, height=preset.height, num_inference_steps=1,
             max_sequence_length=max_sequence_length, output_type="latent")
    return call.args, call.kwargs


class WeightOnlyLinear(torch.nn.Module):
    """A Linear whose weight is stored in 8 or 4 bits and dequantized on the fly (W8A16 / W4A16).

    int8: one scale per output row, symmetric. int4: groups of GROUP_SIZE inputs, each with a scale and a
    minimum in the model's dtype (the GPTQ layout, rounded to nearest), two codes per byte. Every call
    rebuilds the weight in the activation dtype and runs the dense GEMM; AOTInductor compiles the unpacking
    with the rest (int8, H100: 149 ms per FLUX step compiled, 243 ms eager). torchao's int4 kernel
    (tinygemm) is built for a few tokens and ran 11.7x slower than bf16 at FLUX's 4096 image tokens
    (benchmarks/RESULTS.md). Plain tensors, so export, streaming and CPU just work.
    """

    def __init__(self, linear: torch.nn.Linear, bits: int):
        super().__init__()
        self.in_features, self.out_features, self.bits = linear.in_features, linear.out_features, bits
        weight, dtype = linear.weight.detach().float(), linear.weight.dtype
        if bits == 8:
            scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
            codes, low = torch.round(weight / scale).clamp(-127, 127).to(torch.int8), None
        else:
            groups = weight.reshape(self.out_features, -1, GROUP_SIZE)
            low = groups.amin(-1, keepdim=True)
            scale = ((groups.amax(-1, keepdim=True) - low) / 15).clamp(min=1e-12)
            q = torch.round((groups - low) / scale).clamp(0, 15).to(torch.uint8).reshape(self.out_features, -1)
            codes = q[:, 0::2] | (q[:, 1::2] << 4)
        as_param = lambda t: torch.nn.Parameter(t.contiguous(), requires_grad=False)  # noqa: E731
        self.codes, self.scale = as_param(codes), as_param(scale.to(dtype))
        self.low = as_param(low.to(dtype)) if low is not None else None
        self.bias = linear.bias

    def weight(self) -> torch.Tensor:
        if self.bits == 8:
            return self.codes.to(self.scale.dtype) * self.scale
        q = torch.stack((self.codes & 15, self.codes >> 4), dim=-1).reshape(self.out_features, -1, GROUP_SIZE)
        return (q.to(self.scale.dtype) * self.scale + self.low).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight(), self.bias)


def _quantizable(linear: torch.nn.Module, mode: str) -> bool:
    return type(linear) is torch.nn.Linear and (mode != "int4" or linear.in_features % GROUP_SIZE == 0)


def quantize_(transformer: torch.nn.Module, mode: str, work_device: str | None = None,
              result_device: str | None = None) -> None:
    """Quantizes the Linear weights in place, layer by layer: each is moved to `work_device` (a GPU does
    it in seconds), quantized, and left on `result_device` (the host, to stream it); default: where it is."""
    if mode == "none":
        return
    if mode == "fp8":
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow
        from torchao.quantization import quantize_ as torchao_quantize_

        # set_inductor_config=False: keep torchao from switching on global Inductor tuning (see INDUCTOR_CONFIGS)
        config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
        torchao_quantize_(transformer, config, device=work_device)
        return
    # by name, so no list keeps the replaced bf16 layers (on the work device) alive until the end
    for path in [path for path, module in transformer.named_modules() if _quantizable(module, mode)]:
        parent_path, _, name = path.rpartition(".")
        parent = transformer.get_submodule(parent_path)
        linear = getattr(parent, name)
        home = linear.weight.device
        quantized = WeightOnlyLinear(linear.to(work_device or home), {"int8": 8, "int4": 4}[mode])
        setattr(parent, name, quantized.to(result_device or home))
        del linear


def dequantize_(transformer: torch.nn.Module) -> None:
    """Puts plain weights back where quantization left tensor subclasses."""
    for module in transformer.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and is_traceable_wrapper_subclass(weight):
            module.weight = torch.nn.Parameter(weight.dequantize(), requires_grad=False)


def token_range(settings: Settings, token_counts: list[int]) -> tuple[int, int] | None:
    """Image-token lengths a dynamic-shape program accepts: from the smallest preset to twice the largest."""
    return (max(2, min(token_counts)), 2 * max(token_counts)) if settings.dynamic_shapes else None


def _dynamic_spec(kwargs: dict, dim) -> dict:
    """Marks the image-token axis dynamic; everything else stays static."""
    spec = torch.utils._pytree.tree_map(lambda _: None, kwargs)  # same structure as the inputs, all static
    spec["hidden_states"] = {1: dim}
    if "img_ids" in kwargs:  # the whole model
        spec["img_ids"] = {0: dim}
    else:  # a block: its rotary embeddings cover text + image tokens
        text = kwargs["encoder_hidden_states"].shape[1]
        spec["image_rotary_emb"] = tuple({0: dim + text} for _ in kwargs["image_rotary_emb"])
    return spec


def compile_program(pipe, settings: Settings, preset: Preset, served: tuple[int, int] | None,
                    max_sequence_length: int, out_dir: Path) -> None:
    """Captures, exports and AOT-compiles the (already quantized) transformer at `preset`'s shape into
    `out_dir`, in the layout `spaces.aoti_load_from_package_dir` reads: one package per compile target.
    `served`: the image-token range of a dynamic-shape program, None for a static one."""
    for name, module in compile_targets(pipe.transformer, settings.aot_scope).items():
        args, kwargs = capture_inputs(pipe, module, preset, max_sequence_length)
        spec = _dynamic_spec(kwargs, torch.export.Dim("image_tokens", min=served[0], max=served[1])) if served else None
        t0 = time.perf_counter()
        exported = torch.export.export(module, args=args, kwargs=kwargs, dynamic_shapes=spec)
        t1 = time.perf_counter()
        spaces.aoti_compile_and_save(out_dir, exported, inductor_configs=INDUCTOR_CONFIGS, submodule=name or None)
        log.info("compiled %s for %s: export %.1f s, compile %.1f s", name or "transformer", preset.name,
                 t1 - t0, time.perf_counter() - t1)


def release_export_memory() -> None:
    """torch.export keeps its last trace in a module-level map, and through it tensors as large as the
    weights (about 11 GiB more resident after an fp8 FLUX compile on an H100); drop them once compiled."""
    proxy_map = getattr(torch.fx.experimental.proxy_tensor, "_FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT", None)
    if proxy_map is not None:
        proxy_map.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def install_programs_(transformer: torch.nn.Module, program_dirs: dict[int, Path],
                      served: tuple[int, int] | None = None) -> None:
    """Loads every package against the modules' own parameters (no copy) and puts a shape dispatcher on
    each patched module: the transformer, or every repeated block. `program_dirs`: image tokens -> package."""
    programs: dict[torch.nn.Module, dict[int, object]] = {}
    for tokens, path in sorted(program_dirs.items()):
        spaces.aoti_load_from_package_dir(transformer, path)  # sets `forward` on each target to a lazy program
        for module in transformer.modules():
            if "forward" in module.__dict__:
                programs.setdefault(module, {})[tokens] = module.__dict__.pop("forward")
    runner = ProgramRunner()
    for module, by_tokens in programs.items():
        module.forward = ShapeDispatch(by_tokens, runner, served)


def restore_eager_(transformer: torch.nn.Module) -> None:
    for module in transformer.modules():
        module.__dict__.pop("forward", None)


# ---------------------------------------------------------------------------------------------------
# The compiled-artifact cache.
# ---------------------------------------------------------------------------------------------------
def cache_key(pipe, settings: Settings, report: Report, image_tokens: int | list[int], max_sequence_length: int) -> dict:
    """Everything that makes one compiled program valid; a program built under any other value is not reused.
    `image_tokens`: the count a static program serves, or the [min, max] range of a dynamic one."""
    if report.device.startswith("cuda"):
        arch = "sm_%d%d" % torch.cuda.get_device_capability()
    else:
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        arch = f"cpu-{platform.machine()}-{pick_vec_isa()}"
    config = json.dumps(dict(pipe.transformer.config), sort_keys=True, default=str)
    # the programs address weights by name and shape: fused projections or another layout are other programs
    weights = "".join(f"{name}:{tuple(t.shape)}:{t.dtype};" for name, t in pipe.transformer.state_dict().items())
    return {
        "format": CACHE_FORMAT,
        "model_id": settings.model_id,
        "revision": settings.revision or getattr(pipe.transformer.config, "_commit_hash", None) or "",
        "transformer_config": hashlib.sha256(config.encode()).hexdigest()[:16],
        "weights": hashlib.sha256(weights.encode()).hexdigest()[:16],
        "torch": torch.__version__,
        "arch": arch,
        "dtype": report.dtype,
        "quantization": report.quantization,
        "attention": report.attention,
        "scope": settings.aot_scope,
        "dynamic_shapes": settings.dynamic_shapes,
        "image_tokens": image_tokens,
        "text_tokens": max_sequence_length,
        "inductor": INDUCTOR_CONFIGS,
    }


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_cached(root: Path, key: dict) -> bool:
    """Whether the entry `root` (one program) is usable: its manifest matches `key`, every package is intact."""
    if not root.exists():
        return False
    try:
        manifest = json.loads((root / "manifest.json").read_text())
        if manifest["key"] != json.loads(json.dumps(key)):
            raise ValueError("it was built for another key")
        if not manifest["sha256"]:
            raise ValueError("it holds no program")
        for name, digest in manifest["sha256"].items():
            if _sha256(root / name) != digest:
                raise ValueError(f"{name} does not match its checksum")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, json.JSONDecodeError) as err:
        log.warning("AoT cache %s is unusable (%s): recompiling", root, err)
        return False
    return True


def compile_into_cache(pipe, settings: Settings, preset: Preset, served: tuple[int, int] | None,
                       max_sequence_length: int, root: Path, key: dict) -> None:
    """Compiles one program into a staging directory and renames it into place, so that a crash never
    leaves a half-written entry that looks complete."""
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
    try:
        compile_program(pipe, settings, preset, served, max_sequence_length, staging)
        release_export_memory()
        packages = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*.pt2"))
        manifest = {"key": key, "sha256": {name: _sha256(staging / name) for name in packages}}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1))
        shutil.rmtree(root, ignore_errors=True)
        staging.rename(root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def fetch_from_hub(hub_repo: str, digests: list[str], cache_dir: Path, report: Report) -> None:
    """Downloads the cache entries `digests` from a revision-pinned Hub repo into the cache, in one call.
    They are checked against their manifests like any cached entry; anything missing or wrong is compiled."""
    from huggingface_hub import snapshot_download

    repo, _, revision = hub_repo.partition("@")
    try:
        snapshot_download(repo, revision=revision, allow_patterns=[f"{d}/*" for d in digests], local_dir=cache_dir)
    except Exception as err:  # noqa: BLE001 - offline, missing or gated: compile instead, and say so
        report.fallback("compiled packages", f"could not fetch {', '.join(digests)} from {hub_repo} "
                                             f"({type(err).__name__}: {err}); compiling here")


# ---------------------------------------------------------------------------------------------------
# The entry point.
# ---------------------------------------------------------------------------------------------------
def optimize_pipeline_(pipe, settings: Settings, max_sequence_length: int) -> Report:
    """Makes `pipe.transformer` fast in place. Returns what was done and what fell back, and why."""
    transformer = pipe.transformer
    device = "cuda" if torch.cuda.is_available() else "cpu"
    capability = torch.cuda.get_device_capability() if device == "cuda" else None
    report = Report(device=f"cuda: {torch.cuda.get_device_name()}, sm_{capability[0]}{capability[1]}" if capability else device,
                    dtype=str(transformer.dtype).removeprefix("torch."))
    report.compile, report.compile_reason = choose_compile(settings.compile, device)
    plan = plan_memory(pipe, settings, device, capability, report)
    place_pipeline_(pipe, plan, device)

    hub_online = os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes")
    report.attention, report.attention_reason = choose_attention(settings.attention, device, capability, hub_online)
    if report.attention_reason.startswith("fallback"):
        report.fallback("attention", report.attention_reason.removeprefix("fallback: "))
    if report.attention != "sdpa":
        try:
            transformer.set_attention_backend(report.attention)
        except Exception as err:  # noqa: BLE001 - a missing kernel or package: any failure means "use SDPA"
            _use_sdpa(transformer, report, f"{report.attention} unavailable ({type(err).__name__}: {err})")

    if plan.low_vram:  # already quantized while placing
        report.quantization, report.quantization_reason = plan.quantization, "low-VRAM mode"
    else:
        report.quantization, report.quantization_reason = choose_quantization(settings.quantization, device, capability)
        if report.quantization_reason.startswith("fallback"):
            report.fallback("quantization", report.quantization_reason.removeprefix("fallback: "))
        try:  # before compiling, and in this process, so the weights every program reads are the quantized ones
            quantize_(transformer, report.quantization)
        except Exception as err:  # noqa: BLE001 - serve unquantized rather than not at all, and say so
            report.fallback("quantization", f"{report.quantization} failed ({type(err).__name__}: {err}); unquantized")
            report.quantization = "none"
    if plan.stream and report.compile == "aoti":
        # A regional program rebinding each block's weights on every call computed correctly, but the AOTI
        # runner kept every set it was handed (12.7 GiB after 52 block calls, benchmarks/RESULTS.md).
        report.compile, report.compile_reason = "none", "off: compiled programs hold on to streamed weights"
        report.fallback("compile", report.compile_reason)
    multiple = pipe.vae_scale_factor * 2  # pixels per image token along each side
    token_presets: dict[int, Preset] = {}
    for preset in settings.presets:  # presets with the same token count share a program
        token_presets.setdefault(preset.image_tokens(multiple), preset)
    if report.compile == "none":
        if report.compile_reason.startswith("off on CPU"):
            report.fallback("compile", report.compile_reason)
        if report.attention != "sdpa":  # a backend can install fine and still fail to run on this device
            try:
                warm_up(pipe, dict([min(token_presets.items())]), max_sequence_length)  # the smallest preset
            except Exception as err:  # noqa: BLE001 - any failure of the chosen kernel means "use SDPA"
                _use_sdpa(transformer, report, f"{report.attention} failed a test run ({type(err).__name__}: {err})")
        return report

    report.compile_scope = settings.aot_scope
    start = time.perf_counter()
    while True:
        try:
            compile_or_load_(pipe, settings, report, token_presets, max_sequence_length)
            break
        except Exception as err:  # noqa: BLE001 - the app must keep serving, and say why
            log.info("AoT compile or load failed; the full error:", exc_info=err)
            restore_eager_(transformer)
            reason = f"{type(err).__name__}: {err}"
            if report.attention != "sdpa":  # e.g. a hub kernel that torch.export cannot trace: retry once
                _use_sdpa(transformer, report, f"AoT compile with {report.attention} failed ({reason})")
                continue
            report.fallback("compile", f"AoT compilation failed, serving eager ({reason})")
            report.compile, report.compile_source = "none", ""
            if report.quantization == "fp8" and not plan.low_vram:  # unfused eager fp8: 3x slower than bf16
                dequantize_(transformer)
                report.fallback("quantization", "fp8 undone: without compilation it is slower than bf16")
                report.quantization = "none"
            elif report.quantization == "fp8":
                report.fallback("quantization", "fp8 kept without compilation (about 3x slower than bf16): "
                                                "bf16 weights would not fit")
            return report
    report.compile_seconds = round(time.perf_counter() - start, 1)
    served = token_range(settings, list(token_presets))
    if served:
        report.programs = [{"image_tokens": f"{served[0]}..{served[1]}", "resolutions": [p.name for p in settings.presets]}]
    else:
        report.programs = [{"image_tokens": tokens, "resolutions": [p.name for p in settings.presets
                                                                    if p.image_tokens(multiple) == tokens]}
                           for tokens in sorted(token_presets)]
    log.info("AoT %s: %s in %.1f s (cache keys %s), programs for %s", report.compile_scope, report.compile_source,
             report.compile_seconds, report.cache_keys, [p.name for p in settings.presets])
    return report


def _use_sdpa(transformer: torch.nn.Module, report: Report, reason: str) -> None:
    report.fallback("attention", f"{reason}; using sdpa")
    transformer.set_attention_backend("native")
    report.attention = "sdpa"


def compile_or_load_(pipe, settings: Settings, report: Report, token_presets: dict[int, Preset],
                     max_sequence_length: int) -> None:
    """Installs one program per image-token count (or one dynamic-shape program for all): each from its own
    cache entry (or a pinned Hub repo) if its key matches, else compiled now, on the GPU, into the cache.
    Adding a preset compiles only the new program."""
    served = token_range(settings, list(token_presets))
    traced = {max(token_presets): token_presets[max(token_presets)]} if served else token_presets  # one, or one each
    entries = {}  # image tokens -> (key, entry directory)
    for tokens in sorted(traced):
        key = cache_key(pipe, settings, report, list(served) if served else tokens, max_sequence_length)
        entries[tokens] = (key, Path(settings.cache_dir) / key_digest(key))
    report.cache_keys = [root.name for _, root in entries.values()]
    absent = [root.name for _, root in entries.values() if not root.exists()]
    if settings.hub_repo and absent:
        fetch_from_hub(settings.hub_repo, absent, Path(settings.cache_dir), report)
    missing = [tokens for tokens, (key, root) in entries.items() if not read_cached(root, key)]
    if missing:
        # Only picklable values cross into the ZeroGPU worker; the pipeline is reached through the closure.
        @spaces.GPU(duration=1500)
        def compile_on_gpu(missing: list[int]) -> None:
            for tokens in missing:
                key, root = entries[tokens]
                compile_into_cache(pipe, settings, traced[tokens], served, max_sequence_length, root, key)

        compile_on_gpu(missing)
    report.compile_source = ("loaded from cache" if not missing else "compiled now" if len(missing) == len(entries)
                             else f"{len(missing)} of {len(entries)} programs compiled now, the rest loaded from cache")
    install_programs_(pipe.transformer, {tokens: root for tokens, (_, root) in entries.items()}, served)
    warm_up(pipe, token_presets, max_sequence_length)


def warm_up(pipe, token_presets: dict[int, Preset], max_sequence_length: int) -> None:
    """Loads every program now rather than on the first request, and checks each gives finite output.
    Not on ZeroGPU: its main process has no GPU, and programs load in the GPU worker on first use."""
    if spaces.config.Config.zero_gpu:
        return
    for tokens, preset in token_presets.items():
        with torch.inference_mode():
            latents = pipe(CAPTURE_PROMPT, width=preset.width, height=preset.height, num_inference_steps=1,
                           max_sequence_length=max_sequence_length, output_type="latent").images
        if not torch.isfinite(latents).all():
            raise RuntimeError(f"the {tokens}-token program returned non-finite values")


def main(argv: list[str] | None = None) -> int:
    """`python optimization.py --precompile --out DIR`: compile ahead of deploy with the current settings
    (MODEL_ID, PRESETS, QUANTIZATION, ...) on the target GPU, print the cache keys and where the files went."""
    import argparse

    from settings import load_pipeline, model_defaults

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--precompile", action="store_true", required=True)
    parser.add_argument("--out", required=True, help="cache directory to fill (AOT_CACHE_DIR for the app)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.from_env({**os.environ, "AOT_CACHE_DIR": args.out, "COMPILE": "aoti"})
    pipe = load_pipeline(settings)
    report = optimize_pipeline_(pipe, settings, model_defaults(pipe).max_sequence_length)
    if report.compile != "aoti":
        print(json.dumps({"error": report.fallbacks}), flush=True)
        return 1
    out = Path(args.out)
    print(json.dumps({"keys": report.cache_keys, "source": report.compile_source, "dir": str(out),
                      "files": sorted(p.relative_to(out).as_posix() for key in report.cache_keys
                                      for p in (out / key).rglob("*") if p.is_file())}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
