"""ZeroGPU end to end on one GPU: `python app.py` under spaces' real ZeroGPU code path, driven through its API,
with ZeroGPU's faults injected between requests.

spaces runs its ZeroGPU mode wherever SPACES_ZERO_GPU=true and SPACES_ZERO_DEVICE_API_URL points at a server that
answers its device API: here tests/zerogpu_standin.py, which grants this machine's GPU, kills a task's worker at
its duration as ZeroGPU does, and answers with quota, no-GPU or queue answers when scripted. The app's main
process then has no CUDA (torch patched, GPU-bound tensors packed to disk), and every @spaces.GPU call, the
startup compile (duration=1500) and each image, runs in a forked worker that receives the GPU.

The model is FLUX-shaped with random weights, saved to --work and served as MODEL_ID: FLUX.1-dev's transformer
widths with --layers double,single blocks (2,4: 1.3B parameters), tiny CLIP and T5 encoders whose output widths
are FLUX.1-dev's (768 pooled, 4096 per token), a tiny VAE with FLUX's 16 latent channels.

Phases, each a fresh `python app.py`; the compiled-program cache carries over, nothing else:
  killed-compile  empty cache; the stand-in kills the startup compile task after --kill-compile-at seconds. The
                  app must serve (eager, the fallback listed) and leave nothing a later start would trust.
  cold            the cache the killed compile left: compiles again (or loads what it finished). Ready time;
                  per preset 4 steps (first in the worker), 4 and 28 steps; 50 steps; then the faults: quota,
                  illegal duration, no GPU, queued, queue timeout, a task killed at its duration mid-generation,
                  a worker crash (SIGSEGV) mid-generation; each followed by a plain request that must be served.
  warm            the same cache: loads. Ready time; per preset 28 steps (first in the worker), 28 and 4 steps.
The killed-compile phase uses its own Inductor cache directory, so the cold phase compiles cold.

spaces is fed ZeroGPU's card of today, the RTX Pro 6000 Blackwell (--card; tests/zerogpu_profile.py): the main
process sees sm_120 and the whole card, plans for half of it (`large`) and passes the size to every task, and
spaces stretches each requested duration by its factor (1.5). The GPU workers run on this machine's GPU, which
probes, compiles and times the presets: the durations asked are this GPU's times, as they would be the card's on
ZeroGPU. `--fail-fp8-rows` makes the fp8 probe meet the per-row failure seen on sm_120 (pytorch/pytorch#192707).

Per request: GPU seconds requested (durationSeconds in /schedule: the app's gpu_seconds after spaces' factor)
against used (grant to release, measured by the stand-in); "covered" when requested >= used.

Ends with a table of faults (what the user saw, whether the next request was served) and ONE JSON line.

On the GPU machine, about 6 minutes on an H100 (RESULTS.md run 15). Carry the AoT wheels of shared/GPU.md
(diffusers, torchao, spaces, pydantic and their small dependencies: the image's own transformers, tokenizers
and safetensors serve) in .whl-core and the gradio ones in .whl-gradio, under the 64 MiB a call carries:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
      .whl-core/*.whl .whl-gradio/*.whl && export PYTHONPATH=/tmp/site || exit; \\
    export CXX=/usr/bin/g++ HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1; python3 benchmarks/zerogpu_e2e.py --out $OUT

FLUX.1-dev's full depth, regional (6 minutes): AOT_SCOPE=blocks ... --layers 19,38 --phases cold,warm
--presets square=1024x1024 --budget 400.

On a CPU machine `--model-id tiny --presets square=64x64,landscape=80x48` runs the same script with the tiny
model: there every GPU task fails at CUDA init in its worker, so only the answers given before GPU work are real.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PROCESS_START = time.monotonic()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from zerogpu_standin import StandIn  # noqa: E402

PROMPT = "a lighthouse on a cliff at dusk"
CRASH_AT = 0.4  # of a steady 50-step task's GPU time: when the worker is killed mid-generation
ABORTED = "GPU task aborted"  # what spaces tells the user when the worker died mid-task


def log(message: str) -> None:
    print(f"[{time.monotonic() - PROCESS_START:6.1f} s] {message}", flush=True)


def build_model(path: Path, double: int, single: int) -> dict:
    """A FLUX-shaped pipeline with random weights, saved as a diffusers directory (once per --layers)."""
    marker = path / "e2e.json"
    if marker.exists() and json.loads(marker.read_text()).get("layers") == [double, single]:
        return json.loads(marker.read_text())
    import torch
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    sys.path.insert(0, str(ROOT))
    from aot.families import family_named
    from aot.model import build_tiny

    start = time.monotonic()
    tiny = build_tiny(family_named("flux"))  # its tokenizers and scheduler
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        # FLUX.1-dev's widths are the class defaults: 24 heads of 128, text 4096, pooled 768, 64 input channels
        transformer = FluxTransformer2DModel(num_layers=double, num_single_layers=single, guidance_embeds=True)
        clip = CLIPTextModel(CLIPTextConfig(
            vocab_size=tiny.text_encoder.config.vocab_size, hidden_size=transformer.config.pooled_projection_dim,
            intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
            projection_dim=transformer.config.pooled_projection_dim, bos_token_id=0, eos_token_id=1, pad_token_id=1))
        t5 = T5EncoderModel(T5Config(
            vocab_size=tiny.text_encoder_2.config.vocab_size, d_model=transformer.config.joint_attention_dim, d_kv=8,
            d_ff=64, num_layers=1, num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=transformer.config.in_channels // 4,
            block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=4, use_quant_conv=False,
            use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)
    finally:
        torch.set_default_dtype(previous)
    pipe = FluxPipeline(scheduler=tiny.scheduler, vae=vae, text_encoder=clip, tokenizer=tiny.tokenizer,
                        text_encoder_2=t5, tokenizer_2=tiny.tokenizer_2, transformer=transformer)
    pipe.save_pretrained(path)
    params = sum(p.numel() for p in transformer.parameters())
    info = {"layers": [double, single], "transformer_params_b": round(params / 1e9, 2),
            "build_s": round(time.monotonic() - start, 1)}
    marker.write_text(json.dumps(info))
    return info


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class App:
    """One `python app.py` in its own session (so that stopping it also ends the GPU workers it forked)."""

    def __init__(self, name: str, env: dict, out: Path, work: Path, profile: list[str]):
        self.name, self.port = name, free_port()
        self.log_path = out / f"app-{name}.log"
        env = {**os.environ, **env, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(self.port),
               "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(work / "gradio"), "PYTHONUNBUFFERED": "1"}
        self.started = time.monotonic()
        with self.log_path.open("w") as log_file:
            self.process = subprocess.Popen([sys.executable, "tests/zerogpu_profile.py", *profile, "app.py"], cwd=ROOT,
                                            env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        self.download = work / "downloads"
        self.client = None
        self.ready_s = None

    def wait_ready(self, timeout: float) -> bool:
        from gradio_client import Client

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log(f"{self.name}: app.py exited with {self.process.returncode}; see {self.log_path}")
                return False
            try:
                self.client = Client(f"http://127.0.0.1:{self.port}", verbose=False, download_files=str(self.download))
            except Exception:  # noqa: BLE001 - not listening yet
                time.sleep(1)
                continue
            self.ready_s = round(time.monotonic() - self.started, 1)
            return True
        log(f"{self.name}: not ready after {timeout:.0f} s; see {self.log_path}")
        return False

    def status(self) -> dict:
        return self.client.predict(api_name="/status")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # any worker left in its session
        except ProcessLookupError:
            pass
        self.process.wait()


class Run:
    """The stand-in, the app of the current phase, and everything measured."""

    def __init__(self, args, model_id: str, api: StandIn):
        self.args = args
        self.out, self.work = Path(args.out), Path(args.work)
        self.api = api
        self.base_env = {"SPACES_ZERO_GPU": "true", "SPACES_ZERO_DEVICE_API_URL": self.api.url, "MODEL_ID": model_id,
                         "AOT_CACHE_DIR": str(self.cache_dir), "PRESETS": args.presets, "HF_HUB_OFFLINE": "1",
                         "ZEROGPU_OFFLOAD_DIR": str(offload_dir(self.work))}
        self.app: App | None = None
        self.phase = ""
        self.requests: list[dict] = []
        self.faults: list[dict] = []
        self.phases: dict[str, dict] = {}

    def left(self) -> float:
        return self.args.budget - (time.monotonic() - PROCESS_START)

    def start(self, phase: str, env: dict, timeout: float) -> bool:
        self.phase = phase
        calls_before = len(self.api.calls())
        profile = ["--card", self.args.card] + ["--fail-fp8-rows"] * self.args.fail_fp8_rows
        self.app = App(phase, {**self.base_env, **env}, self.out, self.work, profile)
        ready = self.app.wait_ready(timeout)
        record = {"ready": ready, "ready_s": self.app.ready_s, "log": self.app.log_path.name}
        calls = self.api.calls()[calls_before:]
        record["device_api_calls_before_ready"] = [c["path"] for c in calls][:12]
        if ready:
            status = self.app.status()
            record.update({key: status.get(key) for key in (
                "device", "zerogpu_size", "zerogpu_size_reason", "quantization", "fp8_granularity", "attention",
                "attention_reason", "probes", "compile", "compile_source", "compile_seconds", "startup", "timings",
                "durations", "cuda_graphs", "graphs", "fallbacks", "notes")})
            record["memory"] = {k: status["memory"].get(k) for k in ("layout", "budget_gib", "packed_gib", "need_gib",
                                                                     "xlarge_threshold_gib", "fits")}
        self.phases[phase] = record
        log(f"{phase}: ready={ready} in {self.app.ready_s} s, {record.get('compile')} "
            f"({record.get('compile_source')}), graphs {record.get('cuda_graphs')} {record.get('graphs')}, "
            f"fallbacks {record.get('fallbacks')}")
        return ready

    def stop(self) -> None:
        if self.app is not None:
            self.app.stop()
            self.app = None
        left = self.api.unscript()
        if left:
            log(f"{self.phase}: scripted answers not used: {left}")

    def request(self, label: str, preset: str, steps: int) -> dict:
        """One /generate call and the stand-in's record of its GPU task(s)."""
        from gradio_client.exceptions import AppError

        before = len(self.api.tasks())
        start = time.monotonic()
        try:
            _, _, details = self.app.client.predict(
                prompt=PROMPT, resolution=preset, seed=1, randomize_seed=False, steps=steps, guidance=3.5,
                api_name="/generate")
            ok, seen = True, f"image: {details}"
        except AppError as err:
            ok, seen = False, without_links(str(err))
        row = {"phase": self.phase, "request": label, "preset": preset, "steps": steps, "ok": ok, "seen": seen,
               "latency_s": round(time.monotonic() - start, 2)}
        row.update(self._task_fields(self.api.tasks()[before:]))
        self.requests.append(row)
        log(f"{self.phase} {label} {preset} {steps} steps: {'ok' if ok else 'FAILED'} {row['latency_s']} s, "
            f"requested {row.get('requested_s')} s, used {row.get('used_s')} s; {seen[:100]}")
        return row

    @staticmethod
    def _task_fields(tasks: list[dict]) -> dict:
        if not tasks:
            return {"gpu_task": False}
        task = tasks[-1]
        return {"gpu_task": True, "requested_s": task["requested_s"], "used_s": task["used_s"],
                "used_after_allow_s": task["used_after_allow_s"], "new_worker": task["new_worker"],
                "killed": task["killed"], "fail": task["fail"]}

    def fault(self, name: str, exercised: bool, seen: str, detail: str = "") -> None:
        """Records a fault (whether it happened as intended, what the user saw) and sends the plain request that
        must be served after it."""
        after = self.request(f"after {name}", self.presets[0], 4)
        self.faults.append({"fault": name, "exercised": exercised, "user_saw": seen, "served_next": after["ok"],
                            "next_request": after, "detail": detail})

    def not_started(self, name: str) -> None:
        self.faults.append({"fault": name, "exercised": False, "user_saw": "the app did not start",
                            "served_next": False, "detail": f"see {self.app.log_path.name}"})
        self.stop()

    # The phases

    def killed_compile(self) -> None:
        # the first task probes the card; the second, the startup compile, is killed
        self.api.script({"answer": "grant"}, {"answer": "grant", "duration": self.args.kill_compile_at})
        env = {"TORCHINDUCTOR_CACHE_DIR": str(self.work / "inductor-killed-compile")}
        before = len(self.api.tasks())
        ready = self.start("killed-compile", env, min(self.left() - 200, 300))
        tasks = self.api.tasks()[before:]
        compile_task = tasks[1] if len(tasks) > 1 else None
        record = self.phases["killed-compile"]
        record["compile_task"] = compile_task and {k: compile_task[k] for k in ("requested_s", "enforced_s",
                                                                                "used_s", "killed", "fail")}
        record["cache_after"] = cache_state(self.cache_dir)
        if not ready:
            self.not_started("startup compile killed half-way")
            return
        killed = bool(compile_task and compile_task["killed"])
        fallback = next((f for f in record["fallbacks"] if f.startswith("compile:")), "no compile fallback listed")
        detail = (f"killed after {compile_task['used_s']} s of the 1500 s task" if killed else
                  "the compile task ended before the kill" + (f" ({compile_task['used_s']} s)"
                                                              if compile_task else ""))
        cache = record["cache_after"]
        detail += (f"; cache after: {len(cache['intact'])} intact entries, {len(cache['broken'])} broken (a start "
                   f"recompiles those), {len(cache['staging'])} staging directories left")
        self.fault("startup compile killed half-way", killed, f"status: {fallback}", detail)
        self.faults[-1]["cache_ok"] = not cache["broken"]
        self.stop()

    def cold(self) -> None:
        if not self.start("cold", {}, min(self.left() - 20, 540)):
            self.not_started("cold start")
            return
        killed = self.faults[0] if self.faults and self.faults[0]["fault"].startswith("startup compile") else None
        if killed is not None:  # what the next start did with the cache the killed compile left
            cold = self.phases["cold"]
            killed["detail"] += f"; next start: {cold['compile_source'] or cold['compile']}"
        for preset in self.presets:
            self.request("first in worker" if preset == self.presets[0] else "first for preset", preset, 4)
            self.request("again", preset, 4)
            self.request("again", preset, 28)
        # spaces keeps the compile task's worker alive after it succeeds: does it hold GPU memory beside this one?
        self.phases["cold"]["gpu_processes_after_requests"] = gpu_processes()
        self.faults_before_gpu_work()
        self.faults_during_gpu_work()
        self.stop()

    def warm(self) -> None:
        if not self.start("warm", {}, self.left() - 10):
            self.not_started("warm start")
            return
        for preset in self.presets:
            self.request("first in worker" if preset == self.presets[0] else "first for preset", preset, 28)
            self.request("again", preset, 28)
            self.request("again", preset, 4)
        self.stop()

    def faults_before_gpu_work(self) -> None:
        square = self.presets[0]
        for name, answer in [("quota exceeded (429)", {"answer": "quota", "left": 0, "wait": 60}),
                             ("duration over the maximum (429)", {"answer": "quota", "left": 0, "wait": -1}),
                             ("no GPU (503)", {"answer": "no-gpu"}),
                             ("queue timeout (event stream, failed)", {"answer": "queue", "seconds": 2,
                                                                       "then": "failed"})]:
            self.api.script(answer)
            row = self.request(name, square, 4)
            self.fault(name, not row["ok"] and not row["gpu_task"], row["seen"],
                       "answered before any GPU work" if not row["gpu_task"] else "UNEXPECTED: a GPU task ran")
        self.api.script({"answer": "queue", "seconds": 3})
        row = self.request("queued 3 s", square, 4)
        self.fault("queued 3 s (event stream, then granted)", row["gpu_task"] and row["latency_s"] >= 3,
                   f"image after {row['latency_s']} s" if row["ok"] else row["seen"])

    def faults_during_gpu_work(self) -> None:
        square = self.presets[0]
        steady = self.request("steady, 50 steps", square, 50)  # how long the faults below would have run
        run_s = steady.get("used_s") or 1.0
        self.api.script({"answer": "grant", "duration": round(CRASH_AT * run_s, 3)})
        row = self.request("killed at its duration", square, 50)
        self.fault("task killed at its duration mid-generation", bool(row.get("killed")) and row["seen"] == ABORTED,
                   row["seen"], f"duration set to {round(CRASH_AT * run_s, 2)} s of a {run_s} s task; "
                                f"killed by the stand-in: {row.get('killed')}")
        self.request("again, 50 steps", square, 50)  # the new worker has loaded the square program
        exercised, seen, detail = self.crash_worker(square, CRASH_AT * run_s)
        self.fault("worker crash (SIGSEGV) mid-generation", exercised, seen, detail)

    def crash_worker(self, preset: str, after_s: float) -> tuple[bool, str, str]:
        """Sends a 50-step request and kills its worker `after_s` seconds into the task."""
        from gradio_client.exceptions import AppError

        before = len(self.api.tasks())
        job = self.app.client.submit(prompt=PROMPT, resolution=preset, seed=1, randomize_seed=False, steps=50,
                                     guidance=3.5, api_name="/generate")
        deadline = time.monotonic() + 60
        task = None
        while time.monotonic() < deadline and task is None:
            task = next((t for t in self.api.tasks()[before:] if t["pid"]), None)
            time.sleep(0.005)
        killed = ""
        if task is not None:
            time.sleep(max(0.0, task["granted_at"] + after_s - self.api.server.state.now()))
            if self.api.tasks()[before]["released_at"] is None:
                os.kill(task["pid"], signal.SIGSEGV)
                killed = f"worker {task['pid']} killed {after_s:.2f} s after the grant"
        try:
            _, _, details = job.result(timeout=120)
            seen = f"image: {details}"
        except AppError as err:
            seen = without_links(str(err))
        row = {"phase": self.phase, "request": "worker crash", "preset": preset, "steps": 50,
               "ok": seen.startswith("image"), "seen": seen, **self._task_fields(self.api.tasks()[before:])}
        self.requests.append(row)
        return bool(killed) and seen == ABORTED, seen, killed or "the task ended before the kill"

    @property
    def presets(self) -> list[str]:
        return [item.rpartition("=")[2] for item in self.args.presets.split(",")]

    @property
    def cache_dir(self) -> Path:
        return self.work / "aot-cache"


