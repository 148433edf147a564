"""CUDA graph replay's bookkeeping (aot/graphs.py) on the CPU, around the real regional programs: which call shape is
captured, checked, kept and replayed, each graph on its own program instances, and what runs when a replay differs.

A CPU has no CUDA graphs, so `Rerun` below stands in for one: its capture runs the call once, and its replay runs
the same call again on the graph's static inputs and writes the results into the static outputs, as a replay does.
What is tested is the product's code around it: the static inputs and outputs, the instances, the decisions."""
import pytest
import torch
from conftest import rel_err

from aot.graphs import GraphedForward
from aot.report import Report
from aot.programs import named_inputs, signature


class Rerun:
    def __init__(self, fn, out, perturb: float):
        self.fn, self.out, self.perturb, self.replays = fn, out, perturb, 0

    def replay(self):  # a replay's kernels write the static outputs whatever autograd's mode: no mode checks
        self.replays += 1
        with torch.inference_mode():
            fresh = torch.utils._pytree.tree_leaves(self.fn())
            for static, value in zip(torch.utils._pytree.tree_leaves(self.out), fresh):
                static.copy_(value + self.perturb)


class RerunGraphs(GraphedForward):
    perturb = 0.0

    def _record(self, fn):
        out = fn()
        return Rerun(fn, out, self.perturb), out


def shape_of(transformer, args, kwargs) -> str:
    return repr(signature(named_inputs(transformer, args, kwargs)))


@pytest.fixture
def graphed(compiled_blocks):
    """The session's regional programs with replay put around the transformer; taken off again after the test."""
    transformer = compiled_blocks.pipe.transformer
    assert "forward" not in transformer.__dict__  # regional: the transformer's own forward calls the block programs
    made = []

    def wrap(cls=RerunGraphs, decided=None):
        made.append(cls(transformer, transformer.forward, decided))
        transformer.forward = made[-1]
        return made[-1]

    yield wrap
    transformer.__dict__.pop("forward", None)


def call(compiled, name):
    args, kwargs = compiled.inputs[name]
    with torch.inference_mode():
        return compiled.pipe.transformer(*args, **kwargs)[0].clone()


def test_a_decided_shape_is_captured_checked_and_then_replayed_on_the_instances_it_took(compiled_blocks, graphed):
    transformer = compiled_blocks.pipe.transformer
    earlier = {"kept": True, "uncaptured_ms": 2.0, "replay_ms": 1.0}  # as an earlier start on this card measured
    decided = {shape_of(transformer, *compiled_blocks.inputs[name]): earlier for name in compiled_blocks.inputs}
    graphs = graphed(decided=decided)
    for name, eager in compiled_blocks.eager.items():
        first, second, third = (call(compiled_blocks, name) for _ in range(3))
        assert rel_err(first, eager) < 2e-2, name
        assert torch.equal(second, first) and torch.equal(third, first), name  # replays equal the uncaptured call
    checks = graphs.summary()
    assert len(checks) == len({shape_of(transformer, *inputs) for inputs in compiled_blocks.inputs.values()})
    assert all(check["exact"] and check["kept"] and not check["error"] and check["replay_ms"] == 1.0
               for check in checks.values()), checks
    # presets of one token count share a shape: the second one's first call already replays, with its own inputs
    assert len(checks) < len(compiled_blocks.inputs)
    assert graphs.calls == {"replayed": 3 * len(compiled_blocks.inputs) - len(checks), "uncaptured": len(checks)}
    # each graph took the instances it captured: no uncaptured call runs them again (here the stand-in's replay, a
    # rerun, makes the programs fresh ones; on a GPU none is made while every call replays)
    taken = [entry for entries in graphs.instances.values() for entry in entries]
    assert {id(dispatch) for dispatch, _, _ in taken} >= {id(block.forward) for block in transformer.transformer_blocks}
    assert all(id(program) in dispatch.live and dispatch.live[id(program)] is not instance
               for dispatch, program, instance in taken)


