"""The prompt cache (PROMPT_CACHE): a repeated prompt's embeddings come from memory instead of the text encoders,
and each encoding that does run is timed.

The text encoders run once per prompt, and once more for the negative prompt under true CFG (Qwen-Image, FLUX.2
[klein] base), and they are large: T5-XXL for FLUX.1, a 24B Mistral for FLUX.2 [dev], a 7B Qwen2.5-VL for Qwen-Image.
Prompts repeat: a visitor re-rolls seeds on one prompt, the examples are picked again, and the blank negative prompt
of a true-CFG family is the same in every request.

One memo serves every family: each pipeline encodes through its own `encode_prompt(prompt, ..., device, ...,
max_sequence_length)`, which takes the text and plain values and returns tensors (Z-Image: lists of them), and
`__call__` reaches it as `self.encode_prompt`, so an instance attribute of that name takes its place. The key is
every argument's value, defaults included; a call given embeddings (a tensor argument) encodes nothing and passes
through. Only text encoding is touched: the transformer, compiled or not, gets the same tensors either way.

Entries are copies, on the way in and out: no pipeline here writes its embeddings in place (diffusers 0.42), but an
entry must not depend on that. They stay on the GPU, or in host memory under a low-VRAM layout, whose plan does not
count them. The memo is per process: on ZeroGPU it lives in the forked GPU worker, and each image's `Encodings`
travel back with the image for the details and `/status`.
"""
from __future__ import annotations

import contextlib
import inspect
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_leaves, tree_map

# What a key may hold: anything else (a tensor) means the caller gave embeddings
PLAIN = (str, int, float, bool, type(None), torch.device)


@dataclass
class Encodings:
    """Prompt encodings: those the text encoders ran (misses) with their seconds, and those the cache answered
    (hits). One image's, or every image's added up; `entries` is what the cache held after the last of them."""

    misses: int = 0
    seconds: float = 0.0
    hits: int = 0
    entries: int = 0

    def add_(self, other: Encodings) -> None:
        self.misses += other.misses
        self.seconds += other.seconds
        self.hits += other.hits
        self.entries = other.entries

    def __str__(self) -> str:
        """One image's, for its details."""
        if not self.misses:
            return "prompt embeddings from the cache" if self.hits else "no prompt encoded"
        cached = f", {self.hits} of {self.hits + self.misses} from the cache" if self.hits else ""
        return f"text encoding {self.seconds:.2f} s{cached}"

    def as_dict(self) -> dict:
        """Every image's, for /status: seconds per prompt is the text encoders' mean over the prompts they ran."""
        return {"entries": self.entries, "hits": self.hits, "misses": self.misses,
                "seconds_per_prompt": round(self.seconds / self.misses, 3) if self.misses else None}


def _key(value):
    if isinstance(value, (list, tuple)):
        return tuple(map(_key, value))
    if isinstance(value, PLAIN):
        return value
    raise TypeError(f"{type(value).__name__} is not a plain value")


def _copy(result, device=None):
    """The result with every tensor copied (to `device`, if given)."""
    return tree_map(lambda x: x.to(device or x.device, copy=True) if isinstance(x, torch.Tensor) else x, result)


class PromptCache:
    """A least-recently-used memo of `encode` (a pipeline's `encode_prompt`) holding at most `size` results; 0 keeps
    none, and still times every encoding. `host`: keep the entries in host memory, copied to the encoder's device on
    a hit."""

    def __init__(self, encode, size: int, host: bool = False):
        self.encode, self.size, self.host = encode, size, host
        self.signature = inspect.signature(encode)
        self.entries: OrderedDict[tuple, object] = OrderedDict()
        self.encodings = Encodings()  # the current image's (counting)

    def __call__(self, *args, **kwargs):
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        if any(isinstance(x, torch.Tensor) for x in tree_leaves(list(bound.arguments.values()))):
            return self.encode(*args, **kwargs)  # embeddings given (a tensor, or Z-Image's list): nothing is encoded
        try:
            key = _key(tuple(bound.arguments.items()))
        except TypeError:  # an argument that is no plain value: encoded and timed, not kept
            key = None
        if key in self.entries:
            self.entries.move_to_end(key)
            self.encodings.hits += 1
            device, stored = self.entries[key]
            return _copy(stored, device)
        # The clock reads what the encoders did, not what was queued before them or left queued after
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = self.encode(*args, **kwargs)
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
        self.encodings.misses += 1
        self.encodings.seconds += time.perf_counter() - start
        if self.size and key is not None:
            device = None  # in host memory, an entry keeps where it goes back to: the encoder's device
            if self.host:
                device = next((x.device for x in tree_leaves(result) if isinstance(x, torch.Tensor)), None)
            self.entries[key] = (device, _copy(result, "cpu" if self.host else None))
            if len(self.entries) > self.size:
                self.entries.popitem(last=False)
        return result

    @contextlib.contextmanager
    def counting(self) -> Iterator[Encodings]:
        """One image's encodings. A fresh record each time: a call that failed part-way leaves nothing behind."""
        self.encodings = Encodings()
        try:
            yield self.encodings
        finally:
            self.encodings.entries = len(self.entries)


def cache_prompts_(pipe, size: int, host: bool = False) -> PromptCache:
    """Puts a PromptCache of `size` entries (in host memory if `host`) in front of `pipe.encode_prompt`, on this
    instance."""
    cache = PromptCache(pipe.encode_prompt, size, host)
    pipe.encode_prompt = cache
    return cache
