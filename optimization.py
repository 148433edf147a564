"""Ahead-of-time compilation of a diffusion pipeline's transformer: one program per preset shape, one copy of
the weights, for every model family in `aot/families/`.

`optimize_pipeline_(model, settings)` is the whole recipe, one step after another:
  1. choose compilation, then plan the GPU memory: the whole pipeline on the GPU, or (low-VRAM mode) the
     transformer quantized to fit and the text encoders, and if need be its blocks, streamed from host memory;
  2. choose the attention backend and the quantization from the hardware, and quantize in place (a transformer
     stored quantized, a pre-quantized checkpoint, is served as stored);
  3. for each preset shape, record the transformer's real inputs with `spaces.aoti_capture`, `torch.export`
     it and compile it with AOTInductor, inside `@spaces.GPU(duration=1500)`: either the whole transformer or,
     regionally, one program per repeated block class;
  4. install the packages with `spaces.aoti_load_from_package_dir` (the programs read the modules' own
     parameters; each block gets its own instance) behind a dispatcher that picks each call's program from its
     input shapes;
  5. with STEP_CACHE, put diffusers' cache hooks around the installed block programs (aot/step_cache.py).
Every choice that falls back is logged once and listed in the report (the UI's status panel and /status).
Programs are cached under a key of everything that makes them valid: a restart with the same key loads them.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path

import spaces
import torch

from aot import parallel, step_cache
from aot.cache import (cache_key, compile_into_cache, entry_files, fetch_from_hub, key_digest, read_cached,
                       upload_to_hub)
from aot.decisions import choose_attention, choose_compile, choose_quantization
from aot.families import Text
from aot.memory import MemoryPlan, place_pipeline_, plan_memory
from aot.model import Model, load_model
from aot.programs import (CAPTURE_PROMPT, UnsupportedShape, compile_program, install_programs_, own_tensors_,
                          release_export_memory, restore_eager_, trust_host_isa_)
from aot.quantize import Stored, dequantize_, quantize_, stored_decision, stored_quantization
from aot.report import Decision, Report
from settings import Preset, Settings

__all__ = ["INDUCTOR_CONFIGS", "UnsupportedShape", "optimize_pipeline_"]
log = logging.getLogger("aot-space")

# Why each option: 1x1 convs as matmuls and no epilogue fusion follow the zerogpu-aoti recipe. Coordinate-
# descent tuning is forced off: it benchmarks every Triton kernel at compile time (~3 s each), which made
# fp8 compiles look stalled (benchmarks/RESULTS.md), and torchao's quantize_ turns it on globally otherwise.
INDUCTOR_CONFIGS = {
    "conv_1x1_as_mm": True,
    "epilogue_fusion": False,
    "coordinate_descent_tuning": False,
    "coordinate_descent_check_all_directions": False,
}


def optimize_pipeline_(model: Model, settings: Settings, ranks: parallel.Ranks | None = None) -> Report:
    """Makes `model.pipe.transformer` fast in place. Returns what was done and what fell back, and why.
    With `ranks` (several ranks, aot/parallel.py) it is split across them by context parallelism, eagerly."""
    pipe, family = model.pipe, model.family
    transformer = pipe.transformer
    device = "cuda" if torch.cuda.is_available() else "cpu"
    capability = torch.cuda.get_device_capability() if device == "cuda" else None
    report = Report(device=f"cuda: {torch.cuda.get_device_name()}, sm_{capability[0]}{capability[1]}" if capability else device,
                    dtype=str(transformer.dtype).removeprefix("torch."), family=family.name)
    if settings.dynamic_shapes and family.dynamic_spec is None:
        raise ValueError(f"DYNAMIC_SHAPES=1 is not supported for the {family.name} family; unset it")

    # A pre-quantized checkpoint's weights are served as stored: checked against QUANTIZATION first, planned for as
    # loaded ("none": nothing to quantize), never quantized again.
    stored = stored_quantization(transformer)
    if stored:
        report.decide("quantization", stored_decision(stored, settings.quantization, device, capability))

    # 1. Compilation, and the memory layout (which depends on it: fp8 only pays when compiled).
    compiled = report.decide("compile", parallel.EAGER if ranks else choose_compile(settings.compile, device)) == "aoti"
    plan = plan_memory(pipe, settings.low_vram, "none" if stored else settings.quantization, settings.vram_limit_gib,
                       model.max_image_tokens, device, capability, compiled, report, family.keep_bf16)
    report.startup["model_load_s"] = model.load_seconds
    with _timed(report, "place_s"):
        place_pipeline_(pipe, plan, device, family.keep_bf16)

    # 2. Attention and quantization, before compiling, so every program reads the quantized weights.
    hub_online = os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes")
    if report.decide("attention", choose_attention(settings.attention, device, capability, hub_online)) != "sdpa":
        try:
            transformer.set_attention_backend(report.attention)
        except Exception as err:  # noqa: BLE001 - a missing kernel or package: any failure means "use SDPA"
            _use_sdpa(transformer, report, f"{report.attention} unavailable ({type(err).__name__}: {err})")
    if stored:
        pass  # decided above, before planning: nothing to quantize
    elif plan.low_vram:  # already quantized while placing
        report.decide("quantization", Decision(plan.quantization, "low-VRAM mode"))
    else:
        choose = parallel.choose_quantization if ranks else choose_quantization
        report.decide("quantization", choose(settings.quantization, device, capability))
        try:
            with _timed(report, "quantize_s"):
                quantize_(transformer, report.quantization, keep_bf16=family.keep_bf16)
        except Exception as err:  # noqa: BLE001 - serve unquantized rather than not at all, and say so
            report.fallback("quantization", f"{report.quantization} failed ({type(err).__name__}: {err}); unquantized")
            report.quantization = "none"
    report.text = _text_handling(model)
    report.decide("step_cache", step_cache.choose(settings.step_cache, model))

    # 3-4. Compile or load, install, warm up; 5. the step cache around what runs.
    if report.compile == "none":
        if report.attention != "sdpa":  # a backend can install fine and still fail to run on this device
            try:
                warm_up(model, [min(model.presets, key=lambda p: p.width * p.height)])
            except Exception as err:  # noqa: BLE001 - any failure of the chosen kernel means "use SDPA"
                _use_sdpa(transformer, report, f"{report.attention} failed a test run ({type(err).__name__}: {err})")
        if ranks:
            ranks.enable_(model, report)
        if stored:
            _eager_fp8(model, report, plan.low_vram, stored)
    else:
        _compile_or_serve_eager(model, settings, report, plan, device, stored)
    step_cache.enable_(transformer, report)
    return report


def _compile_or_serve_eager(model: Model, settings: Settings, report: Report, plan: MemoryPlan, device: str,
                            stored: Stored | None) -> None:
    """Steps 3-4 when compiling: every program compiled or loaded and installed, or, if that fails, eager with
    the reason reported."""
    transformer = model.pipe.transformer
    own_tensors_(transformer)
    if device == "cuda":
        trust_host_isa_()
    # Inductor's own cache beside the programs: kernels built for one key are reused by the next (another preset,
    # a bumped option), about 40% of a compile (benchmarks/RESULTS.md run 13)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(settings.cache_dir) / "inductor"))
    report.compile_scope = settings.aot_scope
    needs_blocks = [  # what a whole-model program cannot do; the first that applies is reported
        (model.family.regional_only, f"regional programs for {model.family.name}: {model.family.regional_only}"),
        (plan.stream, ("regional programs for streamed blocks: their weights are copied in before each block's "
                       "call (aot/streaming.py), which a whole-model program never makes")),
        (report.step_cache != "off", (f"regional programs for STEP_CACHE={report.step_cache}: it skips blocks, and "
                                      "a whole-model program has none")),
    ]
    why = next((why for needed, why in needs_blocks if needed), None)
    if why and report.compile_scope == "model":
        report.compile_scope = "blocks"
        report.fallback("compile scope", why)
    start = time.perf_counter()
    while True:
        try:
            compile_or_load_(model, settings, report)
            break
        except Exception as err:  # noqa: BLE001 - the app must keep serving, and say why
            log.info("AoT compile or load failed; the full error:", exc_info=err)
            restore_eager_(transformer)
            reason = str(err) if isinstance(err, CompileFailed) else f"{type(err).__name__}: {err}"
            if report.attention != "sdpa":  # e.g. a hub kernel that torch.export cannot trace: retry once
                _use_sdpa(transformer, report, f"AoT compile with {report.attention} failed ({reason})")
                continue
            report.fallback("compile", f"AoT compilation failed, serving eager ({reason})")
            report.compile, report.compile_source = "none", ""
            _eager_fp8(model, report, plan.low_vram, stored)
            return
    report.compile_seconds = round(time.perf_counter() - start, 1)
    log.info("AoT %s: %s in %.1f s (cache keys %s), programs: %s; start-up: %s", report.compile_scope,
             report.compile_source, report.compile_seconds, report.cache_keys, report.programs, report.startup)


@contextlib.contextmanager
def _timed(report: Report, what: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        report.startup[what] = round(time.perf_counter() - start, 2)


class CompileFailed(RuntimeError):
    """A compile that failed in the GPU worker, with the original error's type and message as its text."""


