"""Capture, export, AOT-compile and install the transformer's programs, and dispatch each call to the program
compiled for its input shapes. Every program reads the modules' own parameters: one copy of the weights."""
from __future__ import annotations

import collections
import contextlib
import contextvars
import copy
import functools
import gc
import inspect
import logging
import math
import threading
import time
import unittest.mock
from pathlib import Path

import spaces
import torch
import torch.fx.experimental.proxy_tensor
from torch.utils._pytree import tree_flatten

from aot.families import Text
from aot.model import Model, repeated_block_lists
from settings import Preset

log = logging.getLogger("aot-space")

CAPTURE_PROMPT = "a photo of an astronaut riding a horse on the moon"
# Programs AOT-compiled by this process, by target ("" the whole transformer): /status shows them, so that what
# should compile nothing (a LORA_CHOICES switch, a request) is seen to
COMPILES: collections.Counter = collections.Counter()


class UnsupportedShape(ValueError):
    """The transformer was called with a shape that no compiled program serves."""


# A program's signature: for every input, in keyword order, the shape of each tensor in it (a dynamic axis as
# its [min, max] range) or the value of anything else (Python ints baked into the program). JSON-able, so it
# is kept in the cache's manifest beside the package.
Signature = list


def _leaves(value) -> list:
    return tree_flatten(value)[0]


@functools.cache
def _forward_signature(module_class: type) -> inspect.Signature:
    return inspect.signature(module_class.forward)  # read once per class: the dispatcher asks on every block call


def named_inputs(module: torch.nn.Module, args: tuple, kwargs: dict) -> dict:
    """A call's arguments by parameter name, positional ones included (Z-Image's blocks take them so)."""
    bound = _forward_signature(type(module)).bind(module, *args, **kwargs)
    return {name: value for name, value in list(bound.arguments.items())[1:]}


def signature(inputs: dict, spec: dict | None = None) -> Signature:
    """`inputs` by name; `spec`: torch.export's dynamic_shapes for them, keyed by the same names."""
    entries = []
    for name in sorted(inputs):
        leaves = _leaves(inputs[name])
        dims = tree_flatten((spec or {}).get(name), is_leaf=lambda x: x is None or isinstance(x, dict))[0]
        dims = dims if len(dims) == len(leaves) else [None] * len(leaves)
        entries.append([name, [_describe(leaf, dim) for leaf, dim in zip(leaves, dims)]])
    return entries


def _describe(leaf, dynamic: dict | None):
    if not isinstance(leaf, torch.Tensor):
        return repr(leaf)
    shape = list(leaf.shape)
    for axis, dim in (dynamic or {}).items():
        shape[axis] = [int(dim.min), int(dim.max)]
    return shape


def matches(expected: Signature, actual: Signature) -> bool:
    if [name for name, _ in expected] != [name for name, _ in actual]:
        return False
    for (_, want_leaves), (_, got_leaves) in zip(expected, actual):
        if len(want_leaves) != len(got_leaves):
            return False
        for want, got in zip(want_leaves, got_leaves):
            if isinstance(want, str) or isinstance(got, str):
                if want != got:
                    return False
            elif len(want) != len(got) or not all(w[0] <= g <= w[1] if isinstance(w, list) else w == g
                                                  for w, g in zip(want, got)):
                return False
    return True


def _short(sig: Signature) -> str:
    return ", ".join(f"{name} {leaves[0]}" for name, leaves in sig if leaves and isinstance(leaves[0], list))


class ProgramRunner:
    """Runs compiled programs in one private `contextvars` context.

    spaces' lazy AOTI models load their package on first use and cache it per context. Gradio runs each
    request in a fresh context copy, so without this every request would load every package again.
    """

    def __init__(self):
        self._context = contextvars.copy_context()
        self._lock = threading.Lock()  # a context can be entered by one thread at a time

    def __call__(self, program, *args, **kwargs):
        with self._lock:
            return self._context.run(program, *args, **kwargs)


