"""Judges the demo model (assets/demo-model) with the judge in assets/shapes.py, loaded the way the app loads it
(no MODEL_ID, no GPU), on this machine's CPU:

    python assets/evaluate_demo.py                  # held-out / seen / two-object figures, eager
    python assets/evaluate_demo.py --time 10        # also seconds per image at the default preset and steps
    python assets/evaluate_demo.py --compile        # the same through the AoT-compiled transformer (COMPILE=aoti)
    python assets/evaluate_demo.py --examples assets/examples   # README's images of examples.txt, seed 0

Figures: of the images of each set, the share whose object has the asked colour, shape and position (both
objects, for two-object prompts). The last line is one JSON document.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from assets import shapes  # noqa: E402

FACTS = ("colour", "shape", "position")


def cases() -> dict[str, list[tuple[str, list[shapes.Thing]]]]:
    held = shapes.held_out()
    return {"held_out": shapes.evaluation_set(held), "seen": shapes.evaluation_set(shapes.seen_sample(held)),
            "two_objects": shapes.two_object_set(held)}


def evaluate(generate, presets) -> dict:
    """`generate(prompts, preset)` gives the same number of images for each prompt, prompt by prompt. Returns
    each set's share of images right per fact, over all presets, and the held-out set's per preset."""
    figures, per_preset = {}, {}
    for name, items in cases().items():
        right, count = Counter(), 0
        for preset in presets:
            images = generate([prompt for prompt, _ in items], preset)
            each = len(images) // len(items)
            here = Counter()
            for i, (_, things) in enumerate(items):
                for image in images[i * each:(i + 1) * each]:
                    here.update(fact for fact, ok in shapes.judge(image, things).items() if ok)
            right += here
            count += each * len(items)
            if name == "held_out":
                per_preset[preset.name] = {f: round(here[f] / (each * len(items)), 3) for f in FACTS}
        figures[name] = {**{f: round(right[f] / count, 3) for f in FACTS}, "images": count}
    figures["held_out_by_preset"] = per_preset
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=2, help="images per prompt and preset")
    parser.add_argument("--compile", action="store_true", help="COMPILE=aoti: the transformer AoT-compiled")
    parser.add_argument("--time", type=int, default=0, metavar="N", help="time N images at the default preset")
    parser.add_argument("--examples", type=Path, help="write examples.txt's prompts here as PNGs (seed 0)")
    parser.add_argument("--no-figures", action="store_true", help="skip the judged sets")
    args = parser.parse_args()

    import torch

    import optimization
    from aot.model import load_model
    from settings import DEMO_MODEL_DIR, Settings

    settings = Settings.from_env({"COMPILE": "aoti" if args.compile else "none",
                                  "AOT_CACHE_DIR": str(ROOT / ".aot-cache")}, has_cuda=False)
    model = load_model(settings)
    model.pipe.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    report = optimization.optimize_pipeline_(model, settings)
    optimize_s = time.perf_counter() - start
    steps = model.defaults.steps

    def image(prompt, preset, seed):
        return model(prompt, preset, steps, generator=torch.Generator().manual_seed(seed)).images[0]

    def generate(prompts, preset):
        return [image(p, preset, seed) for p in prompts for seed in range(args.seeds)]

    result = {"model": settings.model_id, "compile": report.compile, "optimize_s": round(optimize_s, 1),
              "steps": steps, "threads": torch.get_num_threads()}
    if args.time:
        preset = model.presets[0]
        image("a red circle on the left", preset, 0)  # warm-up
        seconds = []
        for seed in range(args.time):
            start = time.perf_counter()
            image("a red circle on the left", preset, seed)
            seconds.append(time.perf_counter() - start)
        result["seconds_per_image"] = {"preset": preset.name, "median": round(statistics.median(seconds), 3),
                                       "min": round(min(seconds), 3), "max": round(max(seconds), 3)}
        print(f"{preset.name}, {steps} steps, {report.compile}: {result['seconds_per_image']['median']:.3f} s an "
              f"image (median of {args.time})", flush=True)
    if args.examples:
        args.examples.mkdir(parents=True, exist_ok=True)
        prompts = (Path(DEMO_MODEL_DIR) / "examples.txt").read_text().splitlines()
        for i, prompt in enumerate(prompts, 1):
            image(prompt, model.presets[0], 0).save(args.examples / f"example-{i}.png")
            print(f"example-{i}.png: {prompt}")
    if not args.no_figures:
        result.update(evaluate(generate, model.presets))
        for name in ("held_out", "seen", "two_objects"):
            print(f"{name:12s} " + "  ".join(f"{f} {result[name][f]:.1%}" for f in FACTS)
                  + f"  ({result[name]['images']} images)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
