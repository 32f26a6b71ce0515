"""run_tasks with real worker processes and real signals: every task gets exactly one outcome, dead and
hung workers are retried, raising tasks are not, an interrupted run stops promptly and leaves no process.

Tasks are module-level functions (the workers import this module to run them). A task that must behave
differently on its first attempt remembers the attempt in a marker file, as a real retry would find the
first attempt's files on disk.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vlmtile import executors
from vlmtile.executors import (
    Interrupted,
    Outcome,
    Progress,
    StopFlag,
    TaskFailed,
    TaskTimedOut,
    WorkerDied,
    handle_signals,
    run_tasks,
)

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
RUNNING = "interrupted before it finished"
NOT_STARTED = "not started: the run was interrupted"


# -- tasks (run in worker processes) ---------------------------------------------------------------------


def double(task: int, progress: Progress) -> int:
    progress(1, task)
    return 2 * task


def dies_once(task: tuple[str, int], progress: Progress) -> int:
    """SIGKILLs its own worker on the first attempt (like the OOM killer), after noting its pid."""
    marker, value = task
    if not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return value


def always_dies(log: str, progress: Progress) -> None:
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    os.kill(os.getpid(), signal.SIGKILL)


def hangs_once(marker: str, progress: Progress) -> str:
    """Hangs without a word on the first attempt (a decoder stuck on a hostile file)."""
    if not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        time.sleep(3600)
    return "second try"


def always_hangs(task: str, progress: Progress) -> None:
    time.sleep(3600)


def keeps_reporting(seconds: float, progress: Progress) -> str:
    """Runs much longer than the timeout, but sends progress every 0.1 s."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.1)
        progress(1, 0)
    return "finished"


def raises(log: str, progress: Progress) -> None:
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    raise ValueError("bad input 7")


def terminated_from_outside(task: int, progress: Progress) -> None:
    os.kill(os.getpid(), signal.SIGTERM)  # as `kill PID` or a service manager would
    time.sleep(10)


def slow(task: tuple[str, int, float], progress: Progress) -> int:
    """Notes its pid in a folder (so that the test can see it started and check it is gone), then sleeps."""
    folder, value, seconds = task
    Path(folder, str(os.getpid())).write_text(str(value))
    time.sleep(seconds)
    return value


def floods(task: int, progress: Progress) -> int:
    """Task 0 returns at once; the others send progress forever, filling their pipe when nobody reads."""
    while task:
        progress(1, 0)
    return task


def signals_twice(task: int, progress: Progress) -> int:
    """Run inline: the user presses Ctrl-C twice while this task runs."""
    if task == 1:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(10)
    return task


