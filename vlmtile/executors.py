"""Running shard tasks: inline for one worker, otherwise one child process per task, N at a time.

Executors only schedule. The task function writes its own shard and returns a small report; arrays never
travel back to the parent. One process per task (forked from a forkserver that has already imported
vlmtile, so a start costs milliseconds) means a worker that dies (OOM killer, a segfault in a decoder) is
attributed to exactly its own task: the others carry on, and the outcome names the signal. A task that
raises, or whose process dies, becomes an `Outcome` with the error, never an exception here.

Unattended runs add three things, all opt-in keyword arguments of `run_tasks`:

- interruption: a `StopFlag` (set by `handle_signals` on SIGINT / SIGTERM, or by the caller) makes
  `run_tasks` start nothing more, terminate the running workers and report every task it did not finish
  as `Interrupted`, so the caller can account for each one and a later run can do them;
- an inactivity timeout: a worker that sends no progress for `timeout` seconds is hung (a decoder stuck
  on a hostile file) and is killed, while a long but healthy task that keeps reporting lives on;
- retries: a task whose worker died or hung is started again; one that raised is not (it would only
  raise again).

Each worker talks to the parent through its own pipe rather than one shared queue. A shared
`multiprocessing.Queue` has a lock that every writer takes: a worker killed while holding it (SIGKILL by
the OOM killer, or our own terminate on a timeout) would leave the lock taken and every other worker
unable to report, and a message cut in half would corrupt the stream for all. With one pipe per worker,
killing a worker can only damage its own pipe, which is thrown away with it, and "everything it sent" is
simply everything up to the end of its pipe.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_for
from types import FrameType
from typing import Any, Generic, Protocol, TypeVar

T = TypeVar("T")
R = TypeVar("R")

Progress = Callable[[int, int], None]
"""progress(images_done, tokens_done): called by a task after each input."""

POLL_SECONDS = 0.1
"""How long the parent waits for a message before it looks at its workers (and the stop flag) again."""
TERMINATE_GRACE = 1.0
"""Seconds between SIGTERM and SIGKILL when the parent ends a worker (none after a second signal)."""
EXIT_GRACE = 5.0
"""Seconds a worker that has sent its result may take to exit before it is ended (its result is kept)."""
_MAX_MESSAGES = 1000
"""Messages read from one worker per poll, so that a chatty worker cannot starve the others."""

INTERRUPTED_RUNNING = "interrupted before it finished"
INTERRUPTED_NOT_STARTED = "not started: the run was interrupted"

_STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
"""Signals that people and service managers send to stop a program; the OOM killer and crashes never do."""


class WorkerDied(RuntimeError):
    """A worker process ended without reporting a result (killed by a signal, or exited)."""


class TaskTimedOut(WorkerDied):
    """A worker sent no progress for the timeout and was killed (a WorkerDied: it ended without result)."""


class TaskFailed(RuntimeError):
    """A task raised in its worker process; the message carries the original type and text."""


class Interrupted(RuntimeError):
    """The run was stopped before this task finished (or started): not a failure of the task's inputs."""


class _StopNow(BaseException):
    """Raised inside an inline task by a second signal: the only way to end a task running in-process."""


class SupportsIsSet(Protocol):
    """What `run_tasks` needs of a stop flag: a `StopFlag`, or e.g. a `threading.Event`."""

    def is_set(self) -> bool: ...


class StopFlag:
    """A flag that says "stop the run", safe to set from a signal handler and from any thread.

    Not a `threading.Event`: `Event.set` takes a lock, and a signal handler runs in the main thread
    between two bytecodes, possibly while that same thread holds the lock (inside `set` or `wait`): the
    handler would then wait for itself forever. Setting a plain attribute is atomic under the GIL. A task
    function may poll `is_set()` if its caller hands it the flag; `run_tasks` itself checks it between
    tasks (inline) or every `POLL_SECONDS` (workers).
    """

    def __init__(self) -> None:
        self._set = False
        self.signal: int | None = None
        """The first signal that set the flag (None when code set it), e.g. for an exit status."""
        self.urgent = False
        """Set by a second signal: end workers without a grace period, and end an inline task at once."""
        self._interruptible = False
        """True while an inline task runs in the main thread: a second signal may raise inside it."""
        self._raised = False
        """A second signal raised `_StopNow` inside the inline task (which may have turned it into another
        exception on its way out)."""

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the flag is set or `timeout` passes (by polling: no lock, see the class doc)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._set and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.01)
        return self._set