def without_links(message: str) -> str:
    """spaces' messages end some sentences with a link to a sign-up or billing page; the table keeps the words."""
    return re.sub(r" - https?://\S+", "", message)


def offload_dir(work: Path) -> Path:
    """Where spaces packs the GPU-bound tensors: under --work if its filesystem takes O_DIRECT (spaces writes with
    it; tmpfs refuses it), else spaces' own default under the home directory."""
    target = work / "zerogpu-tensors"
    target.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(target / "probe", os.O_CREAT | os.O_WRONLY | os.O_DIRECT))
        return target
    except OSError as err:
        if err.errno != errno.EINVAL:
            raise
        log(f"{work} does not take O_DIRECT: spaces packs tensors under its default, ~/.zerogpu/tensors")
        return Path.home() / ".zerogpu" / "tensors"
    finally:
        (target / "probe").unlink(missing_ok=True)


def cache_state(cache_dir: Path) -> dict:
    """Each cache entry as a start would judge it (aot.cache.read_cached, against the key in its own manifest),
    and anything else left there (staging directories of a compile that did not finish)."""
    sys.path.insert(0, str(ROOT))
    from aot.cache import read_cached

    state = {"intact": [], "broken": [], "staging": []}
    if not cache_dir.exists():
        return state
    for entry in sorted(p for p in cache_dir.iterdir() if p.is_dir() and p.name != "inductor"):
        manifest = entry / "manifest.json"
        if "." in entry.name:
            state["staging"].append(entry.name)
            continue
        try:
            intact = read_cached(entry, json.loads(manifest.read_text())["key"]) is not None
        except (OSError, ValueError, KeyError):
            intact = False
        state["intact" if intact else "broken"].append(entry.name)
    return state