# -- helpers -------------------------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat fields after the command name (state, ppid, pgrp, session, ...); None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def is_running(pid: int) -> bool:
    """True if the process exists and has not ended (a zombie has ended; only its status is left)."""
    if Path("/proc").is_dir():
        fields = _stat(pid)
        return fields is not None and fields[0] != "Z"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def session_members(sid: int) -> list[int]:
    """Live processes of a session: the program, its workers, forkserver and resource tracker."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and int(fields[3]) == sid and fields[0] != "Z":
                members.append(int(entry.name))
    return members


def started_pids(folder: Path) -> list[int]:
    return sorted(int(p.name) for p in folder.iterdir())


def wait_for_files(folder: Path, count: int, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while len(list(folder.iterdir())) < count:
        assert time.monotonic() < deadline, f"{count} workers did not start in {seconds} s"
        time.sleep(0.02)


def by_task(outcomes: list[Outcome[Any, Any]], key: Callable[[Any], Any] = lambda t: t) -> dict[Any, Any]:
    keys = [key(o.task) for o in outcomes]
    assert len(keys) == len(set(keys)), f"a task came out twice: {keys}"
    return {key(o.task): o for o in outcomes}


# -- normal runs ---------------------------------------------------------------------------------------


def test_every_task_has_its_result() -> None:
    seen: list[tuple[int, int]] = []
    outcomes = by_task(list(run_tasks(double, [1, 2, 3, 4, 5, 6], 3, lambda i, t: seen.append((i, t)))))
    assert {t: o.result for t, o in outcomes.items()} == {1: 2, 2: 4, 3: 6, 4: 8, 5: 10, 6: 12}
    assert all(o.error is None and o.attempts == 1 for o in outcomes.values())
    pids = {o.pid for o in outcomes.values()}
    assert len(pids) == 6 and os.getpid() not in pids  # one process per task
    assert sorted(seen) == [(1, 1), (1, 2), (1, 3), (1, 4), (1, 5), (1, 6)]

    inline = list(run_tasks(double, [1, 2], 1))
    assert [(o.task, o.result, o.error, o.pid, o.attempts) for o in inline] == [
        (1, 2, None, None, 1),
        (2, 4, None, None, 1),
    ]


def test_one_task_runs_inline_unless_it_needs_a_worker() -> None:
    assert [o.pid for o in run_tasks(double, [5], 4)] == [None]  # nothing to gain from a process
    (outcome,) = run_tasks(double, [5], 4, retries=1)  # a retry needs a worker that can die alone
    assert outcome.result == 10 and outcome.pid not in (None, os.getpid())


# -- retries -------------------------------------------------------------------------------------------


def test_killed_worker_is_retried(tmp_path: Path) -> None:
    tasks = [(str(tmp_path / f"marker{i}"), i) for i in range(3)]
    retried: list[tuple[tuple[str, int], int | None]] = []
    outcomes = by_task(
        list(run_tasks(dies_once, tasks, 2, retries=1, on_retry=lambda t, pid: retried.append((t, pid)))),
        key=lambda t: t[1],
    )
    assert {i: (o.result, o.error, o.attempts) for i, o in outcomes.items()} == {
        0: (0, None, 2),
        1: (1, None, 2),
        2: (2, None, 2),
    }
    dead = {task: int(Path(task[0]).read_text()) for task in tasks}
    assert sorted(retried) == sorted(dead.items())  # on_retry got each task with its dead worker's pid
    assert all(outcomes[task[1]].pid not in (None, dead[task]) for task in tasks)


def test_retries_exhausted_reports_the_death(tmp_path: Path) -> None:
    log = tmp_path / "log"
    retried: list[int | None] = []
    (outcome,) = run_tasks(always_dies, [str(log)], 2, retries=2, on_retry=lambda t, pid: retried.append(pid))
    pids = [int(line) for line in log.read_text().split()]
    assert len(pids) == 3
    assert isinstance(outcome.error, WorkerDied) and not isinstance(outcome.error, TaskTimedOut)
    assert str(outcome.error) == "worker process was killed by SIGKILL (out of memory?)"
    assert (outcome.result, outcome.attempts, outcome.pid) == (None, 3, pids[2])
    assert retried == pids[:2]


def test_raising_task_is_not_retried(tmp_path: Path) -> None:
    log = tmp_path / "log"
    retried: list[int | None] = []
    (outcome,) = run_tasks(raises, [str(log)], 2, retries=3, on_retry=lambda t, pid: retried.append(pid))
    assert isinstance(outcome.error, TaskFailed)
    assert str(outcome.error) == "ValueError: bad input 7"
    assert outcome.attempts == 1 and outcome.pid == int(log.read_text())
    assert retried == []


def test_worker_stopped_from_outside_is_interrupted_not_retried() -> None:
    (outcome,) = run_tasks(terminated_from_outside, [0], 2, retries=2)
    assert isinstance(outcome.error, Interrupted)
    assert str(outcome.error) == f"{RUNNING}: worker process was killed by SIGTERM"
    assert outcome.attempts == 1


def test_worker_that_cannot_start_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    real_start = executors._start
    calls = []

    def fork_fails_once(*args: Any) -> Any:
        calls.append(args[2])
        if len(calls) == 1:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        return real_start(*args)

    monkeypatch.setattr(executors, "_start", fork_fails_once)
    retried: list[tuple[int, int | None]] = []
    (outcome,) = run_tasks(double, [4], 2, retries=1, on_retry=lambda t, pid: retried.append((t, pid)))
    assert (outcome.result, outcome.attempts, retried) == (8, 2, [(4, None)])

    calls.clear()
    (outcome,) = run_tasks(double, [4], 2, retries=0, timeout=5)
    assert isinstance(outcome.error, WorkerDied)
    assert str(outcome.error) == "worker process could not start: [Errno 11] Resource temporarily unavailable"
    assert (outcome.attempts, outcome.pid) == (1, None)


# -- the inactivity timeout ----------------------------------------------------------------------------


def test_hung_task_is_timed_out_and_retried(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    retried: list[int | None] = []
    start = time.monotonic()
    (outcome,) = run_tasks(
        hangs_once, [str(marker)], 2, timeout=0.5, retries=1, on_retry=lambda t, pid: retried.append(pid)
    )
    assert time.monotonic() - start < 5
    hung = int(marker.read_text())
    assert (outcome.result, outcome.error, outcome.attempts) == ("second try", None, 2)
    assert retried == [hung]
    assert not is_running(hung)


def test_hung_task_fails_once_retries_are_spent() -> None:
    (outcome,) = run_tasks(always_hangs, ["x"], 2, timeout=0.3, retries=1)
    assert isinstance(outcome.error, TaskTimedOut) and isinstance(outcome.error, WorkerDied)
    assert str(outcome.error) == "task timed out after 0.3 s without progress"
    assert outcome.attempts == 2
    assert outcome.pid is not None and not is_running(outcome.pid)


def test_timeout_is_for_silence_not_for_length() -> None:
    (outcome,) = run_tasks(keeps_reporting, [1.5], 2, timeout=0.5)
    assert (outcome.result, outcome.error, outcome.attempts) == ("finished", None, 1)


# -- stopping ------------------------------------------------------------------------------------------


def test_stop_from_another_thread_accounts_for_every_task(tmp_path: Path) -> None:
    folder = tmp_path / "pids"
    folder.mkdir()
    stop = StopFlag()

    def stop_once_two_run() -> None:
        wait_for_files(folder, 2)
        stop.set()

    setter = threading.Thread(target=stop_once_two_run)
    setter.start()
    start = time.monotonic()
    outcomes = by_task(
        list(run_tasks(slow, [(str(folder), i, 30.0) for i in range(6)], 2, stop=stop)), key=lambda t: t[1]
    )
    elapsed = time.monotonic() - start
    setter.join()
    assert sorted(outcomes) == [0, 1, 2, 3, 4, 5]
    assert all(isinstance(o.error, Interrupted) and o.result is None for o in outcomes.values())
    pids = started_pids(folder)
    assert {i: (str(o.error), o.attempts) for i, o in outcomes.items()} == {
        0: (RUNNING, 1),
        1: (RUNNING, 1),
        2: (NOT_STARTED, 0),
        3: (NOT_STARTED, 0),
        4: (NOT_STARTED, 0),
        5: (NOT_STARTED, 0),
    }
    assert sorted(o.pid for o in outcomes.values() if o.pid is not None) == pids
    assert [pid for pid in pids if is_running(pid)] == []
    assert elapsed < 5  # started, noticed within a poll, terminated: not the tasks' 30 s


def test_stop_is_prompt_when_a_worker_is_blocked_on_a_full_pipe() -> None:
    stop = StopFlag()
    messages = [0]

    def count(images: int, tokens: int) -> None:
        messages[0] += images

    outcomes = run_tasks(floods, [0, 1], 2, count, stop=stop)
    first = next(outcomes)
    assert (first.task, first.result) == (0, 0)
    time.sleep(0.5)  # nobody reads while the consumer holds on: task 1's pipe fills and its send blocks
    stop.set()
    start = time.monotonic()
    (rest,) = list(outcomes)
    assert time.monotonic() - start < 3
    assert (rest.task, str(rest.error)) == (1, RUNNING)
    assert messages[0] > 0
    assert rest.pid is not None and not is_running(rest.pid)


def test_consumer_that_stops_iterating_leaves_no_worker(tmp_path: Path) -> None:
    folder = tmp_path / "pids"
    folder.mkdir()
    outcomes = run_tasks(slow, [(str(folder), 0, 0.0), (str(folder), 1, 30.0)], 2)
    assert next(outcomes).result == 0
    wait_for_files(folder, 2)
    start = time.monotonic()
    outcomes.close()
    assert time.monotonic() - start < 3
    assert [pid for pid in started_pids(folder) if is_running(pid)] == []


def test_inline_stop_is_checked_between_tasks() -> None:
    stop = threading.Event()  # anything with is_set() will do
    outcomes = []
    for outcome in run_tasks(double, [1, 2, 3], 1, stop=stop):
        outcomes.append(outcome)
        stop.set()
    assert [(o.task, o.result, str(o.error), o.attempts) for o in outcomes] == [
        (1, 2, "None", 1),
        (2, None, NOT_STARTED, 0),
        (3, None, NOT_STARTED, 0),
    ]


@pytest.fixture
def sigint_handled() -> Iterator[None]:
    """Python's own SIGINT handler for the test. A shell starts background jobs (`pytest &`, nohup, some
    CI runners) with SIGINT ignored, and `handle_signals` rightly leaves an ignored signal ignored: the
    tests that send themselves SIGINT would then test nothing but that."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def test_second_signal_interrupts_an_inline_task(sigint_handled: None) -> None:
    stop = StopFlag()
    start = time.monotonic()
    with handle_signals(stop):
        outcomes = list(run_tasks(signals_twice, [0, 1, 2], 1, stop=stop))
    assert time.monotonic() - start < 3  # not the task's 10 s
    assert [(o.task, o.result, str(o.error), o.attempts) for o in outcomes] == [
        (0, 0, "None", 1),
        (1, None, RUNNING, 1),
        (2, None, NOT_STARTED, 0),
    ]
    assert (stop.signal, stop.urgent) == (signal.SIGINT, True)


