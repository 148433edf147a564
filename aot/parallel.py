"""Several GPUs: one image split across ranks by diffusers' context parallelism, and the lockstep serving that
keeps every rank on the same request.

Launch: `python -m aot.parallel --nproc-per-node N app.py` (below), or `torchrun --nproc-per-node N app.py`.
Each rank loads the whole pipeline on its own GPU. diffusers' engine (`ContextParallelConfig` and
`enable_parallelism`, driven by the transformer's own `_cp_plan`) splits every transformer call's tokens across
the ranks and exchanges them inside attention (Ulysses: all-to-all of q/k/v and the output; ring: the keys and
values go round). Rank 0 runs the one Gradio server. For each request it sends the arguments to the other ranks
(`broadcast_object_list` on a CPU "gloo" group) and then runs the pipeline with them; the other ranks wait for
requests in `Ranks.follow` and run the same call, so the collectives inside attention line up step by step.

A lost rank never leaves a request hanging. Every rank beats a counter in the launch's TCP store every
HEARTBEAT_S seconds from a separate connection and thread. Rank 0 watches the others: a rank whose counter
stands still for LOST_AFTER_S seconds is lost, whether its process exited or hangs, even when rank 0 itself is
stuck inside a collective that will never finish (torch's NCCL watchdog acts only at its timeout,
10 minutes). The request then fails at once with a message naming the rank. Rank 0 runs each request on a
daemon thread and only waits for it, so it is never stuck: it keeps serving the page, and /status and every
later request show the error. The other ranks leave when rank 0 is lost or says the group failed. A group that
lost a rank cannot make images until it is restarted. torchrun stops every rank as soon as one exits (its
agent, with the default `--max-restarts 0`), which takes the page down too; the launcher here leaves rank 0
serving.
"""
from __future__ import annotations

import argparse
import atexit
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, wait
from datetime import timedelta
from typing import TYPE_CHECKING, NoReturn

import torch
import torch.distributed as dist

from aot.families import Text
from aot.report import Decision

if TYPE_CHECKING:
    from aot.model import Model
    from aot.report import Report
    from settings import Settings

log = logging.getLogger("aot-space")

ENGINE = "diffusers context parallelism"
HEARTBEAT_S = 0.5  # how often each rank beats its counter
LOST_AFTER_S = 5.0  # while serving: a rank whose counter stands still this long is lost
STARTUP_LOST_AFTER_S = 120.0  # while loading: lenient, a rank reading 30 GB of weights may stall its threads
REQUEST_TIMEOUT = timedelta(days=3650)  # the followers' wait for rank 0's next request: idle is not an error
# Why AoT is off under context parallelism. torch.export and AOTInductor do carry diffusers' collectives (the
# tiny FLUX transformer compiled on two CPU ranks, README "Several GPUs"), but each rank's program bakes in its
# rank, the mesh and the process group's name, none of which the program cache key covers, and an AOT program
# only runs where its process group exists under the same name. So the ranks run eagerly.
EAGER_REASON = ("off under context parallelism: each rank's AoT program would bake in its rank and process "
                "group, which the program cache key does not cover, so the ranks run eagerly")
EAGER = Decision("none", EAGER_REASON, fell_back=True)  # the compile decision under context parallelism


class RankLost(RuntimeError):
    """The group of ranks can no longer make images: one was lost, or a request failed on one of them."""


def check_settings(settings: Settings) -> None:
    """Settings that conflict with several ranks stop startup with a message, before anything is loaded (`join`)."""
    launch = "launch with `python -m aot.parallel --nproc-per-node N app.py` (README: Several GPUs)"
    if settings.world_size == 1:
        if settings.parallel in ("ulysses", "ring"):
            raise ValueError(f"PARALLEL={settings.parallel} needs several ranks, but this is one process; {launch}")
        return
    if settings.parallel == "off":
        raise ValueError(f"launched as {settings.world_size} ranks (WORLD_SIZE) but PARALLEL=off: every rank would "
                         "serve alone on the same port; start one process (`python app.py`) or unset PARALLEL")
    needs_compile = {"COMPILE=aoti": settings.compile == "aoti", "DYNAMIC_SHAPES=1": settings.dynamic_shapes,
                     "AOT_HUB_REPO": settings.hub_repo is not None}
    for name, given in needs_compile.items():
        if given:
            raise ValueError(f"{name} needs AoT compilation, which is {EAGER_REASON}; unset it, or run one process")
    if settings.quantization == "fp8":
        raise ValueError("QUANTIZATION=fp8 runs eagerly under context parallelism, 3x slower than bf16 "
                         "(benchmarks/RESULTS.md); use QUANTIZATION=auto or none")


