"""ZeroGPU: the task size (`large`, half the card, or `xlarge`, all of it at twice the quota), the duration each
request asks for, and telling spaces' own answers from failed tasks.

spaces (`spaces/zero/client.py`) multiplies every requested duration by the card's `duration_factor` (1.5 on the RTX
Pro 6000) unless the size is `xlarge`, and ZeroGPU ends a task at that stretched duration. The durations here are
what a task needs on this device, measured at startup (`Timing`), with a margin; they are divided by the factor
before spaces multiplies them again, so the factor counts exactly once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from aot.hardware import Hardware, Size, ZeroGPUCard
from aot.report import Decision, Report

# ZeroGPU's per-call maximum is not documented; its staff have said about 5 minutes at most. A request whose duration
# (after spaces' factor) would pass this is refused with the fewest steps or the smallest preset that fit.
MAX_TASK_SECONDS = 300
# The startup compile task, as the ZeroGPU AoT guide asks for it: the duration the task gets, after spaces' factor
STARTUP_TASK_SECONDS = 1500
PROBE_TASK_SECONDS = 60  # a few tiny kernels, and a new worker's start
MARGIN = 1.3  # on times measured on this device: a busy host, a slower first call
FIXED_SECONDS = 3  # at least, for the text encoders, the VAE and the hand-over (0.12 s measured on an H100, run 15)
# A new GPU worker (the first request, or the next after a failed task) first copies the weights to the GPU: 2.9 s
# measured for 1.2 GiB of them and 8.5 s for 11.1 GiB on an H100 (run 15), about 2.2 s + 0.57 s/GiB; asked at twice.
WORKER_START_SECONDS, WORKER_SECONDS_PER_GIB = 4, 1.0
# A shape's first call in a worker loads its programs: 0.1-2.8 s measured (runs 15-17)
PROGRAM_LOAD_SECONDS = 5
# A LORA_CHOICES switch copies host values into the weights: 8.0 GiB in 0.16 s from pinned memory on an H200 (RESULTS.md
# run 22). ZeroGPU's main process cannot pin, so its workers copy from pageable memory: asked at 4 GiB/s, an assumption
# (not measured) well under the pinned rate
SWITCH_SECONDS_PER_GIB = 0.25
# Before anything is measured on the device (or when measuring failed): an H100's FLUX.1-dev step at 1024x1024 (4096
# image tokens), 98-115 ms compiled and 183 ms eager (RESULTS.md runs 13, 16), asked with a 1.3-1.5x margin, per
# transformer call
H100_CALL_SECONDS = {True: 0.15, False: 0.25}
REFERENCE_TOKENS = 4096
# Other token counts (a larger image, a video's frames x height x width) are estimated from a step's FLOPs: the linear
# layers' 2 x params per token and attention's 4 x width x layers per pair of tokens, which match at params / (2 x
# width x layers) tokens: 34,000 for FLUX.1-dev (11.9B, 3072 wide, 57 blocks) and for Wan 2.2 A14B's experts (14.3B,
# 5120, 40), 27,000 for Wan 2.2 TI2V-5B. From the configs, not measured; text tokens left out.
ATTENTION_EVEN_TOKENS = 34_000
H100_SMS = 132
# A card's step time against the H100's, for those estimates. The H200 slice (MIG 3g.71gb) has 60 of the H200's
# SMs: 132/60. The RTX Pro 6000 Blackwell, from its published specs (188 SMs, 1.79 TB/s, about 1,000 dense fp8
# TFLOP/s): half of it has about a quarter of an H100's dense fp8 and bf16 rate and of its memory bandwidth, the
# whole card about half. Not measured: we have no such card.
SLOWDOWN = {
    ("NVIDIA H200", None): H100_SMS / 60,
    ("NVIDIA RTX PRO 6000 Blackwell Server Edition", Size.LARGE): 4.0,
    ("NVIDIA RTX PRO 6000 Blackwell Server Edition", Size.XLARGE): 2.0,
}


def slowdown(name: str, sm_count: int, size: Size | None) -> float:
    """How much longer than an H100 a step takes on this card and size: the table, else by SM count."""
    return SLOWDOWN.get((name, size)) or max(1.0, H100_SMS / max(sm_count, 1))


def step_work(tokens: int) -> float:
    """A step's FLOPs at `tokens` image (or video) tokens, against FLUX.1-dev's at 1024x1024: linear in the tokens,
    and quadratic in them for attention (ATTENTION_EVEN_TOKENS)."""
    def flops(n: int) -> float:
        return n * (1 + n / ATTENTION_EVEN_TOKENS)

    return flops(tokens) / flops(REFERENCE_TOKENS)


def gpu_task(fn, seconds: float, hardware: Hardware):
    """`fn` as a ZeroGPU task that gets `seconds` once spaces applies its factor, at the hardware's size (`large`
    until one is chosen: the probes run before the plan); `fn` itself off ZeroGPU, where spaces leaves it as is."""
    import spaces

    card = hardware.zerogpu
    if card is None:
        return spaces.GPU(duration=math.ceil(seconds))(fn)
    size = hardware.size or (Size.LARGE if card.sizes else None)
    return spaces.GPU(duration=asked(seconds, card.factor_for(size)), size=size.value if size else None)(fn)


def asked(seconds: float, factor: float) -> int:
    """What `@spaces.GPU(duration=...)` is given so that, once spaces multiplies it by `factor` and rounds, the task
    gets at least `seconds`: whole seconds first, since spaces rounds the product (4.2 s over 1.5 would ask 3, which
    spaces stretches to 4.5 and rounds to 4)."""
    return max(1, math.ceil(math.ceil(seconds) / factor - 1e-9))


def answered_before_gpu_work(err: Exception) -> bool:
    """Whether `err` is ZeroGPU's answer to the request for a GPU (quota, no GPU, queue timeout), which leaves the
    GPU worker as it was. spaces titles those "ZeroGPU ..." and a failed task "ZeroGPU worker error"; any other
    failure (or title) counts as a replaced worker, which only asks for a first load too many."""
    title = getattr(err, "title", "") or ""
    return title.startswith("ZeroGPU") and title != "ZeroGPU worker error"


def choose_size(requested: str, card: ZeroGPUCard, fits: dict[Size, bool]) -> Decision:
    """ZEROGPU_SIZE: `large` when the memory plan fits half the card (and its packed weights stay under spaces'
    `xlarge_threshold`), else `xlarge`. `fits`: whether the plan for each size fits it. An explicit size that does
    not fit is a startup error; spaces is never left to switch on its own."""
    cost = {Size.LARGE: f"half the card, {card.memory_for(Size.LARGE) / 2**30:.0f} GiB, 1x quota",
            Size.XLARGE: f"the whole card, {card.memory_for(Size.XLARGE) / 2**30:.0f} GiB, 2x quota"}
    if requested != "auto":
        size = Size(requested)
        if not fits[size]:
            raise ValueError(f"ZEROGPU_SIZE={requested}: the pipeline does not fit {cost[size]} (status `memory` has "
                             "the plan); set ZEROGPU_SIZE=auto or xlarge, or QUANTIZATION=int8 or int4")
        return Decision(size.value, f"requested: {cost[size]}")
    if fits[Size.LARGE]:
        return Decision(Size.LARGE.value, f"auto: the pipeline fits {cost[Size.LARGE]}")
    return Decision(Size.XLARGE.value, f"auto: the pipeline does not fit half the card, so {cost[Size.XLARGE]}",
                    fell_back=True)


@dataclass(frozen=True)
class Timing:
    """One preset's request time on this device, measured at startup: per transformer call, and the rest of an
    image (text encoders, VAE, hand-over)."""

    call_s: float
    fixed_s: float


@dataclass(frozen=True)
class Durations:
    """The GPU seconds each request asks for. `timings`: measured per preset name; a preset without one is estimated
    from an H100's step, scaled by the card's slowdown and the preset's tokens (`step_work`)."""

    timings: dict[str, Timing]
    compiled: bool
    step_cost: float  # the family's step against FLUX.1-dev's at the same pixel count (estimates only)
    slowdown: float  # this card and size against an H100 (estimates only)
    weight_gib: float  # what a new worker copies to the GPU
    factor: float = 1.0  # spaces' duration factor for this size (1 off ZeroGPU or on `xlarge`)
    quota_factor: int = 1  # `xlarge` costs twice the quota
    limited: bool = False  # on ZeroGPU: a request must fit MAX_TASK_SECONDS
    switch_gib: float = 0.0  # the most a LORA_CHOICES switch copies: the largest choice in, the largest other out
    tokens: Callable[[object], int] = field(kw_only=True)  # a preset's image (or video) tokens: the family's `tokens`
    # The input images' tokens in the timed calls: those of the inputs the family needs (Qwen-Image-Edit's one, at the
    # largest preset), none for a family that can draw from the prompt alone
    timed_input_tokens: int = field(default=0, kw_only=True)
    # A request's transformer work, (preset, steps) -> each stage's size and steps (`Model.stages`): one stage of its
    # steps, or a two-stage recipe's first stage at a smaller size, then its second at the preset
    stages: Callable[[object, int], list] = field(default=lambda preset, steps: [(preset, steps)], kw_only=True)
    fixed_steps: bool = field(default=False, kw_only=True)  # a request takes the default steps only (`fixed_steps`)

    def task_seconds(self, preset, steps: int, calls: int, new_worker: bool, first_shape: bool,
                     input_tokens: int = 0) -> float:
        """The seconds a request's task needs, margin included: each stage's steps at its size's call (`call_seconds`;
        a two-stage request's at two sizes), and the rest of the request as timed at its output's size. `calls`: a
        step's transformer calls, counted at batch one (`Model.batch_one_calls`: 2 with CFG); `input_tokens`: what its
        input images add to each call."""
        timing = self.timings.get(preset.name)
        fixed = max(FIXED_SECONDS, timing.fixed_s * MARGIN) if timing else FIXED_SECONDS
        extra = (WORKER_START_SECONDS + WORKER_SECONDS_PER_GIB * self.weight_gib) if new_worker else 0.0
        if self.compiled and first_shape:
            extra += PROGRAM_LOAD_SECONDS
        # a worker's weights may hold another choice than the request's (none included): any request may switch
        extra += SWITCH_SECONDS_PER_GIB * self.switch_gib
        work = sum(n * self.call_seconds(size, input_tokens) for size, n in self.stages(preset, steps))
        return fixed + extra + calls * work

    def call_seconds(self, preset, input_tokens: int = 0) -> float:
        """One transformer call of batch one at `preset`'s size, margin included: as timed there, else an H100's
        estimate. A preset is timed with the inputs the family needs, so a text-only request asks for a text-only
        duration; more inputs scale the call by the work they add (`step_work`: from the configs, not measured; the
        larger call is no less efficient, so it errs long)."""
        tokens, timed = self.tokens(preset), self.timed_input_tokens
        work = step_work(tokens + max(input_tokens, timed))
        timing = self.timings.get(preset.name)
        if timing:
            return timing.call_s * MARGIN * work / step_work(tokens + timed)
        return H100_CALL_SECONDS[self.compiled] * self.step_cost * self.slowdown * work

    def requested(self, seconds: float) -> int:
        """What `@spaces.GPU(duration=...)` is given for a task of `seconds` (`asked`)."""
        return asked(seconds, self.factor)

    def granted(self, seconds: float) -> int:
        """The task's duration as ZeroGPU enforces it: the request times spaces' factor."""
        return round(self.requested(seconds) * self.factor)

    def fits(self, seconds: float) -> bool:
        return self.granted(seconds) <= MAX_TASK_SECONDS

    def worst_case(self, preset, steps: int, calls: int, input_tokens: int = 0) -> float:
        """A request's seconds on a new worker that has not run its shape: what every limit is checked at."""
        return self.task_seconds(preset, steps, calls, new_worker=True, first_shape=True, input_tokens=input_tokens)

    def most_steps(self, preset, steps: int, calls: int, input_tokens: int = 0) -> int:
        """The most steps, up to `steps`, that fit ZeroGPU's per-call maximum at `preset`; 0 if none does (with
        `fixed_steps`, `steps` or 0)."""
        if not self.limited:
            return steps
        counts = (steps,) if self.fixed_steps else range(1, steps + 1)
        return max((n for n in counts if self.fits(self.worst_case(preset, n, calls, input_tokens))), default=0)

    def too_long(self, presets, preset, steps: int, calls: int, input_tokens: int = 0) -> str | None:
        """Why a request cannot fit ZeroGPU's per-call maximum (counting a new worker's start, the worst case),
        naming the most steps at this preset and the presets (other frame counts among them) where these steps fit;
        None if it fits."""
        most = self.most_steps(preset, steps, calls, input_tokens)
        if most == steps:
            return None
        other = [p.name for p in presets if p != preset and self.fits(self.worst_case(p, steps, calls, input_tokens))]
        advice = [f"at most {most} steps at {preset.name}"] if most else []
        if other:
            advice.append(f"{steps} steps at {', '.join(other)}")
        fix = "; ".join(([] if most else [f"no step count fits at {preset.name}"]) +
                        ([f"use {' or '.join(advice)}"] if advice else []))
        past = self._past(preset, steps, calls, input_tokens)
        return f"{past}{' with these input images' if input_tokens else ''}; {fix}"

    def default_steps(self, preset, steps: int, calls: int) -> tuple[int, str | None]:
        """The default steps, lowered where the default request at `preset` would pass ZeroGPU's per-call maximum,
        and why (None: kept). Steps rather than frames: a preset's frames are a compiled program and the clip PRESETS
        asked for, while steps compile nothing and take time in proportion. A preset where no step fits is refused."""
        most = self.most_steps(preset, steps, calls)
        if not most:
            fewest = (self._past(preset, steps, calls) + ", which are fixed" if self.fixed_steps
                      else f"{self._past(preset, 1, calls)} even at 1 step")
            raise ValueError(f"{fewest}; put a smaller size or fewer frames first in PRESETS")
        if most == steps:
            return steps, None
        return most, f"{self._past(preset, steps, calls)}: the default is {most} steps, which fit"

    def _past(self, preset, steps: int, calls: int, input_tokens: int = 0) -> str:
        seconds = self.granted(self.worst_case(preset, steps, calls, input_tokens))
        return (f"{steps} steps at {preset.name} need about {seconds} s of GPU, past ZeroGPU's {MAX_TASK_SECONDS} s "
                "per request")

    def as_dict(self) -> dict:
        return {"source": "measured on this device" if self.timings else "estimated from an H100's step",
                "slowdown_vs_h100": None if self.timings else self.slowdown,
                "per_preset": {name: {"call_s": t.call_s, "fixed_s": t.fixed_s} for name, t in self.timings.items()},
                "margin": MARGIN, "duration_factor": self.factor, "quota_factor": self.quota_factor,
                "lora_switch_s": round(SWITCH_SECONDS_PER_GIB * self.switch_gib, 2),
                "max_task_seconds": MAX_TASK_SECONDS}


def durations(report: Report, family, weight_gib: float, timed_input_tokens: int = 0, stages=None,
              fixed_steps: bool = False) -> Durations:
    """The request durations for what `report` says runs: its measured timings, else estimates for its hardware and
    `family` (its step cost and tokens); `timed_input_tokens`: the timed calls' input images' tokens; `stages` and
    `fixed_steps`: a request's stages (`Model.stages`; None: one) and whether its steps are fixed."""
    hardware = report.hardware
    card, size = hardware.zerogpu, hardware.size
    name = card.model if card else hardware.name
    choices = sorted((entry.get("host_bytes", 0) for entry in report.lora_choices), reverse=True)
    return Durations({name: Timing(**t) for name, t in report.timings.items()}, report.compile == "aoti",
                     family.step_cost, slowdown(name, hardware.sm_count, size), weight_gib,
                     card.factor_for(size) if card else 1.0, 2 if size is Size.XLARGE else 1, card is not None,
                     sum(choices[:2]) / 2**30, tokens=family.tokens, timed_input_tokens=timed_input_tokens,
                     fixed_steps=fixed_steps, **({"stages": stages} if stages else {}))
