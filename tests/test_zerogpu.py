"""The app under spaces' real ZeroGPU code path, against the device-API stand-in (tests/zerogpu_standin.py), with
spaces' configuration of ZeroGPU's card today, the RTX Pro 6000 Blackwell (tests/zerogpu_profile.py).

With SPACES_ZERO_GPU=true, `spaces` patches torch in the main process and sends every `@spaces.GPU` call to a
forked worker once the device API grants a GPU. On this CPU machine (a CUDA build of torch, no driver), seen:
  - the main process believes it has ZeroGPU's device: `torch.cuda.is_available()` is True and the GPU is
    spaces' emulated RTX Pro 6000 (sm_120, 188 SMs, the whole card), so the app plans fp8 and AoT for it, and for
    half the card (`large`), which it passes to every task;
  - before quantizing, a 60 s task (40 s asked, times spaces' factor of 1.5) probes fp8 and attention on the
    card; its worker fails at CUDA init here, so the guesses stay untested and that is listed;
  - the startup compile asks for a 1500 s GPU task (1000 s asked) before the server starts, its worker reaches
    /allow and then fails at CUDA init, so the app serves eager and lists the fallback; timing the presets fails
    the same way, so requests ask for durations estimated from an H100's step, x4 for half the card;
  - every request's worker fails the same way, which the user sees as spaces' "ZeroGPU worker error"
    (the error's class name: RuntimeError), and the server keeps serving;
  - quota (429), no-GPU (503) and queue answers come before any GPU work, so their messages are the real ones.
A worker ended mid-task (its duration over, or a crash) is exercised by holding /allow open ("allow_delay"),
since the worker would otherwise fail at CUDA init first. The GPU runs of all this are benchmarks/zerogpu_e2e.py.
"""
import base64
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from conftest import ROOT
from zerogpu_standin import StandIn

REQUEST = dict(prompt="a lighthouse at dusk", resolution="64x64", seed=7, randomize_seed=False, steps=2, guidance=3.5)
WORKER_ERROR = "RuntimeError"  # what spaces tells the user when the worker fails at CUDA init (no GPU here)
START_TIMEOUT_S = 240  # imports, the tiny model and spaces' packing; about 25 s on an idle 2-core machine


def _post(url: str, body=None) -> tuple[int, object]:
    data = json.dumps(body).encode() if body is not None else b""
    request = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := condition()):
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# The stand-in alone: what ZeroGPU does that spaces cannot show on a CPU machine.

def test_standin_kills_a_task_at_its_duration_and_then_forgets_it():
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with StandIn() as api:
            status, grant = _post(f"{api.url}/schedule?cgroupPath=/&taskId=1&enableQueue=true&durationSeconds=1"
                                  "&tokenVersion=2")
            assert status == 200 and set(grant) == {"idle", "nvidiaIndex", "nvidiaUUID", "allowToken"}
            assert _post(f"{api.url}/allow?allowToken={grant['allowToken']}&pid={sleeper.pid}")[0] == 200
            assert sleeper.wait(timeout=5) == -signal.SIGKILL
            [task] = api.tasks()
            assert task["killed"] and task["requested_s"] == 1 and 0.99 <= task["used_s"] < 3  # ms rounding
            assert _post(f"{api.url}/release?allowToken={grant['allowToken']}&fail=true")[0] == 404
            assert _post(f"{api.url}/script", [{"answer": "maybe"}])[0] == 400  # a bad script fails at once
            assert [call["path"] for call in api.calls()] == ["/schedule", "/allow", "/release", "/script"]
    finally:
        sleeper.kill()
        sleeper.wait()


# The app in ZeroGPU mode, driven through its API.

@pytest.fixture(scope="module")
def device_api():
    with StandIn() as api:
        yield api


