"""Trains the offline demo model: a tiny FLUX.1-family pipeline (the classes of `FluxPipeline`) that draws the
scenes of assets/shapes.py, saved with `save_pretrained` where the app loads it when no MODEL_ID is set.

On a GPU, from the repo root; it writes assets/demo-model/:

    python assets/train_demo.py                                            # 360 s of training
    python assets/train_demo.py --budget 430 --vae-share 0.15              # the shipped model: 7.8 min in all
    python assets/train_demo.py --vae-steps 1422 --steps 3660              # the same, step for step

The shipped model trained 65 s (VAE) and 360 s (transformer and text encoders) on one H100; its held-out
figures are in benchmarks/RESULTS.md (run 14). An earlier 110 s run drew colour and position but every shape
as a rounded blob: shape needs the longer run.

First the VAE learns to reconstruct scenes, then the transformer and both text encoders learn together to
predict the rectified-flow velocity from the caption, sampled the way FluxPipeline samples (FlowMatchEuler,
shift 1, no dynamic shifting). Each stage stops by a step count chosen from its share of `--budget` after timing
its first steps; the run prints the counts, and passing them back (`--vae-steps N --steps M`) repeats the run:
same seed, same scenes, captions, noise and initial weights. Then the saved pipeline is loaded back from disk
and judged on held-out combinations. The last line is one JSON document with the times and the figures.
"""
from __future__ import annotations

import time

START = time.perf_counter()  # the wall time reported includes the imports

import os  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the DataLoader's workers tokenize, forked

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from aot.families import FLUX  # noqa: E402
from aot.families.tokens import byte_vocabulary  # noqa: E402
from assets import shapes  # noqa: E402
from assets.evaluate_demo import evaluate  # noqa: E402
from settings import DEMO_MODEL_DIR, DEMO_PRESETS, parse_presets  # noqa: E402

TEXT_TOKENS = 48  # both tokenizers' model_max_length: a caption is at most ~25 word tokens
TEXT_WIDTH = 64  # CLIP's pooled output and T5's hidden states both have this width
VAE_CHANNELS = (32, 64, 64, 64)  # four levels: an 8x VAE, so image sides are multiples of 16 as for FLUX.1
LATENT_CHANNELS = 4
TRANSFORMER = dict(num_layers=4, num_single_layers=4, num_attention_heads=4, attention_head_dim=32,
                   axes_dims_rope=(8, 12, 12))
GRID_SIGMAS = (1.0, 0.75, 0.5, 0.25)  # where the default 4 steps evaluate the transformer (shift 1)
WARMUP_STEPS = 100  # steps of rising learning rate; steps 20-100 are timed to choose a stage's step count
TIMED_FROM = 20  # the first steps include CUDA's and the DataLoader's start-up


