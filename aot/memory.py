"""Does the pipeline fit the GPU, and if not, the fastest layout that does (low-VRAM mode): plan, then place."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from aot.hardware import Hardware, Size
from aot.model import experts, repeated_block_lists
from aot.quantize import GROUP_SIZE, _quantizable, kept_in_bf16, quantize_
from aot.report import Report
from aot.streaming import RING_SLOTS, BlockStream, tensor_leaves
from aot.zerogpu import step_work

GiB = 2**30
ACTIVATION_BYTES_PER_TOKEN = 3 * GiB // 4096  # FLUX at 1024x1024: ~2.4 GiB above the weights (RESULTS.md)
# FLUX.1-dev's transformer call itself holds 0.46 GiB of that at its peak (counted on the meta device as a family's
# `activation_bytes_per_token`); the rest is the VAE's decode and CUDA's workspace. A family that gives its own
# per-token figure gets the whole 3 GiB beside it for those, erring high: a video's VAE decode was not measured
DECODE_BYTES = 3 * GiB
SLACK_BYTES = GiB  # CUDA context, allocator fragmentation

# The planner's yardstick for a layout's speed: one step of FLUX.1-dev at 1024x1024 on the H100, every block
# resident, per weight format (benchmarks/RESULTS.md run 7: AoT blocks; eager), scaled to the model's size and image
# tokens. Eager int4 was measured streamed only: 12% slower than streamed int8 (341.7 vs 304.3 ms), applied here to
# int8's 243.2; eager fp8 runs about 3x bf16 (unfused, RESULTS.md).
STEP_MS = {True: {"fp8": 114.6, "none": 144.2, "int8": 148.6, "int4": 160.4},
           False: {"fp8": 550.0, "none": 183.4, "int8": 243.2, "int4": 273.1}}
REFERENCE_BYTES, REFERENCE_TOKENS = 2 * 11.90e9, 4096  # FLUX.1-dev's bf16 transformer, 1024x1024
# Streamed blocks are copied in once per step, overlapping the compute (aot/streaming.py): a step takes the longer of
# the two. Pinned host-to-GPU copies ran at 54 GB/s on the H100 (run 7).
COPY_BYTES_PER_MS = 54e6
# Relative L2 error of one step against bf16, per weight format (run 7); streaming changes no weight, so adds none.
STEP_ERROR = {"none": 0.0, "fp8": 5.1e-2, "int8": 8e-3, "int4": 6.7e-2}


def streamed_blocks(count: int, streamed: int) -> list[int]:
    """Which of `count` blocks (in call order) stream when `streamed` do: spread evenly, so each copy overlaps the
    compute of the resident blocks between two streamed ones, not only that of the streamed block before it."""
    return sorted({(2 * j + 1) * count // (2 * streamed) for j in range(streamed)})


@dataclass(frozen=True)
class Footprint:
    """Bytes the pipeline needs on the GPU, per transformer weight format ("none" = as loaded)."""

    transformer: dict[str, int]  # all its weights (every expert's, where the pipeline has several)
    blocks: dict[str, tuple[int, ...]]  # each repeated block's weights, in call order: what can stream
    block_groups: tuple[int, ...]  # blocks with one number share a layout, so one ring of device buffers
    text_encoders: int  # all of them
    largest_text_group: int  # the most bytes one streamed text-encoder group (a layer's own weights) holds
    other: int  # the VAE and anything else: always resident
    activations: int
    image_tokens: int
    experts: int = 1  # denoisers whose blocks are counted here; a step runs one of them (Wan 2.2 A14B: two)

    def resident(self, mode: str) -> int:
        """The bytes placed on the GPU with every weight resident and the transformer in `mode`: what spaces packs
        at startup on ZeroGPU, and compares with its `xlarge_threshold`."""
        return self.transformer[mode] + self.text_encoders + self.other

    def need(self, mode: str | None, streamed: int = 0) -> int:
        """mode None: everything resident as loaded. Otherwise the low-VRAM layout: text encoders streamed, the
        transformer quantized to `mode`, with `streamed` of its blocks in host memory, copied through the rings."""
        if mode is None:
            return self.transformer["none"] + self.text_encoders + self.other + self.activations + SLACK_BYTES
        chosen = streamed_blocks(len(self.block_groups), streamed)
        ring = 0
        for group in {self.block_groups[i] for i in chosen}:
            members = [self.blocks[mode][i] for i in chosen if self.block_groups[i] == group]
            ring += min(RING_SLOTS, len(members)) * max(members)
        weights = self.transformer[mode] - self.streamed_bytes(mode, streamed) + ring
        return weights + 2 * self.largest_text_group + self.other + self.activations + SLACK_BYTES

    def streamed_bytes(self, mode: str, streamed: int) -> int:
        """What a step copies in."""
        return sum(self.blocks[mode][i] for i in streamed_blocks(len(self.block_groups), streamed))

    def step_ms(self, mode: str, streamed: int, compiled: bool) -> float:
        """A rough step time, to rank layouts: the compute, or the copies if they take longer. A step runs one expert,
        which holds its share of the streamed blocks (they are spread over the call order of all of them)."""
        scale = self.transformer["none"] / self.experts / REFERENCE_BYTES * step_work(self.image_tokens)
        copies = self.streamed_bytes(mode, streamed) / self.experts
        return max(STEP_MS[compiled][mode] * scale, copies / COPY_BYTES_PER_MS)


@dataclass(frozen=True)
class MemoryPlan:
    low_vram: bool = False
    quantization: str = ""  # the transformer's weight format; "" = not decided here
    blocks: int = 0  # the transformer's repeated blocks
    streamed_blocks: int = 0  # of them, streamed from host memory through a ring (aot/streaming.py); the rest resident
    budget_gib: float | None = None
    need_gib: float = 0.0
    step_error: float = 0.0  # relative L2 error the weight format adds to one step (RESULTS.md run 7)
    reason: str = ""
    packed_gib: float | None = None  # ZeroGPU: the GiB spaces packs at startup, against its xlarge threshold
    fits: bool = True
    # Whether the transformer as loaded (bf16) would fit as well: where it would not (Wan A14B's two experts on half a
    # card), fp8 weights that no program runs are kept, not undone (optimization.py `_eager_fp8`)
    bf16_fits: bool = True

    @property
    def stream(self) -> bool:
        return self.streamed_blocks > 0

    @property
    def layout(self) -> str:
        """What runs, in words: the report's `memory.layout`, and the fallback line in the log and the status panel."""
        if not self.low_vram:
            if self.packed_gib is not None:  # planned for a ZeroGPU size
                weights = "weights as loaded" if self.quantization == "none" else f"transformer in {self.quantization}"
                return (f"everything resident, {weights}: {self.packed_gib} GiB packed, needs about {self.need_gib} "
                        f"of {self.budget_gib} GiB")
            return "everything resident as loaded"
        weights = ("weights as loaded" if self.quantization == "none" else
                   f"{self.quantization} weights (about {self.step_error:.1e} relative error per step)")
        blocks = ("all blocks resident" if not self.stream else f"all {self.blocks} blocks streamed"
                  if self.streamed_blocks == self.blocks else
                  f"{self.blocks - self.streamed_blocks} of {self.blocks} blocks resident, "
                  f"{self.streamed_blocks} streamed")
        budget = f" of {self.budget_gib}" if self.budget_gib else ""
        return f"{weights}, {blocks}, text encoders streamed; needs about {self.need_gib}{budget} GiB"


