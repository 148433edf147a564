"""One denoising step of a family's transformer at its real size (random weights): eager bf16 against variants written
as the product's own settings, in one process, on the GPU.

It drives the product: every variant is `Settings.from_env` over its NAME=VALUE items, `aot.model.load_model` and
`optimization.optimize_pipeline_`, which plans the memory (LOW_VRAM, VRAM_LIMIT_GIB: the process is capped as on a
smaller card), quantizes, streams and compiles, so what it measures is what the Space serves. The pipeline is the
family's tiny one with the transformer and VAE of `family.real_size` (aot/families/), seeded, built on the GPU;
its text encoders stay tiny, their embeddings widened to the real width (`--text real`: real-size encoders too).
Each variant gets a fresh build with the same weights; one whose settings stream or cap memory starts from host
memory, as a loaded checkpoint does.

First the eager bf16 reference: each preset's transformer call is recorded (`capture_inputs`), timed, and its FLOPs
counted. Then per variant and preset: median ms/step (CUDA events after warm-up), achieved TFLOP/s and the share of
the H100's ceilings (lib.py), relative L2 error of the step against eager on the very same inputs, "compile s"
(the product's `report.compile_seconds`), peak GPU memory while preparing and while serving, the layout the memory
plan chose, and streamed blocks' copies per step (late: made when the block was called, not one ahead). Options add
whole images (`--image`: text encoders / transformer / VAE, and transformer calls that ran in full under a step
cache), the final latents' drift from eager's (`--latent-error`), a first image right after optimizing
(`--first-image`), and GPU time by kernel family (`--profile`). A step cache acts across an image's steps, so its
variants skip the one-step timing: measure them with --image and --latent-error.

A variant is comma-separated NAME=VALUE items: UPPER_CASE names are the product's settings (README; a PRESETS value
keeps its commas and must name presets of --presets), and a few knobs the product has no setting for:
  inductor.OPTION=VALUE     one of Inductor's options over optimization.INDUCTOR_CONFIGS (epilogue_fusion=true, ...)
  bench.fp8_granularity=tensor   fp8 with one scale per tensor, not the probe's first choice (row)
  bench.shared_programs=1   regional programs with one instance per block list, as spaces installs them (run 16)
  bench.bnb4=1              diffusers' bitsandbytes NF4 recipe on every Linear, eager, in place of optimizing;
                            served under VRAM_LIMIT_GIB if given (RESULTS.md run 19)
  bench.tanh_gelu=1         GELU's tanh form traced as torch writes it (libdevice's tanh), not as its sigmoid identity
                            (aot/programs.py `gelu_as_sigmoid`; the comparison of RESULTS.md run 27)
  bench.static_edit=1       an editing family's programs static, one per preset, traced with --inputs images, in
                            place of its one dynamic image-token program (the comparison issue 31 asks for)
Unset settings take the product's defaults (QUANTIZATION=auto, COMPILE=auto, ...). One AoT variant's weights stay
allocated after it (RESULTS.md run 7; `left_gib`): give a capped variant a process of its own.

    python benchmarks/step_bench.py --family flux --presets square=1024x1024 --variant QUANTIZATION=fp8,AOT_SCOPE=model
    python benchmarks/step_bench.py --family flux2 --variant LOW_VRAM=auto,VRAM_LIMIT_GIB=24 --latent-error 20
    python benchmarks/step_bench.py --family flux --config num_layers=4,num_single_layers=8 \\
        --variant QUANTIZATION=fp8 --variant QUANTIZATION=fp8,inductor.epilogue_fusion=true
    python benchmarks/step_bench.py --family flux --tiny --device cpu --variant COMPILE=none   # smoke test
    python benchmarks/step_bench.py --family ltx2 --recipe distilled --variant QUANTIZATION=fp8 --image 1
    python benchmarks/step_bench.py --family flux-kontext --presets square=1024x1024 --inputs 1 \\
        --variant QUANTIZATION=fp8 --variant QUANTIZATION=fp8,bench.static_edit=1 --image 1

Prints one RESULT line per figure, a table, then one JSON document on its last line. Translations of the commands
in RESULTS.md (flux_bench, family_bench, lowvram_bench, bigmodel_bench): benchmarks/README.md.
"""
from __future__ import annotations

