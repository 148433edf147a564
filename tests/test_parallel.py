"""Several ranks (aot/parallel.py) on the CPU: two processes started by the template's own launcher
(`python -m aot.parallel --nproc-per-node 2 ...`) with torch.distributed's "gloo" backend, on the tiny FLUX
pipeline, eager.

diffusers 0.42.1 refuses CPU ranks. `enable_parallelism` puts rank r on accelerator
`r % torch.accelerator.device_count()`, and on a machine without one that raises
`ZeroDivisionError: integer modulo by zero` (modeling_utils.py, `_resolve_parallel_config`).
`test_engine_...` checks that the template stops with that message. After that, each rank process here answers
that one query with 1 (`_one_accelerator`, in these test processes only, never in the template). Everything
else runs as it would on GPUs: diffusers' mesh, its token split and Ulysses all-to-alls (over gloo instead of
NCCL), the template's launcher, its lockstep requests and its watchdog.

The ranks are this file run as a script, in the mode given on its command line. Every child process is
bounded by a timeout and killed with its whole process group at the end.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5  # fp32 on the CPU: the split changes only the order of the sums (measured: 2e-7)
# Presets whose tokens split evenly over two ranks. The tiny model's own 48x80 and 80x48 have 15 image tokens,
# which needs diffusers' "anything" mode, and that fails on gloo: its all_gather of unequal pieces is refused
# ("ProcessGroupGloo::allgather: invalid tensor size at index 1 (expected (1, 8, 16), got (1, 7, 16))").
EVEN_PRESETS = "square=64x64,landscape=96x48"
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "MODEL_ID": "tiny", "COMPILE": "none",
             "PARALLEL": "auto", "PRESETS": EVEN_PRESETS, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# -- the rank processes ---------------------------------------------------------------------------------------
def _one_accelerator():
    """See the module docstring: the single query diffusers' engine fails on without an accelerator."""
    import torch

    torch.accelerator.device_count = lambda: 1


def _latents(model, preset, steps=2, seed=7, callback=None):
    import torch

    extra = {"callback_on_step_end": callback} if callback else {}
    with torch.inference_mode():
        return model("a red fox in the snow", preset, steps, generator=torch.Generator("cpu").manual_seed(seed),
                     output_type="latent", **extra).images


def _engine_rank() -> None:
    """Both ranks: the engine's refusal, the same latents as one process (even and uneven splits), then the
    lockstep channel, with rank 1 hanging itself mid-request the second time (SIGSTOP: alive, silent, like a GPU
    stuck in a collective). Rank 0 prints one RESULT line."""

    import optimization
    from aot import parallel
    from aot.model import load_model
    from settings import Settings

    settings = Settings.from_env()
    ranks = parallel.join(settings)
    result = {}
    try:
        optimization.optimize_pipeline_(load_model(settings), settings, ranks)
    except SystemExit as err:
        result["refusal"] = str(err)
    _one_accelerator()
    one = Settings.from_env({**os.environ, "WORLD_SIZE": "1"})  # the single-process reference, in this process
    reference = load_model(one)
    optimization.optimize_pipeline_(reference, one)
    presets = {p.name: p for p in reference.presets}
    expected = {name: _latents(reference, p) for name, p in presets.items()}

    model = load_model(settings)
    report = optimization.optimize_pipeline_(model, settings, ranks)
    result["report"] = {"parallel": report.parallel, "compile": report.compile, "fallbacks": report.fallbacks}
    result["diff"] = {name: (_latents(model, p) - expected[name]).abs().max().item() for name, p in presets.items()}

    def request(preset: str, steps: int, seed: int, hang_at: int = -1):
        def hang(pipe, step, timestep, kwargs):
            if step == hang_at and ranks.rank == 1:
                os.kill(os.getpid(), signal.SIGSTOP)
            return kwargs

        return _latents(model, presets[preset], steps, seed, hang)

    if ranks.rank:
        ranks.follow(request)
    lockstep = ranks.run(request, preset="96x48", steps=2, seed=7)
    result["lockstep_diff"] = (lockstep - expected["96x48"]).abs().max().item()
    start = time.monotonic()
    try:
        ranks.run(request, preset="96x48", steps=40, seed=3, hang_at=2)
        result["hang"] = "no error"
    except parallel.RankLost as err:
        result["hang"] = {"error": str(err), "seconds": time.monotonic() - start}
    start = time.monotonic()
    try:
        ranks.run(request, preset="64x64", steps=1, seed=1)
        result["after"] = "no error"
    except parallel.RankLost as err:
        result["after"] = {"error": str(err), "seconds": time.monotonic() - start}
    result["status_error"] = report.parallel["error"]
    print("RESULT " + json.dumps(result), flush=True)
    os._exit(0)  # the launcher stops rank 1 (SIGTERM, then SIGCONT)


