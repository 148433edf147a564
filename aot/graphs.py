"""CUDA graph replay of the compiled transformer (CUDA_GRAPHS): one graph per call shape, captured on the first call
of that shape in a process, kept only where its replay equals the uncaptured call and is faster, then replayed.

Why: regional programs make 57 block calls a FLUX step, and the host's share of each (the dispatcher, spaces'
loader, AOTInductor's runner) left the GPU idle 11.6 ms a step; a replayed step has no host share (regional
107.3 -> 99.0 ms, benchmarks/RESULTS.md run 16).

A graph takes the program instances it captures: AOTInductor's runner records a completion event on each call, and
one recorded inside a capture breaks every later uncaptured call of that instance ("invalid argument", run 16). So
the uncaptured calls a check needs come before the capture, and afterwards a program the graph took gets a fresh
instance (the same package and weight tensors, no copy) for any uncaptured call (aot/programs.py `retire`): a shape
no graph serves, or a graph not kept. Where every preset's graph is kept, nothing is loaded twice.

A graph replays fixed memory: each call's tensors are copied into the graph's static inputs, and its static outputs
are cloned out. All graphs of one transformer share one memory pool (they never run at once: a lock serialises
calls), so the extra memory is about one call's activations, not one per shape.
"""
from __future__ import annotations

import logging
import statistics
import threading
import time
from dataclasses import asdict, dataclass

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from aot.programs import capturing, named_inputs, retire, signature

log = logging.getLogger("aot-space")

TIMED_CALLS = 3  # each of uncaptured and replayed, at the first call of a shape; the median decides


@dataclass
class GraphCheck:
    """What the first call of one shape found: whether the replay equals the uncaptured call, and the time of each.
    `kept`: replayed from then on."""

    shape: str
    exact: bool = False
    uncaptured_ms: float = 0.0
    replay_ms: float = 0.0
    check_s: float = 0.0  # the whole check's wall time: the calls below, the capture, the replay
    kept: bool = False
    error: str = ""


class _Graph:
    def __init__(self, graph, static_inputs: list, static_outputs: list, out_spec):
        self.graph, self.static_inputs = graph, static_inputs
        self.static_outputs, self.out_spec = static_outputs, out_spec

    def __call__(self, tensors: list):
        for static, tensor in zip(self.static_inputs, tensors):
            if static.data_ptr() != tensor.data_ptr():
                static.copy_(tensor)
        self.graph.replay()
        return tree_unflatten([out.clone() for out in self.static_outputs], self.out_spec)


