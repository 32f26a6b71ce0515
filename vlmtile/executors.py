"""Running shard tasks: inline for one worker, otherwise one child process per task, N at a time.

Executors only schedule. The task function writes its own shard and returns a small report; arrays never
travel back to the parent. One process per task (forked from a forkserver that has already imported
vlmtile, so a start costs milliseconds) means a worker that dies (OOM killer, a segfault in a decoder) is
attributed to exactly its own task: the others carry on, and the outcome names the signal. A task that
raises, or whose process dies, becomes an `Outcome` with the error, never an exception here.
"""

from __future__ import annotations

import multiprocessing
import queue as queue_module
import signal
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

Progress = Callable[[int, int], None]
"""progress(images_done, tokens_done): called by a task after each input."""


class WorkerDied(RuntimeError):
    """A worker process ended without reporting a result (killed by a signal, or exited)."""


class TaskFailed(RuntimeError):
    """A task raised in its worker process; the message carries the original type and text."""


@dataclass(frozen=True)
class Outcome(Generic[T, R]):
    """What became of one task: its result, or the exception that ended it."""

    task: T
    result: R | None
    error: BaseException | None
    pid: int | None = None
    """The worker process id (None when run inline), e.g. to find its temporary files."""


def _no_progress(images: int, tokens: int) -> None:
    pass


def _child(fn: Callable[[T, Progress], R], index: int, task: T, messages: Any) -> None:
    """Body of a worker process: run one task, report progress and the result through the queue."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides what an interrupt means

    def progress(images: int, tokens: int) -> None:
        messages.put(("progress", index, (images, tokens)))

    try:
        result = fn(task, progress)
    except BaseException as e:  # noqa: BLE001 - any failure is reported as this task's outcome
        messages.put(("error", index, f"{type(e).__name__}: {e}"))
    else:
        messages.put(("result", index, result))


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        hint = " (out of memory?)" if -code == signal.SIGKILL else ""
        return f"worker process was killed by {name}{hint}"
    return f"worker process exited with status {code} without a result"


def _context() -> multiprocessing.context.BaseContext:
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["vlmtile.runner"])
        return ctx
    return multiprocessing.get_context("spawn")


def run_tasks(
    fn: Callable[[T, Progress], R],
    tasks: Sequence[T],
    workers: int,
    on_progress: Progress | None = None,
) -> Iterator[Outcome[T, R]]:
    """Run `fn(task, progress)` for every task; yield outcomes as tasks finish (any order)."""
    progress = on_progress or _no_progress
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            try:
                yield Outcome(task, fn(task, progress), None)
            except Exception as e:  # noqa: BLE001 - reported as the task's outcome
                yield Outcome(task, None, e)
        return

    ctx = _context()
    messages = ctx.Queue()
    pending = deque(range(len(tasks)))
    running: dict[int, Any] = {}
    finished: dict[int, tuple[str, Any]] = {}

    def receive(timeout: float) -> bool:
        """Handle one message; False if none came within `timeout`."""
        try:
            kind, index, payload = messages.get(timeout=timeout)
        except queue_module.Empty:
            return False
        if kind == "progress":
            progress(*payload)
        else:
            finished[index] = (kind, payload)
        return True

    try:
        while pending or running:
            while pending and len(running) < workers:
                index = pending.popleft()
                process = ctx.Process(  # type: ignore[attr-defined]
                    target=_child, args=(fn, index, tasks[index], messages), daemon=True
                )
                try:
                    process.start()
                except OSError as e:  # fork / forkserver failure (out of memory, process limit)
                    yield Outcome(tasks[index], None, WorkerDied(f"worker process could not start: {e}"))
                    continue
                running[index] = process
            receive(timeout=0.1)
            for index, process in list(running.items()):
                if process.is_alive():  # joining a live child could deadlock on a full pipe
                    continue
                process.join()
                # What the child put before exiting is in the pipe by now: read it before judging.
                deadline = time.monotonic() + 2.0
                while index not in finished and time.monotonic() < deadline and receive(timeout=0.2):
                    pass
                del running[index]
                kind, payload = finished.pop(index, ("died", process.exitcode))
                if kind == "result":
                    yield Outcome(tasks[index], payload, None, process.pid)
                elif kind == "error":
                    yield Outcome(tasks[index], None, TaskFailed(payload), process.pid)
                else:
                    yield Outcome(tasks[index], None, WorkerDied(_describe_exit(payload)), process.pid)
        while receive(timeout=0.01):  # late progress messages
            pass
    finally:
        for process in running.values():
            process.terminate()
            process.join()
