"""The hardware as one value, and every decision read from it, as plain functions on this CPU machine: the tables for
each architecture from sm_80 to sm_120 (ZeroGPU's RTX Pro 6000) and a CPU, the picks from the device's probe
results, the probes themselves where a CPU runs them, ZeroGPU's card as the pinned spaces package describes it, the
durations each task asks for, the task size and the resident memory plan. No compile, no app: each test is fast."""
import json
import math
import pickle
import platform
import types
from importlib.resources import files

import pytest
import torch

from aot import hardware as hardware_module
from aot.decisions import (ATTENTION_MAX_ERROR, FP8_GRANULARITIES, SDPA, attention_candidates, choose_compile,
                           choose_quantization, fp8_candidates, pick_attention, pick_fp8)
from aot.families import FLUX
from aot.hardware import Hardware, Size, ZeroGPUCard, detect
from conftest import cpu
from aot.memory import ACTIVATION_BYTES_PER_TOKEN, SLACK_BYTES, Footprint, choose_resident_plan
from aot.probes import AttentionShape, Probe, probe_attention, probe_fp8, run_probes
from aot.report import Report
from aot.zerogpu import (FIXED_SECONDS, H100_CALL_SECONDS, MARGIN, MAX_TASK_SECONDS, PROGRAM_LOAD_SECONDS,
                         SWITCH_SECONDS_PER_GIB, WORKER_SECONDS_PER_GIB, WORKER_START_SECONDS, Durations, Timing,
                         choose_size, durations, gpu_task, slowdown, step_work)
from settings import Preset

GB, GiB = 10**9, 2**30
RTX_PRO_6000 = "NVIDIA RTX PRO 6000 Blackwell Server Edition"


def spaces_configs() -> dict[str, dict]:
    """spaces' own `zero/configs.json`, the file its ZeroGPU code reads, by card model."""
    return {entry["model"]: entry for entry in json.loads(files("spaces.zero").joinpath("configs.json").read_text())}


@pytest.fixture(scope="module")
def rtx() -> ZeroGPUCard:
    return ZeroGPUCard.from_spaces(spaces_configs()[RTX_PRO_6000])


@pytest.fixture(scope="module")
def h200() -> ZeroGPUCard:
    return ZeroGPUCard.from_spaces(spaces_configs()["NVIDIA H200"])


def on_card(card: ZeroGPUCard, size: Size | None = None, online: bool = True) -> Hardware:
    """What hardware.detect() returns on ZeroGPU for `card`, at `size`."""
    return Hardware("cuda", card.model, card.capability, card.sm_count, card.memory, "13.0", online, card, size)


# ---------------------------------------------------------------------------------------------------------------------
# Decisions per architecture

# name, capability, SMs, memory: one card of each architecture
GPUS = {
    "sm_80": ("NVIDIA A100-SXM4-80GB", (8, 0), 108, 80 * GiB),
    "sm_89": ("NVIDIA L40S", (8, 9), 142, 48 * GiB),
    "sm_90": ("NVIDIA H100 80GB HBM3", (9, 0), 132, 80 * GiB),
    "sm_100": ("NVIDIA B200", (10, 0), 148, 180 * GiB),
    "sm_120": (RTX_PRO_6000, (12, 0), 188, 96 * GiB),
}
ARCHS = [*GPUS, "cpu"]


def host(arch: str, online: bool = True) -> Hardware:
    if arch == "cpu":
        return cpu(online)
    name, capability, sms, memory = GPUS[arch]
    return Hardware("cuda", name, capability, sms, memory, "13.0", online)


# arch: (COMPILE=auto, QUANTIZATION=auto compiled, fp8 candidates, ATTENTION=auto candidates with the hub online)
TABLE = {
    "sm_80": ("aoti", "none", (), ()),
    "sm_89": ("aoti", "fp8", FP8_GRANULARITIES, ()),
    "sm_90": ("aoti", "fp8", FP8_GRANULARITIES, ("_flash_3_hub", SDPA)),
    "sm_100": ("aoti", "fp8", FP8_GRANULARITIES, ("flash_4_hub", SDPA)),
    "sm_120": ("aoti", "fp8", FP8_GRANULARITIES, ("sage_hub", "sage_blackwell_hub", SDPA)),
    "cpu": ("none", "none", (), ()),
}


@pytest.mark.parametrize("arch", ARCHS)
def test_arch_names_what_a_program_is_built_for(arch):
    value = host(arch)
    if arch == "cpu":  # the CPU's machine and vector ISA: test_a_cpu_programs_arch_is_its_machine_and_vector_isa
        assert value.capability is None and value.sm_count == 0 and value.label == "cpu"
    else:
        assert value.arch == arch and value.label == f"cuda: {GPUS[arch][0]}, {arch}"