@pytest.fixture(scope="module")
def zero_app(device_api, tmp_path_factory):
    """app.py as a ZeroGPU Space runs it today: SPACES_ZERO_GPU=true, the device API at the stand-in, spaces' RTX Pro
    6000 configuration, an empty cache."""
    import torch
    from gradio_client import Client

    if torch.version.cuda is None:
        pytest.skip("spaces' ZeroGPU mode needs a CUDA build of torch (it reads torch.version.cuda)")
    work = tmp_path_factory.mktemp("zerogpu")
    port = _free_port()
    env = {**os.environ, "SPACES_ZERO_GPU": "true", "SPACES_ZERO_DEVICE_API_URL": device_api.url,
           "ZEROGPU_OFFLOAD_DIR": str(work / "tensors"), "AOT_CACHE_DIR": str(work / "aot-cache"),
           # big and huge: never run here; huge is past ZeroGPU's per-request maximum at 50 steps
           "MODEL_ID": "tiny", "COMPILE": "aoti", "PRESETS": "square=64x64,big=1024x1024,huge=3072x3072",
           "GRADIO_SERVER_NAME": "127.0.0.1",
           "GRADIO_SERVER_PORT": str(port), "PYTHONUNBUFFERED": "1"}
    log = work / "app.log"
    with log.open("w") as out:
        app = subprocess.Popen([sys.executable, "tests/zerogpu_profile.py", "app.py"], cwd=ROOT, env=env, stdout=out,
                               stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def ready():
        assert app.poll() is None, f"app.py exited with {app.returncode}:\n{log.read_text()[-3000:]}"
        try:
            return Client(url, verbose=False)
        except Exception:  # noqa: BLE001 - not listening yet
            return None

    try:
        client = _wait_until(ready, START_TIMEOUT_S, "app.py under ZeroGPU to serve")
        yield client, url, app, log
    finally:
        os.killpg(app.pid, signal.SIGTERM)  # its session: the app and any GPU worker it forked
        try:
            app.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(app.pid, signal.SIGKILL)
            app.wait()


def _failure(client, **change):
    """The AppError a request ends with (the test fails if it succeeds)."""
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as failure:
        client.predict(**{**REQUEST, **change}, api_name="/generate")
    return failure.value


def _new_calls(device_api, since: int) -> list[dict]:
    return device_api.calls()[since:]


def _served_next(client, device_api) -> None:
    """The next request reaches a GPU worker again: scheduled, a worker forked and allowed; and the server answers.
    (The worker then fails at CUDA init on this machine; on a GPU it returns the image.)"""
    since = len(device_api.calls())
    assert str(_failure(client)) == WORKER_ERROR
    assert [c["path"] for c in _new_calls(device_api, since)] == ["/schedule", "/allow", "/release"]
    assert client.predict(api_name="/status")["model_id"] == "tiny-flux"


def test_startup_probes_then_compiles_then_times_in_gpu_tasks_sized_for_half_the_card(zero_app, device_api):
    client, _, app, _ = zero_app
    calls = device_api.calls()
    paths = [c["path"] for c in calls]
    assert paths[:10] == ["/schedule", "/allow", "/release"] * 3 + ["/startup-report"]
    schedules = [c["params"] for c in calls if c["path"] == "/schedule"][:3]
    # probe, compile, timing: each duration as ZeroGPU enforces it, after spaces' factor of 1.5 for `large`
    assert [(p["durationSeconds"], p["gpuSize"]) for p in schedules] == [("60", "large"), ("1500", "large"),
                                                                          ("300", "large")]
    assert all(p["enableQueue"] == "true" for p in schedules)
    schedule, allow, release = calls[3:6]
    worker = int(allow["params"]["pid"])
    assert worker != app.pid  # a forked worker asked for the GPU, not the main process
    assert release["params"] == {"allowToken": allow["params"]["allowToken"], "fail": "true"}
    status = client.predict(api_name="/status")
    # spaces' emulated ZeroGPU card, in the main process, planned for half of it
    assert status["device"] == "cuda: NVIDIA RTX PRO 6000 Blackwell Server Edition, sm_120, ZeroGPU large (47 GiB)"
    assert status["hardware"]["arch"] == "sm_120" and status["hardware"]["sm_count"] == 188
    assert status["zerogpu_size"] == "large" and "1x quota" in status["zerogpu_size_reason"]
    assert status["memory"]["budget_gib"] == 47.49 and status["memory"]["xlarge_threshold_gib"] == 42.0
    assert status["memory"]["by_size"]["large"]["fits"] and status["memory"]["packed_gib"] < 1
    assert status["compile"] == "none"
    fallbacks = status["fallbacks"]
    assert any(f.startswith("probes: could not run on the device") for f in fallbacks)
    assert any(f.startswith("compile: AoT compilation failed, serving eager") for f in fallbacks)
    assert any(f.startswith("durations: timing the presets on the device failed") for f in fallbacks)
    durations = status["durations"]
    assert (durations["source"], durations["slowdown_vs_h100"], durations["duration_factor"]) == (
        "estimated from an H100's step", 4.0, 1.5)


def test_gpu_failure_reaches_the_user_and_the_server_keeps_serving(zero_app, device_api):
    client, _, _, log = zero_app
    since = len(device_api.calls())
    failure = _failure(client)
    assert (failure.title, str(failure)) == ("ZeroGPU worker error", WORKER_ERROR)
    calls = _new_calls(device_api, since)
    assert [c["path"] for c in calls] == ["/schedule", "/allow", "/release"] and calls[2]["params"]["fail"] == "true"
    assert "Found no NVIDIA driver" in log.read_text()  # the worker's traceback is in the server log
    _served_next(client, device_api)


def _token(payload: dict) -> str:
    """An X-IP-Token as spaces reads it: a JWT whose payload it decodes without checking the signature."""
    encode = lambda part: base64.urlsafe_b64encode(json.dumps(part).encode()).decode().rstrip("=")  # noqa: E731
    return f"{encode({'alg': 'none'})}.{encode(payload)}.signature"


def test_quota_answers_reach_the_user_before_any_gpu_work(zero_app, device_api):
    from gradio_client import Client

    client, url, _, _ = zero_app
    since = len(device_api.calls())
    device_api.script({"answer": "quota", "left": 0, "wait": 60})
    failure = _failure(client)
    # app._answered_before_gpu_work tells these answers (titled "ZeroGPU ...") from a failed task by their titles
    assert failure.title == "ZeroGPU quota exceeded" and str(failure).startswith("Space app has reached its GPU limit.")
    signed_in = Client(url, verbose=False, headers={"X-IP-Token": _token({"user": "visitor"})})
    device_api.script({"answer": "quota", "left": 3, "wait": 90}, {"answer": "quota", "left": 0, "wait": -1})
    big = {"resolution": "1024x1024", "steps": 50}
    quota, illegal = str(_failure(signed_in, **big)), str(_failure(signed_in, **big))
    schedules = [c for c in _new_calls(device_api, since) if c["path"] == "/schedule"]
    requested = schedules[-1]["params"]["durationSeconds"]
    # the app's gpu_seconds, estimated for half the RTX Pro 6000 (timing failed here): FIXED_SECONDS (3) + a new
    # worker's start (4 s, and 1 s per GiB of the tiny model's weights: every task here fails, so no worker ever
    # served) + 50 eager steps (the compile fell back) of an H100's 0.25 s at 1024x1024, x4 for half the card
    # (aot/zerogpu.py); the app asks for that divided by spaces' factor, and spaces multiplies it back
    needed = math.ceil(3 + 4 + 0.001 + 50 * 0.25 * 4.0)
    assert requested == str(round(math.ceil(needed / 1.5) * 1.5)) == "58"
    assert quota.startswith(f"You have exceeded your ZeroGPU quota ({requested}s requested vs. 3s left). "
                            "Try again in 0:01:30.")
    assert illegal.startswith(f"The requested GPU duration ({requested}s) is larger than the maximum allowed")
    assert schedules[1]["params"]["token"].count(".") == 2  # the visitor's token went to the device API
    assert [c["path"] for c in _new_calls(device_api, since)] == ["/schedule"] * 3  # no worker, no GPU
    _served_next(client, device_api)


def test_a_request_past_zerogpus_per_request_maximum_is_refused_with_what_fits(zero_app, device_api):
    client, _, _, _ = zero_app
    since = len(device_api.calls())
    message = str(_failure(client, resolution="3072x3072", steps=50))
    # 50 estimated steps at 3072x3072 on half the card need about 846 s (36,864 tokens: attention doubles the
    # step), past the 300 s assumed maximum
    assert message.startswith("50 steps at 3072x3072 need about 846 s of GPU, past ZeroGPU's 300 s per request; "
                              "use at most 17 steps at 3072x3072 or 50 steps at 64x64, 1024x1024"), message
    assert _new_calls(device_api, since) == []  # refused before asking for a GPU
    _served_next(client, device_api)


def test_no_gpu_answer_reaches_the_user(zero_app, device_api):
    client, _, _, _ = zero_app
    since = len(device_api.calls())
    device_api.script({"answer": "no-gpu"})
    failure = _failure(client)
    assert (failure.title, str(failure)) == ("ZeroGPU client error", "No GPU was available")
    assert [(c["path"], c["status"]) for c in _new_calls(device_api, since)] == [("/schedule", 503)]
    _served_next(client, device_api)


def test_a_queued_request_gets_the_gpu_when_it_frees(zero_app, device_api):
    client, _, _, _ = zero_app
    since = len(device_api.calls())
    device_api.script({"answer": "queue", "seconds": 2}, {"answer": "queue", "seconds": 1, "then": "failed"})
    start = time.monotonic()
    assert str(_failure(client)) == WORKER_ERROR  # it waited in the queue, got the GPU, and its worker ran
    assert time.monotonic() - start >= 2
    failure = _failure(client)
    assert failure.title == "ZeroGPU quota exceeded" and str(failure).startswith("No GPU was available after 60s.")
    assert [c["path"] for c in _new_calls(device_api, since)] == ["/schedule", "/allow", "/release", "/schedule"]
    _served_next(client, device_api)


def _worker_ended(client, device_api, end) -> tuple[str, dict]:
    """A request whose worker is ended by `end(task)` while it holds the GPU; returns what the user saw and the
    stand-in's record of the task."""
    since = len(device_api.tasks())
    job = client.submit(**REQUEST, api_name="/generate")
    task = _wait_until(lambda: next((t for t in device_api.tasks()[since:] if t["new_worker"]), None), 30,
                       "a new worker to ask for the GPU")
    end(task)
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as failure:
        job.result(timeout=60)
    [task] = device_api.tasks()[since:]
    return str(failure.value), task


def test_a_task_past_its_duration_is_killed_and_the_next_request_gets_a_new_worker(zero_app, device_api):
    client, _, _, _ = zero_app
    device_api.script({"answer": "grant", "duration": 1, "allow_delay": 10})
    seen, task = _worker_ended(client, device_api, lambda task: None)
    assert seen == "GPU task aborted" and task["killed"] and 0.99 <= task["used_s"] < 5
    release = [c for c in device_api.calls("/release") if c["params"]["allowToken"] == task["allowToken"]]
    assert [(c["params"]["fail"], c["status"]) for c in release] == [("true", 404)]  # ended here: forgotten
    since = len(device_api.calls())
    _served_next(client, device_api)
    assert int(_new_calls(device_api, since)[1]["params"]["pid"]) != task["pid"]  # a new worker


def test_a_crashed_worker_is_reported_and_replaced(zero_app, device_api):
    client, _, _, _ = zero_app
    device_api.script({"answer": "grant", "allow_delay": 10})
    seen, task = _worker_ended(client, device_api, lambda task: os.kill(task["pid"], signal.SIGSEGV))
    assert seen == "GPU task aborted" and not task["killed"] and task["fail"] is True
    since = len(device_api.calls())
    _served_next(client, device_api)
    assert int(_new_calls(device_api, since)[1]["params"]["pid"]) != task["pid"]
