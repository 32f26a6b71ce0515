"""Running shard tasks on Ray: one Ray task per shard task, with the contract of `executors.run_tasks`.

The local pool stops at one machine's cores; Ray runs the same per-task function (`process_shard`) on
every core of a cluster, and the same code on a laptop. Only scheduling changes: each task still writes
its own files and its completion record, and only its small report comes back, so the output (names,
records, manifest) is the local pool's. Ray Data writers are not used on purpose: they name files with
random ids and size them by blocks, which would break the deterministic shard contract.

What stays as in `executors.run_tasks` (so that `runner._run` does not know which engine runs it):

- outcomes are values: every task comes out exactly once, with its result or an error (`TaskFailed`,
  `WorkerDied`, `TaskTimedOut`, `Interrupted`), never as an exception here;
- retries are our own, not Ray's `max_retries`: a task whose worker process or node died (or that hung)
  is resubmitted by the driver after `on_retry(task, pid)` has removed what the dead attempt left on
  the shared output, which Ray's internal retries would not let us do; a task that raised is not
  retried (it would only raise again);
- progress reaches the driver through a small actor that the tasks report to (batched, a few messages a
  second per task), which also tells the driver how long each running task has been silent: the
  inactivity timeout, as in the local pool, judged from the task's start, not from its submission;
- a stop (SIGINT / SIGTERM through `StopFlag`) force-cancels the running tasks (`ray.cancel(force=True)`
  kills their worker processes) and reports them, and the tasks never started, as `Interrupted`.

Each task runs in the driver's working directory (relative input paths mean the same on every node that
mounts the shared file system at the same path). Ray is imported only when a run needs it: `vlmtile`
itself starts without it, and `pip install 'vlmtile[ray]'` adds it.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from .errors import VlmtileError
from .executors import (
    INTERRUPTED_RUNNING,
    Interrupted,
    Outcome,
    Progress,
    SupportsIsSet,
    TaskFailed,
    TaskTimedOut,
    WorkerDied,
    never_restarted,
)

T = TypeVar("T")
R = TypeVar("R")

RAY_MISSING = "--executor ray needs Ray, which is not installed: pip install 'vlmtile[ray]'"
POLL_SECONDS = 0.1
"""How long the driver waits for a finished task before it looks at progress, timeouts and the stop flag."""
REPORT_SECONDS = 0.25
"""A task sends its progress at most this often (one actor call), and always before it returns."""
FINAL_REPORT_SECONDS = 30.0
"""How long a task waits for the progress actor to take its last report before it returns anyway."""
CANCEL_GRACE = 10.0
"""Seconds the driver waits for force-cancelled tasks to be reported dead before it gives up on them."""
RESOURCES_SECONDS = 10.0
"""How often the driver re-reads the cluster's CPU count (an autoscaling cluster grows while a run runs)."""


def ray_available() -> bool:
    """Whether `import ray` can work, without importing it (an idle cron rerun never pays for Ray)."""
    try:
        return importlib.util.find_spec("ray") is not None
    except (ImportError, ValueError):
        return False


def require_ray() -> Any:
    """The `ray` module, or a `VlmtileError` saying what to install (never a silent local fallback)."""
    if not ray_available():
        raise VlmtileError(RAY_MISSING)
    try:
        return importlib.import_module("ray")
    except ImportError as e:  # installed, but broken (a missing shared library, a wrong Python)
        raise VlmtileError(f"--executor ray: Ray is installed but cannot be imported: {e}") from None


# -- the task's side (runs in Ray worker processes) ------------------------------------------------------


class _Tracker:
    """The progress actor: sums what tasks report and when each was last heard from.

    Times are taken here, on receipt, so that clocks of other nodes never matter; the driver asks for
    "seconds since each task was last heard from".
    """

    def __init__(self) -> None:
        self._images = 0
        self._tokens = 0
        self._heard: dict[str, float] = {}
        self._workers: dict[str, tuple[int, str]] = {}

    def started(self, key: str, pid: int, node: str) -> None:
        self._heard[key] = time.monotonic()
        self._workers[key] = (pid, node)

    def add(self, key: str, images: int, tokens: int) -> None:
        self._images += images
        self._tokens += tokens
        self._heard[key] = time.monotonic()

    def forget(self, keys: list[str]) -> None:
        for key in keys:
            self._heard.pop(key, None)
            self._workers.pop(key, None)

    def take(self) -> tuple[int, int, dict[str, float], dict[str, tuple[int, str]]]:
        """(images, tokens) since the last call, silence per task (seconds), and each task's worker."""
        images, tokens = self._images, self._tokens
        self._images = self._tokens = 0
        now = time.monotonic()
        return images, tokens, {k: now - t for k, t in self._heard.items()}, dict(self._workers)


