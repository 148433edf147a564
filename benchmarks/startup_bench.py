"""Where start-up time goes, on the GPU: a FLUX.1-dev-sized transformer (random weights, lib.real_pipeline) through
the product's `optimize_pipeline_`, cold and warm, each phase in a fresh process, as a restarted Space would be.

Phases (each a new Python process; the cache directories carry over between them, nothing else):
  blocks-cold   AOT_SCOPE=blocks, the three FLUX presets, empty cache: compile (the cold-start target)
  blocks-warm   the same settings again: load from the cache (the warm-start target)
  model-cold    AOT_SCOPE=model, square preset only, another empty cache
  model-warm    the same again
  blocks-warm-probe  blocks-warm with Inductor's ISA probe left on (as before `trust_host_isa_`), to measure it
  blocks-warm-nographs  blocks-warm with CUDA_GRAPHS=off: what the graphs cost in start-up time and memory
  blocks-newkey AOT_SCOPE=blocks with one more preset, in blocks-cold's cache: one new key, whose kernels can
                come from the Inductor/Triton cache kept beside the programs

Each phase reports the product's start-up breakdown (`report.startup`), the seconds from process start to
"ready", every external command the process waited for (compilers, mostly) with its total time, ms/step at
1024x1024 (CUDA events, median) and, in the cold phases, eager bf16 ms/step and the relative error of one
step in the same process. `--profile` adds, per step, the GPU's kernel time against the wall time and the
host-device synchronisations: the split between what the GPU computes and the gaps between its kernels.

    CXX=/usr/bin/g++ python benchmarks/startup_bench.py --out /tmp/startup --budget 540

Prints a table, then one JSON document on its last line.
"""
from __future__ import annotations

import time

PROCESS_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

import lib  # noqa: E402 - before torch: it corrects CXX, and puts the project on sys.path

PHASES = {  # name: (scope, presets, cache, eager reference)
    "blocks-cold": ("blocks", "square=1024x1024,portrait=832x1216,landscape=1216x832", "blocks", True),
    "blocks-warm": ("blocks", "square=1024x1024,portrait=832x1216,landscape=1216x832", "blocks", False),
    "model-cold": ("model", "square=1024x1024", "model", True),
    "model-warm": ("model", "square=1024x1024", "model", False),
    "blocks-warm-probe": ("blocks", "square=1024x1024,portrait=832x1216,landscape=1216x832", "blocks", False),
    "blocks-newkey": ("blocks", "square=1024x1024,portrait=832x1216,landscape=1216x832,wide=1344x768", "blocks",
                      False),
    "blocks-warm-nographs": ("blocks", "square=1024x1024,portrait=832x1216,landscape=1216x832", "blocks", False),
}
ESTIMATE_S = {"blocks-cold": 120, "blocks-warm": 45, "model-cold": 300, "model-warm": 45, "blocks-warm-probe": 70,
              "blocks-newkey": 90, "blocks-warm-nographs": 45}

WAITED: dict[str, list[float]] = defaultdict(list)  # external command -> seconds of each run


def record_external_commands() -> None:
    """Times every child process that is waited for through a `with Popen(...)` block (subprocess.run, call,
    check_call and check_output all use one): the compilers Inductor and Triton start, mostly."""
    enter, exit_ = subprocess.Popen.__enter__, subprocess.Popen.__exit__

    def __enter__(self):
        self._started = time.perf_counter()
        return enter(self)

    def __exit__(self, *exc):
        try:
            return exit_(self, *exc)
        finally:
            name = Path(str(self.args[0] if isinstance(self.args, (list, tuple)) else self.args).split()[0]).name
            WAITED[name].append(time.perf_counter() - getattr(self, "_started", time.perf_counter()))

    subprocess.Popen.__enter__, subprocess.Popen.__exit__ = __enter__, __exit__