# -- signal handlers -----------------------------------------------------------------------------------


def test_handle_signals_sets_the_flag_and_restores_handlers(sigint_handled: None) -> None:
    seen: list[int] = []

    def previous(signum: int, frame: object) -> None:
        seen.append(signum)

    before_int = signal.getsignal(signal.SIGINT)
    old_term = signal.signal(signal.SIGTERM, previous)
    try:
        stop = StopFlag()
        with handle_signals(stop) as flag:
            assert flag is stop
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.wait(2)
            assert (stop.signal, stop.urgent) == (signal.SIGTERM, False)
            os.kill(os.getpid(), signal.SIGINT)  # a second one: urgent, and no KeyboardInterrupt
            deadline = time.monotonic() + 2
            while not stop.urgent and time.monotonic() < deadline:
                time.sleep(0.01)
            assert stop.urgent and stop.signal == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is previous
        assert signal.getsignal(signal.SIGINT) is before_int
        assert seen == []
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, old_term)


def test_handle_signals_keeps_ignored_signals_ignored_and_does_nothing_off_the_main_thread() -> None:
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with handle_signals(StopFlag()):
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_IGN, signal.SIG_DFL)
    finally:
        signal.signal(signal.SIGINT, old_int)

    handlers: list[Any] = []

    def in_thread() -> None:
        with handle_signals(StopFlag()):
            handlers.append(signal.getsignal(signal.SIGTERM))

    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert handlers == [before]


SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_executors import slow
from vlmtile.executors import StopFlag, handle_signals, run_tasks
stop = StopFlag()
with handle_signals(stop):
    for o in run_tasks(slow, [({folder!r}, i, 30.0) for i in range(4)], 2, stop=stop):
        print(o.task[1], type(o.error).__name__, o.error, flush=True)
print("done", stop.signal, flush=True)
"""


def test_sigterm_stops_a_program_promptly_and_leaves_no_process(tmp_path: Path) -> None:
    folder = tmp_path / "pids"
    folder.mkdir()
    script = textwrap.dedent(SCRIPT).format(tests=str(TESTS), folder=str(folder))
    program = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own session: every process it made can be found afterwards
    )
    try:
        wait_for_files(folder, 2)
        start = time.monotonic()
        program.send_signal(signal.SIGTERM)
        stdout, stderr = program.communicate(timeout=10)
        elapsed = time.monotonic() - start
    finally:
        if program.poll() is None:
            os.killpg(program.pid, signal.SIGKILL)
            program.communicate()
    assert program.returncode == 0, stderr
    assert elapsed < 5
    assert sorted(stdout.splitlines()) == [
        f"0 Interrupted {RUNNING}",
        f"1 Interrupted {RUNNING}",
        f"2 Interrupted {NOT_STARTED}",
        f"3 Interrupted {NOT_STARTED}",
        f"done {int(signal.SIGTERM)}",
    ]
    assert [pid for pid in started_pids(folder) if is_running(pid)] == []
    if Path("/proc").is_dir():  # the forkserver and resource tracker follow their parent out
        deadline = time.monotonic() + 5
        while session_members(program.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert session_members(program.pid) == []


@pytest.mark.parametrize(("kwargs", "message"), [({"timeout": 0}, "timeout"), ({"retries": -1}, "retries")])
def test_invalid_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        list(run_tasks(double, [1], 2, **kwargs))