def test_a_graph_captured_at_start_up_replays_a_request_outside_inference_mode(compiled_blocks, graphed):
    """Start-up captures under `torch.inference_mode`; a request's pipeline calls the transformer under `no_grad`, and
    the replay copies that call's inputs into the graph's static ones (refused for inference tensors, RESULTS.md run
    27)."""
    transformer = compiled_blocks.pipe.transformer
    name = next(iter(compiled_blocks.inputs))
    args, kwargs = compiled_blocks.inputs[name]
    graphs = graphed(decided={shape_of(transformer, args, kwargs): {"kept": True, "uncaptured_ms": 2.0,
                                                                      "replay_ms": 1.0}})
    first = call(compiled_blocks, name)  # under inference_mode, as start-up's first call: captured
    fresh = torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: t.clone(), (args, kwargs))  # a request's own
    with torch.no_grad():
        replayed = transformer(*fresh[0], **fresh[1])[0]
    assert graphs.calls == {"replayed": 1, "uncaptured": 1} and torch.equal(replayed, first)


def test_a_replay_that_differs_is_not_kept_and_the_shape_runs_uncaptured(compiled_blocks, graphed):
    graphs = graphed(cls=type("Perturbed", (RerunGraphs,), {"perturb": 1.0}))
    name, eager = next(iter(compiled_blocks.eager.items()))
    outputs = [call(compiled_blocks, name) for _ in range(3)]
    assert all(rel_err(out, eager) < 2e-2 for out in outputs)
    (check,) = graphs.summary().values()
    assert not check["exact"] and not check["kept"] and "replay differs" in check["error"], check
    # the fallback's reason, which app.py carries back from a GPU worker to the report
    assert graphs.failures() == [f"{check['shape']}: {check['error']}; that shape runs uncaptured"]
    assert graphs.calls == {"replayed": 0, "uncaptured": 3} and not graphs.graphs and not graphs.instances
    # the calls after the capture ran on fresh instances of the same packages, reading the same weights
    dispatch = compiled_blocks.pipe.transformer.transformer_blocks[0].forward
    fresh = [(program, dispatch.live[id(program)]) for _, program, _ in dispatch.programs
             if dispatch.live.get(id(program))]
    assert fresh and all(instance is not program and instance.model is not program.model
                         and instance.weights is program.weights for program, instance in fresh)


def test_at_start_up_a_shape_is_timed_both_ways_and_after_close_no_new_shape_is_captured(compiled_blocks, graphed):
    graphs = graphed()
    first, *others = compiled_blocks.inputs
    call(compiled_blocks, first)
    (check,) = graphs.summary().values()
    assert check["exact"] and check["uncaptured_ms"] > 0 and check["replay_ms"] > 0
    # a rerun is never faster than the call itself, so here it is not kept; on a GPU the replay skips the host's share
    assert check["kept"] == (check["replay_ms"] < check["uncaptured_ms"])
    assert graphs.decisions() == {shape_of(compiled_blocks.pipe.transformer, *compiled_blocks.inputs[first]): check}
    graphs.close()
    for name in others:
        assert rel_err(call(compiled_blocks, name), compiled_blocks.eager[name]) < 2e-2
    assert len(graphs.summary()) == 1  # nothing captured after start-up


def test_on_the_cpu_graphs_are_off_and_said_so(compiled_blocks):
    report = compiled_blocks.report
    assert report.cuda_graphs == "off" and "CUDA" in report.cuda_graphs_reason and not report.graphs
    assert any(note.startswith("cuda_graphs:") for note in report.notes)


def test_a_fallback_met_again_is_reported_once():
    """A GPU worker's graph failure comes back with each image it makes; the report says it once."""
    report = Report(device="cpu", dtype="float32")
    for _ in range(3):
        report.fallback("cuda graphs", "hidden_states 1x16x64: capture failed (X); that shape runs uncaptured")
    assert report.fallbacks == ["cuda graphs: hidden_states 1x16x64: capture failed (X); that shape runs uncaptured"]