def choose_memory_plan(requested: str, quantization: str, footprint: Footprint, budget: int | None,
                       fp8_ok: bool, compiled: bool) -> MemoryPlan:
    """Pure: the fastest layout that fits `budget` bytes. For each weight format (fp8 only where it runs, and only
    compiled: eager it is slower than bf16), the fewest streamed blocks that fit (all of them with LOW_VRAM=stream);
    then the format whose step is estimated fastest (`Footprint.step_ms`). Text encoders stream in every
    low-VRAM layout."""
    gib = lambda n: round(n / GiB, 2)  # noqa: E731
    full, count = footprint.need(None), len(footprint.block_groups)
    if requested == "off" or (budget is None and requested == "auto"):
        why = "LOW_VRAM=off" if requested == "off" else "no GPU memory limit to plan for"
        return MemoryPlan(blocks=count, budget_gib=budget and gib(budget), need_gib=gib(full), reason=why)
    if requested == "auto" and full <= budget:
        return MemoryPlan(blocks=count, budget_gib=gib(budget), need_gib=gib(full),
                          reason=f"fits: {gib(full)} of {gib(budget)} GiB")
    modes = [quantization] if quantization != "auto" else ["fp8"] * fp8_ok + ["none", "int8", "int4"]
    streamed = [count] if requested == "stream" else range(count + 1)
    fitting = []  # per format, the fewest streamed blocks that fit
    for mode in modes:
        k = next((k for k in streamed if budget is None or footprint.need(mode, k) <= budget), None)
        if k is not None:
            fitting.append((mode, k))
    budget_text = f"{gib(budget)} GiB" if budget else "no known limit"
    why = (f"the whole pipeline needs {gib(full)} GiB, {budget_text} available" if requested == "auto"
           else f"LOW_VRAM={requested}")
    if fitting:  # min() keeps the first of equals: fp8 before bf16 before int8 before int4
        mode, k = min(fitting, key=lambda layout: footprint.step_ms(*layout, compiled))
    else:
        mode, k = min(((m, k) for m in modes for k in streamed), key=lambda layout: footprint.need(*layout))
        why += (f"; nothing fits, so the smallest layout runs ({gib(footprint.need(mode, k))} GiB): it may run out "
                "of memory")
    return MemoryPlan(True, mode, count, k, budget and gib(budget), gib(footprint.need(mode, k)), STEP_ERROR[mode], why)


