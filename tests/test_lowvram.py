"""Low-VRAM mode: the memory plan, 8/4-bit weight-only layers, and streamed block weights, on CPU."""
import logging

import pytest
import torch

import optimization
from aot.memory import GiB, MemoryPlan, choose_memory_plan, measure_footprint, place_pipeline_
from aot.model import load_model
from aot.quantize import GROUP_SIZE, WeightOnlyLinear, quantize_
from conftest import SEQ, rel_err, settings_for, tiny_model
from settings import Preset, Settings


# --- the plan, on FLUX.1-dev's real sizes (built on the meta device: no memory, no download) -------------
@pytest.fixture(scope="module")
def flux_dev_footprint():
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            pipe = FluxPipeline(
                scheduler=None, tokenizer=None, tokenizer_2=None,
                transformer=FluxTransformer2DModel(guidance_embeds=True),  # FLUX.1-dev's defaults: 19 + 38 blocks
                text_encoder=CLIPTextModel(CLIPTextConfig(projection_dim=768)),
                text_encoder_2=T5EncoderModel(T5Config(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                                       feed_forward_proj="gated-gelu")),
                vae=AutoencoderKL(latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
            )
    finally:
        torch.set_default_dtype(previous)
    settings = Settings.from_env({"MODEL_ID": "black-forest-labs/FLUX.1-dev"}, has_cuda=True)
    model = load_model(settings, pipe=pipe)  # FLUX.1-dev's family and presets, without a download
    assert model.max_image_tokens == 4096  # 1024x1024
    return measure_footprint(pipe, model.max_image_tokens)


def test_footprint_matches_flux_dev(flux_dev_footprint):
    fp = flux_dev_footprint
    assert 22.0 < fp.transformer["none"] / GiB < 22.4  # 11.9 B bf16 parameters
    assert 8.8 < fp.text_encoders / GiB < 9.4  # T5-XXL encoder and a CLIP text encoder
    assert fp.transformer["int8"] < 0.52 * fp.transformer["none"]
    assert fp.transformer["int4"] < 0.30 * fp.transformer["none"]
    # measured on the H100 (benchmarks/RESULTS.md, run 7): 33.9 GiB eager peak; int8 13.7; int4 8.5
    assert fp.need(None) / GiB == pytest.approx(35.7, abs=0.2)
    assert 13.7 < fp.need("int8") / GiB < 17
    assert 8.5 < fp.need("int4") / GiB < 12


@pytest.mark.parametrize("budget_gib, fp8_ok, expected", [
    (80, True, (False, "", False)),       # an H100: everything resident, as usual
    (48, False, (False, "", False)),      # an A40 / L40S-class card still fits bf16
    (24, True, (True, "fp8", False)),     # a 4090 or L4: fp8 weights, resident (H100 under a 24 GiB cap: 13.8 GiB)
    (24, False, (True, "int8", False)),   # a 3090 or A10G: no fp8 tensor cores, so int8
    (12, False, (True, "int4", False)),   # a 12 GB card: int4 resident
    (8, False, (True, "int8", True)),     # 8 GB: int8 blocks streamed from host memory
])
def test_layout_is_chosen_automatically_when_the_model_does_not_fit(flux_dev_footprint, budget_gib, fp8_ok, expected):
    plan = choose_memory_plan("auto", "auto", flux_dev_footprint, budget_gib * GiB, fp8_ok)
    assert (plan.low_vram, plan.quantization, plan.stream) == expected
    assert plan.need_gib <= budget_gib
    if plan.low_vram:
        assert plan.reason.startswith("the whole pipeline needs 35.") and f"{float(budget_gib)} GiB available" in plan.reason


def test_explicit_choices_are_honoured(flux_dev_footprint):
    fp = flux_dev_footprint
    assert not choose_memory_plan("off", "auto", fp, 8 * GiB, False).low_vram
    assert not choose_memory_plan("auto", "auto", fp, None, True).low_vram  # CPU or ZeroGPU: no budget to plan for
    plan = choose_memory_plan("auto", "none", fp, 24 * GiB, True)  # keep bf16 weights: stream them
    assert (plan.quantization, plan.stream) == ("none", True)
    plan = choose_memory_plan("stream", "auto", fp, 80 * GiB, True)
    assert (plan.low_vram, plan.quantization, plan.stream) == (True, "int8", True)
    plan = choose_memory_plan("on", "int4", fp, 80 * GiB, True)
    assert (plan.low_vram, plan.quantization, plan.stream) == (True, "int4", False)
    with pytest.raises(ValueError, match="cannot be streamed"):
        choose_memory_plan("stream", "fp8", fp, 80 * GiB, True)


def test_nothing_fits_runs_the_smallest_layout_and_says_so(flux_dev_footprint):
    plan = choose_memory_plan("auto", "auto", flux_dev_footprint, 1 * GiB, False)
    assert (plan.low_vram, plan.quantization, plan.stream) == (True, "int4", True)
    assert "may run out of memory" in plan.reason


@pytest.mark.parametrize("env, message", [
    ({"LOW_VRAM": "maybe"}, "LOW_VRAM='maybe' is not one of"),
    ({"VRAM_LIMIT_GIB": "-3"}, "positive number of GiB"),
    ({"VRAM_LIMIT_GIB": "lots"}, "positive number of GiB"),
    ({"LOW_VRAM": "stream", "QUANTIZATION": "fp8", "COMPILE": "aoti"}, "cannot stream fp8"),
])
def test_bad_low_vram_settings_fail_at_startup(env, message):
    with pytest.raises(ValueError, match=message):
        Settings.from_env({"MODEL_ID": "tiny", **env}, has_cuda=False)


# --- weight-only layers -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bits, limit", [(8, 1e-2), (4, 1e-1)])
def test_weight_only_linear_stays_close_to_the_float_layer(bits, limit):
    torch.manual_seed(0)
    linear = torch.nn.Linear(512, 96)
    x = torch.randn(7, 512)
    quantized = WeightOnlyLinear(linear, bits)
    assert rel_err(quantized(x), linear(x)) < limit
    assert quantized.codes.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert quantized.codes.numel() == 512 * 96 // (8 // bits)  # int4: two codes per byte
    if bits == 4:
        assert quantized.scale.shape == (96, 512 // GROUP_SIZE, 1)  # one scale per 128 inputs


def test_int4_packing_is_exact_for_representable_weights():
    """Weights already on a 16-level grid per group of 128 come back bit for bit: the packing loses nothing."""
    torch.manual_seed(1)
    levels = torch.randint(0, 16, (64, 256)).float()
    levels[:, ::128], levels[:, 1::128] = 0, 15  # every group spans the full grid
    linear = torch.nn.Linear(256, 64)
    with torch.no_grad():
        linear.weight.copy_(levels * 0.25 - 1.0)
    assert torch.equal(WeightOnlyLinear(linear, 4).weight(), linear.weight)


def test_int4_leaves_layers_with_unaligned_inputs_alone():
    model = torch.nn.Sequential(torch.nn.Linear(100, 256), torch.nn.Linear(256, 8))
    quantize_(model, "int4")
    assert type(model[0]) is torch.nn.Linear and isinstance(model[1], WeightOnlyLinear)


# --- the mode end to end on the tiny pipeline ----------------------------------------------------------------
def _latents(model):
    assert model.defaults.max_sequence_length == SEQ
    return model("a red cube", Preset("square", 64, 64), steps=3, generator=torch.Generator().manual_seed(3),
                 output_type="latent").images


@pytest.fixture(scope="module")
def fp32_latents():
    return _latents(tiny_model())


def test_low_vram_int8_resident_is_reported_and_stays_within_tolerance(fp32_latents, caplog):
    model = tiny_model()
    pipe = model.pipe
    with caplog.at_level(logging.WARNING, logger="aot-space"):
        report = optimization.optimize_pipeline_(model, settings_for(low_vram="on", quantization="int8", compile="none"))
    assert report.memory["low_vram"] and (report.memory["quantization"], report.memory["stream"]) == ("int8", False)
    assert report.quantization == "int8"
    assert any(f.startswith("memory: low-VRAM mode (LOW_VRAM=on): int8 weights, resident") for f in report.fallbacks)
    assert sum("FALLBACK memory" in r.getMessage() for r in caplog.records) == 1  # said once
    assert sum(isinstance(m, WeightOnlyLinear) for m in pipe.transformer.modules()) > 0
    assert all(type(m) is not torch.nn.Linear for m in pipe.transformer.modules())
    assert rel_err(_latents(model), fp32_latents) < 2e-2


def test_streamed_blocks_are_copied_in_for_every_call(fp32_latents, monkeypatch):
    """The group-offloading hooks run: each block of the transformer and of the text encoders is loaded
    before its call and dropped after it, and the result is what the same weights give resident."""
    from diffusers.hooks.group_offloading import ModuleGroup

    onloads = []
    real_onload = ModuleGroup.onload_
    monkeypatch.setattr(ModuleGroup, "onload_", lambda group: (onloads.append(group.onload_leader), real_onload(group))[1])
    resident = tiny_model()
    place_pipeline_(resident.pipe, MemoryPlan(True, "int8", False), "cpu")
    streamed_model = tiny_model()
    streamed = streamed_model.pipe
    report = optimization.optimize_pipeline_(streamed_model, settings_for(low_vram="stream", quantization="int8",
                                                                          compile="aoti"))
    assert (report.memory["quantization"], report.memory["stream"]) == ("int8", True)
    assert report.compile == "none" and any(f.startswith("compile: off: compiled programs hold on to") for f in report.fallbacks)
    onloads.clear()
    latents = _latents(streamed_model)
    steps = 3
    transformer = streamed.transformer
    for block in (*transformer.transformer_blocks, *transformer.single_transformer_blocks):
        assert sum(leader is block for leader in onloads) == steps
    assert sum(leader is streamed.text_encoder_2.encoder.block[0] for leader in onloads) == 1  # once per prompt
    assert torch.allclose(latents, _latents(resident), rtol=1e-5, atol=1e-6)
    assert rel_err(latents, fp32_latents) < 2e-2


def test_low_vram_refuses_fp8_where_it_cannot_run_like_the_normal_path():
    with pytest.raises(ValueError, match="compute capability >= 8.9"):
        optimization.optimize_pipeline_(tiny_model(), settings_for(low_vram="on", quantization="fp8"))