import lib  # first: it corrects CXX before torch is imported, and puts the project on sys.path

import argparse
import contextlib
import dataclasses
import faulthandler
import gc
import logging
import re
import shutil
import signal
import statistics
import tempfile
import time

import torch
from torch.utils._pytree import tree_map

import aot.cache
import aot.programs
import optimization
from aot import step_cache
from aot.families import FAMILIES, family_named
from aot.memory import text_encoders
from aot.model import experts
from aot.model import load_model
from aot.programs import capture_inputs, release_export_memory
from settings import Settings

log = logging.getLogger("step-bench")
KNOBS = ("bench.fp8_granularity", "bench.shared_programs", "bench.bnb4", "bench.static_edit", "bench.tanh_gelu")


# ---------------------------------------------------------------------------------------------------
# Variants: the product's settings, and the few knobs it has no setting for.
# ---------------------------------------------------------------------------------------------------
def parse_variant(text: str) -> tuple[dict, dict]:
    """'QUANTIZATION=fp8,PRESETS=a=1024x1024,b=832x1216,inductor.epilogue_fusion=true' -> (settings, knobs). A comma
    starts an item only before a setting's or a knob's name, so a PRESETS value keeps its commas."""
    env, knobs = {}, {}
    for item in filter(None, re.split(r",(?=[A-Z][A-Z0-9_]*=|[a-z_]+\.[a-z0-9_]+=)", text)):
        name, sep, value = item.partition("=")
        if not sep or not (name.isupper() or name.startswith("inductor.") or name in KNOBS):
            raise SystemExit(f"--variant item {item!r}: give SETTING=VALUE, inductor.OPTION=VALUE or one of "
                             f"{', '.join(KNOBS)} (=VALUE)")
        (env if name.isupper() else knobs)[name] = value
    return env, knobs


def parse_value(text: str):
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            return kind(text)
    return text


@contextlib.contextmanager
def knobs_applied(knobs: dict):
    """Inductor's options (over those for per-row fp8 too), the fp8 granularity and the GELU's traced form, swapped in
    the modules that read them when they run (all are in the cache key: the GELU's form as the cache format before
    it) until the variant is done."""
    saved = (optimization.INDUCTOR_CONFIGS, optimization.fp8_candidates, aot.programs.gelu_as_sigmoid,
             aot.cache.CACHE_FORMAT, optimization.ROW_FP8_INDUCTOR_CONFIGS)
    if knobs.get("bench.tanh_gelu"):
        aot.programs.gelu_as_sigmoid, aot.cache.CACHE_FORMAT = contextlib.nullcontext, saved[3] - 1
    options = {name.removeprefix("inductor."): parse_value(value) for name, value in knobs.items()
               if name.startswith("inductor.")}
    optimization.INDUCTOR_CONFIGS = {**saved[0], **options}  # over the per-row fp8 options too
    optimization.ROW_FP8_INDUCTOR_CONFIGS = {k: v for k, v in saved[4].items() if k not in options}
    granularity = knobs.get("bench.fp8_granularity")
    if granularity:
        assert granularity in ("row", "tensor"), f"bench.fp8_granularity={granularity}: row or tensor"
        optimization.fp8_candidates = lambda *args: tuple(g for g in saved[1](*args) if g == granularity)
    try:
        yield
    finally:
        (optimization.INDUCTOR_CONFIGS, optimization.fp8_candidates, aot.programs.gelu_as_sigmoid,
         aot.cache.CACHE_FORMAT, optimization.ROW_FP8_INDUCTOR_CONFIGS) = saved


def share_block_programs_(transformer: torch.nn.Module) -> None:
    """Undoes aot.programs' instance per block: every block of a list calls one loaded instance of its package, as
    `spaces.aoti_load_from_package_dir` leaves them (the comparison of RESULTS.md run 16)."""
    shared = {}
    for module in transformer.modules():
        for _, program, _ in getattr(module.__dict__.get("forward"), "programs", ()):
            if hasattr(program, "model") and module is not transformer:
                program.model = shared.setdefault(str(program.model.archive_file), program.model)