class _Reporter:
    """The `progress(images, tokens)` a task gets: batched into a few actor calls a second."""

    def __init__(self, tracker: Any, key: str) -> None:
        self.tracker = tracker
        self.key = key
        self.images = 0
        self.tokens = 0
        self.sent = time.monotonic()

    def __call__(self, images: int, tokens: int) -> None:
        self.images += images
        self.tokens += tokens
        if time.monotonic() - self.sent >= REPORT_SECONDS:
            self.flush()

    def flush(self, wait: bool = False) -> None:
        """Send what was counted since the last call. `wait`: return only once the actor has added it.

        A task's last report is waited for: the driver polls the actor after it sees the task finished,
        and an actor call still in flight then would be lost with the run's last tasks (its calls come
        from other processes, so Ray does not order them before the driver's poll)."""
        if (self.images or self.tokens) and self.tracker is not None:
            with contextlib.suppress(Exception):  # progress is best effort: it never fails a task
                sent = self.tracker.add.remote(self.key, self.images, self.tokens)
                if wait:
                    importlib.import_module("ray").get(sent, timeout=FINAL_REPORT_SECONDS)
            self.images = self.tokens = 0
        self.sent = time.monotonic()


def _run_one(fn: Callable[[T, Progress], R], task: T, key: str, tracker: Any, cwd: str) -> tuple[str, Any]:
    """Body of one Ray task: ("result", value) or ("error", text), like the local pool's worker.

    Exceptions are turned into values here, so that Ray neither retries them nor prints their traceback
    on the driver; only a dead process or node reaches the driver as a Ray error.
    """
    node = socket.gethostname()
    # Waited for: the driver must know the task has started (its timeout counts from here, and its pid
    # names the attempt) before the task can die.
    ray = importlib.import_module("ray")
    if tracker is not None:
        try:
            ray.get(tracker.started.remote(key, os.getpid(), node), timeout=60)
        except Exception:  # noqa: BLE001 - the progress actor is gone: run without progress and timeout
            tracker = None
    try:
        os.chdir(cwd)
    except OSError as e:
        return (
            "error",
            f"the driver's working directory {cwd} is not on node {node} ({e.strerror or e}): mount the "
            "shared file system at the same path on every node, or give absolute paths",
        )
    reporter = _Reporter(tracker, key)
    try:
        result = fn(task, reporter)
    except BaseException as e:  # noqa: BLE001 - any failure is reported as this task's outcome
        reporter.flush(wait=True)
        return ("error", f"{type(e).__name__}: {e}")
    reporter.flush(wait=True)
    return ("result", result)


# -- the driver's side -----------------------------------------------------------------------------------


@contextlib.contextmanager
def connect(address: str | None = None, num_cpus: int | None = None) -> Iterator[Any]:
    """Ray, connected: to `address` (or `RAY_ADDRESS`), else a new local Ray with `num_cpus` CPUs.

    A process that has already called `ray.init` (a library user, the tests) keeps its connection, and
    it is left open; a connection made here is shut down at the end (a local Ray stops with it).
    """
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
    if address is None:  # "local": a new instance even if one runs here (`auto` asks for that one)
        kwargs.update(address="local", num_cpus=num_cpus, include_dashboard=False)
    else:
        kwargs["address"] = address
    # ray.init replaces the SIGTERM handler (with sys.exit, and a C++ handler that aborts the process):
    # the caller's handlers (`executors.handle_signals`: stop in order, keep what is done) are put back.
    saved = _signal_handlers()
    try:
        with _quiet_token_notice(address is None):
            ray.init(**kwargs)
    except (ConnectionError, ValueError, RuntimeError) as e:
        where = address or "a new local Ray"
        raise VlmtileError(f"--executor ray: cannot start or reach {where}: {e}") from None
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    try:
        yield ray
    finally:
        ray.shutdown()


