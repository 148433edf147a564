"""Pre-quantized checkpoints: MODEL_ID pointing at a pipeline whose transformer was saved quantized by torchao (through
diffusers' TorchAoConfig, as the Hub's torchao checkpoints are) loads as stored and is served as stored: never
quantized again, reported as such, planned for at its stored size, AoT-compiled on CPU like any transformer, and a
QUANTIZATION that conflicts with it, or a checkpoint in another format (bitsandbytes), stops startup with a message.

Two checkpoints, for what each can do on a CPU with torch 2.11:
- `checkpoint`: torchao's fp8 with per-tensor scales (PerTensor), the format the template quantizes to where a card
  refuses per-row scales (aot/quantize.py's granularity="tensor", as aot/probes.py finds). Not per-row: on a CPU,
  torch 2.11's `torch._scaled_mm`, which torchao's fp8 layers call, takes per-tensor scales only ("Now _scaled_mm only
  supports per-tensor scaling for CPU backend"). Only making it needs a GPU, so torchao's hardware check is skipped to
  save it. It runs eagerly here (`fp8_served`, COMPILE=none): AOTInductor's CPU compile of fp8 fails in torch 2.11 (the
  generated C++ wrapper declares a kernel taking `at::Float8_e4m3fn*` without its header: "'at::Float8_e4m3fn' has not
  been declared"), a CPU code-generation limit; fp8 programs run on GPUs, which it does not touch.
- `int8_checkpoint`, for the AoT-compiled tests: torchao's int8 weight-only (Int8WeightOnlyConfig), which AOTInductor
  compiles on a CPU. Pickled (safe_serialization=False): Inductor turns its dequantize-and-matmul into
  `torch._weight_int8pack_mm`, whose CPU kernel kills the process (a general protection fault) on an int8 weight that
  is not 16-byte aligned, and weights loaded from safetensors are 8-byte aligned only; torch's own format aligns
  them to 64 bytes.
One compile for the whole file (`served`, module scope, one 4-token program)."""
import json
import shutil

import pytest
import torch

import optimization
from aot.cache import cache_key, key_digest
from aot.families import family_named
from conftest import cpu
from aot.memory import measure_footprint
from aot.model import build_tiny, load_model
from aot.quantize import ACTIVATION_SCALE_FLOOR, fp8_config, quantize_
from aot.report import Report
from aot.streaming import tensor_parts
from conftest import Compiled, eager_outputs, rel_err, settings_for, transformer_inputs
from settings import Preset

SMALL = {"presets": "small=32x32", "aot_scope": "model"}  # one 4-token program: the cheapest compile
# Compiled vs eager (bf16, int8 weights, on a CPU): Inductor's CPU code keeps fp32 through the adaptive layer norms
# where eager rounds each op to bf16 (2.9e-3..3.3e-3 apart at each norm; emulate_precision_casts does not change that in
# torch 2.11), which this tiny random model carries to 2.6e-2..5.2e-2 at its output (over 30 inputs; an unquantized
# bf16 program is as far). Twice the largest: a program over missing or zeroed weights is about 1.0 off, one over int8
# codes without their scales not finite. Finer errors are under that noise (int8 weights move this output only
# 0.7e-2..1.1e-2 from bf16 ones), so test_compiled_matches_eager_on_the_stored_weights also changes a stored weight in
# place and checks that the program follows it exactly
TOLERANCE = 1e-1
FP8_UNCOMPILED = ("quantization: fp8 kept without compilation (about 3x slower than bf16): the checkpoint stores no "
                  "bf16 weights")


def test_fp8_activation_scales_turn_a_row_of_zeros_into_zeros_not_nan():
    """Wan zeroes UMT5's embeddings past the prompt, and its text projection is an fp8 Linear: a row of zeros. torchao
    scales an activation row by its largest magnitude / 448, so without a floor that row quantizes to 0/0 (every Wan
    program returned NaN on the H100, RESULTS.md run 25). The product's config carries the floor into torchao's
    activation quantization (`Float8Tensor.from_hp`, as its fp8 layers call it per request), which keeps the row at
    zero and every other row's codes and scales as they were."""
    from torchao.quantization import Float8Tensor

    config = fp8_config("row")
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    x[1] = 0
    unfloored = Float8Tensor.from_hp(x, granularity=config.granularity[0])
    floored = Float8Tensor.from_hp(x, granularity=config.granularity[0], hp_value_lb=config.activation_value_lb)
    assert unfloored.dequantize()[1].isnan().all()  # why the floor is there
    assert torch.equal(floored.dequantize()[1], torch.zeros(64, dtype=torch.bfloat16))
    others = [0, 2, 3]
    assert torch.equal(floored.qdata[others].float(), unfloored.qdata[others].float())
    assert torch.equal(floored.scale[others], unfloored.scale[others])