# While a CUDA graph is captured (aot/graphs.py): the list of the program instances it calls
_CAPTURED: contextvars.ContextVar[list | None] = contextvars.ContextVar("captured", default=None)


@contextlib.contextmanager
def capturing(captured: list):
    """Inside, every dispatched call records its (dispatcher, program, instance) in `captured`. After a capture those
    instances belong to the graph: AOTInductor's runner records a completion event on each call, and one recorded
    inside a capture breaks every later uncaptured call of that instance ("invalid argument", RESULTS.md run 16).
    `retire` then gives their programs a fresh instance for any uncaptured call."""
    token = _CAPTURED.set(captured)
    try:
        yield
    finally:
        _CAPTURED.reset(token)


def retire(captured: list) -> None:
    for dispatch, program, _ in captured:
        dispatch.live[id(program)] = None


class ShapeDispatch:
    """Replaces a module's `forward`: routes each call to the program whose signature its inputs match."""

    def __init__(self, module: torch.nn.Module, programs: list[tuple[Signature, object, str]], runner: ProgramRunner):
        self.module = module
        self.programs = programs  # (signature, program, the resolutions it serves)
        self.runner = runner
        self.live: dict[int, object] = {}  # a program a CUDA graph took -> its fresh instance (None: not made yet)

    def program_for(self, args: tuple, kwargs: dict):
        actual = signature(named_inputs(self.module, args, kwargs))
        for expected, program, _ in self.programs:
            if matches(expected, actual):
                instance = self.live.get(id(program), program)
                if instance is None:
                    instance = self.live[id(program)] = fresh_instance(program)
                captured = _CAPTURED.get()
                if captured is not None:
                    captured.append((self, program, instance))
                return instance
        served = "; ".join(label for _, _, label in self.programs)
        raise UnsupportedShape(f"no compiled program for inputs {_short(actual)} (compiled for: {served})")

    def __call__(self, *args, **kwargs):
        args, kwargs = contiguous(args, kwargs)
        return self.runner(self.program_for(args, kwargs), *args, **kwargs)


def compile_targets(transformer: torch.nn.Module, scope: str) -> dict[str, torch.nn.Module]:
    """What to export, keyed by the submodule name that `spaces.aoti_compile_and_save` files it under.

    "model": the whole transformer (key ""). "blocks": regional compilation, one program per repeated
    block class (diffusers lists them in `_repeated_blocks`), traced on the first block of its
    `ModuleList` and installed on every block there, each block reading its own weights.
    """
    if scope == "model":
        return {"": transformer}
    targets = {name: blocks[0] for name, blocks in repeated_block_lists(transformer).items()}
    if not targets:
        raise ValueError(f"{type(transformer).__name__} declares no repeated blocks; use AOT_SCOPE=model")
    return targets


def capture_inputs(model: Model, module: torch.nn.Module, preset: Preset, prompt: str = CAPTURE_PROMPT,
                   images: int | None = None) -> tuple[tuple, dict]:
    """`module`'s real first call for one preset (one pipeline call at its size: `Model.stage`), recorded without
    running it, its tensors contiguous; with `images` input images at the largest preset (default: as many as the
    family needs, since Qwen-Image-Edit draws nothing without one)."""
    inputs = model.needed_images() if images is None else model.sample_images()[:images]
    with spaces.aoti_capture(module) as call:
        model.stage(prompt, preset, steps=1, output_type="latent", images=inputs)
    return contiguous(call.args, call.kwargs)