def _aoti_rank() -> None:
    """Both ranks: torch.export + AOTInductor of the transformer with context parallelism on. Rank 0 prints the
    collectives in the exported graph and the compiled program's difference from one process."""
    import torch

    import optimization
    from aot import parallel
    from aot.model import load_model
    from aot.programs import capture_inputs
    from settings import Settings

    settings = Settings.from_env({**os.environ, "PRESETS": "square=64x64"})
    ranks = parallel.join(settings)
    _one_accelerator()
    one = Settings.from_env({**os.environ, "PRESETS": "square=64x64", "WORLD_SIZE": "1"})
    reference = load_model(one)
    args, kwargs = capture_inputs(reference, reference.pipe.transformer, reference.presets[0])
    kwargs["hidden_states"] = torch.randn(kwargs["hidden_states"].shape, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = reference.pipe.transformer(*args, **kwargs)[0]
    model = load_model(settings)
    optimization.optimize_pipeline_(model, settings, ranks)
    program = torch.export.export(model.pipe.transformer, args, kwargs)
    collectives = sorted({str(node.target) for node in program.graph.nodes if "c10d" in str(node.target)})
    path = torch._inductor.aoti_compile_and_package(program, package_path=os.environ["AOTI_DIR"] + f"/{ranks.rank}.pt2")
    with torch.inference_mode():
        out = torch._inductor.aoti_load_package(path)(*args, **kwargs)[0]
    if ranks.rank == 0:
        print("RESULT " + json.dumps({"collectives": collectives, "diff": (out - expected).abs().max().item()}),
              flush=True)
    os._exit(0)


def _app_rank() -> None:
    import runpy

    _one_accelerator()
    sys.argv = [str(ROOT / "app.py")]
    runpy.run_path(str(ROOT / "app.py"), run_name="__main__")


# -- the tests ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("env, message", [
    ({"PARALLEL": "ulysses"}, "PARALLEL=ulysses needs several ranks, but this is one process"),
    ({"WORLD_SIZE": "2", "PARALLEL": "off"}, "launched as 2 ranks (WORLD_SIZE) but PARALLEL=off"),
    ({"WORLD_SIZE": "2", "COMPILE": "aoti"}, "COMPILE=aoti needs AoT compilation, which is off under context "),
    ({"WORLD_SIZE": "2", "DYNAMIC_SHAPES": "1"}, "DYNAMIC_SHAPES=1 needs AoT compilation"),
    ({"WORLD_SIZE": "2", "AOT_HUB_REPO": "a/b@" + "0" * 40}, "AOT_HUB_REPO needs AoT compilation"),
    ({"WORLD_SIZE": "2", "QUANTIZATION": "fp8"}, "QUANTIZATION=fp8 runs eagerly under context parallelism"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0: must be at least 1"),
    ({"WORLD_SIZE": "2", "PARALLEL": "sideways"}, "PARALLEL='sideways' is not one of auto, off, ulysses, ring"),
])
def test_settings_that_conflict_with_several_ranks_stop_startup(env, message):
    from aot import parallel
    from settings import Settings

    with pytest.raises(ValueError) as err:  # Settings.from_env, or parallel.join right after it (app.py)
        parallel.join(Settings.from_env({"MODEL_ID": "tiny", **env}, has_cuda=False))
    assert message in str(err.value)


