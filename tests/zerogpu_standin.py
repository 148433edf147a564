"""A stand-in for ZeroGPU's device API, so that `spaces` runs its real ZeroGPU code path on any machine.

With `SPACES_ZERO_GPU=true` and `SPACES_ZERO_DEVICE_API_URL` pointing here, `spaces` patches torch in the main
process (no CUDA there; tensors bound for the GPU are packed), and every `@spaces.GPU` call asks this server for
a GPU, then runs in a forked worker that gets it. The endpoints, as `spaces` 0.51 calls them (zero/api.py):

  POST /startup-report                       200
  POST /schedule?cgroupPath&taskId&enableQueue&durationSeconds&tokenVersion[&token][&gpuSize]
      200 JSON {idle, nvidiaIndex, nvidiaUUID, allowToken}   the GPU is granted
      429 JSON {left, wait} + X-Approve-Result                a quota answer
      503                                                     no GPU
      200 text/event-stream: "ping" events, then "succeeded" (data: the grant) or "failed"   queued
  POST /allow?allowToken&pid                 200 (the worker process that got the GPU)
  POST /release?allowToken&fail              200; 404 for a task this server ended (spaces allows that 404
                                             after a worker died mid-task)
  GET  /queue-size                           a number

Like ZeroGPU, it ends a task at its duration: it kills the task's worker with SIGKILL once durationSeconds
have passed since the grant. A new worker names its pid in /allow; a reused one (spaces reuses a live worker of
the same function when the grant says "idle") does not call /allow, so its task inherits the pid last allowed
for the same taskId. The next answers are scripted between requests (an answer is used once; with none
left, the GPU is granted):

  POST /script   a JSON list of answers, appended, e.g.
      {"answer": "grant"}                         optional "duration": seconds to enforce instead of the
                                                  requested ones (a task killed mid-run); "idle": false;
                                                  "allow_delay": seconds /allow waits before answering (on a
                                                  machine without a GPU a worker fails at CUDA init right after
                                                  /allow: this keeps it alive for a duration or a crash to end)
      {"answer": "quota", "left": 0, "wait": 60}  "wait" < 0 is the "illegal duration" answer
      {"answer": "no-gpu"}
      {"answer": "queue", "seconds": 3}           then granted; "then": "failed" ends the queue without a GPU
  GET  /calls    every call so far: method, path, parameters, the status answered, seconds since start
  GET  /tasks    every grant: requested and enforced seconds, pid, and seconds from grant and from allow to
                 release (what the task used), whether it failed or was killed
  POST /reset    forget calls, tasks and script

    python tests/zerogpu_standin.py --port 8800     # or: with StandIn() as api: ... api.url

Standard library only. The grant names the machine's first GPU (`nvidia-smi --query-gpu=uuid`), if any.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

ANSWERS = ("grant", "quota", "no-gpu", "queue")
NO_GPU_UUID = "GPU-00000000-0000-0000-0000-000000000000"  # what a grant names on a machine without a GPU
PING_SECONDS = 1.0  # between queue events; spaces parses each received chunk as one event, so they must not merge


def gpu_uuid() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return NO_GPU_UUID
    lines = out.stdout.split()
    return lines[0] if out.returncode == 0 and lines else NO_GPU_UUID


def check_answer(answer: dict) -> dict:
    """A scripted answer, refused at once if malformed (rather than failing a later /schedule)."""
    if not isinstance(answer, dict) or answer.get("answer") not in ANSWERS:
        raise ValueError(f"an answer is an object whose 'answer' is one of {', '.join(ANSWERS)}; got {answer!r}")
    if answer["answer"] == "queue" and answer.get("then", "grant") not in ("grant", "failed"):
        raise ValueError(f"a queue ends with 'then': 'grant' or 'failed'; got {answer!r}")
    for name in ("duration", "seconds", "wait", "left", "allow_delay"):
        if name in answer and not isinstance(answer[name], (int, float)):
            raise ValueError(f"{name} must be a number of seconds; got {answer!r}")
    return answer


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


class State:
    """Everything the server knows, behind one lock: the script, the call log and the tasks."""

    def __init__(self, nvidia_uuid: str):
        self.lock = threading.Lock()
        self.nvidia_uuid = nvidia_uuid
        self.started = time.monotonic()
        self.script: list[dict] = []
        self.calls: list[dict] = []
        self.tasks: dict[str, dict] = {}  # allowToken -> task
        self.worker_pids: dict[str, int] = {}  # taskId -> the pid its worker last named in /allow

    def now(self) -> float:
        return round(time.monotonic() - self.started, 3)

    def next_answer(self) -> dict:
        with self.lock:
            return self.script.pop(0) if self.script else {"answer": "grant"}

    def grant(self, params: dict, answer: dict) -> dict:
        token = uuid.uuid4().hex
        requested = int(params.get("durationSeconds", 60))
        enforced = answer.get("duration", requested)
        idle = bool(answer.get("idle", True))
        task = {"allowToken": token, "taskId": params.get("taskId"), "requested_s": requested, "enforced_s": enforced,
                "granted_at": self.now(), "pid": None, "new_worker": False, "allowed_at": None, "released_at": None,
                "fail": None, "killed": False, "used_s": None, "used_after_allow_s": None,
                "allow_delay": answer.get("allow_delay", 0)}
        with self.lock:
            if idle and _alive(self.worker_pids.get(task["taskId"])):  # that worker runs it without /allow
                task["pid"] = self.worker_pids[task["taskId"]]
            self.tasks[token] = task
        task["timer"] = threading.Timer(enforced, self.end_task, args=(token,))
        task["timer"].daemon = True
        task["timer"].start()
        return {"idle": idle, "nvidiaIndex": 0, "nvidiaUUID": self.nvidia_uuid, "allowToken": token}

    def end_task(self, token: str) -> None:
        """The task's duration is over: kill its worker, as ZeroGPU does, or as soon as it is allowed."""
        with self.lock:
            task = self.tasks[token]
            if task["released_at"] is not None:
                return
            task["killed"] = True
            pid = task["pid"]
        if pid is not None:
            self.kill(task)

    def kill(self, task: dict) -> None:
        try:
            os.kill(task["pid"], signal.SIGKILL)
        except ProcessLookupError:  # already gone
            pass
        task["killed_at"] = self.now()
        task["used_s"] = round(task["killed_at"] - task["granted_at"], 3)

    def allow(self, token: str, pid: int) -> bool:
        with self.lock:
            task = self.tasks.get(token)
            if task is None or task["released_at"] is not None:
                return False
            task["pid"], task["allowed_at"], task["new_worker"] = pid, self.now(), True
            self.worker_pids[task["taskId"]] = pid
            late = task["killed"]
        if late:  # its duration ran out before the worker asked
            self.kill(task)
        return True

    def allow_delay(self, token: str) -> float:
        with self.lock:
            return self.tasks[token]["allow_delay"] if token in self.tasks else 0

    def release(self, token: str, fail: bool) -> bool:
        with self.lock:
            task = self.tasks.get(token)
            if task is None or task["released_at"] is not None or task["killed"]:
                return False  # unknown, or ended here: ZeroGPU answers 404 (spaces allows it after an abort)
            task["timer"].cancel()
            task["released_at"], task["fail"] = self.now(), fail
            task["used_s"] = round(task["released_at"] - task["granted_at"], 3)
            if task["allowed_at"] is not None:
                task["used_after_allow_s"] = round(task["released_at"] - task["allowed_at"], 3)
        return True

    def public_tasks(self) -> list[dict]:
        with self.lock:
            return [{k: v for k, v in task.items() if k != "timer"} for task in self.tasks.values()]