def word_merges(words) -> list[tuple[str, str]]:
    """BPE merges that make each word one CLIP token: repeatedly merge the most frequent adjacent pair (ties by
    the pair itself, so the result never varies)."""
    split = {w: [*w[:-1], w[-1] + "</w>"] for w in words}
    merges = []
    while pairs := Counter(p for s in split.values() for p in zip(s, s[1:])):
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for word, symbols in split.items():
            merged, i = [], 0
            while i < len(symbols):
                if tuple(symbols[i:i + 2]) == best:
                    merged.append(best[0] + best[1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            split[word] = merged
    return merges


def build_tokenizers():
    """Word-level tokenizers built offline: every caption word is one token, any other printable ASCII text
    falls back to characters."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    chars = byte_vocabulary()
    merges = word_merges(shapes.VOCABULARY)
    clip_tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    clip_tokens += list(dict.fromkeys(a + b for a, b in merges if a + b not in clip_tokens))
    clip = CLIPTokenizer(vocab={t: i for i, t in enumerate(clip_tokens)}, merges=merges, model_max_length=TEXT_TOKENS)
    words = [w for word in shapes.VOCABULARY for w in (word, word.capitalize())]
    # Unigram log-probabilities: a whole word (-1) always beats spelling it out (-8 a character)
    t5_vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0), *((c, -8.0) for c in chars if c != " "),
                *(("▁" + w, -1.0) for w in words)]
    t5 = T5TokenizerFast(vocab=t5_vocab, extra_ids=0, model_max_length=TEXT_TOKENS)
    for word in shapes.VOCABULARY:
        assert len(clip(word).input_ids) == 3 and len(t5(word).input_ids) == 2, word
    return clip, t5


def build_pipeline(seed: int):
    """The untrained pipeline, from configs; the same seed gives the same weights."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = build_tokenizers()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=TEXT_TOKENS, projection_dim=TEXT_WIDTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=TEXT_WIDTH, d_kv=16, d_ff=2 * TEXT_WIDTH, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=tokenizer_2.pad_token_id,
        eos_token_id=tokenizer_2.eos_token_id, decoder_start_token_id=tokenizer_2.pad_token_id,
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, block_out_channels=VAE_CHANNELS,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_CHANNELS), layers_per_block=1, norm_num_groups=8,
        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False, sample_size=128,
        shift_factor=0.0, scaling_factor=1.0,  # set from the trained encoder's latents
    )
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CHANNELS, joint_attention_dim=TEXT_WIDTH, pooled_projection_dim=TEXT_WIDTH,
        guidance_embeds=False, **TRANSFORMER,  # schnell-like: no guidance, 4 steps (aot/families/flux.py)
    )
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                        transformer=transformer)


