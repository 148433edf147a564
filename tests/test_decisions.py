"""Settings parsing and the hardware-gated choices, as plain functions: hardware in, choice out."""
import pytest

from aot.decisions import attention_candidates, choose_compile, choose_cuda_graphs, choose_quantization, pick_attention
from aot.families import FAMILIES, FLUX
from aot.hardware import Hardware
from conftest import cpu
from aot.model import build_tiny, load_model
from aot.probes import Probe
from aot.report import Decision
from settings import DEFAULT_MODEL_ID, DEMO_MODEL_ID, TINY_MODEL_ID, Settings, parse_presets

HOPPER, ADA, AMPERE, BLACKWELL_RTX = (9, 0), (8, 9), (8, 0), (12, 0)


def hardware(device: str, capability: tuple[int, int] | None, online: bool = True) -> Hardware:
    """A GPU of `capability` (an H100's SMs and memory; the numbers do not enter these decisions), or a CPU host."""
    if device == "cpu":
        return cpu(online)
    return Hardware("cuda", "test GPU", capability, 132, 80 * 2**30, "13.0", online)


@pytest.mark.parametrize("capability, expected", [
    (HOPPER, "fp8"), (ADA, "fp8"), (BLACKWELL_RTX, "fp8"), (AMPERE, "none"),
])
def test_auto_quantization_by_capability(capability, expected):
    decision = choose_quantization("auto", hardware("cuda", capability), compiled=True)
    assert decision.value == expected
    assert not decision.fell_back and decision.expected == (expected == "none")  # no fp8 here: a note


def test_auto_quantization_on_cpu_is_a_visible_note():
    assert choose_quantization("auto", cpu(), compiled=True) == Decision(
        "none", "fp8 needs CUDA with compute capability >= 8.9, this is cpu", expected=True)


@pytest.mark.parametrize("device, capability", [("cpu", None), ("cuda", AMPERE)])
def test_explicit_fp8_on_unsupported_hardware_is_a_startup_error(device, capability):
    with pytest.raises(ValueError, match="compute capability >= 8.9"):
        choose_quantization("fp8", hardware(device, capability), compiled=True)


def test_int8_is_honoured_everywhere():
    assert choose_quantization("int8", cpu(), compiled=False) == Decision("int8", "requested", fell_back=False)


@pytest.mark.parametrize("device, capability, online, expected", [
    ("cuda", HOPPER, True, "_flash_3_hub"),
    ("cuda", HOPPER, False, "sdpa"),        # no hub: FA3 cannot be fetched
    ("cuda", BLACKWELL_RTX, True, "sage_hub"),  # ZeroGPU's RTX Pro 6000: no FA3 on sm_120, SageAttention is tried
    ("cuda", BLACKWELL_RTX, False, "sdpa"),  # ... from the hub, so not offline
    ("cuda", AMPERE, True, "sdpa"),
    ("cpu", None, True, "sdpa"),
])
def test_auto_attention_by_hardware(device, capability, online, expected):
    """`expected`: the first backend the device probes, or SDPA decided without a probe."""
    candidates, decision = attention_candidates("auto", hardware(device, capability, online))
    if expected != "sdpa":
        assert candidates[0] == expected and candidates[-1] == "sdpa" and decision is None  # SDPA is the floor
        return
    assert candidates == () and decision.value == expected
    # hardware without a faster kernel is a note; a GPU that has one but cannot fetch it is a fallback
    has_fast_kernel = capability in (HOPPER, BLACKWELL_RTX)
    assert decision.fell_back == has_fast_kernel
    assert decision.expected == (not has_fast_kernel)


def test_explicit_attention_is_kept():
    candidates, decision = attention_candidates("_native_cudnn", hardware("cuda", AMPERE, online=False))
    assert candidates == ("_native_cudnn", "sdpa") and decision is None  # probed, SDPA only as its fallback
    ran = {"_native_cudnn": Probe(True, ms=2.0, error_vs_sdpa=0.1), "sdpa": Probe(True, ms=1.0)}
    kept = pick_attention(candidates, ran, fastest=False)  # kept though slower and further from SDPA: asked for
    assert kept.value == "_native_cudnn" and kept.reason.startswith("requested") and not kept.fell_back


def test_compile_auto_is_on_for_cuda_and_off_but_reported_on_cpu():
    on_cuda = choose_compile("auto", hardware("cuda", AMPERE))
    assert on_cuda.value == "aoti" and not on_cuda.fell_back
    decision = choose_compile("auto", cpu())
    assert decision.value == "none" and "COMPILE=aoti" in decision.reason
    assert decision.expected and not decision.fell_back


@pytest.mark.parametrize("capability", [AMPERE, HOPPER, BLACKWELL_RTX])
def test_cuda_graphs_are_on_for_compiled_programs_on_cuda_and_off_where_a_call_decides_what_runs(capability):
    gpu = hardware("cuda", capability)
    assert choose_cuda_graphs("auto", gpu, compiled=True, step_cache="off", low_vram=False).value == "on"
    for compiled, step_cache, low_vram, why in [(False, "off", False, "compilation is off"),
                                                (True, "fbc:0.05", False, "STEP_CACHE=fbc:0.05"),
                                                (True, "off", True, "low-VRAM mode")]:
        auto = choose_cuda_graphs("auto", gpu, compiled, step_cache, low_vram)
        assert auto.value == "off" and why in auto.reason and auto.expected and not auto.fell_back
        asked = choose_cuda_graphs("on", gpu, compiled, step_cache, low_vram)  # asked for, and not done: a fallback
        assert asked.value == "off" and asked.fell_back
    off = choose_cuda_graphs("off", gpu, compiled=True, step_cache="off", low_vram=False)
    assert off.value == "off" and off.reason == "requested"


