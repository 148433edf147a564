"""GPU benchmark of the template's AoT path on a FLUX.1-dev-sized pipeline with random weights.

It drives the product: `settings.Settings`, `aot.model.load_model` and `optimization.optimize_pipeline_`, so
what it measures is what the Space serves. The pipeline is FLUX's own tiny one (`aot.model.build_tiny`) with
FLUX.1-dev-sized models built from configs in place of its tiny ones (transformer, CLIP-L, T5-XXL encoder,
FLUX's VAE), random bf16 weights straight on the GPU; no hub, no download. The speed of a step does not
depend on the weight values.

Every run first measures the eager bf16 reference in the same process, then each variant side by side:
median ms/step (CUDA events, after warm-up), setup and compile seconds, peak GPU memory, and the relative L2
error of one step against eager on the very same inputs. "compile s" is the product's
`report.compile_seconds`: capture, export, compile (or cache load), install and warm-up of all programs,
with no split between export and compile (optimization.py logs that split per program, at INFO).
It prints one RESULT line per measurement, a table, and ends with one JSON document on the last line.

Examples (run by hand on a GPU machine, never by pytest):
  python benchmarks/flux_bench.py --mode eager
  python benchmarks/flux_bench.py --variants aoti:none:model:p1 --presets square=1024x1024
  python benchmarks/flux_bench.py --variants aoti:none,aoti:fp8,aoti:fp8:p1 --full-pipeline
  python benchmarks/flux_bench.py --blocks 1,2 --t5-layers 2 --variants aoti:fp8 --fp8-granularity tensor \
      --inductor coordinate_descent_tuning=false --stack-dump 30
  python benchmarks/flux_bench.py --presets square=1024x1024 --full-pipeline --latent-error \
      --variants aoti:blocks,aoti:fbc,aoti:fbc=0.12,aoti:taylorseer,eager:fbc   # step caching, whole images
  CUDA_VISIBLE_DEVICES= python benchmarks/flux_bench.py --tiny --device cpu --variants eager:int8   # smoke test

A variant is MODE[:QUANT][:ATTENTION][:SCOPE][:pN], fields in any order: MODE eager|aoti, QUANT
none|fp8|int8|int4, SCOPE blocks|model (AOT_SCOPE), pN = compile only the first N presets,
"pertensor" = fp8 scales per tensor, "autotune" = Inductor's max_autotune_gemm, "epilogue" = Inductor's
epilogue_fusion on (the recipe has it off), "shared" = regional programs
with one instance per block list (as spaces installs them; aot.programs gives each block its own), "graphs" =
also time one step captured in a CUDA graph, fbc[=THRESHOLD] or
taylorseer[=INTERVAL] = STEP_CACHE=fbc[:THRESHOLD] or taylorseer[:INTERVAL] (aot/step_cache.py), and any other
word is the attention backend (sdpa or a diffusers backend name). Low-VRAM layouts: benchmarks/lowvram_bench.py.
A step cache acts across the steps of an image, so its variants skip the one-step timing: measure them with
--full-pipeline (s/image, and "full": the transformer calls that ran every block) and --latent-error (the final
latents' drift from eager without a cache; with random weights only a proxy for quality, and FBC's skips depend
on the weights too; the uncached aoti row shows what compiling alone drifts).
"""
from __future__ import annotations

import os
import sys

# Inductor reads CXX when it is imported, so this comes before `import torch`. The GPU image's
# /opt/gcc/bin/g++ links libstdc++ statically into AOTI wrappers, which then segfault when loaded.
import time

PROCESS_START = time.perf_counter()
CXX_FIX = None
if os.environ.get("CXX") == "/opt/gcc/bin/g++" and os.path.exists("/usr/bin/g++"):
    os.environ["CXX"] = "/usr/bin/g++"
    CXX_FIX = "CXX was /opt/gcc/bin/g++ (AOTI packages built with it segfault on load); set CXX=/usr/bin/g++"
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # "auto" attention must not wait for a hub it cannot reach

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import faulthandler  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import optimization  # noqa: E402
from aot import quantize, step_cache  # noqa: E402
from aot.memory import text_encoders  # noqa: E402
from aot.families import family_named  # noqa: E402
from aot.model import build_tiny, load_model  # noqa: E402
from aot.programs import capture_inputs, release_export_memory  # noqa: E402
from settings import AOT_SCOPE_CHOICES, Settings  # noqa: E402

