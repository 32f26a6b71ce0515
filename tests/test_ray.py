"""--executor ray on a real local Ray (2 CPUs, one for the whole module): the same output as the local pool,
a Ray worker killed mid-task, the executor contract (outcomes, retries, timeouts, stop), a second driver
on an existing cluster through --ray-address, and the one-line message when Ray is missing.

Ray workers import the task functions and test strategies of this module and of test_executors by
name, so the module's Ray gets `tests/` on its workers' PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
from click.testing import CliRunner
from e2e_helpers import MakeImage, assert_same_run_output, read_errors, read_manifest, save_image
from PIL import Image
from test_executors import dies_once, double, hangs_once, is_running, raises, slow, wait_for_files
from test_resume import assert_exactly_once, make_folder
from test_samples import png_bytes, write_tar

import vlmtile
from vlmtile import ray_executor
from vlmtile.cli import cli
from vlmtile.executors import Interrupted, StopFlag, TaskFailed
from vlmtile.strategies.base import Plan
from vlmtile.strategies.internvl import InternVL
from vlmtile.verify import verify

TESTS = Path(__file__).resolve().parent
STRATEGY = vlmtile.get_strategy("internvl", max_tiles=2)


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[str]:
    """One local Ray for the module (its start costs seconds); yields its address for other drivers."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    ray.init(
        address="local",  # never a cluster someone else started on this machine
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="WARNING",
        runtime_env={"env_vars": {"PYTHONPATH": path}},
    )
    for sig, handler in handlers.items():  # ray.init replaces them; pytest's own must stay
        signal.signal(sig, handler)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def run(folder: Path | str | list[str], out: Path | str, **kwargs: Any) -> vlmtile.RunSummary:
    base: dict[str, Any] = {"strategy": STRATEGY, "shard_size": 2, "progress": False, "dtype": "uint8"}
    base.update(kwargs)
    inputs = (str(folder),) if isinstance(folder, Path | str) else tuple(folder)
    return vlmtile.preprocess(vlmtile.RunConfig(inputs=inputs, output=str(out), **base))


def records(out: Path) -> list[dict[str, Any]]:
    """Every stored record as the files hold it (arrays as bytes), in shard order."""

    def plain(value: Any) -> Any:
        if isinstance(value, np.ndarray):
            return (value.dtype.str, value.shape, value.tobytes())
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return value

    return [{k: plain(v) for k, v in record.items()} for record in vlmtile.open_dataset(out, as_stored=True)]


def assert_same_output(local: Path, distributed: Path, ignore: frozenset[str] = frozenset()) -> None:
    """`assert_same_run_output`, and the same records read back."""
    assert_same_run_output(local, distributed, ignore)
    assert records(local) == records(distributed)


# -- the same output as the local pool ------------------------------------------------------------------


def test_ray_writes_what_the_local_pool_writes(tmp_path: Path, make_image: MakeImage) -> None:
    folder = tmp_path / "in"
    inputs = make_folder(folder, make_image, 7)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # an error record, the same too
    local = tmp_path / "local"
    on_ray = tmp_path / "ray"
    first = run(folder, local, workers=2)
    second = run(folder, on_ray, executor="ray")
    assert (first.records, first.failures, first.shards) == (7, 1, 4)
    assert (second.records, second.failures, second.shards) == (7, 1, 4)
    assert_same_output(local, on_ray)
    assert [e["source"] for e in read_errors(on_ray)] == [str(folder / "broken.png")]
    assert_exactly_once(on_ray, [*inputs, folder / "broken.png"])


