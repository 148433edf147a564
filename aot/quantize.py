"""Weight formats for the transformer's Linear layers: torchao's fp8, and the template's int8/int4 weight-only
layers (plain tensors, so export, streaming and CPU all work); and a transformer whose checkpoint stores them
quantized already (torchao-serialized), served as stored."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from aot.decisions import fp8_runs
from aot.hardware import Hardware
from aot.report import Decision
from aot.streaming import tensor_leaves

GROUP_SIZE = 128  # int4: inputs per scale
# torchao's weight tensor classes by name prefix, as the QUANTIZATION value of the same bits
STORED_MODES = {"Float8": "fp8", "Int8": "int8", "Int4": "int4"}


@dataclass(frozen=True)
class Stored:
    """The transformer's Linear weights as a pre-quantized checkpoint stores them: torchao tensor subclasses."""

    mode: str  # the QUANTIZATION value of the same format ("fp8", "int8", "int4"), else torchao's tensor class
    tensor: str  # torchao's tensor class, e.g. "Float8Tensor"
    config: str  # the torchao config it was made with, from the checkpoint's quantization_config
    layers: int  # Linear layers stored quantized
    linears: int  # Linear layers in all

    @property
    def value(self) -> str:
        """The report's `quantization`: not a QUANTIZATION value, so neither the cache key nor a check mistakes it
        for weights this start quantized."""
        return f"{self.mode} (pre-quantized)"


def stored_quantization(transformer: torch.nn.Module) -> Stored | None:
    """How the transformer's Linear weights arrived, before anything here quantizes them: None if plain."""
    linears = [m for m in transformer.modules() if isinstance(m, torch.nn.Linear)]
    stored = [m.weight for m in linears if is_traceable_wrapper_subclass(m.weight)]
    if not stored:
        return None
    name = type(stored[0]).__name__
    # by class name, else by what it holds: torchao's older AffineQuantizedTensor stores fp8 and ints alike
    mode = next((mode for prefix, mode in STORED_MODES.items() if name.startswith(prefix)), None)
    if mode is None:
        dtypes = {str(leaf.dtype) for leaf in tensor_leaves(stored[0])}
        mode = "fp8" if any(dtype.startswith("torch.float8") for dtype in dtypes) else name
    config = transformer.config.get("quantization_config")  # diffusers' TorchAoConfig, as loaded
    quant_type = getattr(config, "quant_type", None)  # a torchao config, or its short name in older checkpoints
    made_with = (quant_type if isinstance(quant_type, str) else type(quant_type).__name__ if quant_type is not None
                 else "an unknown config")
    return Stored(mode, name, made_with, len(stored), len(linears))


def stored_decision(stored: Stored, requested: str, hardware: Hardware) -> Decision:
    """The weights are served as stored; QUANTIZATION=auto, or the stored format, agrees. Any other value stops
    startup rather than falling back: quantizing quantized weights again rounds twice, dequantizing them takes the
    memory the checkpoint was picked to save, and serving them as stored ignores the setting; none is what was asked."""
    if requested not in ("auto", stored.mode):
        raise ValueError(f"QUANTIZATION={requested} conflicts with MODEL_ID's transformer, which is stored quantized "
                         f"({stored.mode}: torchao {stored.tensor}, from {stored.config}) and is served as stored. Set "
                         f"QUANTIZATION=auto or {stored.mode}, or point MODEL_ID at the unquantized model to quantize "
                         "it at startup.")
    if stored.mode == "fp8" and hardware.device == "cuda" and not fp8_runs(hardware):
        raise ValueError(f"MODEL_ID's transformer is stored in fp8, which needs compute capability >= 8.9 on a GPU; "
                         f"this is {hardware.capability}. Point MODEL_ID at the unquantized model (QUANTIZATION=int8 "
                         "quantizes it at startup).")
    return Decision(stored.value, f"stored so by the checkpoint (torchao {stored.tensor}, from {stored.config}, "
                                  f"{stored.layers} of {stored.linears} Linear layers): served as stored, not "
                                  "quantized again")


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

    @property
    def weight(self) -> torch.Tensor:
        """The weight rebuilt in the model's dtype. A property, as on `nn.Linear`: model code reads it (Z-Image's
        timestep embedder takes its dtype from `mlp[0].weight.dtype`)."""
        if self.bits == 8:
            return self.codes.to(self.scale.dtype) * self.scale
        q = torch.stack((self.codes & 15, self.codes >> 4), dim=-1).reshape(self.out_features, -1, GROUP_SIZE)
        return (q.to(self.scale.dtype) * self.scale + self.low).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight, self.bias)