def contiguous(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A call's tensors contiguous (those that are, as they are). An AOTInductor program reads each input at the
    strides it was traced with, whatever strides it is given: FLUX.2's pipelines hand the transformer its latents
    transposed for text to image and contiguous once reference images are appended, and a whole-model program traced
    on the one read the other wrong (a relative error of 1.4 on the tiny pipeline). So programs are traced on, and
    called with, contiguous inputs."""
    return torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: t.contiguous(), (args, kwargs))


def export_spec(model: Model, args: tuple, kwargs: dict, served: tuple[int, int] | None) -> dict | None:
    """Which axes of a captured call stay dynamic in its program, keyed by argument name: the image tokens
    over `served` (a DYNAMIC_SHAPES program), or the text tokens of a Text.DYNAMIC family; None: all static."""
    family = model.family
    image = served and family.dynamic_spec(kwargs, torch.export.Dim("image_tokens", min=served[0], max=served[1]),
                                           model.max_text_tokens)
    text = family.text is Text.DYNAMIC and family.text_spec(args, kwargs, model.max_text_tokens)
    if image and text:  # both axes (Qwen-Image-Edit): each argument's dynamic axes from either spec
        return {name: _merged(image[name], text[name]) for name in image}
    return image or text or None


def _merged(a, b):
    """Two specs of one argument merged: None (static), an {axis: Dim} dict, or a tuple of those."""
    if a is None or b is None:
        return b if a is None else a
    if isinstance(a, tuple):
        return tuple(map(_merged, a, b))
    return {**a, **b}


# GELU's tanh form, which the feed-forwards of FLUX.1, Qwen-Image, Wan and LTX-2 use, traced as its sigmoid identity:
# 0.5 * (1 + tanh(z)) = sigmoid(2z), so gelu(x) = x * sigmoid(2 * sqrt(2/pi) * (x + 0.044715 x^3)). Inductor writes
# torch's form with libdevice's tanh, a long instruction sequence, and evaluates it in every kernel that reads the
# activation: a per-row fp8 scale needs the row's largest value before it can quantize, so with reductions split the
# GELU ran twice (FLUX.1's single blocks: an amax kernel and a quantizing one, 9.4 ms of a 98.8 ms step on an H100, at a
# third of its memory bandwidth). A sigmoid compiles to one fast exponential and a division: 1.0 ms a step less
# (benchmarks/RESULTS.md run 27). The arithmetic is done in fp32 (or wider) and rounded once, as torch's kernel does.
GELU_TANH_SCALE = 2 * math.sqrt(2 / math.pi)


def tanh_gelu(x: torch.Tensor) -> torch.Tensor:
    f = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 and fp16 computed in fp32
    return (f * torch.sigmoid(GELU_TANH_SCALE * (f + 0.044715 * f * f * f))).to(x.dtype)


@contextlib.contextmanager
def gelu_as_sigmoid():
    """While tracing: `F.gelu(x, approximate="tanh")`, which torch's `nn.GELU` and diffusers' `GELU` both call, traced
    as `tanh_gelu`. Only the trace sees it: the eager modules keep torch's kernel."""
    functional, original = torch.nn.functional, torch.nn.functional.gelu

    def gelu(input, approximate="none"):
        return tanh_gelu(input) if approximate == "tanh" else original(input, approximate=approximate)

    functional.gelu = gelu
    try:
        yield
    finally:
        functional.gelu = original


def compile_program(model: Model, scope: str, preset: Preset, served: tuple[int, int] | None, out_dir: Path,
                    inductor_configs: dict) -> dict[str, Signature]:
    """Captures, exports and AOT-compiles the (already quantized) transformer at `preset`'s shape into
    `out_dir`, in the layout `spaces.aoti_load_from_package_dir` reads: one package per compile target.
    `served`: the image-token range of a dynamic-shape program, None for a static one.
    Returns each target's signature, which the dispatcher matches calls against."""
    signatures = {}
    for name, module in compile_targets(model.pipe.transformer, scope).items():
        args, kwargs = capture_inputs(model, module, preset)
        spec = export_spec(model, args, kwargs, served)
        t0 = time.perf_counter()
        with gelu_as_sigmoid():
            exported = torch.export.export(module, args=args, kwargs=kwargs, dynamic_shapes=spec)
        t1 = time.perf_counter()
        spaces.aoti_compile_and_save(out_dir, exported, inductor_configs=inductor_configs, submodule=name or None)
        COMPILES[name] += 1
        log.info("compiled %s for %s: export %.1f s, compile %.1f s", name or "transformer",
                 f"image tokens {served[0]}..{served[1]} (traced at {preset.name})" if served else preset.name,
                 t1 - t0, time.perf_counter() - t1)
        signatures[name] = signature(named_inputs(module, args, kwargs), spec)
    return signatures


def own_tensors_(module: torch.nn.Module) -> None:
    """Makes every tensor a program reads part of the module's state_dict: tensors kept as plain attributes
    (Qwen-Image's rotary tables) and non-persistent buffers become persistent buffers. spaces binds a program
    to the module's state_dict alone, and a constant left unbound crashed the process (seen on CPU)."""
    for sub in module.modules():
        for name, value in list(vars(sub).items()):
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
                delattr(sub, name)
                sub.register_buffer(name, value)
        sub._non_persistent_buffers_set.clear()


def trust_host_isa_() -> None:
    """Takes the host CPU's vector ISAs from cpuinfo, without Inductor's proof. Inductor proves each ISA by
    building a test library with g++ and loading it in a new Python process, once per process (spaces' lazy
    programs ask for the list when they are created, a compile asks too): 6 probes took 23 s of every start on
    the H100 (torch 2.11, benchmarks/RESULTS.md run 13), and its `cpp.vec_isa_ok` setting skips only some of
    them. GPU programs have no CPU kernels: the list only names flags for their host-side wrapper. So the list
    is computed once here with the build step answered "yes", and Inductor keeps it. Not for CPU programs."""
    from torch._inductor import cpu_vec_isa

    with unittest.mock.patch.object(cpu_vec_isa.VecISA, "check_build", lambda self, code: True):
        isas = cpu_vec_isa.valid_vec_isa_list()
    log.info("host CPU vector ISAs, from cpuinfo: %s", ", ".join(map(str, isas)) or "none")


def release_export_memory() -> None:
    """torch.export keeps its last trace in a module-level map, and through it tensors as large as the
    weights (about 11 GiB more resident after an fp8 FLUX compile on an H100); drop them once compiled."""
    proxy_map = getattr(torch.fx.experimental.proxy_tensor, "_FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT", None)
    if proxy_map is not None:
        proxy_map.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def install_programs_(transformer: torch.nn.Module, entries: list[tuple[Path, dict[str, Signature], str]]) -> None:
    """Loads every package against the modules' own parameters (no copy) and puts a dispatcher on each patched
    module: the transformer, or every repeated block. `entries`: (package directory, each target's signature,
    the resolutions it serves)."""
    programs: dict[torch.nn.Module, list] = {}
    for path, signatures, label in entries:
        spaces.aoti_load_from_package_dir(transformer, path)  # sets `forward` on each target to a lazy program
        for name, module in transformer.named_modules():
            if "forward" in module.__dict__:
                target = name if name in signatures else name.rpartition(".")[0]  # a block: its list's name
                program = module.__dict__.pop("forward")
                if target != name:
                    program = fresh_instance(program)
                programs.setdefault(module, []).append((signatures[target], program, label))
    runner = ProgramRunner()
    for module, by_signature in programs.items():
        module.forward = ShapeDispatch(module, by_signature, runner)


def fresh_instance(program):
    """`program` (spaces' loader bound to one module's weights) with its own loaded instance of the package.

    Each block gets one: spaces loads a block list's package once and rebinds each block's weights before its call;
    that instance's one runner then makes every call wait for the previous block to finish on the GPU (a
    `cudaEventSynchronize`) before its own kernels are queued, so the GPU idles through the host's share of each of
    the 57 calls a FLUX step makes: 11-16 ms a step, regional 112 ms against 101.5 ms for the whole model
    (benchmarks/RESULTS.md run 13). An instance per block binds its weights once (the same tensors: no copy) and lets
    the host queue block i+1 while block i runs. A program whose instance a CUDA graph took gets another (`retire`)."""
    clone = copy.copy(program)  # spaces' LazyAOTIModelWithWeights: the weights, and the loader it calls
    clone.model = type(program.model)(program.model.archive_file)  # loaded on its first call in each context
    clone.first_call = True
    return clone


def restore_eager_(transformer: torch.nn.Module) -> None:
    for module in transformer.modules():
        module.__dict__.pop("forward", None)