@pytest.mark.parametrize("arch", ARCHS)
def test_compile_by_architecture(arch):
    decision = choose_compile("auto", host(arch))
    assert decision.value == TABLE[arch][0] and not decision.fell_back
    assert decision.expected == (arch == "cpu")  # off on a CPU is the usual choice there, shown as a note
    assert choose_compile("none", host(arch)).value == "none"  # an explicit value is kept everywhere
    assert choose_compile("aoti", host(arch)).reason == "requested"


@pytest.mark.parametrize("arch", ARCHS)
def test_auto_quantization_when_compiled(arch):
    decision = choose_quantization("auto", host(arch), compiled=True)
    assert decision.value == TABLE[arch][1] and not decision.fell_back
    assert decision.expected == (decision.value == "none")  # no fp8 on this hardware: a note
    if decision.value == "none":
        assert "compute capability >= 8.9" in decision.reason


@pytest.mark.parametrize("arch", ARCHS)
def test_auto_quantization_when_eager_is_never_fp8(arch):
    decision = choose_quantization("auto", host(arch), compiled=False)
    assert decision.value == "none" and decision.expected and not decision.fell_back
    if TABLE[arch][1] == "fp8":  # fp8 runs here, but eager it is slower than bf16
        assert "fp8 only pays when compiled" in decision.reason


@pytest.mark.parametrize("arch", ARCHS)
def test_explicit_quantization(arch):
    if TABLE[arch][1] == "fp8":
        assert choose_quantization("fp8", host(arch), compiled=False).value == "fp8"  # asked for: kept, even eager
    else:  # Ampere and CPUs have no fp8: an explicit request is a startup error
        with pytest.raises(ValueError, match="QUANTIZATION=fp8 needs a CUDA GPU with compute capability >= 8.9"):
            choose_quantization("fp8", host(arch), compiled=True)
    for mode in ("none", "int8", "int4"):
        assert choose_quantization(mode, host(arch), compiled=True).value == mode


@pytest.mark.parametrize("arch", ARCHS)
def test_fp8_candidates(arch):
    assert fp8_candidates("fp8", host(arch)) == TABLE[arch][2]
    assert FP8_GRANULARITIES == ("row", "tensor")  # most accurate first: per-tensor only where per-row fails
    for mode in ("none", "int8", "int4"):
        assert fp8_candidates(mode, host(arch)) == ()  # nothing to probe without fp8


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_candidates_with_the_hub_online(arch):
    candidates, decision = attention_candidates("auto", host(arch, online=True))
    assert candidates == TABLE[arch][3]
    if candidates:
        assert decision is None and candidates[-1] == SDPA  # SDPA is always probed last, the floor
    else:  # nothing faster for this architecture: SDPA without a probe, a note
        assert decision.value == SDPA and decision.expected and not decision.fell_back


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_candidates_with_the_hub_offline(arch):
    candidates, decision = attention_candidates("auto", host(arch, online=False))
    assert candidates == () and decision.value == SDPA
    if TABLE[arch][3]:  # a faster kernel exists here, but it comes from the hub: a fallback, naming the kernels
        assert decision.fell_back and not decision.expected and "offline" in decision.reason
        assert all(name in decision.reason for name in TABLE[arch][3][:-1])
    else:
        assert decision.expected and not decision.fell_back


@pytest.mark.parametrize("online", [True, False])
@pytest.mark.parametrize("arch", ARCHS)
def test_explicit_attention_is_probed_with_sdpa_behind_it_and_sdpa_is_not_probed(arch, online):
    assert attention_candidates("_native_flash", host(arch, online)) == (("_native_flash", SDPA), None)
    candidates, decision = attention_candidates(SDPA, host(arch, online))
    assert candidates == () and decision.value == SDPA and decision.reason == "requested"
    assert not decision.fell_back and not decision.expected


# ---------------------------------------------------------------------------------------------------------------------
# Picks from probe results

CUBLAS = "RuntimeError: CUBLAS_STATUS_NOT_SUPPORTED when calling cublasLtMatmul"


def test_pick_fp8_takes_the_first_granularity_that_ran():
    assert pick_fp8(("row", "tensor"), {"row": Probe(True), "tensor": Probe(True)}) == ("row", [])


def test_pick_fp8_falls_back_to_per_tensor_with_the_error():
    granularity, failed = pick_fp8(("row", "tensor"), {"row": Probe(False, CUBLAS), "tensor": Probe(True)})
    assert granularity == "tensor"
    assert len(failed) == 1 and "per-row" in failed[0] and CUBLAS in failed[0]


def test_pick_fp8_with_nothing_that_ran_is_none():
    granularity, failed = pick_fp8(("row", "tensor"), {"row": Probe(False, CUBLAS), "tensor": Probe(False, "boom")})
    assert granularity is None
    assert len(failed) == 2 and CUBLAS in failed[0] and "per-tensor" in failed[1] and "boom" in failed[1]
    assert pick_fp8((), {}) == (None, [])


SAGE = ("sage_hub", "sage_blackwell_hub", SDPA)


