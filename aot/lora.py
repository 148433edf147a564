"""LoRAs: LORAS fused into the base weights before anything quantizes or compiles them, and LORA_CHOICES, one of
which a request may ask for, swapped into the very weights the compiled programs read, so nothing recompiles.

Both go through diffusers' own loader (`load_lora_weights`, `fuse_lora`), which reads every LoRA format it knows and
does the fusing; afterwards the adapters are unloaded, so the modules that compile are plain Linear layers again.

A switchable choice is kept as the values it fuses into the layers it touches, in the layout they are served in
(fp8: torchao's data and scales, quantized from the fused bf16 values as the base was; int8/int4: the template's
codes and scales), in host memory, with the base's values of the same layers to switch back to "none". A switch
copies them into the layers' own tensors in place: the programs bind those tensors once (aot/programs.py), so the
next call reads the new values, as streamed blocks' ring slots are read (aot/streaming.py). Why this design, of the
issue's three: a step costs exactly what it costs without a LoRA (the programs are the same and the weights as
dense; the LoRA's low-rank matrices as program inputs add two small GEMMs to every touched layer, on every step,
and fp8 programs would run that path in bf16), a switch costs one host-to-device copy of the touched layers, and
diffusers' hotswap swaps the adapters' low-rank weights, which needs the adapters kept in the compiled module and
compiled with it (the same per-step cost), and a torch.compile that guards on them. benchmarks/lora_bench.py
measures the chosen design's costs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from aot.cache import _sha256
from aot.family import Guidance
from aot.model import experts
from aot.quantize import WeightOnlyLinear
from aot.report import Report
from aot.streaming import tensor_parts
from settings import LORA_DEFAULTS_KEY, LORA_MAX_RANK, LORA_NONE, LoraSpec, Settings

log = logging.getLogger("aot-space")
FUSING = "aot_fusing"  # the adapter name a LoRA is loaded under while it is fused or read
# A LORAS entry's expert= (settings.EXPERTS) -> the components it is fused into: diffusers names the low-noise expert
# `transformer_2` (its `load_into_transformer_2`); a pipeline of one transformer takes "high", its only one
EXPERT_COMPONENTS = {"high": ("transformer",), "low": ("transformer_2",), "both": ("transformer", "transformer_2")}


class LoraRefused(ValueError):
    """A LoRA that startup refuses; the message names the file and the problem."""


def resolve(spec: LoraSpec) -> Path:
    """The entry's safetensors file: local, or downloaded from the Hub (at its revision)."""
    path = Path(spec.source)
    if path.exists():
        if path.is_dir():
            path = path / spec.weight_name if spec.weight_name else _only_safetensors(
                spec, [p.name for p in path.iterdir()], path)
    else:
        from huggingface_hub import hf_hub_download, list_repo_files

        try:
            name = spec.weight_name or _only_safetensors(spec, list_repo_files(spec.source, revision=spec.revision),
                                                         spec.source)
            path = Path(hf_hub_download(spec.source, name, revision=spec.revision))
        except LoraRefused:
            raise
        except Exception as err:  # noqa: BLE001 - offline, missing or gated: all mean "this LoRA cannot be had"
            raise LoraRefused(f"LoRA {spec}: not a local file and not fetched from the Hub "
                              f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    if not path.is_file():
        raise LoraRefused(f"LoRA {spec}: no such file {path}")
    if path.suffix != ".safetensors":
        raise LoraRefused(f"LoRA {path}: only .safetensors files are loaded (a pickled file can run code)")
    return path


def _only_safetensors(spec: LoraSpec, names: list[str], where) -> str:
    found = [name for name in names if name.endswith(".safetensors")]
    if len(found) != 1:
        raise LoraRefused(f"LoRA {spec}: {where} holds {len(found)} .safetensors files ({', '.join(found[:4])}); "
                          "name one as repo_or_path:weight_name")
    return found[0]


def _read(pipe, path: Path) -> tuple[dict, dict]:
    """The LoRA's state dict as diffusers converts it for this pipeline, and the file's metadata."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        state = pipe.lora_state_dict(str(path.parent), weight_name=path.name)
    except Exception as err:  # noqa: BLE001 - a truncated file, not safetensors, an unknown format: all refused
        raise LoraRefused(f"LoRA {path}: not a readable LoRA file ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''})") from None
    return (state[0] if isinstance(state, tuple) else state), metadata


def check(pipe, path: Path, state: dict, switchable: bool) -> tuple[dict[str, int], list[str]]:
    """Refuses a LoRA that does not fit this pipeline: components it cannot load into, layers that name no Linear of
    the transformer (a LoRA for another family) or of another width, a rank over LORA_MAX_RANK, text-encoder layers in
    a switchable one. Returns the transformer layers it changes (name -> rank) and the text encoders it changes."""
    loadable = set(getattr(pipe, "_lora_loadable_modules", ()))
    components = {key.split(".", 1)[0] for key in state}
    if components - loadable:
        raise LoraRefused(f"LoRA {path}: it has layers for {', '.join(sorted(components - loadable))}, which "
                          f"{type(pipe).__name__} loads no LoRA into (it loads into {', '.join(sorted(loadable))})")
    texts = sorted(components - {"transformer"})
    if texts and switchable:
        raise LoraRefused(f"LoRA {path}: it changes {', '.join(texts)} too, and a LORA_CHOICES entry changes the "
                          "transformer only (every choice shares the prompt embeddings); fuse it with LORAS instead")
    shapes: dict[str, dict[str, tuple]] = {}
    for key, tensor in state.items():
        for part in ("lora_A", "lora_B"):
            if key.startswith("transformer.") and f".{part}." in key:
                shapes.setdefault(key.removeprefix("transformer.").partition(f".{part}.")[0], {})[part] = tensor.shape
    if not shapes:
        raise LoraRefused(f"LoRA {path}: it has no LoRA layers for the transformer")
    modules = dict(pipe.transformer.named_modules())
    family = type(pipe.transformer).__name__
    missing = [name for name in shapes if type(modules.get(name)) is not torch.nn.Linear]
    if missing:
        which = ("none of its" if len(missing) == len(shapes) else f"{len(missing)} of its")
        raise LoraRefused(f"LoRA {path}: {which} {len(shapes)} layers names a Linear layer of this {family} "
                          f"(e.g. {missing[0]!r}): its keys do not match the model's modules, a LoRA for another "
                          "model family?")
    ranks = {}
    for name, pair in shapes.items():
        linear, a, b = modules[name], pair.get("lora_A"), pair.get("lora_B")
        if a is None or b is None:
            raise LoraRefused(f"LoRA {path}: layer {name!r} has no {'lora_A' if a is None else 'lora_B'} matrix")
        if tuple(a) != (a[0], linear.in_features) or tuple(b) != (linear.out_features, a[0]):
            raise LoraRefused(f"LoRA {path}: layer {name!r} maps {a[-1]} to {b[0]} features, this {family}'s maps "
                              f"{linear.in_features} to {linear.out_features}: a LoRA for another model family or size")
        if a[0] > LORA_MAX_RANK:
            raise LoraRefused(f"LoRA {path}: rank {a[0]} at {name!r} is over LORA_MAX_RANK={LORA_MAX_RANK} "
                              "(settings.py says why)")
        ranks[name] = a[0]
    return ranks, texts


@contextlib.contextmanager
def _loaded(pipe, path: Path, ranks: dict[str, int], component: str = "transformer"):
    """The LoRA loaded as adapter FUSING into `component` (a second expert: `transformer_2`, through diffusers'
    `load_into_transformer_2`), checked to have reached every layer it names (diffusers only warns of keys it drops);
    yields that transformer's wrapped layers by name. Unloaded after, whatever happens."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    second = {"load_into_transformer_2": True} if component == "transformer_2" else {}
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=FUSING, **second)
    try:
        wrapped = {name: module for name, module in getattr(pipe, component).named_modules()
                   if isinstance(module, BaseTunerLayer)}
        if set(wrapped) != set(ranks):
            raise LoraRefused(f"LoRA {path}: diffusers applied {len(wrapped)} of its {len(ranks)} transformer layers")
        yield wrapped
    finally:
        pipe.unload_lora_weights()


