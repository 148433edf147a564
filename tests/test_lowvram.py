"""Low-VRAM mode on CPU: the memory plan, 8/4-bit weight-only layers, and transformer blocks streamed through a ring of
device buffers (aot/streaming.py), mixed with resident ones, eager and AoT-compiled. On a CPU host and device are one:
the ring copies host to host through the same code as on a GPU."""
import logging

import pytest
import torch

import optimization
from aot.memory import (GiB, MemoryPlan, _own_bytes, choose_memory_plan, measure_footprint, place_pipeline_,
                        streamed_blocks, text_encoders, transformer_blocks)
from aot.model import Model, load_model
from aot.programs import capture_inputs
from aot.quantize import GROUP_SIZE, WeightOnlyLinear, quantize_
from aot.streaming import BlockStream
from conftest import SEQ, TEXT_FAMILIES, eager_outputs, rel_err, settings_for, tiny_model, transformer_inputs
from settings import Preset, Settings

TOLERANCE = 1e-4  # fp32, compiled vs eager


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
                                  down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4),
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
    assert 8.8 < fp.text_encoders / GiB < 9.1  # T5-XXL encoder and a CLIP text encoder, T5's shared embedding once
    assert fp.transformer["int8"] < 0.52 * fp.transformer["none"]
    assert fp.transformer["int4"] < 0.30 * fp.transformer["none"]
    assert fp.block_groups == (0,) * 19 + (1,) * 38  # double then single blocks: two rings
    # measured on the H100 (benchmarks/RESULTS.md, run 7): 33.9 GiB eager peak; int8 13.7; int4 8.5; streamed 2.7
    assert fp.need(None) / GiB == pytest.approx(35.3, abs=0.2)
    assert 13.7 < fp.need("int8") / GiB < 17
    assert 8.5 < fp.need("int4") / GiB < 12
    assert 2.7 < fp.need("int8", streamed=57) / GiB < 7


def test_the_plan_counts_the_layers_fp8_leaves_in_bf16(monkeypatch):
    """Qwen-Image keeps its text stream's projections in bf16 under fp8, a third of its weights: a plan that counted
    them as fp8 ran out of memory placing the real model under a 24 GiB cap (RESULTS.md run 19)."""
    import torchao.quantization.quant_api as quant_api

    from aot.memory import resident_bytes

    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)  # fp8 is made on GPUs only
    model = tiny_model(model_id="tiny-qwen-image", quantization="none")
    model.pipe.transformer.to(torch.bfloat16)  # as served on a GPU
    keep = model.family.keep_bf16
    planned = measure_footprint(model.pipe, model.max_image_tokens, keep).transformer["fp8"]
    naive = measure_footprint(model.pipe, model.max_image_tokens).transformer["fp8"]
    weights = model.pipe.transformer.state_dict().values()
    before = resident_bytes(model.pipe) - sum(t.numel() * t.element_size() for t in weights)
    quantize_(model.pipe.transformer, "fp8", keep_bf16=keep)
    assert planned == resident_bytes(model.pipe) - before > naive


def test_streamed_blocks_are_spread_over_the_call_order():
    assert streamed_blocks(8, 0) == [] and streamed_blocks(8, 8) == list(range(8))
    assert streamed_blocks(8, 4) == [1, 3, 5, 7]
    spread = streamed_blocks(57, 19)
    assert len(spread) == 19 and {b - a for a, b in zip(spread, spread[1:])} == {3}


