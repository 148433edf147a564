"""Streamed transformer blocks that stay compiled: each streamed block's weights live in host memory and are
copied, one block ahead, into a fixed ring of device buffers that the block's own tensors are views of.

Why not diffusers' group offloading (it still streams the text encoders, aot/memory.py): it makes new device tensors
on every onload. A compiled block program binds its block's tensors, so it would have to be handed the fresh copies on
every call, and a regional AOTI program handed them kept every weight set alive (12.7 GiB after 52 block calls);
torchao's tensor subclasses did not survive the offloading either (benchmarks/RESULTS.md, run 7). Here a streamed
block's parameters are the same tensor objects for its whole life: views of slot j % 2 of its group's ring (j counts
the streamed blocks of the group: blocks of one class and layout). The programs are installed after this layout
(aot/programs.py binds each block's own tensors once), so they read the slots, which the hooks below fill before
each block runs: no rebinding, and no copies beyond the ring. Block j and block j + 2 share one storage.

On a GPU the copies run on a side stream. Once block j's kernels are queued, the next streamed block's weights are
copied into its slot as soon as the block that last used that slot has finished (an event), and that block's
kernels wait for the copy (another event), so copies overlap the compute of the blocks in between. The order is
learnt from the calls (the blocks' list order until then); a block whose weights are not in its slot when it is
called (another order, a skipped block) is loaded then, so a wrong guess costs time, never correctness.
On a CPU host and device are one: the same code copies host to host, synchronously; the CPU tests run this path.
"""
from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

RING_SLOTS = 2  # per group: one slot computes while the next block is copied into the other


@dataclass
class Slot:
    tensors: list[torch.Tensor]  # device buffers, one per flattened weight of the group's blocks
    holder: int | None = None  # the streamed block whose weights it holds, or is being copied in
    ready: torch.cuda.Event | None = None  # on a GPU: recorded on the copy stream when the copy is done
    free: torch.cuda.Event | None = None  # on a GPU: recorded on the compute stream when its holder has run