def _text_handling(model: Model) -> str:
    length = model.defaults.max_sequence_length
    return {Text.FIXED: f"fixed: the pipeline pads prompts to {length} tokens",
            Text.DYNAMIC: f"dynamic axis up to {length} tokens: one program serves every prompt"}[model.family.text]


def _use_sdpa(transformer: torch.nn.Module, report: Report, reason: str) -> None:
    report.fallback("attention", f"{reason}; using sdpa")
    transformer.set_attention_backend("native")
    report.attention = "sdpa"


def _eager_fp8(model: Model, report: Report, low_vram: bool, stored: Stored | None) -> None:
    """fp8 weights that no program runs: unfused eager fp8 is about 3x slower than bf16 (RESULTS.md), so they are
    undone where there are bf16 weights to go back to and room for them, else kept and said so."""
    if (stored.mode if stored else report.quantization) != "fp8":
        return
    if stored or low_vram:
        why = "the checkpoint stores no bf16 weights" if stored else "bf16 weights would not fit"
        report.fallback("quantization", f"fp8 kept without compilation (about 3x slower than bf16): {why}")
    else:
        dequantize_(model.pipe.transformer)
        report.fallback("quantization", "fp8 undone: without compilation it is slower than bf16")
        report.quantization = "none"


def program_groups(model: Model, scope: str, dynamic: bool) -> dict[int | tuple, list[Preset]]:
    """The programs to build and the presets each serves: presets with the same program shape share one;
    with DYNAMIC_SHAPES, or a family whose block programs take any size, one program (keyed by the largest
    preset, which it is traced at) serves them all."""
    family = model.family
    if dynamic or (family.one_program and scope == "blocks"):
        largest = max(model.presets, key=lambda p: family.image_tokens(p.width, p.height))
        return {family.image_tokens(largest.width, largest.height): [largest, *(p for p in model.presets if p != largest)]}
    groups: dict[int | tuple, list[Preset]] = {}
    for preset in model.presets:
        groups.setdefault(family.program_shape(preset.width, preset.height, scope), []).append(preset)
    return dict(sorted(groups.items()))