def choose_resident_plan(decided: str, auto: bool, footprint: Footprint, budget: int, packed_limit: int | None,
                         fp8_ok: bool, compiled: bool) -> MemoryPlan:
    """Pure: ZeroGPU's layout, where nothing streams (its main process has no GPU to stream to): every weight
    resident, the transformer in the fastest format whose pipeline fits `budget` bytes and whose packed weights stay
    at or under `packed_limit` (spaces' xlarge threshold), so that spaces does not switch the size on its own.
    `decided`: the format chosen for the hardware, kept if it fits; with QUANTIZATION=auto (`auto`) the others are
    tried after it."""
    gib = lambda n: round(n / GiB, 2)  # noqa: E731
    modes = [decided] + [m for m in ("fp8", "none", "int8", "int4") if auto and m != decided]
    modes = [m for m in modes if m != "fp8" or fp8_ok] or ["none"]  # fp8 only where the device ran it, compiled

    def fits(mode):
        return (footprint.resident(mode) + footprint.activations + SLACK_BYTES <= budget
                and (packed_limit is None or footprint.resident(mode) <= packed_limit))

    fitting = [m for m in modes if fits(m)]
    limit = f", packed at most {gib(packed_limit)} GiB" if packed_limit else ""
    if fitting:  # the decided format when it fits; else the fastest smaller one
        mode = fitting[0] if fitting[0] == modes[0] else min(fitting, key=lambda m: footprint.step_ms(m, 0, compiled))
        why = f"fits {gib(budget)} GiB{limit}" + ("" if mode == modes[0] else f" only with the transformer in {mode}")
    else:
        mode = min(modes, key=footprint.resident)
        why = f"does not fit {gib(budget)} GiB{limit}, even with the transformer in {mode}"
    need = footprint.resident(mode) + footprint.activations + SLACK_BYTES
    return MemoryPlan(False, mode, len(footprint.block_groups), 0, gib(budget), gib(need), STEP_ERROR[mode], why,
                      gib(footprint.resident(mode)), bool(fitting), bf16_fits=fits("none"))


