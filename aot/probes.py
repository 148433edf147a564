"""Each hardware guess, tried once on the device that will run it: the fp8 GEMM at each scale granularity, and each
attention backend, timed at the model's attention shape and compared with SDPA.

On ZeroGPU the main process has no GPU, so `optimization.py` runs `run_probes` in a short `@spaces.GPU` task, on
the card itself, before it quantizes; elsewhere it runs in-process. Arguments and results are plain values: they
cross between processes there. aot/decisions.py turns the results into decisions.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from aot.decisions import SDPA

GEMM_SHAPE = (64, 128, 64)  # M, K, N: multiples of 16, as cuBLAS' fp8 GEMM requires
TIMED_CALLS = 10


@dataclass(frozen=True)
class Probe:
    ok: bool
    error: str = ""  # why it failed: the exception's type and first line
    ms: float = 0.0  # median time of one call (attention)
    error_vs_sdpa: float = 0.0  # relative L2 distance from SDPA's output (attention)


@dataclass(frozen=True)
class AttentionShape:
    """One attention call of the model at its largest preset: (batch, tokens, heads, head dim)."""

    tokens: int
    heads: int
    head_dim: int

    @classmethod
    def of(cls, transformer: torch.nn.Module, tokens: int) -> AttentionShape:
        config = transformer.config
        heads = config.get("num_attention_heads") or config.get("n_heads") or 1
        head_dim = config.get("attention_head_dim") or (config.get("dim") or heads) // heads
        return cls(tokens, int(heads), int(head_dim))


def _failure(err: BaseException) -> Probe:
    return Probe(False, f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}")


def probe_fp8(granularity: str, device: str) -> Probe:
    """One fp8 GEMM as torchao's fp8 layers run it (`torch._scaled_mm`, bf16 out), with per-row or per-tensor
    scales, checked against the same product in float32."""
    m, k, n = GEMM_SHAPE
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        a = torch.randn(m, k, generator=gen).to(device)
        w = torch.randn(n, k, generator=gen).to(device)
        if granularity == "row":
            scale_a = a.abs().amax(dim=1, keepdim=True).float() / 448
            scale_b = w.abs().amax(dim=1, keepdim=True).float().t() / 448
        else:
            scale_a, scale_b = a.abs().amax().float() / 448, w.abs().amax().float() / 448
        a8 = (a / scale_a).to(torch.float8_e4m3fn)
        w8 = (w / scale_b.reshape(-1, 1) if granularity == "row" else w / scale_b).to(torch.float8_e4m3fn)
        out = torch._scaled_mm(a8, w8.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16)
        ref = (a8.float() * scale_a) @ (w8.float() * scale_b.reshape(-1, 1) if granularity == "row"
                                        else w8.float() * scale_b).t()
        err = float((out.float() - ref).norm() / ref.norm())
        if not err < 1e-2:
            return Probe(False, f"wrong result: relative error {err:.1e} against the same product in float32")
        return Probe(True)
    except Exception as err:  # noqa: BLE001 - any failure means "this granularity does not run here"
        return _failure(err)


def _attention(backend: str):
    from diffusers.models import attention_dispatch

    name = attention_dispatch.AttentionBackendName("native" if backend == SDPA else backend)
    if backend != SDPA:  # a hub kernel is fetched as diffusers' set_attention_backend would
        attention_dispatch._maybe_download_kernel_for_backend(name)
    return lambda q, k, v: attention_dispatch.dispatch_attention_fn(q, k, v, backend=name)


def _median_ms(fn, device: str) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(TIMED_CALLS):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def probe_attention(backends: tuple[str, ...], shape: AttentionShape, device: str) -> dict[str, Probe]:
    """Each backend (SDPA among them) timed at `shape` in bf16, and its output's distance from SDPA's."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    dtype = torch.bfloat16
    q, k, v = (torch.randn(1, shape.tokens, shape.heads, shape.head_dim, generator=gen).to(device, dtype)
               for _ in range(3))
    reference = _attention(SDPA)(q, k, v).float()
    results = {}
    for backend in backends:
        try:
            attend = _attention(backend)
            out = attend(q, k, v).float()
            if not torch.isfinite(out).all():
                raise RuntimeError("non-finite output")
            err = float((out - reference).norm() / reference.norm())
            results[backend] = Probe(True, ms=round(_median_ms(lambda: attend(q, k, v), device), 4),
                                     error_vs_sdpa=err)
        except Exception as err:  # noqa: BLE001 - a missing kernel, an unsupported shape: "does not run here"
            results[backend] = _failure(err)
    return results


def run_probes(fp8: tuple[str, ...], attention: tuple[str, ...], shape: AttentionShape | None) -> dict:
    """Everything to probe, on this process's device: {"device": name, "fp8": {granularity: Probe},
    "attention": {backend: Probe}}."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {"device": torch.cuda.get_device_name() if device == "cuda" else device,
            "fp8": {g: probe_fp8(g, device) for g in fp8},
            "attention": probe_attention(attention, shape, device) if attention else {}}
