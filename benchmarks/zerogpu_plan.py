"""ZeroGPU on the RTX Pro 6000 Blackwell (issue 27), on the CPU in seconds: what the template plans for each family's
real-size pipeline, and what its default request asks of ZeroGPU.

Every model is built at its real size on the `meta` device (shapes and bf16 dtypes, no memory, no download): the
family's tiny pipeline with the transformer, text encoder(s) and VAE of the family's `RealSize` (aot/families/), by
lib.real_pipeline. aot.memory.measure_footprint sizes it as the Space does; choose_resident_plan and choose_size then
plan it for the card of spaces' own configs.json, with a working fp8 probe and with a failed one.

The second table is the default request on `large` through aot.zerogpu.Durations, from the fp8 + AoT calls measured
on an H100/H200 (RESULTS.md runs 12 and 26) times aot.zerogpu.slowdown, which for this card rests on its published
specs: nobody here has measured one.

    python benchmarks/zerogpu_plan.py

Prints two tables, then one JSON document on its last line.
"""
from __future__ import annotations

import json
import time
from importlib.resources import files

import lib  # first: it corrects CXX before torch is imported, and puts the project on sys.path
import diffusers
import torch

from aot.families import Guidance, family_named
from aot.hardware import Size, ZeroGPUCard
from aot.memory import GiB, choose_resident_plan, measure_footprint
from aot.model import Model
from aot.zerogpu import MAX_TASK_SECONDS, Durations, Timing, choose_size, slowdown
from settings import parse_presets

CARD = "NVIDIA RTX PRO 6000 Blackwell Server Edition"
# label: family, transformer config beyond its RealSize, fp8 + AoT ms/step measured at the first preset (RESULTS.md
# run 12; [schnell] is [dev]'s transformer), the card it was measured on, and whether issue 27 asks for its plan
MODELS = {
    "FLUX.1-dev": ("flux", {}, 98.4, "H100", True),
    "FLUX.1-schnell": ("flux", dict(guidance_embeds=False), 98.4, "H100 ([dev])", False),
    "FLUX.2 [dev]": ("flux2", {}, 290.0, "H200", True),
    "FLUX.2 [klein] 4B": ("flux2-klein", {}, 43.2, "H200", False),
    "Qwen-Image": ("qwen-image", {}, 200.8, "H200", True),
    "Z-Image-Turbo": ("z-image", {}, 76.1, "H100", False),
    # The videos' calls at batch one (RESULTS.md run 26; LTX-2's CFG batch of two took 518.8 ms). The distilled
    # recipe's stages are not measured: its request is estimated as a Space without timings asks (an H100's FLUX.1-dev
    # step x step_cost x step_work x the card's slowdown, aot/zerogpu.py)
    "Wan 2.2 A14B": ("wan", {}, 2414.9, "H100", True),
    "Wan 2.2 TI2V-5B": ("wan-5b", {}, 791.7, "H100", True),
    "LTX-2": ("ltx2", {}, 259.4, "H100", True),
    "LTX-2 distilled": ("ltx2", {}, None, "none", True),
}
RECIPES = {"LTX-2 distilled": "distilled"}  # a row's RECIPE, where not the standard one call (its presets: outputs)
FIXED_S = 0.5  # text encoders, VAE and hand-over per image, as if measured (Durations applies its 3 s floor)
# A video's VAE decode is seconds: Wan's as measured eager on the H100 (RESULTS.md run 25); LTX-2's is not measured
FIXED_VIDEO_S = {"Wan 2.2 A14B": 2.1, "Wan 2.2 TI2V-5B": 6.3}


def real_pipe(label: str):
    """The family's tiny pipeline (defaults, tokenizers) with every model at real size on the meta device."""
    name, overrides = MODELS[label][:2]
    pipe, params = lib.real_pipeline(family_named(name), "meta", text="real", config=overrides)
    models = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    assert all(t.is_meta for m in models for t in [*m.parameters(), *m.buffers()]) and all(
        p.dtype == torch.bfloat16 for m in models for p in m.parameters()), label
    return pipe, {k: round(v, 2) for k, v in params.items()}


