"""Who evaluates a study's candidates: this process (one worker), or local worker processes.

The study's process keeps the optimizer and is the study folder's one writer; it hands
each candidate to a free worker and takes results back in whatever order they finish,
so no worker waits for another (nor for a generation). A worker is a process started
by a fork server (a clean process that imported torch once, so no torch state of the study's
process is forked; ``spawn`` where there is no fork server) that loads the models once into its own
``ResidentModel``, with ``threads`` torch threads (the cores shared out between the
workers: two unpinned torch processes on two cores run many times slower), and then
evaluates one task at a time.

Why a parent that owns the optimizer rather than workers sharing an optuna storage:
the trace stays a function of the seed and the order results come back (with one worker,
exactly today's trace), every optimizer in the registry works unchanged (the default's
CMA-ES and EvoPress are not optuna samplers), and ``trials.jsonl`` keeps one writer, so a
kill can tear at most its last line.

A worker that dies mid-task (killed, out of memory) is noticed by its process sentinel:
its task comes back as a failed trial and a new worker takes its place.
"""

from __future__ import annotations

import multiprocessing
import traceback
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any

from .optimizers import SearchError


@dataclass
class Task:
    """One candidate to evaluate: its trial number, params, decoded recipe and how (``level``, ``promote``)."""

    number: int
    params: dict
    recipe: dict
    level: str | None = None  # "screen" | "full" | None (the spec's evaluation); see splice.search.fidelity
    promote: Any = None  # with fidelity: the screen value a candidate must reach to be re-scored in the same task


class InlinePool:
    """One worker: this process evaluates each task when its result is asked for (today's single-process path)."""

    size = 1

    def __init__(self, evaluator):
        self.evaluator = evaluator
        self.queue: deque[Task] = deque()

    def free(self) -> int:
        return 1 - len(self.queue)

    def busy(self) -> int:
        return len(self.queue)

    def submit(self, task: Task) -> None:
        self.queue.append(task)

    def result(self) -> tuple[Task, dict]:
        task = self.queue.popleft()
        return task, self.evaluator.run(task)

    def close(self) -> None:
        pass


