"""Ahead-of-time compilation of a diffusion pipeline's transformer: one program per preset shape, one copy of
the weights, for every model family in `aot/families/`.

`optimize_pipeline_(model, settings)` is the whole recipe, one step after another:
  0. fuse LORAS into the weights, before anything quantizes them (fp8: fused in bf16, then quantized), and read
     LORA_CHOICES' fused values into host memory (aot/lora.py);
  1. detect the hardware once (aot/hardware.py; on ZeroGPU, spaces' card and its task sizes); choose compilation
     and the weight format from it;
  2. try the guesses on the device itself (aot/probes.py): the fp8 GEMM at per-row, then per-tensor scales, and each
     fast attention backend, timed against SDPA; a guess that fails falls back to the next, visibly;
  3. plan the GPU memory: the whole pipeline on the GPU, or (low-VRAM mode) the transformer quantized to fit and
     the text encoders, and if need be its blocks, streamed from host memory; on ZeroGPU, the task size (half the
     card, or all of it at twice the quota); then place the pipeline, set the attention backend and quantize in place
     (a transformer stored quantized, a pre-quantized checkpoint, is served as stored);
  4. for each preset shape, record the transformer's real inputs with `spaces.aoti_capture`, `torch.export`
     it and compile it with AOTInductor, on the device: regionally, one program per repeated block class (the
     default), or the whole transformer; install the packages with `spaces.aoti_load_from_package_dir` (the programs
     read the modules' own parameters; each block gets its own instance, and a second expert (Wan 2.2) the same
     programs over its own weights) behind a dispatcher that picks each call's program from its input shapes; on
     CUDA, put CUDA graph replay around the transformer (aot/graphs.py);
  5. time every preset on the device (its first call also loads its programs and checks its CUDA graph: kept only
     where the replay equals the uncaptured call and is faster), which sizes each request's ZeroGPU duration
     (aot/zerogpu.py). A restart on the same card with the same programs keeps the earlier start's timings and
     graph decisions, and calls nothing: loading and capturing happen at each shape's first request;
  6. with STEP_CACHE, put diffusers' cache hooks around the installed block programs (aot/step_cache.py);
  7. with LORA_CHOICES, each choice's values put in the weights' final layout, for requests to switch in place.
Every choice that falls back is logged once and listed in the report (the UI's status panel and /status).
Programs are cached under a key of everything that makes them valid: a restart with the same key loads them.
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from aot import hub, lora, parallel, step_cache
from aot.cache import (cache_key, compile_into_cache, entry_files, key_digest, measured_path, read_cached,
                       read_measured, write_measured)
from aot.decisions import (SDPA, attention_candidates, choose_compile, choose_cuda_graphs, choose_quantization,
                           fp8_candidates, pick_attention, pick_fp8)
from aot.families import Text
from aot.graphs import GraphedForward, failed
from aot.hardware import Hardware, detect
from aot.memory import MemoryPlan, place_pipeline_, plan_memory
from aot.model import Model, experts, load_model
from aot.probes import AttentionShape, run_probes
from aot.programs import (CAPTURE_PROMPT, UnsupportedShape, compile_program, install_programs_, own_tensors_,
                          release_export_memory, restore_eager_, trust_host_isa_)
from aot.quantize import (ACTIVATION_SCALE_FLOOR, Stored, dequantize_, floor_activation_scales_, quantize_,
                          stored_decision, stored_quantization)
from aot.report import Decision, Report
from aot.zerogpu import MAX_TASK_SECONDS, PROBE_TASK_SECONDS, STARTUP_TASK_SECONDS, Timing, gpu_task
from settings import Preset, Settings

__all__ = ["INDUCTOR_CONFIGS", "UnsupportedShape", "inductor_configs", "optimize_pipeline_"]
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
# With fp8 scaled per row, each activation's quantization is a row reduction (the row's amax) and a pointwise pass (the
# division and cast). Inductor's default splits a long row's reduction over several programs, and then the amax and the
# quantization are separate kernels, each reading the row from memory (and computing the GELU before it). Unsplit, they
# fuse into one kernel that reads the row once: FLUX.1's single blocks 8.4 -> 5.2 ms of a step, the step 97.8 -> 94.8 ms
# on an H100 (benchmarks/RESULTS.md run 27). One scale per tensor reduces the whole tensor, which needs the split.
# Decided by the granularity the device's own probe picked, not by the card: unmeasured on sm_120 (ZeroGPU's RTX Pro
# 6000), where an unsplit row reduction still has a program per row (thousands a call) to fill its SMs.
ROW_FP8_INDUCTOR_CONFIGS = {"split_reductions": False}
# A preset's timing: one call of 1 step and one of this many; the difference is the steps' time. With 3, the
# steps of a 1.3B FLUX-shaped model (about 10 ms each on an H100) drowned in the calls' own noise and timed as 0
# (RESULTS.md run 20); the 3 s floor of every request covered them.
TIMED_STEPS = 6


def inductor_configs(report: Report) -> dict:
    """Inductor's options for the programs `report` describes (its fp8 granularity decides the reductions' split)."""
    return {**INDUCTOR_CONFIGS, **(ROW_FP8_INDUCTOR_CONFIGS if report.fp8_granularity == "row" else {})}


def optimize_pipeline_(model: Model, settings: Settings, ranks: parallel.Ranks | None = None,
                       hardware: Hardware | None = None) -> Report:
    """Makes `model.pipe.transformer` fast in place, one step of the recipe after another. Returns what was done and
    what fell back, and why. With `ranks` (several ranks, aot/parallel.py) it is split across them by context
    parallelism, eagerly. `hardware`: detected here unless given."""
    hardware = hardware or detect()
    report = Report(device=hardware.label, dtype=str(model.pipe.transformer.dtype).removeprefix("torch."),
                    family=model.family.name, hardware=hardware)
    report.decide("recipe", Decision(settings.recipe, model.recipe_summary()))
    stored = stored_quantization(model.pipe.transformer)  # a pre-quantized checkpoint: served as stored
    if stored and stored.mode == "fp8" and (floored := floor_activation_scales_(model.pipe.transformer)):
        report.note("quantization", f"the stored fp8 layers' activation scales floored at {ACTIVATION_SCALE_FLOOR} "
                                    f"({floored} layers), so that a row of zeros stays zero rather than NaN")
    lora.fuse_(model, settings, report, stored)  # 0
    compiled = _choose(model, settings, hardware, report, stored, eager=ranks is not None)  # 1
    granularity = _probe(model, settings, hardware, report)  # 2
    plan, hardware = _plan_and_place_(model, settings, hardware, report, stored, granularity, compiled)  # 3
    report.decide("cuda_graphs", choose_cuda_graphs(settings.cuda_graphs, hardware, compiled, report.step_cache,
                                                    plan.low_vram, len(experts(model.pipe))))
    if compiled:  # 4-5
        _compile_or_serve_eager(model, settings, report, plan, hardware, stored)
    else:  # 5
        if ranks:
            ranks.enable_(model, report)
        _eager_fp8(model, report, plan, stored)
        _time_eager(model, report, hardware)
    step_cache.enable_(model.pipe.transformer, report)  # 6
    lora.serve_choices_(model, report)  # 7
    return report


def _choose(model: Model, settings: Settings, hardware: Hardware, report: Report, stored: Stored | None,
            eager: bool) -> bool:
    """Step 1: compilation, the weight format (fp8 only pays when compiled; stored weights are checked against
    QUANTIZATION, never quantized again), the step cache and the text handling. Returns whether it compiles."""
    if settings.dynamic_shapes and model.family.dynamic_spec is None:
        raise ValueError(f"DYNAMIC_SHAPES=1 is not supported for the {model.family.name} family; unset it")
    decision = parallel.EAGER if eager else choose_compile(settings.compile, hardware)
    compiled = report.decide("compile", decision) == "aoti"
    report.decide("quantization", stored_decision(stored, settings.quantization, hardware) if stored
                  else choose_quantization(settings.quantization, hardware, compiled))
    report.decide("step_cache", step_cache.choose(settings.step_cache, model))
    report.text = _text_handling(model)
    return compiled


def _plan_and_place_(model: Model, settings: Settings, hardware: Hardware, report: Report, stored: Stored | None,
                     granularity: str | None, compiled: bool) -> tuple[MemoryPlan, Hardware]:
    """Step 3: the memory plan (on ZeroGPU, the task size), then placement, the attention backend and quantization,
    all before compiling, so that every program reads the quantized weights. Returns the plan and the hardware with
    its ZeroGPU size."""
    pipe, family = model.pipe, model.family
    plan, hardware = plan_memory(pipe, settings.low_vram, "none" if stored else settings.quantization,
                                 settings.vram_limit_gib, model.max_image_tokens, hardware, granularity is not None,
                                 compiled, report, family.keep_bf16, settings.zerogpu_size,
                                 decided="none" if stored else report.quantization,
                                 activation_bytes_per_token=family.activation_bytes_per_token,
                                 extra=model.extra_modules)
    report.device, report.hardware = hardware.label, hardware
    if not stored and plan.quantization and plan.quantization != report.quantization:
        report.decide("quantization", Decision(plan.quantization, f"memory plan: {plan.reason}",
                                               fell_back=not plan.low_vram))  # low-VRAM mode is reported already
    report.fp8_granularity = (granularity or "row") if report.quantization == "fp8" else ""
    report.startup["model_load_s"] = model.load_seconds
    with _timed(report, "place_s"):
        place_pipeline_(pipe, plan, hardware.device, family.keep_bf16, report.fp8_granularity or "row",
                        model.extra_modules)
    if report.attention != SDPA:
        try:
            for expert in experts(pipe):
                expert.set_attention_backend(report.attention)
        except Exception as err:  # noqa: BLE001 - a missing kernel or package: any failure means "use SDPA"
            _use_sdpa(pipe, report, f"{report.attention} unavailable ({type(err).__name__}: {err})")
    if not stored and not plan.low_vram:  # low-VRAM placement quantized block by block already
        try:
            with _timed(report, "quantize_s"):
                for expert in experts(pipe):
                    quantize_(expert, report.quantization, keep_bf16=family.keep_bf16,
                              granularity=report.fp8_granularity or "row")
        except Exception as err:  # noqa: BLE001 - serve unquantized rather than not at all, and say so
            report.fallback("quantization", f"{report.quantization} failed ({type(err).__name__}: {err}); unquantized")
            report.quantization, report.fp8_granularity = "none", ""
    return plan, hardware


def _probe(model: Model, settings: Settings, hardware: Hardware, report: Report) -> str | None:
    """Step 2: tries the fp8 scale granularities and the attention backends on the device (a short GPU task on
    ZeroGPU), and records the decisions. Returns the fp8 granularity that ran, or None where fp8 cannot run."""
    fp8 = fp8_candidates(report.quantization, hardware)
    attention, decided = attention_candidates(settings.attention, hardware)
    if decided is not None:
        report.decide("attention", decided)
    if not fp8 and not attention:
        return None
    tokens = model.max_image_tokens + model.max_text_tokens
    shape = AttentionShape.of(model.pipe.transformer, tokens) if attention else None
    try:
        results = gpu_task(run_probes, PROBE_TASK_SECONDS, hardware)(fp8, attention, shape)
    except Exception as err:  # noqa: BLE001 - no device to try them on: the tables' guesses, untested, and said
        report.fallback("probes", f"could not run on the device ({type(err).__name__}: {err}); fp8 per-row scales and "
                                  "SDPA untested")
        if attention:
            report.decide("attention", Decision(SDPA, "the probe did not run"))
        return fp8[0] if fp8 else None
    report.probes = {kind: {name: vars(probe) for name, probe in found.items()} if isinstance(found, dict) else found
                     for kind, found in results.items()}
    if attention:
        report.decide("attention", pick_attention(attention, results["attention"],
                                                  fastest=settings.attention == "auto"))
    if not fp8:
        return None
    granularity, failed = pick_fp8(fp8, results["fp8"])
    for line in failed:
        report.fallback("quantization", line)
    if granularity is None:
        report.decide("quantization", Decision("none", "no fp8 GEMM ran on the device", fell_back=True))
    return granularity


def _compile_or_serve_eager(model: Model, settings: Settings, report: Report, plan: MemoryPlan, hardware: Hardware,
                            stored: Stored | None) -> None:
    """Steps 4-5 when compiling: every program compiled or loaded and installed, and timed, or, if that fails,
    eager with the reason reported."""
    for expert in experts(model.pipe):
        own_tensors_(expert)
    if hardware.device == "cuda":
        trust_host_isa_()
    # Inductor's own cache beside the programs: kernels built for one key are reused by the next (another preset,
    # a bumped option), about 40% of a compile (benchmarks/RESULTS.md run 13)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(settings.cache_dir) / "inductor"))
    report.compile_scope = settings.aot_scope
    needs_blocks = [  # what a whole-model program cannot do; the first that applies is reported
        (model.family.regional_only, f"regional programs for {model.family.name}: {model.family.regional_only}"),
        (plan.stream, ("regional programs for streamed blocks: their weights are copied in before each block's "
                       "call (aot/streaming.py), which a whole-model program never makes")),
        (report.step_cache != "off", (f"regional programs for STEP_CACHE={report.step_cache}: it skips blocks, and "
                                      "a whole-model program has none")),
    ]
    why = next((why for needed, why in needs_blocks if needed), None)
    if why and report.compile_scope == "model":
        report.compile_scope = "blocks"
        report.fallback("compile scope", why)
    start = time.perf_counter()
    while True:
        try:
            compile_or_load_(model, settings, report, hardware)
            break
        except Exception as err:  # the app must keep serving, and say why
            log.info("AoT compile or load failed; the full error:", exc_info=err)
            for expert in experts(model.pipe):
                restore_eager_(expert)
            reason = str(err) if isinstance(err, CompileFailed) else f"{type(err).__name__}: {err}"
            if report.attention != SDPA:  # e.g. a hub kernel that torch.export cannot trace: retry once
                _use_sdpa(model.pipe, report, f"AoT compile with {report.attention} failed ({reason})")
                continue
            report.fallback("compile", f"AoT compilation failed, serving eager ({reason})")
            report.compile, report.compile_source = "none", ""
            report.cuda_graphs, report.cuda_graphs_reason = "off", "compilation failed"
            # the failed programs' instances may still hold the fp8 weights: collected before they are undone (run
            # 25: the undo on an 80 GB H100 ran out of memory with 70 GiB allocated; that this was why is not measured)
            del err
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            _eager_fp8(model, report, plan, stored)
            _time_eager(model, report, hardware)
            return
    report.compile_seconds = round(time.perf_counter() - start, 1)
    log.info("AoT %s: %s in %.1f s (cache keys %s), programs: %s; start-up: %s", report.compile_scope,
             report.compile_source, report.compile_seconds, report.cache_keys, report.programs, report.startup)


@contextlib.contextmanager
def _timed(report: Report, what: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        report.startup[what] = round(time.perf_counter() - start, 2)


class CompileFailed(RuntimeError):
    """A compile that failed on the device (on ZeroGPU, in the GPU worker), with the error's type and message."""


