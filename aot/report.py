"""The record of what startup did, shown in the status panel and returned by the /status API."""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

from aot.hardware import Hardware

log = logging.getLogger("aot-space")


@dataclass(frozen=True)
class Decision:
    """One choice made at startup: the value, why, and whether it is a degradation the user must see or, not
    one, the usual choice on this hardware (no fp8 or FlashAttention-3 on a CPU), shown as a note."""

    value: str
    reason: str
    fell_back: bool = False
    expected: bool = False


@dataclass
class Report:
    device: str  # for people: the hardware's label (aot/hardware.py); decisions read `Hardware`, never this
    dtype: str
    family: str = ""
    hardware: Hardware | None = None  # what runs it: device, arch, SMs, memory, ZeroGPU card and task size
    attention: str = "sdpa"
    attention_reason: str = ""
    step_cache: str = "off"  # what skips work between steps, with its parameters ("fbc:0.05"), or "off"
    step_cache_reason: str = ""  # which diffusers cache config runs, or why none does
    quantization: str = "none"
    quantization_reason: str = ""
    fp8_granularity: str = ""  # "row" or "tensor" scales, as the device's probe found (aot/probes.py); "" without fp8
    zerogpu_size: str = ""  # ZeroGPU's task size, "large" or "xlarge" (aot/zerogpu.py); "" elsewhere
    zerogpu_size_reason: str = ""
    probes: dict = field(default_factory=dict)  # what ran on the device at startup: fp8 granularities, attention
    compile: str = "none"
    compile_reason: str = ""
    compile_scope: str = ""  # "model" | "blocks"
    compile_source: str = ""  # "compiled now" | "loaded from cache" | "1 of 2 programs compiled now, ..."
    compile_seconds: float = 0.0
    cuda_graphs: str = "off"  # "on": compiled calls replayed from CUDA graphs (aot/graphs.py)
    cuda_graphs_reason: str = ""
    graphs: dict = field(default_factory=dict)  # each call shape's start-up check: exact, ms uncaptured/replayed, kept
    text: str = ""  # how prompt lengths reach the programs: fixed, padded to N, or a dynamic axis
    recipe: str = "standard"  # RECIPE: "standard" (one pipeline call), or "distilled" (a family's two-stage recipe)
    recipe_reason: str = ""  # what a request runs, in words: each size's stages
    cache_keys: list[str] = field(default_factory=list)  # one cache entry per program
    programs: list[dict] = field(default_factory=list)
    memory: dict = field(default_factory=dict)  # the MemoryPlan: low-VRAM mode or not, and why
    parallel: dict = field(default_factory=dict)  # several ranks: engine, degree, world size, error; {} for one
    # Where start-up went, in seconds: model load, placement, quantize, each program (compiled, downloaded or
    # verified from the cache), install and warm-up (which loads each program)
    startup: dict = field(default_factory=dict)
    # Each preset's request time measured on the device at startup: per transformer call and the rest (Timing)
    timings: dict = field(default_factory=dict)
    hub_upload: dict = field(default_factory=dict)  # AOT_HUB_UPLOAD: the repo, the commit to pin, the entries
    # LORAS fused at startup (aot/lora.py): name, file, sha256, scale, layers, rank, text encoders, defaults asked
    loras: list[dict] = field(default_factory=list)
    # LORA_CHOICES a request may pick: name, file, sha256, scale, layers, rank, host bytes kept for it
    lora_choices: list[dict] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # choices expected on this hardware: information, not degradations

    def fallback(self, what: str, reason: str) -> None:
        """Every degradation goes through here: logged once, kept for the UI and the API. The same one again (a GPU
        worker's finding, met again by the next worker) is not repeated."""
        message = f"{what}: {reason.splitlines()[0][:300]}"
        if message in self.fallbacks:
            return
        log.warning("FALLBACK %s", message)
        self.fallbacks.append(message)

    def decide(self, what: str, decision: Decision) -> str:
        """Records `decision` as the report's `what` and `what_reason`; a fallback is also reported."""
        setattr(self, what, decision.value)
        setattr(self, f"{what}_reason", decision.reason)
        if decision.fell_back:
            self.fallback(what, decision.reason)
        elif decision.expected:
            self.note(what, decision.reason)
        return decision.value

    def note(self, what: str, reason: str) -> None:
        """A choice this hardware makes the usual one, e.g. no fp8 on a CPU: logged, and shown apart from fallbacks."""
        message = f"{what}: {reason.splitlines()[0][:300]}"
        log.info("on this hardware: %s", message)
        self.notes.append(message)

    def as_dict(self) -> dict:
        return {**asdict(self), "hardware": self.hardware.as_dict() if self.hardware else None}
