"""Seconds per prompt of a family's real-size text encoders (random weights), through the pipeline's own
`encode_prompt`, on the GPU (issue 21, item 2):

  resident   the encoders whole on the GPU, bf16
  streamed   as low-VRAM mode places them (aot/memory.py: diffusers' group offloading, layer by layer from pinned host
             memory, on a side stream), with the GPU memory it needed and the copy rate it implies (every weight
             once per prompt) beside the link's ceiling
  cached     the same prompt again through the template's prompt cache (aot/prompts.py): nothing is encoded

The encoders are those of the family's `RealSize` (aot/families/): Mistral Small 3.1 (24B; its Pixtral vision tower
is built too, unused for text) for FLUX.2 [dev], Qwen2.5-VL 7B for Qwen-Image, Qwen3-4B for FLUX.2 [klein] and
Z-Image, CLIP-L and T5-XXL's encoder for FLUX.1 (run 19 built T5 alone). The pipeline is the family's tiny one (its
tokenizer, chat template and prompt handling) with the real-size encoders in place of the tiny ones.

    python benchmarks/text_encoder_bench.py --family flux2 --out te.json
    python benchmarks/text_encoder_bench.py --family qwen-image --device cpu --shrink 8   # smoke test

Prints one RESULT line per figure, then one JSON document on its last line.
"""
from __future__ import annotations

import lib  # first: it corrects CXX before torch is imported, and puts the project on sys.path

import argparse
import logging
import time

import torch

from aot.families import FAMILIES, family_named
from aot.memory import _stream_text_encoder_
from aot.model import build_tiny
from aot.prompts import cache_prompts_

PROMPT = ("A long, detailed prompt as people write them for these models: a lighthouse on a basalt cliff at dusk, "
          "waves breaking below in long white lines, a fishing boat with a red hull heading home, gulls over the "
          "water, the lamp just lit and throwing a pale beam through light rain, painted in the manner of a "
          "nineteenth-century seascape with visible brush strokes and a warm glaze over the sky.")


def measure(args, document: dict) -> None:
    device, family = args.device, family_named(args.family)

    def timed(name: str, warmup: int = 1) -> float:  # seconds per prompt, and the GPU memory it took
        lib.peak_gib()
        ms, _ = lib.median_ms(lambda: pipe.encode_prompt(PROMPT, device=torch.device(device)), device, warmup,
                              args.repeats)
        document[name] = dict(s=round(ms / 1000, 4), peak_gib=lib.peak_gib())
        lib.emit(name, **document[name])
        lib.write(document, args.out)
        return ms / 1000

    pipe = build_tiny(family).to(device, torch.bfloat16)
    lib.as_released_(pipe, family.real_size)  # the released tokenizer's length
    t0 = time.perf_counter()
    torch.manual_seed(1)
    encoders = {name: lib.real_text_encoder(getattr(pipe, name), sizes, device, args.shrink)
                for name, sizes in family.real_size.text_encoders.items()}
    pipe.register_modules(**encoders)
    weights = sum(p.numel() * p.element_size() for e in encoders.values() for p in e.parameters())
    document.update(params_b={k: round(sum(p.numel() for p in e.parameters()) / 1e9, 2) for k, e in encoders.items()},
                    build_s=round(time.perf_counter() - t0, 1),
                    prompt_tokens=family.prompt_tokens(pipe, PROMPT) if family.prompt_tokens else None)
    timed("resident")

    t0 = time.perf_counter()
    for encoder in encoders.values():
        encoder.to("cpu")
        _stream_text_encoder_(encoder, device)  # what place_pipeline_ does with a text encoder in low-VRAM mode
    if device == "cuda":
        torch.cuda.empty_cache()
    document["stream_setup_s"] = round(time.perf_counter() - t0, 1)
    seconds = timed("streamed")
    document["streamed"].update(copy_gb_s=round(weights / 1e9 / seconds, 1), ceiling_gb_s=lib.COPY_CEILING_GB_S)

    cache = cache_prompts_(pipe, 16, host=True)
    timed("cached")  # its warm-up call is the miss, the timed ones hits
    document["cached"].update(hits=cache.encodings.hits, misses=cache.encodings.misses)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="flux2", choices=[f.name for f in FAMILIES])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shrink", type=int, default=1, help="divide the widths by this (a smoke test on a CPU)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--out", default="", help="also write the JSON here, rewritten after every figure")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    document = dict(bench="text_encoder", family=args.family, shrink=args.shrink)
    try:
        measure(args, document)
    except Exception as err:  # the JSON says what failed, beside what was measured before
        logging.exception("%s failed", args.family)
        document["error"] = f"{type(err).__name__}: {err}"[:800]
    return lib.finish(document, args.device, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
