"""What every benchmark here shares: one timer, one error measure, one peak-memory reader, the hardware ceilings a
figure is printed beside, real-size models built from the families' `RealSize`, and JSON-last output.

Import it before torch (`import lib  # first`): it corrects CXX, which Inductor reads when it is imported, and puts
the project on sys.path.

- `median_ms(fn, device)`: CUDA events after warm-up, each call timed alone, the median; the host clock on a CPU.
- `rel_err(out, ref)`: relative L2 against a reference.
- `peak_gib()`: the most GPU memory allocated since the last reading; `allocated_gib()`: allocated now.
- `count_flops(module, args, kwargs)`: one call's FLOPs as torch counts them while it runs (GEMMs and attention
  apart), and `against_ceiling(flops, ms, quantization)`: achieved TFLOP/s and the share of the ceilings reached.
- `real_pipeline(family, device)`: the family's tiny pipeline with its models at their released sizes;
  `real_upsampler(family, pipe, device)`: its distilled recipe's latent upsampler at its released size.
  `python benchmarks/lib.py` builds each on the meta device and checks its parameters against the released sizes
  (on a CPU, in a minute), with one step's FLOPs and the time they need at the ceilings.
- `emit(kind, ...)`: one RESULT line per figure, so a run cut short keeps its numbers; `finish(document)`: the
  environment added, --out written, and one JSON document printed as the last line.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROCESS_START = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The GPU image's /opt/gcc/bin/g++ links libstdc++ statically into AOTI wrappers, which then segfault when loaded.
CXX_FIX = None
if os.environ.get("CXX") == "/opt/gcc/bin/g++" and os.path.exists("/usr/bin/g++"):
    os.environ["CXX"] = "/usr/bin/g++"
    CXX_FIX = "CXX was /opt/gcc/bin/g++ (AOTI packages built with it segfault on load); set CXX=/usr/bin/g++"
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the GPU machine has no hub: nothing may wait for it

import torch  # noqa: E402
from torch.utils._pytree import tree_map  # noqa: E402

GiB = 2**30
# Measured on the H100 (shared/GPU.md): an 8192^3 bf16 matmul, the same in fp8 through `torch._scaled_mm`, and
# cuDNN's attention kernel through SDPA at FLUX's shapes, the fastest attention measured (RESULTS.md run 9). The H200
# is the same chip. No ceiling is printed on other devices.
CEILING_TFLOPS = {"bf16": 792.0, "fp8": 1452.0, "attention": 611.0}
# Pinned host-to-GPU copies: PCIe 5.0 x16's 64 GB/s, from the specification (54-55 GB/s measured, RESULTS.md run 17)
COPY_CEILING_GB_S = 64.0
PROMPT = "a watercolor fox in a snowy birch forest"


# ---------------------------------------------------------------------------------------------------
# Measuring.
# ---------------------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Span:
    """Milliseconds between `start()` and `stop()`: CUDA events on a GPU (the GPU's own timeline), else the host
    clock. Read `ms()` after synchronizing."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        if self.cuda:
            self.a, self.b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def start(self) -> Span:
        self.a.record() if self.cuda else setattr(self, "t0", time.perf_counter())
        return self

    def stop(self) -> Span:
        self.b.record() if self.cuda else setattr(self, "t1", time.perf_counter())
        return self

    def ms(self) -> float:
        return self.a.elapsed_time(self.b) if self.cuda else (self.t1 - self.t0) * 1000


def seconds(fn, device: str) -> float:
    """Wall seconds of one call of `fn`, the device's queued work included."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median_ms(fn, device: str, warmup: int = 3, iters: int = 10):
    """Median milliseconds of `fn()` after `warmup` calls (compile time and first-call costs excluded), each call
    timed alone and synchronized; and the last call's output."""
    with torch.inference_mode():
        for _ in range(warmup):
            out = fn()
        sync(device)
        spans = []
        for _ in range(iters):
            span = Span(device).start()
            out = fn()
            spans.append(span.stop())
            sync(device)
    return statistics.median(span.ms() for span in spans), out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error of `out` against the reference `ref`."""
    out, ref = out.float().to(ref.device), ref.float()
    return float((out - ref).norm() / ref.norm())


def peak_gib() -> float | None:
    """The most GPU memory allocated since the last reading (or reset), GiB; None without a GPU. Starts the next
    reading."""
    if not torch.cuda.is_available():
        return None
    peak = torch.cuda.max_memory_allocated() / GiB
    torch.cuda.reset_peak_memory_stats()
    return round(peak, 2)


def allocated_gib() -> float | None:
    """GPU memory allocated now, GiB; None without a GPU."""
    return round(torch.cuda.memory_allocated() / GiB, 2) if torch.cuda.is_available() else None


def count_flops(module, args: tuple, kwargs: dict) -> dict:
    """FLOPs of one call of `module`, counted by torch as it runs (`FlopCounterMode`): GEMMs (mm, addmm, fp8
    `_scaled_mm`) and attention (the SDPA kernels; bmm where attention runs as plain math: on a CPU, made so here,
    whose SDPA kernel torch does not count)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    on_cpu = next(module.parameters()).device.type == "cpu"
    with torch.inference_mode(), counter, sdpa_kernel(SDPBackend.MATH) if on_cpu else contextlib.nullcontext():
        module(*args, **kwargs)
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    attention = sum(n for op, n in counts.items() if "attention" in op or op == "aten.bmm")
    return {"gemm": sum(counts.values()) - attention, "attention": attention}


def on_hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def against_ceiling(flops: dict, ms: float, quantization: str = "none") -> dict:
    """A step of `flops` measured at `ms`: achieved TFLOP/s, and (on Hopper) `ceiling_ms`, the time its GEMMs (at
    the fp8 matmul ceiling when the weights are fp8, else bf16's) and its attention would take at the ceilings,
    and `of_ceiling`, that time over the measured one."""
    result = {"tflops": float(f"{(flops['gemm'] + flops['attention']) / ms / 1e9:.4g}")}
    if on_hopper():
        gemm = CEILING_TFLOPS["fp8" if quantization == "fp8" else "bf16"]
        floor = flops["gemm"] / gemm / 1e9 + flops["attention"] / CEILING_TFLOPS["attention"] / 1e9
        result.update(ceiling_ms=round(floor, 1), of_ceiling=round(floor / ms, 3))
    return result


def copy_rate_gb_s(device: str) -> dict | None:
    """Pinned host-to-GPU copies of 1 GiB, median of 5, GB/s, beside the link's ceiling: what streamed weights
    (low-VRAM mode) are copied at."""
    if device != "cuda":
        return None
    host = torch.empty(GiB, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(GiB, dtype=torch.uint8, device="cuda")
    ms, _ = median_ms(lambda: target.copy_(host, non_blocking=True), device, warmup=1, iters=5)
    return {"gb_s": round(GiB / 1e6 / ms, 1), "ceiling_gb_s": COPY_CEILING_GB_S}


# ---------------------------------------------------------------------------------------------------
# Real-size models, from the families' `RealSize` (aot/families/), random weights made where they run.
# ---------------------------------------------------------------------------------------------------
def on_device(device: str, dtype: torch.dtype, make):
    """Builds a module directly on `device` in `dtype`: 32B parameters never exist in fp32 or on the host."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            module = make()
    finally:
        torch.set_default_dtype(previous)
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


def shrink_linears_(module: torch.nn.Module, factor: float = 0.5) -> None:
    """Random weights make activations grow block after block; a smaller scale keeps them finite."""
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, torch.nn.Linear):
                sub.weight.mul_(factor)


WIDTHS = ("hidden_size", "intermediate_size", "vocab_size", "out_hidden_size", "d_model", "d_ff")


def real_text_encoder(tiny, sizes: dict, device: str, shrink: int = 1, dtype: torch.dtype = torch.bfloat16):
    """The tiny encoder's class with the real `sizes` ({config section (None: the top level): sizes}; widths divided
    by `shrink`, a smoke test), random weights made on `device`."""
    config = tiny.config.to_dict()
    for part, values in sizes.items():
        section = config if part is None else config[part]
        section.pop("layer_types", None)  # one entry per tiny layer: rebuilt from the layer count
        for key, value in values.items():
            section[key] = value // shrink if key in WIDTHS and shrink > 1 else value
    text = config.get("text_config", config)
    for key in ("rope_scaling", "rope_parameters"):  # Qwen2.5-VL's multimodal rope splits half the head dim 16/24/24
        if isinstance(text.get(key), dict) and "mrope_section" in text[key]:
            head = text["hidden_size"] // text["num_attention_heads"]
            text[key]["mrope_section"] = [head // 8, 3 * head // 16, 3 * head // 16]
    config = type(tiny.config).from_dict(config)
    with torch.device(device):
        encoder = type(tiny)._from_config(config, dtype=dtype)
    return encoder.eval().requires_grad_(False)


def _text_widths(config) -> tuple[int, int | None]:
    """(text embedding width, pooled embedding width) that a transformer of this config reads."""
    return (config.get("joint_attention_dim") or config.get("cap_feat_dim") or config.get("text_dim")
            or config.get("caption_channels"), config.get("pooled_projection_dim"))


def _widen_text_(pipe, tiny_config, real_config, device: str, dtype: torch.dtype) -> None:
    """The tiny text encoders' embeddings widened to the real transformer's text width by a fixed random projection,
    their lengths and masks kept: the transformer sees the real shapes, a prompt always the same embeddings, and
    encoding costs nothing."""
    tiny_width, tiny_pooled = _text_widths(tiny_config)
    width, pooled = _text_widths(real_config)
    encode, generator = pipe.encode_prompt, torch.Generator(device=device).manual_seed(0)
    projections = {real: torch.randn(tiny, real, generator=generator, device=device, dtype=dtype) / tiny**0.5
                   for tiny, real in ((tiny_width, width), (tiny_pooled, pooled)) if real}

    def widen(value):
        if isinstance(value, (list, tuple)):
            return type(value)(widen(v) for v in value)
        if torch.is_tensor(value) and value.is_floating_point() and value.shape[-1] in (tiny_width, tiny_pooled):
            projection = projections[pooled if value.ndim == 2 and pooled else width]
            return value.to(projection.device, projection.dtype) @ projection
        return value

    pipe.encode_prompt = lambda *args, **kwargs: widen(encode(*args, **kwargs))
    # LTX-2's transformer reads its text through connectors, which read every hidden state of the text encoder: the
    # tiny connectors stay, and their video and audio embeddings are widened
    connectors = getattr(pipe, "connectors", None)
    if connectors is not None:
        connect = connectors.forward
        connectors.forward = lambda *args, **kwargs: widen(connect(*args, **kwargs))


# Components that read the text encoders' output (LTX-2's connectors): real-size with the real encoders only, since
# the tiny encoders' embeddings are widened past them (`_widen_text_`)
TEXT_SIDE = ("connectors",)


def real_pipeline(family, device: str, text: str = "tiny", config: dict | None = None, tiny: bool = False,
                  dtype: torch.dtype = torch.bfloat16):
    """The family's tiny pipeline (its tokenizers and its way of calling the transformer) with the transformer, VAE
    and scheduler of `family.real_size` and its other `components`, random weights made on `device`, seeded: every
    build has the same weights.

    `text`: "tiny" keeps the tiny text encoders, their embeddings widened to the real text width (the transformer
    sees real shapes, encoding costs nothing); "real" builds them at their real sizes too. `config`: transformer
    config entries over the real ones (fewer blocks, ...). `tiny`: the tiny pipeline as the app builds it (a smoke
    test). Returns the pipeline and its models' parameters, billions."""
    from aot.model import build_tiny

    pipe, real = build_tiny(family), family.real_size
    if not tiny:
        tiny_config = pipe.transformer.config
        torch.manual_seed(0)
        models = {"transformer": real_transformer(family, type(pipe.transformer), device, config, dtype)}
        if getattr(pipe, "transformer_2", None) is not None:  # Wan 2.2 A14B's low-noise expert: the same config,
            torch.manual_seed(3)  # its own weights
            models["transformer_2"] = real_transformer(family, type(pipe.transformer_2), device, config, dtype)
        if text == "real":
            torch.manual_seed(1)
            models.update({name: real_text_encoder(getattr(pipe, name), sizes, device, dtype=dtype)
                           for name, sizes in real.text_encoders.items()})
            for name in real.text_encoders:
                shrink_linears_(models[name])
        else:
            _widen_text_(pipe, tiny_config, models["transformer"].config, device, dtype)
        torch.manual_seed(2)
        models["vae"] = on_device(device, dtype, lambda: type(pipe.vae)(**(real.vae or {})))
        models.update(real_components(pipe, real, device, dtype, text))
        pipe.register_modules(**models)
        as_released_(pipe, real)
    modules = {name: m for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    for module in modules.values():
        module.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe, {name: sum(p.numel() for p in m.parameters()) / 1e9 for name, m in modules.items()}


def real_components(pipe, real, device: str, dtype: torch.dtype, text: str = "tiny") -> dict:
    """`real.components` by name, each the tiny one's class at its released sizes, random weights made on `device`;
    those that read the text encoders' output (TEXT_SIDE) only with `text` "real"."""
    return {name: on_device(device, dtype, lambda name=name, sizes=sizes: type(getattr(pipe, name))(**sizes))
            for name, sizes in real.components.items() if text == "real" or name not in TEXT_SIDE}


def real_upsampler(family, pipe, device: str):
    """The family's two-stage recipe's latent upsampler (`Family.distilled`) at `real_size.upsampler`, random weights
    made on `device` in the VAE's dtype, in the tiny one's upsampling pipeline over `pipe`'s (real-size) VAE: what
    `load_model` takes for a real-size pipeline under RECIPE=distilled."""
    tiny = family.distilled.build_tiny_upsampler(pipe)
    torch.manual_seed(4)
    upsampler = on_device(device, pipe.vae.dtype,
                          lambda: type(tiny.latent_upsampler)(**family.real_size.upsampler))
    return type(tiny)(vae=pipe.vae, latent_upsampler=upsampler)


def real_transformer(family, cls, device: str, config: dict | None = None, dtype: torch.dtype = torch.bfloat16):
    transformer = on_device(device, dtype, lambda: cls(**{**family.real_size.transformer, **(config or {})}))
    for name, param in transformer.named_parameters():
        if name.endswith("pad_token"):  # zeros from a config, learned in the real model: an all-zero row has no
            torch.nn.init.normal_(param)  # fp8 per-row scale (0/0), which turns the output to NaN (run 12)
    shrink_linears_(transformer)
    return transformer


def as_released_(pipe, real) -> None:
    """The scheduler, the pipeline's config and the tokenizer's length as released, where the tiny ones differ."""
    if real.scheduler:
        pipe.register_modules(scheduler=type(pipe.scheduler)(**real.scheduler))
    if real.pipeline:
        pipe.register_to_config(**real.pipeline)
    tokenizer = getattr(pipe, "tokenizer", None)
    for tok in (tokenizer, getattr(tokenizer, "tokenizer", None)) if real.text_tokens else ():
        if hasattr(tok, "model_max_length"):
            tok.model_max_length = max(tok.model_max_length, real.text_tokens)


def meta_step_flops(family, preset: str) -> dict:
    """One step's FLOPs at `preset` of the real-size transformer, counted on the meta device (no memory, no time): the
    tiny pipeline, widened to the real text width, runs on the host up to the transformer's call."""
    from aot.model import build_tiny, load_model
    from aot.programs import capture_inputs
    from settings import Settings

    pipe = build_tiny(family).to(torch.bfloat16)
    transformer = real_transformer(family, type(pipe.transformer), "meta")
    _widen_text_(pipe, pipe.transformer.config, transformer.config, "cpu", torch.bfloat16)
    # on the host, as the pipeline up to the call: they shape its inputs (LTX-2's audio VAE: the audio channels, length)
    pipe.register_modules(transformer=transformer, **real_components(pipe, family.real_size, "cpu", torch.bfloat16))
    as_released_(pipe, family.real_size)
    pipe.set_progress_bar_config(disable=True)
    model = load_model(Settings.from_env({"MODEL_ID": f"tiny-{family.name}", "PRESETS": preset}, has_cuda=False), pipe)
    call = capture_inputs(model, transformer, model.presets[0])
    return count_flops(transformer, *tree_map(lambda v: v.to("meta") if isinstance(v, torch.Tensor) else v, call))


def sample(output) -> torch.Tensor:
    """The sample of a transformer call's output: a tensor, or Z-Image's list of per-image tensors."""
    first = output[0]
    return first[0] if isinstance(first, list) else first


def fingerprint(module: torch.nn.Module) -> float:
    """A sum over the first weights: two builds with equal fingerprints made the same weights."""
    return float(sum(p.detach().float().sum() for p in list(module.parameters())[:8]))


# ---------------------------------------------------------------------------------------------------
# Output.
# ---------------------------------------------------------------------------------------------------
def emit(kind: str, **fields) -> None:
    """One machine-readable line per figure, so a run cut short still leaves its numbers."""
    print(f"RESULT {json.dumps({'kind': kind, **fields}, default=str)}", flush=True)


def environment(device: str) -> dict:
    """What a figure was measured with: date, commit, card, versions."""
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except OSError:
        commit = None
    env = dict(date=time.strftime("%Y-%m-%d"), commit=commit, torch=torch.__version__, cxx=os.environ.get("CXX"),
               cxx_fix=CXX_FIX, device=torch.cuda.get_device_name() if device == "cuda" else device)
    for name in ("diffusers", "transformers", "torchao", "triton", "spaces"):
        try:
            env[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            env[name] = None
    return env


def write(document: dict, out: str) -> None:
    if out:
        Path(out).write_text(json.dumps(document, indent=1, default=str))


def finish(document: dict, device: str, out: str = "") -> int:
    """Adds the environment, writes --out, prints the document as the last line. 1 if it holds an error."""
    document["env"] = environment(device)
    write(document, out)
    print(json.dumps(document, default=str), flush=True)
    return 1 if document.get("error") else 0


def main() -> int:
    """Every family's real-size models built on the meta device from its `RealSize`, their parameters against the
    released sizes, and one step's FLOPs at its first native preset with the time they need at the ceilings."""
    import argparse

    from aot.families import FAMILIES

    argparse.ArgumentParser(description=main.__doc__).parse_args()

    print(f"{'family':<12} {'transformer B':>13} {'released':>8} {'text enc B':>10} {'vae B':>6} {'preset':>10} "
          f"{'GEMM TFLOP':>10} {'attn TFLOP':>10} {'ceiling ms bf16':>15} {'fp8':>6}")
    rows, failed = [], []
    for family in FAMILIES:
        _, params = real_pipeline(family, "meta", text="real")
        real, preset = family.real_size, family.presets.split(",")[0]
        flops = meta_step_flops(family, preset)
        attention = flops["attention"] / CEILING_TFLOPS["attention"] / 1e9
        ceiling = {mode: flops["gemm"] / CEILING_TFLOPS[mode] / 1e9 + attention for mode in ("bf16", "fp8")}
        text = sum(v for k, v in params.items() if k.startswith("text_encoder"))
        rows.append(dict(family=family.name, params_b=params, released_b=real.params_b, preset=preset, flops=flops,
                         ceiling_ms=ceiling))
        if abs(params["transformer"] - real.params_b) > 0.05:
            failed.append(family.name)
        print(f"{family.name:<12} {params['transformer']:>13.2f} {real.params_b:>8} {text:>10.2f} "
              f"{params['vae']:>6.3f} {preset.split('=')[1]:>10} {flops['gemm'] / 1e12:>10.2f} "
              f"{flops['attention'] / 1e12:>10.2f} {ceiling['bf16']:>15.1f} {ceiling['fp8']:>6.1f}")
    print(f"(ceilings: {CEILING_TFLOPS} TFLOP/s, shared/GPU.md; released: the published transformer sizes)")
    return finish(dict(check="real sizes", families=rows, mismatched=failed, error=", ".join(failed) or None), "cpu")


if __name__ == "__main__":
    raise SystemExit(main())
