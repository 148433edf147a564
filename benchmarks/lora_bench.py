"""What LoRAs cost once compiled (aot/lora.py): a family's transformer at its real size (random weights) with random
LoRAs of a real rank, each variant written in the product's settings and served by the product's own
`optimize_pipeline_`, against eager diffusers with the same LoRA loaded as an adapter.

Variants, each a fresh build with the same weights (QUANTIZATION, AOT_SCOPE and the rest as given with --settings):
  base        no LoRA;
  fused       LORAS=<lora a>: per-step ms against base (target: within 1%), and agreement with eager diffusers;
  switchable  LORA_CHOICES=<lora a>,<lora b>: per-step ms with "none" and with "a" in place against base (target:
              at most 5% more), the switch's latency (target: at most 1 s; synchronized, median of --switches),
              host and GPU memory per extra choice, and agreement with eager diffusers for "none" and "a".
Agreement is the relative L2 error of one step on the same recorded call against eager bf16 diffusers: for base and
"none", the model without LoRA; for fused and "a", the model with lora a loaded by `load_lora_weights` (not fused).
Base's own error (fp8 against bf16) is the floor the others are read against.

The kept design swaps fused weights in place; the other two the issue names are not measured here, for the reasons
aot/lora.py gives (the LoRA's matrices as program inputs add two GEMMs per touched layer to every step; diffusers'
hotswap needs the adapters compiled in, the same cost).

The random LoRAs touch every projection of every block by default (--targets): the largest switch there is.

    python benchmarks/lora_bench.py --rank 64                           # FLUX.1-dev size, 1024x1024, fp8, on a GPU
    python benchmarks/lora_bench.py --rank 64 --settings QUANTIZATION=none
    python benchmarks/lora_bench.py --tiny --device cpu                 # smoke test: the tiny pipeline, AoT on CPU

Prints one RESULT line per figure, a table, then one JSON document on its last line.
"""
from __future__ import annotations

import lib  # first: it corrects CXX before torch is imported, and puts the project on sys.path

import argparse
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

import optimization
from aot import lora
from aot.families import FAMILIES, family_named
from aot.model import load_model
from aot.programs import capture_inputs
from settings import LORA_NONE, Settings
from step_bench import release

log = logging.getLogger("lora-bench")
# FLUX.1's projections, in both block kinds: what a LoRA trained on every linear layer of its blocks touches
TARGETS = ("to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out,ff.net.0.proj,ff.net.2,"
           "ff_context.net.0.proj,ff_context.net.2,proj_mlp,proj_out")
# lora_B scaled so that a random LoRA changes a step's output by a few percent, as a trained one does, rather than
# drowning the random weights (peft's random init makes both factors about as large as the weights)
B_SCALE = 0.05