def _asked_defaults(spec: LoraSpec, path: Path, metadata: dict) -> dict:
    """The defaults a fused LoRA asks for: its file's LORA_DEFAULTS_KEY metadata, then the entry's own options."""
    try:
        asked = json.loads(metadata.get(LORA_DEFAULTS_KEY, "{}"))
        asked = {key: {"steps": int, "guidance": float}[key](value) for key, value in asked.items()}
    except (ValueError, TypeError, KeyError, AttributeError):  # not JSON, not an object, another key, not a number
        raise LoraRefused(f"LoRA {path}: its {LORA_DEFAULTS_KEY!r} metadata is not a JSON object of steps and "
                          "guidance, e.g. {\"steps\": 8, \"guidance\": 1.0}") from None
    return {**asked, **{key: value for key, value in (("steps", spec.steps), ("guidance", spec.guidance))
                        if value is not None}}


def _host(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A Linear's parameters, copied to host memory."""
    return {name: p.detach().to("cpu", copy=True) for name, p in layer._parameters.items() if p is not None}


def fuse_(model, settings: Settings, report: Report, stored) -> None:
    """Step 0, before anything quantizes: every LORAS entry fused into the weights (and its defaults applied), and
    every LORA_CHOICES entry's fused values of the layers it touches, and the base's, read into host memory
    (`transformer.lora_choices`; served by `serve_choices_` once the weights have their final layout)."""
    if not (settings.loras or settings.lora_choices):
        return
    pipe = model.pipe
    entries = ", ".join(map(str, (*settings.loras, *settings.lora_choices)))
    if not hasattr(pipe, "load_lora_weights"):
        raise LoraRefused(f"{type(pipe).__name__} has no LoRA loader in diffusers, so LoRAs ({entries}) cannot be "
                          "applied to it; unset LORAS and LORA_CHOICES")
    two = len(experts(pipe)) > 1
    if two and settings.lora_choices:
        raise LoraRefused(f"{type(pipe).__name__} has two experts: LORA_CHOICES ({entries}) are switched in one "
                          "transformer's weights and are not built for two yet; fuse the LoRAs with LORAS and "
                          ";expert=high, low or both, and unset LORA_CHOICES")
    for spec in settings.loras:  # diffusers loads a LoRA into one expert a call: which one is the entry's to say
        if two and spec.expert is None:
            raise LoraRefused(f"LoRA {spec}: {type(pipe).__name__} has two experts, the high-noise `transformer` and "
                              "the low-noise `transformer_2`; say which this LoRA is for with ;expert=high, low or "
                              "both (Wan 2.2's distillation LoRAs come one file per expert)")
        if not two and spec.expert is not None:
            raise LoraRefused(f"LoRA {spec}: ;expert={spec.expert} is for a pipeline of two experts, and "
                              f"{type(pipe).__name__} has one transformer; leave it out")
    if stored:
        raise LoraRefused(f"MODEL_ID's transformer is stored quantized ({stored.value}): LoRAs ({entries}) are fused "
                          "into bf16 weights, which it does not have; point MODEL_ID at the unquantized model")
    asked: dict = {}
    for spec in settings.loras:
        path = resolve(spec)
        state, metadata = _read(pipe, path)
        ranks, texts = check(pipe, path, state, switchable=False)  # two experts share one architecture
        for i, component in enumerate(EXPERT_COMPONENTS[spec.expert or "high"]):
            with _loaded(pipe, path, ranks, component):
                pipe.fuse_lora(components=[component, *(texts if i == 0 else [])], lora_scale=spec.scale,
                               adapter_names=[FUSING])
        defaults = _asked_defaults(spec, path, metadata)
        clash = {key for key in defaults if key in asked and asked[key] != defaults[key]}
        if clash:
            raise LoraRefused(f"LoRA {path} asks for other defaults ({defaults}) than the LoRAs before it ({asked})")
        asked.update(defaults)
        report.loras.append(dict(name=spec.name, file=str(path), sha256=_sha256(path), scale=spec.scale,
                                 layers=len(ranks), rank=max(ranks.values()), text_encoders=texts, defaults=defaults,
                                 **({"expert": spec.expert} if spec.expert else {})))
        log.info("LoRA %s fused (scale %g, %d transformer layers%s%s)", path, spec.scale, len(ranks),
                 f", and {', '.join(texts)}" if texts else "", f", expert {spec.expert}" if spec.expert else "")
    if "guidance" in asked and model.defaults.guidance_kind is Guidance.NONE:
        raise LoraRefused(f"LoRAs ask for guidance {asked['guidance']}, but this {model.family.name} model takes none")
    if "steps" in asked and model.defaults.fixed_steps and asked["steps"] != model.defaults.steps:
        raise LoraRefused(f"LoRAs ask for {asked['steps']} steps, but {model.defaults.fixed_steps}")
    if "guidance" in asked and model.defaults.guidance_2 is not None:
        # one guidance for both experts: a distillation LoRA's 1.0 turns CFG off in each (the second's own default,
        # Wan 2.2 A14B's 3.0, would keep it on for half the steps)
        asked["guidance_2"] = asked["guidance"]
    model.defaults = dataclasses.replace(model.defaults, **asked)
    if settings.lora_choices:
        pipe.transformer.lora_choices = _read_choices(pipe, settings.lora_choices, report)


def _read_choices(pipe, specs: tuple[LoraSpec, ...], report: Report) -> Choices:
    base: dict[str, dict[str, torch.Tensor]] = {}  # per touched layer, its values before any choice
    fused = {}
    for spec in specs:
        path = resolve(spec)
        state, _ = _read(pipe, path)
        ranks, _ = check(pipe, path, state, switchable=True)
        with _loaded(pipe, path, ranks) as wrapped:
            layers = {name: module.get_base_layer() for name, module in wrapped.items()}
            for name, layer in layers.items():
                base.setdefault(name, _host(layer))
            pipe.fuse_lora(components=["transformer"], lora_scale=spec.scale, adapter_names=[FUSING])
            fused[spec.name] = {name: _host(layer) for name, layer in layers.items()}
            pipe.unfuse_lora(components=["transformer"])
            with torch.no_grad():  # exactly the base again: unfusing subtracts, which rounds in bf16
                for name, layer in layers.items():
                    for key, value in base[name].items():
                        layer._parameters[key].copy_(value)
        report.lora_choices.append(dict(name=spec.name, file=str(path), sha256=_sha256(path), scale=spec.scale,
                                        layers=len(ranks), rank=max(ranks.values())))
    return Choices(fused={LORA_NONE: base, **fused})


def _served(module: torch.nn.Module, values: dict[str, torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """`values` (a Linear's weight and bias) as `module` serves its own now: quantized the same way (fp8 from the
    fused bf16 values, as the base was), each parameter flattened into the plain tensors the programs read."""
    weight, bias = values["weight"], values.get("bias")
    if isinstance(module, WeightOnlyLinear):
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        linear.weight = torch.nn.Parameter(weight, requires_grad=False)
        linear.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        params = WeightOnlyLinear(linear, module.bits)._parameters
    elif is_traceable_wrapper_subclass(module.weight):
        from torchao.quantization import Float8Tensor
        from torchao.quantization.granularity import PerRow, PerTensor

        current = module.weight
        if not isinstance(current, Float8Tensor):
            raise LoraRefused(f"LORA_CHOICES: weights in torchao's {type(current).__name__} cannot be switched (fp8's "
                              "Float8Tensor, int8 and int4 can); set QUANTIZATION=fp8, int8, int4 or none")
        granularity = PerTensor() if current.scale.numel() == 1 else PerRow()
        params = {"weight": Float8Tensor.from_hp(weight.to(current.dtype), float8_dtype=current.qdata.dtype,
                                                 granularity=granularity), "bias": bias}
    else:
        params = values
    return {name: [part.detach() for part in tensor_parts(p)] for name, p in params.items() if p is not None}


def _packed(layers: dict, pin: bool) -> dict:
    """One choice's tensors moved into one host buffer, as views of it. Pinned tensors allocated one by one are
    rounded up to powers of two by PyTorch's pinned-memory cache: about 1.7x the bytes (README, Known limits)."""
    tensors = [t for params in layers.values() for parts in params.values() for t in parts]
    offsets, total = [], 0
    for t in tensors:
        total = -(-total // 64) * 64  # every view aligned for its dtype, and for fast copies
        offsets.append(total)
        total += t.numel() * t.element_size()
    buffer = torch.empty(total, dtype=torch.uint8, pin_memory=pin)
    views = iter(buffer[o:o + t.numel() * t.element_size()].view(t.dtype).view(t.shape).copy_(t)
                 for o, t in zip(offsets, tensors))
    return {name: {key: [next(views) for _ in parts] for key, parts in params.items()}
            for name, params in layers.items()}


@dataclass
class Choices:
    """LORA_CHOICES in host memory, and the switch between them. `fused`: per choice ("none": the base), each touched
    layer's values as read (bf16), until `serve_` turns them into `served`: the same in the serving layout."""

    fused: dict[str, dict[str, dict[str, torch.Tensor]]]
    served: dict[str, dict[str, dict[str, list[torch.Tensor]]]] = field(default_factory=dict)
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)
    current: str = LORA_NONE
    switches: int = 0
    # Held from a switch to the end of the pipeline call it is for: a second thread can neither switch the weights
    # under a running call nor run on weights being switched
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def names(self) -> list[str]:
        return list(self.served or self.fused)

    def serve_(self, transformer: torch.nn.Module, device: torch.device) -> dict[str, int]:
        """Each choice's values in the layout the transformer's layers have now; returns each one's host bytes."""
        self.modules = {name: transformer.get_submodule(name) for name in self.fused[LORA_NONE]}
        sizes = {}
        for choice in list(self.fused):  # each layer's read values dropped once served: a full FLUX LoRA's are 24 GB
            layers = self.fused.pop(choice)
            self.served[choice], sizes[choice] = {}, 0
            for name in list(layers):
                module, values = self.modules[name], layers.pop(name)
                parts = _served(module, {k: v.to(device) for k, v in values.items()})
                for key, sources in parts.items():
                    targets = tensor_parts(module._parameters[key])
                    if [(t.shape, t.dtype) for t in targets] != [(s.shape, s.dtype) for s in sources]:
                        raise LoraRefused(f"LORA_CHOICES: {choice}'s {name}.{key} would be served as "
                                          f"{[(tuple(s.shape), s.dtype) for s in sources]}, the model's as "
                                          f"{[(tuple(t.shape), t.dtype) for t in targets]}")
                    parts[key] = [s.to("cpu") for s in sources]
                    sizes[choice] += sum(s.numel() * s.element_size() for s in parts[key])
                self.served[choice][name] = parts
            # pinned on a GPU's host: asynchronous copies at the bus' speed
            self.served[choice] = _packed(self.served[choice], pin=device.type == "cuda")
        return sizes

    @contextlib.contextmanager
    def using(self, choice: str):
        """Runs the block with `choice`'s weights in place: switched first if another choice's are there."""
        with self.lock:
            if choice != self.current:
                self._switch(choice)
            yield

    def _switch(self, choice: str) -> None:
        """Copies `choice`'s values into the layers' own tensors, and the base's into the layers the current choice
        touched and `choice` does not. The copies are queued on the stream the pipeline runs on: its kernels read the
        weights after them, with no wait here."""
        layers = {**{name: self.served[LORA_NONE][name] for name in self.served[self.current]}, **self.served[choice]}
        with torch.no_grad():
            for name, params in layers.items():
                module = self.modules[name]
                for key, sources in params.items():
                    for target, source in zip(tensor_parts(module._parameters[key]), sources):
                        target.copy_(source, non_blocking=True)
        self.current, self.switches = choice, self.switches + 1


def serve_choices_(model, report: Report) -> None:
    """The last step: LORA_CHOICES made ready to switch, in the weights' final layout (quantized, compiled or not).
    The host memory they take is recorded in the report's memory plan; they take no GPU memory (a switch copies
    into the weights' own tensors)."""
    choices = choices_of(model)
    if choices is None:
        return
    transformer = model.pipe.transformer
    if getattr(transformer, "block_stream", None) is not None:
        raise LoraRefused("LORA_CHOICES with transformer blocks streamed from host memory (low-VRAM mode) is not "
                          "supported: a switch would have to rewrite the streamed blocks' host copies; set LOW_VRAM=on "
                          "or off, a larger VRAM_LIMIT_GIB, or unset LORA_CHOICES")
    device = next(transformer.parameters()).device
    work = device if device.type == "cuda" and not (report.hardware and report.hardware.zerogpu) else torch.device(
        "cpu")
    sizes = choices.serve_(transformer, work)
    for entry in report.lora_choices:
        entry["host_bytes"] = sizes[entry["name"]]
    report.memory["lora_choices"] = {"host_bytes": sum(sizes.values()), "base_host_bytes": sizes[LORA_NONE],
                                     "device_bytes": 0}


def choices_of(model) -> Choices | None:
    return getattr(model.pipe.transformer, "lora_choices", None)


@contextlib.contextmanager
def using(model, choice: str):
    """A request's LoRA choice in place for the block (none without LORA_CHOICES)."""
    choices = choices_of(model)
    if choices is None:
        assert choice == LORA_NONE, choice
        yield
        return
    with choices.using(choice):
        yield