def _text_handling(model: Model) -> str:
    length = model.max_text_tokens  # an edit's: its images' vision tokens too (Qwen-Image-Edit)
    return {Text.FIXED: f"fixed: the pipeline pads prompts to {length} tokens",
            Text.DYNAMIC: f"dynamic axis up to {length} tokens: one program serves every prompt"}[model.family.text]


def _use_sdpa(pipe, report: Report, reason: str) -> None:
    report.fallback("attention", f"{reason}; using sdpa")
    for expert in experts(pipe):
        expert.set_attention_backend("native")
    report.attention = SDPA


def _eager_fp8(model: Model, report: Report, plan: MemoryPlan, stored: Stored | None) -> None:
    """fp8 weights that no program runs: unfused eager fp8 is about 3x slower than bf16 (RESULTS.md), so they are
    undone where there are bf16 weights to go back to and room for them (`plan`), else kept and said so."""
    if (stored.mode if stored else report.quantization) != "fp8":
        return
    if stored or plan.low_vram or not plan.bf16_fits:
        why = "the checkpoint stores no bf16 weights" if stored else "bf16 weights would not fit"
        report.fallback("quantization", f"fp8 kept without compilation (about 3x slower than bf16): {why}")
    else:
        for expert in experts(model.pipe):
            dequantize_(expert)
        report.fallback("quantization", "fp8 undone: without compilation it is slower than bf16")
        report.quantization, report.fp8_granularity = "none", ""


