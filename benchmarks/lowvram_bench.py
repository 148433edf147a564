"""GPU benchmark of low-VRAM mode: a FLUX.1-dev-sized pipeline (random weights) under a simulated small card.

It drives the product: `settings.Settings` (LOW_VRAM, QUANTIZATION, VRAM_LIMIT_GIB, ...), `aot.model.load_model`
and `optimization.optimize_pipeline_`, which plans the memory, caps the process with
`torch.cuda.set_per_process_memory_fraction`, quantizes, streams and compiles. The pipeline is built once
(flux_bench.py's `build_pipeline`) and kept in host memory; every variant runs on a fresh copy.

A variant is comma-free words joined by ":": `ref` (no low-VRAM mode and no memory cap: the resident bf16
reference), `int8`, `int4`, `none`, `fp8` or `auto` (QUANTIZATION; `auto` also sets LOW_VRAM=auto, so the
product chooses the layout and the weight format), `stream` (LOW_VRAM=stream: every block streamed; else
LOW_VRAM=on: the planner streams the fewest blocks that fit, often none), `aoti` (compile; else eager), `blocks` or
`model` (AOT_SCOPE; streamed blocks always compile regionally), `NNgib` (this variant's VRAM_LIMIT_GIB, in place of
--vram-limit). Streamed blocks go through a ring of device buffers (aot/streaming.py), compiled or eager.

For each: the layout the plan chose (weight format, blocks resident / streamed), median ms of one transformer step
(CUDA events), a whole image with `--steps` steps (text encoders / transformer / VAE), the blocks copied in per
step and how many of those were late (made when the block was called, not one block ahead), peak GPU memory while
serving and while preparing, the relative L2 error of one step and of the final latents against the first variant
(the eager bf16 reference: put `ref` first). The step's inputs are the transformer's real call, recorded once by the
product's `capture_inputs` in the first variant and reused by every other. ENV gives the pinned host-to-GPU copy
rate measured here (the planner assumes 54 GB/s, aot/memory.py). One RESULT line per variant, a table, then one JSON
document on the last line.

AoT variants leave their weights allocated after their pipeline is deleted (RESULTS.md run 7), and that counts
against the next variant's cap: run one capped AoT variant per process, right after `ref`.

  python benchmarks/lowvram_bench.py --vram-limit 10 --variants ref,auto:aoti   # fp8, most blocks streamed, compiled
  python benchmarks/lowvram_bench.py --vram-limit 24 --variants ref,none:aoti:blocks   # bf16, a few blocks streamed
  python benchmarks/lowvram_bench.py --vram-limit 24 --variants ref,int8,int4:stream,none:stream   # eager layouts
  python benchmarks/lowvram_bench.py --tiny --device cpu --variants ref,int8,int4:stream   # smoke test
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import tempfile
import time

import flux_bench  # first: it fixes CXX before torch is imported, and puts the project on sys.path
import torch
from torch.utils._pytree import tree_map

import optimization
from aot.model import load_model
from aot.programs import capture_inputs
from settings import Settings

GiB = 2**30
log = logging.getLogger("lowvram-bench")


def settings_for(words: set[str], args, cache_dir: str) -> Settings:
    quant = next((w for w in words if w in ("auto", "none", "fp8", "int8", "int4")), "none")
    limit = next((w.removesuffix("gib") for w in words if w.endswith("gib")), str(args.vram_limit))
    env = {"MODEL_ID": flux_bench.MODEL_ID, "PRESETS": f"square={args.size}x{args.size}", "QUANTIZATION": quant,
           "COMPILE": "aoti" if "aoti" in words else "none", "AOT_CACHE_DIR": cache_dir, "ATTENTION": "sdpa",
           "AOT_SCOPE": "model" if "model" in words else "blocks"}
    if "ref" in words:
        env["LOW_VRAM"] = "off"
    else:
        low_vram = "stream" if "stream" in words else "auto" if "auto" in words else "on"
        env.update(LOW_VRAM=low_vram, VRAM_LIMIT_GIB=limit)
    return Settings.from_env(env, has_cuda=args.device == "cuda")


def to(device: str, tree):
    return tree_map(lambda v: v.to(device) if isinstance(v, torch.Tensor) else v, tree)


def measure(spec: str, master, args, cache_dir: str, reference: dict) -> dict:
    device = args.device
    settings = settings_for(set(spec.split(":")), args, cache_dir)
    t0 = time.perf_counter()
    model = load_model(settings, copy.deepcopy(master))
    copy_s = time.perf_counter() - t0
    if device == "cuda":
        torch.cuda.set_per_process_memory_fraction(1.0)  # the reference runs uncapped; the plan caps the others
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    report = optimization.optimize_pipeline_(model, settings)
    result = dict(variant=spec, prepare_s=round(time.perf_counter() - t0, 1), copy_s=round(copy_s, 1),
                  quantization=report.quantization, compile=report.compile, scope=report.compile_scope,
                  compile_s=report.compile_seconds, memory=report.memory, fallbacks=report.fallbacks)
    if device == "cuda":
        result["peak_prepare_gib"] = round(torch.cuda.max_memory_allocated() / GiB, 2)
        torch.cuda.reset_peak_memory_stats()
    preset = model.presets[0]
    if "inputs" not in reference:  # recorded once, on the host, so every variant steps on the same inputs
        reference["inputs"] = to("cpu", capture_inputs(model, model.pipe.transformer, preset))
    step_args, step_kwargs = to(device, reference["inputs"])
    ms, out = flux_bench.time_step(model.pipe.transformer, step_args, step_kwargs, device, args.warmup, args.iters)
    result["ms_per_step"] = round(ms, 1)
    out = out.float().cpu()
    stream = getattr(model.pipe.transformer, "block_stream", None)  # aot/streaming.py, when blocks stream
    if stream:
        stream.loads = stream.late_loads = 0
    latents = flux_bench.final_latents(model, preset, args.steps).cpu()
    if stream:
        result["copies_per_step"] = round(stream.loads / args.steps, 1)
        result["late_per_step"] = round(stream.late_loads / args.steps, 1)
    if "step" not in reference:  # the first variant is the eager bf16 reference
        reference.update(step=out, latents=latents, spec=spec)
    result["step_rel_err"] = float((out - reference["step"]).norm() / reference["step"].norm())
    result["latent_rel_err"] = float((latents - reference["latents"]).norm() / reference["latents"].norm())
    result["image"] = flux_bench.time_pipeline(model, preset, args.steps, device, 1)
    if device == "cuda":
        result["peak_serving_gib"] = round(torch.cuda.max_memory_allocated() / GiB, 2)
    del model, report, out, step_args, step_kwargs
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        result["left_allocated_gib"] = round(torch.cuda.memory_allocated() / GiB, 2)
    return result


def copy_rate_gb_s(device: str) -> float | None:
    """Pinned host-to-GPU copy rate, GB/s: what a streamed step's copies run at (median of 5 copies of 1 GiB)."""
    if device != "cuda":
        return None
    host = torch.empty(GiB, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(GiB, dtype=torch.uint8, device="cuda")
    spans = []
    for _ in range(5):
        span = flux_bench.Span(device).start()
        target.copy_(host, non_blocking=True)
        spans.append(span.stop())
        torch.cuda.synchronize()
    del host, target
    return round(GiB / 1e6 / sorted(s.ms() for s in spans)[2], 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="ref,ref:aoti:blocks,int8:aoti:blocks,int4:aoti:blocks,int8:stream")
    parser.add_argument("--vram-limit", type=float, default=24.0, help="GiB the simulated card has")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="FLUX's tiny models: a smoke test of this script")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--blocks", type=int, nargs=2, default=None, metavar=("DOUBLE", "SINGLE"),
                        help="fewer transformer blocks (and 2 T5 layers): a quick check of the code paths on a GPU")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    t0 = time.perf_counter()
    master, params = flux_bench.build_pipeline(args.device, dtype, tiny=args.tiny, blocks=args.blocks or (),
                                               t5_layers=2 if args.blocks else 0)
    master.to("cpu")  # the "checkpoint": in host memory, as from_pretrained leaves it
    if args.device == "cuda":
        torch.cuda.empty_cache()
    log.info("pipeline built and moved to host memory in %.1f s", time.perf_counter() - t0)
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="lowvram-aot-")
    env = dict(date=time.strftime("%Y-%m-%d"), torch=torch.__version__, params_b=params,
               gpu=torch.cuda.get_device_name() if args.device == "cuda" else "cpu", vram_limit_gib=args.vram_limit,
               copy_gb_s=copy_rate_gb_s(args.device))
    print("ENV " + json.dumps(env), flush=True)
    reference: dict = {}
    results = []
    for spec in args.variants.split(","):
        try:
            result = measure(spec, master, args, cache_dir, reference)
        except Exception as err:  # noqa: BLE001 - record and go on with the other variants
            log.exception("variant %s failed", spec)
            result = dict(variant=spec, error=f"{type(err).__name__}: {str(err)[:400]}")
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
        results.append(result)
        print("RESULT " + json.dumps(result), flush=True)
    print(f"\n{'variant':<24} {'layout':<22} {'ms/step':>8} {'s/image':>8} {'copies':>7} {'late':>5} {'serve GiB':>9} "
          f"{'prep GiB':>8} {'step err':>9} {'latent err':>10} {'prep s':>7}")
    for r in results:
        if "error" in r:
            print(f"{r['variant']:<24} ERROR {r['error'][:100]}")
            continue
        memory = r["memory"]
        layout = (f"{r['quantization']} {memory['blocks'] - memory['streamed_blocks']}+{memory['streamed_blocks']}s"
                  if memory["low_vram"] else "resident")
        print(f"{r['variant']:<24} {layout:<22} {r['ms_per_step']:>8} {r['image']['total']:>8} "
              f"{r.get('copies_per_step', 0):>7} {r.get('late_per_step', 0):>5} {r.get('peak_serving_gib', '-'):>9} "
              f"{r.get('peak_prepare_gib', '-'):>8} {r['step_rel_err']:>9.2e} {r['latent_rel_err']:>10.2e} {r['prepare_s']:>7}")
    print(json.dumps(dict(env=env, results=results)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