def make_lora(pipe, folder: Path, name: str, rank: int, targets: list[str], seed: int) -> Path:
    """A LoRA of random matrices on `pipe`'s transformer, saved as diffusers saves one; the transformer is left as
    it was."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    transformer = pipe.transformer
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False),
                            adapter_name=name)
    state = get_peft_model_state_dict(transformer, adapter_name=name)
    state = {k: (v * B_SCALE if ".lora_B." in k else v).to(torch.bfloat16).cpu() for k, v in state.items()}
    transformer.delete_adapters(name)
    transformer.unload_lora()  # plain Linear layers again
    type(pipe).save_lora_weights(folder, transformer_lora_layers=state, weight_name=f"{name}.safetensors")
    return folder / f"{name}.safetensors"


class LoraBench:
    def __init__(self, args):
        self.args, self.device = args, args.device
        self.family = family_named(args.family)
        self.dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.base = {"MODEL_ID": f"tiny-{self.family.name}" if args.tiny else f"bench/{self.family.name}-real-size",
                     "AOT_CACHE_DIR": args.cache_dir, "COMPILE": "aoti",
                     "PRESETS": args.presets or (self.family.tiny_presets if args.tiny else
                                                 self.family.presets).split(",")[0],
                     **dict(item.split("=", 1) for item in filter(None, args.settings.split(",")))}
        self.folder = Path(tempfile.mkdtemp(prefix="lora-bench-"))
        self.files, self.inputs, self.expected, self.base_ms = {}, None, {}, None

    def model(self, env: dict):
        settings = Settings.from_env({**self.base, **env}, has_cuda=self.device == "cuda")
        pipe, _ = lib.real_pipeline(self.family, self.device, tiny=self.args.tiny, dtype=self.dtype)
        release()
        return settings, load_model(settings, pipe)

    def reference(self) -> dict:
        """Eager bf16 without optimizing: makes the LoRAs, records the transformer's call, and its outputs without a
        LoRA and with lora a loaded as diffusers loads it."""
        settings, model = self.model({"COMPILE": "none", "QUANTIZATION": "none"})
        targets = self.args.targets.split(",")
        self.files = {name: make_lora(model.pipe, self.folder, name, self.args.rank, targets, seed)
                      for name, seed in (("a", 1), ("b", 2))}
        preset = model.presets[0]
        call = capture_inputs(model, model.pipe.transformer, preset)
        self.inputs = torch.utils._pytree.tree_map(lambda v: v.cpu() if isinstance(v, torch.Tensor) else v, call)
        ms, out = self.step(model)
        self.expected[LORA_NONE] = out
        model.pipe.load_lora_weights(str(self.folder), weight_name=self.files["a"].name, adapter_name="a")
        lora_ms, self.expected["a"] = self.step(model)
        result = dict(variant=f"eager {str(self.dtype).removeprefix('torch.')}", preset=preset.name, ms=round(ms, 2),
                      ms_unfused_lora=round(lora_ms, 2),
                      lora_changes_output=round(lib.rel_err(self.expected["a"], out), 4),
                      lora_mib=round(self.files["a"].stat().st_size / 2**20, 1))
        lib.emit("reference", **result)
        return result

    def step(self, model) -> tuple[float, torch.Tensor]:
        args, kwargs = torch.utils._pytree.tree_map(
            lambda v: v.to(self.device) if isinstance(v, torch.Tensor) else v, self.inputs)
        ms, out = lib.median_ms(lambda: model.pipe.transformer(*args, **kwargs), self.device, self.args.warmup,
                                self.args.iters)
        return ms, lib.sample(out).float().cpu()

    def variant(self, name: str, env: dict) -> dict:
        settings, model = self.model(env)
        lib.peak_gib()
        t0 = time.perf_counter()
        report = optimization.optimize_pipeline_(model, settings)
        result = dict(variant=name, setup_s=round(time.perf_counter() - t0, 1), compile=report.compile,
                      compile_source=report.compile_source, quantization=report.quantization,
                      fallbacks=report.fallbacks, resident_gib=lib.allocated_gib())
        choices = lora.choices_of(model)
        ms, out = self.step(model)
        result.update(self.against(name, ms, out, "a" if name == "fused" else LORA_NONE))
        if choices is not None:
            result.update(self.switching(model, choices, report))
        lib.emit("variant", **result)
        return result

    def against(self, label: str, ms: float, out: torch.Tensor, expected: str) -> dict:
        """A step's ms against base's, and its error against eager diffusers' with the same LoRA (or none)."""
        self.base_ms = self.base_ms or ms
        return {f"{label}_ms": round(ms, 2), f"{label}_vs_base": round(ms / self.base_ms - 1, 4),
                f"{label}_rel_err": round(lib.rel_err(out, self.expected[expected]), 5)}

    def switching(self, model, choices, report) -> dict:
        """Switch latency (each switch synchronized), a step with "a" in place, and the memory the choices take."""
        allocated = torch.cuda.memory_allocated() if self.device == "cuda" else 0
        lib.peak_gib()
        seconds = []
        for i in range(self.args.switches):
            lib.sync(self.device)
            t0 = time.perf_counter()
            with choices.using("a" if i % 2 == 0 else LORA_NONE):
                lib.sync(self.device)
            seconds.append(time.perf_counter() - t0)
        with choices.using("a"):
            ms, out = self.step(model)
        sizes = {c["name"]: c["host_bytes"] for c in report.lora_choices}
        return dict(**self.against("with_a", ms, out, "a"), switch_ms=round(1000 * statistics.median(seconds), 2),
                    switch_ms_max=round(1000 * max(seconds), 2), switches=len(seconds),
                    host_bytes_per_choice=sizes, host_bytes_base=report.memory["lora_choices"]["base_host_bytes"],
                    gpu_gib_per_choice=round((torch.cuda.memory_allocated() - allocated) / lib.GiB / len(sizes), 3)
                    if self.device == "cuda" else None,
                    switch_peak_gib=lib.peak_gib(),
                    pinned=all(t.is_pinned() for layers in choices.served.values() for params in layers.values()
                               for parts in params.values() for t in parts))