def _stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds; for a wrapper subclass (torchao's fp8 weights), those of the tensors inside it."""
    return sum(leaf.numel() * leaf.element_size() for leaf in tensor_leaves(tensor))


def _own_bytes(module: torch.nn.Module) -> int:
    """The bytes of the module's own weights and buffers, not its children's: what one leaf-level group streams."""
    return sum(map(_stored_bytes, [*module.parameters(recurse=False), *module.buffers(recurse=False)]))


def resident_bytes(pipe, extra: tuple[torch.nn.Module, ...] = ()) -> int:
    """The bytes of every weight and buffer of the pipeline's modules, and of the `extra` models run beside it
    (`Model.extra_modules`), as they are stored now."""
    modules = [*(m for m in pipe.components.values() if isinstance(m, torch.nn.Module)), *extra]
    return sum(_stored_bytes(t) for m in modules for t in [*m.parameters(), *m.buffers()])


def _weight_bytes(module: torch.nn.Module, mode: str, keep_bf16: tuple[str, ...] = ()) -> int:
    """The module's weights after quantizing its Linear layers to `mode`, without quantizing anything; fp8 leaves the
    layers named in `keep_bf16` as they are, as quantize_ does. Weights stored quantized already (a pre-quantized
    checkpoint) count as stored: nothing quantizes them again."""
    per_weight = {"none": None, "fp8": 1.0, "int8": 1.0, "int4": 0.5 + 4 / GROUP_SIZE}[mode]
    total = sum(map(_stored_bytes, module.buffers()))
    seen = set()  # a weight two modules share (T5's embedding, under two names) is stored once
    for path, sub in module.named_modules():
        kept = mode == "fp8" and kept_in_bf16(path, keep_bf16)
        for name, p in sub.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            quantized = (per_weight is not None and name == "weight" and _quantizable(sub, mode) and not kept
                         and not is_traceable_wrapper_subclass(p))
            total += int(p.numel() * per_weight + 4 * sub.out_features) if quantized else _stored_bytes(p)
    return total


def _block_lists(module: torch.nn.Module) -> dict[str, torch.nn.ModuleList]:
    """The outermost ModuleLists, by name: a model's repeated blocks (not the lists inside a block)."""
    lists: dict[str, torch.nn.ModuleList] = {}
    for name, sub in module.named_modules():  # parents come before children
        if isinstance(sub, torch.nn.ModuleList) and len(sub) and not any(name.startswith(f"{n}.") for n in lists):
            lists[name] = sub
    return lists


def transformer_blocks(transformer: torch.nn.Module) -> dict[str, torch.nn.ModuleList]:
    """The lists of blocks that may stream: the repeated blocks regional compilation compiles, else (a transformer
    that declares none, served eagerly) every outermost list. In declaration order; the streaming hooks learn the
    order of the calls."""
    return repeated_block_lists(transformer) or _block_lists(transformer)


def _shape(module: torch.nn.Module) -> tuple:
    return (type(module).__name__, *((name, tuple(t.shape), t.dtype) for name, t in module.state_dict().items()))


def text_encoders(pipe) -> list[torch.nn.Module]:
    """The pipeline's text encoders (`text_encoder`, `text_encoder_2`, ...): what low-VRAM mode streams."""
    return [m for name, m in pipe.components.items() if name.startswith("text_encoder") and m is not None]


def measure_footprint(pipe, max_image_tokens: int, keep_bf16: tuple[str, ...] = (),
                      activation_bytes_per_token: int | None = None,
                      extra: tuple[torch.nn.Module, ...] = ()) -> Footprint:
    """`keep_bf16`: the family's layers that fp8 leaves in bf16 (Qwen-Image's text stream: a third of its weights).
    `activation_bytes_per_token`: the family's own figure for its transformer call (a video's), None: the image one.
    `max_image_tokens`: the largest call's, a two-stage recipe's second stage. `extra`: models run beside the pipeline
    (a two-stage recipe's latent upsampler), resident with the VAE."""
    modes = ("none", "fp8", "int8", "int4")
    denoisers = experts(pipe)  # Wan 2.2 A14B's two experts are both resident, quantized and streamed alike
    blocks = [block for expert in denoisers for blocks in transformer_blocks(expert).values() for block in blocks]
    shapes = list(dict.fromkeys(map(_shape, blocks)))  # blocks of one class and shape quantize alike: one ring
    texts = text_encoders(pipe)
    return Footprint(
        transformer={mode: sum(_weight_bytes(expert, mode, keep_bf16) for expert in denoisers) for mode in modes},
        blocks={mode: tuple(_weight_bytes(b, mode, keep_bf16) for b in blocks) for mode in modes},
        block_groups=tuple(shapes.index(_shape(b)) for b in blocks),
        text_encoders=sum(_weight_bytes(t, "none") for t in texts),
        largest_text_group=max((_own_bytes(m) for text in texts for m in text.modules()), default=0),
        other=sum(_weight_bytes(m, "none") for m in [*pipe.components.values(), *extra]
                  if isinstance(m, torch.nn.Module) and m not in denoisers and m not in texts),
        activations=(ACTIVATION_BYTES_PER_TOKEN * max_image_tokens if activation_bytes_per_token is None
                     else DECODE_BYTES + activation_bytes_per_token * max_image_tokens),
        image_tokens=max_image_tokens,
        experts=len(denoisers),
    )


def _stream_text_encoder_(module: torch.nn.Module, device: str) -> None:
    """diffusers' group offloading, leaf by leaf: each layer's weights (a Linear, an embedding, a norm) live in pinned
    host memory and are copied in on a side CUDA stream while the layer before computes, then dropped; the order is
    learnt on the first call. Fine for text encoders, which run eagerly once per prompt; not for compiled blocks
    (aot/streaming.py says why). Leaves, not blocks: a block-level group loads what lies outside the blocks only when
    the module that holds them runs, and multimodal encoders (Mistral 3, Qwen2.5-VL) call their input embedding from
    outside it (RESULTS.md run 19: a device mismatch on FLUX.2 [dev]). About two layers' weights are on the GPU at
    once: the one computing and the next one, copied in ahead.
    diffusers warns once per encoder about layers its first call did not run (a vision tower; T5's `shared`, a
    second module beside `encoder.embed_tokens`): they load themselves if they ever run."""
    from diffusers.hooks import apply_group_offloading

    on_gpu = device == "cuda"
    if on_gpu:  # pin in place, one tensor at a time: diffusers would otherwise pin a second full copy
        for tensor in [*module.parameters(), *module.buffers()]:
            if not tensor.is_pinned():
                tensor.data = tensor.data.pin_memory()
    apply_group_offloading(module, onload_device=torch.device(device), offload_type="leaf_level",
                           use_stream=on_gpu, record_stream=on_gpu)


def plan_memory(pipe, requested: str, quantization: str, vram_limit_gib: float | None, max_image_tokens: int,
                hardware: Hardware, fp8_ok: bool, compiled: bool, report: Report, keep_bf16: tuple[str, ...] = (),
                zerogpu_size: str = "auto", decided: str = "none", activation_bytes_per_token: int | None = None,
                extra: tuple[torch.nn.Module, ...] = ()) -> tuple[MemoryPlan, Hardware]:
    """Chooses the layout for LOW_VRAM=`requested`, applies `vram_limit_gib` as a hard cap on this process, and
    reports the choice. `quantization`: QUANTIZATION. On a CPU the limit is planned for but caps nothing: the chosen
    layout runs there too, host to host (how the tests run it). On ZeroGPU it plans for the task's size (ZEROGPU_SIZE;
    aot/zerogpu.py), keeping the `decided` format where it fits, and returns the hardware with that size. `extra`:
    models run beside the pipeline (`Model.extra_modules`)."""
    card = hardware.zerogpu
    if card is not None:
        footprint = measure_footprint(pipe, max_image_tokens, keep_bf16, activation_bytes_per_token, extra)
        return _plan_zerogpu(requested, quantization == "auto", decided, vram_limit_gib, footprint, hardware, fp8_ok,
                             compiled, report, zerogpu_size)
    budget = None
    if hardware.device == "cuda":
        budget = hardware.memory
        if vram_limit_gib:
            budget = min(hardware.memory, int(vram_limit_gib * GiB))
            torch.cuda.set_per_process_memory_fraction(budget / hardware.memory)
    elif vram_limit_gib:
        budget = int(vram_limit_gib * GiB)
    footprint = measure_footprint(pipe, max_image_tokens, keep_bf16, activation_bytes_per_token, extra)
    plan = choose_memory_plan(requested, quantization, footprint, budget, fp8_ok and compiled, compiled)
    report.memory = {**asdict(plan), "layout": plan.layout}
    if plan.low_vram:
        report.fallback("memory", f"low-VRAM mode ({plan.reason}): {plan.layout}")
        if budget and hardware.device == "cuda":
            _expandable_segments(report)
    return plan, hardware


def _plan_zerogpu(requested, auto, decided, vram_limit_gib, footprint, hardware, fp8_ok, compiled, report,
                  zerogpu_size) -> tuple[MemoryPlan, Hardware]:
    """Every weight resident (the main process has no GPU to stream to; its GPU worker is forked from it), planned
    for each size the card offers, then the size chosen from the plans."""
    from aot.zerogpu import choose_size

    card = hardware.zerogpu
    if requested in ("on", "stream"):
        report.fallback("memory", f"LOW_VRAM={requested} does not run on ZeroGPU (its main process has no GPU to "
                                  "stream to); everything resident")
    sizes = card.sizes or (None,)
    plans = {}
    for size in sizes:
        budget = card.memory_for(size)
        if vram_limit_gib:
            budget = min(budget, int(vram_limit_gib * GiB))
        limit = card.xlarge_threshold if size is Size.LARGE else None
        plans[size] = choose_resident_plan(decided, auto, footprint, budget, limit, fp8_ok and compiled, compiled)
    size = None
    if card.sizes:
        fits = {s: p.fits for s, p in plans.items()}
        size = Size(report.decide("zerogpu_size", choose_size(zerogpu_size, card, fits)))
    plan = plans[size]
    report.memory = {**asdict(plan), "layout": plan.layout,
                     "xlarge_threshold_gib": round(card.xlarge_threshold / GiB, 2) if card.xlarge_threshold else None,
                     "by_size": {(s.value if s else "card"): {**asdict(p), "layout": p.layout}
                                 for s, p in plans.items()}}
    if not plan.fits:
        report.fallback("memory", f"the pipeline {plan.reason}: it may run out of memory")
    return plan, hardware.with_size(size)


def _expandable_segments(report: Report) -> None:
    """Lets the CUDA allocator map memory into a segment as it grows instead of carving fixed segments. Placing a
    layout quantizes block after block; under a 24 GiB cap FLUX.2 [dev] ran out of memory there with 4.4 GiB
    reserved but free inside fixed segments (RESULTS.md run 18), which the allocator's own retry cannot return.
    With it on, the same placement stayed inside the cap (23.24 GiB peak, run 19)."""
    try:
        setter = (getattr(torch._C, "_accelerator_setAllocatorSettings", None)  # torch.cuda's is deprecated in 2.14
                  or torch.cuda.memory._set_allocator_settings)
        setter("expandable_segments:True")
    except Exception as err:  # noqa: BLE001 - a private API: any failure only means fixed segments, which is said
        report.fallback("memory", f"expandable allocator segments unavailable ({type(err).__name__}: {err}): the "
                                  "layout may run out of memory while placing, to fragmentation")


def place_pipeline_(pipe, plan: MemoryPlan, device: str, keep_bf16: tuple[str, ...] = (),
                    granularity: str = "row", extra: tuple[torch.nn.Module, ...] = ()) -> None:
    """Puts the pipeline, and the `extra` models run beside it, on `device`: whole, or in the low-VRAM layout `plan`
    describes. The transformer is quantized one block at a time on `device` (fast, and never more than a block beyond
    the plan), each streamed block then moved to host memory behind its ring slot (aot/streaming.py):
    `transformer.block_stream`."""
    for module in extra:  # resident, as the VAE is
        module.to(device)
    if not plan.low_vram:
        pipe.to(device)
        return
    texts, denoisers, mode = text_encoders(pipe), experts(pipe), plan.quantization
    for module in pipe.components.values():
        if module in texts:
            _stream_text_encoder_(module, device)
        elif isinstance(module, torch.nn.Module) and module not in denoisers:
            module.to(device)
    # every expert's blocks in one list, as the plan counted them: the streamed ones spread over both, one set of rings
    lists = {expert: transformer_blocks(expert) for expert in denoisers}
    blocks = [block for expert in denoisers for blocks in lists[expert].values() for block in blocks]
    streamed = set(streamed_blocks(len(blocks), plan.streamed_blocks))
    stream = BlockStream(device) if streamed else None
    for i, block in enumerate(blocks):
        quantize_(block, mode, work_device=device, result_device=device, keep_bf16=keep_bf16, granularity=granularity)
        if i in streamed:
            stream.add_(block)
        else:
            block.to(device)
    for expert in denoisers:
        # the rest (embedders, norms, output layers), leaving the blocks alone: fp8 would quantize their Linears again
        quantize_(expert, mode, work_device=device, result_device=device, granularity=granularity,
                  keep_bf16=(*keep_bf16, *(f"{name}." for name in lists[expert])))
        expert.to(device)
        expert.block_stream = stream  # where the rings and copy counts can be looked at (tests, benchmarks)
