"""Pre-quantized checkpoints: MODEL_ID pointing at a pipeline whose transformer was saved quantized by torchao (through
diffusers' TorchAoConfig, as the Hub's torchao checkpoints are) loads as stored and is served as stored: never
quantized again, reported as such, planned for at its stored size, AoT-compiled on CPU like any transformer, and a
QUANTIZATION that conflicts with it, or a checkpoint in another format (bitsandbytes), stops startup with a message.

The format is the one the template quantizes to on GPUs: torchao's fp8 with per-row scales. It loads and runs on a
CPU (eager and compiled); only making it needs a GPU, so torchao's hardware check is skipped to save the checkpoint.
One compile for the whole file (`served`, module scope, one 4-token program)."""
import json
import shutil

import pytest
import torch
import torch._inductor.config

import optimization
from aot.cache import cache_key, key_digest
from aot.families import family_named
from aot.hardware import cpu
from aot.memory import measure_footprint
from aot.model import build_tiny, load_model
from aot.quantize import quantize_
from aot.report import Report
from aot.streaming import tensor_parts
from conftest import Compiled, eager_outputs, rel_err, settings_for, transformer_inputs
from settings import Preset

SMALL = {"presets": "small=32x32", "aot_scope": "model"}  # one 4-token program: the cheapest compile
# Compiled vs eager (bf16, fp8 weights; `served` compiles with eager's bf16 rounding): a fifth of the 5.0e-2 by which
# fp8 weights move this output from bf16 ones, so a program that computes anything else fails
TOLERANCE = 1e-2


def _linear_weights(transformer) -> dict[str, torch.Tensor]:
    return {name: m.weight for name, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}