@contextlib.contextmanager
def handle_signals(
    stop: StopFlag, signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM)
) -> Iterator[StopFlag]:
    """While inside, SIGINT and SIGTERM set `stop` instead of raising KeyboardInterrupt / killing us.

    The first signal asks for an orderly stop: `run_tasks` starts no new task, ends the running workers
    and reports what it did not finish, and the caller still writes its records. A second signal (the
    user pressing Ctrl-C again, or any signal once the caller has set the flag itself) makes the stop
    urgent rather than killing the interpreter: workers get SIGKILL without a grace period, and a task
    running inline (workers=1) is interrupted by an exception raised inside it, which `run_tasks` reports
    as `Interrupted`. It never raises anywhere else, so the caller's own bookkeeping (manifest, error
    record) is never cut short half-written; `kill -9` remains the way to end the process at once, and a
    resumable run picks up after it.

    The previous handlers are restored on exit. A signal the process was told to ignore (SIG_IGN, as
    `nohup` does for SIGHUP and shells do for SIGINT in background jobs) stays ignored. Outside the main
    thread Python cannot install handlers, so this does nothing there and signals keep their usual effect.
    """
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():  # a second signal (or the first, after the caller already asked to stop)
            stop.urgent = True
            if stop._interruptible:
                stop._interruptible = False
                stop._raised = True
                raise _StopNow
        if stop.signal is None:
            stop.signal = signum
        stop.set()

    previous: dict[int, Any] = {}
    try:
        for sig in signals:
            old = signal.getsignal(sig)
            if old == signal.SIG_IGN:
                continue
            previous[sig] = old
            signal.signal(sig, handler)
        yield stop
    finally:
        for sig, old in previous.items():
            # None: the handler was not installed from Python; the default is the best we can restore.
            signal.signal(sig, signal.SIG_DFL if old is None else old)


@dataclass(frozen=True)
class Outcome(Generic[T, R]):
    """What became of one task: its result, or the exception that ended it."""

    task: T
    result: R | None
    error: BaseException | None
    pid: int | None = None
    """The (last) worker process id (None when run inline or never started), e.g. to find its files."""
    attempts: int = 1
    """How often the task was started: 0 if never, more than 1 if it was retried."""


def _no_progress(images: int, tokens: int) -> None:
    pass


def _die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this worker when its parent (the forkserver) dies.

    The forkserver exits as soon as the run's main process is gone, so a `kill -9` of the main process
    alone (not its process group) ends its workers at once, rather than leaving them to finish an image
    into files that the next run will remove anyway, or, if one hangs, to run forever.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # no prctl: the broken pipe ends the worker at its next message
        return


def _child(fn: Callable[[T, Progress], R], task: T, conn: Connection) -> None:
    """Body of a worker process: run one task, send progress and then the result through its pipe.

    If the parent is gone, the first message fails and the worker leaves quietly (exit status 1): no
    traceback in cron mail for a run that someone killed.
    """
    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before the death signal was armed
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides what an interrupt means
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # and ends us with SIGTERM, whatever was inherited

    def progress(images: int, tokens: int) -> None:
        conn.send(("progress", (images, tokens)))

    message: tuple[str, Any]
    try:
        message = ("result", fn(task, progress))
    except (BrokenPipeError, EOFError):
        os._exit(1)  # nobody is listening any more
    except BaseException as e:  # noqa: BLE001 - any failure is reported as this task's outcome
        message = ("error", f"{type(e).__name__}: {e}")
    try:
        try:
            conn.send(message)
        except (BrokenPipeError, EOFError):
            raise
        except Exception as e:  # noqa: BLE001 - e.g. a result that cannot be pickled
            conn.send(("error", f"the task's result could not be sent back: {type(e).__name__}: {e}"))
        conn.close()
    except (BrokenPipeError, EOFError):
        os._exit(1)


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        hint = " (out of memory?)" if -code == signal.SIGKILL else ""
        return f"worker process was killed by {name}{hint}"
    return f"worker process exited with status {code} without a result"