def program_groups(model: Model, scope: str, dynamic: bool) -> dict[int | tuple, list[Preset]]:
    """The programs to build and the sizes each serves (the presets, and a two-stage recipe's first stages: every
    size the transformer is called at): sizes with the same program shape share one; with DYNAMIC_SHAPES, or a
    family whose block programs take any size, one program (keyed by the largest size, which it is traced at) serves
    them all."""
    family, sizes = model.family, model.stage_presets
    if dynamic or family.dynamic_tokens or (family.one_program and scope == "blocks"):
        largest = max(sizes, key=family.tokens)
        return {family.tokens(largest): [largest, *(p for p in sizes if p != largest)]}
    groups: dict[int | tuple, list[Preset]] = {}
    for preset in sizes:
        groups.setdefault(family.program_shape(preset, scope), []).append(preset)
    return dict(sorted(groups.items()))


def token_range(model: Model) -> tuple[int, int]:
    """Image-token lengths a dynamic-shape program accepts: from the smallest preset to twice the largest, or an
    editing family's largest edit if that is more (its output's tokens and its inputs')."""
    tokens = [model.family.tokens(p) for p in model.presets]
    return max(2, min(tokens)), max(2 * max(tokens), model.max_image_tokens)


@dataclass(frozen=True)
class DeviceRun:
    """What one startup task on the device did: each program compiled (seconds), each preset timed. Plain values:
    on ZeroGPU it comes back from the GPU worker, where an exception would arrive as its class name alone."""

    compile_seconds: dict = field(default_factory=dict)  # program shape -> seconds
    timings: dict = field(default_factory=dict)  # preset name -> Timing
    install_seconds: float = 0.0
    warm_up_seconds: float = 0.0
    graphs: dict = field(default_factory=dict)  # each call shape's CUDA graph check (aot/graphs.py GraphCheck)
    graph_decisions: dict = field(default_factory=dict)  # call shape -> its check
    timed_now: bool = True  # False: the timings and graph checks are an earlier start's on this card
    error: str = ""
    adopted: dict = field(default_factory=dict)  # program shape -> the foreign package's source (aot/hub.py)
    refusals: list = field(default_factory=list)  # foreign packages refused, and why