def tensor_parts(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors a wrapper subclass (torchao's fp8 weight: data and scale) is made of; else the tensor."""
    if is_traceable_wrapper_subclass(tensor):
        return [getattr(tensor, name) for name in tensor.__tensor_flatten__()[0]]
    return [tensor]


def tensor_leaves(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors inside a tensor subclass, however deeply nested (torchao's older types nest); else the
    tensor."""
    parts = tensor_parts(tensor)
    return parts if parts[0] is tensor else [leaf for part in parts for leaf in tensor_leaves(part)]


@dataclass
class _Weight:
    """One parameter or buffer of a block; a tensor subclass (torchao's fp8 weight) as the plain tensors inside it."""

    module: torch.nn.Module
    name: str
    parameter: bool
    tensor: torch.Tensor

    @property
    def parts(self) -> list[torch.Tensor]:
        parts = tensor_parts(self.tensor)
        assert not any(is_traceable_wrapper_subclass(p) for p in parts), f"nested tensor subclass: {self.name}"
        return parts

    def rebuilt(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The weight again, made of `parts` (slot buffers) instead of its own tensors."""
        t = self.tensor
        if is_traceable_wrapper_subclass(t):
            names, context = t.__tensor_flatten__()
            t = type(t).__tensor_unflatten__(dict(zip(names, parts)), context, t.size(), t.stride())
        else:
            t = parts[0]
        return torch.nn.Parameter(t, requires_grad=False) if self.parameter else t

    def install(self, tensor: torch.Tensor) -> None:
        (self.module._parameters if self.parameter else self.module._buffers)[self.name] = tensor


def _weights(block: torch.nn.Module) -> list[_Weight]:
    return [_Weight(module, name, kind == "parameter", tensor)
            for module in block.modules()
            for kind, tensors in (("parameter", module._parameters), ("buffer", module._buffers))
            for name, tensor in tensors.items() if tensor is not None]


def _layout(block: torch.nn.Module, weights: list[_Weight]) -> tuple:
    """What must match for two blocks to share a ring: the class and every flattened tensor's shape, strides, dtype."""
    return (type(block).__name__, tuple((type(w.tensor).__name__, tuple((tuple(p.shape), p.stride(), p.dtype)
                                                                         for p in w.parts)) for w in weights))


def _empty_like(t: torch.Tensor, device: torch.device, pin: bool = False) -> torch.Tensor:
    """Same shape and strides: the compiled programs were built for the original tensors' layout."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device, pin_memory=pin)


@dataclass
class BlockStream:
    """The streamed blocks of one transformer, their host weights and the rings they are copied into."""

    device: torch.device
    blocks: list[torch.nn.Module] = field(default_factory=list)  # streamed, in the order they were added
    host: list[list[torch.Tensor]] = field(default_factory=list)  # each block's real weights, flattened
    slot_of: list[Slot] = field(default_factory=list)
    rings: dict[tuple, list[Slot]] = field(default_factory=dict)  # by layout: the group's slots
    members: Counter = field(default_factory=Counter)  # by layout: the group's streamed blocks so far
    next_of: list[int] = field(default_factory=list)  # the streamed block called after each one
    last: int | None = None  # the streamed block called last
    copy_stream: torch.cuda.Stream | None = None
    loads: int = 0  # copies into a slot so far
    late_loads: int = 0  # of them, made when the block was called, not ahead: a wrong guess, or the first call

    def __post_init__(self):
        self.device = torch.device(self.device)
        if self.device.type == "cuda":
            self.copy_stream = torch.cuda.Stream(self.device)

    def add_(self, block: torch.nn.Module) -> None:
        """Moves `block`'s weights to host memory (pinned, for asynchronous copies) and makes its parameters and
        buffers views of a ring slot; from now on hooks fill the slot before each call."""
        cuda = self.copy_stream is not None
        weights = _weights(block)
        layout = _layout(block, weights)
        ring = self.rings.setdefault(layout, [])
        if len(ring) < RING_SLOTS:
            buffers = [_empty_like(p, self.device) for w in weights for p in w.parts]
            for buffer in buffers if cuda else ():  # freed with the model, not before its last copy is done
                buffer.record_stream(self.copy_stream)
            ring.append(Slot(buffers, ready=torch.cuda.Event() if cuda else None,
                             free=torch.cuda.Event() if cuda else None))
        slot = ring[self.members[layout] % RING_SLOTS]
        self.members[layout] += 1
        host = []
        for w in weights:
            host += [_empty_like(p, torch.device("cpu"), pin=cuda).copy_(p) for p in w.parts]
        buffers = iter(slot.tensors)
        for w in weights:  # the block's own tensors are dropped here: on the device only the slot remains
            w.install(w.rebuilt([next(buffers) for _ in w.parts]))
        index = len(self.blocks)
        self.blocks.append(block)
        self.host.append(host)
        self.slot_of.append(slot)
        self.next_of = [(i + 1) % len(self.blocks) for i in range(len(self.blocks))]
        block.register_forward_pre_hook(functools.partial(self._before, index))
        block.register_forward_hook(functools.partial(self._after, index))

    def load(self, index: int) -> None:
        """Queues the copy of streamed block `index`'s weights into its slot (on a CPU: copies them now)."""
        slot = self.slot_of[index]
        slot.holder = index
        self.loads += 1
        if self.copy_stream is None:
            for buffer, weight in zip(slot.tensors, self.host[index]):
                buffer.copy_(weight)
            return
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(slot.free)  # the slot's last holder has run
            for buffer, weight in zip(slot.tensors, self.host[index]):
                buffer.copy_(weight, non_blocking=True)
            slot.ready.record(self.copy_stream)

    def _before(self, index: int, module, args) -> None:
        if torch.compiler.is_compiling():  # torch.export traces the block with fake weights: nothing to copy
            return
        if self.last is not None:
            self.next_of[self.last] = index
        self.last = index
        slot = self.slot_of[index]
        if slot.holder != index:  # the first call, or not the block that was guessed to come next
            self.late_loads += 1
            self.load(index)
        if self.copy_stream is not None:
            torch.cuda.current_stream(self.device).wait_event(slot.ready)

    def _after(self, index: int, module, args, output) -> None:
        if torch.compiler.is_compiling():
            return
        if self.copy_stream is not None:
            self.slot_of[index].free.record(torch.cuda.current_stream(self.device))
        following = self.next_of[index]
        if self.slot_of[following].holder != following:
            self.load(following)
