"""A model larger than the card (issue 21): one real-size transformer (random weights) of a family, one layout per
process, against eager bf16 in the same process, on the GPU.

Layouts:
  resident  fp8 + AoT (regional), no memory cap: the big-card reference
  capped    the template's LOW_VRAM=auto under VRAM_LIMIT_GIB (--vram-limit): it plans, quantizes, streams the
            blocks that do not fit through its rings (aot/streaming.py) and compiles regionally
  bnb4      diffusers' 4-bit recipe as its settings make it (`BitsAndBytesConfig(load_in_4bit=True,
            bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)`: NF4, bf16 compute, no double
            quantization), applied here to every Linear of the transformer, without diffusers' list of modules it
            leaves alone; eager; quantized on the GPU with no cap, then served under the same cap

The pipeline around the transformer is the family's tiny one, widened to the real text width (family_bench.py), so
text encoding costs nothing here. One process per layout, because a compiled variant's weights stay allocated after
it is deleted (RESULTS.md run 7), which would count against the next one's cap. Every process builds the same
weights (seeded) and records the same inputs, so their errors against bf16 compare. Each writes a JSON document
(--out) with the step's median ms, a whole image at the family's default steps (or --image-steps), peak GiB while
serving, the relative error of one step against eager bf16, and the final latents after --error-steps steps
(--latents) for comparing layouts across processes, against eager bf16's (--bf16-latents, saved by any one process
before its layout).

    CXX=/usr/bin/g++ python benchmarks/bigmodel_bench.py --family flux2 --layout capped --vram-limit 24 --out c.json
"""
from __future__ import annotations

import argparse
import gc
import logging
import tempfile
import time

import flux_bench  # first: it fixes CXX before torch is imported, and puts the project on sys.path
import family_bench
import torch

import optimization
from aot.families import family_named
from aot.model import load_model
from aot.programs import capture_inputs
from settings import Settings

GiB = 2**30
log = logging.getLogger("bigmodel-bench")


def build(name: str, device: str):
    """The family's tiny pipeline around its real-size transformer, bf16 on `device`, the same weights every time."""
    pipe = family_bench.tiny_pipeline(family_named(name), device)
    if device != "cuda":  # the smoke test keeps the tiny transformer, which reads the tiny encoders as they are
        return pipe
    torch.manual_seed(0)
    transformer = family_bench.real_transformer(pipe, name)
    family_bench.widen_text_(pipe, transformer)
    # the real-size VAE too (its class defaults are the released one's, 84-127M parameters): the tiny one decodes
    # 4 latent channels, not the real transformer's (run 18 failed there)
    vae = type(pipe.vae)().to(device, torch.bfloat16).eval()
    pipe.register_modules(transformer=transformer, vae=vae)
    return pipe


def to_bnb4_(transformer: torch.nn.Module) -> int:
    """Every Linear as bitsandbytes NF4 with bf16 compute, quantized where its weight lies. Returns how many
    layers."""
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
        del old
    return len(names)