@dataclass
class Programs:
    """The programs a start serves: per program shape, its presets, its cache key and entry, and its manifest once
    read or compiled (None: missing)."""

    groups: dict  # program shape -> the presets it serves (the first is the one it is traced at)
    keys: dict  # program shape -> (key, entry directory)
    served: tuple[int, int] | None  # a dynamic-shape program's image-token range
    manifests: dict = field(default_factory=dict)
    sources: dict = field(default_factory=dict)  # program shape -> the start-up record of how it came
    measured: Path | None = None  # this card's timings and graph checks from an earlier start (aot/cache.py)

    def label(self, shape) -> str:
        return ", ".join(p.name for p in self.groups[shape])

    @property
    def missing(self) -> list:
        return [shape for shape in self.groups if self.manifests.get(shape) is None]


def plan_programs(model: Model, settings: Settings, report: Report, hardware: Hardware) -> Programs:
    """Step 4's plan: one program per preset shape (or one dynamic-shape program for all), each under the key of
    everything that makes it valid."""
    dynamic = settings.dynamic_shapes or model.family.dynamic_tokens is not None
    if model.family.dynamic_tokens and not settings.dynamic_shapes:
        report.note("programs", f"one over a dynamic image-token range for {model.family.name}: "
                                f"{model.family.dynamic_tokens}")
    served = token_range(model) if dynamic else None
    groups = program_groups(model, report.compile_scope, dynamic)
    keys = {}
    for shape in groups:
        key = cache_key(model.pipe, model.family.name, settings.model_id, settings.revision, report, hardware,
                        report.compile_scope, list(served) if served else shape, dynamic,
                        report.text, inductor_configs(report))
        keys[shape] = (key, Path(settings.cache_dir) / key_digest(key))
    measured = measured_path(Path(settings.cache_dir), [root.name for _, root in keys.values()],
                             [p.name for p in model.presets],
                             # half a ZeroGPU card steps slower than all of it: its timings are its own
                             f"{hardware.name} {hardware.size.value}" if hardware.size else hardware.name)
    return Programs(groups, keys, served, measured=measured)