def to_bnb4_(transformer: torch.nn.Module) -> int:
    """Every Linear as bitsandbytes NF4 with bf16 compute, quantized where its weight lies: diffusers' 4-bit recipe as
    its settings make it (`BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=
    torch.bfloat16)`), without its list of modules left alone. Returns how many layers."""
    import bitsandbytes as bnb

    names = [n for n, m in transformer.named_modules() if type(m) is torch.nn.Linear]
    for path in names:
        parent_path, _, attr = path.rpartition(".")
        parent = transformer.get_submodule(parent_path)
        old = getattr(parent, attr)
        new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                                compute_dtype=torch.bfloat16, quant_type="nf4", device="meta")
        new.weight = bnb.nn.Params4bit(old.weight.data, requires_grad=False, quant_type="nf4")
        if old.bias is not None:
            new.bias = torch.nn.Parameter(old.bias.data, requires_grad=False)
        setattr(parent, attr, new.to(old.weight.device))
    return len(names)


# ---------------------------------------------------------------------------------------------------
# What is measured beyond one step.
# ---------------------------------------------------------------------------------------------------
def final_latents(model, preset, steps: int, inputs: int) -> torch.Tensor:
    """The latents after `steps` denoising steps from a fixed seed: how far a variant drifts over a run."""
    with torch.inference_mode():
        return model(lib.PROMPT, preset, steps, generator=torch.Generator("cpu").manual_seed(7),
                     output_type="latent", images=model.sample_images()[:inputs]).images.float().cpu()


def time_image(model, preset, steps: int, device: str, repeats: int, inputs: int) -> dict:
    """One whole image as the app makes it (text encoders, `steps` steps, VAE decode, PIL), and where the time goes.
    Seconds, median over `repeats` after a one-step warm-up."""
    pipe = model.pipe
    spans: dict[str, list[lib.Span]] = {"text_encoders": [], "transformer": [], "vae_decode": []}
    open_spans, handles = [], []

    def pre(key):
        def hook(*_):
            spans[key].append(lib.Span(device).start())
            open_spans.append(spans[key][-1])
        return hook

    def post(*_):
        open_spans.pop().stop()

    # Wan 2.2 A14B: both experts' calls are the transformer's, each step running one of them
    for key, module in [*(("text_encoders", m) for m in text_encoders(pipe)),
                        *(("transformer", m) for m in experts(pipe))]:
        handles += [module.register_forward_pre_hook(pre(key)), module.register_forward_hook(post)]
    decode = pipe.vae.decode

    def timed_decode(*args, **kwargs):
        pre("vae_decode")()
        try:
            return decode(*args, **kwargs)
        finally:
            post()

    pipe.vae.decode = timed_decode
    runs = []
    try:
        for run in range(repeats + 1):
            for key in spans:
                spans[key].clear()
            lib.sync(device)
            t0 = time.perf_counter()
            with torch.inference_mode(), step_cache.counting(pipe.transformer) as counts:
                model(lib.PROMPT, preset, steps if run else 1, generator=torch.Generator("cpu").manual_seed(run),
                      images=model.sample_images()[:inputs])
            lib.sync(device)
            if run:
                part = {key: sum(s.ms() for s in spans[key]) / 1000 for key in spans}
                part["total"] = time.perf_counter() - t0
                part["other"] = part["total"] - sum(part[key] for key in spans)
                part["transformer_calls"] = len(spans["transformer"])
                part["full_calls"] = counts.full if counts else part["transformer_calls"]  # the rest were skipped
                runs.append(part)
    finally:
        for handle in handles:
            handle.remove()
        pipe.vae.__dict__.pop("decode", None)
    return {key: runs[0][key] if key.endswith("_calls") else round(statistics.median(r[key] for r in runs), 3)
            for key in runs[0]}