def uneven_splits(model: Model, mode: str, n: int) -> list[str]:
    """What `n` ranks cannot split evenly. diffusers' "anything" mode then splits them unevenly (its
    ulysses_anything / ring_anything), with an extra exchange of the piece sizes per attention call."""
    family = model.family
    heads = getattr(model.pipe.transformer.config, "num_attention_heads", None)
    uneven = []
    if mode == "ulysses" and (heads is None or heads % n):  # Ulysses gives each rank heads / n heads
        uneven.append(f"{heads} attention heads")
    uneven += [f"{p.name}: {family.tokens(p)} image tokens" for p in model.presets if family.tokens(p) % n]
    if family.text is Text.DYNAMIC:
        uneven.append("text tokens: as many as the prompt has")
    elif model.defaults.max_sequence_length % n:
        uneven.append(f"{model.defaults.max_sequence_length} text tokens")
    return uneven


def _beat_key(prefix: str, rank: int) -> str:
    return f"{prefix}/beat/{rank}"


class Ranks:
    """This process's place in a multi-rank launch, the lockstep request channel and the watchdog."""

    def __init__(self, settings: Settings):
        self.rank = int(os.environ["RANK"])
        self.world_size = settings.world_size
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        self.mode = "ulysses" if settings.parallel == "auto" else settings.parallel
        self.failure: str | None = None  # why the group cannot make images any more
        self.report: Report | None = None
        self.lost_after = STARTUP_LOST_AFTER_S
        self._serving = False
        self._told = False  # this rank wrote the group's "failed" key: its own watchdog need not act on it
        self._lock = threading.Lock()  # one request at a time: two would interleave their collectives
        # one store namespace per launch attempt: torchrun --max-restarts keeps its store across restarts
        self._prefix = f"aot-parallel/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        # CPU tensors go through gloo on every group: diffusers' "anything" mode exchanges its split sizes on the
        # CPU when the backend names one (_modeling_parallel.gather_size_by_comm), else on the accelerator
        if torch.cuda.is_available():
            self.backend, self.device = "cpu:gloo,cuda:nccl", torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
            # A collective that outlives the process group's timeout aborts its communicator (2) instead of
            # killing the process (torch's default), so that rank 0 keeps serving its page with the error.
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
        else:
            self.backend, self.device = "cpu:gloo", torch.device("cpu")
        dist.init_process_group(self.backend, device_id=self.device if self.device.type == "cuda" else None)
        self.control = dist.new_group(backend="gloo", timeout=REQUEST_TIMEOUT)  # requests, on the CPU
        # the launch's store (rank 0's, or torchrun's agent's), through two connections of this process's own
        self._store, watch_store = (dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                                  is_master=False, timeout=timedelta(seconds=LOST_AFTER_S))
                                    for _ in range(2))
        threading.Thread(target=self._watch, args=(watch_store,), name="aot-parallel-watchdog", daemon=True).start()
        if self.rank == 0:
            atexit.register(self.close)
        log.info("rank %d of %d (pid %d, %s, %s) joined", self.rank, self.world_size, os.getpid(), self.backend,
                 self.device)

    # -- startup ------------------------------------------------------------------------------------------------
    def enable_(self, model: Model, report: Report) -> None:
        """Splits the transformer across the ranks with diffusers' engine, checks it with one step on every rank,
        and records the engine, the degree and the world size in the report."""
        transformer = model.pipe.transformer
        name = type(transformer).__name__
        if getattr(transformer, "_cp_plan", None) is None:
            raise SystemExit(f"{name} has no context-parallel plan (`_cp_plan`) in this diffusers: the "
                             f"{model.family.name} family cannot be split across ranks; run one process")
        self.lost_after, self._serving = STARTUP_LOST_AFTER_S, False
        uneven = uneven_splits(model, self.mode, self.world_size)
        from diffusers import ContextParallelConfig

        degree = {"ulysses_degree": self.world_size} if self.mode == "ulysses" else {"ring_degree": self.world_size}
        config = ContextParallelConfig(**degree, **{f"{self.mode}_anything": bool(uneven)})
        try:
            transformer.enable_parallelism(config=config)
        except Exception as err:  # noqa: BLE001 - the engine's own refusal, said as it is
            hint = (" (diffusers places rank r on accelerator r % torch.accelerator.device_count(), and this "
                    "machine has no accelerator: context parallelism needs one GPU per rank)"
                    if isinstance(err, ZeroDivisionError) else "")
            raise SystemExit(f"{ENGINE} refused rank {self.rank}: {type(err).__name__}: {err}{hint}") from None
        report.parallel = {
            "engine": f"{ENGINE} (ContextParallelConfig, {name}._cp_plan)",
            "mode": self.mode, "ring_degree": config.ring_degree, "ulysses_degree": config.ulysses_degree,
            "anything": bool(uneven), "uneven": uneven, "world_size": self.world_size, "backend": self.backend,
            "launcher": "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else "aot.parallel",
            "lost_after_s": LOST_AFTER_S, "error": None,
        }
        self.report = report
        preset = min(model.presets, key=lambda p: p.width * p.height)
        try:  # the same seeded call on every rank: the engine runs here with this attention backend and split
            with torch.inference_mode():
                latents = model("a test image", preset, steps=1, output_type="latent",
                                generator=torch.Generator("cpu").manual_seed(0)).images
            if not torch.isfinite(latents).all():
                raise RuntimeError("non-finite output")
        except Exception as err:  # noqa: BLE001 - stop every rank with the engine's message
            message = f"{ENGINE} failed its test step on rank {self.rank}: {type(err).__name__}: {err}"
            if self.mode == "ring":
                message += (" (ring attention needs an attention backend that returns the log-sum-exp, e.g. "
                            "ATTENTION=_native_cudnn or _flash_3_hub; sdpa does not)")
            self._tell(message)
            raise SystemExit(message) from None
        dist.barrier(group=self.control)  # every rank is loaded and checked: from now on a silent rank is lost
        self.lost_after, self._serving = LOST_AFTER_S, True
        log.info("%s: %s", ENGINE, describe(report.parallel))

    # -- serving ------------------------------------------------------------------------------------------------
    def run(self, fn: Callable, **request):
        """Rank 0: sends `request` to every rank and runs `fn(**request)` with them. Returns fn's result, or
        raises RankLost within about LOST_AFTER_S seconds of a rank being lost."""
        with self._lock:
            return self._run(fn, request)

    def _run(self, fn: Callable, request: dict):
        if self.failure:
            raise RankLost(self.failure)
        future: Future = Future()

        def lockstep():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)  # the current device is per thread
            try:
                dist.broadcast_object_list([request], src=0, group=self.control)
                future.set_result(fn(**request))
            except BaseException as err:  # noqa: BLE001 - handed to the waiting request
                future.set_exception(err)

        # A daemon thread, waited on, not joined: a collective stuck on a lost rank cannot hold the request or
        # the process's exit.
        threading.Thread(target=lockstep, name="aot-parallel-request", daemon=True).start()
        while not wait([future], timeout=0.05).done:
            if self.failure:
                raise RankLost(self.failure)
        err = future.exception()
        if err is None:
            return future.result()
        # A collective fails at once when a peer's connection drops (gloo); give the watchdog time to name the rank.
        deadline = time.monotonic() + self.lost_after + 2 * HEARTBEAT_S
        while self.failure is None and time.monotonic() < deadline:
            time.sleep(HEARTBEAT_S / 2)
        self._fail(self.failure or f"the request failed on rank 0 ({type(err).__name__}: {err}), which leaves the "
                                   "ranks out of step")
        raise RankLost(self.failure) from err

    def follow(self, fn: Callable) -> NoReturn:
        """Ranks 1..N-1: runs `fn(**request)` for each of rank 0's requests, in lockstep, until rank 0 is gone."""
        log.info("rank %d of %d follows rank 0's requests", self.rank, self.world_size)
        count = 0
        while True:
            box = [None]
            try:
                dist.broadcast_object_list(box, src=0, group=self.control)
            except Exception as err:  # noqa: BLE001 - rank 0 exited: nothing left to follow
                self._leave(f"rank 0 is gone ({type(err).__name__}: {err})")
            if box[0] is None:
                self._leave("rank 0 closed the group", code=0)
            count += 1
            log.info("rank %d: request %d (%s)", self.rank, count,
                     ", ".join(f"{k}={v!r}" for k, v in box[0].items() if k != "prompt"))
            try:
                fn(**box[0])
            except BaseException as err:  # out of step with rank 0 now: leave and tell it why
                log.exception("rank %d: the request failed", self.rank)
                self._leave(f"the request failed on rank {self.rank} ({type(err).__name__}: {err})", tell=True)

    def close(self) -> None:
        """Rank 0 at exit: lets the other ranks leave cleanly."""
        if self.rank == 0 and self._serving and self.failure is None:
            try:
                dist.broadcast_object_list([None], src=0, group=self.control)
            except Exception as err:  # noqa: BLE001 - they leave anyway once rank 0 is gone
                log.info("rank 0 could not close the group (%s: %s)", type(err).__name__, err)

    # -- failure ------------------------------------------------------------------------------------------------
    def _fail(self, message: str) -> None:
        """Rank 0, serving: the group is broken for good; the page stays up and shows why."""
        if self.failure is None:
            self.failure = (f"{message}. The {self.world_size} ranks can no longer make images; restart the "
                            "server")
            log.error("%s: %s", ENGINE, self.failure)
            if self.report is not None:
                self.report.parallel["error"] = self.failure
                self.report.fallback("parallel", self.failure)
            self._tell(message)  # the other ranks leave

    def _tell(self, message: str) -> None:
        """Writes the group's "failed" key, which makes every other rank leave (or rank 0 show the error)."""
        self._told = True
        try:
            self._store.set(f"{self._prefix}/failed", message)
        except Exception as err:  # noqa: BLE001 - the store's host is gone: the others find out by themselves
            log.warning("rank %d could not tell the others (%s: %s)", self.rank, type(err).__name__, err)

    def _leave(self, message: str, code: int = 1, tell: bool = False) -> NoReturn:
        log.log(logging.INFO if code == 0 else logging.ERROR, "rank %d leaves: %s", self.rank, message)
        if tell:
            self._tell(message)
        logging.shutdown()
        os._exit(code)  # not sys.exit: a collective stuck on a lost rank would hold an orderly exit

    def _lost(self, message: str) -> None:
        if self.rank == 0 and self._serving:
            self._fail(message)
        else:  # a follower, or anyone before serving: nothing to show, so stop (the launcher reports the exit)
            self._leave(message)

    def _watch(self, store) -> None:
        """The watchdog thread: beats this rank's counter and watches the others' (rank 0 watches all, the
        others watch rank 0), and the group's "failed" key."""
        watched = [r for r in range(self.world_size) if r != self.rank] if self.rank == 0 else [0]
        last = {r: (-1, time.monotonic()) for r in watched}
        while self.failure is None:
            now = time.monotonic()
            try:
                store.add(_beat_key(self._prefix, self.rank), 1)
                if not self._told and store.check([f"{self._prefix}/failed"]):
                    failed = store.get(f"{self._prefix}/failed").decode()
                    self._lost(f"another rank stopped the group: {failed}")
                    return
                for r in watched:
                    beats = store.add(_beat_key(self._prefix, r), 0)
                    if beats != last[r][0]:
                        last[r] = (beats, now)
                    elif now - last[r][1] > self.lost_after:
                        self._lost(f"rank {r} of {self.world_size} stopped answering for {self.lost_after:.0f} s "
                                   "(its process exited or hangs)")
                        return
            except Exception as err:  # noqa: BLE001 - the store lives with rank 0 (or torchrun's agent)
                self._lost(f"rank {self.rank} lost the launch's store ({type(err).__name__}: {err})")
                return
            time.sleep(HEARTBEAT_S)