def test_pick_attention_keeps_the_fastest_that_agrees_with_sdpa():
    results = {"sage_hub": Probe(True, ms=1.0, error_vs_sdpa=1e-2),
               "sage_blackwell_hub": Probe(True, ms=0.5, error_vs_sdpa=2e-2),
               SDPA: Probe(True, ms=2.0)}
    decision = pick_attention(SAGE, results)
    assert decision.value == "sage_blackwell_hub" and not decision.fell_back and not decision.expected
    assert all(f"{name} {probe.ms:.3f} ms" in decision.reason for name, probe in results.items())  # the timings
    # SDPA wins where it is fastest: the first choice ran and agreed, so no fallback
    slow = {**results, "sage_blackwell_hub": Probe(True, ms=3.0, error_vs_sdpa=2e-2),
            "sage_hub": Probe(True, ms=2.5, error_vs_sdpa=1e-2)}
    decision = pick_attention(SAGE, slow)
    assert decision.value == SDPA and not decision.fell_back


def test_pick_attention_rejects_a_faster_kernel_that_disagrees_with_sdpa():
    # the fastest one differs from SDPA by more than the limit: the next fastest that agrees, no fallback (the first
    # choice is fine)
    results = {"sage_hub": Probe(True, ms=1.0, error_vs_sdpa=1e-2),
               "sage_blackwell_hub": Probe(True, ms=0.5, error_vs_sdpa=ATTENTION_MAX_ERROR * 3),
               SDPA: Probe(True, ms=2.0)}
    decision = pick_attention(SAGE, results)
    assert decision.value == "sage_hub" and not decision.fell_back
    # the first choice disagrees: a fallback saying by how much, to the fastest that agrees
    results["sage_hub"] = Probe(True, ms=0.4, error_vs_sdpa=0.1)
    decision = pick_attention(SAGE, results)
    assert decision.value == SDPA and decision.fell_back
    assert "sage_hub differs from SDPA by 1.0e-01" in decision.reason
    # exactly at the limit still agrees
    results["sage_hub"] = Probe(True, ms=0.4, error_vs_sdpa=ATTENTION_MAX_ERROR)
    assert pick_attention(SAGE, results).value == "sage_hub"


def test_pick_attention_falls_back_with_the_first_choices_error():
    error = "RuntimeError: no kernel image is available for execution on the device"
    results = {"_flash_3_hub": Probe(False, error), SDPA: Probe(True, ms=2.0)}
    decision = pick_attention(("_flash_3_hub", SDPA), results)
    assert decision.value == SDPA and decision.fell_back and error in decision.reason
    assert "_flash_3_hub failed on the device" in decision.reason


def test_pick_attention_with_nothing_that_ran_is_sdpa_as_a_fallback():
    results = {"_flash_3_hub": Probe(False, "a"), SDPA: Probe(False, "b")}
    decision = pick_attention(("_flash_3_hub", SDPA), results)
    assert decision.value == SDPA and decision.fell_back
    assert pick_attention(("_native_cudnn", SDPA), results, fastest=False).fell_back


def test_pick_attention_keeps_an_explicit_request_that_runs():
    # asked for by name (ATTENTION=_native_cudnn): kept though slower and further from SDPA than `auto` would keep
    results = {"_native_cudnn": Probe(True, ms=3.0, error_vs_sdpa=ATTENTION_MAX_ERROR * 2), SDPA: Probe(True, ms=1.0)}
    decision = pick_attention(("_native_cudnn", SDPA), results, fastest=False)
    assert decision.value == "_native_cudnn" and not decision.fell_back and decision.reason.startswith("requested")
    # one that does not run falls back to SDPA, with its error
    results["_native_cudnn"] = Probe(False, "RuntimeError: cuDNN unsupported")
    decision = pick_attention(("_native_cudnn", SDPA), results, fastest=False)
    assert decision.value == SDPA and decision.fell_back and "cuDNN unsupported" in decision.reason


# ---------------------------------------------------------------------------------------------------------------------
# The real probes, on this CPU: its _scaled_mm takes per-tensor scales only, as cuBLAS does on sm_120

def test_fp8_per_row_scales_fail_on_cpu_and_per_tensor_ones_run():
    row = probe_fp8("row", "cpu")
    assert not row.ok and row.error.startswith("RuntimeError") and "assert" in row.error.lower()
    assert probe_fp8("tensor", "cpu") == Probe(True)
    # what the sm_120 card would make of it: per-tensor, with per-row's failure as the fallback line
    granularity, failed = pick_fp8(FP8_GRANULARITIES, {"row": row, "tensor": Probe(True)})
    assert granularity == "tensor" and row.error in failed[0]


def test_attention_probe_times_backends_and_compares_them_with_sdpa():
    results = probe_attention((SDPA, "_native_math"), AttentionShape(64, 2, 16), "cpu")
    assert set(results) == {SDPA, "_native_math"}
    assert all(probe.ok and probe.ms > 0 for probe in results.values()), results
    assert results[SDPA].error_vs_sdpa == 0.0
    assert results["_native_math"].error_vs_sdpa < 1e-2  # another kernel, the same attention (bf16 rounding)
    assert pick_attention(("_native_math", SDPA), results).value in results
    failed = probe_attention(("no_such_backend",), AttentionShape(64, 2, 16), "cpu")["no_such_backend"]
    assert not failed.ok and failed.error.startswith("ValueError")  # an unknown backend: "does not run here"