def token_range(model: Model) -> tuple[int, int]:
    """Image-token lengths a dynamic-shape program accepts: from the smallest preset to twice the largest."""
    tokens = [model.family.image_tokens(p.width, p.height) for p in model.presets]
    return max(2, min(tokens)), 2 * max(tokens)


def compile_or_load_(model: Model, settings: Settings, report: Report) -> None:
    """Installs one program per preset shape (or one dynamic-shape program for all): each from its own cache
    entry (or a pinned Hub repo) if its key matches, else compiled now, on the GPU, into the cache.
    Adding a preset compiles only the new program."""
    served = token_range(model) if settings.dynamic_shapes else None
    groups = program_groups(model, report.compile_scope, settings.dynamic_shapes)
    entries = {}  # program shape -> (key, entry directory)
    for shape in groups:
        key = cache_key(model.pipe, model.family.name, settings.model_id, settings.revision, report,
                        report.compile_scope, list(served) if served else shape, settings.dynamic_shapes,
                        report.text, INDUCTOR_CONFIGS)
        entries[shape] = (key, Path(settings.cache_dir) / key_digest(key))
    report.cache_keys = [root.name for _, root in entries.values()]
    labels = {shape: ", ".join(p.name for p in presets) for shape, presets in groups.items()}
    absent = [shape for shape, (_, root) in entries.items() if not root.exists()]
    if settings.hub_repo and absent:
        with _timed(report, "download_s"):
            fetch_from_hub(settings.hub_repo, [entries[shape][1].name for shape in absent], Path(settings.cache_dir),
                           report)
    manifests, startup = {}, {}
    for shape, (key, root) in entries.items():
        start = time.perf_counter()
        manifests[shape] = read_cached(root, key)
        source = "downloaded" if shape in absent else "cached"
        startup[shape] = {"cache_key": root.name, "resolutions": labels[shape], "source": source,
                          "verify_s": round(time.perf_counter() - start, 2)}
    missing = [shape for shape, manifest in manifests.items() if manifest is None]
    if missing:
        # Only picklable values cross into the ZeroGPU worker; the pipeline is reached through the closure.
        # Only picklable values come back too: on ZeroGPU an exception would reach this process as its class name
        # alone, so a failure comes back as its message, raised here.
        @spaces.GPU(duration=1500)
        def compile_on_gpu(missing: list) -> dict:
            seconds = {}
            for shape in missing:
                key, root = entries[shape]
                preset = groups[shape][0]
                start = time.perf_counter()
                try:
                    compile_into_cache(lambda out, preset=preset: _compile(model, report.compile_scope, preset, served,
                                                                           out), root, key)
                except Exception as err:  # noqa: BLE001 - reported by the caller, which serves eager
                    log.info("compiling %s failed; the full error:", preset.name, exc_info=err)
                    return {"error": f"{type(err).__name__}: {err}"}
                seconds[shape] = round(time.perf_counter() - start, 1)
            return seconds

        compiled = compile_on_gpu(missing)
        if "error" in compiled:
            raise CompileFailed(compiled["error"])
        for shape, seconds in compiled.items():
            startup[shape].update(source="compiled", compile_s=seconds)
        manifests.update({shape: read_cached(entries[shape][1], entries[shape][0]) for shape in missing})
        if settings.hub_upload:
            with _timed(report, "upload_s"):
                upload_to_hub(settings.hub_upload, Path(settings.cache_dir), [entries[s][1].name for s in missing], report)
    report.startup["programs"] = list(startup.values())
    report.compile_source = ("loaded from cache" if not missing else "compiled now" if len(missing) == len(entries)
                             else f"{len(missing)} of {len(entries)} programs compiled now, the rest loaded from cache")
    with _timed(report, "install_s"):
        install_programs_(model.pipe.transformer, [(entries[shape][1], manifests[shape]["signatures"], labels[shape])
                                                   for shape in groups])
    tokens = lambda p: model.family.image_tokens(p.width, p.height)  # noqa: E731
    report.programs = [{"image_tokens": f"{served[0]}..{served[1]}" if served else tokens(presets[0]),
                        "resolutions": [p.name for p in presets]} for presets in groups.values()]
    with _timed(report, "warm_up_s"):  # the first call of each program loads it (the .so and its kernels)
        warm_up(model, [p for presets in groups.values() for p in (presets if served else presets[:1])])