log = logging.getLogger("flux-bench")
GiB = 2**30
FLUX = family_named("flux")
MODEL_ID = "bench/flux-dev-random"  # a real-model id for Settings: the pipeline is passed in, never loaded
PROMPT = "a watercolor fox in a snowy birch forest"

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
              relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0)
FLUX_VAE = dict(latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                sample_size=1024, shift_factor=0.1159, scaling_factor=0.3611)
FLUX_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                      max_image_seq_len=4096)


# ---------------------------------------------------------------------------------------------------
# The pipeline, from configs, random weights, built where it runs.
# ---------------------------------------------------------------------------------------------------
def shrink_linears_(module: torch.nn.Module, factor: float = 0.5) -> None:
    """Random weights make activations grow block after block; a smaller scale keeps them finite."""
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, torch.nn.Linear):
                sub.weight.mul_(factor)


def on_device(device: str, dtype: torch.dtype, make):
    """Builds a module directly on `device` in `dtype`: 12B parameters never exist in fp32 or on the CPU."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            module = make()
    finally:
        torch.set_default_dtype(previous)
    return module.to(device=device, dtype=dtype).eval()  # eval: dropout off


def build_transformer(config: dict, device: str, dtype: torch.dtype):
    """FLUX's transformer from `config`, seeded: every rebuild has the same weights, so every variant computes
    the same function."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = on_device(device, dtype, lambda: FluxTransformer2DModel.from_config(config))
    shrink_linears_(transformer)
    return transformer


def weights_fingerprint(module: torch.nn.Module) -> float:
    return float(sum(p.detach().float().sum() for p in list(module.parameters())[:8]))