def fetch_or_compile(model: Model, programs: Programs, settings: Settings, report: Report,
                     hardware: Hardware) -> DeviceRun:
    """Each program from its cache entry, or a pinned Hub repo, if its key matches; the rest compiled on the device,
    into the cache. Then, on the device, every program installed and every preset timed."""
    absent = [shape for shape, (_, root) in programs.keys.items() if not root.exists()]
    foreign = []
    if settings.hub_repo and absent and report.compile_scope == "blocks":  # spaces' layout; refusals reported there
        with _timed(report, "download_s"):
            foreign = hub.fetch_blocks(settings.hub_repo, [programs.keys[shape] for shape in absent],
                                       hub.block_classes(model.pipe.transformer), report)
    elif settings.hub_repo and absent:
        with _timed(report, "download_s"):
            hub.fetch_from_hub(settings.hub_repo, [programs.keys[shape][1].name for shape in absent],
                               Path(settings.cache_dir), report)
        still = [programs.keys[shape][1].name for shape in absent if not programs.keys[shape][1].exists()]
        if still:  # another architecture's, torch's or CUDA's programs may be there: never these keys'
            report.fallback("compiled packages", f"{settings.hub_repo} has no entry for {hardware.arch}, torch "
                                                 f"{torch.__version__}, CUDA {hardware.cuda} ({', '.join(still)}); "
                                                 "compiling here")
    for shape, (key, root) in programs.keys.items():
        start = time.perf_counter()
        programs.manifests[shape] = read_cached(root, key)
        origin = (programs.manifests[shape] or {}).get("source")  # a foreign package's, once checked here
        programs.sources[shape] = {"cache_key": root.name, "resolutions": programs.label(shape),
                                   "source": ("downloaded" if shape in absent else "cached") + (
                                       f", {origin}" if origin else ""),
                                   "verify_s": round(time.perf_counter() - start, 2)}
    missing = programs.missing

    def on_device() -> DeviceRun:
        """Compiles what is missing, installs every program, and times each preset (the first call of each program
        loads it: the .so and its kernels). Only picklable values cross into the ZeroGPU worker and back; the
        pipeline is reached through the closure."""
        seconds, adopted, refusals = {}, {}, []
        try:
            for shape in missing:
                key, root = programs.keys[shape]
                preset = programs.groups[shape][0]
                start = time.perf_counter()
                source = foreign and hub.adopt_foreign(model, foreign, programs.groups[shape],
                                                       programs.served is not None, key, root, refusals)
                if source:
                    adopted[shape] = source
                else:
                    compile_into_cache(lambda out, preset=preset, key=key: _compile(
                        model, report.compile_scope, preset, programs.served, out, key["inductor"]), root, key)
                    seconds[shape] = round(time.perf_counter() - start, 1)
                programs.manifests[shape] = read_cached(root, key)
            # a warm start on a card that measured these programs before: its timings and graph decisions are kept,
            # and nothing is called here. Each program's first call (loading its kernels) and each kept graph's
            # capture and comparison move to the first request of its shape, as in every ZeroGPU worker, where a
            # start-up's own loads and captures are gone with its task anyway (RESULTS.md run 24: 6.7 of a 7.9 s
            # warm start were those calls)
            measured = None if missing else read_measured(programs.measured)
            start = time.perf_counter()
            graphed = install_(model, programs, report, measured and measured["graphs"])
            installed = time.perf_counter()
            if measured:
                timings = {name: Timing(**timing) for name, timing in measured["timings"].items()}
                decisions = measured["graphs"] if graphed else {}
                graphs = {check["shape"]: check for check in decisions.values()}
            else:
                timings = time_presets(model, [p for presets in programs.groups.values() for p in presets])
                graphs, decisions = (graphed.summary(), graphed.decisions()) if graphed else ({}, {})
            if graphed:
                graphed.close()
            return DeviceRun(seconds, timings, round(installed - start, 2), round(time.perf_counter() - installed, 2),
                             graphs, decisions, timed_now=not measured, adopted=adopted, refusals=refusals)
        except Exception as err:  # reported by the caller, which serves eager
            log.info("compiling, installing or timing the programs failed; the full error:", exc_info=err)
            return DeviceRun(seconds, error=f"{type(err).__name__}: {err}", refusals=refusals)

    return gpu_task(on_device, STARTUP_TASK_SECONDS if missing else MAX_TASK_SECONDS, hardware)()