def _context() -> Any:
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
    *,
    stop: SupportsIsSet | None = None,
    timeout: float | None = None,
    retries: int = 0,
    on_retry: Callable[[T, int | None], None] | None = None,
) -> Iterator[Outcome[T, R]]:
    """Run `fn(task, progress)` for every task; yield one outcome per task as tasks finish (any order).

    `stop`: once set, no task starts; running workers are terminated (SIGTERM, then SIGKILL after
    `TERMINATE_GRACE`) and their tasks, like those never started, come out as `Interrupted`, so every task
    still gets exactly one outcome. A worker whose result arrived before it was ended keeps its result.
    With one worker the tasks run inline, and the flag is checked between tasks: a task in progress
    finishes (unless a second signal interrupts it, see `handle_signals`).

    `timeout`: seconds a worker may go without sending progress (or its result) before it is judged hung
    and killed: `TaskTimedOut`. Inactivity, not total time, so a long task that keeps reporting is never
    cut. Inline tasks cannot be timed out (nothing could stop them but themselves).

    `retries`: how often a task whose worker died (`WorkerDied`: a signal, the OOM killer, an exit
    without result) or timed out is started again before its failure is reported. A task that raised
    (`TaskFailed`) is not retried: a deterministic failure would only fail again. `on_retry(task, pid)`
    runs before a task is started again, with the pid of the attempt that died, so that the caller can
    remove what it left behind; the task must be safe to run twice (vlmtile's tasks write temporary files
    and rename them). A worker ended by SIGINT / SIGTERM / SIGHUP from outside, or lost while the run
    stops, was stopped by someone rather than failed: `Interrupted`, not retried.

    One task and no timeout or retries asked for: inline, since a process start buys nothing then.
    """
    if timeout is not None and timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    if retries < 0:
        raise ValueError(f"retries must be at least 0, got {retries}")
    progress = on_progress or _no_progress
    if workers <= 1 or (len(tasks) <= 1 and timeout is None and retries == 0):
        yield from _run_inline(fn, tasks, progress, stop)
    else:
        yield from _run_parallel(fn, tasks, workers, progress, stop, timeout, retries, on_retry)


def _run_inline(
    fn: Callable[[T, Progress], R], tasks: Sequence[T], progress: Progress, stop: SupportsIsSet | None
) -> Iterator[Outcome[T, R]]:
    flag = stop if isinstance(stop, StopFlag) else None
    # A second signal can only interrupt code running in the main thread (handlers run there).
    main_thread = threading.current_thread() is threading.main_thread()
    for task in tasks:
        if stop is not None and stop.is_set():
            yield Outcome(task, None, Interrupted(INTERRUPTED_NOT_STARTED), attempts=0)
            continue
        done = False
        result: R | None = None
        error: BaseException | None = None
        try:
            if flag is not None and main_thread:
                flag._raised = False
                flag._interruptible = True
            result = fn(task, progress)
            done = True
            if flag is not None:
                flag._interruptible = False
        except _StopNow:
            if not done:
                error = Interrupted(INTERRUPTED_RUNNING)
        except Exception as e:  # noqa: BLE001 - reported as the task's outcome
            # The task turned our interruption into its own exception: still an interruption.
            error = Interrupted(INTERRUPTED_RUNNING) if flag is not None and flag._raised else e
        finally:
            if flag is not None:
                flag._interruptible = False
        yield Outcome(task, result, error, None, 1)


