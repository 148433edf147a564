"""Step caching (STEP_CACHE): diffusers' cache hooks skip work between denoising steps, around the block programs.

Regional programs are installed as each block's `forward` (aot/programs.py). diffusers' HookRegistry wraps the
`forward` a module has when a hook is registered, so hooks registered after the programs call the programs; the
programs are the very ones AOT_SCOPE=blocks compiles (same cache key). A whole-model program has no blocks to skip:
with a step cache, optimization.py compiles regionally.

Offered: diffusers' two caches that act on whole blocks, the level the programs are at, and need no calibration.
  - "fbc", First Block Cache: every call runs the first block; when its output changed by less than the threshold
    (relative mean absolute change) since the last full call, the other blocks are skipped and their last residual
    is added instead.
  - "taylorseer", TaylorSeer in its lite mode: full calls on a fixed schedule; between them every block is skipped
    and the output projection is extrapolated from the last full calls (a first-order Taylor series).
Not offered: TaylorSeer's default mode, FasterCache and Pyramid Attention Broadcast hook the attention layers inside
the blocks, which compiled programs never call; MagCache needs ratios calibrated per checkpoint; SeaCache adapts
to video transformers only.
"""
from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, ModelHook, TaylorSeerCacheConfig
from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS  # private: see _unsupported
from diffusers.hooks._helpers import TransformerBlockRegistry  # private: see _unsupported

from aot.model import Model
from aot.report import Decision, Report
from settings import StepCache, parse_step_cache

COUNTER = "aot_step_counter"  # the counting hook's name in the last block's HookRegistry


def diffusers_config(requested: StepCache) -> FirstBlockCacheConfig | TaylorSeerCacheConfig:
    """The diffusers config for `requested`, its parameter left to diffusers' default where none is given."""
    if requested.method == "fbc":
        return FirstBlockCacheConfig(**({} if requested.threshold is None else {"threshold": requested.threshold}))
    assert requested.method == "taylorseer", requested
    # Lite mode hooks whole blocks and the output projection; float32 factors, since differences of nearby bf16
    # outputs keep few of their bits. Lite mode stores factors for the output projection only: a few MiB.
    return TaylorSeerCacheConfig(use_lite_mode=True, taylor_factors_dtype=torch.float32,
                                 **({} if requested.interval is None else {"cache_interval": requested.interval}))


def choose(requested: StepCache, model: Model) -> Decision:
    """The step cache that will run, as STEP_CACHE would name it with its parameters ("fbc:0.05"), or "off"."""
    if requested.method == "off":
        return Decision("off", "off by default (STEP_CACHE=fbc or taylorseer turns one on)")
    why_not = _unsupported(requested.method, model.pipe)
    if why_not:
        return Decision("off", f"STEP_CACHE={requested} is not supported for the {model.family.name} family: {why_not}",
                        fell_back=True)
    config = diffusers_config(requested)
    running = (StepCache("fbc", threshold=config.threshold) if requested.method == "fbc"
               else StepCache("taylorseer", interval=config.cache_interval))
    return Decision(str(running), f"requested: diffusers {config!r} on the transformer's blocks")