def _linear_weights(transformer) -> dict[str, torch.Tensor]:
    return {name: m.weight for name, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}


def _fp8():
    """fp8 with per-tensor scales: what QUANTIZATION=fp8 makes where per-row scales do not run (module docstring)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerTensor

    return Float8DynamicActivationFloat8WeightConfig(granularity=PerTensor())


def _save_checkpoint(root, config, safe_serialization: bool) -> dict[str, list[torch.Tensor]]:
    """The tiny FLUX pipeline in bf16, saved to `root` with its transformer quantized by diffusers' TorchAoConfig with
    torchao's `config` and saved again. Returns the quantized Linear weights' parts as saved (data and scales)."""
    from diffusers import FluxTransformer2DModel, TorchAoConfig

    build_tiny(family_named("flux")).to(torch.bfloat16).save_pretrained(root)
    with pytest.MonkeyPatch.context() as patch:  # making fp8 weights needs a GPU; serving them does not
        import torchao.quantization.quant_api as quant_api

        patch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
        transformer = FluxTransformer2DModel.from_pretrained(root, subfolder="transformer", torch_dtype=torch.bfloat16,
                                                             quantization_config=TorchAoConfig(config))
    shutil.rmtree(root / "transformer")  # the bf16 weights: only the quantized ones stay, as on the Hub
    transformer.save_pretrained(root / "transformer", safe_serialization=safe_serialization)
    return {name: [p.clone() for p in tensor_parts(w)] for name, w in _linear_weights(transformer).items()}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The fp8 checkpoint in safetensors (diffusers' default with torchao >= 0.16) and its weights as saved."""
    root = tmp_path_factory.mktemp("fp8-checkpoint")
    return root, _save_checkpoint(root, _fp8(), safe_serialization=True)


@pytest.fixture(scope="module")
def int8_checkpoint(tmp_path_factory):
    """The int8 weight-only checkpoint, pickled (module docstring), and its weights as saved."""
    from torchao.quantization import Int8WeightOnlyConfig

    root = tmp_path_factory.mktemp("int8-checkpoint")
    return root, _save_checkpoint(root, Int8WeightOnlyConfig(), safe_serialization=False)


class Served(Compiled):
    """A checkpoint served with COMPILE=aoti; its Linear weights, as loaded, recorded before optimizing."""

    def record_eager(self) -> None:
        self.loaded = _linear_weights(self.pipe.transformer)


class ServedEagerly:
    """A checkpoint served with COMPILE=none, through the same `optimize_pipeline_`; its Linear weights, as loaded,
    recorded before optimizing."""

    def __init__(self, **overrides):
        self.settings = settings_for(compile="none", **overrides)
        self.model = load_model(self.settings)
        self.pipe = self.model.pipe
        self.loaded = _linear_weights(self.pipe.transformer)
        self.report = optimization.optimize_pipeline_(self.model, self.settings)


@pytest.fixture(scope="module")
def fp8_served(checkpoint):
    """The fp8 checkpoint served eagerly: AOTInductor cannot compile fp8 for a CPU (module docstring)."""
    return ServedEagerly(model_id=str(checkpoint[0]), **SMALL)


@pytest.fixture(scope="module")
def served(int8_checkpoint, tmp_path_factory):
    """The int8 checkpoint, compiled as the app compiles it."""
    cache = tmp_path_factory.mktemp("prequantized-cache")
    return Served(model_id=str(int8_checkpoint[0]), aot_cache_dir=cache, **SMALL)


def _assert_served_as_stored(served, saved: dict, mode: str, tensor: str, config: str, fallbacks: list[str]) -> None:
    weights = _linear_weights(served.pipe.transformer)
    assert weights.keys() == saved.keys() and len(weights) == 30
    for name, weight in weights.items():
        assert weight is served.loaded[name], name  # the very tensors loaded: nothing replaced them
        assert type(weight).__name__ == tensor and not weight.requires_grad, name
        assert all(map(torch.equal, tensor_parts(weight), saved[name])), name  # the file's data and scales
    assert str(served.pipe.transformer.dtype) == "torch.bfloat16"  # the dtype the checkpoint was made in
    report = served.report
    assert (report.quantization, report.dtype, report.fallbacks) == (f"{mode} (pre-quantized)", "bfloat16", fallbacks)
    assert report.quantization_reason == (
        f"stored so by the checkpoint (torchao {tensor}, from {config}, 30 of 30 Linear layers): served as stored, not "
        "quantized again")
    assert "quantize_s" not in report.startup  # the status panel's start-up line: no quantization step ran
    status = json.loads(json.dumps(report.as_dict()))  # what /status returns beside the app's own fields
    assert status["quantization"] == f"{mode} (pre-quantized)" and "served as stored" in status["quantization_reason"]