def _save_checkpoint(root, safe_serialization: bool) -> dict[str, list[torch.Tensor]]:
    """The tiny FLUX pipeline in bf16, saved to `root` with its transformer quantized to fp8 by diffusers' TorchAoConfig
    and saved again. Returns the quantized Linear weights' parts as saved (fp8 data and scales)."""
    from diffusers import FluxTransformer2DModel, TorchAoConfig
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

    build_tiny(family_named("flux")).to(torch.bfloat16).save_pretrained(root)
    fp8 = TorchAoConfig(Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))  # as QUANTIZATION=fp8 makes
    with pytest.MonkeyPatch.context() as patch:  # making fp8 weights needs a GPU; serving them does not
        import torchao.quantization.quant_api as quant_api

        patch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
        transformer = FluxTransformer2DModel.from_pretrained(root, subfolder="transformer", torch_dtype=torch.bfloat16,
                                                             quantization_config=fp8)
    shutil.rmtree(root / "transformer")  # the bf16 weights: only the quantized ones stay, as on the Hub
    transformer.save_pretrained(root / "transformer", safe_serialization=safe_serialization)
    return {name: [p.clone() for p in tensor_parts(w)] for name, w in _linear_weights(transformer).items()}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A safetensors checkpoint (diffusers' default with torchao >= 0.16) and its weights as saved."""
    root = tmp_path_factory.mktemp("fp8-checkpoint")
    return root, _save_checkpoint(root, safe_serialization=True)


class Served(Compiled):
    """The checkpoint served with COMPILE=aoti; its Linear weights, as loaded, recorded before optimizing."""

    def record_eager(self) -> None:
        self.loaded = _linear_weights(self.pipe.transformer)


@pytest.fixture(scope="module")
def served(checkpoint, tmp_path_factory):
    """Compiled keeping eager's bf16 rounding between fused ops: Inductor otherwise skips it, and the fp8 activations
    quantized from those values round differently, 5.4e-2 from eager here, as far as fp8 is from bf16. Tests only:
    the app compiles Inductor's way."""
    with torch._inductor.config.patch(emulate_precision_casts=True):
        return Served(model_id=str(checkpoint[0]), aot_cache_dir=tmp_path_factory.mktemp("prequantized-cache"), **SMALL)


def test_it_loads_as_stored_and_is_not_quantized_again(checkpoint, served):
    saved = checkpoint[1]
    weights = _linear_weights(served.pipe.transformer)
    assert weights.keys() == saved.keys() and len(weights) == 30
    for name, weight in weights.items():
        assert weight is served.loaded[name], name  # the very tensors loaded: nothing replaced them
        assert type(weight).__name__ == "Float8Tensor" and not weight.requires_grad, name
        assert all(map(torch.equal, tensor_parts(weight), saved[name])), name  # the file's fp8 data and scales
    assert str(served.pipe.transformer.dtype) == "torch.bfloat16"  # the dtype the checkpoint was made in
    report = served.report
    assert (report.quantization, report.dtype, report.fallbacks) == ("fp8 (pre-quantized)", "bfloat16", [])
    assert report.quantization_reason == (
        "stored so by the checkpoint (torchao Float8Tensor, from Float8DynamicActivationFloat8WeightConfig, 30 of 30 "
        "Linear layers): served as stored, not quantized again")
    assert "quantize_s" not in report.startup  # the status panel's start-up line: no quantization step ran
    status = json.loads(json.dumps(report.as_dict()))  # what /status returns beside the app's own fields
    assert status["quantization"] == "fp8 (pre-quantized)" and "served as stored" in status["quantization_reason"]


def test_compiled_matches_eager_on_the_stored_weights(served):
    assert served.report.compile == "aoti" and served.report.compile_source == "compiled now"
    compiled = served.run()["32x32"]
    assert rel_err(compiled, served.eager["32x32"]) < TOLERANCE


def test_a_restart_loads_its_programs_from_the_cache(checkpoint, served):
    again = Compiled(model_id=str(checkpoint[0]), aot_cache_dir=served.settings.cache_dir, **SMALL)
    assert again.report.compile_source == "loaded from cache"
    assert again.report.cache_keys == served.report.cache_keys
    assert rel_err(again.run()["32x32"], again.eager["32x32"]) < TOLERANCE


def test_the_cache_key_tells_it_from_the_same_model_quantized_at_startup(checkpoint, served, monkeypatch):
    import torchao.quantization.quant_api as quant_api

    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
    pipe = build_tiny(family_named("flux")).to(torch.bfloat16)
    quantize_(pipe.transformer, "fp8")  # what QUANTIZATION=fp8 does on a GPU
    keys = [cache_key(p, "flux", "same", None, Report(device="cpu", dtype="bfloat16", quantization=q), cpu(), "model",
                      4, False, "fixed", {}) for p, q in ((pipe, "fp8"), (served.pipe, served.report.quantization))]
    assert keys[0]["weights"] == keys[1]["weights"]  # the same names, shapes and dtypes
    assert keys[0]["quantization"] != keys[1]["quantization"]  # "fp8" against "fp8 (pre-quantized)"
    assert keys[0]["transformer_config"] != keys[1]["transformer_config"]  # the checkpoint's quantization_config
    assert key_digest(keys[0]) != key_digest(keys[1])


def test_the_planner_counts_the_weights_at_their_stored_size(served):
    transformer = served.pipe.transformer
    footprint = measure_footprint(served.pipe, served.model.max_image_tokens)
    stored = sum(p.numel() * p.element_size() for t in [*transformer.parameters(), *transformer.buffers()]
                 for p in tensor_parts(t))
    as_bf16 = sum(t.numel() * t.element_size() for t in [*transformer.parameters(), *transformer.buffers()])
    assert footprint.transformer["none"] == stored < 0.6 * as_bf16  # fp8 data and fp32 row scales, not bf16
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
                                "text encoders streamed; needs about 1.0 GiB",
                                "quantization: fp8 kept without compilation (about 3x slower than bf16): the checkpoint "
                                "stores no bf16 weights"]  # COMPILE=none here
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
    saved = _save_checkpoint(tmp_path, safe_serialization=False)
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