def kept_in_bf16(path: str, keep_bf16: tuple[str, ...]) -> bool:
    """Whether fp8 leaves the layer at `path` (relative to any module above it) in bf16: a family's `keep_bf16` names
    pieces of layer names, so they match the same from a block or from the whole transformer."""
    return any(part in path for part in keep_bf16)


def _quantizable(linear: torch.nn.Module, mode: str) -> bool:
    return type(linear) is torch.nn.Linear and (mode != "int4" or linear.in_features % GROUP_SIZE == 0)


# The floor under an activation row's (or tensor's) largest magnitude when fp8 scales it. torchao divides by
# max|x| / 448 as it is, so a row of zeros quantizes to 0/0 = NaN, and one such row makes the whole call NaN after
# attention. Wan's pipelines hand the transformer such rows at every request: UMT5's embeddings past the prompt are
# zeroed up to 512 tokens, and its text projection is an fp8 Linear (RESULTS.md run 25: every Wan program returned
# NaN on the H100). With the floor a zero row quantizes to zeros; any other row's scale is unchanged (bf16's
# smallest normal is 1e-38, but a row whose largest value is under 1e-12 is zero to every later layer anyway).
ACTIVATION_SCALE_FLOOR = 1e-12


def fp8_config(granularity: str = "row"):
    """torchao's fp8 recipe as this template uses it: activations scaled per call and weights once, per row or per
    tensor (`granularity`), with `ACTIVATION_SCALE_FLOOR`."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor

    # set_inductor_config=False: keep torchao from switching on global Inductor tuning (see INDUCTOR_CONFIGS)
    return Float8DynamicActivationFloat8WeightConfig(granularity={"row": PerRow, "tensor": PerTensor}[granularity](),
                                                     activation_value_lb=ACTIVATION_SCALE_FLOOR,
                                                     set_inductor_config=False)


def floor_activation_scales_(transformer: torch.nn.Module) -> int:
    """`ACTIVATION_SCALE_FLOOR` in the activation scaling of a checkpoint stored in fp8 by torchao, wherever it was
    saved without one: its layers quantize each request's activations with the settings they were saved with, so a
    stored Wan would meet the same NaN as one quantized here without the floor. Returns how many layers changed."""
    changed = 0
    for module in transformer.modules():
        kwargs = getattr(getattr(module, "weight", None), "act_quant_kwargs", None)
        if kwargs is not None and hasattr(kwargs, "hp_value_lb") and kwargs.hp_value_lb is None:
            module.weight.act_quant_kwargs = dataclasses.replace(kwargs, hp_value_lb=ACTIVATION_SCALE_FLOOR)
            changed += 1
    return changed


def quantize_(transformer: torch.nn.Module, mode: str, work_device: str | None = None,
              result_device: str | None = None, keep_bf16: tuple[str, ...] = (), granularity: str = "row") -> None:
    """Quantizes the Linear weights in place, layer by layer: each is moved to `work_device` (a GPU does
    it in seconds), quantized, and left on `result_device` (the host, to stream it); default: where it is.
    fp8 scales activations and weights per row, or per tensor (`granularity`, as the device's probe found;
    aot/probes.py), and leaves the layers whose name contains one of `keep_bf16` as they are."""
    if mode == "none":
        return
    if mode == "fp8":
        from torchao.quantization import quantize_ as torchao_quantize_

        config = fp8_config(granularity)

        def chosen(module, name):
            return isinstance(module, torch.nn.Linear) and not kept_in_bf16(name, keep_bf16)

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