def test_it_loads_as_stored_and_is_not_quantized_again(checkpoint, fp8_served):
    assert fp8_served.report.compile == "none"  # fp8 does not compile for a CPU: kept, and said so
    _assert_served_as_stored(fp8_served, checkpoint[1], "fp8", "Float8Tensor",
                             "Float8DynamicActivationFloat8WeightConfig", [FP8_UNCOMPILED])


def test_compiling_it_keeps_the_stored_weights(int8_checkpoint, served):
    assert served.report.compile == "aoti"
    _assert_served_as_stored(served, int8_checkpoint[1], "int8", "Int8Tensor", "Int8WeightOnlyConfig", [])


def test_compiled_matches_eager_on_the_stored_weights(served):
    assert served.report.compile == "aoti" and served.report.compile_source == "compiled now"
    compiled = served.run()["32x32"]
    assert rel_err(compiled, served.eager["32x32"]) < TOLERANCE
    # The program reads the stored int8 tensors themselves, no copy: with proj_out's stored codes zeroed in place, the
    # transformer's output (proj_out's) is exactly its bias, and the same as before once they are put back
    proj_out = served.pipe.transformer.proj_out
    codes = proj_out.weight.qdata
    kept = codes.clone()
    try:
        with torch.no_grad():
            codes.zero_()
        zeroed = served.run()["32x32"]
    finally:
        with torch.no_grad():
            codes.copy_(kept)
    assert torch.equal(zeroed, proj_out.bias.expand_as(zeroed)) and not torch.equal(compiled, zeroed)
    assert torch.equal(served.run()["32x32"], compiled)


def test_a_restart_loads_its_programs_from_the_cache(int8_checkpoint, served):
    again = Compiled(model_id=str(int8_checkpoint[0]), aot_cache_dir=served.settings.cache_dir, **SMALL)
    assert again.report.compile_source == "loaded from cache"
    assert again.report.cache_keys == served.report.cache_keys
    assert rel_err(again.run()["32x32"], again.eager["32x32"]) < TOLERANCE


def test_a_stored_fp8_checkpoint_gets_the_activation_floor_and_a_zero_input_stays_zero(fp8_served):
    """The checkpoint was saved without a floor (`_fp8`), as torchao's config makes it: served, each layer scales its
    activations with the floor, so an input of zeros (per tensor here: one scale for the whole input) gives the bias,
    where 0/0 made it NaN."""
    layers = [m for m in fp8_served.pipe.transformer.modules() if isinstance(m, torch.nn.Linear)]
    assert all(m.weight.act_quant_kwargs.hp_value_lb == ACTIVATION_SCALE_FLOOR for m in layers)
    note = (f"quantization: the stored fp8 layers' activation scales floored at {ACTIVATION_SCALE_FLOOR} "
            f"({len(layers)} layers), so that a row of zeros stays zero rather than NaN")
    assert note in fp8_served.report.notes
    layer = next(m for m in layers if m.bias is not None)
    with torch.inference_mode():
        out = layer(torch.zeros(2, layer.in_features, dtype=torch.bfloat16))
    assert torch.equal(out, layer.bias.expand_as(out))


def test_the_cache_key_tells_it_from_the_same_model_quantized_at_startup(fp8_served, monkeypatch):
    import torchao.quantization.quant_api as quant_api

    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
    pipe = build_tiny(family_named("flux")).to(torch.bfloat16)
    quantize_(pipe.transformer, "fp8", granularity="tensor")  # what QUANTIZATION=fp8 does on a GPU refusing per-row
    stored = (fp8_served.pipe, fp8_served.report.quantization)
    keys = [cache_key(p, "flux", "same", None, Report(device="cpu", dtype="bfloat16", quantization=q), cpu(), "model",
                      4, False, "fixed", {}) for p, q in ((pipe, "fp8"), stored)]
    assert keys[0]["weights"] == keys[1]["weights"]  # the same names, shapes and dtypes
    assert keys[0]["quantization"] != keys[1]["quantization"]  # "fp8" against "fp8 (pre-quantized)"
    assert keys[0]["transformer_config"] != keys[1]["transformer_config"]  # the checkpoint's quantization_config
    assert key_digest(keys[0]) != key_digest(keys[1])