@pytest.mark.parametrize("budget_gib, fp8_ok, expected", [
    (80, True, (False, "", "none")),    # an H100: everything resident, as usual
    (48, False, (False, "", "none")),   # an A40 / L40S-class card still fits bf16
    (24, True, (True, "fp8", "none")),  # a 4090 or L4: fp8 weights, resident (H100 under a 24 GiB cap: 13.8 GiB)
    (16, False, (True, "int8", "none")),  # 16 GB without fp8 tensor cores: int8, resident
    # 24 GB without fp8 (3090, A10G): bf16 with a few blocks streamed, their copies hidden under the compute, is
    # estimated faster than int8 resident (144 against 149 ms a step on the H100) and adds no error
    (24, False, (True, "none", "some")),
    (12, True, (True, "fp8", "some")),  # 12 GB: fp8 with about half the blocks streamed beats int4 resident
    (8, False, (True, "int4", "some")),  # 8 GB: int4, part streamed
])
def test_layout_is_chosen_automatically_when_the_model_does_not_fit(flux_dev_footprint, budget_gib, fp8_ok, expected):
    fp, budget = flux_dev_footprint, budget_gib * GiB
    plan = choose_memory_plan("auto", "auto", fp, budget, fp8_ok, compiled=True)
    streamed = "none" if plan.streamed_blocks == 0 else "all" if plan.streamed_blocks == 57 else "some"
    assert (plan.low_vram, plan.quantization, streamed) == expected
    assert plan.need_gib <= budget_gib and plan.blocks == 57
    if plan.low_vram:
        assert plan.reason.startswith("the whole pipeline needs 35.")
        assert f"{float(budget_gib)} GiB available" in plan.reason
        # the fewest streamed blocks that fit: each block streamed costs copies on every step
        assert all(fp.need(plan.quantization, k) > budget for k in range(plan.streamed_blocks))


def test_a_mixed_layout_is_reported_with_what_it_costs(flux_dev_footprint):
    plan = choose_memory_plan("auto", "auto", flux_dev_footprint, 10 * GiB, True, compiled=True)
    assert plan.quantization == "fp8" and 0 < plan.streamed_blocks < 57 and plan.step_error == 5.1e-2
    assert plan.layout == (f"fp8 weights (about 5.1e-02 relative error per step), {57 - plan.streamed_blocks} of 57 "
                           f"blocks resident, {plan.streamed_blocks} streamed, text encoders streamed; needs about "
                           f"{plan.need_gib} of 10.0 GiB")


def test_explicit_choices_are_honoured(flux_dev_footprint):
    fp = flux_dev_footprint
    assert not choose_memory_plan("off", "auto", fp, 8 * GiB, False, True).low_vram
    # CPU or ZeroGPU: no budget to plan for
    assert not choose_memory_plan("auto", "auto", fp, None, True, True).low_vram
    plan = choose_memory_plan("auto", "none", fp, 24 * GiB, True, True)  # keep bf16 weights: stream some blocks
    assert plan.quantization == "none" and 0 < plan.streamed_blocks < 57
    plan = choose_memory_plan("stream", "auto", fp, 80 * GiB, True, True)  # every block streamed: fewest bytes wins
    assert (plan.low_vram, plan.quantization, plan.streamed_blocks) == (True, "int4", 57)
    plan = choose_memory_plan("on", "int4", fp, 80 * GiB, True, True)
    assert (plan.low_vram, plan.quantization, plan.streamed_blocks) == (True, "int4", 0)
    plan = choose_memory_plan("stream", "fp8", fp, 80 * GiB, True, True)  # fp8 streams too: the ring copies its parts
    assert (plan.quantization, plan.streamed_blocks) == ("fp8", 57)


def test_nothing_fits_runs_the_smallest_layout_and_says_so(flux_dev_footprint):
    plan = choose_memory_plan("auto", "auto", flux_dev_footprint, 1 * GiB, False, True)
    assert (plan.low_vram, plan.quantization, plan.streamed_blocks) == (True, "int4", 57)
    assert "may run out of memory" in plan.reason