def print_table(document: dict) -> None:
    print(f"\n{'variant':<12} {'ms/step':>8} {'vs base':>8} {'rel err':>9}   notes")
    ref = document["reference"]
    print(f"{ref['variant']:<12} {ref['ms']:>8} {'':>8} {'':>9}   unfused LoRA {ref['ms_unfused_lora']} ms; the LoRA "
          f"changes a step by {ref['lora_changes_output']:.1%}")
    for r in document["variants"]:
        if "error" in r:
            print(f"{r['variant']:<12} ERROR {r['error'][:120]}")
            continue
        label = r["variant"]
        print(f"{label:<12} {r[f'{label}_ms']:>8} {r[f'{label}_vs_base']:>8.2%} {r[f'{label}_rel_err']:>9.2e}   "
              f"{r['compile_source']}{' FELL BACK' if r['fallbacks'] else ''}")
        if "switch_ms" in r:
            host = {name: round(size / lib.GiB, 3) for name, size in r["host_bytes_per_choice"].items()}
            print(f"{'  with a':<12} {r['with_a_ms']:>8} {r['with_a_vs_base']:>8.2%} {r['with_a_rel_err']:>9.2e}   "
                  f"switch {r['switch_ms']} ms (max {r['switch_ms_max']}), host GiB {host}, GPU GiB per choice "
                  f"{r['gpu_gib_per_choice']}, pinned {r['pinned']}")
    print()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="flux", choices=[f.name for f in FAMILIES])
    parser.add_argument("--presets", default="", help="PRESETS, one preset; default: the family's first native one")
    parser.add_argument("--settings", default="QUANTIZATION=fp8", metavar="NAME=VALUE,...",
                        help="the product's settings for every variant (default QUANTIZATION=fp8; none on a CPU)")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--targets", default=TARGETS, help="the layers the random LoRAs touch, by name")
    parser.add_argument("--tiny", action="store_true", help="the family's tiny pipeline (a smoke test)")
    parser.add_argument("--switches", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--cache-dir", default="", help="AOT_CACHE_DIR; default: a fresh temporary directory")
    parser.add_argument("--out", default="", help="also write the JSON here")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if (args.device == "cuda") != torch.cuda.is_available():
        parser.error(f"--device {args.device}, but torch {'sees no' if args.device == 'cuda' else 'sees a'} GPU")
    if args.device == "cpu" and args.settings == parser.get_default("settings"):
        args.settings = "QUANTIZATION=none"  # fp8 needs a GPU
    temporary = not args.cache_dir
    args.cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="lora-bench-aot-")
    bench = LoraBench(args)
    document = dict(bench="lora", family=args.family, tiny=args.tiny, rank=args.rank, settings=args.settings,
                    targets=args.targets, reference=bench.reference(), variants=[])
    release()
    a, b = (str(bench.files[name]) for name in ("a", "b"))
    for name, env in (("base", {}), ("fused", {"LORAS": a}), ("switchable", {"LORA_CHOICES": f"{a},{b}"})):
        try:
            document["variants"].append(bench.variant(name, env))
        except Exception as err:
            log.exception("variant %s failed", name)
            document["variants"].append(dict(variant=name, error=f"{type(err).__name__}: {str(err)[:500]}"))
        release()
    if temporary:
        shutil.rmtree(args.cache_dir, ignore_errors=True)
    shutil.rmtree(bench.folder, ignore_errors=True)
    print_table(document)
    document["error"] = ", ".join(r["variant"] for r in document["variants"] if "error" in r) or None
    return lib.finish(document, args.device, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
