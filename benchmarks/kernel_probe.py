"""Kernel microbenchmarks at FLUX.1-dev's shapes (its `RealSize`, aot/families/flux.py) on one GPU: the matmul ceilings
themselves, which attention kernel is fastest, what the fp8 and bf16 GEMMs of one step cost, and whether
channels_last speeds up the VAE decode. Needs torch (diffusers for the VAE part, flash-attn-4 for its row, if
installed).

  python benchmarks/kernel_probe.py

Attention: one call of each block, 4608 tokens (1024x1024: 4096 image + 512 text) and 4464 (832x1216), run once per
block (57 times a step). Every figure is timed by lib.median_ms (CUDA events, median of 20) and printed beside the
ceilings of shared/GPU.md. Prints one JSON document on its last line.
"""
import lib  # first: it corrects CXX before torch is imported, and puts the project on sys.path

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from aot.families import family_named

FLUX = family_named("flux")
CONFIG = FLUX.real_size.transformer
HEADS, HEAD_DIM = CONFIG["num_attention_heads"], CONFIG["attention_head_dim"]
BLOCKS, WIDTH, TEXT = CONFIG["num_layers"] + CONFIG["num_single_layers"], HEADS * HEAD_DIM, 512


def median_ms(fn, iters: int = 20) -> float:
    return lib.median_ms(fn, "cuda", warmup=3, iters=iters)[0]


def sdpa_with(backend):
    def run(q, k, v):
        if backend is None:  # torch's own choice
            return F.scaled_dot_product_attention(q, k, v)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)
    return run


def gemm(name: str, m: int, k: int, n: int) -> dict:
    """bf16 and fp8 (row-wise scales, as the project quantizes) of (m, k) x (k, n), TFLOP/s beside the ceilings."""
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    a8, w8 = a.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
    scale_a, scale_w = torch.ones(m, 1, device="cuda"), torch.ones(1, n, device="cuda")
    bf16 = median_ms(lambda: a @ w.t())
    fp8 = median_ms(lambda: torch._scaled_mm(a8, w8.t(), scale_a=scale_a, scale_b=scale_w, out_dtype=torch.bfloat16))
    tflop = 2 * m * k * n / 1e9
    print(f"{name:26s} bf16 {bf16:6.3f} ms ({tflop / bf16:4.0f} of {lib.CEILING_TFLOPS['bf16']:.0f} TFLOP/s)   "
          f"fp8 row-wise {fp8:6.3f} ms ({tflop / fp8:4.0f} of {lib.CEILING_TFLOPS['fp8']:.0f} TFLOP/s)")
    return dict(bf16_ms=round(bf16, 4), fp8_ms=round(fp8, 4), bf16_tflops=round(tflop / bf16),
                fp8_tflops=round(tflop / fp8))


def main() -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    print("torch", torch.__version__, "cuDNN", torch.backends.cudnn.version(), torch.cuda.get_device_name())
    try:
        from flash_attn.cute import flash_attn_func as fa4
    except ImportError as err:
        fa4 = None
        print("flash-attn-4 not available:", err)
    results = {"ceiling 8192^3": gemm("ceiling 8192^3", 8192, 8192, 8192)}
    for tokens in (FLUX.image_tokens(1024, 1024) + TEXT, FLUX.image_tokens(832, 1216) + TEXT):
        flops = 4 * tokens * tokens * HEAD_DIM * HEADS
        bshd = [torch.randn(1, tokens, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
        bhsd = [t.transpose(1, 2) for t in bshd]  # the views diffusers' native backend hands to SDPA
        runs = {name: (lambda fn=sdpa_with(backend): fn(*bhsd)) for name, backend in (
            ("sdpa default", None), ("sdpa flash (FA2)", SDPBackend.FLASH_ATTENTION),
            ("sdpa cuDNN", SDPBackend.CUDNN_ATTENTION), ("sdpa mem-efficient", SDPBackend.EFFICIENT_ATTENTION))}
        if fa4 is not None:
            runs["flash-attn-4"] = lambda: fa4(*bshd)
        reference = F.scaled_dot_product_attention(*[t.float() for t in bhsd])
        for name, run in runs.items():
            out = run()
            out = (out[0] if isinstance(out, tuple) else out)
            out = out.transpose(1, 2) if name == "flash-attn-4" else out
            ms = median_ms(run)
            results[f"{name}/{tokens}"] = round(ms, 4)
            print(f"{tokens} tokens  {name:20s} {ms:6.3f} ms  {flops / ms / 1e9:4.0f} of "
                  f"{lib.CEILING_TFLOPS['bf16']:.0f} TFLOP/s  x{BLOCKS} = {BLOCKS * ms:5.1f} ms/step  "
                  f"rel err {lib.rel_err(out, reference):.1e}")
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            runs["sdpa default"]()
            torch.cuda.synchronize()
        kernels = sorted((e.device_time_total, e.key) for e in prof.key_averages() if e.device_time_total > 0)
        print("  sdpa default runs:", kernels[-1][1][:100])
    # One step's GEMMs: (tokens, in, out) of FLUX.1-dev's large Linears
    image, joint = FLUX.image_tokens(1024, 1024), FLUX.image_tokens(1024, 1024) + TEXT
    shapes = {"double q/k/v/out (image)": (image, WIDTH, WIDTH), "double mlp up": (image, WIDTH, 4 * WIDTH),
              "double mlp down": (image, 4 * WIDTH, WIDTH), "single qkv+mlp": (joint, WIDTH, 7 * WIDTH),
              "single out": (joint, 5 * WIDTH, WIDTH)}
    for name, (m, k, n) in shapes.items():
        results[f"gemm {name}"] = gemm(name, m, k, n)
    results["vae"] = vae_decode()
    return lib.finish(results, "cuda")


def vae_decode() -> dict:
    """FLUX's VAE (its real config, random weights) decoding one 1024x1024 image, bf16: default memory format vs
    channels_last, eager."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as err:
        print("VAE part skipped:", err)
        return {}
    torch.manual_seed(0)
    vae = lib.on_device("cuda", torch.bfloat16, lambda: AutoencoderKL(**FLUX.real_size.vae))
    latents = torch.randn(1, FLUX.real_size.vae["latent_channels"], 128, 128, device="cuda", dtype=torch.bfloat16)
    out = {}
    with torch.inference_mode():
        reference = vae.decode(latents).sample
        out["default_ms"] = median_ms(lambda: vae.decode(latents), iters=10)
        vae.to(memory_format=torch.channels_last)
        last = vae.decode(latents.to(memory_format=torch.channels_last)).sample
        out["channels_last_ms"] = median_ms(lambda: vae.decode(latents.to(memory_format=torch.channels_last)), iters=10)
    out["rel_err"] = lib.rel_err(last, reference)
    print(f"VAE decode 1024x1024 bf16: default {out['default_ms']:.1f} ms, channels_last "
          f"{out['channels_last_ms']:.1f} ms, rel err {out['rel_err']:.1e}")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