@pytest.mark.parametrize("env, message", [
    ({"LOW_VRAM": "maybe"}, "LOW_VRAM='maybe' is not one of"),
    ({"VRAM_LIMIT_GIB": "-3"}, "positive number of GiB"),
    ({"VRAM_LIMIT_GIB": "lots"}, "positive number of GiB"),
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
    assert torch.equal(WeightOnlyLinear(linear, 4).weight, linear.weight)


def test_int4_leaves_layers_with_unaligned_inputs_alone():
    model = torch.nn.Sequential(torch.nn.Linear(100, 256), torch.nn.Linear(256, 8))
    quantize_(model, "int4")
    assert type(model[0]) is torch.nn.Linear and isinstance(model[1], WeightOnlyLinear)


# --- the ring ------------------------------------------------------------------------------------------------
def _storages(module: torch.nn.Module) -> dict[int, int]:
    """The storages a module's tensors live in (a tensor subclass: the tensors inside it), by address: their bytes."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    found = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        parts = ([getattr(tensor, name) for name in tensor.__tensor_flatten__()[0]]
                 if is_traceable_wrapper_subclass(tensor) else [tensor])
        found.update({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in parts})
    return found


def test_fp8_weights_stream_as_the_tensors_inside_them(monkeypatch):
    """torchao's Float8Tensor wraps `qdata` and `scale`: those become ring buffers and the wrapper is rebuilt around
    them, so a program sees plain fp8 tensors; loading a block gives back its own weights bit for bit. fp8 matmuls
    need a GPU, so only the weights are checked here (torchao's hardware check is skipped to quantize on CPU)."""
    import torchao.quantization.quant_api as quant_api

    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(64, 32, dtype=torch.bfloat16)) for _ in range(3))
    for block in blocks:
        quantize_(block, "fp8")
    expected = [block[0].weight.dequantize() for block in blocks]
    stream = BlockStream("cpu")
    for block in blocks:
        stream.add_(block)
    weights = [block[0].weight for block in blocks]
    assert all(type(w).__name__ == "Float8Tensor" and isinstance(w, torch.nn.Parameter) for w in weights)
    assert _storages(blocks[0]) == _storages(blocks[2]) and not set(_storages(blocks[0])) & set(_storages(blocks[1]))
    for i, block in enumerate(blocks):
        stream.load(i)
        assert torch.equal(block[0].weight.dequantize(), expected[i])


def deep_tiny_model(**overrides) -> Model:
    """The tiny FLUX pipeline with 3 double and 5 single blocks (seeded), so that blocks share ring slots."""
    from diffusers import FluxTransformer2DModel

    model = tiny_model(**overrides)
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    config = {**model.pipe.transformer.config, "num_layers": 3, "num_single_layers": 5}
    model.pipe.transformer = FluxTransformer2DModel.from_config(config).eval()
    torch.random.set_rng_state(state)
    return model


# Of the deep tiny model's 8 blocks, 6 stream: 2 double blocks, which have a 2-slot ring to themselves (so stay in
# place after their first copy, as the planner counts them), and 4 single blocks, which share a 2-slot ring and are
# copied in on every step.
STREAMED, COPIED = 6, 4


def _mixed_budget(model: Model, mode: str) -> float:
    """A VRAM_LIMIT_GIB for which the planner streams STREAMED blocks: on a CPU it is planned for, nothing capped."""
    fp = measure_footprint(model.pipe, model.max_image_tokens)
    assert all(fp.need(mode, k) > fp.need(mode, STREAMED) for k in range(STREAMED))
    return (fp.need(mode, STREAMED) + 64) / GiB


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
        settings = settings_for(low_vram="on", quantization="int8", compile="none")
        report = optimization.optimize_pipeline_(model, settings)
    assert report.memory["low_vram"]
    assert (report.memory["quantization"], report.memory["streamed_blocks"]) == ("int8", 0)
    assert report.quantization == "int8"
    assert any(f.startswith("memory: low-VRAM mode (LOW_VRAM=on): int8 weights (about 8.0e-03 relative error per "
                            "step), all blocks resident, text encoders streamed") for f in report.fallbacks)
    assert sum("FALLBACK memory" in r.getMessage() for r in caplog.records) == 1  # said once
    assert sum(isinstance(m, WeightOnlyLinear) for m in pipe.transformer.modules()) > 0
    assert all(type(m) is not torch.nn.Linear for m in pipe.transformer.modules())
    assert rel_err(_latents(model), fp32_latents) < 2e-2


def test_a_mixed_layout_streams_some_blocks_through_one_ring_per_block_class(monkeypatch):
    """int8, eager, 6 of 8 blocks streamed: streamed blocks' tensors are views of their ring's slots (block j and
    j + 2 of a ring share storage), the transformer holds the rings and the resident blocks, not every block, and
    the result is bit for bit the same weights resident. Each step copies each streamed block once, ahead of its
    call; the text encoders still stream through diffusers' group offloading, each layer once per prompt."""
    from diffusers.hooks.group_offloading import ModuleGroup

    onloads = []
    real_onload = ModuleGroup.onload_
    monkeypatch.setattr(ModuleGroup, "onload_",
                        lambda group: (onloads.append(group.onload_leader), real_onload(group))[1])
    resident = deep_tiny_model()
    place_pipeline_(resident.pipe, MemoryPlan(True, "int8", blocks=8, streamed_blocks=0), "cpu")
    model = deep_tiny_model()
    report = optimization.optimize_pipeline_(model, settings_for(low_vram="on", quantization="int8", compile="none",
                                                                 vram_limit_gib=repr(_mixed_budget(model, "int8"))))
    assert (report.memory["quantization"], report.memory["streamed_blocks"], report.memory["blocks"]) == ("int8", 6, 8)
    assert report.memory["need_gib"] <= report.memory["budget_gib"]
    assert "2 of 8 blocks resident, 6 streamed" in report.memory["layout"]
    transformer = model.pipe.transformer
    stream = transformer.block_stream
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    streamed = [blocks[i] for i in streamed_blocks(8, STREAMED)]
    assert stream.blocks == streamed and len(stream.rings) == 2  # one ring per block class
    singles = [b for b in streamed if b in transformer.single_transformer_blocks]
    assert len(singles) == 4
    assert _storages(singles[0]) == _storages(singles[2]) and _storages(singles[1]) == _storages(singles[3])
    assert not set(_storages(singles[0])) & set(_storages(singles[1]))
    ring = sum(t.untyped_storage().nbytes() for slots in stream.rings.values() for slot in slots for t in slot.tensors)
    host = sum(t.untyped_storage().nbytes() for weights in stream.host for t in weights)
    all_resident = sum(_storages(resident.pipe.transformer).values())
    assert sum(_storages(transformer).values()) == all_resident - host + ring < all_resident

    onloads.clear()
    latents = _latents(model)
    assert torch.equal(latents, _latents(resident))
    first_projection = model.pipe.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q  # one leaf-level group
    assert sum(leader is first_projection for leader in onloads) == 1
    stream.loads = stream.late_loads = 0
    _latents(model)
    assert (stream.loads, stream.late_loads) == (3 * COPIED, 0)


def test_each_text_encoder_layer_loads_its_own_weights_when_called():
    """FLUX.2 [dev]'s Mistral 3 and Qwen-Image's Qwen2.5-VL call their input embedding from the model around the
    language model, before it runs. Groups per block loaded it only when the language model ran: a device mismatch on
    the GPU (RESULTS.md run 19), invisible on a CPU, where both devices are one. So every module that owns weights
    must be its own group, loaded by its own call, whoever calls it."""
    from diffusers.hooks import HookRegistry

    for name in ("flux2", "qwen-image", "flux"):
        pipe = tiny_model(model_id=f"tiny-{name}", quantization="none").pipe
        blocks = sum(map(len, transformer_blocks(pipe.transformer).values()))
        place_pipeline_(pipe, MemoryPlan(True, "none", blocks=blocks, streamed_blocks=0), "cpu")
        texts = text_encoders(pipe)
        owners = [m for text in texts for m in text.modules() if _own_bytes(m)]
        leaders = [HookRegistry.check_if_exists_or_initialize(m).get_hook("group_offloading") for m in owners]
        assert all(hook is not None and hook.group.onload_leader is m for hook, m in zip(leaders, owners)), name
        embedding = texts[-1].get_input_embeddings()
        assert embedding in owners, name


def test_every_family_streams_its_blocks():
    """LOW_VRAM=stream on each family's tiny pipeline, eagerly: the same result as resident, whatever its block
    lists and their order (Z-Image's refiners run before its layers; blocks of one class but another layout get
    their own ring), and after the first call every copy is made ahead of its block."""
    for family in TEXT_FAMILIES:
        settings = {"model_id": f"tiny-{family.name}", "quantization": "none", "compile": "none"}
        resident, model = tiny_model(**settings), tiny_model(**settings)
        report = optimization.optimize_pipeline_(model, settings_for(low_vram="stream", **settings))
        assert report.memory["streamed_blocks"] == report.memory["blocks"] > 0, family.name
        expected = _run(resident)
        leaves = torch.utils._pytree.tree_leaves
        assert all(map(torch.equal, leaves(_run(model)), leaves(expected)))
        stream = model.pipe.transformer.block_stream
        stream.late_loads = 0
        _run(model)
        assert stream.late_loads == 0, family.name


def _run(model: Model):
    return model("a red cube", model.presets[0], steps=2, generator=torch.Generator().manual_seed(3),
                 output_type="latent").images


def test_streamed_blocks_stay_compiled_and_read_the_ring():
    """COMPILE=aoti, AOT_SCOPE=blocks with 6 of 8 blocks streamed (the planner's choice under VRAM_LIMIT_GIB): every
    preset matches eager, whole runs too, with each streamed block copied once a step, ahead of its call. Each block
    program is bound once to its block's own tensors, which are the ring's: loading another block into a shared
    slot changes what the first block's program computes."""
    settings = dict(presets="square=64x64,wide=128x32", quantization="none", compile="aoti", aot_scope="blocks",
                    low_vram="on")  # two presets of 16 image tokens: one program per block class
    model = deep_tiny_model(presets=settings["presets"])
    inputs = transformer_inputs(model)
    eager, eager_latents = eager_outputs(model.pipe, inputs), _latents(model)
    report = optimization.optimize_pipeline_(model, settings_for(vram_limit_gib=repr(_mixed_budget(model, "none")),
                                                                 **settings))
    assert report.compile == "aoti" and report.compile_scope == "blocks", report.fallbacks
    assert (report.memory["streamed_blocks"], report.memory["blocks"]) == (STREAMED, 8)
    compiled = eager_outputs(model.pipe, inputs)
    for name in eager:
        assert rel_err(compiled[name], eager[name]) < TOLERANCE, name
    stream = model.pipe.transformer.block_stream
    stream.loads = stream.late_loads = 0
    assert rel_err(_latents(model), eager_latents) < TOLERANCE
    assert (stream.loads, stream.late_loads) == (3 * COPIED, 0)

    singles = [b for b in stream.blocks if b in model.pipe.transformer.single_transformer_blocks]
    first, third = singles[0], singles[2]  # both in slot 0 of the single blocks' ring
    slot = stream.slot_of[stream.blocks.index(first)]
    assert stream.slot_of[stream.blocks.index(third)] is slot
    for block in (first, third):
        program = block.forward.programs[0][1]  # the block's own program: spaces binds it to these tensors, once
        bound = {t.untyped_storage().data_ptr() for t in program.weights.values()}
        assert bound == set(_storages(block)) == {t.untyped_storage().data_ptr() for t in slot.tensors}
    args, kwargs = capture_inputs(model, first, model.presets[0])
    output = lambda block: torch.cat([t.flatten() for t in torch.utils._pytree.tree_leaves(  # noqa: E731
        block.forward(*args, **kwargs))])  # the program alone, without the hooks that would load the block
    with torch.inference_mode():
        stream.load(stream.blocks.index(first))
        own = output(first)
        stream.load(stream.blocks.index(third))
        assert torch.equal(output(first), output(third)) and not torch.allclose(output(first), own)


def test_low_vram_refuses_fp8_where_it_cannot_run_like_the_normal_path():
    with pytest.raises(ValueError, match="compute capability >= 8.9"):
        optimization.optimize_pipeline_(tiny_model(), settings_for(low_vram="on", quantization="fp8"))


@pytest.mark.parametrize("requested", ["on", "stream"])
def test_forced_low_vram_is_refused_on_zerogpu_as_a_fallback(requested):
    import json
    from importlib.resources import files

    from aot.hardware import Hardware, Size, ZeroGPUCard
    from aot.memory import plan_memory
    from aot.report import Report

    # ZeroGPU's main process has no CUDA to pin or stream with: the request falls back to everything resident. The
    # card is spaces' own entry for ZeroGPU's RTX Pro 6000, as hardware.detect() reads it there
    entry = next(c for c in json.loads(files("spaces.zero").joinpath("configs.json").read_text())
                 if c["model"].startswith("NVIDIA RTX PRO 6000"))
    card = ZeroGPUCard.from_spaces(entry)
    zerogpu = Hardware("cuda", card.model, card.capability, card.sm_count, card.memory, "13.0", False, card)
    report = Report(device="cpu", dtype="float32")
    plan, planned = plan_memory(tiny_model().pipe, requested, "auto", None, 16, zerogpu, False, True, report)
    assert not plan.low_vram and not plan.stream
    assert planned.size is Size.LARGE  # the tiny pipeline fits half the card
    assert report.fallbacks == [f"memory: LOW_VRAM={requested} does not run on ZeroGPU (its main process has no GPU "
                                "to stream to); everything resident"]


# --- Wan 2.2 A14B: two experts, video tokens -------------------------------------------------------------------
@pytest.fixture(scope="module")
def wan_a14b_footprint():
    """Wan 2.2 T2V-A14B's real sizes on the meta device (two 14.3B experts, UMT5-XXL), planned at 832x480x81."""
    from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from aot.families.wan import REAL_SIZE, UMT5_XXL, WAN

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            pipe = WanPipeline(tokenizer=None, text_encoder=UMT5EncoderModel(UMT5Config(**UMT5_XXL[None])),
                               vae=AutoencoderKLWan(**REAL_SIZE.vae), scheduler=None,
                               transformer=WanTransformer3DModel(**REAL_SIZE.transformer),
                               transformer_2=WanTransformer3DModel(**REAL_SIZE.transformer), boundary_ratio=0.875)
    finally:
        torch.set_default_dtype(previous)
    tokens = WAN.tokens(Preset("landscape", 832, 480, 81))
    assert tokens == 32760
    return measure_footprint(pipe, tokens, WAN.keep_bf16, WAN.activation_bytes_per_token)


def test_wan_a14b_keeps_both_experts_resident_in_fp8_at_48_gib_and_streams_at_24(wan_a14b_footprint):
    """Both experts in fp8 are 26.6 GiB: at 48 GiB they stay resident beside the streamed UMT5; at 24 GiB the blocks
    that do not fit stream, spread over both experts' call order. The activations are a video call's (6.5 GiB at
    32,760 tokens): the image figure per token would have planned 24 GiB of them, so nothing fit 24 GiB and 26 blocks
    streamed at 48."""
    from aot.memory import COPY_BYTES_PER_MS, DECODE_BYTES, STEP_MS
    from aot.zerogpu import step_work

    fp = wan_a14b_footprint
    assert fp.experts == 2 and len(fp.block_groups) == 80 and set(fp.block_groups) == {0}  # one ring for both
    assert 26.5 < fp.transformer["fp8"] / GiB < 26.8 and 10.5 < fp.text_encoders / GiB < 10.7
    assert fp.activations == DECODE_BYTES + 111 * 1024 * 32760
    roomy = choose_memory_plan("auto", "auto", fp, 48 * GiB, True, compiled=True)
    assert (roomy.low_vram, roomy.quantization, roomy.streamed_blocks) == (True, "fp8", 0)
    tight = choose_memory_plan("auto", "auto", fp, 24 * GiB, True, compiled=True)
    assert tight.quantization == "fp8" and 0 < tight.streamed_blocks < 80 and tight.need_gib <= 24
    chosen = streamed_blocks(80, tight.streamed_blocks)
    assert abs(sum(i < 40 for i in chosen) - sum(i >= 40 for i in chosen)) <= 1  # each expert streams its half
    # a step runs one expert: its compute, and the copies of its own streamed blocks
    compute = STEP_MS[True]["fp8"] * fp.transformer["none"] / 2 / (2 * 11.90e9) * step_work(32760)
    copies = fp.streamed_bytes("fp8", 80) / 2 / COPY_BYTES_PER_MS
    assert fp.step_ms("fp8", 80, True) == pytest.approx(max(compute, copies))


def test_tiny_wan_streams_both_experts_compiled_and_matches_eager():
    """LOW_VRAM=stream, COMPILE=aoti (blocks) on tiny-wan: both experts' blocks stream through one ring, and a 2-step
    run (the first step on the high-noise expert, the second on the low-noise one) matches eager resident."""
    settings = {"model_id": "tiny-wan", "quantization": "none"}
    resident = tiny_model(compile="none", **settings)
    def run(model):  # a video's latents are the output's frames
        return model("a red cube", model.presets[0], steps=2, generator=torch.Generator().manual_seed(3),
                     output_type="latent").frames

    expected = run(resident)
    model = tiny_model(compile="aoti", **settings)
    report = optimization.optimize_pipeline_(model, settings_for(low_vram="stream", compile="aoti", aot_scope="blocks",
                                                                 **settings))
    assert report.compile == "aoti" and report.compile_scope == "blocks", report.fallbacks
    assert report.memory["streamed_blocks"] == report.memory["blocks"] == 4
    first, second = model.pipe.transformer, model.pipe.transformer_2
    stream = first.block_stream
    assert second.block_stream is stream and stream.blocks == [*first.blocks, *second.blocks]
    assert rel_err(run(model), expected) < TOLERANCE
    stream.loads = 0
    run(model)
    assert stream.loads == 2 * 2 * 2  # 2 steps x 2 calls (CFG) x the running expert's 2 blocks
