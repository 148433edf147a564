"""Hardware decisions: pure functions of (request, hardware) that return a `Decision`, unit-tested on CPU.

What this hardware cannot run (fp8 before Ada, FlashAttention-3 off Hopper, AoT by default on a CPU) is an
expected choice, shown as a note; what it could run but this start cannot (the hub offline) is a fallback."""
from __future__ import annotations

from aot.report import Decision

FP8_MIN_CAPABILITY = (8, 9)  # Ada and newer have fp8 tensor cores
FA3_CAPABILITY = (9, 0)  # FlashAttention-3 is Hopper-only: not Ampere, Ada or Blackwell (sm_100/sm_120)


def fp8_runs(device: str, capability: tuple[int, int] | None) -> bool:
    return device == "cuda" and capability is not None and capability >= FP8_MIN_CAPABILITY


def choose_quantization(requested: str, device: str, capability: tuple[int, int] | None) -> Decision:
    """An explicit request the hardware cannot honour is a startup error."""
    if requested == "fp8" and not fp8_runs(device, capability):
        raise ValueError(f"QUANTIZATION=fp8 needs a CUDA GPU with compute capability >= 8.9; this is "
                         f"{device} {capability or ''}. Use QUANTIZATION=auto, int8 or none.")
    if requested != "auto":
        return Decision(requested, "requested")
    if fp8_runs(device, capability):
        return Decision("fp8", f"auto: compute capability {capability} >= 8.9")
    return Decision("none", f"fp8 needs CUDA with compute capability >= 8.9, this is {device} {capability or ''}".strip(),
                    expected=True)


def choose_attention(requested: str, device: str, capability: tuple[int, int] | None, hub_online: bool) -> Decision:
    """"sdpa" is torch's scaled_dot_product_attention, which picks its own flash / cuDNN / memory-efficient
    kernel per call and runs everywhere; the other values are diffusers attention backends."""
    if requested != "auto":
        return Decision(requested, "requested")
    if device != "cuda":
        return Decision("sdpa", f"FlashAttention-3 needs a Hopper GPU, this is {device}", expected=True)
    if capability != FA3_CAPABILITY:
        return Decision("sdpa", f"FlashAttention-3 needs compute capability (9, 0) (Hopper), this is {capability}",
                        expected=True)
    if not hub_online:
        return Decision("sdpa", "FlashAttention-3 comes from the hub through `kernels`, and the hub is offline",
                        fell_back=True)
    return Decision("_flash_3_hub", "auto: Hopper GPU with hub access")


def choose_compile(requested: str, device: str) -> Decision:
    if requested != "auto":
        return Decision(requested, "requested")
    if device == "cuda":
        return Decision("aoti", "auto: CUDA GPU")
    return Decision("none", "off on CPU by default (COMPILE=aoti compiles the tiny model too, ~20 s per program)",
                    expected=True)