def _compile(model: Model, scope: str, preset: Preset, served, out_dir: Path) -> dict:
    signatures = compile_program(model, scope, preset, served, out_dir, INDUCTOR_CONFIGS)
    release_export_memory()
    return signatures


def warm_up(model: Model, presets: list[Preset]) -> None:
    """Loads every program now rather than on the first request, and checks each gives finite output.
    Not on ZeroGPU: its main process has no GPU, and programs load in the GPU worker on first use."""
    if spaces.config.Config.zero_gpu:
        return
    for preset in presets:
        with torch.inference_mode():
            latents = model(CAPTURE_PROMPT, preset, steps=1, output_type="latent").images
        if not torch.isfinite(latents).all():
            raise RuntimeError(f"the program for {preset.name} returned non-finite values")


def main(argv: list[str] | None = None) -> int:
    """`python optimization.py --precompile --out DIR`: compile ahead of deploy with the current settings
    (MODEL_ID, PRESETS, QUANTIZATION, ...) on the target GPU, print the cache keys and where the files went."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--precompile", action="store_true", required=True)
    parser.add_argument("--out", required=True, help="cache directory to fill (AOT_CACHE_DIR for the app)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.from_env({**os.environ, "AOT_CACHE_DIR": args.out, "COMPILE": "aoti"})
    report = optimize_pipeline_(load_model(settings), settings)
    if report.compile != "aoti":
        print(json.dumps({"error": report.fallbacks}), flush=True)
        return 1
    out = Path(args.out)
    print(json.dumps({"keys": report.cache_keys, "source": report.compile_source, "dir": str(out),
                      "files": [f"{key}/{name}" for key in report.cache_keys for name in entry_files(out / key)]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