class Stage:
    """One training stage's loop: warm-up, then a step count fitted to its time budget (unless given), cosine
    learning rate to a tenth, a wall-clock guard, and a running loss."""

    def __init__(self, name: str, budget: float, steps: int | None, device: str):
        self.name, self.budget, self.steps, self.device = name, budget, steps, device
        self.start = time.perf_counter()
        self.step = 0
        self.losses: list[float] = []
        self.stopped_early = False

    def lr_scale(self) -> float:
        if self.step < WARMUP_STEPS:
            return (self.step + 1) / WARMUP_STEPS
        total = self.steps or WARMUP_STEPS * 1000
        progress = min(1.0, (self.step - WARMUP_STEPS) / max(1, total - WARMUP_STEPS))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    def now(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - self.start

    def __iter__(self):
        timed = 0.0
        while self.steps is None or self.step < self.steps:
            if self.step == TIMED_FROM and self.steps is None:
                timed = self.now()
            if self.step == WARMUP_STEPS and self.steps is None:
                elapsed = self.now()
                per_step = (elapsed - timed) / (WARMUP_STEPS - TIMED_FROM)
                self.steps = WARMUP_STEPS + max(1, int((self.budget - elapsed) / per_step))
                print(f"{self.name}: {per_step * 1000:.1f} ms a step (steps {TIMED_FROM}-{WARMUP_STEPS}): "
                      f"{self.steps} steps fit {self.budget:.0f} s", flush=True)
            if self.step > WARMUP_STEPS and time.perf_counter() - self.start > 1.1 * self.budget:
                self.stopped_early = True
                print(f"{self.name}: stopped by the wall-clock guard at step {self.step} of {self.steps}", flush=True)
                return
            yield self.step
            self.step += 1
            if self.step % 500 == 0:
                print(f"{self.name} step {self.step}/{self.steps or '?'}: loss {self.loss:.4f} "
                      f"({time.perf_counter() - self.start:.0f} s)", flush=True)

    @property
    def loss(self) -> float:
        recent = self.losses[-200:]
        return sum(recent) / max(1, len(recent))

    def summary(self) -> dict:
        return {"steps": self.step, "seconds": round(time.perf_counter() - self.start, 1),
                "loss": round(self.loss, 5), "stopped_early": self.stopped_early}


def tokenize(pipe, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The token ids FluxPipeline.encode_prompt makes of `captions` for CLIP and for T5."""
    def ids(tokenizer):
        return tokenizer(captions, padding="max_length", max_length=TEXT_TOKENS, truncation=True,
                         return_tensors="pt").input_ids

    return ids(pipe.tokenizer), ids(pipe.tokenizer_2)


def encode_text(pipe, clip_ids: torch.Tensor, t5_ids: torch.Tensor):
    """What FluxPipeline.encode_prompt returns for those ids: T5's hidden states, CLIP's pooled output and the
    text position ids (zeros)."""
    pooled = pipe.text_encoder(clip_ids, output_hidden_states=False).pooler_output
    text = pipe.text_encoder_2(t5_ids, output_hidden_states=False)[0]
    return text, pooled, torch.zeros(t5_ids.shape[1], 3, device=t5_ids.device)


class Batches(torch.utils.data.IterableDataset):
    """Endless training batches, drawn up and tokenized in DataLoader workers (the GPU only rasterizes them):
    batch i takes the preset i mod 3, and its scenes and captions come from a generator seeded with (seed, stage,
    i), so they are the same whatever the number of workers."""

    def __init__(self, stage: str, seed: int, size: int, presets, held, pipe):
        super().__init__()
        self.stage, self.seed, self.size, self.presets, self.held = stage, seed, size, presets, held
        self.tokenizers = {"tokenizer": pipe.tokenizer, "tokenizer_2": pipe.tokenizer_2}

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        first, every = (info.id, info.num_workers) if info else (0, 1)
        tokenizers = argparse.Namespace(**self.tokenizers)
        for i in itertools.count(first, every):
            preset = self.presets[i % len(self.presets)]
            rng = random.Random(f"{self.seed}:{self.stage}:{i}")
            scenes = [shapes.sample_scene(rng, self.held) for _ in range(self.size)]
            captions = [shapes.caption(s, rng) for s in scenes]
            yield (i, *shapes.scene_tensors(scenes, preset.width, preset.height), *tokenize(tokenizers, captions))


def batches(stage: str, size: int, presets, held, pipe, args):
    """(images, CLIP ids, T5 ids) on the device, batch after batch."""
    loader = torch.utils.data.DataLoader(Batches(stage, args.seed, size, presets, held, pipe), batch_size=None,
                                         num_workers=args.workers, prefetch_factor=8 if args.workers else None)
    for i, params, background, clip_ids, t5_ids in loader:
        preset = presets[i % len(presets)]
        images = shapes.rasterize(params.to(args.device), background.to(args.device), preset.width, preset.height)
        yield images, clip_ids.to(args.device), t5_ids.to(args.device)


def train_vae(pipe, presets, held, noise, args) -> dict:
    """Reconstruction (L1 + MSE) of drawn scenes with a weak KL term; decoding sampled latents keeps the decoder
    tolerant of the transformer's small errors. In bf16 autocast on a GPU."""
    vae = pipe.vae
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0, fused=args.device == "cuda")
    stage = Stage("vae", args.budget * args.vae_share, args.vae_steps, args.device)
    data = batches("vae", args.vae_batch, presets, held, pipe, args)
    for step, (images, _, _) in zip(stage, data):
        for group in optimizer.param_groups:
            group["lr"] = args.vae_lr * stage.lr_scale()
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"):
            posterior = vae.encode(images).latent_dist
            decoded = vae.decode(posterior.sample(generator=noise)).sample.float()
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = F.l1_loss(decoded, images) + F.mse_loss(decoded, images) + args.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        stage.losses.append(loss.item() if step % 10 == 0 else stage.losses[-1] if stage.losses else loss.item())
    vae.eval().requires_grad_(False)
    # the latents the transformer sees are standardised, as FLUX.1's VAE config does with these two numbers
    with torch.no_grad():
        latents = torch.cat([vae.encode(images).latent_dist.mode().flatten()
                             for _, (images, _, _) in zip(range(4 * len(presets)), data)])
    data.close()
    shift, scale = latents.mean().item(), 1.0 / latents.std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return {**stage.summary(), "shift_factor": round(shift, 4), "scaling_factor": round(scale, 4)}


def sample_sigmas(count: int, noise: torch.Generator, device: str) -> torch.Tensor:
    """Half uniform on (0, 1], half on the default 4 steps' sigmas, the ones every default image goes through."""
    uniform = 1 - torch.rand(count, generator=noise, device=device)
    grid = torch.tensor(GRID_SIGMAS, device=device)[torch.randint(len(GRID_SIGMAS), (count,), generator=noise,
                                                                 device=device)]
    return torch.where(torch.rand(count, generator=noise, device=device) < 0.5, uniform, grid)


def train_flow(pipe, presets, held, noise, args) -> dict:
    """Rectified flow, as FluxPipeline samples it: x_s = (1 - s) x0 + s noise, the transformer (given s as its
    timestep) predicts noise - x0, and each Euler step moves by (s_next - s) times that. The text encoders learn
    with it; an exponential moving average of all their weights is what gets saved.
    In fp32 (TF32 matmuls): the first H100 run, in bf16 autocast, died in its first step with an illegal memory
    access, most likely in cuDNN's attention kernels (torch 2.11's default for bf16 on Hopper, not used in fp32)."""
    from diffusers import FluxPipeline

    modules = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2]
    params = [p for m in modules for p in m.parameters()]
    for module in modules:
        module.train()
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01,
                                  fused=args.device == "cuda")
    average = [p.detach().clone() for p in params]
    vae = pipe.vae
    stage = Stage("flow", args.budget * (1 - args.vae_share), args.steps, args.device)
    data = batches("flow", args.batch, presets, held, pipe, args)
    for step, (images, clip_ids, t5_ids) in zip(stage, data):
        with torch.no_grad(), torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"):
            latents = vae.encode(images).latent_dist.mode()
        latents = (latents.float() - vae.config.shift_factor) * vae.config.scaling_factor
        b, c, h, w = latents.shape
        clean = FluxPipeline._pack_latents(latents, b, c, h, w)
        image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, args.device, torch.float32)
        noise_sample = torch.randn(clean.shape, generator=noise, device=args.device)
        sigma = sample_sigmas(b, noise, args.device)
        noisy = (1 - sigma[:, None, None]) * clean + sigma[:, None, None] * noise_sample
        for group in optimizer.param_groups:
            group["lr"] = args.lr * stage.lr_scale()
        text, pooled, text_ids = encode_text(pipe, clip_ids, t5_ids)
        velocity = pipe.transformer(hidden_states=noisy, timestep=sigma, pooled_projections=pooled,
                                    encoder_hidden_states=text, txt_ids=text_ids, img_ids=image_ids,
                                    return_dict=False)[0]
        loss = F.mse_loss(velocity, noise_sample - clean)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        torch._foreach_lerp_(average, [p.detach() for p in params], 1 - decay)
        stage.losses.append(loss.item() if step % 10 == 0 else stage.losses[-1] if stage.losses else loss.item())
    data.close()
    with torch.no_grad():
        for p, a in zip(params, average):
            p.copy_(a)
    for module in modules:
        module.eval().requires_grad_(False)
    return stage.summary()


