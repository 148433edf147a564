"""Does the pipeline fit the GPU, and if not, the fastest layout that does (low-VRAM mode): plan, then place."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import spaces
import torch

from aot.decisions import choose_quantization, fp8_runs
from aot.quantize import GROUP_SIZE, _quantizable, quantize_
from aot.report import Report

GiB = 2**30
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


def measure_footprint(pipe, max_image_tokens: int) -> Footprint:
    modes = ("none", "fp8", "int8", "int4")
    transformer = pipe.transformer
    blocks = [block for blocks in _block_lists(transformer).values() for block in blocks]
    weights = {mode: _weight_bytes(transformer, mode) for mode in modes}
    block_bytes = {mode: [_weight_bytes(b, mode) for b in blocks] for mode in modes}
    texts = [m for name, m in pipe.components.items() if name.startswith("text_encoder") and m is not None]
    text_blocks = [block for text in texts for blocks in _block_lists(text).values() for block in blocks]
    return Footprint(
        transformer=weights,
        largest_block={mode: max(block_bytes[mode], default=0) for mode in modes},
        outside_blocks={mode: weights[mode] - sum(block_bytes[mode]) for mode in modes},
        text_encoders=sum(_weight_bytes(t, "none") for t in texts),
        largest_text_block=max((_weight_bytes(b, "none") for b in text_blocks), default=0),
        other=sum(_weight_bytes(m, "none") for name, m in pipe.components.items()
                  if isinstance(m, torch.nn.Module) and name != "transformer" and m not in texts),
        activations=ACTIVATION_BYTES_PER_TOKEN * max_image_tokens,
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


def plan_memory(pipe, requested: str, quantization: str, vram_limit_gib: float | None, max_image_tokens: int,
                device: str, capability, compiled: bool, report: Report) -> MemoryPlan:
    """Chooses the layout for LOW_VRAM=`requested`, applies `vram_limit_gib` as a hard cap on this process, and
    reports the choice."""
    if quantization != "auto":  # the same startup error as without low-VRAM mode (fp8 on Ampere)
        choose_quantization(quantization, device, capability)
    budget = None
    if device == "cuda" and not spaces.config.Config.zero_gpu:  # ZeroGPU's main process sees no real GPU
        total = torch.cuda.get_device_properties(0).total_memory
        budget = total
        if vram_limit_gib:
            budget = min(total, int(vram_limit_gib * GiB))
            torch.cuda.set_per_process_memory_fraction(budget / total)
    fp8_ok = fp8_runs(device, capability) and compiled
    plan = choose_memory_plan(requested, quantization, measure_footprint(pipe, max_image_tokens), budget, fp8_ok)
    report.memory = asdict(plan)
    if plan.low_vram:
        layout = f"{plan.quantization} weights, {'streamed' if plan.stream else 'resident'}"
        report.fallback("memory", f"low-VRAM mode ({plan.reason}): {layout}, text encoders streamed; "
                                  f"needs about {plan.need_gib} GiB")
    return plan


def place_pipeline_(pipe, plan: MemoryPlan, device: str, keep_bf16: tuple[str, ...] = ()) -> None:
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
        quantize_(transformer, plan.quantization, work_device=device, result_device="cpu", keep_bf16=keep_bf16)
        _stream_(transformer, device)
    else:
        quantize_(transformer, plan.quantization, work_device=device, result_device=device, keep_bf16=keep_bf16)
        transformer.to(device)