class Handler(BaseHTTPRequestHandler):
    server: StandInServer

    def log_message(self, format, *args):  # the base class's signature; every call is in /calls anyway
        if self.server.verbose:
            super().log_message(format, *args)

    def do_GET(self):
        self._route("GET")

    def do_POST(self):
        self._route("POST")

    def _route(self, method: str) -> None:
        url = urlsplit(self.path)
        params = dict(parse_qsl(url.query))
        state = self.server.state
        call = {"t": state.now(), "method": method, "path": url.path, "params": params, "status": None}
        with state.lock:
            if url.path not in ("/calls", "/tasks"):
                state.calls.append(call)
        route = {("POST", "/startup-report"): self._startup_report, ("POST", "/schedule"): self._schedule,
                 ("POST", "/allow"): self._allow, ("POST", "/release"): self._release,
                 ("GET", "/queue-size"): self._queue_size, ("POST", "/script"): self._script,
                 ("GET", "/calls"): self._calls, ("GET", "/tasks"): self._tasks, ("POST", "/reset"): self._reset}
        handler = route.get((method, url.path))
        if handler is None:
            call["status"] = self._json(404, {"detail": f"no {method} {url.path}"})
            return
        call["status"] = handler(params, call)

    def _json(self, status: int, body, headers: dict | None = None) -> int:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)
        return status

    def _startup_report(self, params, call):
        return self._json(200, {})

    def _schedule(self, params, call):
        answer = self.server.state.next_answer()
        call["answer"] = answer
        kind = answer["answer"]
        if kind == "no-gpu":
            return self._json(503, {"detail": "no GPU available"})
        if kind == "quota":
            left, wait = answer.get("left", 0), answer.get("wait", 60)
            result = "illegal-duration" if wait < 0 else answer.get("result", "quota-exceeded")
            return self._json(429, {"left": left, "wait": wait}, {"X-Approve-Result": result})
        if kind == "queue":
            return self._queue(params, answer)
        return self._json(200, self.server.state.grant(params, answer))

    def _queue(self, params, answer) -> int:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("X-Queuing-Reason", answer.get("reason", "node"))
        self.end_headers()  # no length: the stream ends when the connection closes
        deadline = time.monotonic() + answer.get("seconds", 3)
        try:
            while time.monotonic() < deadline:
                self._event("event: ping\n\n")
                time.sleep(PING_SECONDS)
            if answer.get("then", "grant") == "failed":
                self._event("event: failed\n\n")
            else:
                grant = self.server.state.grant(params, answer)
                self._event(f"event: succeeded\ndata: {json.dumps(grant)}\n\n")
        except (BrokenPipeError, ConnectionResetError):  # the visitor left the queue
            return 499
        self.close_connection = True
        return 200

    def _event(self, text: str) -> None:
        self.wfile.write(text.encode())
        self.wfile.flush()

    def _allow(self, params, call):
        token = params.get("allowToken", "")
        ok = self.server.state.allow(token, int(params.get("pid", 0)))
        time.sleep(self.server.state.allow_delay(token))
        try:
            return self._json(200 if ok else 404, {})
        except (BrokenPipeError, ConnectionResetError):  # the worker died while waiting
            return 499

    def _release(self, params, call):
        ok = self.server.state.release(params.get("allowToken", ""), params.get("fail") == "true")
        return self._json(200 if ok else 404, {})

    def _queue_size(self, params, call):
        return self._json(200, 0)

    def _script(self, params, call):
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"[]")
            answers = [check_answer(a) for a in (body if isinstance(body, list) else [body])]
        except ValueError as err:
            return self._json(400, {"detail": str(err)})
        with self.server.state.lock:
            self.server.state.script.extend(answers)
            pending = len(self.server.state.script)
        return self._json(200, {"pending": pending})

    def _calls(self, params, call):
        with self.server.state.lock:
            calls = list(self.server.state.calls)
        return self._json(200, calls)

    def _tasks(self, params, call):
        return self._json(200, self.server.state.public_tasks())

    def _reset(self, params, call):
        state = self.server.state
        with state.lock:
            state.script.clear()
            state.calls.clear()
            for task in state.tasks.values():
                task["timer"].cancel()
            state.tasks.clear()
        return self._json(200, {})


class StandInServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, nvidia_uuid: str, verbose: bool = False):
        super().__init__(("127.0.0.1", port), Handler)
        self.state = State(nvidia_uuid)
        self.verbose = verbose


class StandIn:
    """The server in a background thread of this process. `url` is what SPACES_ZERO_DEVICE_API_URL takes."""

    def __init__(self, port: int = 0, nvidia_uuid: str | None = None):
        self.server = StandInServer(port, nvidia_uuid or gpu_uuid())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> StandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def script(self, *answers: dict) -> None:
        with self.server.state.lock:
            self.server.state.script.extend(check_answer(a) for a in answers)

    def unscript(self) -> list[dict]:
        """Drops the answers not used yet, and returns them."""
        with self.server.state.lock:
            left, self.server.state.script[:] = list(self.server.state.script), []
        return left

    def calls(self, path: str | None = None) -> list[dict]:
        with self.server.state.lock:
            return [c for c in self.server.state.calls if path is None or c["path"] == path]

    def tasks(self) -> list[dict]:
        return self.server.state.public_tasks()


def main() -> None:
    parser = argparse.ArgumentParser(description="Stand-in for ZeroGPU's device API (see the module docstring).")
    parser.add_argument("--port", type=int, default=8800)
    parser.add_argument("--uuid", help="the GPU UUID to grant (default: nvidia-smi's first GPU)")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args()
    server = StandInServer(args.port, args.uuid or gpu_uuid(), args.verbose)
    print(f"ZeroGPU stand-in on http://127.0.0.1:{server.server_address[1]} granting {server.state.nvidia_uuid}",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