def test_the_planner_counts_the_weights_at_their_stored_size(fp8_served):
    transformer = fp8_served.pipe.transformer
    footprint = measure_footprint(fp8_served.pipe, fp8_served.model.max_image_tokens)
    stored = sum(p.numel() * p.element_size() for t in [*transformer.parameters(), *transformer.buffers()]
                 for p in tensor_parts(t))
    as_bf16 = sum(t.numel() * t.element_size() for t in [*transformer.parameters(), *transformer.buffers()])
    assert footprint.transformer["none"] == stored < 0.6 * as_bf16  # fp8 data and fp32 tensor scales, not bf16
    # nothing can be quantized again: every format is the stored one
    assert set(footprint.transformer.values()) == {stored}
    assert {len(set(sizes)) for sizes in zip(*footprint.blocks.values())} == {1}


def test_low_vram_streams_the_stored_weights_without_quantizing_them(checkpoint):
    """LOW_VRAM=stream, eagerly: the blocks stream through the ring as their fp8 parts, bit for bit the same result."""
    def latents(model):
        return model("a red cube", Preset("small", 32, 32), steps=2, generator=torch.Generator().manual_seed(3),
                     output_type="latent").images

    settings = dict(model_id=str(checkpoint[0]), compile="none", presets="small=32x32")
    resident = load_model(settings_for(**settings))
    model = load_model(settings_for(low_vram="stream", **settings))
    loaded = _linear_weights(model.pipe.transformer)
    report = optimization.optimize_pipeline_(model, settings_for(low_vram="stream", **settings))
    assert report.quantization == "fp8 (pre-quantized)" and report.memory["streamed_blocks"] == 2
    assert report.fallbacks == ["memory: low-VRAM mode (LOW_VRAM=stream): weights as loaded, all 2 blocks streamed, "
                                "text encoders streamed; needs about 1.0 GiB", FP8_UNCOMPILED]  # COMPILE=none here
    weights = _linear_weights(model.pipe.transformer)
    assert all(type(w).__name__ == "Float8Tensor" for w in weights.values())
    outside = [name for name in weights if not name.startswith(("transformer_blocks.", "single_transformer_blocks."))]
    assert outside and all(weights[name] is loaded[name] for name in outside)  # resident: as loaded
    assert torch.equal(latents(model), latents(resident))


@pytest.mark.parametrize("requested", ["int8", "none"])
def test_a_conflicting_quantization_stops_startup(checkpoint, requested):
    settings = settings_for(model_id=str(checkpoint[0]), quantization=requested, **SMALL)
    with pytest.raises(ValueError) as raised:
        optimization.optimize_pipeline_(load_model(settings), settings)
    assert str(raised.value) == (
        f"QUANTIZATION={requested} conflicts with MODEL_ID's transformer, which is stored quantized (fp8: torchao "
        "Float8Tensor, from Float8DynamicActivationFloat8WeightConfig) and is served as stored. Set QUANTIZATION=auto "
        "or fp8, or point MODEL_ID at the unquantized model to quantize it at startup.")


def test_a_pickled_checkpoint_loads_as_stored_too(tmp_path):
    """Checkpoints made before torchao 0.16 could be saved as safetensors are pickled (safe_serialization=False)."""
    saved = _save_checkpoint(tmp_path, _fp8(), safe_serialization=False)
    files = sorted(p.name for p in (tmp_path / "transformer").iterdir())
    assert files == ["config.json", "diffusion_pytorch_model.bin"]
    model = load_model(settings_for(model_id=str(tmp_path), **SMALL))
    weights = _linear_weights(model.pipe.transformer)
    assert all(all(map(torch.equal, tensor_parts(weights[name]), parts)) for name, parts in saved.items())
    assert torch.isfinite(eager_outputs(model.pipe, transformer_inputs(model))["32x32"]).all()


def test_a_bitsandbytes_checkpoint_stops_startup_with_what_to_do(checkpoint, tmp_path):
    """bitsandbytes is not a dependency of the template and not installed here: the check reads the config alone."""
    shutil.copy(checkpoint[0] / "model_index.json", tmp_path)
    config = json.loads((checkpoint[0] / "transformer" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit) as raised:
        load_model(settings_for(model_id=str(tmp_path)))
    assert str(raised.value).startswith(f"MODEL_ID='{tmp_path}' holds a transformer quantized with bitsandbytes. This "
                                        "template serves pre-quantized transformers saved by torchao only")
    assert "set QUANTIZATION=fp8, int8 or int4 to quantize it at startup" in str(raised.value)