def test_cuda_graphs_on_a_cpu_are_a_note_and_asking_for_them_stops_startup():
    decision = choose_cuda_graphs("auto", cpu(), compiled=True, step_cache="off", low_vram=False)
    assert decision.value == "off" and decision.expected and "CUDA" in decision.reason
    with pytest.raises(ValueError, match="CUDA_GRAPHS=on needs a CUDA GPU"):
        choose_cuda_graphs("on", cpu(), compiled=True, step_cache="off", low_vram=False)


@pytest.fixture(scope="module")
def flux_pipe():
    """A FluxPipeline (the tiny one), to resolve a FLUX model's family and presets without a download."""
    return build_tiny(FLUX)


def test_model_choice(flux_pipe):
    assert Settings.from_env({}, has_cuda=False).model_id == DEMO_MODEL_ID
    assert Settings.from_env({}, has_cuda=True).model_id == DEFAULT_MODEL_ID
    assert Settings.from_env({"SPACE_ID": "me/space"}, has_cuda=False).model_id == DEFAULT_MODEL_ID
    schnell = Settings.from_env({"MODEL_ID": "black-forest-labs/FLUX.1-schnell"}, has_cuda=False)
    assert schnell.model_id.endswith("schnell") and schnell.tiny_family is None
    demo = Settings.from_env({}, has_cuda=False)  # the trained demo model, at the sizes it was trained at
    assert demo.demo_model and demo.tiny_family is None and "no MODEL_ID" in demo.demo_model_reason
    assert [p.name for p in load_model(demo, pipe=flux_pipe).presets] == ["128x128", "96x160", "160x96"]
    tiny = Settings.from_env({"MODEL_ID": TINY_MODEL_ID}, has_cuda=False)
    assert tiny.tiny_family == "flux" and tiny.demo_model and tiny.demo_model_reason == "MODEL_ID=tiny"
    assert tiny.presets_text == ""  # the family's own resolutions
    assert [p.name for p in load_model(tiny, pipe=flux_pipe).presets] == ["64x64", "48x80", "80x48"]
    real = Settings.from_env({}, has_cuda=True)
    assert real.tiny_family is None and not real.demo_model and real.presets_text == ""
    assert [p.name for p in load_model(real, pipe=flux_pipe).presets] == ["1024x1024", "832x1216", "1216x832"]
    chosen = Settings.from_env({"PRESETS": "wide=1216x832"}, has_cuda=True)
    assert [p.name for p in load_model(chosen, pipe=flux_pipe).presets] == ["1216x832"]


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_tiny_model_ids_name_their_family(family):
    settings = Settings.from_env({"MODEL_ID": f"tiny-{family.name}"}, has_cuda=False)
    assert settings.tiny_family == family.name and settings.demo_model_reason == f"MODEL_ID=tiny-{family.name}"


def test_presets_parse_and_count_tokens():
    presets = parse_presets("square=1024x1024, wide=1216x832", FLUX.multiple)
    assert [(p.label, p.width, p.height, FLUX.image_tokens(p.width, p.height)) for p in presets] == [
        ("square", 1024, 1024, 4096), ("wide", 1216, 832, 76 * 52)]


@pytest.mark.parametrize("text, message", [
    ("square=1000x1000", "multiples of 16"),
    ("square=big", "LABEL=WIDTHxHEIGHT"),
    ("", "empty"),
    ("a=64x64,b=64x64", "duplicates"),
])
def test_bad_presets_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        parse_presets(text, 16)


@pytest.mark.parametrize("env, message", [
    ({"COMPILE": "none", "DYNAMIC_SHAPES": "1"}, "DYNAMIC_SHAPES=1 needs compilation"),
    ({"COMPILE": "none", "QUANTIZATION": "fp8"}, "fp8"),
    ({"QUANTIZATION": "int2"}, "not one of"),
    ({"COMPILE": "jit"}, "not one of"),
    ({"AOT_SCOPE": "layers"}, "not one of"),
    ({"DYNAMIC_SHAPES": "maybe"}, "DYNAMIC_SHAPES"),
    # every message names the variable and what it takes
    ({"QUEUE_SIZE": "abc"}, "QUEUE_SIZE='abc': give a whole number, e.g. 32"),
    ({"QUEUE_SIZE": "0"}, "QUEUE_SIZE=0: give a whole number of at least 1"),
    ({"COMPILE": "none", "AOT_HUB_REPO": "a/b@" + "0" * 40}, "COMPILE=none; set COMPILE=auto or aoti, or unset"),
    ({"PRESETS": "a=64x64,a=32x32"}, "PRESETS has duplicates: .*give each label and each WIDTHxHEIGHT once"),
])
def test_conflicting_or_unknown_settings_raise_at_startup(env, message):
    with pytest.raises(ValueError, match=message):
        Settings.from_env(env, has_cuda=False)


def test_per_row_fp8_programs_compile_with_unsplit_reductions_and_others_with_inductors_default():
    """Inductor's options for a report: unsplit reductions for fp8 scaled per row (ROW_FP8_INDUCTOR_CONFIGS)."""
    import optimization
    from aot.report import Report

    def configs(quantization, granularity):
        return optimization.inductor_configs(Report(device="d", dtype="bfloat16", quantization=quantization,
                                                    fp8_granularity=granularity))

    assert configs("fp8", "row") == {**optimization.INDUCTOR_CONFIGS, "split_reductions": False}
    # one scale per tensor reduces the whole tensor, with the split's parallelism; bf16, int8 and CPU programs as before
    assert configs("fp8", "tensor") == configs("none", "") == configs("int8", "") == optimization.INDUCTOR_CONFIGS
    assert "split_reductions" not in optimization.INDUCTOR_CONFIGS