def _blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks First Block Cache walks, in order: the first runs on every call, the last only on full ones."""
    return [block for name, blocks in transformer.named_children()
            if name in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS and isinstance(blocks, torch.nn.ModuleList)
            for block in blocks]


def _unsupported(method: str, pipe) -> str | None:
    """Why `method` cannot run on this pipeline, or None. Each check refuses at start-up what would otherwise fail
    in the first image, as it did on the tiny pipeline named beside it, or (no such family yet) silently serve
    noise. First Block Cache's check reads diffusers' private tables: the block lists it walks, each block class's
    outputs (requirements.txt pins diffusers)."""
    transformer = pipe.transformer
    if getattr(pipe, "transformer_2", None) is not None:  # Wan 2.2 A14B
        return "its hooks would sit on the first of its two experts only"
    if not hasattr(transformer, "enable_cache"):  # Z-Image
        return f"{type(transformer).__name__} has no diffusers cache hooks (enable_cache)"
    # The hooks keep their state per `cache_context` ("cond", "uncond"), which the pipeline must enter around each
    # transformer call; without one the first call raises (FLUX.2 [dev]'s pipeline)
    if "cache_context" not in inspect.getsource(type(pipe).__call__):
        return f"{type(pipe).__name__} does not enter the transformer's cache_context, which the hooks need"
    blocks = _blocks(transformer)
    if len(blocks) < 2:  # the first block decides, the last counts (_Counter)
        return "it needs at least two transformer blocks"
    if method == "taylorseer":  # lite mode predicts `proj_out`'s output: without one, skipped steps get zeroed blocks
        if not isinstance(getattr(transformer, "proj_out", None), torch.nn.Module):
            return f"TaylorSeer's lite mode extrapolates `proj_out`, which {type(transformer).__name__} lacks"
        # another stream's projection would read the zeros skipped blocks return (LTX-2's sound track)
        others = [name for name, _ in transformer.named_children() if name.endswith("proj_out") and name != "proj_out"]
        if others:
            return (f"TaylorSeer's lite mode extrapolates `proj_out` alone, and {type(transformer).__name__}'s "
                    f"{', '.join(others)} would read the zeros its skipped blocks return")
        return None
    try:
        layouts = {type(block): TransformerBlockRegistry.get(type(block)) for block in blocks}
    except ValueError as err:
        return f"First Block Cache does not know one of its block classes ({err})"
    first, last = type(blocks[0]), type(blocks[-1])
    two_streams = [layouts[block].return_encoder_hidden_states_index is not None for block in (first, last)]
    if two_streams[0] != two_streams[1]:
        # it keeps the last block's outputs minus the first's, one for one (FLUX.2 [klein]: a TypeError mid-image)
        return (f"First Block Cache pairs the first block's outputs with the last's, and {last.__name__} returns "
                f"other outputs than {first.__name__}")
    return None


@dataclass
class Counts:
    calls: int = 0  # transformer calls: one a step, two with true CFG
    full: int = 0  # of those, the calls that ran every block (in the others, the cache skipped blocks)

    def __str__(self) -> str:
        return f"step cache: {self.full} of {self.calls} transformer calls ran in full"


class _Counter(ModelHook):
    """On the last block, under the cache's hooks (registered before them): counts the calls that reach the block's
    own forward, its program or eager code, which are the transformer calls that ran every block."""

    def __init__(self):
        super().__init__()
        self.counts = Counts()

    def pre_forward(self, module, *args, **kwargs):
        self.counts.full += 1
        return args, kwargs

    def count_call(self, module, args) -> None:  # a forward pre-hook on the transformer
        self.counts.calls += 1


def _last_block(transformer: torch.nn.Module) -> torch.nn.Module:
    return _blocks(transformer)[-1]


def enable_(transformer: torch.nn.Module, report: Report) -> None:
    """Puts the step cache that `report.step_cache` names around the transformer's blocks. Call it after the
    programs are installed: a program installed later replaces the hooks on its block."""
    if report.step_cache == "off":
        return
    registry = HookRegistry.check_if_exists_or_initialize(_last_block(transformer))
    if registry.get_hook(COUNTER) is None:
        counter = _Counter()
        registry.register_hook(counter, COUNTER)
        transformer.register_forward_pre_hook(counter.count_call)
    try:
        transformer.enable_cache(diffusers_config(parse_step_cache(report.step_cache)))
    except Exception as err:  # noqa: BLE001 - serve without the cache rather than not at all, and say so
        report.fallback("step_cache", f"{report.step_cache} could not be enabled ({type(err).__name__}: {err}); off")
        report.step_cache = "off"


@contextlib.contextmanager
def counting(transformer: torch.nn.Module) -> Iterator[Counts | None]:
    """Counts one image's transformer calls, and those that ran in full; None where no step cache runs. Clears the
    cache's state first: diffusers clears it when a pipeline call completes, so a call that failed part-way would
    hand its state (a step count, a residual) to the next image."""
    if not getattr(transformer, "is_cache_enabled", False):
        yield None
        return
    HookRegistry.check_if_exists_or_initialize(transformer).reset_stateful_hooks()
    counter = HookRegistry.check_if_exists_or_initialize(_last_block(transformer)).get_hook(COUNTER)
    counter.counts = Counts()
    yield counter.counts