def test_run_probes_returns_plain_values_that_cross_processes():
    results = run_probes(FP8_GRANULARITIES, (SDPA,), AttentionShape(32, 2, 16))
    assert results["device"] == "cpu"
    assert results["fp8"] == {"row": results["fp8"]["row"], "tensor": Probe(True)} and not results["fp8"]["row"].ok
    assert list(results["attention"]) == [SDPA] and results["attention"][SDPA].ok
    assert pickle.loads(pickle.dumps(results)) == results  # what a ZeroGPU task's result goes through
    assert run_probes((), (), None) == {"device": "cpu", "fp8": {}, "attention": {}}


def test_attention_shape_of_a_transformer():
    flux = types.SimpleNamespace(config={"num_attention_heads": 24, "attention_head_dim": 128})
    assert AttentionShape.of(flux, 4096 + 512) == AttentionShape(4608, 24, 128)
    z_image = types.SimpleNamespace(config={"n_heads": 30, "dim": 3840})  # no head dim: dim / heads
    assert AttentionShape.of(z_image, 100) == AttentionShape(100, 30, 128)


# ---------------------------------------------------------------------------------------------------------------------
# ZeroGPU's card, from spaces' own configuration

def test_rtx_pro_6000_from_spaces(rtx):
    assert (rtx.model, rtx.capability, rtx.sm_count) == (RTX_PRO_6000, (12, 0), 188)
    assert rtx.sizes == (Size.LARGE, Size.XLARGE)
    assert rtx.memory_for(Size.LARGE) == rtx.memory // 2 and rtx.memory_for(Size.XLARGE) == rtx.memory
    assert rtx.memory_for(None) == rtx.memory
    assert 94 * GiB < rtx.memory < 96 * GiB  # the 96 GB card
    assert rtx.factor_for(Size.LARGE) == 1.5 and rtx.factor_for(Size.XLARGE) == 1.0
    assert rtx.factor_for(None) == 1.5  # spaces' default size is large
    assert rtx.xlarge_threshold == 45_097_156_608 < rtx.memory_for(Size.LARGE)


def test_h200_slice_from_spaces(h200):
    assert (h200.capability, h200.sm_count, h200.xlarge_threshold) == ((9, 0), 60, None)
    assert h200.sizes == ()  # not shared: no size to choose
    assert h200.memory_for(None) == h200.memory and h200.factor_for(None) == 1.0


def test_hardware_with_a_size(rtx, h200):
    whole = on_card(rtx)
    assert whole.arch == "sm_120" and whole.memory == rtx.memory
    large = whole.with_size(Size.LARGE)
    assert large.memory == rtx.memory // 2 and large.size is Size.LARGE and whole.size is None  # a new value
    assert large.total_memory == whole.total_memory == rtx.memory  # the card itself is unchanged
    assert whole.with_size(Size.XLARGE).memory == rtx.memory
    assert "ZeroGPU large (47 GiB)" in large.label and large.as_dict()["zerogpu_size"] == "large"
    assert large.as_dict()["memory_gib"] == round(rtx.memory / 2 / GiB, 1)
    assert on_card(h200).memory == h200.memory and on_card(h200).arch == "sm_90"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine's CPU path")
def test_detect_on_this_cpu_machine():
    found = detect({})
    assert (found.device, found.capability, found.sm_count, found.zerogpu, found.size) == ("cpu", None, 0, None, None)
    assert found.total_memory > 0 and found.memory == found.total_memory
    assert found.hub_online and not detect({"HF_HUB_OFFLINE": "1"}).hub_online
    assert found.label == "cpu" and found.as_dict()["arch"] == "cpu"


