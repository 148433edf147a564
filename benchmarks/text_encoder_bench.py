"""Seconds per prompt of a big model's real-size text encoder (random weights), through the pipeline's own
`encode_prompt`, on the GPU (issue 21, item 2):

  resident   the encoder whole on the GPU, bf16
  streamed   as low-VRAM mode places it (aot/memory.py: diffusers' group offloading, layer by layer from pinned host
             memory, on a side stream), with the GPU memory it needed
  cached     the same prompt again through the template's prompt cache (aot/prompts.py): nothing is encoded

FLUX.2 [dev] reads Mistral Small 3.1 (24B; its Pixtral vision tower is built too, unused for text), Qwen-Image reads
Qwen2.5-VL 7B, FLUX.1 [dev] T5-XXL's encoder (4.76B) beside a CLIP-L kept tiny. The sizes below are those of the
released configs as we read them. The pipeline is the family's tiny one (its tokenizer, chat template and prompt
handling) with the real-size encoder in place of the tiny one.

    python benchmarks/text_encoder_bench.py --family flux2 --out te.json
    python benchmarks/text_encoder_bench.py --family qwen-image --device cpu --shrink 8   # smoke test
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time

import flux_bench  # first: it fixes CXX before torch is imported, and puts the project on sys.path
import family_bench
import torch

from aot.families import family_named
from aot.memory import _stream_text_encoder_
from aot.prompts import cache_prompts_

GiB = 2**30
log = logging.getLogger("text-encoder-bench")

REAL_TEXT = {  # family: (the pipeline's component, {config part (None: the top level): sizes})
    "flux2": ("text_encoder", {  # Mistral Small 3.1 24B
        None: dict(tie_word_embeddings=False),  # its own output head, as released (the tiny one ties it)
        "text_config": dict(hidden_size=5120, intermediate_size=32768, num_hidden_layers=40, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=131072),
        "vision_config": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              head_dim=64)}),
    "qwen-image": ("text_encoder", {  # Qwen2.5-VL 7B
        None: dict(tie_word_embeddings=False),
        "text_config": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064),
        "vision_config": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                              fullatt_block_indexes=[7, 15, 23, 31])}),
    "flux": ("text_encoder_2", {None: dict(  # FLUX.1's T5-XXL encoder, 4.76B (its CLIP-L, 0.12B, stays tiny)
        d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64, vocab_size=32128,
        feed_forward_proj="gated-gelu", is_gated_act=True, dense_act_fn="gelu_new")}),
}
WIDTHS = ("hidden_size", "intermediate_size", "vocab_size", "out_hidden_size", "d_model", "d_ff")
PROMPT = ("A long, detailed prompt as people write them for these models: a lighthouse on a basalt cliff at dusk, "
          "waves breaking below in long white lines, a fishing boat with a red hull heading home, gulls over the "
          "water, the lamp just lit and throwing a pale beam through light rain, painted in the manner of a "
          "nineteenth-century seascape with visible brush strokes and a warm glaze over the sky.")


def real_text_encoder(tiny, family: str, shrink: int, device: str):
    """The tiny encoder's class with the real sizes (widths divided by `shrink`: a smoke test), random bf16 weights
    made on `device`."""
    config = tiny.config.to_dict()
    for part, sizes in REAL_TEXT[family][1].items():
        section = config if part is None else config[part]
        section.pop("layer_types", None)  # per layer, as many as the tiny one has: rebuilt from the count
        for key, value in sizes.items():
            section[key] = value // shrink if key in WIDTHS and shrink > 1 else value
    if family == "qwen-image":  # the multimodal rope's sections split half the head dim: 16/24/24 of 64
        head = config["text_config"]["hidden_size"] // config["text_config"]["num_attention_heads"]
        sections = [head // 8, 3 * head // 16, 3 * head // 16]
        for key in ("rope_scaling", "rope_parameters"):
            if isinstance(config["text_config"].get(key), dict):
                config["text_config"][key]["mrope_section"] = sections
    config = type(tiny.config).from_dict(config)
    torch.manual_seed(0)
    with torch.device(device):
        encoder = type(tiny)._from_config(config, dtype=torch.bfloat16)
    return encoder.eval().requires_grad_(False)


def time_encode(pipe, device: str, repeats: int) -> tuple[float, list[float]]:
    """Median seconds of encode_prompt after one warm-up, and every timed run."""
    runs = []
    for run in range(repeats + 1):
        flux_bench.sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            pipe.encode_prompt(PROMPT, device=torch.device(device))
        flux_bench.sync(device)
        if run:
            runs.append(round(time.perf_counter() - t0, 3))
    return statistics.median(runs), runs


def measure(args, result: dict, save) -> None:
    device = args.device

    def timed(name: str) -> None:  # seconds per prompt, each run, and the GPU memory it took
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        median, runs = time_encode(pipe, device, args.repeats)
        save(**{f"{name}_s": round(median, 3), f"{name}_runs": runs})
        if device == "cuda":
            save(**{f"{name}_peak_gib": round(torch.cuda.max_memory_allocated() / GiB, 2)})

    family = family_named(args.family)
    pipe = family_bench.tiny_pipeline(family, device)
    t0 = time.perf_counter()
    component = REAL_TEXT[args.family][0]
    encoder = real_text_encoder(getattr(pipe, component), args.family, args.shrink, device)
    pipe.register_modules(**{component: encoder})
    params = sum(p.numel() for p in encoder.parameters())
    save(params_b=round(params / 1e9, 2), build_s=round(time.perf_counter() - t0, 1),
         prompt_tokens=family.prompt_tokens(pipe, PROMPT) if family.prompt_tokens else None)
    log.info("%s text encoder: %.2fB parameters", args.family, params / 1e9)
    timed("resident")

    t0 = time.perf_counter()
    encoder.to("cpu")
    if device == "cuda":
        torch.cuda.empty_cache()
    _stream_text_encoder_(encoder, device)  # what place_pipeline_ does with a text encoder in low-VRAM mode
    save(stream_setup_s=round(time.perf_counter() - t0, 1))
    timed("streamed")

    cache = cache_prompts_(pipe, 16, host=True)
    time_encode(pipe, device, 1)  # a miss, then a hit
    save(cached_hits=cache.encodings.hits, cached_misses=cache.encodings.misses,
         cached_s=round(time_encode(pipe, device, 3)[0], 4))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="flux2", choices=tuple(REAL_TEXT))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shrink", type=int, default=1, help="divide the widths by this (a smoke test on a CPU)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return flux_bench.run_recorded(measure, args, {"family": args.family, "shrink": args.shrink}, args.family)

if __name__ == "__main__":
    raise SystemExit(main())