def install_(model: Model, programs: Programs, report: Report,
             decided: dict[str, bool] | None = None) -> GraphedForward | None:
    """Every program behind the dispatcher of the module it replaces (aot/programs.py), and with CUDA_GRAPHS the
    transformer's calls behind graph replay (aot/graphs.py; `decided`: the shapes checked at start-up)."""
    transformer, *others = experts(model.pipe)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731 - not its path
    for other in others:  # the programs were compiled on the first expert: they fit the others only if alike
        if public(other.config) != public(transformer.config):
            raise ValueError(f"the experts of {type(model.pipe).__name__} differ in their configs; their programs "
                             "would not fit each other's weights")
    for expert in (transformer, *others):  # the same packages, each expert's loaded against its own weights
        install_programs_(expert, [(programs.keys[shape][1], programs.manifests[shape]["signatures"],
                                    programs.label(shape)) for shape in programs.groups])
    if report.cuda_graphs != "on":
        return None
    transformer.forward = GraphedForward(transformer, transformer.forward, decided)
    return transformer.forward


def compile_or_load_(model: Model, settings: Settings, report: Report, hardware: Hardware) -> None:
    """Step 4 and 5 with programs: plan them, fetch or compile them and time the presets on the device, install them
    where requests run, and record how each came. Adding a preset compiles only the new program."""
    programs = plan_programs(model, settings, report, hardware)
    report.cache_keys = [root.name for _, root in programs.keys.values()]
    run = fetch_or_compile(model, programs, settings, report, hardware)
    for refusal in run.refusals:
        report.fallback("compiled packages", refusal)
    if run.error:
        raise CompileFailed(run.error)
    compiled = list(run.compile_seconds)
    for shape, seconds in run.compile_seconds.items():
        programs.sources[shape].update(source="compiled", compile_s=seconds)
    for shape, source in run.adopted.items():
        programs.sources[shape].update(source=source)
    if hardware.zerogpu:  # what the GPU worker installed is gone with it; requests run in forks of this process
        programs.manifests.update({shape: read_cached(programs.keys[shape][1], programs.keys[shape][0])
                                   for shape in [*compiled, *run.adopted]})
        graphed = install_(model, programs, report, run.graph_decisions)
        if graphed:
            graphed.close()
    if compiled and settings.hub_upload:
        with _timed(report, "upload_s"):
            hub.upload_to_hub(settings.hub_upload, Path(settings.cache_dir),
                              [programs.keys[s][1].name for s in compiled], report,
                              blocks=hub.block_classes(model.pipe.transformer) if report.compile_scope == "blocks"
                              else None)
    report.startup["programs"] = list(programs.sources.values())
    report.startup.update(install_s=run.install_seconds, warm_up_s=run.warm_up_seconds)
    report.timings = {name: vars(timing) for name, timing in run.timings.items()}
    report.startup["timings"] = "measured now" if run.timed_now else "this card's, kept from an earlier start"
    if run.timed_now:
        write_measured(programs.measured, report.timings, run.graph_decisions)
    _report_graphs(report, run.graphs)
    if run.graphs and not run.timed_now:
        report.note("cuda graphs", "decided at an earlier start on this card; each kept graph is captured, and "
                                   "compared with the uncaptured call, at its shape's first request")
    report.compile_source = ("loaded from cache" if not compiled else "compiled now" if len(compiled) == len(
        programs.groups) else f"{len(compiled)} of {len(programs.groups)} programs compiled now, the rest loaded from "
        "cache")
    report.programs = [{"image_tokens": f"{programs.served[0]}..{programs.served[1]}" if programs.served
                        else model.family.tokens(presets[0]), "resolutions": [p.name for p in presets]}
                       for presets in programs.groups.values()]