def _signal_handlers() -> dict[int, Any]:
    """The Python handlers of the stop signals now (none off the main thread: they cannot be set there)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    handlers: dict[int, Any] = {}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        handler = signal.getsignal(sig)
        if handler is not None:  # None: installed outside Python, cannot be put back
            handlers[sig] = handler
    return handlers


@contextlib.contextmanager
def _quiet_token_notice(local: bool) -> Iterator[None]:
    """Ray logs a warning at every start of a local instance that token authentication is on (the safe
    default, nothing to act on): in cron mail every hour it would only teach people to ignore stderr."""
    if not local:
        yield
        return
    notice = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = notice.level
    notice.setLevel(logging.ERROR)
    try:
        yield
    finally:
        notice.setLevel(level)


@dataclass
class _Running:
    index: int
    attempt: int
    key: str
    ended: str | None = None
    """Why the driver cancelled it ("timeout", "stop"), None while it runs on its own."""


def _key(index: int, attempt: int) -> str:
    return f"{index}:{attempt}"


def run_tasks(
    fn: Callable[[T, Progress], R],
    tasks: Sequence[T],
    workers: int | None,
    on_progress: Progress | None = None,
    *,
    stop: SupportsIsSet | None = None,
    timeout: float | None = None,
    retries: int = 0,
    on_retry: Callable[[T, int | None], None] | None = None,
    address: str | None = None,
) -> Iterator[Outcome[T, R]]:
    """`executors.run_tasks` on Ray: one Ray task (1 CPU) per task; yields one outcome per task.

    `workers`: at most this many tasks at once (a share of a big cluster); None: as many as the
    cluster has CPUs, with as many again queued in Ray so that a freed CPU never waits for the driver.
    `address`: the cluster to use (also `RAY_ADDRESS`); neither: a local Ray is started for the run and
    stopped after it. Nothing is started when there is no task (an idle cron rerun).
    """
    if timeout is not None and timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    if retries < 0:
        raise ValueError(f"retries must be at least 0, got {retries}")
    if not tasks:
        return
    with connect(address, workers) as ray:
        yield from _drive(ray, fn, tasks, workers, on_progress, stop, timeout, retries, on_retry)


def _drive(
    ray: Any,
    fn: Callable[[T, Progress], R],
    tasks: Sequence[T],
    workers: int | None,
    on_progress: Progress | None,
    stop: SupportsIsSet | None,
    timeout: float | None,
    retries: int,
    on_retry: Callable[[T, int | None], None] | None,
) -> Iterator[Outcome[T, R]]:
    exceptions = importlib.import_module("ray.exceptions")
    remote = ray.remote(_run_one).options(num_cpus=1, max_retries=0, retry_exceptions=False)
    tracker = _start_tracker(ray)
    cwd = os.getcwd()
    pending = deque(range(len(tasks)))
    attempts = [0] * len(tasks)
    last: dict[int, tuple[int | None, BaseException]] = {}
    running: dict[Any, _Running] = {}
    workers_of: dict[str, tuple[int, str]] = {}
    limit = _limit(ray, workers)
    limit_read = time.monotonic()

    def stopping() -> bool:
        return stop is not None and stop.is_set()

    def pid_of(run: _Running) -> int | None:
        worker = workers_of.get(run.key)
        return worker[0] if worker else None

    def poll_tracker() -> dict[str, float]:
        """Feed progress to the caller; return each running task's silence in seconds."""
        nonlocal tracker
        if tracker is None:
            return {}
        try:
            images, tokens, silence, started = ray.get(tracker.take.remote(), timeout=30)
        except exceptions.RayError:  # the actor's node died: no more progress, no timeouts
            tracker = None
            return {}
        workers_of.update(started)
        if (images or tokens) and on_progress is not None:
            on_progress(images, tokens)
        return dict(silence)

    def judge(ref: Any, run: _Running) -> tuple[Any, BaseException | None]:
        try:
            kind, payload = ray.get(ref)
        except exceptions.TaskCancelledError:
            return None, _ended_error(run, timeout)
        except exceptions.RayTaskError as e:  # raised outside `_run_one` (its arguments did not unpickle)
            return None, TaskFailed(_first_line(e))
        except exceptions.RayError as e:  # the worker process or its node died
            if run.ended is not None:
                return None, _ended_error(run, timeout)
            return None, WorkerDied(f"Ray worker lost: {type(e).__name__}: {_first_line(e)}")
        if kind == "result":
            return payload, None
        return None, TaskFailed(payload)

    def settle(run: _Running, result: Any, error: BaseException | None) -> Outcome[T, R] | None:
        index = run.index
        pid = pid_of(run)
        if isinstance(error, WorkerDied) and attempts[index] <= retries and not stopping():
            if on_retry is not None:
                on_retry(tasks[index], pid)
            last[index] = (pid, error)
            pending.append(index)
            return None
        return Outcome(tasks[index], result, error, pid, attempts[index])

    def finished(refs: list[Any]) -> list[Outcome[T, R]]:
        outcomes = []
        done = []
        for ref in refs:
            run = running.pop(ref)
            done.append(run.key)
            result, error = judge(ref, run)
            outcome = settle(run, result, error)
            workers_of.pop(run.key, None)
            if outcome is not None:
                outcomes.append(outcome)
        if tracker is not None:
            tracker.forget.remote(done)
        return outcomes

    try:
        while pending or running:
            if stopping():
                break
            if workers is None and time.monotonic() - limit_read > RESOURCES_SECONDS:
                limit, limit_read = _limit(ray, workers), time.monotonic()
            while pending and len(running) < limit:
                index = pending.popleft()
                attempts[index] += 1
                key = _key(index, attempts[index])
                ref = remote.remote(fn, tasks[index], key, tracker, cwd)
                running[ref] = _Running(index, attempts[index], key)
            # Back as soon as one task is done (its CPU gets the next task at once), with every other
            # one that is done by then.
            ready, rest = ray.wait(list(running), num_returns=1, timeout=POLL_SECONDS)
            if ready and rest:
                more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
                ready += more
            silence = poll_tracker()  # after the wait: the finished tasks' last progress and pids
            outcomes = finished(ready) if ready else []
            if timeout is not None:
                for ref, run in running.items():
                    if run.ended is None and silence.get(run.key, 0.0) > timeout:
                        run.ended = "timeout"
                        ray.cancel(ref, force=True)
            yield from outcomes

        if stopping():
            for ref, run in running.items():
                if run.ended is None:
                    run.ended = "stop"
                    ray.cancel(ref, force=True)
            refs = list(running)
            if refs:
                ray.wait(refs, num_returns=len(refs), timeout=CANCEL_GRACE)
            poll_tracker()
            for ref in refs:
                run = running.pop(ref)
                result, error = judge(ref, run)
                if error is not None and run.key not in workers_of:  # queued in Ray, never started
                    attempts[run.index] -= 1
                    yield from never_restarted(tasks, [run.index], last, attempts)
                    continue
                if error is not None and not isinstance(error, Interrupted):
                    error = Interrupted(f"{INTERRUPTED_RUNNING}: {error}")
                yield Outcome(tasks[run.index], result, error, pid_of(run), attempts[run.index])
            yield from never_restarted(tasks, pending, last, attempts)
    finally:  # the consumer stopped iterating, or a callback raised: leave no task running
        for ref in running:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        if tracker is not None:
            with contextlib.suppress(Exception):
                ray.kill(tracker)


def _ended_error(run: _Running, timeout: float | None) -> BaseException:
    if run.ended == "timeout":
        return TaskTimedOut(f"task timed out after {timeout:g} s without progress")
    return Interrupted(INTERRUPTED_RUNNING)


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _limit(ray: Any, workers: int | None) -> int:
    """Tasks in flight: `workers`, or twice the cluster's CPUs (half of them queued in Ray)."""
    if workers is not None:
        return max(1, workers)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, 2 * cpus)


def _start_tracker(ray: Any) -> Any:
    """The progress actor, on the driver's node (so that it lives as long as the driver can use it)."""
    strategies = importlib.import_module("ray.util.scheduling_strategies")
    node = ray.get_runtime_context().get_node_id()
    here = strategies.NodeAffinitySchedulingStrategy(node_id=node, soft=True)
    actor = ray.remote(_Tracker).options(num_cpus=0, scheduling_strategy=here, max_restarts=0)
    return actor.remote()
