"""Running shard tasks: inline for one worker, in a spawn-context process pool otherwise.

Executors only schedule. The task function writes its own shard and returns a small report; arrays never
travel back to the parent. Progress (images done, tokens) comes back through a queue that a thread in the
parent drains. A task that raises, or a worker that dies, becomes an `Outcome` with the error, so the
runner can account for that shard's inputs instead of losing them.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

Progress = Callable[[int, int], None]
"""progress(images_done, tokens_done): called by a task after each input."""

_worker_queue: Any = None


@dataclass(frozen=True)
class Outcome(Generic[T, R]):
    """What became of one task: its result, or the exception that ended it."""

    task: T
    result: R | None
    error: BaseException | None


def _init_worker(queue: Any) -> None:
    global _worker_queue
    _worker_queue = queue


def _queue_progress(images: int, tokens: int) -> None:
    _worker_queue.put((images, tokens))


def _call(fn: Callable[[T, Progress], R], task: T) -> R:
    return fn(task, _queue_progress)


def _no_progress(images: int, tokens: int) -> None:
    pass


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

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()

    def drain() -> None:
        while (message := queue.get()) is not None:
            progress(*message)

    drainer = threading.Thread(target=drain, name="vlmtile-progress", daemon=True)
    drainer.start()
    try:
        with ProcessPoolExecutor(
            max_workers=min(workers, len(tasks)),
            mp_context=ctx,
            initializer=_init_worker,
            initargs=(queue,),
        ) as pool:
            futures: dict[Future[R], T] = {pool.submit(_call, fn, task): task for task in tasks}
            for future in as_completed(futures):
                error = future.exception()
                yield Outcome(futures[future], None if error else future.result(), error)
    finally:
        queue.put(None)
        drainer.join()
