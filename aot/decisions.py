"""Hardware decisions: pure functions of (setting, `Hardware`) that return a `Decision`, unit-tested on CPU for every
architecture from sm_80 to sm_120.

The tables here are first guesses. Where a guess can be wrong on a card we could not test (fp8 per-row scales on
sm_120, a hub attention kernel), the candidates are tried in order on the device itself (aot/probes.py) and
`pick` keeps the first that runs (fp8) or the fastest that runs and agrees (attention); a candidate that fails is a
reported fallback, with its error.

What this hardware cannot run (fp8 before Ada, no fast attention kernel for this architecture, AoT by default on a
CPU) is an expected choice, shown as a note; what it could run but this start cannot (the hub offline) is a fallback."""
from __future__ import annotations

from aot.hardware import Hardware
from aot.report import Decision

FP8_MIN_CAPABILITY = (8, 9)  # Ada and newer have fp8 tensor cores
# fp8 scale granularities, most accurate first. cuBLAS refused per-row scales on an sm_120 RTX PRO 5000 (torch
# 2.10.0+cu130, CUBLAS_STATUS_NOT_SUPPORTED, pytorch/pytorch#192707) and takes per-tensor ones there; the probe
# finds out on the card.
FP8_GRANULARITIES = ("row", "tensor")
# diffusers attention backends worth trying per architecture, before SDPA (always the floor: torch's own kernels,
# which run everywhere). The probe times each at the model's attention shape and keeps the fastest that agrees with
# SDPA. Hopper: FlashAttention-3. Blackwell datacenter (sm_100): FlashAttention-4. Blackwell RTX (sm_120, ZeroGPU's
# RTX Pro 6000): FlashAttention-3 does not exist there; SageAttention 2 (int8 QK, fp8 PV) and 3 (fp4) have sm_120
# builds on the hub. All come from the hub through `kernels`.
FAST_ATTENTION = {(9, 0): ("_flash_3_hub",), (10, 0): ("flash_4_hub",), (12, 0): ("sage_hub", "sage_blackwell_hub")}
SDPA = "sdpa"
# A faster attention kernel is kept only if its output is this close to SDPA's (relative L2, bf16): the int8
# SageAttention measured 1.3e-2 against fp32 on the H100, cuDNN's fp8 attention 6.0e-2 (shared GPU notes)
ATTENTION_MAX_ERROR = 3e-2


def fp8_runs(hardware: Hardware) -> bool:
    return hardware.device == "cuda" and hardware.capability is not None and hardware.capability >= FP8_MIN_CAPABILITY


def choose_compile(requested: str, hardware: Hardware) -> Decision:
    if requested != "auto":
        return Decision(requested, "requested")
    if hardware.device == "cuda":
        return Decision("aoti", "auto: CUDA GPU")
    return Decision("none", "off on CPU by default (COMPILE=aoti compiles the tiny model too, ~20 s per program)",
                    expected=True)


def choose_quantization(requested: str, hardware: Hardware, compiled: bool) -> Decision:
    """The transformer's weight format. fp8 only pays when compiled: unfused eager fp8 runs about 3x slower than
    bf16 (RESULTS.md), so `auto` picks it only for compiled programs. An explicit request the hardware cannot honour
    is a startup error."""
    if requested == "fp8" and not fp8_runs(hardware):
        raise ValueError(f"QUANTIZATION=fp8 needs a CUDA GPU with compute capability >= 8.9; this is "
                         f"{hardware.device} {hardware.capability or ''}. Use QUANTIZATION=auto, int8 or none.")
    if requested != "auto":
        return Decision(requested, "requested")
    if not fp8_runs(hardware):
        return Decision("none", f"fp8 needs CUDA with compute capability >= 8.9, this is {hardware.device} "
                                f"{hardware.capability or ''}".strip(), expected=True)
    if not compiled:
        return Decision("none", "fp8 only pays when compiled (eager fp8 is about 3x slower than bf16), and "
                                "compilation is off", expected=True)
    return Decision("fp8", f"auto: compute capability {hardware.capability} >= 8.9, compiled")


def fp8_candidates(quantization: str, hardware: Hardware) -> tuple[str, ...]:
    """The fp8 granularities to probe, in order, when the transformer will be fp8; none otherwise."""
    return FP8_GRANULARITIES if quantization == "fp8" and fp8_runs(hardware) else ()