def spaces_card() -> ZeroGPUCard:
    entries = json.loads(files("spaces.zero").joinpath("configs.json").read_text())
    return ZeroGPUCard.from_spaces(next(e for e in entries if e["model"] == CARD))


def main() -> int:
    diffusers.utils.logging.set_verbosity_error()  # its float32-modules warning, once per model built
    t0, card = time.perf_counter(), spaces_card()
    gib = lambda n: round(n / GiB, 2)  # noqa: E731
    plans, today, models = [], [], []
    print(f"{card.model} ({'sm_%d%d' % card.capability}): whole card {gib(card.memory)} GiB, large "
          f"{gib(card.memory_for(Size.LARGE))} GiB, xlarge_threshold {gib(card.xlarge_threshold)} GiB, "
          f"duration_factor {card.duration_factor}\n")
    print(f"{'model':18} {'fp8':>4} {'size':>6} {'transformer':>11} {'packed/threshold GiB':>21} "
          f"{'need/budget GiB':>16} {'fits':>5} {'auto':>6}")
    for label, (name, _, step_ms, measured_on, asked) in MODELS.items():
        family = family_named(name)
        pipe, params = real_pipe(label)
        recipe = family.distilled if RECIPES.get(label) else None
        own = recipe or family  # whose presets and defaults
        presets = parse_presets(own.presets, family.multiple * (recipe.scale if recipe else 1))
        tokens = max(map(family.tokens, presets))  # a two-stage recipe's largest call: its second stage
        extra = (lib.real_upsampler(family, pipe, "meta").latent_upsampler,) if recipe else ()
        footprint = measure_footprint(pipe, tokens, family.keep_bf16, family.activation_bytes_per_token, extra)
        models.append(dict(model=label, params_b=params, image_tokens=tokens, gib=dict(
            transformer={mode: gib(n) for mode, n in footprint.transformer.items()},
            text_encoders=gib(footprint.text_encoders), other=gib(footprint.other),
            activations=gib(footprint.activations))))
        by_probe = {}
        # QUANTIZATION=auto on sm_120 decides fp8; a failed fp8 probe turns that decision into "none" before the plan
        # (optimization._probe). Passing "fp8" with fp8_ok=False would keep fp8: `decided` is tried first, unchecked.
        for fp8_ok, decided in ((True, "fp8"), (False, "none")):
            by_size = {s: choose_resident_plan(decided, True, footprint, card.memory_for(s),
                                               card.xlarge_threshold if s is Size.LARGE else None, fp8_ok, True)
                       for s in card.sizes}
            auto = choose_size("auto", card, {s: p.fits for s, p in by_size.items()}).value
            by_probe[fp8_ok] = (by_size, auto)
            for size, plan in by_size.items():
                row = dict(model=label, fp8_ok=fp8_ok, decided=decided, size=size.value,
                           transformer=plan.quantization, packed_gib=plan.packed_gib, need_gib=plan.need_gib,
                           budget_gib=plan.budget_gib, fits=plan.fits, auto=auto, reason=plan.reason,
                           threshold_gib=gib(card.xlarge_threshold) if size is Size.LARGE else None)
                plans.append(row)
                if asked:
                    limit = f"{row['threshold_gib']:.2f}" if row["threshold_gib"] else "-"
                    print(f"{label:18} {'ok' if fp8_ok else 'fail':>4} {size.value:>6} {plan.quantization:>11} "
                          f"{plan.packed_gib:>12.2f} / {limit:>6} {plan.need_gib:>7.2f} / {plan.budget_gib:>6.2f} "
                          f"{str(plan.fits):>5} {auto:>6}")

        # ZeroGPU today: the default request at the first preset, on `large`, and on `xlarge` where auto picks it
        defaults, preset = own.defaults(pipe), presets[0]
        model = Model(pipe, family, defaults, presets, recipe=recipe)
        calls = 2 if defaults.guidance_kind is Guidance.CFG and defaults.guidance > 1 else 1
        by_size, auto = by_probe[True]
        for size in (Size.LARGE,) + ((Size.XLARGE,) if auto == Size.XLARGE.value else ()):
            factor = slowdown(card.model, card.sm_count, size)
            timed = ({preset.name: Timing(step_ms * factor / 1000, FIXED_VIDEO_S.get(label, FIXED_S) * factor)}
                     if step_ms else {})
            durations = Durations(timed, True, family.step_cost,
                                  factor, by_size[size].packed_gib, card.factor_for(size),
                                  2 if size is Size.XLARGE else 1, True, tokens=family.tokens, stages=model.stages,
                                  fixed_steps=bool(defaults.fixed_steps))
            steps, _ = durations.default_steps(preset, defaults.steps, calls)
            row = dict(model=label, size=size.value, auto=auto, preset=preset.name, steps=defaults.steps,
                       guidance=defaults.guidance, calls=calls, measured_ms=step_ms, measured_on=measured_on,
                       slowdown=factor, weight_gib=by_size[size].packed_gib, fits_memory=by_size[size].fits,
                       default_steps=steps)
            for key, new in (("warm", False), ("new", True)):
                seconds = durations.task_seconds(preset, defaults.steps, calls, new_worker=new, first_shape=new)
                row.update({f"{key}_s": round(seconds, 1), f"{key}_requested": durations.requested(seconds),
                            f"{key}_granted": durations.granted(seconds), f"{key}_fits": durations.fits(seconds)})
            today.append(row)
    print("\n(fp8: the fp8 probe on the card; fail plans from QUANTIZATION's decision turned to none. packed: what "
          "spaces packs at startup and compares with xlarge_threshold; need: packed + activations at the largest "
          "native preset + 1 GiB slack; auto: the size ZEROGPU_SIZE=auto picks. Every family's figures are in the "
          "JSON.)")

    print(f"\nZeroGPU today: default request at the first native preset, fp8 + AoT, limit {MAX_TASK_SECONDS} s. "
          f"Step = measured ms x slowdown; the slowdowns ({slowdown(card.model, card.sm_count, Size.LARGE)} large, "
          f"{slowdown(card.model, card.sm_count, Size.XLARGE)} xlarge) rest on published specs, not measured.")
    print(f"{'model':18} {'size':>6} {'preset':>12} {'steps':>7} {'calls':>5} {'step ms':>14} {'x':>4} {'weights':>7} "
          f"{'warm s':>6} {'req':>4} {'granted':>7} {'fits':>5} {'new s':>6} {'req':>4} {'granted':>7} {'fits':>5}")
    for r in today:
        note = "" if r["fits_memory"] else "  (does not fit this size: auto picks xlarge)"
        print(f"{r['model']:18} {r['size']:>6} {r['preset']:>12} {r['steps']:>3}->{r['default_steps']:<3} "
              f"{r['calls']:>5} {r['measured_ms'] or 'est.':>6} {r['measured_on'][:4]:>7} {r['slowdown']:>4} "
              f"{r['weight_gib']:>7.2f} "
              f"{r['warm_s']:>6} {r['warm_requested']:>4} {r['warm_granted']:>7} {str(r['warm_fits']):>5} "
              f"{r['new_s']:>6} {r['new_requested']:>4} {r['new_granted']:>7} {str(r['new_fits']):>5}{note}")
    print("(steps: the default, and after Durations.default_steps lowers it to fit; est.: no step measured on any "
          "GPU, the H100 estimate x step_cost x step_work x slowdown, as a Space without timings asks)")
    print("(s: what the task needs, margin included; req: @spaces.GPU(duration=...); granted: req x duration_factor, "
          "what ZeroGPU enforces; new: a new worker's first request, weights copied and programs loaded)")
    print(json.dumps({"card": card.__dict__, "slowdown_source": "published specs, not measured", "fixed_s": FIXED_S,
                      "max_task_seconds": MAX_TASK_SECONDS, "models": models, "plans": plans, "today": today,
                      "torch": torch.__version__, "seconds": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