class GraphedForward:
    """Replaces the transformer's `forward`: a call whose shape has a kept graph is replayed; the first call of a new
    shape is checked (uncaptured, captured, compared, timed) and served uncaptured; anything else runs uncaptured.

    `decided`: shape -> its check on this card at start-up (`decisions()`), or at an earlier start with the same
    programs (optimization.py keeps them in the cache). On ZeroGPU each request runs in a new worker process, where
    graphs are captured again. A decided shape is captured only if it was kept, without timing it again, and still
    compared with the uncaptured call."""

    def __init__(self, module: torch.nn.Module, inner, decided: dict[str, dict] | None = None):
        self.module, self.inner = module, inner
        self.decided = dict(decided or {})
        self.pool = None  # made at the first capture: on ZeroGPU this object is built where CUDA must not start
        self.graphs: dict[str, _Graph] = {}
        self.checks: dict[str, GraphCheck] = {}
        self.instances: dict[str, list] = {}  # shape -> the program instances its graph took (kept alive with it)
        # Shapes are checked while start-up times the presets; after `close()` only shapes kept then are captured (in a
        # ZeroGPU worker): a prompt of a new length on a dynamic text axis runs uncaptured rather than growing the pool
        self.open = True
        self.calls = {"replayed": 0, "uncaptured": 0}
        self._lock = threading.Lock()

    def __call__(self, *args, **kwargs):
        inputs = named_inputs(self.module, args, kwargs)
        shape = repr(signature(inputs))
        with self._lock:
            if shape in self.graphs:
                self.calls["replayed"] += 1
                return self.graphs[shape](_tensors(args, kwargs))
            self.calls["uncaptured"] += 1
            if shape not in self.checks and (self.decided[shape]["kept"] if shape in self.decided else self.open):
                return self._capture(shape, _label(inputs), args, kwargs)
        return self.inner(*args, **kwargs)

    def close(self) -> None:
        self.open = False

    def _capture(self, shape: str, label: str, args: tuple, kwargs: dict):
        """The first call of `shape`: uncaptured for its result (and, at start-up, timed), then captured, replayed and
        compared; kept where equal (and, at start-up, faster). Returns the uncaptured result."""
        start = time.perf_counter()
        check = self.checks[shape] = GraphCheck(label)
        result = self.inner(*args, **kwargs)
        static_args, static_kwargs = _static_copy(args), _static_copy(kwargs)
        timed = shape not in self.decided  # decided at start-up on this device: not timed again
        if timed:
            check.uncaptured_ms = _median_ms(lambda: self.inner(*static_args, **static_kwargs))
        captured, instances = None, self.instances.setdefault(shape, [])
        try:
            self._on_side_stream(lambda: self.inner(*static_args, **static_kwargs))
            try:
                with capturing(instances):
                    graph, out = self._record(lambda: self.inner(*static_args, **static_kwargs))
            finally:
                retire(instances)  # even a failed capture may have recorded the runners' events
            out_leaves, out_spec = tree_flatten(out)
            captured = _Graph(graph, _tensors(static_args, static_kwargs), out_leaves, out_spec)
            replayed = captured(_tensors(static_args, static_kwargs))
            check.exact = all(torch.equal(a, b) for a, b in zip(tree_flatten(replayed)[0], tree_flatten(result)[0]))
            if not check.exact:
                check.error = f"replay differs from the uncaptured call (max abs {_max_diff(replayed, result):.3g})"
            elif timed:
                check.replay_ms = _median_ms(lambda: captured(_tensors(args, kwargs)))
                check.kept = check.replay_ms < check.uncaptured_ms
            else:
                check.uncaptured_ms, check.replay_ms = (self.decided[shape][k] for k in ("uncaptured_ms", "replay_ms"))
                check.kept = True
        except Exception as err:  # a capture that fails leaves the uncaptured path serving
            check.error = f"capture failed ({type(err).__name__}: {err})"
            log.info("CUDA graph capture at %s failed; the full error:", check.shape, exc_info=err)
        if check.kept:
            self.graphs[shape] = captured
        else:
            self.instances.pop(shape, None)
            log.warning("CUDA graph at %s not kept: %s", check.shape,
                        check.error or f"replay {check.replay_ms} ms is not faster than {check.uncaptured_ms} ms")
        check.check_s = round(time.perf_counter() - start, 2)
        return result

    def _record(self, fn):
        """Captures `fn` in a new graph; returns the graph and `fn`'s (static) outputs."""
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # relaxed: the runner queries its event during the call, which the default mode refuses (run 16)
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="relaxed"):
            out = fn()
        return graph, out

    @staticmethod
    def _on_side_stream(fn):
        """Warm-up before a capture runs on a side stream, as torch's graph docs ask (lazy set-up stays out of it)."""
        if not torch.cuda.is_available():
            return fn()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            out = fn()
        torch.cuda.current_stream().wait_stream(stream)
        return out

    def summary(self) -> dict[str, dict]:
        return {check.shape: asdict(check) for check in self.checks.values()}

    def decisions(self) -> dict[str, dict]:
        return {shape: asdict(check) for shape, check in self.checks.items()}

    def failures(self) -> list[str]:
        """Each shape whose graph this process could not keep (a failed capture, a differing replay), as a fallback's
        reason. On ZeroGPU a worker's own checks happen at its first requests, so app.py carries these back with the
        image to the main process's report."""
        return [failure for check in self.summary().values() if (failure := failed(check))]


def failed(check: dict) -> str | None:
    """The fallback's reason for a check (`GraphCheck` as a dict) that failed; None for one kept or only not faster."""
    return f"{check['shape']}: {check['error']}; that shape runs uncaptured" if check["error"] else None


def _tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    return [leaf for leaf in tree_flatten((args, kwargs))[0] if isinstance(leaf, torch.Tensor)]


def _static_copy(value):
    """`value` with its tensors cloned as normal tensors, whatever mode the caller is in. Start-up captures under
    `torch.inference_mode`, where a clone is an inference tensor, and a request's pipeline runs under `no_grad`, where
    copying its inputs into an inference tensor is refused: every request failed after a cold start on an H100
    ("Inplace update to inference tensor outside InferenceMode", benchmarks/RESULTS.md run 27)."""
    leaves, spec = tree_flatten(value)
    with torch.inference_mode(False), torch.no_grad():
        return tree_unflatten([leaf.clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves], spec)


def _label(inputs: dict) -> str:
    """The call's 3-D tensors (image and text tokens, in every family here) by argument name: two calls of a step
    with prompts of different lengths (a true-CFG family's negative prompt) are two shapes."""
    shapes = [f"{name} {'x'.join(map(str, leaf.shape))}" for name, value in inputs.items()
              for leaf in tree_flatten(value)[0] if isinstance(leaf, torch.Tensor) and leaf.dim() == 3]
    return ", ".join(shapes) or "no 3-D tensors"


def _max_diff(a, b) -> float:
    return max((float((x.float() - y.float()).abs().max()) for x, y in zip(tree_flatten(a)[0], tree_flatten(b)[0])
                if isinstance(x, torch.Tensor)), default=0.0)


def _median_ms(fn) -> float:
    times = []
    for _ in range(TIMED_CALLS):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return round(statistics.median(times), 3)