def measure(args, result: dict, save) -> dict:
    """Fills `result` through `save` as it goes (flux_bench.run_recorded): a later failure keeps what was measured."""
    device = args.device
    t0 = time.perf_counter()
    pipe = build(args.family, device)
    base = {"MODEL_ID": f"tiny-{args.family}", "AOT_SCOPE": "blocks", "AOT_CACHE_DIR": tempfile.mkdtemp(prefix="aot-big-"),
            "PRESETS": args.preset or family_named(args.family).presets.split(",")[0], "ATTENTION": "sdpa"}
    model = load_model(Settings.from_env({**base, "COMPILE": "none"}, has_cuda=device == "cuda"), pipe)
    preset, transformer = model.presets[0], pipe.transformer
    step_args, step_kwargs = capture_inputs(model, transformer, preset)
    params = sum(p.numel() for p in transformer.parameters())
    build_s = time.perf_counter() - t0
    eager_ms, eager_out = flux_bench.time_step(transformer, step_args, step_kwargs, device, 1, args.iters)
    eager_out = family_bench.first(eager_out).float()
    log.info("%s: %.2fB params, eager bf16 %.1f ms/step at %s (built in %.0f s)", args.family, params / 1e9,
             eager_ms, preset.name, build_s)
    save(family=args.family, layout=args.layout, params_b=round(params / 1e9, 2), preset=preset.name,
         eager_bf16_ms=round(eager_ms, 1), build_s=round(build_s, 1), vram_limit_gib=None)
    if args.bf16_latents:  # the reference every layout's final latents are compared with (same seeded weights)
        t0 = time.perf_counter()
        torch.save(flux_bench.final_latents(model, preset, args.error_steps).cpu(), args.bf16_latents)
        save(bf16_final_latents_s=round(time.perf_counter() - t0, 2))

    t0 = time.perf_counter()
    if args.layout == "bnb4":
        layers = to_bnb4_(transformer)
        gc.collect()
        save(quantization="bnb nf4", compile="none", bnb_layers=layers)
    else:
        env = {**base, "COMPILE": "aoti" if device == "cuda" else args.compile}
        if args.layout == "capped":
            pipe.to("cpu")  # where a model larger than the card starts: host memory
            env.update(LOW_VRAM=args.low_vram, QUANTIZATION="auto", VRAM_LIMIT_GIB=str(args.vram_limit))
        else:
            env.update(LOW_VRAM="off", QUANTIZATION="fp8" if device == "cuda" else "int8")
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        settings = Settings.from_env(env, has_cuda=device == "cuda")
        model = load_model(settings, pipe)
        report = optimization.optimize_pipeline_(model, settings)
        save(quantization=report.quantization, compile=report.compile, scope=report.compile_scope,
             compile_s=report.compile_seconds, memory=report.memory, fallbacks=report.fallbacks)
    if args.layout != "resident" and device == "cuda":
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.vram_limit * GiB / total))  # as the plan does
        result["vram_limit_gib"] = args.vram_limit
    result["prepare_s"] = round(time.perf_counter() - t0, 1)
    if device == "cuda":
        result["peak_prepare_gib"] = round(torch.cuda.max_memory_allocated() / GiB, 2)
        torch.cuda.reset_peak_memory_stats()

    ms, out = flux_bench.time_step(transformer, step_args, step_kwargs, device, 2, args.iters)
    out = family_bench.first(out).float()
    save(ms_per_step=round(ms, 1), vs_eager_bf16=round(eager_ms / ms, 2),
         step_rel_err=float(f"{family_bench.rel_err(out, eager_out):.2e}"))
    stream = getattr(transformer, "block_stream", None)
    steps = args.image_steps or model.defaults.steps
    calls = 2 if model.does_cfg(model.defaults.guidance) else 1
    if stream:
        stream.loads = stream.late_loads = 0
    t0 = time.perf_counter()
    latents = flux_bench.final_latents(model, preset, args.error_steps)
    save(final_latents_s=round(time.perf_counter() - t0, 2), error_steps=args.error_steps)
    if stream:
        save(copies_per_call=round(stream.loads / (args.error_steps * calls), 1),
             late_per_call=round(stream.late_loads / (args.error_steps * calls), 1))
    if args.latents:
        torch.save(latents.cpu(), args.latents)
    save(image=flux_bench.time_pipeline(model, preset, steps, device, 1), steps=steps, calls_per_step=calls)
    if device == "cuda":
        save(peak_serving_gib=round(torch.cuda.max_memory_allocated() / GiB, 2))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="flux2")
    parser.add_argument("--layout", choices=("resident", "capped", "bnb4"), required=True)
    parser.add_argument("--vram-limit", type=float, default=24.0, help="GiB the simulated card has (capped, bnb4)")
    parser.add_argument("--preset", default="", help="PRESETS; default: the family's first native resolution")
    parser.add_argument("--image-steps", type=int, default=0, help="steps of the timed image; default: the family's")
    parser.add_argument("--error-steps", type=int, default=20, help="steps of the run whose final latents are kept")
    parser.add_argument("--bf16-latents", default="",
                        help="first save eager bf16's final latents here (--error-steps): the reference for every "
                             "layout")
    parser.add_argument("--low-vram", default="auto", choices=("auto", "on", "stream"),
                        help="LOW_VRAM of the capped layout; 'on' plans as the real pipeline would, whose text encoder "
                             "alone outgrows a 70 GiB cap (the tiny one here fits anywhere)")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out", default="", help="also write the JSON here")
    parser.add_argument("--latents", default="", help="save the final latents here (torch.save)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cpu: a smoke test of this script on the family's tiny transformer")
    parser.add_argument("--compile", default="none", help="COMPILE on the CPU smoke test")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return flux_bench.run_recorded(measure, args, {"family": args.family, "layout": args.layout},
                                   f"{args.family} {args.layout}")

if __name__ == "__main__":
    raise SystemExit(main())