def gpu_processes() -> list[str]:
    """Each process holding GPU memory, as nvidia-smi lists them ("pid, MiB")."""
    try:
        return subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30, check=True).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return []


def gpu_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30, check=True).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "none"


def print_tables(run: Run) -> None:
    print("\nRequests. GPU seconds: requested = the app's gpu_seconds after spaces' factor (the stand-in kills a task"
          " past it), used = grant to release; 'covered': requested >= used")
    print(f"{'phase':15} {'request':46} {'preset':>10} {'steps':>5} {'ok':>3} {'latency':>8} {'requested':>9} "
          f"{'used':>6} {'covered':>7}")
    for r in run.requests:
        used = r.get("used_s")
        covered = "-" if used is None else "yes" if r["requested_s"] >= used else "NO"
        latency, requested, used = ("-" if c is None else c for c in [r.get("latency_s"), r.get("requested_s"), used])
        ok = "yes" if r["ok"] else "no"
        print(f"{r['phase']:15} {r['request'][:46]:46} {r['preset']:>10} {r['steps']:>5} {ok:>3} "
              f"{latency!s:>8} {requested!s:>9} {used!s:>6} {covered:>7}")
    print("\nStarts")
    for name, p in run.phases.items():
        print(f"{name:15} ready {p['ready_s']} s, {p.get('compile')} ({p.get('compile_source')}), "
              f"compile {p.get('compile_seconds')} s")
    print("\nFaults")
    print(f"| {'fault':45} | exercised | {'what the user saw':80} | served next request |")
    print(f"|{'-' * 47}|-----------|{'-' * 82}|---------------------|")
    for f in run.faults:
        print(f"| {f['fault'][:45]:45} | {'yes' if f['exercised'] else 'NO':9} | {f['user_saw'][:80]:80} "
              f"| {'yes' if f['served_next'] else 'NO':19} |")
    for f in run.faults:
        if f.get("detail"):
            print(f"  {f['fault']}: {f['detail']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="logs and the JSON (small files only)")
    parser.add_argument("--work", default="/tmp/zerogpu-e2e", help="the model, the caches, spaces' packed tensors")
    parser.add_argument("--layers", default="2,4", help="double,single transformer blocks of the FLUX-shaped model")
    parser.add_argument("--model-id", help="serve this MODEL_ID instead of the FLUX-shaped model (e.g. tiny)")
    parser.add_argument("--presets", default="square=1024x1024,landscape=1216x832")
    parser.add_argument("--kill-compile-at", type=float, default=30.0,
                        help="seconds into the startup compile task at which the stand-in kills it")
    parser.add_argument("--budget", type=float, default=470, help="seconds; the warm phase is skipped past it")
    parser.add_argument("--phases", default="killed-compile,cold,warm")
    parser.add_argument("--card", default="NVIDIA RTX PRO 6000 Blackwell Server Edition",
                        help="the card spaces configures itself for (spaces/zero/configs.json)")
    parser.add_argument("--fail-fp8-rows", action="store_true",
                        help="fp8 per-row scales fail in the probe, as on sm_120")
    args = parser.parse_args()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    if args.model_id:
        model_id, model = args.model_id, {"model_id": args.model_id}
    else:
        double, single = (int(n) for n in args.layers.split(","))
        log(f"building the FLUX-shaped model ({double} double, {single} single blocks) in {work / 'model'}")
        model = build_model(work / "model", double, single)
        model_id = str(work / "model")
        log(f"model: {model}")
    phases = args.phases.split(",")
    with StandIn() as api:
        run = Run(args, model_id, api)
        shutil.rmtree(run.cache_dir, ignore_errors=True)
        shutil.rmtree(work / "inductor-killed-compile", ignore_errors=True)
        try:
            if "killed-compile" in phases:
                run.killed_compile()
            if "cold" in phases:
                run.cold()
            if "warm" in phases:
                needed = (run.phases.get("cold", {}).get("ready_s") or 120) * 0.6 + 30
                if run.left() > needed:
                    run.warm()
                else:
                    run.phases["warm"] = {"ready": False, "ready_s": None, "skipped": f"{run.left():.0f} s left"}
        finally:
            run.stop()
    print_tables(run)
    passed = [f["exercised"] and f["served_next"] and f.get("cache_ok", True) for f in run.faults]
    result = {"gpu": gpu_name(), "model": model, "presets": args.presets,
              "wall_s": round(time.monotonic() - PROCESS_START, 1),
              "ready_s": {name: p.get("ready_s") for name, p in run.phases.items()}, "phases": run.phases,
              "faults": [{k: v for k, v in f.items() if k != "next_request"} | {"next_request": {
                  k: (f.get("next_request") or {}).get(k) for k in ("ok", "latency_s", "requested_s", "used_s",
                                                                      "new_worker")}} for f in run.faults],
              "requests": run.requests, "all_faults_exercised_and_served_next": bool(passed) and all(passed),
              "all_requests_covered": all(r["requested_s"] >= r["used_s"] for r in run.requests
                                          if r.get("used_s") is not None and r.get("ok")),
              "card": args.card, "fail_fp8_rows": args.fail_fp8_rows,
              "device_api_calls": len(run.api.calls())}
    (out / "zerogpu_e2e.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
