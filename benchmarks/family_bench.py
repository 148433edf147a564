"""Per model family, one denoising step of a real-size transformer (random weights), eager bf16 against the
template's configuration, in one process per family, on the GPU.

The pipeline around the transformer is the family's own tiny one (`aot.model.build_tiny`): its text encoder's
outputs are widened to the real transformer's text width with random values, so the transformer sees the
shapes the real model would (text length included) while the encoder costs nothing. The transformer is built
from diffusers' config (the class defaults are the released models', except where REAL_CONFIGS says) on the
GPU, and the template's own `optimize_pipeline_` quantizes, compiles and installs it.

    CXX=/usr/bin/g++ python benchmarks/family_bench.py --families flux2-klein,qwen-image --scope blocks

Prints a table, then one JSON document on its last line.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import optimization  # noqa: E402
from benchmarks.kernel_probe import median_ms  # noqa: E402
from aot.families import family_named  # noqa: E402
from aot.model import build_tiny, load_model  # noqa: E402
from aot.programs import capture_inputs  # noqa: E402
from settings import Settings  # noqa: E402

# Where a family's released transformer differs from its diffusers class defaults.
REAL_CONFIGS = {
    "flux": dict(guidance_embeds=True),  # FLUX.1-dev
    "flux2": {},  # FLUX.2 [dev], 32B
    "flux2-klein": dict(num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680,
                        guidance_embeds=False),  # [klein] 4B, as we read its published config
    "qwen-image": {},  # 20B
    "z-image": {},  # Z-Image Turbo, 6B
}
TEXT_TOKENS = 512  # the real tokenizers' length for the families that pad (FLUX.1 [dev], FLUX.2)


def text_widths(transformer) -> tuple[int, int | None]:
    """(text embedding width, pooled embedding width) that a transformer of this family reads."""
    config = transformer.config
    width = config.get("joint_attention_dim") or config.get("cap_feat_dim")
    return width, config.get("pooled_projection_dim")


def widen_text_(pipe, real_transformer) -> None:
    """Replaces the tiny text encoder's embeddings with random ones of the real width, same lengths and masks."""
    tiny_width, tiny_pooled = text_widths(pipe.transformer)
    width, pooled = text_widths(real_transformer)
    encode = pipe.encode_prompt
    generator = torch.Generator(device="cuda").manual_seed(0)

    def widen(value):
        if isinstance(value, (list, tuple)):
            return type(value)(widen(v) for v in value)
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.shape[-1] in (tiny_width, tiny_pooled):
            real = pooled if value.ndim == 2 and pooled else width
            return torch.randn(*value.shape[:-1], real, device=value.device, dtype=torch.bfloat16, generator=generator)
        return value

    pipe.encode_prompt = lambda *args, **kwargs: widen(encode(*args, **kwargs))


def tiny_pipeline(family, device: str):
    """The family's tiny pipeline in bf16, its tokenizer as long as the real one where the family pads prompts."""
    pipe = build_tiny(family).to(device, torch.bfloat16)
    for tokenizer in (getattr(pipe, "tokenizer", None), getattr(getattr(pipe, "tokenizer", None), "tokenizer", None)):
        if tokenizer is not None and hasattr(tokenizer, "model_max_length") and family.text.value == "fixed":
            tokenizer.model_max_length = max(tokenizer.model_max_length, TEXT_TOKENS)
    return pipe


def real_transformer(pipe, name: str):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            transformer = type(pipe.transformer)(**REAL_CONFIGS[name])
    finally:
        torch.set_default_dtype(previous)
    for param_name, param in transformer.named_parameters():
        if param_name.endswith("pad_token"):  # zeros when built from a config, learned in the real model; an all-zero
            torch.nn.init.normal_(param)  # row has no fp8 per-row scale (0/0) and turns the output to NaN
    return transformer.eval().requires_grad_(False)


def first(output) -> torch.Tensor:
    """The sample of a transformer's output: a tensor, or Z-Image's list of per-image tensors."""
    return output[0] if isinstance(output, list) else output


