"""GELU's tanh form traced as its sigmoid identity (aot/programs.py `gelu_as_sigmoid`): the same function, and only the
trace sees it."""
import pytest
import torch
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

from aot.programs import gelu_as_sigmoid, tanh_gelu


def test_the_sigmoid_form_is_torchs_tanh_gelu():
    x = torch.linspace(-30, 30, 200_001, dtype=torch.float64)
    truth = torch.nn.functional.gelu(x, approximate="tanh")
    assert torch.allclose(tanh_gelu(x), truth, rtol=1e-12, atol=1e-14)  # the identity itself, in float64
    ours, torchs = tanh_gelu(x.float()).double(), torch.nn.functional.gelu(x.float(), approximate="tanh").double()
    assert (ours - truth).abs().max() <= 2e-6 and (ours - truth).abs().max() <= 2 * (torchs - truth).abs().max()
    assert tanh_gelu(x.float())[0] == 0 and tanh_gelu(x.float())[-1] == 30  # saturates as torch's does: no NaN
    low = x.to(torch.bfloat16)  # rounded once, from fp32: as close to the truth as torch's bf16 kernel
    error = {f: (f(low).double() - torch.nn.functional.gelu(low.double(), approximate="tanh")).abs().mean()
             for f in (tanh_gelu, lambda v: torch.nn.functional.gelu(v, approximate="tanh"))}
    assert tanh_gelu(low).dtype == torch.bfloat16 and max(error.values()) <= 1.01 * min(error.values())


def ops(block: torch.nn.Module, **inputs) -> tuple:
    with gelu_as_sigmoid():
        exported = torch.export.export(block, args=(), kwargs=inputs)
    return exported, {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}


@pytest.mark.parametrize("block_class", [FluxSingleTransformerBlock, FluxTransformerBlock])
def test_a_flux_block_is_traced_with_the_sigmoid_and_computes_the_same(block_class):
    """Both GELUs FLUX.1 has: torch's `nn.GELU` (single blocks) and diffusers' `GELU` in `FeedForward` (double)."""
    torch.manual_seed(0)
    block = block_class(64, 2, 32).eval()
    inputs = dict(hidden_states=torch.randn(1, 16, 64), encoder_hidden_states=torch.randn(1, 8, 64),
                  temb=torch.randn(1, 64))
    exported, traced = ops(block, **inputs)
    assert "aten.sigmoid.default" in traced and not any("gelu" in op or "tanh" in op for op in traced)
    with torch.no_grad():
        for ours, eager in zip(*(torch.utils._pytree.tree_leaves(out) for out in (exported.module()(**inputs),
                                                                                  block(**inputs)))):
            assert torch.allclose(ours, eager, rtol=1e-5, atol=1e-6)


def test_only_the_trace_sees_it_and_other_gelus_are_left_alone():
    builtin = torch.nn.functional.gelu
    block = torch.nn.Sequential(torch.nn.GELU(), torch.nn.GELU(approximate="tanh"))
    _, traced = ops(block, input=torch.randn(4, 8))
    assert "aten.gelu.default" in traced and "aten.sigmoid.default" in traced  # the erf GELU stays torch's
    assert torch.nn.functional.gelu is builtin
    with pytest.raises(RuntimeError, match="boom"), gelu_as_sigmoid():
        raise RuntimeError("boom")
    assert torch.nn.functional.gelu is builtin  # restored when the trace fails