def build_pipeline(device: str, dtype: torch.dtype, tiny: bool = False, blocks: tuple[int, int] | tuple = (),
                   clip_layers: int = 0, t5_layers: int = 0):
    """FLUX's tiny pipeline with FLUX.1-dev-sized CLIP-L, T5-XXL, VAE and transformer in place of its models
    (`tiny`: its own models, except the transformer, rebuilt by `build_transformer` like every variant's).
    Its byte-level tokenizers give ids far below the real embedding tables (49408 and 32128 rows), so any
    prompt is valid for the real-size encoders too. Returns the pipeline and its parameters (B) by model."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    t0 = time.perf_counter()
    pipe = build_tiny(FLUX)
    config = dict(pipe.transformer.config) if tiny else dict(FLUX_DEV)
    if blocks:
        config["num_layers"], config["num_single_layers"] = blocks
    if not tiny:
        clip = {**CLIP_L, **({"num_hidden_layers": clip_layers} if clip_layers else {})}
        t5 = {**T5_XXL, **({"num_layers": t5_layers} if t5_layers else {})}
        torch.manual_seed(1)
        pipe.register_modules(
            text_encoder=on_device(device, dtype, lambda: CLIPTextModel(CLIPTextConfig(
                vocab_size=49408, bos_token_id=0, eos_token_id=1, pad_token_id=1, **clip))),
            text_encoder_2=on_device(device, dtype, lambda: T5EncoderModel(T5Config(
                vocab_size=32128, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **t5))),
            vae=on_device(device, dtype, lambda: AutoencoderKL(
                in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False, use_post_quant_conv=False,
                **FLUX_VAE)))
        for module in (pipe.text_encoder, pipe.text_encoder_2):
            shrink_linears_(module)
    pipe.register_modules(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
                          transformer=build_transformer(config, device, dtype))
    pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    sync(device)
    params = {name: sum(p.numel() for p in m.parameters()) / 1e9 for name, m in (
        ("transformer", pipe.transformer), ("clip", pipe.text_encoder), ("t5", pipe.text_encoder_2), ("vae", pipe.vae))}
    log.info("built pipeline in %.1f s, parameters (B): %s", time.perf_counter() - t0,
             {k: round(v, 3) for k, v in params.items()})
    return pipe, params


# ---------------------------------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Span:
    """Elapsed milliseconds between two points: CUDA events on a GPU (the GPU's own timeline), else wall."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        if self.cuda:
            self.a, self.b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def start(self):
        self.a.record() if self.cuda else setattr(self, "t0", time.perf_counter())
        return self

    def stop(self):
        self.b.record() if self.cuda else setattr(self, "t1", time.perf_counter())
        return self

    def ms(self) -> float:  # call after synchronizing
        return self.a.elapsed_time(self.b) if self.cuda else (self.t1 - self.t0) * 1000


def time_step(transformer, args, kwargs, device: str, warmup: int, iters: int):
    """Median ms of one transformer call (one denoising step) and its output."""
    with torch.inference_mode():
        for _ in range(warmup):
            out = transformer(*args, **kwargs)[0]
        sync(device)
        spans = []
        for _ in range(iters):
            span = Span(device).start()
            out = transformer(*args, **kwargs)[0]
            spans.append(span.stop())
            sync(device)
    return statistics.median(s.ms() for s in spans), out.clone()


def time_graphed_step(transformer, args, kwargs, expected, warmup: int, iters: int) -> dict:
    """One step captured in a CUDA graph (static inputs), then replayed: does the compiled program capture, how
    fast is a replay, and does it match the uncaptured step. Runs 3-4 saw capture fail."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode(), torch.cuda.stream(stream):
            for _ in range(warmup):
                transformer(*args, **kwargs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # relaxed: the runner's own event queries do not invalidate the capture (global mode failed, run 16)
        with torch.inference_mode(), torch.cuda.graph(graph, capture_error_mode="relaxed"):
            out = transformer(*args, **kwargs)[0]
        spans = []
        for _ in range(iters):
            span = Span("cuda").start()
            graph.replay()
            spans.append(span.stop())
        torch.cuda.synchronize()
        err = float((out.float() - expected.float()).norm() / expected.float().norm())
        return dict(captured=True, ms=round(statistics.median(s.ms() for s in spans), 2), rel_err_vs_uncaptured=err)
    except Exception as err:  # noqa: BLE001 - a failed capture is the finding
        return dict(captured=False, error=f"{type(err).__name__}: {str(err)[:300]}")


def kernel_breakdown(transformer, step_args, step_kwargs, repeats: int = 3) -> dict:
    """GPU time of one step by kernel family, from the profiler (CUDA activity only, so nothing is counted
    twice): where a step's time goes. Milliseconds per step, plus the largest kernels."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            transformer(*step_args, **step_kwargs)
        torch.cuda.synchronize()
    families: dict[str, float] = {}
    kernels = []
    # host waits on the GPU inside a step (the AOTI runner waiting for its previous call, for one)
    syncs = {event.key: event.count / repeats for event in prof.key_averages() if "Synchronize" in event.key}
    for event in prof.key_averages():
        if event.device_type != torch.autograd.DeviceType.CUDA or event.device_time_total <= 0:
            continue  # a CPU op's device time is its kernels', counted once as kernels
        name, ms = event.key, event.device_time_total / 1000 / repeats
        low = name.lower()
        # Triton first: Inductor names its fused kernels after the ops nearby ("..._cudnn_attention_...")
        family = ("triton" if low.startswith("triton") else
                  "attention" if any(k in low for k in ("sdpa", "fmha", "flash", "attention")) else
                  "gemm" if any(k in low for k in ("gemm", "cutlass", "xmma", "nvjet", "scaled_mm", "cublas")) else
                  "other")
        families[family] = families.get(family, 0.0) + ms
        kernels.append((ms, event.count // repeats, name[:100]))
    kernels.sort(reverse=True)
    return dict(ms_per_step={k: round(v, 2) for k, v in sorted(families.items(), key=lambda kv: -kv[1])},
                total_ms=round(sum(families.values()), 2), host_syncs_per_step=syncs,
                top=[dict(ms=round(ms, 2), calls=calls, kernel=name) for ms, calls, name in kernels[:12]])


def final_latents(model, preset, steps: int) -> torch.Tensor:
    """The latents after `steps` denoising steps from a fixed seed: how far quantization drifts over a run."""
    with torch.inference_mode():
        return model(PROMPT, preset, steps, generator=torch.Generator("cpu").manual_seed(7),
                     output_type="latent").images.float()


def time_pipeline(model, preset, steps: int, device: str, repeats: int) -> dict:
    """One whole image as the app makes it (text encoders, `steps` steps, VAE decode, PIL), and where the
    time goes. Seconds, median over `repeats` after one short warm-up."""
    pipe = model.pipe
    spans: dict[str, list[Span]] = {"text_encoders": [], "transformer": [], "vae_decode": []}
    open_spans: list[Span] = []
    handles = []

    def pre(key):
        def hook(*_):
            span = Span(device).start()
            spans[key].append(span)
            open_spans.append(span)
        return hook

    def post(*_):
        open_spans.pop().stop()

    texts = text_encoders(pipe)
    for key, module in [*(("text_encoders", m) for m in texts), ("transformer", pipe.transformer)]:
        handles += [module.register_forward_pre_hook(pre(key)), module.register_forward_hook(post)]
    decode = pipe.vae.decode

    def timed_decode(*args, **kwargs):
        pre("vae_decode")()
        try:
            return decode(*args, **kwargs)
        finally:
            post()

    pipe.vae.decode = timed_decode
    results = []
    try:
        for run in range(repeats + 1):
            for key in spans:
                spans[key].clear()
            sync(device)
            t0 = time.perf_counter()
            with torch.inference_mode(), step_cache.counting(pipe.transformer) as counts:
                model(PROMPT, preset, steps if run else 1, generator=torch.Generator("cpu").manual_seed(run))
            sync(device)
            if run:  # run 0 warms the text encoders and the VAE
                part = {key: sum(s.ms() for s in spans[key]) / 1000 for key in spans}
                part["total"] = time.perf_counter() - t0
                part["other"] = part["total"] - sum(part[key] for key in spans)
                part["transformer_calls"] = len(spans["transformer"])  # one per step: proves the hooks saw each
                part["full_calls"] = counts.full if counts else part["transformer_calls"]  # the rest were skipped
                results.append(part)
    finally:
        for handle in handles:
            handle.remove()
        pipe.vae.__dict__.pop("decode", None)
    return {key: round(statistics.median(r[key] for r in results), 3) if not key.endswith("_calls") else results[0][key]
            for key in results[0]}


def run_recorded(measure, args, result: dict, what: str) -> int:
    """Runs `measure(args, result, save)` for the one-process benchmarks (bigmodel_bench, text_encoder_bench): `save`
    adds figures to `result` and rewrites --out at once, so a late failure keeps what was measured before it, and
    the JSON then says what failed. Prints the JSON last; 1 if it failed."""
    def save(**values):
        result.update(values)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))

    try:
        measure(args, result, save)
    except Exception as err:  # noqa: BLE001 - the JSON says what failed, beside what was measured before
        log.exception("%s failed", what)
        result["error"] = f"{type(err).__name__}: {err}"[:800]
    save(torch=torch.__version__, gpu=torch.cuda.get_device_name() if args.device == "cuda" else "cpu")
    print(json.dumps(result))
    return 0 if "error" not in result else 1


# ---------------------------------------------------------------------------------------------------
# Variants.
# ---------------------------------------------------------------------------------------------------
def parse_variant(spec: str, defaults: argparse.Namespace) -> dict:
    variant = dict(spec=spec, mode=defaults.mode, quant=defaults.quant, attention=defaults.attention,
                   scope=defaults.scope, presets=None, pertensor=False, autotune=False, step_cache="",
                   shared=False, graphs=False, epilogue=False)
    for word in filter(None, spec.split(":")):
        if word.partition("=")[0] in ("fbc", "taylorseer"):  # STEP_CACHE, its ":" written "=" here
            variant["step_cache"] = word.replace("=", ":")
        elif word == "pertensor":  # fp8 with one scale per tensor instead of the project's per row
            variant["pertensor"] = True
        elif word == "autotune":  # Inductor benchmarks Triton GEMM templates against cuBLAS at compile time
            variant["autotune"] = True
        elif word == "epilogue":  # Inductor may fuse pointwise work into the kernel before it (issue 15)
            variant["epilogue"] = True
        elif word == "shared":  # regional programs as spaces installs them: one instance per block list
            variant["shared"] = True
        elif word == "graphs":  # also try one step captured in a CUDA graph and replayed
            variant["graphs"] = True
        elif word in ("eager", "aoti"):
            variant["mode"] = word
        elif word in ("none", "fp8", "int8", "int4"):
            variant["quant"] = word
        elif word in AOT_SCOPE_CHOICES:
            variant["scope"] = word
        elif re.fullmatch(r"p\d+", word):
            variant["presets"] = int(word[1:])
        else:
            variant["attention"] = word
    return variant


def settings_for(variant: dict, presets, args, cache_dir: str) -> Settings:
    chosen = presets[: variant["presets"]] if variant["presets"] else presets
    env = {
        "MODEL_ID": MODEL_ID,
        "PRESETS": ",".join(f"{p.label}={p.name}" for p in chosen),
        "QUANTIZATION": variant["quant"],
        "ATTENTION": variant["attention"],
        "COMPILE": "aoti",
        "DYNAMIC_SHAPES": "1" if args.dynamic else "0",
        "AOT_CACHE_DIR": cache_dir,
    }
    if variant["scope"]:
        env["AOT_SCOPE"] = variant["scope"]
    if variant["step_cache"]:
        env["STEP_CACHE"] = variant["step_cache"]
    settings = Settings.from_env(env, has_cuda=True)
    if variant["mode"] == "eager":
        # The app refuses fp8 without compiling; the benchmark still measures it, so it skips that check.
        settings = dataclasses.replace(settings, compile="none")
    return settings


def use_fp8_per_tensor() -> None:
    """Swaps the granularity of the product's fp8 (PerRow) for PerTensor until restored: `optimize_pipeline_`
    quantizes a resident transformer through `optimization.quantize_` (low-VRAM layouts go through aot.memory)."""

    def quantize_(transformer, mode, *args, keep_bf16=(), **kwargs):
        if mode != "fp8":
            return quantize.quantize_(transformer, mode, *args, keep_bf16=keep_bf16, **kwargs)
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerTensor
        from torchao.quantization import quantize_ as torchao_quantize_

        config = Float8DynamicActivationFloat8WeightConfig(granularity=PerTensor(), set_inductor_config=False)
        torchao_quantize_(transformer, config, filter_fn=lambda module, name: isinstance(module, torch.nn.Linear)
                          and not quantize.kept_in_bf16(name, keep_bf16))

    optimization.quantize_ = quantize_
    log.warning("fp8 granularity overridden for this variant: PerTensor instead of the project's PerRow")


def parse_value(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def emit(kind: str, **fields) -> None:
    """One machine-readable line per measurement, so a run cut short still leaves its numbers."""
    print(f"RESULT {json.dumps({'kind': kind, **fields})}", flush=True)


def measure_variant(pipe, variant, presets, args, device, cache_dir, inputs, reference) -> dict:
    # optimize_pipeline_ reads both names from the optimization module when it runs: patching them takes effect
    project = (optimization.quantize_, optimization.INDUCTOR_CONFIGS)
    if variant["pertensor"]:  # the cache key cannot see the granularity: a cache of its own
        use_fp8_per_tensor()
        cache_dir = os.path.join(cache_dir, "pertensor")
    if variant["autotune"]:
        optimization.INDUCTOR_CONFIGS = {**optimization.INDUCTOR_CONFIGS, "max_autotune_gemm": True,
                                         "max_autotune_gemm_backends": "ATEN,TRITON"}
    if variant["epilogue"]:  # the cache key holds the Inductor options: its own programs
        optimization.INDUCTOR_CONFIGS = {**optimization.INDUCTOR_CONFIGS, "epilogue_fusion": True}
    try:
        return _measure_variant(pipe, variant, presets, args, device, cache_dir, inputs, reference)
    finally:
        optimization.quantize_, optimization.INDUCTOR_CONFIGS = project


def _measure_variant(pipe, variant, presets, args, device, cache_dir, inputs, reference) -> dict:
    settings = settings_for(variant, presets, args, cache_dir)
    model = load_model(settings, pipe)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    report = optimization.optimize_pipeline_(model, settings)
    if variant["shared"]:
        share_block_programs_(pipe.transformer)
    setup_s = time.perf_counter() - t0
    result = dict(variant=variant["spec"], mode=variant["mode"], quant=report.quantization, attention=report.attention,
                  step_cache=report.step_cache, compile=report.compile, scope=report.compile_scope,
                  presets_compiled=[p.name for p in model.presets],
                  setup_s=round(setup_s, 1), compile_s=report.compile_seconds, programs=report.programs,
                  compile_source=report.compile_source, cache_keys=report.cache_keys, fallbacks=report.fallbacks,
                  steps={})
    if device == "cuda":
        result["peak_gib_setup"] = round(torch.cuda.max_memory_allocated() / GiB, 2)
        result["resident_gib"] = round(torch.cuda.memory_allocated() / GiB, 2)
    result["fell_back"] = ((variant["mode"] == "aoti" and report.compile != "aoti") or report.quantization != variant["quant"]
                           or (variant["attention"] != "auto" and report.attention != variant["attention"])
                           or (variant["step_cache"] != "" and report.step_cache == "off"))
    emit("setup", **result)
    if device == "cuda":  # from here on: serving only (compiling's transient memory is over)
        torch.cuda.reset_peak_memory_stats()
    first = model.presets[0]
    if args.first_image:  # cold or warm start, as a user sees it: optimize, then one whole image
        sync(device)
        t1 = time.perf_counter()
        with torch.inference_mode():
            model("a first image", first, args.steps, generator=torch.Generator("cpu").manual_seed(0))
        sync(device)
        result["first_image"] = dict(image_s=round(time.perf_counter() - t1, 2),
                                     optimize_plus_image_s=round(setup_s + time.perf_counter() - t1, 2),
                                     since_process_start_s=round(time.perf_counter() - PROCESS_START, 1))
        emit("first_image", variant=variant["spec"], **result["first_image"])
    # one step out of an image's context means nothing to a step cache (and its hooks refuse a call outside one)
    for preset in model.presets if report.step_cache == "off" else ():
        step_args, step_kwargs = inputs[preset.name]
        ms, out = time_step(pipe.transformer, step_args, step_kwargs, device, args.warmup, args.iters)
        ref_ms, ref_out = reference[preset.name]
        err = float((out.float() - ref_out.float()).norm() / ref_out.float().norm())
        result["steps"][preset.name] = dict(ms=round(ms, 2), speedup=round(ref_ms / ms, 3), rel_err=round(err, 5),
                                            finite=bool(torch.isfinite(out).all()))
        emit("step", variant=variant["spec"], preset=preset.name, **result["steps"][preset.name])
        if variant["graphs"] and preset == first and device == "cuda":
            result["graphs"] = time_graphed_step(pipe.transformer, step_args, step_kwargs, out, args.warmup, args.iters)
            emit("graphs", variant=variant["spec"], preset=preset.name, **result["graphs"])
        if args.profile and preset == first and device == "cuda":
            result["profile"] = kernel_breakdown(pipe.transformer, step_args, step_kwargs)
            emit("profile", variant=variant["spec"], preset=preset.name, **result["profile"])
    if args.latent_error:
        latents, reference_latents = final_latents(model, first, args.steps), args.reference_latents
        result["latent_rel_err"] = round(float((latents - reference_latents).norm() / reference_latents.norm()), 5)
        emit("latent_error", variant=variant["spec"], steps=args.steps, rel_err=result["latent_rel_err"])
    if args.full_pipeline:
        result["pipeline"] = time_pipeline(model, first, args.steps, device, args.pipeline_repeats)
        emit("pipeline", variant=variant["spec"], preset=first.name, **result["pipeline"])
    if device == "cuda":
        result["peak_gib_serving"] = round(torch.cuda.max_memory_allocated() / GiB, 2)
        result["peak_gib"] = max(result["peak_gib_serving"], result["peak_gib_setup"])
    return result


def share_block_programs_(transformer: torch.nn.Module) -> None:
    """Undoes aot.programs' instance per block: every block of a list calls one loaded instance of its package
    and rebinds its weights before each call, as `spaces.aoti_load_from_package_dir` leaves them (the
    comparison for RESULTS.md run 16)."""
    shared = {}
    for module in transformer.modules():
        dispatch = module.__dict__.get("forward")
        for _, program, _ in getattr(dispatch, "programs", ()):
            if hasattr(program, "model") and module is not transformer:
                program.model = shared.setdefault(str(program.model.archive_file), program.model)


def fresh_transformer_(pipe, device, dtype, fingerprint: float) -> None:
    """Gives the pipeline back its unquantized, uncompiled transformer with the same weights."""
    config = dict(pipe.transformer.config)
    pipe.register_modules(transformer=None)
    torch._dynamo.reset()
    release_export_memory()  # torch.export's trace map would keep the old weights alive
    pipe.register_modules(transformer=build_transformer(config, device, dtype))
    assert weights_fingerprint(pipe.transformer) == fingerprint, "rebuilt transformer has other weights"


# ---------------------------------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------------------------------
def print_table(eager: dict, results: list[dict], steps: int) -> None:
    print()
    print(f"{'variant':<26} {'preset':<10} {'ms/step':>8} {'vs eager':>8} {f'{steps}-step s':>9} {'rel err':>9} "
          f"{'compile s':>9} {'setup s':>8} {'peak GiB':>8}")
    rows = [("eager (reference)", eager["steps"], dict(peak_gib=eager.get("peak_gib")))] + \
        [(r["variant"] + (" FELL BACK" if r.get("fell_back") else ""), r.get("steps", {}), r) for r in results]
    for name, by_preset, info in rows:
        if "error" in info:
            print(f"{name:<26} ERROR {info['error']}")
            continue
        for i, (preset, s) in enumerate(by_preset.items()):
            first = i == 0
            once = {key: str(info.get(key, "") or "") if first else "" for key in ("compile_s", "setup_s", "peak_gib")}
            print(f"{name if first else '':<26} {preset:<10} {s['ms']:>8.1f} {s.get('speedup', 1.0):>8.2f} "
                  f"{s['ms'] * steps / 1000:>9.2f} {s.get('rel_err', 0.0):>9.2e} "
                  f"{once['compile_s']:>9} {once['setup_s']:>8} {once['peak_gib']:>8}")
    pipelines = [("eager (reference)", eager.get("pipeline"))] + [(r["variant"], r.get("pipeline")) for r in results]
    pipelines = [(n, p) for n, p in pipelines if p]
    if pipelines:
        print(f"\nwhole image ({steps} steps), seconds:")
        print(f"{'variant':<26} {'total':>7} {'text enc':>8} {'transformer':>11} {'vae dec':>8} {'other':>7} {'calls':>6} "
              f"{'full':>5} {'drift':>9}")
        drifts = {r["variant"]: r.get("latent_rel_err") for r in results}  # --latent-error: vs the reference
        for name, p in pipelines:
            drift = "" if drifts.get(name) is None else f"{drifts[name]:.2e}"
            print(f"{name:<26} {p['total']:>7.2f} {p['text_encoders']:>8.2f} {p['transformer']:>11.2f} "
                  f"{p['vae_decode']:>8.2f} {p['other']:>7.2f} {p['transformer_calls']:>6} {p.get('full_calls', ''):>5} "
                  f"{drift:>9}")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("eager", "aoti"), default="aoti")
    parser.add_argument("--quant", choices=("none", "fp8", "int8"), default="none")
    parser.add_argument("--attention", default="sdpa", help="sdpa, auto or a diffusers attention backend name")
    parser.add_argument("--scope", choices=AOT_SCOPE_CHOICES, default=None, help="AOT_SCOPE; default: the project's default")
    parser.add_argument("--variants", default="", help="comma-separated variants (see above); default: from --mode etc.")
    parser.add_argument("--presets", default="", help=f"PRESETS; default: FLUX's ({FLUX.presets}), with --tiny "
                                                      f"its tiny ones ({FLUX.tiny_presets})")
    parser.add_argument("--dynamic", action="store_true", help="DYNAMIC_SHAPES=1")
    parser.add_argument("--steps", type=int, default=28, help="denoising steps per image")
    parser.add_argument("--cache-dir", default="", help="AOT_CACHE_DIR; default: a fresh temporary directory")
    parser.add_argument("--full-pipeline", action="store_true", help="also time whole images and where time goes")
    parser.add_argument("--pipeline-repeats", type=int, default=2)
    parser.add_argument("--latent-error", action="store_true",
                        help="relative L2 of the final latents after --steps steps, each variant vs eager bf16")
    parser.add_argument("--profile", action="store_true", help="GPU time per step by kernel family (profiler)")
    parser.add_argument("--first-image", action="store_true", help="time one whole image right after optimizing")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--blocks", default="", help="DOUBLE,SINGLE transformer blocks (FLUX.1-dev: 19,38)")
    parser.add_argument("--t5-layers", type=int, default=0, help="fewer T5 layers, for quick compile probes")
    parser.add_argument("--clip-layers", type=int, default=0)
    parser.add_argument("--fp8-granularity", choices=("row", "tensor"), default="row")
    parser.add_argument("--inductor", default="", help="KEY=VALUE,... merged into optimization.INDUCTOR_CONFIGS; "
                                                       "'none' drops the project's options first")
    parser.add_argument("--stack-dump", type=float, default=0, help="dump every thread's stack every N s (stderr)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cpu: only where torch sees no GPU (the product uses any GPU it sees)")
    parser.add_argument("--tiny", action="store_true", help="FLUX's tiny models: a smoke test of this script")
    args = parser.parse_args()
    args.blocks = tuple(int(v) for v in args.blocks.split(",")) if args.blocks else ()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    faulthandler.register(signal.SIGTERM, chain=True)  # `timeout` shows where a stalled compile was
    if args.stack_dump:
        faulthandler.dump_traceback_later(args.stack_dump, repeat=True)
    if CXX_FIX:
        log.warning(CXX_FIX)
    device = args.device
    if (device == "cuda") != torch.cuda.is_available():
        parser.error(f"--device {device}, but torch {'sees no' if device == 'cuda' else 'sees a'} GPU "
                     "(use --device cpu --tiny for a smoke test without one)")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.inductor:
        configs = {} if args.inductor.startswith("none") else dict(optimization.INDUCTOR_CONFIGS)
        for item in filter(None, args.inductor.removeprefix("none").split(",")):
            key, _, value = item.partition("=")
            configs[key.strip()] = parse_value(value.strip())
        optimization.INDUCTOR_CONFIGS = configs  # read by optimization._compile and the cache key at run time
    log.info("inductor configs: %s", optimization.INDUCTOR_CONFIGS)
    env = dict(torch=torch.__version__, device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
               cxx=os.environ.get("CXX"), inductor=optimization.INDUCTOR_CONFIGS, fp8_granularity=args.fp8_granularity)
    for name in ("diffusers", "transformers", "torchao", "triton", "spaces", "huggingface_hub"):
        try:
            env[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            env[name] = "not installed"
    log.info("environment: %s", env)

    variants = [parse_variant(s, args) for s in (args.variants.split(",") if args.variants else [""])]
    for variant in variants:  # --fp8-granularity tensor: as if every variant said "pertensor"
        variant["pertensor"] = variant["pertensor"] or args.fp8_granularity == "tensor"
    variants = [v for v in variants
                if (v["mode"], v["quant"], v["attention"], v["step_cache"]) != ("eager", "none", "sdpa", "")]
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="flux-bench-aot-")

    pipe, params = build_pipeline(device, dtype, args.tiny, args.blocks, args.clip_layers, args.t5_layers)
    presets_text = args.presets or (FLUX.tiny_presets if args.tiny else FLUX.presets)
    model = load_model(Settings.from_env({"MODEL_ID": MODEL_ID, "PRESETS": presets_text}, has_cuda=True), pipe)
    presets = model.presets
    fingerprint = weights_fingerprint(pipe.transformer)

    # The eager bf16 reference, in this process, on the inputs every variant is measured on.
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    inputs, reference, eager = {}, {}, dict(steps={})
    for preset in presets:
        inputs[preset.name] = capture_inputs(model, pipe.transformer, preset)
        ms, out = time_step(pipe.transformer, *inputs[preset.name], device, args.warmup, args.iters)
        reference[preset.name] = (ms, out)
        eager["steps"][preset.name] = dict(ms=round(ms, 2), finite=bool(torch.isfinite(out).all()),
                                           rms=float(out.float().pow(2).mean().sqrt()))
        emit("step", variant="eager", preset=preset.name, **eager["steps"][preset.name])
        if args.profile and preset == presets[0] and device == "cuda":
            eager["profile"] = kernel_breakdown(pipe.transformer, *inputs[preset.name])
            emit("profile", variant="eager", preset=preset.name, **eager["profile"])
    prompt_embeds = inputs[presets[0].name][1]["encoder_hidden_states"]
    eager["text_embeddings_finite"] = bool(torch.isfinite(prompt_embeds).all())
    if args.latent_error:
        args.reference_latents = final_latents(model, presets[0], args.steps)
    if args.full_pipeline:
        eager["pipeline"] = time_pipeline(model, presets[0], args.steps, device, args.pipeline_repeats)
        emit("pipeline", variant="eager", preset=presets[0].name, **eager["pipeline"])
    if device == "cuda":
        eager["peak_gib"] = round(torch.cuda.max_memory_allocated() / GiB, 2)

    results = []
    for i, variant in enumerate(variants):
        if i:
            fresh_transformer_(pipe, device, dtype, fingerprint)
        log.info("variant %s: %s", variant["spec"], variant)
        try:
            results.append(measure_variant(pipe, variant, presets, args, device, cache_dir, inputs, reference))
        except Exception as err:  # noqa: BLE001 - one broken variant must not hide the others' numbers
            log.exception("variant %s failed", variant["spec"])
            results.append(dict(variant=variant["spec"], error=f"{type(err).__name__}: {str(err)[:500]}"))
            emit("error", **results[-1])

    if not args.cache_dir:
        shutil.rmtree(cache_dir, ignore_errors=True)
    faulthandler.cancel_dump_traceback_later()
    print_table(eager, results, args.steps)
    print(json.dumps(dict(bench="flux", env=env, cxx_fix=CXX_FIX, params_b={k: round(v, 3) for k, v in params.items()},
                          blocks=args.blocks or None, presets=[p.name for p in presets], steps=args.steps,
                          eager=eager, variants=results)))


if __name__ == "__main__":
    main()
