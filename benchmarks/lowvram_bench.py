"""GPU benchmark of low-VRAM mode: a FLUX.1-dev-sized pipeline (random weights) under a simulated small card.

It drives the product: `settings.Settings` (LOW_VRAM, QUANTIZATION, VRAM_LIMIT_GIB, ...) and
`optimization.optimize_pipeline_`, which plans the memory, caps the process with
`torch.cuda.set_per_process_memory_fraction`, quantizes, streams and compiles. The pipeline is built once
from configs (flux_bench.py's builders) and kept in host memory; every variant runs on a fresh copy.

A variant is comma-free words joined by ":": `ref` (no low-VRAM mode and no memory cap: the resident bf16
reference), `int8`, `int4`, `none`, `fp8` or `auto` (QUANTIZATION; `auto` also sets LOW_VRAM=auto, so the
product chooses the layout), `stream` (LOW_VRAM=stream, else LOW_VRAM=on),
`aoti` (compile; else eager), `blocks` or `model` (AOT_SCOPE).

For each: median ms of one transformer step (CUDA events), a whole 1024x1024 image with `--steps` steps
(text encoders / transformer / VAE), peak GPU memory while serving and while preparing, the relative L2
error of one step and of the final latents against the eager bf16 reference. One JSON line per variant,
a table, then one JSON line with everything.

  python benchmarks/lowvram_bench.py --vram-limit 24 --variants ref,ref:aoti:blocks,int8:aoti:blocks,int4:stream
  python benchmarks/lowvram_bench.py --tiny --device cpu --variants ref,int8,int4:stream   # smoke test
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import flux_bench  # noqa: F401 - first: it fixes CXX before torch is imported
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import optimization  # noqa: E402
import settings as project_settings  # noqa: E402

GiB = 2**30
log = logging.getLogger("lowvram-bench")


def step_inputs(args, device: str) -> dict:
    """One denoising step's transformer inputs at the preset, the same for every variant."""
    cfg = flux_bench.TINY["transformer"] if args.tiny else flux_bench.FLUX_DEV
    g = torch.Generator(device).manual_seed(0)
    side = args.size // 16
    tokens, text = side * side, 512
    r = lambda *shape: torch.randn(*shape, generator=g, device=device, dtype=args.dtype)  # noqa: E731
    return dict(hidden_states=r(1, tokens, cfg["in_channels"]), encoder_hidden_states=r(1, text, cfg["joint_attention_dim"]),
                pooled_projections=r(1, cfg["pooled_projection_dim"]), timestep=torch.full((1,), 0.5, device=device, dtype=args.dtype),
                guidance=torch.full((1,), 3.5, device=device, dtype=args.dtype),
                img_ids=torch.zeros(tokens, 3, device=device, dtype=args.dtype),
                txt_ids=torch.zeros(text, 3, device=device, dtype=args.dtype), return_dict=False)


def settings_for(words: set[str], args, cache_dir: str) -> project_settings.Settings:
    quant = next((w for w in words if w in ("auto", "none", "fp8", "int8", "int4")), "none")
    env = {"MODEL_ID": "bench/flux-dev-random", "PRESETS": f"square={args.size}x{args.size}", "QUANTIZATION": quant,
           "COMPILE": "aoti" if "aoti" in words else "none", "AOT_CACHE_DIR": cache_dir, "ATTENTION": "sdpa",
           "AOT_SCOPE": "model" if "model" in words else "blocks"}
    if "ref" in words:
        env["LOW_VRAM"] = "off"
    else:
        low_vram = "stream" if "stream" in words else "auto" if "auto" in words else "on"
        env.update(LOW_VRAM=low_vram, VRAM_LIMIT_GIB=str(args.vram_limit))
    return project_settings.Settings.from_env(env, has_cuda=args.device == "cuda")


