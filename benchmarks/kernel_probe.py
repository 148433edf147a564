"""Kernel microbenchmarks at FLUX.1-dev's shapes on one GPU: which attention kernel is fastest, what the
fp8 and bf16 GEMMs of one step cost, and whether channels_last speeds up the VAE decode. Needs torch
(diffusers for the VAE part, flash-attn-4 for its row, if installed).

  python benchmarks/kernel_probe.py

Attention: 24 heads of 128, 4608 tokens (1024x1024: 4096 image + 512 text) and 4464 (832x1216), run 57
times per step (19 double + 38 single blocks). Each backend is timed with CUDA events, median of 20.
"""
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

HEADS, HEAD_DIM, BLOCKS = 24, 128, 57


def median_ms(fn, iters: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return sorted(times)[len(times) // 2]


def sdpa_with(backend):
    def run(q, k, v):
        if backend is None:  # torch's own choice
            return F.scaled_dot_product_attention(q, k, v)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)
    return run


def main() -> None:
    print("torch", torch.__version__, "cuDNN", torch.backends.cudnn.version(), torch.cuda.get_device_name())
    try:
        from flash_attn.cute import flash_attn_func as fa4
    except ImportError as err:
        fa4 = None
        print("flash-attn-4 not available:", err)
    results = {}
    for tokens in (4608, 4464):
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
            err = float((out.float() - reference).norm() / reference.norm())
            ms = median_ms(run)
            results[f"{name}/{tokens}"] = round(ms, 4)
            print(f"{tokens} tokens  {name:20s} {ms:6.3f} ms  {flops / ms / 1e9:4.0f} TFLOP/s  "
                  f"x{BLOCKS} = {BLOCKS * ms:5.1f} ms/step  rel err {err:.1e}")
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            runs["sdpa default"]()
            torch.cuda.synchronize()
        kernels = sorted((e.device_time_total, e.key) for e in prof.key_averages() if e.device_time_total > 0)
        print("  sdpa default runs:", kernels[-1][1][:100])
    # One step's GEMMs: (tokens, in, out) of FLUX.1-dev's large Linears, fp8 with row-wise scales vs bf16.
    shapes = {"double q/k/v/out (image)": (4096, 3072, 3072), "double mlp up": (4096, 3072, 12288),
              "double mlp down": (4096, 12288, 3072), "single qkv+mlp": (4608, 3072, 21504),
              "single out": (4608, 15360, 3072)}
    for name, (m, k, n) in shapes.items():
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        a8, w8 = a.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
        scale_a, scale_w = torch.ones(m, 1, device="cuda"), torch.ones(1, n, device="cuda")
        bf16 = median_ms(lambda: a @ w.t())
        fp8 = median_ms(lambda: torch._scaled_mm(a8, w8.t(), scale_a=scale_a, scale_b=scale_w, out_dtype=torch.bfloat16))
        tflop = 2 * m * k * n / 1e9
        results[f"gemm {name}"] = dict(bf16_ms=round(bf16, 4), fp8_ms=round(fp8, 4))
        print(f"{name:26s} bf16 {bf16:6.3f} ms ({tflop / bf16:4.0f} TFLOP/s)   fp8 row-wise {fp8:6.3f} ms "
              f"({tflop / fp8:4.0f} TFLOP/s)")
    results["vae"] = vae_decode()
    print(json.dumps(results))


def vae_decode() -> dict:
    """FLUX's VAE (from its config, random weights) decoding one 1024x1024 image, bf16: default memory
    format vs channels_last, eager."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as err:
        print("VAE part skipped:", err)
        return {}
    torch.manual_seed(0)
    with torch.device("cuda"):
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                            use_quant_conv=False, use_post_quant_conv=False)
    vae = vae.to(torch.bfloat16).eval()
    latents = torch.randn(1, 16, 128, 128, device="cuda", dtype=torch.bfloat16)
    out = {}
    with torch.inference_mode():
        reference = vae.decode(latents).sample.float()
        out["default_ms"] = median_ms(lambda: vae.decode(latents), iters=10)
        vae.to(memory_format=torch.channels_last)
        last = vae.decode(latents.to(memory_format=torch.channels_last)).sample.float()
        out["channels_last_ms"] = median_ms(lambda: vae.decode(latents.to(memory_format=torch.channels_last)), iters=10)
    out["rel_err"] = float((last - reference).norm() / reference.norm())
    print(f"VAE decode 1024x1024 bf16: default {out['default_ms']:.1f} ms, channels_last {out['channels_last_ms']:.1f} ms, "
          f"rel err {out['rel_err']:.1e}")
    return out


if __name__ == "__main__":
    main()