def _worker_main(conn, models: dict) -> None:
    """A worker process: load the models (``models``), take the scoring set-up, then answer tasks until told to stop (None)."""
    import torch

    torch.set_num_threads(models["threads"])
    from .evaluate import Evaluator
    from .resident import ResidentModel

    try:
        resident = ResidentModel(models["base"], models["models"], threads=models["threads"], batch_size=models["batch_size"])
        ev = Evaluator.from_setup(resident, conn.recv())
    except EOFError:
        return
    except BaseException as e:  # noqa: BLE001 - reported to the study's process, which stops the study with it
        conn.send(("crash", None, f"worker set-up failed: {e}"))
        return
    while True:
        try:
            task = conn.recv()
        except EOFError:
            break
        if task is None:
            break
        try:
            conn.send(("ok", task.number, ev.run(task)))
        except BaseException as e:  # noqa: BLE001
            conn.send(("crash", task.number, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}"))
            break
    ev.close()


PRELOAD = ["splice.search.evaluate", "splice.search.resident"]  # imported once by the fork server (torch, transformers)


def _context():
    """``forkserver`` where there is one (a clean server process imports torch once; each worker forks from it), else ``spawn``."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        return ctx
    return multiprocessing.get_context("spawn")


class ProcessPool:
    """``size`` worker processes, fed one task at a time each.

    The workers start loading their models at once (``models``: base, other models, torch threads,
    batch size), while the study's process sets itself up; ``configure`` then gives them what
    scoring needs (windows, references). A dead worker's place is filled when a task needs it.
    """

    def __init__(self, size: int, models: dict):
        self.size = size
        self.models = models
        self.setup: dict | None = None
        self.ctx = _context()
        self.workers: list[dict] = []  # {"proc", "conn", "task"}
        self.done: deque[tuple[Task, dict]] = deque()
        try:
            for _ in range(size):
                self.workers.append(self._start())
        except BaseException:
            self.close()
            raise

    def configure(self, setup: dict) -> None:
        self.setup = setup
        for w in self.workers:
            w["conn"].send(setup)

    def _start(self) -> dict:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=_worker_main, args=(child, self.models), daemon=True)
        proc.start()
        child.close()
        if self.setup is not None:
            parent.send(self.setup)
        return {"proc": proc, "conn": parent, "task": None}

    def free(self) -> int:
        return self.size - sum(w["task"] is not None for w in self.workers)

    def busy(self) -> int:
        return sum(w["task"] is not None for w in self.workers) + len(self.done)

    def submit(self, task: Task) -> None:
        idle = [w for w in self.workers if w["task"] is None]
        if not idle:  # a dead worker's place
            self.workers.append(self._start())
            idle = self.workers[-1:]
        w = idle[0]
        w["task"] = task
        w["conn"].send(task)

    def result(self) -> tuple[Task, dict]:
        """The next finished task (in the order they finish); a dead worker's task as a failed result."""
        while not self.done:
            if not any(w["task"] is not None for w in self.workers):
                raise SearchError("internal: a result was asked for with no task out")
            waits = {}
            for w in self.workers:
                waits[w["conn"]] = w
                waits[w["proc"].sentinel] = w
            for ready in wait(list(waits)):
                w = waits[ready]
                if w not in self.workers:
                    continue
                if ready is w["conn"]:
                    try:
                        kind, _, payload = w["conn"].recv()
                    except (EOFError, OSError):
                        self._died(w)
                        continue
                    if kind == "crash":
                        raise SearchError(f"a search worker stopped: {payload.strip().splitlines()[0]}")
                    self.done.append((w["task"], payload))
                    w["task"] = None
                elif not w["conn"].poll():  # dead, with no last message left to read
                    self._died(w)
        return self.done.popleft()

    def _died(self, w: dict) -> None:
        task = w["task"]
        w["proc"].join(timeout=1)
        code = w["proc"].exitcode
        self.workers.remove(w)
        w["conn"].close()
        if task is not None:
            self.done.append((task, {"failed": f"its worker process died while evaluating it (exit code {code})"}))

    def close(self) -> None:
        for w in self.workers:
            try:
                w["conn"].send(None)
            except (OSError, ValueError):
                pass
        for w in self.workers:
            w["proc"].join(timeout=5)
            if w["proc"].is_alive():
                w["proc"].terminate()
                w["proc"].join(timeout=5)
            w["conn"].close()
        self.workers = []


class RayWorker:
    """A worker as a Ray actor: the same evaluator a local worker process runs, on whichever node Ray places it."""

    def __init__(self, models: dict):
        import torch

        from .resident import ResidentModel

        torch.set_num_threads(models["threads"])
        self.resident = ResidentModel(models["base"], models["models"], threads=models["threads"], batch_size=models["batch_size"])
        self.ev = None

    def configure(self, setup: dict) -> bool:
        from .evaluate import Evaluator

        self.ev = Evaluator.from_setup(self.resident, setup)
        return True

    def run(self, task: Task) -> dict:
        return self.ev.run(task)


def _ray():
    try:
        import ray
    except ImportError:
        raise SearchError("--ray needs the ray package (pip install ray; checked with 2.58.0)") from None
    return ray


class RayPool:
    """``size`` Ray actors (``RayWorker``), each asking Ray for ``threads`` CPUs, fed one task at a time each.

    ``address``: ``auto`` (a cluster running on this machine, else a new local Ray instance)
    or a cluster's address (``ray://host:10001``, ``host:6379``). Every node needs splice
    installed and the models and text at the same paths. An actor that dies mid-task (its
    node lost, killed) gives a failed trial, and a new actor takes its place.
    """

    def __init__(self, size: int, models: dict, address: str):
        ray = _ray()
        self.ray = ray
        self.size = size
        self.models = models
        self.setup: dict | None = None
        if not ray.is_initialized():
            env = {"env_vars": {"OMP_NUM_THREADS": str(models["threads"])}}
            try:
                ray.init(address=None if address == "auto" else address, runtime_env=env, log_to_driver=False, include_dashboard=False)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise SearchError(f"--ray {address}: cannot connect to a Ray cluster ({e})") from None
            self.started = True
        else:
            self.started = False
        self.actor_cls = ray.remote(num_cpus=models["threads"], max_restarts=0)(RayWorker)
        self.actors: list[dict] = [self._start() for _ in range(size)]
        self.done: deque[tuple[Task, dict]] = deque()

    def _start(self) -> dict:
        a = self.actor_cls.remote(self.models)
        if self.setup is not None:
            a.configure.remote(self.setup)
        return {"actor": a, "task": None, "ref": None}

    def configure(self, setup: dict) -> None:
        self.setup = setup
        for w in self.actors:
            w["actor"].configure.remote(setup)  # actors run their calls in order: configure before any task

    def free(self) -> int:
        return self.size - sum(w["task"] is not None for w in self.actors)

    def busy(self) -> int:
        return sum(w["task"] is not None for w in self.actors) + len(self.done)

    def submit(self, task: Task) -> None:
        idle = [w for w in self.actors if w["task"] is None]
        if not idle:
            self.actors.append(self._start())
            idle = self.actors[-1:]
        w = idle[0]
        w["task"], w["ref"] = task, w["actor"].run.remote(task)

    def result(self) -> tuple[Task, dict]:
        ray = self.ray
        while not self.done:
            out = {w["ref"]: w for w in self.actors if w["ref"] is not None}
            if not out:
                raise SearchError("internal: a result was asked for with no task out")
            ready, _ = ray.wait(list(out), num_returns=1)
            w = out[ready[0]]
            task = w["task"]
            try:
                res = ray.get(ready[0])
            except ray.exceptions.RayActorError as e:
                self.actors.remove(w)
                res = {"failed": f"its Ray actor died while evaluating it ({type(e).__name__})"}
            except ray.exceptions.RayTaskError as e:
                raise SearchError(f"a search worker stopped: {str(e).strip().splitlines()[-1]}") from None
            else:
                w["task"], w["ref"] = None, None
            self.done.append((task, res))
        return self.done.popleft()

    def close(self) -> None:
        for w in self.actors:
            try:
                self.ray.kill(w["actor"])
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors = []
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()
            self.started = False