def step_profile(transformer, args, kwargs) -> dict:
    """GPU kernel time and wall time of 3 steps, and the synchronising runtime calls among them."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(3):
            transformer(*args, **kwargs)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    kernel_us = sum(e.device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA")
    syncs = {e.key: e.count for e in prof.key_averages()
             if "Synchronize" in e.key or e.key.startswith("cudaMemcpy") or e.key.startswith("cudaMalloc")}
    launches = sum(e.count for e in prof.key_averages() if e.key in ("cuLaunchKernel", "cudaLaunchKernel",
                                                                      "cuLaunchKernelEx", "cudaLaunchKernelExC"))
    return {"wall_ms_per_step": round(wall * 1000 / 3, 1), "gpu_kernel_ms_per_step": round(kernel_us / 1000 / 3, 1),
            "launches_per_step": launches // 3, "sync_and_copy_calls_3_steps": syncs}


def phase(name: str, workdir: Path, profile_steps: bool, smoke: bool) -> dict:
    record_external_commands()
    import torch

    import optimization
    from aot.families import family_named
    from aot.model import load_model
    from aot.programs import capture_inputs
    from settings import Settings

    imported = time.perf_counter() - PROCESS_START
    scope, presets, cache, eager = PHASES[name]
    family = family_named("flux")
    if name.endswith("-probe"):
        optimization.trust_host_isa_ = lambda: None
    device = "cpu" if smoke else "cuda"  # smoke: the plumbing on a CPU, the tiny transformer at tiny sizes
    if smoke:
        presets = ",".join(f"{family.tiny_presets},wide=96x48".split(",")[: len(presets.split(","))])
    pipe, _ = lib.real_pipeline(family, device, tiny=smoke, dtype=torch.float32 if smoke else torch.bfloat16)
    transformer = pipe.transformer
    settings = Settings.from_env({"MODEL_ID": "tiny-flux", "COMPILE": "aoti", "AOT_SCOPE": scope, "PRESETS": presets,
                                  "AOT_CACHE_DIR": str(workdir / cache),
                                  "CUDA_GRAPHS": "off" if name.endswith("-nographs") else "auto"}, has_cuda=not smoke)
    model = load_model(settings, pipe)
    inputs = {preset.name: capture_inputs(model, transformer, preset) for preset in model.presets}
    args, kwargs = inputs[model.presets[0].name]
    result = {"phase": name, "scope": scope, "presets": presets, "imports_s": round(imported, 1)}
    if eager:
        ms, eager_out = lib.median_ms(lambda: transformer(*args, **kwargs), device, iters=20)
        result["eager_ms"], eager_out = round(ms, 1), lib.sample(eager_out).clone()
    built = time.perf_counter()
    result["build_s"] = round(built - PROCESS_START - imported, 1)
    report = optimization.optimize_pipeline_(model, settings)
    result.update(ready_s_from_process_start=round(time.perf_counter() - PROCESS_START, 1),
                  optimize_s=round(time.perf_counter() - built, 1), compile_seconds=report.compile_seconds,
                  compile_source=report.compile_source, startup=report.startup, fallbacks=report.fallbacks,
                  quantization=report.quantization, attention=report.attention, cuda_graphs=report.cuda_graphs,
                  graphs=report.graphs)
    # each preset's first call after start-up: what its first request adds (loading its programs' kernels; a warm
    # start also captures and compares its graph there)
    result["first_call_s"] = {name: round(lib.seconds(lambda a=a, k=k: transformer(*a, **k), device), 2)
                              for name, (a, k) in inputs.items()}
    ms, out = lib.median_ms(lambda: transformer(*args, **kwargs), device, iters=20)
    result["compiled_ms"] = round(ms, 1)
    if eager:
        result["rel_err_vs_eager"] = float(f"{lib.rel_err(lib.sample(out), eager_out):.2e}")
        result["speedup"] = round(result["eager_ms"] / result["compiled_ms"], 2)
    if profile_steps:
        result["profile"] = step_profile(transformer, args, kwargs)
    result["peak_gib"] = lib.peak_gib()
    result["reserved_gib"] = round(torch.cuda.memory_reserved() / 2**30, 2) if not smoke else 0.0
    result["external_commands"] = {cmd: {"count": len(s), "seconds": round(sum(s), 1)} for cmd, s in WAITED.items()}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phase", help="run one phase in this process (the driver starts one process per phase)")
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--workdir", default="/tmp/aot-startup")
    parser.add_argument("--out", default="", help="directory for the logs and the JSON")
    parser.add_argument("--budget", type=float, default=540, help="seconds; a phase that would not fit is skipped")
    parser.add_argument("--profile", action="store_true", help="profile steps (cold and warm phases of each scope)")
    parser.add_argument("--smoke", action="store_true", help="the plumbing only, on a CPU, with the tiny model")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.phase:
        print("PHASE " + json.dumps(phase(args.phase, Path(args.workdir), args.profile, args.smoke)), flush=True)
        return 0
    out = Path(args.out or args.workdir)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.phases.split(","):
        left = args.budget - (time.perf_counter() - PROCESS_START)
        if left < ESTIMATE_S[name]:
            results.append({"phase": name, "skipped": f"{left:.0f} s left, about {ESTIMATE_S[name]} s needed"})
            continue
        command = [sys.executable, __file__, "--phase", name, "--workdir", args.workdir]
        if args.profile and not name.endswith(("newkey", "probe")):
            command.append("--profile")
        if args.smoke:
            command.append("--smoke")
        with open(out / f"{name}.log", "w") as log_file:
            try:
                done = subprocess.run(command, stdout=subprocess.PIPE, stderr=log_file, text=True, timeout=left - 5)
                lines = [line for line in done.stdout.splitlines() if line.startswith("PHASE ")]
                results.append(json.loads(lines[-1][6:]) if lines else {"phase": name,
                                                                         "error": f"exit {done.returncode}"})
            except subprocess.TimeoutExpired:
                results.append({"phase": name, "error": "timed out"})
        (out / "startup.json").write_text(json.dumps(results, indent=1))
    print(f"{'phase':14} {'source':18} {'optimize s':>10} {'ready s':>8} {'eager ms':>8} {'AoT ms':>7} {'err':>8}")
    for r in results:
        if "phase" in r and ("skipped" in r or "error" in r):
            print(f"{r['phase']:14} {r.get('skipped') or r.get('error')}")
            continue
        print(f"{r['phase']:14} {r['compile_source'][:18]:18} {r['optimize_s']:>10} "
              f"{r['ready_s_from_process_start']:>8} {r.get('eager_ms', '-'):>8} {r['compiled_ms']:>7} "
              f"{r.get('rel_err_vs_eager', '-'):>8}")
    return lib.finish({"bench": "startup", "results": results}, "cpu" if args.smoke else "cuda")


if __name__ == "__main__":
    raise SystemExit(main())