def _report_graphs(report: Report, checks: dict) -> None:
    report.graphs = checks
    for check in checks.values():
        if failed(check):
            report.fallback("cuda graphs", failed(check))
        elif not check["kept"]:
            report.note("cuda graphs", f"{check['shape']}: replay {check['replay_ms']} ms is not faster than "
                                       f"{check['uncaptured_ms']} ms uncaptured; that shape runs uncaptured")


def _compile(model: Model, scope: str, preset: Preset, served, out_dir: Path, configs: dict) -> dict:
    signatures = compile_program(model, scope, preset, served, out_dir, configs)
    release_export_memory()
    return signatures


def time_presets(model: Model, presets: list[Preset]) -> dict[str, Timing]:
    """Each size's time on this device (`Model.stage_presets`: a two-stage recipe's first stages too). A 1-step call
    first, which loads its programs and must give finite latents; then whole images of 1 and of TIMED_STEPS steps,
    each one pipeline call (`Model.stage`): the difference is the steps' time, the rest is the text encoders, the VAE
    and the hand-over. A two-stage request's output adds its upsampler's time to that rest."""
    calls = model.batch_one_calls(model.defaults.guidance)
    timings = {}
    for preset in presets:
        first_call(model, preset)
        # with the inputs the family needs and no more: a request's references scale its call up (aot/zerogpu.py
        # `Durations.task_seconds`), so a text-only request to an editing family asks for a text-only duration
        with torch.inference_mode():
            one, many = (_seconds(lambda n=n: model.stage(CAPTURE_PROMPT, preset, steps=n,
                                                          images=model.needed_images()))
                         for n in (1, TIMED_STEPS))
        call = max(many - one, 0.0) / (TIMED_STEPS - 1) / calls
        fixed = max(one - calls * call, 0.0)
        if model.recipe and preset in model.presets:
            fixed += _upsample_seconds(model, preset)
        timings[preset.name] = Timing(round(call, 4), round(fixed, 4))
    return timings