def test_ray_samples_from_tars_and_manifests_as_webdataset(tmp_path: Path, make_image: MakeImage) -> None:
    """The sample layout (streams read by the worker, manifest lines listed by the driver), in tars."""
    data = tmp_path / "data"
    data.mkdir()
    for shard in range(2):
        samples = [
            (f"s{shard}{i}", {"jpg": png_bytes(make_image(30 + i, 20, "RGB", i)), "txt": b"caption"})
            for i in range(3)
        ]
        write_tar(data / f"part-{shard}.tar", samples)
    save_image(make_image(25, 40, "RGB", 9), data / "a.png", "PNG")
    lines = [{"id": f"m{i}", "images": ["a.png"], "text": str(i)} for i in range(3)]
    (data / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    inputs = [str(data / "part-0.tar"), str(data / "part-1.tar"), str(data / "train.jsonl")]
    local = tmp_path / "local"
    on_ray = tmp_path / "ray"
    first = run(inputs, local, workers=2, format="webdataset")
    second = run(inputs, on_ray, executor="ray", format="webdataset")
    assert (first.records, first.failures, first.layout) == (9, 0, "sample")
    assert (second.records, second.failures, second.layout) == (9, 0, "sample")
    assert_same_output(local, on_ray)
    assert (local / "_index.wids.json").read_bytes() == (on_ray / "_index.wids.json").read_bytes()


def test_ray_run_stopped_by_max_errors_is_resumed_to_the_same_output(
    tmp_path: Path, make_image: MakeImage
) -> None:
    folder = tmp_path / "in"
    inputs = make_folder(folder, make_image, 6)
    for name in ("bad1.png", "bad2.png"):
        (folder / name).write_bytes(b"not an image at all")
    out = tmp_path / "out"
    with pytest.raises(vlmtile.RunStopped, match=r"--max-errors 0"):
        run(folder, out, executor="ray", workers=1, max_errors=0, shard_size=1)
    assert not verify(str(out)).ok  # stopped early: verify says so
    again = run(folder, out, executor="ray", shard_size=1)
    assert (again.records, again.failures, again.complete) == (6, 2, True)
    local = tmp_path / "local"
    run(folder, local, workers=2, shard_size=1)
    assert_same_output(local, out)
    assert_exactly_once(out, [*inputs, folder / "bad1.png", folder / "bad2.png"])


# -- a Ray worker killed mid-run ------------------------------------------------------------------------


def _pid_file(height: int) -> Path:
    return Path(tempfile.gettempdir()) / f"vlmtile-ray-victim-{height}"


@dataclass(frozen=True)
class WaitsToBeKilled(InternVL):
    """The first time it renders a 13-px-wide image, notes its worker's pid and waits to be killed; the
    file named after the image's height remembers (a strategy field would change the settings)."""

    def render(self, image: Image.Image, plan: Plan) -> np.ndarray:
        pid_file = _pid_file(plan.orig_height)
        if plan.orig_width == 13 and not pid_file.exists():
            pid_file.write_text(str(os.getpid()))
            time.sleep(120)  # the test kills us long before
            raise RuntimeError("nobody killed this worker")
        return super().render(image, plan)


def test_ray_worker_killed_mid_task_is_retried_and_every_input_is_stored_once(
    tmp_path: Path, make_image: MakeImage
) -> None:
    folder = tmp_path / "in"
    inputs = make_folder(folder, make_image, 8)
    height = 200 + os.getpid() % 1000  # unique to this test run
    pid_file = _pid_file(height)
    pid_file.unlink(missing_ok=True)
    save_image(make_image(13, height, "RGB", 3), folder / "img003.png", "PNG")
    killed: list[int] = []

    def kill_the_worker() -> None:
        deadline = time.monotonic() + 120
        while not pid_file.exists() or not pid_file.read_text():
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        pid = int(pid_file.read_text())
        os.kill(pid, signal.SIGKILL)  # from outside, as the OOM killer would
        killed.append(pid)

    killer = threading.Thread(target=kill_the_worker)
    killer.start()
    out = tmp_path / "out"
    try:
        summary = run(folder, out, executor="ray", strategy=WaitsToBeKilled(name="internvl", max_tiles=2))
    finally:
        killer.join()
        pid_file.unlink(missing_ok=True)
    assert len(killed) == 1 and not is_running(killed[0])
    assert (summary.records, summary.failures, summary.complete) == (8, 0, True)
    assert_exactly_once(out, inputs)
    local = tmp_path / "local"
    run(folder, local, workers=2)  # the retry wrote what an undisturbed run writes
    assert [s["sha256"] for s in read_manifest(out)["shards"]] == [
        s["sha256"] for s in read_manifest(local)["shards"]
    ]


# -- the executor contract ------------------------------------------------------------------------------


def test_ray_executor_results_progress_and_pids() -> None:
    seen: list[tuple[int, int]] = []
    outcomes = list(ray_executor.run_tasks(double, [1, 2, 3, 4], None, lambda i, t: seen.append((i, t))))
    assert sorted((o.task, o.result, o.error, o.attempts) for o in outcomes) == [
        (1, 2, None, 1),
        (2, 4, None, 1),
        (3, 6, None, 1),
        (4, 8, None, 1),
    ]
    assert all(o.pid not in (None, os.getpid()) for o in outcomes)  # run in Ray workers
    assert sum(i for i, _ in seen) == 4 and sum(t for _, t in seen) == 10  # every report arrived
    assert list(ray_executor.run_tasks(double, [], None)) == []


class _FakeRay:
    """Stands in for `ray` inside `_run_one`: records which object refs the task waited for."""

    def __init__(self) -> None:
        self.waited: list[Any] = []

    def get(self, ref: Any, timeout: float | None = None) -> None:
        self.waited.append(ref)


class _FakeTracker:
    """The progress actor's handle: each `.remote` call returns a ref naming the call."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        outer = self

        class Method:
            def __init__(self, name: str) -> None:
                self.name = name

            def remote(self, *args: Any) -> tuple[Any, ...]:
                ref = (self.name, *args)
                outer.calls.append(ref)
                return ref

        self.started, self.add = Method("started"), Method("add")


@pytest.mark.parametrize("fails", [False, True])
def test_a_tasks_last_progress_report_is_waited_for(monkeypatch: pytest.MonkeyPatch, fails: bool) -> None:
    # The driver polls the progress actor once it sees a task finished; a last report still in flight
    # then was lost (CI once saw 3 of 4 images). So the task returns only after the actor took it.
    fake_ray = _FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    monkeypatch.setattr(ray_executor, "REPORT_SECONDS", 3600.0)  # nothing is sent before the last report
    tracker = _FakeTracker()

    def work(task: int, progress: Any) -> int:
        progress(1, 5)
        if fails:
            raise ValueError("bad")
        return task

    kind, _ = ray_executor._run_one(work, 3, "k", tracker, os.getcwd())
    assert kind == ("error" if fails else "result")
    assert tracker.calls[-1] == ("add", "k", 1, 5)
    assert fake_ray.waited[-1] == ("add", "k", 1, 5)


def test_ray_executor_retries_dead_workers_not_raising_tasks(tmp_path: Path) -> None:
    tasks = [(str(tmp_path / f"marker{i}"), i) for i in range(2)]
    retried: list[tuple[Any, int | None]] = []
    outcomes = list(
        ray_executor.run_tasks(
            dies_once, tasks, None, retries=1, on_retry=lambda t, pid: retried.append((t, pid))
        )
    )
    assert sorted((o.result, o.error, o.attempts) for o in outcomes) == [(0, None, 2), (1, None, 2)]
    dead = {task: int(Path(task[0]).read_text()) for task in tasks}
    assert sorted(retried) == sorted(dead.items())  # on_retry got each task with its dead worker's pid

    log = tmp_path / "log"
    (failed,) = ray_executor.run_tasks(raises, [str(log)], None, retries=3)
    assert isinstance(failed.error, TaskFailed) and str(failed.error) == "ValueError: bad input 7"
    assert failed.attempts == 1 and failed.pid == int(log.read_text())


def test_ray_executor_times_out_a_silent_task_and_retries_it(tmp_path: Path) -> None:
    marker = tmp_path / "hung"
    (outcome,) = ray_executor.run_tasks(hangs_once, [str(marker)], None, timeout=1.0, retries=1)
    assert (outcome.result, outcome.error, outcome.attempts) == ("second try", None, 2)
    assert not is_running(int(marker.read_text()))  # the hung worker was killed


def test_ray_executor_stop_accounts_for_every_task(tmp_path: Path) -> None:
    folder = tmp_path / "pids"
    folder.mkdir()
    stop = StopFlag()

    def stop_once_two_run() -> None:
        wait_for_files(folder, 2, seconds=60)
        stop.set()

    setter = threading.Thread(target=stop_once_two_run)
    setter.start()
    start = time.monotonic()
    tasks = [(str(folder), i, 60.0) for i in range(5)]
    outcomes = list(ray_executor.run_tasks(slow, tasks, 2, stop=stop))
    elapsed = time.monotonic() - start
    setter.join()
    assert sorted(o.task[1] for o in outcomes) == [0, 1, 2, 3, 4]
    assert all(isinstance(o.error, Interrupted) and o.result is None for o in outcomes)
    started = sorted(int(p.name) for p in folder.iterdir())
    assert sorted(o.pid for o in outcomes if o.pid is not None) == started
    assert sorted((str(o.error), o.attempts) for o in outcomes) == [
        ("interrupted before it finished", 1),
        ("interrupted before it finished", 1),
        ("not started: the run was interrupted", 0),
        ("not started: the run was interrupted", 0),
        ("not started: the run was interrupted", 0),
    ]
    deadline = time.monotonic() + 10
    while any(is_running(pid) for pid in started) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [pid for pid in started if is_running(pid)] == []  # force-cancelled: the workers are gone
    assert elapsed < 30  # not the tasks' 60 s


# -- the command line -----------------------------------------------------------------------------------


def test_cli_on_an_existing_cluster_through_ray_address(
    tmp_path: Path, make_image: MakeImage, local_ray: str
) -> None:
    """A second driver (a new process, as on a cluster's head node) joins the module's Ray by address."""
    folder = tmp_path / "in"
    make_folder(folder, make_image, 3)
    (folder / "empty.png").write_bytes(b"")
    out = tmp_path / "out"
    args = ["-s", "internvl", "--max-tiles", "2", "--shard-size", "2", "--dtype", "uint8", "-q"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run(
        [sys.executable, "-m", "vlmtile", "preprocess", str(folder), "-o", str(out), *args,
         "--executor", "ray", "--ray-address", local_ray],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert result.returncode == 3, result.stderr  # finished, with one input in the error record
    assert f"1 inputs failed; see {out / '_errors.jsonl'}" in result.stderr
    assert "Traceback" not in result.stderr
    local = tmp_path / "local"
    again = CliRunner().invoke(cli, ["preprocess", str(folder), "-o", str(local), *args, "--workers", "2"])
    assert again.exit_code == 3
    assert_same_output(local, out)
    verified = CliRunner().invoke(cli, ["verify", str(out)])
    assert verified.exit_code == 0 and "OK: 2 shards, 3 records + 1 errors = 4 of 4 inputs" in verified.output


def test_sigterm_stops_a_ray_run_in_order_and_the_rerun_finishes(
    tmp_path: Path, make_image: MakeImage, local_ray: str
) -> None:
    """SIGTERM (Slurm, systemd, cron's kill) to a driver on a cluster: exit 1 with what finished named,
    its tasks cancelled; the same command then finishes the job with every input once."""
    folder = tmp_path / "in"
    inputs = []
    for i in range(16):  # enough that a fast machine is still busy when the signal comes
        path = folder / f"photo{i:02d}.png"
        save_image(make_image(900 + 17 * i, 700, "RGB", i), path, "PNG")
        inputs.append(path)
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "vlmtile", "preprocess", str(folder), "-o", str(out), "-s", "internvl",
        "--max-tiles", "6", "--shard-size", "1", "--dtype", "uint8", "-q",
        "--executor", "ray", "--ray-address", local_ray,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    records = out / "_shards"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if records.exists() and len(list(records.glob("task-*.json"))) >= 2:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be stopped: make the inputs bigger"
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, stderr
    assert "interrupted (SIGINT / SIGTERM)" in stderr and "run the same command again" in stderr
    ours = "\n".join(line for line in stderr.splitlines() if not line.startswith("("))  # Ray's own log lines
    assert "Traceback" not in ours and "SIGTERM received" not in stderr  # not Ray's abort
    assert not verify(str(out)).ok
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert rerun.returncode == 0, rerun.stderr
    assert_exactly_once(out, inputs)


def test_missing_ray_is_a_one_line_error(
    tmp_path: Path, make_image: MakeImage, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "in"
    make_folder(folder, make_image, 1)
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets when it is not installed
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli, ["preprocess", str(folder), "-o", str(out), "-s", "internvl", "--executor", "ray"]
    )
    assert result.exit_code == 1
    assert (
        result.output
        == "Error: --executor ray needs Ray, which is not installed: pip install 'vlmtile[ray]'\n"
    )
    assert not out.exists()  # nothing was touched, and nothing ran locally instead


def test_ray_address_needs_the_ray_executor(tmp_path: Path, make_image: MakeImage) -> None:
    folder = tmp_path / "in"
    make_folder(folder, make_image, 1)
    args = ["preprocess", str(folder), "-o", str(tmp_path / "out"), "-s", "internvl", "--ray-address", "auto"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "--ray-address is for --executor ray" in result.output


# -- locations ------------------------------------------------------------------------------------------


def test_file_urls_are_mounted_paths(tmp_path: Path, make_image: MakeImage) -> None:
    folder = tmp_path / "in"
    make_folder(folder, make_image, 3)
    as_urls = tmp_path / "urls"
    summary = run(folder.as_uri(), as_urls.as_uri())
    assert (summary.output, summary.records) == (str(as_urls), 3)
    plain = tmp_path / "plain"
    run(folder, plain)
    assert_same_output(plain, as_urls, frozenset({"inputs"}))  # same sources, names, bytes as plain paths
    assert read_manifest(as_urls)["inputs"] == [folder.as_uri()]  # the inputs as they were given


def test_ray_tasks_write_to_object_storage(tmp_path: Path, make_image: MakeImage) -> None:
    """Through the object-storage code path (staged, uploaded, named by copy): `local://` stands in for a
    bucket that the Ray workers reach on their own."""
    folder = tmp_path / "in"
    make_folder(folder, make_image, 5)
    url = f"local://{tmp_path / 'bucket'}"
    summary = run(folder, url, executor="ray")
    assert (summary.records, summary.shards, summary.complete) == (5, 3, True)
    assert verify(url).ok
    local = tmp_path / "local"
    run(folder, local, workers=2)
    assert_same_output(local, tmp_path / "bucket")


def test_a_lost_progress_actor_never_fails_a_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Progress is best effort: with its actor gone (its node died), a task still runs and reports."""
    monkeypatch.chdir(tmp_path)  # the task body changes directory: back to the test's after it
    actor = ray.remote(ray_executor._Tracker).options(num_cpus=0).remote()
    ray.kill(actor)
    assert ray_executor._run_one(double, 21, "0:1", actor, str(tmp_path)) == ("result", 42)
    assert ray_executor._run_one(double, 21, "0:1", None, str(tmp_path)) == ("result", 42)