def kernel_breakdown(transformer, args, kwargs, repeats: int = 3) -> dict:
    """GPU time of one step by kernel family, from the profiler (CUDA activity only, so nothing is counted twice),
    the host's waits on the GPU inside a step, and the largest kernels. Milliseconds per step."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            transformer(*args, **kwargs)
        torch.cuda.synchronize()
    families: dict[str, float] = {}
    kernels = []
    events = prof.key_averages()
    for event in events:
        if event.device_type != torch.autograd.DeviceType.CUDA or event.device_time_total <= 0:
            continue  # a CPU op's device time is its kernels', counted once as kernels
        name, ms = event.key, event.device_time_total / 1000 / repeats
        low = name.lower()  # Triton first: Inductor names its fused kernels after the ops nearby ("..._attention_...")
        family = ("triton" if low.startswith("triton") else
                  "attention" if any(k in low for k in ("sdpa", "fmha", "flash", "attention")) else
                  "gemm" if any(k in low for k in ("gemm", "cutlass", "xmma", "nvjet", "scaled_mm", "cublas")) else
                  "other")
        families[family] = families.get(family, 0.0) + ms
        kernels.append((ms, event.count // repeats, name[:100]))
    kernels.sort(reverse=True)
    return dict(ms_per_step={k: round(v, 2) for k, v in sorted(families.items(), key=lambda kv: -kv[1])},
                total_ms=round(sum(families.values()), 2),
                host_syncs_per_step={e.key: e.count / repeats for e in events if "Synchronize" in e.key},
                top=[dict(ms=round(ms, 2), calls=calls, kernel=name) for ms, calls, name in kernels[:12]])


# ---------------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------------
class Bench:
    """The pipeline, built afresh for the reference and for each variant with the same weights; the reference's
    recorded calls (on the host), FLOPs, outputs and final latents, which every variant is measured against."""

    def __init__(self, args):
        self.args, self.device = args, args.device
        self.family = family_named(args.family)
        self.config = {k: parse_value(v) for k, v in (i.split("=", 1) for i in filter(None, args.config.split(",")))}
        native = self.family.distilled if args.recipe == "distilled" else self.family  # its presets are the outputs
        self.base = {"MODEL_ID": f"tiny-{self.family.name}" if args.tiny else f"bench/{self.family.name}-real-size",
                     "AOT_CACHE_DIR": args.cache_dir, "RECIPE": args.recipe,
                     "PRESETS": args.presets or (native.tiny_presets if args.tiny else native.presets)}
        self.inputs, self.flops, self.reference, self.latents, self.weights = {}, {}, {}, None, None

    def build(self, settings: Settings, host: bool):
        """A fresh pipeline with the reference's weights, in host memory (`host`) where the settings stream or cap
        memory, as a loaded checkpoint starts."""
        dtype, t0 = torch.bfloat16 if self.device == "cuda" else torch.float32, time.perf_counter()
        pipe, self.params = lib.real_pipeline(self.family, self.device, self.args.text, self.config, self.args.tiny,
                                              dtype)
        weights = lib.fingerprint(pipe.transformer)
        assert self.weights in (None, weights), "the rebuilt transformer has other weights"
        self.weights = weights
        if host and (settings.vram_limit_gib or settings.low_vram in ("on", "stream")):
            pipe.to("cpu")
        release()
        self.build_s = round(time.perf_counter() - t0, 1)
        return pipe

    def measure(self, text: str | None) -> dict:
        """A variant, or (`text` None) the eager bf16 reference: the pipeline as built (SDPA), never optimized."""
        env, knobs = parse_variant(text or "")
        settings = Settings.from_env({**self.base, **(env if text is not None else {"COMPILE": "none"})},
                                     has_cuda=self.device == "cuda")
        pipe = self.build(settings, host=text is not None and not knobs.get("bench.bnb4"))
        # a real-size pipeline's distilled recipe takes a real-size upsampler (a tiny pipeline's is built by load_model)
        upsampler = (lib.real_upsampler(self.family, pipe, next(pipe.vae.parameters()).device.type)
                     if settings.recipe == "distilled" and not self.args.tiny else None)
        model = load_model(settings, pipe, upsampler=upsampler)
        if knobs.get("bench.static_edit"):  # traced with the inputs, so each preset's program is its edit's shape
            model.family = dataclasses.replace(model.family, dynamic_tokens=None, min_images=self.args.inputs)
        transformer, name = model.pipe.transformer, "eager" if text is None else text
        assert {p.name for p in model.presets} <= {p.name for p in getattr(self, "presets", model.presets)}, \
            f"{name}: PRESETS beyond the reference's"
        result = dict(variant=name, build_s=self.build_s, quantization="none", steps={})
        if text is None:
            self.presets, self.steps = model.presets, self.args.steps or model.defaults.steps
            # the transformer's calls a step, each timed as recorded (LTX-2's one call of batch two)
            self.calls, _ = model.step_calls(model.defaults.guidance)
            result["params_b"] = {k: round(v, 3) for k, v in self.params.items()}
        if torch.cuda.is_available():
            torch.cuda.set_per_process_memory_fraction(1.0)  # the previous variant's cap; this one's plan sets its own
        lib.peak_gib()
        t0 = time.perf_counter()
        if knobs.get("bench.bnb4"):
            result.update(quantization="bnb nf4", bnb_layers=to_bnb4_(transformer))
            if settings.vram_limit_gib and self.device == "cuda":  # served under the cap, as the plan would cap it
                torch.cuda.empty_cache()
                total = torch.cuda.get_device_properties(0).total_memory
                torch.cuda.set_per_process_memory_fraction(min(1.0, settings.vram_limit_gib * lib.GiB / total))
        elif text is not None:
            with knobs_applied(knobs):
                report = optimization.optimize_pipeline_(model, settings)
                result["inductor"] = optimization.inductor_configs(report)
            result.update({key: getattr(report, key) for key in (
                "quantization", "fp8_granularity", "attention", "step_cache", "text", "compile", "compile_scope",
                "compile_seconds", "compile_source", "programs", "cache_keys", "memory", "startup", "cuda_graphs",
                "graphs", "fallbacks")})
            if knobs.get("bench.shared_programs"):
                share_block_programs_(transformer)
        result.update(setup_s=round(time.perf_counter() - t0, 1), peak_setup_gib=lib.peak_gib(),
                      resident_gib=lib.allocated_gib(), layout=result.get("memory", {}).get("layout", ""))
        lib.emit("setup", **{k: v for k, v in result.items() if k != "steps"})
        if self.args.first_image:  # a cold or warm start as a user sees it: optimized, then one whole image
            t1 = time.perf_counter()
            with torch.inference_mode():
                model("a first image", model.presets[0], self.steps, generator=torch.Generator("cpu").manual_seed(0),
                      images=model.sample_images()[:self.args.inputs])
            lib.sync(self.device)
            result["first_image"] = dict(image_s=round(time.perf_counter() - t1, 2),
                                         since_process_start_s=round(time.perf_counter() - lib.PROCESS_START, 1))
        # one step out of an image's context means nothing to a step cache (and its hooks refuse a call outside one);
        # each size a request calls the transformer at (a two-stage recipe's first stages too)
        for preset in model.stage_presets if result.get("step_cache", "off") == "off" else ():
            result["steps"][preset.name] = self.step(model, preset, name, result["quantization"])
            if self.args.profile and self.device == "cuda" and preset == model.presets[0]:
                result["profile"] = kernel_breakdown(transformer, *self.on_device(self.inputs[preset.name]))
                lib.emit("profile", variant=name, **result["profile"])
        self.whole_runs(model, result, name)
        result["peak_serving_gib"] = lib.peak_gib()
        return result

    def step(self, model, preset, name: str, quantization: str) -> dict:
        """One step's median ms on the reference's recorded call (recorded and its FLOPs counted by the reference),
        against eager bf16, and beside the ceilings."""
        transformer = model.pipe.transformer
        if preset.name not in self.inputs:
            call = capture_inputs(model, transformer, preset, images=self.args.inputs)
            self.inputs[preset.name] = tree_map(lambda v: v.cpu() if isinstance(v, torch.Tensor) else v, call)
            self.flops[preset.name] = lib.count_flops(transformer, *call)
        args, kwargs = self.on_device(self.inputs[preset.name])
        ms, out = lib.median_ms(lambda: transformer(*args, **kwargs), self.device, self.args.warmup, self.args.iters)
        out = lib.sample(out).float().cpu()
        ref_ms, ref_out = self.reference.setdefault(preset.name, (ms, out))
        flops = self.flops[preset.name]
        step = dict(ms=round(ms, 2), speedup=round(ref_ms / ms, 3), rel_err=round(lib.rel_err(out, ref_out), 5),
                    finite=bool(torch.isfinite(out).all()), tflop=round(sum(flops.values()) / 1e12, 3),
                    **lib.against_ceiling(flops, ms, quantization))
        lib.emit("step", variant=name, preset=preset.name, **step)
        return step

    def whole_runs(self, model, result: dict, name: str) -> None:
        """The final latents after --latent-error steps (their drift from eager's, and streamed blocks' copies), and
        whole images (--image)."""
        preset = model.presets[0]
        stream = getattr(model.pipe.transformer, "block_stream", None)  # aot/streaming.py, when blocks stream
        if self.args.latent_error:
            assert preset == self.presets[0], f"{name}: its final latents need the reference's first preset"
            if stream:
                stream.loads = stream.late_loads = 0
            latents = final_latents(model, preset, self.args.latent_error, self.args.inputs)
            self.latents = latents if self.latents is None else self.latents
            result["latent_rel_err"] = round(lib.rel_err(latents, self.latents), 5)
            lib.emit("latent_error", variant=name, steps=self.args.latent_error, rel_err=result["latent_rel_err"])
            if stream:
                calls = self.args.latent_error * self.calls
                result.update(copies_per_call=round(stream.loads / calls, 1),
                              late_per_call=round(stream.late_loads / calls, 1))
        if self.args.image:
            result["image"] = time_image(model, preset, self.steps, self.device, self.args.image, self.args.inputs)
            lib.emit("image", variant=name, preset=preset.name, **result["image"])

    def on_device(self, tree):
        return tree_map(lambda v: v.to(self.device) if isinstance(v, torch.Tensor) else v, tree)


def release() -> float | None:
    """Frees what the last pipeline left; returns the GPU memory still allocated (AoT variants leak, run 7)."""
    torch._dynamo.reset()
    release_export_memory()  # torch.export's trace map would keep the old weights alive
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return lib.allocated_gib()


def cell(value, width: int, spec: str = "") -> str:
    return f"{'-' if value is None or value == '' else format(value, spec):>{width}}"


def print_table(document: dict, steps: int, calls: int) -> None:
    print(f"\n{'variant':<40} {'preset':<10} {'ms/step':>8} {'vs eager':>8} {'TFLOP/s':>8} {'of ceil':>7} "
          f"{f'{steps}x{calls} s':>8} {'rel err':>9} {'compile s':>9} {'peak GiB':>8}  layout")
    rows = [("eager bf16 (reference)", document["eager"])] + [(r["variant"] or "(product defaults)", r)
                                                              for r in document["variants"]]
    for name, r in rows:
        if "error" in r:
            print(f"{name[:40]:<40} ERROR {r['error'][:120]}")
            continue
        name += " FELL BACK" if r.get("fallbacks") else ""
        for i, (preset, s) in enumerate(list(r["steps"].items()) or [("-", {})]):
            ms, once = s.get("ms"), i == 0
            print(f"{name[:40] if once else '':<40} {preset:<10} {cell(ms, 8)} {cell(s.get('speedup'), 8, '.2f')} "
                  f"{cell(s.get('tflops'), 8)} {cell(s.get('of_ceiling'), 7, '.0%')} "
                  f"{cell(ms and ms * steps * calls / 1000, 8, '.2f')} {cell(s.get('rel_err'), 9, '.2e')} "
                  f"{cell(r.get('compile_seconds') if once else '', 9)} "
                  f"{cell(r.get('peak_serving_gib') if once else '', 8)}  "
                  f"{r.get('layout', '') if once else ''}")
    images = [(name, r) for name, r in rows if r.get("image") or "latent_rel_err" in r]
    if images:
        print(f"\n{'variant':<40} {'s/image':>8} {'text enc':>8} {'transf.':>8} {'vae':>6} {'calls':>6} {'full':>5} "
              f"{'drift':>9} {'copies':>7} {'late':>5}")
        for name, r in images:
            image = r.get("image", {})
            print(f"{name[:40]:<40} {cell(image.get('total'), 8)} {cell(image.get('text_encoders'), 8)} "
                  f"{cell(image.get('transformer'), 8)} {cell(image.get('vae_decode'), 6)} "
                  f"{cell(image.get('transformer_calls'), 6)} {cell(image.get('full_calls'), 5)} "
                  f"{cell(r.get('latent_rel_err'), 9, '.2e')} {cell(r.get('copies_per_call'), 7)} "
                  f"{cell(r.get('late_per_call'), 5)}")
    print()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="flux", choices=[f.name for f in FAMILIES])
    parser.add_argument("--presets", default="", help="PRESETS of the reference; default: the family's native ones")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=VALUE,...",
                        help="one variant (repeat the option for more); none given: the product's defaults")
    parser.add_argument("--config", default="", help="transformer config over the real one: num_layers=4,...")
    parser.add_argument("--text", choices=("tiny", "real"), default="tiny",
                        help="text encoders: tiny, their embeddings widened to the real width; or at real size")
    parser.add_argument("--tiny", action="store_true", help="the family's tiny pipeline as the app builds it")
    parser.add_argument("--recipe", choices=("standard", "distilled"), default="standard",
                        help="RECIPE of the reference and every variant: distilled times both stages' sizes, "
                             "with its latent upsampler at its real size")
    parser.add_argument("--steps", type=int, default=0, help="steps of an image; default: the family's")
    parser.add_argument("--image", type=int, default=0, metavar="REPEATS", help="time whole images, median of REPEATS")
    parser.add_argument("--latent-error", type=int, default=0, metavar="STEPS",
                        help="relative L2 of each variant's final latents after STEPS steps against eager bf16's")
    parser.add_argument("--first-image", action="store_true", help="time one whole image right after optimizing")
    parser.add_argument("--inputs", type=int, default=None, metavar="N",
                        help="an editing family's input images per call, at the largest preset (default: as many as "
                             "it needs)")
    parser.add_argument("--profile", action="store_true", help="GPU time per step by kernel family (profiler)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--cache-dir", default="", help="AOT_CACHE_DIR; default: a fresh temporary directory")
    parser.add_argument("--out", default="", help="also write the JSON here, rewritten after every variant")
    parser.add_argument("--stack-dump", type=float, default=0, help="dump every thread's stack every N s (stderr)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cpu: only where torch sees no GPU (the product uses any GPU it sees)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    faulthandler.register(signal.SIGTERM, chain=True)  # `timeout` shows where a stalled compile was
    if args.stack_dump:
        faulthandler.dump_traceback_later(args.stack_dump, repeat=True)
    if (args.device == "cuda") != torch.cuda.is_available():
        parser.error(f"--device {args.device}, but torch {'sees no' if args.device == 'cuda' else 'sees a'} GPU")
    family = family_named(args.family)
    args.inputs = family.min_images if args.inputs is None else args.inputs
    if not family.min_images <= args.inputs <= family.max_images:
        parser.error(f"--inputs {args.inputs}: {args.family} takes {family.min_images} to {family.max_images}")
    temporary = not args.cache_dir
    args.cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="step-bench-aot-")

    bench = Bench(args)
    for text in args.variant:  # conflicting or unknown settings fail now, not after the reference
        Settings.from_env({**bench.base, **parse_variant(text)[0]}, has_cuda=args.device == "cuda")
    document = dict(bench="step", family=args.family, tiny=args.tiny, text=args.text, config=bench.config,
                    inputs=args.inputs, copy=lib.copy_rate_gb_s(args.device), eager=bench.measure(None), variants=[])
    document.update(presets=[p.name for p in bench.presets], steps=bench.steps, calls_per_step=bench.calls)
    for text in args.variant or [""]:
        release()
        lib.write(document, args.out)
        try:
            result = bench.measure(text)
        except Exception as err:
            log.exception("variant %r failed", text)
            result = dict(variant=text, error=f"{type(err).__name__}: {str(err)[:500]}")
            lib.emit("error", **result)
        result["left_gib"] = release()
        document["variants"].append(result)
    if temporary:
        shutil.rmtree(args.cache_dir, ignore_errors=True)
    faulthandler.cancel_dump_traceback_later()
    print_table(document, bench.steps, bench.calls)
    document["error"] = ", ".join(repr(r["variant"]) for r in document["variants"] if "error" in r) or None
    return lib.finish(document, args.device, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