def test_a_cpu_programs_arch_is_its_machine_and_vector_isa():
    """What the cache key holds on a CPU (Inductor's ISA check builds and runs small programs: about 10 s once)."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    assert detect({}).arch == cpu().arch == f"cpu-{platform.machine()}-{pick_vec_isa()}"


@pytest.mark.parametrize("value, online", [("1", False), ("true", False), ("YES", False), (" on ", False),
                                           ("0", True), ("", True), ("false", True)])
def test_hub_online_reads_hf_hub_offline(value, online):
    assert hardware_module.hub_online({"HF_HUB_OFFLINE": value}) is online
    assert hardware_module.hub_online({}) is True


# ---------------------------------------------------------------------------------------------------------------------
# Durations

SECONDS = [s + fraction for s in range(1, 401) for fraction in (0.0, 0.01, 0.5, 0.99)]


@pytest.mark.parametrize("factor", [1.0, 1.5])
def test_granted_duration_always_covers_the_task(factor):
    plan = Durations({}, True, 1.0, 1.0, 0.0, factor=factor, tokens=FLUX.tokens)
    for seconds in SECONDS:
        requested, granted = plan.requested(seconds), plan.granted(seconds)
        assert isinstance(requested, int) and requested >= 1
        assert granted == round(requested * factor), seconds  # spaces: round(duration * duration_factor)
        assert granted >= math.ceil(seconds), (seconds, requested, granted)  # never shorter than the task
        assert granted <= math.ceil(seconds) + 1, (seconds, requested, granted)  # and never a quota's waste


def test_granted_duration_is_what_spaces_itself_computes(monkeypatch, rtx):
    """spaces' own arithmetic (`get_duration_seconds`, then `round` when it schedules), with its configuration's
    RTX Pro 6000 entry, against Durations' for both sizes."""
    from datetime import timedelta

    from spaces.zero import client

    monkeypatch.setattr(client.config, "get_config", lambda: spaces_configs()[RTX_PRO_6000])
    for size in rtx.sizes:
        plan = Durations({}, True, 1.0, 1.0, 0.0, factor=rtx.factor_for(size), tokens=FLUX.tokens)
        for seconds in range(1, 401):
            requested = plan.requested(seconds)
            assert round(client.get_duration_seconds(timedelta(seconds=requested), size.value)) == plan.granted(seconds)


def test_gpu_task_asks_for_a_duration_spaces_stretches_to_the_seconds_wanted(monkeypatch, rtx, h200):
    import spaces

    calls = []
    monkeypatch.setattr(spaces, "GPU", lambda **kw: (calls.append(kw), lambda fn: fn)[1])

    def task():
        pass

    gpu_task(task, 60, on_card(rtx))  # before the size is chosen: large, which spaces stretches by 1.5
    gpu_task(task, 60, on_card(rtx, Size.XLARGE))
    gpu_task(task, 60, on_card(h200))
    assert calls == [{"duration": 40, "size": "large"}, {"duration": 60, "size": "xlarge"},
                     {"duration": 60, "size": None}]
    for seconds in SECONDS:
        calls.clear()
        gpu_task(task, seconds, on_card(rtx, Size.LARGE))
        assert round(calls[0]["duration"] * 1.5) >= math.ceil(seconds), (seconds, calls)
    monkeypatch.undo()
    assert gpu_task(task, 4.2, cpu()) is task  # off ZeroGPU spaces leaves it as it is


PRESETS = (Preset("square", 1024, 1024), Preset("small", 512, 512), Preset("huge", 2048, 2048))


def test_task_seconds_covers_the_measured_time():
    timing = Timing(call_s=0.8, fixed_s=2.5)
    plan = Durations({"1024x1024": timing}, True, 1.0, 4.0, 12.0, factor=1.5, limited=True, tokens=FLUX.tokens)
    square = PRESETS[0]
    for steps in (1, 4, 28, 50):
        for calls in (1, 2):
            measured = calls * steps * timing.call_s + timing.fixed_s
            bare = plan.task_seconds(square, steps, calls, new_worker=False, first_shape=False)
            assert bare >= measured * MARGIN - 1e-9 and bare >= FIXED_SECONDS + calls * steps * timing.call_s
            worker = plan.task_seconds(square, steps, calls, new_worker=True, first_shape=False)
            assert worker == pytest.approx(bare + WORKER_START_SECONDS + WORKER_SECONDS_PER_GIB * 12.0)
            first = plan.task_seconds(square, steps, calls, new_worker=False, first_shape=True)
            assert first == pytest.approx(bare + PROGRAM_LOAD_SECONDS)  # compiled: a shape's programs load
    eager = Durations({"1024x1024": timing}, False, 1.0, 4.0, 12.0, tokens=FLUX.tokens)
    assert eager.task_seconds(square, 4, 1, False, True) == eager.task_seconds(square, 4, 1, False, False)
    # a preset without a timing: the H100's step, times the slowdown and the step's work at the preset's tokens,
    # which grows faster than the pixels (attention)
    estimate = lambda d, p: d.task_seconds(p, 10, 1, False, False) - FIXED_SECONDS  # noqa: E731
    slower = Durations({}, True, 1.0, 8.0, 12.0, tokens=FLUX.tokens)
    faster = Durations({}, True, 1.0, 2.0, 12.0, tokens=FLUX.tokens)
    assert estimate(slower, square) == pytest.approx(4 * estimate(faster, square))
    assert estimate(faster, square) == pytest.approx(10 * H100_CALL_SECONDS[True] * 2.0)  # FLUX.1-dev's 1024x1024
    assert estimate(faster, PRESETS[2]) == pytest.approx(step_work(4 * 4096) * estimate(faster, square))
    assert step_work(4 * 4096) == pytest.approx(4 * (1 + 4 * 4096 / 34_000) / (1 + 4096 / 34_000))