def attention_candidates(requested: str, hardware: Hardware) -> tuple[tuple[str, ...], Decision | None]:
    """The attention backends to probe, fastest expected first, SDPA last; and the decision when nothing needs a
    probe (SDPA alone), or the fallback that removed a candidate (its kernel is on the hub, which is offline)."""
    if requested not in ("auto", SDPA):
        return (requested, SDPA), None
    if requested == SDPA:
        return (), Decision(SDPA, "requested")
    if hardware.device != "cuda":
        return (), Decision(SDPA, f"no faster attention kernel for {hardware.device}", expected=True)
    fast = FAST_ATTENTION.get(hardware.capability, ())
    if not fast:
        return (), Decision(SDPA, f"no faster attention kernel than SDPA for {hardware.arch}", expected=True)
    if not hardware.hub_online:
        return (), Decision(SDPA, f"{' and '.join(fast)} for {hardware.arch} come from the hub through `kernels`, "
                                  "and the hub is offline", fell_back=True)
    return (*fast, SDPA), None


def pick_fp8(candidates: tuple[str, ...], results: dict) -> tuple[str | None, list[str]]:
    """The first granularity that ran on the device (None: none did), and a fallback line for each that failed
    before it. `results`: candidate -> aot.probes.Probe."""
    failed = []
    for granularity in candidates:
        probe = results[granularity]
        if probe.ok:
            return granularity, failed
        failed.append(f"fp8 with per-{granularity} scales failed on the device ({probe.error})")
    return None, failed


def pick_attention(candidates: tuple[str, ...], results: dict, fastest: bool = True) -> Decision:
    """The fastest backend that ran on the device and agrees with SDPA (`fastest`: ATTENTION=auto), or the requested
    one if it ran; a fallback if the first choice failed or disagreed."""
    runs = {name: probe for name, probe in results.items() if name in candidates and probe.ok
            and (name == SDPA or not fastest or probe.error_vs_sdpa <= ATTENTION_MAX_ERROR)}
    timings = ", ".join(f"{name} {probe.ms:.3f} ms" for name, probe in results.items() if probe.ok)
    if not runs:
        return Decision(SDPA, "no backend ran in the probe; SDPA, torch's own", fell_back=True)
    first = results[candidates[0]]
    if not fastest and first.ok:
        return Decision(candidates[0], f"requested; ran on the device ({timings})")
    best = min(runs, key=lambda name: runs[name].ms)
    if not first.ok:
        return Decision(best, f"{candidates[0]} failed on the device ({first.error}); fastest that ran: {best} "
                              f"({timings})", fell_back=True)
    if candidates[0] not in runs:
        return Decision(best, f"{candidates[0]} differs from SDPA by {first.error_vs_sdpa:.1e} (at most "
                              f"{ATTENTION_MAX_ERROR:.0e} kept); fastest that agrees: {best} ({timings})",
                        fell_back=True)
    return Decision(best, f"fastest on the device at the model's attention shape ({timings})")


def choose_cuda_graphs(requested: str, hardware: Hardware, compiled: bool, step_cache: str, low_vram: bool,
                       experts: int = 1) -> Decision:
    """Whether the compiled transformer's calls are replayed from CUDA graphs (aot/graphs.py). Each shape's graph is
    still kept only where its replay equals the uncaptured call and is faster, checked on the device. `experts`: the
    pipeline's denoisers (two for Wan 2.2 A14B)."""
    if requested == "on" and hardware.device != "cuda":
        raise ValueError(f"CUDA_GRAPHS=on needs a CUDA GPU; this is {hardware.device}. Use CUDA_GRAPHS=auto or off.")
    if requested == "off":
        return Decision("off", "requested")
    if hardware.device != "cuda":
        return Decision("off", "CUDA graphs need a CUDA GPU", expected=True)
    why_not = ("compilation is off: graphs replay the compiled programs" if not compiled else
               f"STEP_CACHE={step_cache} decides at each step which blocks run, so a step is not one fixed graph"
               if step_cache != "off" else
               "low-VRAM mode: streamed blocks copy their weights in at each call, and a graph's memory pool is "
               "outside the plan's budget" if low_vram else
               f"{experts} experts: graphs are captured and checked around one transformer's calls; not built for "
               "several yet" if experts > 1 else None)
    if why_not:
        return Decision("off", why_not, fell_back=requested == "on", expected=requested != "on")
    return Decision("on", f"{'requested' if requested == 'on' else 'auto: CUDA GPU'}; each shape's graph kept where "
                          "its replay equals the uncaptured call and is faster")