@dataclass
class _Attempt:
    """One start of one task in a worker process, as the parent follows it."""

    index: int
    process: Any
    pid: int | None
    sentinel: int
    conn: Connection | None
    """The read end of the worker's pipe; None once at its end (or unreadable)."""
    last_activity: float
    final: tuple[str, Any] | None = None
    """("result", value) or ("error", text), once the worker has sent it."""
    final_at: float = 0.0
    ended: str | None = None
    """Why the parent ended the worker ("timeout", "stop"), None if it exited by itself."""
    exitcode: int | None = None
    reaped: bool = False

    def receive(self, progress: Progress, *, to_end: bool = False) -> None:
        """Read what the worker has sent (everything, with `to_end`, once it has exited)."""
        count = 0
        while self.conn is not None and (to_end or count < _MAX_MESSAGES):
            try:
                if not self.conn.poll(0):
                    return
                kind, payload = self.conn.recv()
            except Exception:  # noqa: BLE001 - its end, or a message cut short by a kill: nothing more
                self.close()
                return
            count += 1
            self.last_activity = time.monotonic()
            if kind == "progress":
                progress(*payload)
            else:
                self.final = (kind, payload)
                self.final_at = self.last_activity

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def reap(self, progress: Progress) -> None:
        """Collect the exited worker and, before judging it, everything it sent before exiting."""
        self.process.join()
        self.exitcode = self.process.exitcode
        self.receive(progress, to_end=True)
        self.close()
        self.process.close()
        self.reaped = True


def _start(ctx: Any, fn: Callable[[T, Progress], R], index: int, task: T) -> _Attempt:
    reader, writer = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(fn, task, writer), daemon=True)
    try:
        process.start()
    except BaseException:
        reader.close()
        raise
    finally:
        writer.close()  # the worker has its copy; ours would keep its end from ever showing
    return _Attempt(index, process, process.pid, process.sentinel, reader, time.monotonic())


def _end(attempts: Sequence[_Attempt], why: str, stop: SupportsIsSet | None, progress: Progress) -> None:
    """End these workers: SIGTERM, SIGKILL after the grace period, then reap them.

    Their pipes are read all along: a worker blocked writing into a full pipe, or its result, is never
    left waiting on us.
    """
    attempts = [a for a in attempts if not a.reaped]
    for attempt in attempts:
        if attempt.process.exitcode is None:
            attempt.ended = attempt.ended or why
            with contextlib.suppress(OSError):
                attempt.process.terminate()
    deadline = time.monotonic() + TERMINATE_GRACE
    while True:
        alive = [a for a in attempts if a.process.exitcode is None]
        urgent = isinstance(stop, StopFlag) and stop.urgent
        if not alive or urgent or time.monotonic() >= deadline:
            break
        _wait(alive, 0.05)
        for attempt in alive:
            attempt.receive(progress)
    for attempt in attempts:
        if attempt.process.exitcode is None:
            with contextlib.suppress(OSError):
                attempt.process.kill()
        attempt.reap(progress)


def _wait(attempts: Sequence[_Attempt], timeout: float) -> None:
    """Sleep until a worker sends something or exits, or `timeout` passes."""
    objects: list[Any] = []
    for attempt in attempts:
        objects.append(attempt.sentinel)
        if attempt.conn is not None:
            objects.append(attempt.conn)
    if objects:
        wait_for(objects, timeout)
    else:
        time.sleep(timeout)


def _judge(attempt: _Attempt, timeout: float | None, stopping: bool) -> tuple[Any, BaseException | None]:
    """(result, error) of a reaped attempt."""
    if attempt.final is not None:
        kind, payload = attempt.final
        return (payload, None) if kind == "result" else (None, TaskFailed(payload))
    code = attempt.exitcode
    if stopping or attempt.ended == "stop":
        return None, Interrupted(INTERRUPTED_RUNNING)
    if attempt.ended == "timeout":
        return None, TaskTimedOut(f"task timed out after {timeout:g} s without progress")
    if code is not None and code < 0 and -code in _STOP_SIGNALS:
        return None, Interrupted(f"{INTERRUPTED_RUNNING}: {_describe_exit(code)}")
    return None, WorkerDied(_describe_exit(code))