def measure(spec: str, master, args, cache_dir: str, reference: dict) -> dict:
    device = args.device
    words = set(spec.split(":"))
    settings = settings_for(words, args, cache_dir)
    t0 = time.perf_counter()
    pipe = copy.deepcopy(master)
    copy_s = time.perf_counter() - t0
    if device == "cuda":
        torch.cuda.set_per_process_memory_fraction(1.0)  # the reference runs uncapped; the plan caps the others
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    report = optimization.optimize_pipeline_(pipe, settings, 512)
    result = dict(variant=spec, prepare_s=round(time.perf_counter() - t0, 1), copy_s=round(copy_s, 1),
                  quantization=report.quantization, compile=report.compile, scope=report.compile_scope,
                  memory=report.memory, fallbacks=report.fallbacks)
    if device == "cuda":
        result["peak_prepare_gib"] = round(torch.cuda.max_memory_allocated() / GiB, 2)
        torch.cuda.reset_peak_memory_stats()
    ms, out = flux_bench.time_step(pipe.transformer, (), step_inputs(args, device), device, args.warmup, args.iters)
    result["ms_per_step"] = round(ms, 1)
    out = out.float().cpu()
    preset = settings.presets[0]
    latents = flux_bench.final_latents(pipe, preset, args.steps, 512).cpu()
    if "step" not in reference:  # the first variant is the eager bf16 reference
        reference.update(step=out, latents=latents, spec=spec)
    result["step_rel_err"] = float((out - reference["step"]).norm() / reference["step"].norm())
    result["latent_rel_err"] = float((latents - reference["latents"]).norm() / reference["latents"].norm())
    result["image"] = flux_bench.time_pipeline(pipe, preset, args.steps, 512, device, 1)
    if device == "cuda":
        result["peak_serving_gib"] = round(torch.cuda.max_memory_allocated() / GiB, 2)
    del pipe, report, out
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        result["left_allocated_gib"] = round(torch.cuda.memory_allocated() / GiB, 2)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="ref,ref:aoti:blocks,int8:aoti:blocks,int4:aoti:blocks,int8:stream")
    parser.add_argument("--vram-limit", type=float, default=24.0, help="GiB the simulated card has")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the laptop-sized model: a smoke test of this script")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--blocks", type=int, nargs=2, default=None, metavar=("DOUBLE", "SINGLE"),
                        help="fewer transformer blocks (and 2 T5 layers): a quick check of the code paths on a GPU")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args.dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    # flux_bench's builder arguments
    builder = argparse.Namespace(tiny=args.tiny, blocks=args.blocks, clip_layers=None, t5_layers=2 if args.blocks else None)
    t0 = time.perf_counter()
    master, params = flux_bench.build_pipeline(builder, args.device, args.dtype)
    master.to("cpu")  # the "checkpoint": in host memory, as from_pretrained leaves it
    if args.device == "cuda":
        torch.cuda.empty_cache()
    log.info("pipeline built and moved to host memory in %.1f s", time.perf_counter() - t0)
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="lowvram-aot-")
    env = dict(date=time.strftime("%Y-%m-%d"), torch=torch.__version__, params_b=params,
               gpu=torch.cuda.get_device_name() if args.device == "cuda" else "cpu", vram_limit_gib=args.vram_limit)
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
    print(f"\n{'variant':<22} {'ms/step':>8} {'s/image':>8} {'serve GiB':>9} {'prep GiB':>8} {'step err':>9} "
          f"{'latent err':>10} {'prep s':>7}")
    for r in results:
        if "error" in r:
            print(f"{r['variant']:<22} ERROR {r['error'][:100]}")
            continue
        print(f"{r['variant']:<22} {r['ms_per_step']:>8} {r['image']['total']:>8} {r.get('peak_serving_gib', '-'):>9} "
              f"{r.get('peak_prepare_gib', '-'):>8} {r['step_rel_err']:>9.2e} {r['latent_rel_err']:>10.2e} {r['prepare_s']:>7}")
    print(json.dumps(dict(env=env, results=results)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