def _timed_plan(limited: bool) -> Durations:
    return Durations({"1024x1024": Timing(2.0, 2.0), "512x512": Timing(0.5, 1.0), "2048x2048": Timing(8.0, 4.0)},
                     True, 1.0, 1.0, 10.0, factor=1.5, limited=limited, tokens=FLUX.tokens)


def test_too_long_is_none_off_zerogpu_and_when_it_fits():
    assert _timed_plan(limited=False).too_long(PRESETS, PRESETS[0], 1000, 2) is None  # no per-call maximum
    assert _timed_plan(limited=True).too_long(PRESETS, PRESETS[0], 20, 1) is None


def test_too_long_names_the_most_steps_and_the_presets_that_fit():
    plan, square, steps = _timed_plan(limited=True), PRESETS[0], 150

    def fits(preset, n):
        return plan.granted(plan.task_seconds(preset, n, 1, new_worker=True, first_shape=True)) <= MAX_TASK_SECONDS

    most = max(n for n in range(1, steps) if fits(square, n))
    assert not fits(square, most + 1) and fits(PRESETS[1], steps) and not fits(PRESETS[2], steps)  # the setup
    message = plan.too_long(PRESETS, square, steps, 1)
    assert message.startswith(f"{steps} steps at 1024x1024 need about ")
    assert f"past ZeroGPU's {MAX_TASK_SECONDS} s per request" in message
    assert f"at most {most} steps at 1024x1024" in message
    assert f"{steps} steps at 512x512" in message and "2048x2048" not in message
    # nothing fits at a preset (its measured rest of the request alone is past the maximum): said so, with the
    # presets that do fit
    slow = Durations({**plan.timings, "2048x2048": Timing(8.0, 250.0)}, True, 1.0, 1.0, 10.0, factor=1.5, limited=True,
                     tokens=FLUX.tokens)
    message = slow.too_long(PRESETS, PRESETS[2], 120, 1)
    assert "no step count fits at 2048x2048" in message and "at most" not in message
    assert "120 steps at 512x512" in message and "1024x1024" not in message


def test_durations_for_each_size(rtx):
    report = Report(device="cuda", dtype="bfloat16", compile="aoti", hardware=on_card(rtx, Size.LARGE),
                    timings={"1024x1024": {"call_s": 0.4, "fixed_s": 1.0}})
    large = durations(report, FLUX, weight_gib=20.0)
    assert (large.factor, large.quota_factor, large.limited, large.compiled) == (1.5, 1, True, True)
    assert large.timings == {"1024x1024": Timing(0.4, 1.0)}
    assert large.slowdown == slowdown(RTX_PRO_6000, 188, Size.LARGE)
    report.hardware = on_card(rtx, Size.XLARGE)
    xlarge = durations(report, FLUX, 20.0)
    assert (xlarge.factor, xlarge.quota_factor, xlarge.limited) == (1.0, 2, True)
    assert xlarge.slowdown < large.slowdown  # the whole card is faster than half of it
    report.hardware = cpu()
    off = durations(report, FLUX, 20.0)
    assert (off.factor, off.quota_factor, off.limited) == (1.0, 1, False)


def test_lora_choices_add_the_largest_switch_to_every_request(rtx):
    report = Report(device="cuda", dtype="bfloat16", compile="aoti", hardware=on_card(rtx, Size.LARGE),
                    timings={"1024x1024": {"call_s": 0.4, "fixed_s": 1.0}})
    plain = durations(report, FLUX, 20.0)
    report.lora_choices = [{"name": name, "host_bytes": gib * 2**30} for name, gib in (("a", 8), ("b", 2), ("c", 6))]
    switching = durations(report, FLUX, 20.0)
    assert switching.switch_gib == 14  # the largest choice switched in, the next largest restored to the base
    square = PRESETS[0]
    for new_worker in (False, True):
        assert switching.task_seconds(square, 28, 1, new_worker, False) == pytest.approx(
            plain.task_seconds(square, 28, 1, new_worker, False) + SWITCH_SECONDS_PER_GIB * 14)


def test_slowdown_table_and_sm_count():
    assert slowdown("NVIDIA H200", 60, None) == pytest.approx(132 / 60)
    assert slowdown(RTX_PRO_6000, 188, Size.LARGE) > slowdown(RTX_PRO_6000, 188, Size.XLARGE) >= 1.0
    assert slowdown("some GPU", 66, None) == pytest.approx(2.0)  # half an H100's SMs
    assert slowdown("some bigger GPU", 200, None) == 1.0  # never counted faster than an H100


# ---------------------------------------------------------------------------------------------------------------------
# The task size

