"""The hardware, detected once at startup: one frozen value that every hardware decision reads.

On ZeroGPU the main process has no GPU: spaces patches torch to report the card of its configuration
(`spaces/zero/configs.json`), the whole card, whatever share of it a task gets. So on ZeroGPU this reads spaces'
configuration itself, which also says how the card is shared (`large`: half of it; `xlarge`: all of it, at twice the
quota) and by how much spaces stretches every requested duration. Whether the card really runs what the tables
expect is probed on the card itself (aot/probes.py).
"""
from __future__ import annotations

import dataclasses
import enum
import os
import platform
from dataclasses import dataclass

import torch


class Size(str, enum.Enum):
    """ZeroGPU's task sizes on a shared card (spaces' `GPUSize`)."""

    LARGE = "large"  # half the card, spaces' default
    XLARGE = "xlarge"  # the whole card, at twice the quota


@dataclass(frozen=True)
class ZeroGPUCard:
    """ZeroGPU's card as the pinned spaces package describes it (one entry of `spaces/zero/configs.json`)."""

    model: str
    memory: int  # bytes, the whole card
    capability: tuple[int, int]
    sm_count: int
    xlarge_threshold: int | None  # tensors packed at startup above this many bytes make spaces pick `xlarge`
    duration_factor: float  # spaces multiplies each requested duration by this, unless the size is `xlarge`

    @property
    def sizes(self) -> tuple[Size, ...]:
        """The sizes a task may ask for; none where the card is not shared (the H200 slice)."""
        return (Size.LARGE, Size.XLARGE) if self.xlarge_threshold is not None else ()

    def memory_for(self, size: Size | None) -> int:
        return self.memory // 2 if size is Size.LARGE else self.memory

    def factor_for(self, size: Size | None) -> float:
        """What spaces multiplies a requested duration by (spaces/zero/client.py `get_duration_seconds`)."""
        return 1.0 if size is Size.XLARGE else self.duration_factor

    @classmethod
    def from_spaces(cls, entry: dict) -> ZeroGPUCard:
        return cls(entry["model"], int(entry["memory"]), (int(entry["sm_major"]), int(entry["sm_minor"])),
                   int(entry["sm_count"]), entry.get("xlarge_threshold"), float(entry.get("duration_factor", 1.0)))


@dataclass(frozen=True)
class Hardware:
    """Where the transformer runs: the device, its name, compute capability, SMs and memory, the ZeroGPU card and
    task size if any, and whether the hub is reachable. Built by `detect()`; `with_size` sets the ZeroGPU size."""

    device: str  # "cuda" or "cpu"
    name: str
    capability: tuple[int, int] | None  # CUDA only
    sm_count: int  # CUDA only; 0 on a CPU
    total_memory: int  # bytes: the GPU's (ZeroGPU: the whole card), or the host's on a CPU
    cuda: str | None  # the CUDA version torch was built with
    hub_online: bool
    zerogpu: ZeroGPUCard | None = None
    size: Size | None = None  # ZeroGPU's task size, once chosen (aot/zerogpu.py)

    @property
    def arch(self) -> str:
        """What a compiled program is tied to: `sm_120`, or the CPU's machine and vector ISA."""
        if self.capability is not None:
            return "sm_%d%d" % self.capability
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        return f"cpu-{platform.machine()}-{pick_vec_isa()}"

    @property
    def memory(self) -> int:
        """Bytes a task may use: on ZeroGPU the chosen size's share of the card, else the whole device."""
        return self.zerogpu.memory_for(self.size) if self.zerogpu else self.total_memory

    @property
    def label(self) -> str:
        """For people (the status panel): never read back by a decision."""
        if self.device != "cuda":
            return self.device
        text = f"cuda: {self.name}, {self.arch}"
        if self.zerogpu and self.size:
            text += f", ZeroGPU {self.size.value} ({self.memory / 2**30:.0f} GiB)"
        return text

    def with_size(self, size: Size | None) -> Hardware:
        return dataclasses.replace(self, size=size)

    def as_dict(self) -> dict:
        return {"device": self.device, "name": self.name, "arch": self.arch if self.device == "cuda" else self.device,
                "sm_count": self.sm_count, "memory_gib": round(self.memory / 2**30, 1), "cuda": self.cuda,
                "zerogpu_card": self.zerogpu.model if self.zerogpu else None,
                "zerogpu_size": self.size.value if self.size else None, "hub_online": self.hub_online}


def hub_online(env=None) -> bool:
    env = os.environ if env is None else env
    return env.get("HF_HUB_OFFLINE", "").strip().lower() not in ("1", "true", "yes", "on")


def zerogpu_card() -> ZeroGPUCard | None:
    """ZeroGPU's card, as spaces picked it from the driver's model name; None outside ZeroGPU."""
    import spaces

    if not spaces.config.Config.zero_gpu:
        return None
    from spaces.zero.config import get_config

    return ZeroGPUCard.from_spaces(get_config())


def detect(env=None) -> Hardware:
    online, card = hub_online(env), zerogpu_card()
    if card is not None:
        return Hardware("cuda", card.model, card.capability, card.sm_count, card.memory, torch.version.cuda, online,
                        card)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return Hardware("cuda", props.name, (props.major, props.minor), props.multi_processor_count,
                        props.total_memory, torch.version.cuda, online)
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 0
    return Hardware("cpu", platform.processor() or platform.machine(), None, 0, pages, torch.version.cuda, online)