def _upsample_seconds(model: Model, preset: Preset) -> float:
    """The latent upsampler's time in a two-stage request for `preset`, on its first stage's latents."""
    first, _ = model.stages(preset)[0]
    with torch.inference_mode():
        # with the inputs the family needs: an image-to-video stage 1 draws nothing without its first frame
        latents = model.outputs(model.stage(CAPTURE_PROMPT, first, steps=1, output_type="latent",
                                            images=model.needed_images()))
        return _seconds(lambda: model.upsample(latents))


def first_call(model: Model, preset: Preset) -> None:
    """A 1-step call at `preset`, which loads its programs (and checks its CUDA graph); it must give finite latents."""
    with torch.inference_mode():
        latents = model.outputs(model.stage(CAPTURE_PROMPT, preset, steps=1, output_type="latent",
                                            images=model.needed_images()))
    if not all(torch.isfinite(t).all() for t in torch.utils._pytree.tree_leaves(latents)):
        raise RuntimeError(f"the program for {preset.name} returned non-finite values")


def _seconds(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _time_eager(model: Model, report: Report, hardware: Hardware) -> None:
    """Step 5 without programs: each preset timed on the device, for the requests' durations; if that fails, they
    are estimated, and said so."""
    def on_device() -> DeviceRun:
        start = time.perf_counter()
        try:
            return DeviceRun(timings=time_presets(model, list(model.stage_presets)),
                             warm_up_seconds=round(time.perf_counter() - start, 2))
        except Exception as err:  # reported below
            log.info("timing the presets failed; the full error:", exc_info=err)
            return DeviceRun(error=f"{type(err).__name__}: {err}")

    try:
        run = gpu_task(on_device, MAX_TASK_SECONDS, hardware)()
    except Exception as err:  # noqa: BLE001 - ZeroGPU's own failure (no GPU, a failed worker): reported below
        run = DeviceRun(error=f"{type(err).__name__}: {err}")
    if run.error:
        report.fallback("durations", f"timing the presets on the device failed ({run.error}); each request asks for "
                                     "a duration estimated from an H100's step")
        return
    report.startup["warm_up_s"] = run.warm_up_seconds
    report.timings = {name: vars(timing) for name, timing in run.timings.items()}


def main(argv: list[str] | None = None) -> int:
    """`python optimization.py --precompile --out DIR`: compile ahead of deploy with the current settings
    (MODEL_ID, PRESETS, QUANTIZATION, ...) on the target GPU, print the cache keys and where the files went."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--precompile", action="store_true", required=True)
    parser.add_argument("--out", required=True, help="cache directory to fill (AOT_CACHE_DIR for the app)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.from_env({**os.environ, "AOT_CACHE_DIR": args.out, "COMPILE": "aoti"})
    report = optimize_pipeline_(load_model(settings), settings)
    if report.compile != "aoti":
        print(json.dumps({"error": report.fallbacks}), flush=True)
        return 1
    out = Path(args.out)
    print(json.dumps({"keys": report.cache_keys, "source": report.compile_source, "dir": str(out),
                      "files": [f"{key}/{name}" for key in report.cache_keys for name in entry_files(out / key)]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