def join(settings: Settings) -> Ranks | None:
    """Checks the settings against the launch (`check_settings`), then joins the launch's process group when this
    process is one of several ranks (WORLD_SIZE > 1); else None, and nothing else here runs."""
    check_settings(settings)
    return Ranks(settings) if settings.world_size > 1 else None


def describe(parallel: dict) -> str:
    """One line for the status panel."""
    text = (f"{parallel['engine']}: {parallel['mode']}, degree ring {parallel['ring_degree']} x Ulysses "
            f"{parallel['ulysses_degree']}, world size {parallel['world_size']} ({parallel['backend']})")
    if parallel["anything"]:
        text += f"; uneven splits padded ({'; '.join(parallel['uneven'])})"
    if parallel.get("error"):
        text += f". **Error:** {parallel['error']}"
    return text


# -- the launcher ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    """`python -m aot.parallel --nproc-per-node N app.py [args]`: starts N ranks of one host with torchrun's
    environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Unlike torchrun it leaves rank 0
    running when another rank exits, so the page stays up and shows the error; when rank 0 exits, or on Ctrl-C,
    it stops the others and returns rank 0's exit status."""
    parser = argparse.ArgumentParser(prog="python -m aot.parallel", description=main.__doc__)
    parser.add_argument("--nproc-per-node", type=int, required=True)
    parser.add_argument("script")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.nproc_per_node < 1:
        parser.error("--nproc-per-node must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    n, port = args.nproc_per_node, _free_port()
    procs = []
    for rank in range(n):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(n),
               "LOCAL_WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, args.script, *args.args], env=env))
        log.info("launcher: rank %d is pid %d", rank, procs[-1].pid)

    def stop(*_):
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.send_signal(signal.SIGCONT)  # a stopped process acts on SIGTERM only once continued
        deadline = time.monotonic() + 10
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    signal.signal(signal.SIGTERM, lambda *_: (stop(), sys.exit(143)))
    reported = set()
    try:
        while procs[0].poll() is None:
            for rank, proc in enumerate(procs[1:], 1):
                if proc.poll() is not None and rank not in reported:
                    reported.add(rank)
                    log.error("launcher: rank %d exited with status %d; rank 0 keeps serving and reports it",
                              rank, proc.returncode)
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    stop()
    return procs[0].returncode if procs[0].returncode is not None else 1


if __name__ == "__main__":
    raise SystemExit(main())