def generate(pipe, prompts: list[str], preset, seeds: list[int], steps: int = 4):
    """One image per (prompt, seed) pair, in that order; noise from CPU generators, as the app draws it."""
    images = []
    pairs = [(p, s) for p in prompts for s in seeds]
    for i in range(0, len(pairs), 64):
        chunk = pairs[i:i + 64]
        out = pipe(prompt=[p for p, _ in chunk], width=preset.width, height=preset.height, num_inference_steps=steps,
                   max_sequence_length=TEXT_TOKENS, guidance_scale=0.0, output_type="np",
                   generator=[torch.Generator().manual_seed(s) for _, s in chunk])
        images += [(img * 255).round().astype("uint8") for img in out.images]
    return images


def choose_examples(pipe, preset, seeds=range(4)) -> list[str]:
    """The example prompts that the judge finds drawn right at every one of `seeds`."""
    chosen = []
    for prompt in shapes.EXAMPLE_PROMPTS:
        things = shapes.things_in(prompt)
        images = generate(pipe, [prompt], preset, list(seeds))
        if all(all(shapes.judge(img, things).values()) for img in images):
            chosen.append(prompt)
    return chosen


def save_samples(pipe, presets, path: Path) -> None:
    """A grid: each example prompt across the presets, two seeds each."""
    from PIL import Image

    side = max(max(p.width, p.height) for p in presets)
    rows = []
    for prompt in shapes.EXAMPLE_PROMPTS:
        row = []
        for preset in presets:
            row += generate(pipe, [prompt], preset, [0, 1])
        rows.append(row)
    grid = Image.new("RGB", (side * len(rows[0]), side * len(rows)), (128, 128, 128))
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            grid.paste(Image.fromarray(img), (c * side, r * side))
    grid.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEMO_MODEL_DIR, help="where save_pretrained writes the pipeline")
    parser.add_argument("--samples", default=None, help="folder for a grid of sample images (default: none)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=float, default=360.0, help="seconds for both training stages together")
    parser.add_argument("--vae-share", type=float, default=0.25, help="the VAE's share of the budget")
    parser.add_argument("--vae-steps", type=int, default=None, help="fixed VAE steps (default: fit the budget)")
    parser.add_argument("--steps", type=int, default=None, help="fixed transformer steps (default: fit the budget)")
    parser.add_argument("--vae-batch", type=int, default=64)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--vae-lr", type=float, default=2e-3)
    parser.add_argument("--lr", type=float, default=8e-4)
    parser.add_argument("--kl-weight", type=float, default=1e-4)
    parser.add_argument("--ema", type=float, default=0.998)
    parser.add_argument("--eval-seeds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=min(8, (os.cpu_count() or 2) - 1),
                        help="DataLoader workers drawing up batches")
    args = parser.parse_args()

    from diffusers import DiffusionPipeline

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.enable_cudnn_sdp(False)  # see train_flow
    presets = parse_presets(DEMO_PRESETS, FLUX.multiple)
    held = shapes.held_out()
    noise = torch.Generator(args.device).manual_seed(args.seed)  # VAE samples, flow noise and sigmas
    pipe = build_pipeline(args.seed).to(args.device)
    sizes = {name: sum(p.numel() for p in module.parameters()) for name, module in pipe.components.items()
             if isinstance(module, torch.nn.Module)}
    print("parameters:", sizes, flush=True)
    setup_s = time.perf_counter() - START

    vae = train_vae(pipe, presets, held, noise, args)
    print("vae:", vae, flush=True)
    flow = train_flow(pipe, presets, held, noise, args)
    print("flow:", flow, flush=True)

    start = time.perf_counter()
    out = Path(args.out)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.to("cpu", torch.float16)  # fp16 on disk; the app loads it in fp32 (bf16 on a GPU)
    pipe.save_pretrained(out)
    size_mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
    pipe = DiffusionPipeline.from_pretrained(out, dtype=torch.float32).to(args.device)  # what the app will load
    pipe.set_progress_bar_config(disable=True)
    seeds = list(range(args.eval_seeds))
    figures = evaluate(lambda prompts, preset: generate(pipe, prompts, preset, seeds), presets)
    examples = choose_examples(pipe, presets[0])
    (out / "examples.txt").write_text("".join(f"{e}\n" for e in examples))
    if args.samples:
        Path(args.samples).mkdir(parents=True, exist_ok=True)
        save_samples(pipe, presets, Path(args.samples) / "demo-samples.png")
    eval_s = time.perf_counter() - start

    print(json.dumps({
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
        "seed": args.seed, "parameters": sizes, "size_mb": round(size_mb, 2),
        "seconds": {"setup": round(setup_s, 1), "vae": vae["seconds"], "flow": flow["seconds"],
                    "save_and_eval": round(eval_s, 1), "total": round(time.perf_counter() - START, 1)},
        "vae": vae, "flow": flow, "batch": {"vae": args.vae_batch, "flow": args.batch},
        "repeat": f"--seed {args.seed} --vae-steps {vae['steps']} --steps {flow['steps']}",
        "examples": examples, **figures,
    }))


if __name__ == "__main__":
    main()