def rel_err(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def bench(name: str, scope: str, cache_dir: str) -> dict:
    family = family_named(name)
    t0 = time.perf_counter()
    pipe = tiny_pipeline(family, "cuda")
    transformer = real_transformer(pipe, name)
    widen_text_(pipe, transformer)
    if hasattr(pipe.vae, "bn"):  # FLUX.2 de-normalizes latents with the VAE's statistics: size them for the real ones
        pipe.vae.bn = torch.nn.BatchNorm2d(transformer.config.in_channels).to("cuda", torch.bfloat16).eval()
    pipe.register_modules(transformer=transformer)
    square = family.presets.split(",")[0]
    settings = Settings.from_env({"MODEL_ID": f"tiny-{name}", "COMPILE": "aoti", "AOT_SCOPE": scope, "PRESETS": square,
                                  "AOT_CACHE_DIR": cache_dir}, has_cuda=True)
    model = load_model(settings, pipe)
    preset = model.presets[0]
    params = sum(p.numel() for p in transformer.parameters())
    args, kwargs = capture_inputs(model, transformer, preset)
    build_s = time.perf_counter() - t0
    with torch.inference_mode():
        eager_out = first(transformer(*args, **kwargs)[0]).clone()
        eager_ms = median_ms(lambda: transformer(*args, **kwargs))
    logging.info("%s: %.2fB params, eager %.1f ms/step at %s", name, params / 1e9, eager_ms, preset.name)
    report = optimization.optimize_pipeline_(model, settings)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        out = first(transformer(*args, **kwargs)[0])
        compiled_ms = median_ms(lambda: transformer(*args, **kwargs))
    peak = torch.cuda.max_memory_allocated() / 2**30
    calls = 2 if model.does_cfg(model.defaults.guidance) else 1
    return {
        "family": name, "params_b": round(params / 1e9, 2), "preset": preset.name, "scope": scope,
        "text_tokens": {k: list(v.shape) for k, v in kwargs.items() if "encoder_hidden_states" == k} or report.text,
        "eager_ms": round(eager_ms, 1), "compiled_ms": round(compiled_ms, 1), "speedup": round(eager_ms / compiled_ms, 2),
        "rel_err": float(f"{rel_err(out, eager_out):.2e}"), "compile_s": report.compile_seconds,
        "compile_source": report.compile_source, "quantization": report.quantization, "attention": report.attention,
        "peak_gib_serving": round(peak, 2), "build_s": round(build_s, 1),
        "steps": model.defaults.steps, "calls_per_step": calls,
        "s_per_image_transformer": round(model.defaults.steps * calls * compiled_ms / 1000, 2),
        "eager_s_per_image_transformer": round(model.defaults.steps * calls * eager_ms / 1000, 2),
        "fallbacks": report.fallbacks,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default="flux2-klein,qwen-image,z-image")
    parser.add_argument("--scope", default="blocks", choices=("blocks", "model"))
    parser.add_argument("--out", default="", help="also write the JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    results = []
    for name in args.families.split(","):
        try:
            results.append(bench(name, args.scope, tempfile.mkdtemp(prefix=f"aot-{name}-")))
        except Exception as err:  # noqa: BLE001 - one family failing must not hide the others' numbers
            logging.exception("%s failed", name)
            results.append({"family": name, "error": f"{type(err).__name__}: {err}"[:500]})
        torch.cuda.empty_cache()
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"{'family':12} {'params':>7} {'preset':>10} {'eager ms':>9} {'AoT ms':>8} {'x':>5} {'err':>8} {'compile s':>9} {'peak GiB':>8}")
    for r in results:
        if "error" in r:
            print(f"{r['family']:12} ERROR {r['error'][:100]}")
            continue
        print(f"{r['family']:12} {r['params_b']:>6}B {r['preset']:>10} {r['eager_ms']:>9} {r['compiled_ms']:>8} "
              f"{r['speedup']:>5} {r['rel_err']:>8} {r['compile_s']:>9} {r['peak_gib_serving']:>8}")
    print(json.dumps({"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "results": results}))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