def test_one_process_joins_nothing_and_several_ranks_are_allowed():
    from aot import parallel
    from settings import Settings

    one = Settings.from_env({"MODEL_ID": "tiny"}, has_cuda=False)
    assert (one.world_size, one.parallel) == (1, "auto") and parallel.join(one) is None
    several = Settings.from_env({"MODEL_ID": "tiny", "WORLD_SIZE": "4", "PARALLEL": "ring"}, has_cuda=False)
    assert (several.world_size, several.parallel) == (4, "ring")


def test_uneven_splits_are_found_and_flux_presets_split_evenly():
    from aot.families.flux import FLUX
    from aot.model import load_model
    from aot.parallel import uneven_splits
    from settings import Settings

    tiny = load_model(Settings.from_env({"MODEL_ID": "tiny", "COMPILE": "none"}, has_cuda=False))
    assert uneven_splits(tiny, "ulysses", 2) == ["48x80: 15 image tokens", "80x48: 15 image tokens"]
    # FLUX.1's own presets (4096 and 3952 image tokens, 512 text tokens) on the tiny transformer (2 heads)
    native = load_model(Settings.from_env({"MODEL_ID": "tiny", "COMPILE": "none", "PRESETS": FLUX.presets},
                                          has_cuda=False), pipe=tiny.pipe)
    assert [uneven_splits(native, "ring", n) for n in (2, 4, 8)] == [[], [], []]
    assert uneven_splits(native, "ulysses", 2) == [] and uneven_splits(native, "ulysses", 4) == ["2 attention heads"]
    qwen = load_model(Settings.from_env({"MODEL_ID": "tiny-qwen-image", "COMPILE": "none"}, has_cuda=False))
    assert "text tokens: as many as the prompt has" in uneven_splits(qwen, "ulysses", 2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launch:
    """`python -m aot.parallel --nproc-per-node 2 tests/test_parallel.py MODE` in its own process group, its
    output (both ranks) collected line by line."""

    def __init__(self, mode: str, tmp_path: Path, **env):
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aot.parallel", "--nproc-per-node", "2", __file__, mode], cwd=ROOT,
            env={**os.environ, **CHILD_ENV, "GRADIO_TEMP_DIR": str(tmp_path / "gradio"),
                 "GRADIO_EXAMPLES_CACHE": str(tmp_path / "examples"), **env},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())

    def wait_for(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [line for line in list(self.lines) if text in line]
            if found:
                return found[0]
            if self.proc.poll() is not None and not found:
                time.sleep(0.5)  # the reader may still be draining
                found = [line for line in list(self.lines) if text in line]
                if found:
                    return found[0]
                break
            time.sleep(0.1)
        raise AssertionError(f"no {text!r} within {timeout} s; output:\n" + "\n".join(self.lines[-60:]))

    def pid(self, rank: int) -> int:
        return int(self.wait_for(f"launcher: rank {rank} is pid", 10).rsplit(" ", 1)[1])

    def kill(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)


@pytest.fixture
def launch(tmp_path):
    launches = []

    def start(mode, **env):
        launches.append(Launch(mode, tmp_path, **env))
        return launches[-1]

    yield start
    for item in launches:
        item.kill()


def test_engine_refuses_cpu_ranks_then_matches_one_rank_and_a_hung_rank_fails_fast(launch):
    from aot.parallel import HEARTBEAT_S, LOST_AFTER_S

    run = launch("engine")
    result = json.loads(run.wait_for("RESULT ", timeout=150).split("RESULT ", 1)[1])
    # diffusers' own refusal, said by the template at startup
    refusal = "diffusers context parallelism refused rank 0: ZeroDivisionError: integer modulo by zero"
    assert refusal in result["refusal"]
    report = result["report"]
    parallel = report["parallel"]
    assert (parallel["mode"], parallel["ring_degree"], parallel["ulysses_degree"]) == ("ulysses", 1, 2)
    assert parallel["world_size"] == 2 and parallel["backend"] == "cpu:gloo"
    assert parallel["anything"] is False and parallel["uneven"] == []
    assert report["compile"] == "none" and any("off under context parallelism" in f for f in report["fallbacks"])
    # the same latents as one process, at both presets (16 and 18 image tokens: 8 and 9 per rank)
    assert set(result["diff"]) == {"64x64", "96x48"} and max(result["diff"].values()) < TOLERANCE
    assert result["lockstep_diff"] < TOLERANCE
    # rank 1 stopped itself mid-request: rank 0 is stuck in a gloo all-to-all that would wait 30 minutes
    hang = result["hang"]
    assert isinstance(hang, dict), hang
    assert "rank 1 of 2 stopped answering for 5 s" in hang["error"] and "restart the server" in hang["error"]
    assert hang["seconds"] < LOST_AFTER_S + 4 * HEARTBEAT_S + 2
    print(f"hung rank 1: rank 0 had the error {hang['seconds']:.1f} s after the request began")
    after = result["after"]
    assert isinstance(after, dict) and after["error"] == hang["error"] and after["seconds"] < 0.5
    assert result["status_error"] == hang["error"]


def test_app_serves_from_two_ranks_and_a_killed_rank_gives_a_clear_error(launch):
    from gradio_client import Client

    port = _free_port()
    run = launch("app", GRADIO_SERVER_PORT=str(port))
    run.wait_for("Running on local URL", timeout=120)
    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
    status = client.predict(api_name="/status")
    parallel = status["parallel"]
    assert parallel["engine"].startswith("diffusers context parallelism") and parallel["world_size"] == 2
    assert (parallel["mode"], parallel["ring_degree"], parallel["ulysses_degree"]) == ("ulysses", 1, 2)
    assert parallel["error"] is None and status["compile"] == "none"

    request = {"prompt": "a lighthouse at dusk", "resolution": "64x64", "seed": 5, "randomize_seed": False,
               "guidance": 3.5, "negative_prompt": ""}
    image, seed, details = client.predict(**request, steps=2, api_name="/generate")
    assert Path(image).stat().st_size > 0 and seed == 5 and "2 steps" in details
    run.wait_for("rank 1: request 1 (width=64, height=64, seed=5, steps=2", timeout=5)

    job = client.submit(**request, steps=50, api_name="/generate")
    run.wait_for("rank 1: request 2 ", timeout=30)
    time.sleep(0.5)  # into the denoising loop (a step takes about 0.1 s here)
    os.kill(run.pid(1), signal.SIGKILL)
    killed = time.monotonic()
    with pytest.raises(Exception) as failure:
        job.result(timeout=60)
    seconds = time.monotonic() - killed
    message = str(failure.value)
    assert "RankLost: rank 1 of 2 stopped answering for 5 s" in message, message
    assert "restart the server" in message and seconds < 10, (seconds, message)
    print(f"killed rank 1: the client had the error {seconds:.1f} s later")

    # rank 0 keeps serving its page, and shows the error there and on every request
    assert run.proc.poll() is None
    run.wait_for("launcher: rank 1 exited with status -9; rank 0 keeps serving", timeout=5)
    status = client.predict(api_name="/status")
    assert "rank 1 of 2 stopped answering" in status["parallel"]["error"]
    assert any(item.startswith("parallel: rank 1 of 2 stopped answering") for item in status["fallbacks"])
    start = time.monotonic()
    with pytest.raises(Exception, match="rank 1 of 2 stopped answering"):
        client.predict(**request, steps=2, api_name="/generate")
    assert time.monotonic() - start < 5


@pytest.mark.skipif(not os.environ.get("AOT_TEST_PARALLEL_AOTI"),
                    reason="about 60 s of AOTInductor compile per rank; set AOT_TEST_PARALLEL_AOTI=1 to run")
def test_aoti_program_carries_the_collectives(launch, tmp_path):
    """The check behind README "Several GPUs": AoT could carry context parallelism, the template does not yet."""
    run = launch("aoti", AOTI_DIR=str(tmp_path))
    result = json.loads(run.wait_for("RESULT ", timeout=300).split("RESULT ", 1)[1])
    assert "_c10d_functional.all_to_all_single.default" in result["collectives"]
    assert result["diff"] < TOLERANCE * 10
    print(f"AoT program under context parallelism: {result['collectives']}, max diff {result['diff']:.1e}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    {"engine": _engine_rank, "app": _app_rank, "aoti": _aoti_rank}[sys.argv[1]]()
