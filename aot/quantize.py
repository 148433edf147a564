"""Weight formats for the transformer's Linear layers: torchao's fp8, and the template's int8/int4 weight-only
layers (plain tensors, so export, streaming and CPU all work)."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

GROUP_SIZE = 128  # int4: inputs per scale


class WeightOnlyLinear(torch.nn.Module):
    """A Linear whose weight is stored in 8 or 4 bits and dequantized on the fly (W8A16 / W4A16).

    int8: one scale per output row, symmetric. int4: groups of GROUP_SIZE inputs, each with a scale and a
    minimum in the model's dtype (the GPTQ layout, rounded to nearest), two codes per byte. Every call
    rebuilds the weight in the activation dtype and runs the dense GEMM; AOTInductor compiles the unpacking
    with the rest (int8, H100: 149 ms per FLUX step compiled, 243 ms eager). torchao's int4 kernel
    (tinygemm) is built for a few tokens and ran 11.7x slower than bf16 at FLUX's 4096 image tokens
    (benchmarks/RESULTS.md). Plain tensors, so export, streaming and CPU just work.
    """

    def __init__(self, linear: torch.nn.Linear, bits: int):
        super().__init__()
        self.in_features, self.out_features, self.bits = linear.in_features, linear.out_features, bits
        weight, dtype = linear.weight.detach().float(), linear.weight.dtype
        if bits == 8:
            scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
            codes, low = torch.round(weight / scale).clamp(-127, 127).to(torch.int8), None
        else:
            groups = weight.reshape(self.out_features, -1, GROUP_SIZE)
            low = groups.amin(-1, keepdim=True)
            scale = ((groups.amax(-1, keepdim=True) - low) / 15).clamp(min=1e-12)
            q = torch.round((groups - low) / scale).clamp(0, 15).to(torch.uint8).reshape(self.out_features, -1)
            codes = q[:, 0::2] | (q[:, 1::2] << 4)
        as_param = lambda t: torch.nn.Parameter(t.contiguous(), requires_grad=False)  # noqa: E731
        self.codes, self.scale = as_param(codes), as_param(scale.to(dtype))
        self.low = as_param(low.to(dtype)) if low is not None else None
        self.bias = linear.bias

    def weight(self) -> torch.Tensor:
        if self.bits == 8:
            return self.codes.to(self.scale.dtype) * self.scale
        q = torch.stack((self.codes & 15, self.codes >> 4), dim=-1).reshape(self.out_features, -1, GROUP_SIZE)
        return (q.to(self.scale.dtype) * self.scale + self.low).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight(), self.bias)


def _quantizable(linear: torch.nn.Module, mode: str) -> bool:
    return type(linear) is torch.nn.Linear and (mode != "int4" or linear.in_features % GROUP_SIZE == 0)


def quantize_(transformer: torch.nn.Module, mode: str, work_device: str | None = None,
              result_device: str | None = None, keep_bf16: tuple[str, ...] = ()) -> None:
    """Quantizes the Linear weights in place, layer by layer: each is moved to `work_device` (a GPU does
    it in seconds), quantized, and left on `result_device` (the host, to stream it); default: where it is.
    fp8 leaves the layers whose name contains one of `keep_bf16` as they are."""
    if mode == "none":
        return
    if mode == "fp8":
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow
        from torchao.quantization import quantize_ as torchao_quantize_

        # set_inductor_config=False: keep torchao from switching on global Inductor tuning (see INDUCTOR_CONFIGS)
        config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
        chosen = lambda module, name: (isinstance(module, torch.nn.Linear)  # noqa: E731
                                       and not any(part in name for part in keep_bf16))
        torchao_quantize_(transformer, config, filter_fn=chosen, device=work_device)
        return
    # by name, so no list keeps the replaced bf16 layers (on the work device) alive until the end
    for path in [path for path, module in transformer.named_modules() if _quantizable(module, mode)]:
        parent_path, _, name = path.rpartition(".")
        parent = transformer.get_submodule(parent_path)
        linear = getattr(parent, name)
        home = linear.weight.device
        quantized = WeightOnlyLinear(linear.to(work_device or home), {"int8": 8, "int4": 4}[mode])
        setattr(parent, name, quantized.to(result_device or home))
        del linear


def dequantize_(transformer: torch.nn.Module) -> None:
    """Puts plain weights back where quantization left tensor subclasses."""
    for module in transformer.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and is_traceable_wrapper_subclass(weight):
            module.weight = torch.nn.Parameter(weight.dequantize(), requires_grad=False)