def never_restarted(
    tasks: Sequence[T],
    indices: Iterable[int],
    last: dict[int, tuple[int | None, BaseException]],
    attempts: Sequence[int],
) -> Iterator[Outcome[T, Any]]:
    """After a stop, an Interrupted outcome for each of these tasks, which were waiting: those that never
    started, and those waiting to be retried (named with their last attempt's error, so the record keeps
    the cause). Shared by both executors, so a stopped run reports its tasks the same way under either."""
    for index in indices:
        if index in last:
            pid, previous = last[index]
            message = f"not restarted: the run was interrupted (last attempt: {previous})"
            yield Outcome(tasks[index], None, Interrupted(message), pid, attempts[index])
        else:
            yield Outcome(tasks[index], None, Interrupted(INTERRUPTED_NOT_STARTED), None, 0)


def _run_parallel(
    fn: Callable[[T, Progress], R],
    tasks: Sequence[T],
    workers: int,
    progress: Progress,
    stop: SupportsIsSet | None,
    timeout: float | None,
    retries: int,
    on_retry: Callable[[T, int | None], None] | None,
) -> Iterator[Outcome[T, R]]:
    ctx = _context()
    pending = deque(range(len(tasks)))
    running: dict[int, _Attempt] = {}
    attempts = [0] * len(tasks)
    last: dict[int, tuple[int | None, BaseException]] = {}
    """Tasks waiting to be started again: the pid and error of their last attempt."""

    def stopping() -> bool:
        return stop is not None and stop.is_set()

    def settle(index: int, pid: int | None, result: Any, error: BaseException | None) -> Outcome[T, R] | None:
        """The task's outcome, or None if it goes back into the queue for another attempt."""
        if isinstance(error, WorkerDied) and attempts[index] <= retries and not stopping():
            if on_retry is not None:
                on_retry(tasks[index], pid)
            last[index] = (pid, error)
            pending.append(index)  # at the back: whatever hit it (memory pressure) may have passed
            return None
        return Outcome(tasks[index], result, error, pid, attempts[index])

    try:
        while pending or running:
            if stopping():
                break
            outcomes: list[Outcome[T, R]] = []
            while pending and len(running) < workers:
                index = pending.popleft()
                attempts[index] += 1
                last.pop(index, None)
                try:
                    running[index] = _start(ctx, fn, index, tasks[index])
                except OSError as e:  # fork / forkserver failure (out of memory, process limit)
                    outcome = settle(index, None, None, WorkerDied(f"worker process could not start: {e}"))
                    if outcome is not None:
                        outcomes.append(outcome)
                    break  # give the system a poll's time before the next start (or this retry)
            _wait(list(running.values()), POLL_SECONDS)
            for attempt in list(running.values()):
                attempt.receive(progress)
                now = time.monotonic()
                if attempt.process.exitcode is not None:
                    attempt.reap(progress)
                elif attempt.final is not None:
                    if now - attempt.final_at < EXIT_GRACE:
                        continue
                    _end([attempt], "exit", stop, progress)  # its result is in; it would not exit
                elif timeout is not None and now - attempt.last_activity > timeout:
                    _end([attempt], "timeout", stop, progress)
                else:
                    continue
                del running[attempt.index]
                result, error = _judge(attempt, timeout, stopping())
                outcome = settle(attempt.index, attempt.pid, result, error)
                if outcome is not None:
                    outcomes.append(outcome)
            yield from outcomes

        if stopping():
            _end(list(running.values()), "stop", stop, progress)
            stopped = list(running.values())
            running.clear()
            for attempt in stopped:
                result, error = _judge(attempt, timeout, True)
                yield Outcome(tasks[attempt.index], result, error, attempt.pid, attempts[attempt.index])
            yield from never_restarted(tasks, pending, last, attempts)
    finally:  # the consumer stopped iterating, or a callback raised: leave no worker behind
        _end(list(running.values()), "stop", stop, _no_progress)