def test_choose_size(rtx):
    both = choose_size("auto", rtx, {Size.LARGE: True, Size.XLARGE: True})
    assert both.value == "large" and not both.fell_back and "half the card" in both.reason
    only_xlarge = choose_size("auto", rtx, {Size.LARGE: False, Size.XLARGE: True})
    assert only_xlarge.value == "xlarge" and only_xlarge.fell_back and "2x quota" in only_xlarge.reason
    assert choose_size("xlarge", rtx, {Size.LARGE: True, Size.XLARGE: True}).value == "xlarge"
    assert choose_size("large", rtx, {Size.LARGE: True, Size.XLARGE: True}).reason.startswith("requested")
    with pytest.raises(ValueError, match="ZEROGPU_SIZE=large"):
        choose_size("large", rtx, {Size.LARGE: False, Size.XLARGE: True})
    with pytest.raises(ValueError, match="ZEROGPU_SIZE=xlarge"):
        choose_size("xlarge", rtx, {Size.LARGE: False, Size.XLARGE: False})


# ---------------------------------------------------------------------------------------------------------------------
# The resident memory plan (ZeroGPU: nothing streams)

def footprint(bf16: float, text: float, fp8: float | None = None, other: float = 0.17 * GB,
              tokens: int = 4096, blocks: int = 19) -> Footprint:
    """A pipeline with a `bf16`-byte transformer (`fp8` bytes in fp8, half by default; int8 as fp8, int4 a quarter
    and its scales), `text` bytes of text encoders and `other` bytes of VAE."""
    fp8 = fp8 or bf16 / 2
    transformer = {"none": int(bf16), "fp8": int(fp8), "int8": int(fp8 * 1.01), "int4": int(fp8 * 0.53)}
    return Footprint(transformer, {m: (b // blocks,) * blocks for m, b in transformer.items()}, (0,) * blocks,
                     int(text), int(text) // 40, int(other), ACTIVATION_BYTES_PER_TOKEN * tokens, tokens)


def large_plan(rtx, fp: Footprint, decided: str, auto: bool = True, fp8_ok: bool = True):
    return choose_resident_plan(decided, auto, fp, rtx.memory_for(Size.LARGE), rtx.xlarge_threshold, fp8_ok, True)


def test_a_pipeline_that_fits_in_bf16_stays_as_loaded(rtx):
    flux1 = footprint(23.8 * GB, 9.65 * GB)  # FLUX.1-dev
    plan = large_plan(rtx, flux1, "none")
    assert plan.fits and plan.quantization == "none" and not plan.low_vram and not plan.stream
    assert plan.packed_gib == round(flux1.resident("none") / GiB, 2)
    assert plan.need_gib == round((flux1.resident("none") + flux1.activations + SLACK_BYTES) / GiB, 2)
    assert large_plan(rtx, flux1, "fp8").quantization == "fp8"  # the decided format is kept where it fits


def test_packed_weights_over_the_threshold_pick_fp8(rtx):
    fp = footprint(41 * GB, 5 * GB)  # fits half the card in bf16, but spaces would pack it past its threshold
    budget = rtx.memory_for(Size.LARGE)
    assert fp.resident("none") + fp.activations + SLACK_BYTES <= budget  # the memory alone would take bf16
    assert fp.resident("fp8") <= rtx.xlarge_threshold < fp.resident("none")
    plan = large_plan(rtx, fp, "none")
    assert plan.fits and plan.quantization == "fp8" and "only with the transformer in fp8" in plan.reason
    assert plan.packed_gib * GiB <= rtx.xlarge_threshold
    # without the threshold (xlarge), bf16 is kept
    assert choose_resident_plan("none", True, fp, rtx.memory, None, True, True).quantization == "none"


def test_without_fp8_int8_keeps_it_under_the_threshold(rtx):
    fp = footprint(41 * GB, 5 * GB)
    plan = large_plan(rtx, fp, "none", fp8_ok=False)
    assert plan.fits and plan.quantization == "int8"  # int8's step is faster than int4's
    assert plan.packed_gib * GiB <= rtx.xlarge_threshold


def test_an_explicit_format_that_does_not_fit_is_reported_not_changed(rtx):
    fp = footprint(41 * GB, 5 * GB)
    plan = large_plan(rtx, fp, "none", auto=False)
    assert not plan.fits and plan.quantization == "none" and "does not fit" in plan.reason


def test_flux2_dev_fits_xlarge_only(rtx):
    flux2 = footprint(64 * GB, 48 * GB, fp8=32 * GB)  # a 32 GB fp8 transformer and a 48 GB text encoder (Mistral)
    large = large_plan(rtx, flux2, "fp8")
    assert not large.fits and large.quantization == "int4"  # the smallest, and still too big
    assert "even with the transformer in int4" in large.reason
    xlarge = choose_resident_plan("fp8", True, flux2, rtx.memory_for(Size.XLARGE), None, True, True)
    assert xlarge.fits and xlarge.quantization == "fp8"
    size = choose_size("auto", rtx, {Size.LARGE: large.fits, Size.XLARGE: xlarge.fits})
    assert size.value == "xlarge" and size.fell_back


def test_fp8_that_no_program_runs_is_undone_only_where_bf16_fits(rtx):
    """Compilation failed, so fp8 would run unfused (about 3x slower than bf16): it is undone, unless the plan says bf16
    would not fit. Wan A14B's two experts fit half the card in fp8 only: undoing it there ran out of memory on the H100
    (RESULTS.md run 25, 80 GB; half the RTX Pro 6000 has 47.5 GiB)."""
    import optimization
    from aot.model import load_model
    from settings import Settings

    model = load_model(Settings.from_env({"MODEL_ID": "tiny-flux"}, has_cuda=False))
    wan = footprint(57 * GB, 11 * GB)  # Wan 2.2 A14B: both experts' 53 GiB in bf16, UMT5's 11 GB
    for fp, kept in ((wan, True), (footprint(23.8 * GB, 9.65 * GB), False)):  # FLUX.1-dev fits in bf16
        plan = large_plan(rtx, fp, "fp8")
        assert plan.fits and plan.quantization == "fp8" and plan.bf16_fits is not kept
        report = Report(device="cpu", dtype="bfloat16")
        report.quantization, report.fp8_granularity = "fp8", "row"
        optimization._eager_fp8(model, report, plan, None)
        assert report.fallbacks == [
            "quantization: fp8 kept without compilation (about 3x slower than bf16): bf16 weights would not fit"
            if kept else "quantization: fp8 undone: without compilation it is slower than bf16"]
        assert report.quantization == ("fp8" if kept else "none")


# The probe and the durations through the product's own path, on this CPU: its `_scaled_mm` refuses per-row fp8 scales
# and takes per-tensor ones, which is what cuBLAS did on an sm_120 card (pytorch/pytorch#192707).

def test_a_failing_fp8_probe_falls_back_to_per_tensor_scales_visibly(rtx):
    import optimization
    from conftest import settings_for, tiny_model

    card = Hardware("cuda", RTX_PRO_6000, (12, 0), 188, rtx.memory, "13.0", False, rtx)
    report = Report(device=card.label, dtype="bfloat16", hardware=card, quantization="fp8")
    granularity = optimization._probe(tiny_model(), settings_for(), card, report)  # the probes run here, for real
    assert granularity == "tensor"
    [line] = [f for f in report.fallbacks if f.startswith("quantization: fp8 with per-row scales failed on the device")]
    assert "per-tensor scaling" in line  # the kernel's own words
    assert report.probes["fp8"]["row"]["ok"] is False and report.probes["fp8"]["tensor"]["ok"] is True
    # the hub is offline here, so no attention kernel was probed: SDPA, said as a fallback
    assert report.attention == SDPA and any(f.startswith("attention: sage_hub and sage_blackwell_hub") for f in
                                            report.fallbacks)


def test_each_request_asks_at_least_the_time_it_takes(app):
    """The app's own requests, timed here, against the duration each would ask ZeroGPU for (after spaces' factor)."""
    import time

    for resolution, steps in (("64x64", 2), ("80x48", 8)):
        start = time.perf_counter()
        app.generate("a red circle", resolution, steps=steps)
        took = time.perf_counter() - start
        preset = app.PRESETS[resolution]
        asked = app.DURATIONS.granted(app.DURATIONS.task_seconds(preset, steps, 1, new_worker=False, first_shape=False))
        assert asked >= took and asked == app.gpu_seconds("a red circle", preset.width, preset.height, 0, steps, 3.5)


def test_an_edits_references_add_the_work_of_their_tokens(rtx):
    """A preset is timed with the inputs the family needs (none for FLUX.2), so a text-only request asks for a
    text-only duration, and each reference scales the call by its tokens' work (`step_work`), never down."""
    report = Report(device="cuda", dtype="bfloat16", compile="aoti", hardware=on_card(rtx, Size.LARGE),
                    timings={"1024x1024": {"call_s": 0.4, "fixed_s": 1.0}})
    square, plain = PRESETS[0], durations(report, FLUX, 20.0)
    text = plain.task_seconds(square, 28, 1, False, False)
    two = plain.task_seconds(square, 28, 1, False, False, input_tokens=2 * 4096)
    call = 0.4 * MARGIN
    assert text == pytest.approx(max(FIXED_SECONDS, MARGIN) + 28 * call)
    assert two - text == pytest.approx(28 * call * (step_work(3 * 4096) / step_work(4096) - 1))
    assert step_work(3 * 4096) / step_work(4096) > 3  # attention grows faster than the tokens
    # a family timed with one input it needs (Qwen-Image-Edit): one input costs what was timed, two add one's work
    needing = durations(report, FLUX, 20.0, timed_input_tokens=4096)
    assert needing.task_seconds(square, 28, 1, False, False) == needing.task_seconds(
        square, 28, 1, False, False, input_tokens=4096) == pytest.approx(text)
    assert needing.task_seconds(square, 28, 1, False, False, input_tokens=8192) == pytest.approx(
        text + 28 * call * (step_work(3 * 4096) / step_work(2 * 4096) - 1))
    limited = durations(report, FLUX, 20.0)
    assert limited.too_long(PRESETS, square, 28, 1) is None
    message = limited.too_long(PRESETS, square, 28, 1, input_tokens=40 * 4096)
    assert message and "with these input images" in message and "at most" in message
