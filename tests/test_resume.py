"""Unattended runs: resume after kill -9 and SIGTERM, incremental reruns, settings and lock checks,
--retry-failed, --max-errors, disk full, --rank / --world-size, and `vlmtile verify`.

The kill tests run the real command in a subprocess and kill it with real signals at several points;
after the rerun every input must be in exactly one of a shard or the error record, and `verify` must pass.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from e2e_helpers import MakeImage, read_errors, read_manifest, save_image
from PIL import Image

import vlmtile
from vlmtile import runner as runner_module
from vlmtile import sinks, work
from vlmtile.cli import cli
from vlmtile.strategies.base import Plan
from vlmtile.strategies.internvl import InternVL
from vlmtile.verify import verify

STRATEGY = vlmtile.get_strategy("internvl", max_tiles=2)


def make_folder(folder: Path, make_image: MakeImage, count: int, start: int = 0) -> list[Path]:
    paths = []
    for i in range(start, start + count):
        path = folder / f"img{i:03d}.png"
        save_image(make_image(40 + i % 7, 30 + i % 5, "RGB", i), path, "PNG")
        paths.append(path)
    return paths


def config(folder: Path, out: Path, **kwargs: Any) -> vlmtile.RunConfig:
    base: dict[str, Any] = {
        "strategy": STRATEGY,
        "workers": 1,
        "shard_size": 2,
        "progress": False,
        "dtype": "uint8",
    }
    base.update(kwargs)
    return vlmtile.RunConfig(inputs=(str(folder),), output=str(out), **base)


def stored_sources(out: Path) -> list[str]:
    return [r["source"] for r in vlmtile.open_dataset(out, as_stored=True)]


def assert_exactly_once(out: Path, inputs: list[Path]) -> None:
    stored = stored_sources(out)
    failed = [e["source"] for e in read_errors(out)]
    counts = Counter(stored + failed)
    assert sorted(counts) == sorted(str(p) for p in inputs)
    assert set(counts.values()) == {1}, [s for s, n in counts.items() if n > 1]
    report = verify(str(out))
    assert report.ok, report.problems


# -- incremental and resume in process ------------------------------------------------------------------


def test_rerun_is_incremental(tmp_path: Path, make_image: MakeImage) -> None:
    folder = tmp_path / "in"
    out = tmp_path / "out"
    first = make_folder(folder, make_image, 5)
    summary = vlmtile.preprocess(config(folder, out))
    assert (summary.records, summary.shards) == (5, 3)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}

    again = vlmtile.preprocess(config(folder, out))  # nothing new: nothing done, nothing touched
    assert (again.records, again.shards) == (5, 3)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")} == before

    new = make_folder(folder, make_image, 3, start=5)
    grown = vlmtile.preprocess(config(folder, out))
    assert (grown.records, grown.shards) == (8, 5)  # the new inputs went into new shards
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*") if p.name in before} == before
    assert read_manifest(out)["runs"] == 2  # the idle run planned nothing
    assert_exactly_once(out, first + new)
    # The records equal what a single run over all the images gives.
    single = tmp_path / "single"
    vlmtile.preprocess(config(folder, single))
    assert sorted(r["key"] for r in vlmtile.open_dataset(out)) == sorted(
        r["key"] for r in vlmtile.open_dataset(single)
    )


def test_other_settings_are_refused(tmp_path: Path, make_image: MakeImage) -> None:
    folder = tmp_path / "in"
    make_folder(folder, make_image, 2)
    out = tmp_path / "out"
    vlmtile.preprocess(config(folder, out))
    with pytest.raises(
        vlmtile.VlmtileError, match=r"other settings \(strategy\.params\.max_tiles: was 2, now 4"
    ):
        vlmtile.preprocess(config(folder, out, strategy=vlmtile.get_strategy("internvl", max_tiles=4)))
    with pytest.raises(vlmtile.VlmtileError, match=r"dtype: was 'uint8', now 'float16'"):
        vlmtile.preprocess(config(folder, out, dtype="float16"))
    rebuilt = vlmtile.preprocess(config(folder, out, dtype="float16", overwrite=True))
    assert rebuilt.records == 2 and read_manifest(out)["dtype"] == "float16"


HOLD_LOCK = """
import fcntl, json, os, socket, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX if sys.argv[2] == "ex" else fcntl.LOCK_SH)
if sys.argv[2] == "ex":
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "t0"}).encode())
print("held", flush=True)
time.sleep(60)
"""


def hold_lock(path: Path, mode: str = "ex") -> subprocess.Popen[str]:
    """Another process holding the run lock the way a live vlmtile run does (flock)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(path), mode], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    return holder


def release(*holders: subprocess.Popen[str]) -> None:
    """Kill the holders (as kill -9 would a run) and reap them."""
    for holder in holders:
        holder.kill()
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()


def test_lock_refuses_a_live_run_and_takes_over_after_a_kill(tmp_path: Path, make_image: MakeImage) -> None:
    folder = tmp_path / "in"
    make_folder(folder, make_image, 2)
    out = tmp_path / "out"
    out.mkdir()
    holder = hold_lock(out / "_lock")
    try:
        with pytest.raises(
            vlmtile.VlmtileError, match=rf"another vlmtile run holds .*_lock \(pid {holder.pid} on "
        ):
            vlmtile.preprocess(config(folder, out))
        assert not (out / "_run.json").exists()  # refused before touching anything
    finally:
        release(holder)
    # Killed: the kernel released its lock; the file still names it, so the takeover is reported.
    summary = vlmtile.preprocess(config(folder, out))
    assert summary.records == 2
    assert summary.took_over is not None and summary.took_over["pid"] == holder.pid
    assert (out / "_lock").read_text() == ""  # released: names nobody
    again = vlmtile.preprocess(config(folder, out))
    assert again.took_over is None  # a run that ended normally leaves nothing to take over


def test_lock_naming_a_live_pid_is_not_held(tmp_path: Path, make_image: MakeImage) -> None:
    """After a reboot the pid in a stale lock may belong to another process: only the flock counts."""
    folder = tmp_path / "in"
    make_folder(folder, make_image, 1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "_lock").write_text(json.dumps({"pid": 1, "host": os.uname().nodename, "started": "t0"}))
    summary = vlmtile.preprocess(config(folder, out))
    assert summary.records == 1 and summary.took_over == {
        "pid": 1,
        "host": os.uname().nodename,
        "started": "t0",
    }


def test_ranks_run_side_by_side_but_not_beside_a_plain_run(tmp_path: Path, make_image: MakeImage) -> None:
    folder = tmp_path / "in"
    make_folder(folder, make_image, 4)
    out = tmp_path / "out"
    out.mkdir()
    rank1 = hold_lock(out / "_lock.rank-1")
    shared = hold_lock(out / "_lock", "sh")  # what rank 1's run holds on the main lock
    try:
        with pytest.raises(vlmtile.VlmtileError, match=r"runs with --rank hold .*_lock"):
            vlmtile.preprocess(config(folder, out))
        with pytest.raises(vlmtile.VlmtileError, match=r"another run of rank 1 holds .*_lock\.rank-1"):
            vlmtile.preprocess(config(folder, out, rank=1, world_size=2))
        summary = vlmtile.preprocess(config(folder, out, rank=0, world_size=2))  # another rank: fine
        assert summary.complete is False
    finally:
        release(rank1, shared)
    plain = hold_lock(out / "_lock")
    try:
        with pytest.raises(vlmtile.VlmtileError, match=r"a run without --rank holds .*_lock \(pid"):
            vlmtile.preprocess(config(folder, out, rank=1, world_size=2))
    finally:
        release(plain)
    assert vlmtile.preprocess(config(folder, out, rank=1, world_size=2)).complete is True


def test_failed_file_that_changed_is_redone_without_asking(tmp_path: Path, make_image: MakeImage) -> None:
    """The cron case: a file still being copied fails; once the copy has finished it is processed."""
    folder = tmp_path / "in"
    good = make_folder(folder, make_image, 3)
    late = folder / "late.png"
    late.write_bytes(b"\x89PNG\r\n\x1a\n half copied")
    out = tmp_path / "out"
    first = vlmtile.preprocess(config(folder, out))
    assert (first.records, first.failures) == (3, 1)
    unchanged = vlmtile.preprocess(config(folder, out))
    assert (unchanged.records, unchanged.failures, read_manifest(out)["runs"]) == (3, 1, 1)  # not retried
    save_image(make_image(33, 44, "RGB", 9), late, "PNG")  # the copy finished: new size, new mtime
    finished = vlmtile.preprocess(config(folder, out))
    assert (finished.records, finished.failures, finished.changed) == (4, 0, 0)
    assert read_errors(out) == []
    assert_exactly_once(out, [*good, late])
    assert read_manifest(out)["totals"]["inputs"] == 4


def test_retry_failed_retries_unchanged_inputs(
    tmp_path: Path, make_image: MakeImage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transient failure (a network blip, a flaky mount) leaves the file as it was: --retry-failed."""
    folder = tmp_path / "in"
    inputs = make_folder(folder, make_image, 4)
    out = tmp_path / "out"
    real_read = work.read_bytes

    def flaky(path: str) -> bytes:
        if path.endswith("img002.png"):
            raise vlmtile.ImageError("cannot read file: Input/output error")
        return real_read(path)

    monkeypatch.setattr(work, "read_bytes", flaky)
    assert vlmtile.preprocess(config(folder, out)).failures == 1
    monkeypatch.setattr(work, "read_bytes", real_read)  # the mount is back
    assert vlmtile.preprocess(config(folder, out)).failures == 1  # nothing changed: not retried
    retried = vlmtile.preprocess(config(folder, out, retry_failed=True))
    assert (retried.records, retried.failures) == (4, 0)
    assert_exactly_once(out, inputs)
    again = vlmtile.preprocess(config(folder, out, retry_failed=True))  # nothing failed: nothing to do
    assert (again.records, again.failures) == (4, 0)
    assert read_manifest(out)["runs"] == 2


def test_stored_file_that_changed_is_reported_not_duplicated(tmp_path: Path, make_image: MakeImage) -> None:
    folder = tmp_path / "in"
    inputs = make_folder(folder, make_image, 3)
    out = tmp_path / "out"
    vlmtile.preprocess(config(folder, out))
    keys = [r["key"] for r in vlmtile.open_dataset(out)]
    save_image(make_image(50, 50, "RGB", 99), inputs[1], "PNG")  # edited in place after processing
    os.utime(inputs[2], ns=(1, 1))  # touched: same bytes, another mtime
    runner = CliRunner()
    args = ["preprocess", str(folder), "-o", str(out), "-s", "internvl", "--max-tiles", "2"]
    args += ["--shard-size", "2", "--dtype", "uint8", "--workers", "1"]
    loud = runner.invoke(cli, [*args, "-q"])
    assert loud.exit_code == 0, loud.output
    assert "warning: 2 inputs changed after they were processed and keep their old records" in loud.stderr
    assert [r["key"] for r in vlmtile.open_dataset(out)] == keys  # nothing redone, nothing duplicated
    changed = [json.loads(line) for line in (out / "_changed.jsonl").read_text().splitlines()]
    assert [c["source"] for c in changed] == [str(inputs[1]), str(inputs[2])]
    assert changed[1]["now"] == f"{inputs[2].stat().st_size}:1"
    assert read_manifest(out)["changed_inputs"] == 2
    quiet = runner.invoke(cli, [*args, "-q"])  # the same two: cron is not told again every hour
    assert quiet.exit_code == 0 and quiet.stderr == ""
    told = runner.invoke(cli, args)
    assert "warning: 2 inputs changed" in told.stderr
    assert_exactly_once(out, inputs)
    rebuilt = runner.invoke(cli, [*args, "--overwrite", "-q"])
    assert rebuilt.exit_code == 0 and rebuilt.stderr == ""
    assert read_manifest(out)["changed_inputs"] == 0


def _tar(path: Path, samples: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_tar_copied_halfway_is_finished_from_where_it_stopped(tmp_path: Path, make_image: MakeImage) -> None:
    """A tar shard read while still being copied: its complete samples are stored, the damage is one
    error line; once the copy is complete, the next run reads only the samples it had not done."""
    members = []
    for i in range(6):
        buf = io.BytesIO()
        make_image(30 + i, 20, "RGB", i).save(buf, "PNG")
        members += [(f"s{i}.png", buf.getvalue()), (f"s{i}.txt", f"caption {i}".encode())]
    full = tmp_path / "full.tar"
    _tar(full, members)
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    shard = incoming / "shard-0001.tar"
    shard.write_bytes(full.read_bytes()[: len(full.read_bytes()) // 2])  # cp is half-way through
    out = tmp_path / "out"
    first = vlmtile.preprocess(config(incoming, out))
    stored_first = [r["orig_key"] for r in vlmtile.open_dataset(out)]
    assert 0 < len(stored_first) < 6 and first.failures == 1
    (error,) = read_errors(out)
    assert error["source"] == str(shard) and error["stage"] == "read"
    assert vlmtile.preprocess(config(incoming, out)).failures == 1  # unchanged: the damage stays
    assert len(list(vlmtile.open_dataset(out))) == len(stored_first)

    shard.write_bytes(full.read_bytes())  # the copy finished
    done = vlmtile.preprocess(config(incoming, out))
    assert (done.records, done.failures, done.inputs) == (6, 0, 6)
    assert read_errors(out) == []
    records = list(vlmtile.open_dataset(out))
    assert [r["orig_key"] for r in records] == [f"s{i}" for i in range(6)]  # each once, in tar order
    assert [r["sample"]["txt"] for r in records] == [f"caption {i}" for i in range(6)]
    assert verify(str(out)).ok


def test_retry_of_a_damaged_tar_never_duplicates(tmp_path: Path, make_image: MakeImage) -> None:
    members = []
    for i in range(4):
        buf = io.BytesIO()
        make_image(30, 20 + i, "RGB", i).save(buf, "PNG")
        members.append((f"s{i}.png", buf.getvalue()))
    shard = tmp_path / "in" / "broken.tar"
    shard.parent.mkdir()
    _tar(shard, members)
    raw = bytearray(shard.read_bytes())
    at = raw.index(b"s2.png\x00")
    raw[at + 148 : at + 156] = b"garbage!"  # a damaged header: s0 is stored; s1, before it, may be cut
    shard.write_bytes(bytes(raw))
    out = tmp_path / "out"
    first = vlmtile.preprocess(config(shard.parent, out))
    assert (first.records, first.failures, first.inputs) == (1, 1, 2)
    for _ in range(2):
        again = vlmtile.preprocess(config(shard.parent, out, retry_failed=True))
        assert (again.records, again.failures, again.inputs) == (1, 1, 2)
    assert [r["orig_key"] for r in vlmtile.open_dataset(out)] == ["s0"]
    assert len(read_errors(out)) == 1 and verify(str(out)).ok
    assert read_manifest(out)["runs"] == 3


def test_max_errors_stops_and_rerun_finishes(tmp_path: Path, make_image: MakeImage) -> None:
    folder = tmp_path / "in"
    good = make_folder(folder, make_image, 4)
    bad = []
    for i in range(4):
        path = folder / f"bad{i}.png"
        path.write_bytes(b"")
        bad.append(path)
    out = tmp_path / "out"
    with pytest.raises(vlmtile.RunStopped, match=r"stopped after 2 failed inputs \(--max-errors 1\)"):
        vlmtile.preprocess(config(folder, out, max_errors=1, shard_size=2))
    assert read_manifest(out)["complete"] is False
    assert not verify(str(out)).ok
    summary = vlmtile.preprocess(config(folder, out, shard_size=2))
    assert (summary.records, summary.failures, summary.complete) == (4, 4, True)
    assert_exactly_once(out, good + bad)


def test_max_errors_as_a_rate(tmp_path: Path, make_image: MakeImage, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--max-errors 20%`: judged from RATE_MIN_INPUTS inputs of the run on, so one bad file early does not
    stop a run, and the rate is of this run's inputs, not of the whole directory's."""
    monkeypatch.setattr(runner_module, "RATE_MIN_INPUTS", 6)
    folder = tmp_path / "in"
    good = make_folder(folder, make_image, 8)
    bad = [folder / "a_bad.png"]  # sorts first: 1 of 1 failed when the first task ends
    bad[0].write_bytes(b"")
    out = tmp_path / "out"
    summary = vlmtile.preprocess(config(folder, out, max_error_rate=0.2, shard_size=1))  # 1 of 9: 11%
    assert (summary.records, summary.failures) == (8, 1)
    for i in range(3):
        bad.append(folder / f"c_bad{i}.png")
        bad[-1].write_bytes(b"")
    good += make_folder(folder, make_image, 5, start=8)
    with pytest.raises(
        vlmtile.RunStopped, match=r"stopped: 3 of 6 inputs failed \(50\.0%; --max-errors 20%\)"
    ):
        vlmtile.preprocess(config(folder, out, max_error_rate=0.2, shard_size=1))
    assert len(stored_sources(out)) == 8 + 3  # img011 and img012 were not started
    rest = vlmtile.preprocess(config(folder, out, shard_size=1))
    assert (rest.records, rest.failures) == (13, 4)
    assert_exactly_once(out, good + bad)


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("12", None),
        ("2.5%", None),
        ("0%", None),
        ("-1", "not a count"),
        ("100%", "below 100"),
        ("x", "not a count"),
    ],
)
def test_max_errors_option(tmp_path: Path, make_image: MakeImage, value: str, error: str | None) -> None:
    folder = tmp_path / "in"
    make_folder(folder, make_image, 1)
    result = CliRunner().invoke(
        cli,
        [
            "preprocess",
            str(folder),
            "-o",
            str(tmp_path / "out"),
            "-s",
            "internvl",
            "-q",
            "--max-errors",
            value,
        ],
    )
    if error is None:
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code == 2 and error in result.output


def test_disk_full_stops_cleanly_and_rerun_finishes(
    tmp_path: Path, make_image: MakeImage, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "in"
    inputs = make_folder(folder, make_image, 6)
    out = tmp_path / "out"
    real_write = sinks.ParquetSink.write
    calls = {"n": 0}

    def write(self: sinks.ParquetSink, record: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(28, "No space left on device")
        real_write(self, record)

    monkeypatch.setattr(sinks.ParquetSink, "write", write)
    with pytest.raises(vlmtile.RunStopped, match="disk full while writing task 1"):
        vlmtile.preprocess(config(folder, out))
    assert [p.name for p in out.iterdir() if p.name.startswith((".part", "..part"))] == []
    assert read_errors(out) == []  # a full disk is not the inputs' fault
    monkeypatch.setattr(sinks.ParquetSink, "write", real_write)
    summary = vlmtile.preprocess(config(folder, out))
    assert (summary.records, summary.failures) == (6, 0)
    assert_exactly_once(out, inputs)


def test_disk_full_while_writing_the_manifest(
    tmp_path: Path, make_image: MakeImage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parent's own writes can hit a full disk too: one clear line, exit 1, nothing half-written."""
    folder = tmp_path / "in"
    inputs = make_folder(folder, make_image, 3)
    out = tmp_path / "out"
    real = runner_module.write_json_atomic

    def full(path: str, data: Any, *, lines: bool = False) -> None:
        if path.endswith("_manifest.json"):
            raise OSError(28, "No space left on device", path)
        real(path, data, lines=lines)

    monkeypatch.setattr(runner_module, "write_json_atomic", full)
    args = ["preprocess", str(folder), "-o", str(out), "-s", "internvl", "--max-tiles", "2", "-q"]
    result = CliRunner().invoke(cli, [*args, "--workers", "1"])
    assert result.exit_code == 1
    assert "disk full in" in result.stderr and "No space left on device" in result.stderr
    assert "Traceback" not in result.output + result.stderr
    assert not (out / "_manifest.json").exists()
    monkeypatch.setattr(runner_module, "write_json_atomic", real)  # space was freed
    again = CliRunner().invoke(cli, [*args, "--workers", "1"])
    assert again.exit_code == 0, again.output
    assert_exactly_once(out, inputs)


def test_rank_and_world_size_split_and_merge(tmp_path: Path, make_image: MakeImage) -> None:
    folder = tmp_path / "in"
    inputs = make_folder(folder, make_image, 7)
    out = tmp_path / "out"
    first = vlmtile.preprocess(config(folder, out, rank=1, world_size=2))
    assert first.complete is False
    assert stored_sources(out) == []  # task 0 (rank 0's) is not done: nothing can be named yet
    second = vlmtile.preprocess(config(folder, out, rank=0, world_size=2))
    assert second.complete is True and second.records == 7
    plan = [json.loads(line) for line in (out / "_plan.jsonl").read_text().splitlines()]
    assert len(plan) == 4
    assert_exactly_once(out, inputs)
    single = tmp_path / "single"
    vlmtile.preprocess(config(folder, single))
    assert [s["sha256"] for s in read_manifest(out)["shards"]] == [
        s["sha256"] for s in read_manifest(single)["shards"]
    ]


# -- a worker dying mid-task is retried -----------------------------------------------------------------


def _marker(height: int) -> Path:
    return Path(tempfile.gettempdir()) / f"vlmtile-dies-once-{height}"


@dataclass(frozen=True)
class DiesOnce(InternVL):
    """Kills its worker outright the first time it renders a 13-px-wide image; a marker file named after
    the image's height remembers (a strategy field would change the params stored in the manifest)."""

    def render(self, image: Image.Image, plan: Plan) -> np.ndarray:
        marker = _marker(plan.orig_height)
        if plan.orig_width == 13 and not marker.exists():
            marker.write_text("died once")
            os._exit(9)
        return super().render(image, plan)


def test_worker_killed_mid_task_is_retried(tmp_path: Path, make_image: MakeImage) -> None:
    folder = tmp_path / "in"
    inputs = make_folder(folder, make_image, 5)
    height = 100 + os.getpid() % 1000  # unique to this test run
    marker = _marker(height)
    marker.unlink(missing_ok=True)
    save_image(make_image(13, height, "RGB", 1), folder / "img001.png", "PNG")
    out = tmp_path / "out"
    try:
        summary = vlmtile.preprocess(
            config(folder, out, strategy=DiesOnce(name="internvl", max_tiles=2), workers=2)
        )
        assert marker.exists()  # it did die once
    finally:
        marker.unlink(missing_ok=True)
    assert (summary.records, summary.failures) == (5, 0)  # and the retry completed its task
    assert_exactly_once(out, inputs)


# -- real kills -----------------------------------------------------------------------------------------


def _command(folder: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "vlmtile", "preprocess", str(folder), "-o", str(out), "-s", "internvl",
        "--max-tiles", "6", "--shard-size", "1", "--workers", "2", "-q", "--dtype", "uint8",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory: pytest.TempPathFactory, make_image: MakeImage) -> tuple[Path, list[Path]]:
    folder = tmp_path_factory.mktemp("kill-in")
    paths = []
    for i in range(16):
        path = folder / f"photo{i:02d}.png"
        save_image(make_image(900 + 17 * i, 700, "RGB", i), path, "PNG")
        paths.append(path)
    return folder, paths


def session_processes(sid: int) -> list[int]:
    """Pids of the live (not zombie) processes in session `sid`, from /proc."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[3]) == sid and fields[0] != "Z":
                pids.append(int(entry.name))
    return pids


@pytest.mark.parametrize(
    ("how", "after_records"),
    [("kill -9 group", 1), ("kill -9 group", 6), ("kill -9 parent", 4), ("SIGTERM", 3)],
)
def test_killed_run_is_finished_by_the_next(
    big_folder: tuple[Path, list[Path]], tmp_path: Path, how: str, after_records: int
) -> None:
    folder, inputs = big_folder
    out = tmp_path / "out"
    process = subprocess.Popen(
        _command(folder, out), stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    deadline = time.monotonic() + 60
    records = out / "_shards"
    while time.monotonic() < deadline and process.poll() is None:
        if records.exists() and len(list(records.glob("task-*.json"))) >= after_records:
            break
        time.sleep(0.02)
    assert process.poll() is None, "the run finished before it could be killed: make the inputs bigger"
    if how == "kill -9 group":
        os.killpg(process.pid, signal.SIGKILL)  # parent and workers at once
    elif how == "kill -9 parent":
        os.kill(process.pid, signal.SIGKILL)  # the parent alone: its workers must not live on
    else:
        os.kill(process.pid, signal.SIGTERM)  # what cron / systemd / Slurm send
    _, stderr = process.communicate(timeout=60)
    if how == "SIGTERM":
        assert process.returncode == 1
        assert "interrupted" in stderr and "run the same command again" in stderr
    else:
        assert process.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while session_processes(process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert session_processes(process.pid) == [], "a worker outlived its run"
    assert "Traceback" not in stderr
    assert not verify(str(out)).ok  # not finished: verify says so
    rerun = subprocess.run(_command(folder, out), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    if how == "SIGTERM":
        assert rerun.stderr == ""  # an orderly stop released the lock: nothing to report
    else:
        assert f"an earlier run (pid {process.pid} on " in rerun.stderr and "was killed" in rerun.stderr
    assert_exactly_once(out, inputs)
    verified = CliRunner().invoke(cli, ["verify", str(out)])
    assert verified.exit_code == 0, verified.output
    assert "OK" in verified.output


# -- verify -----------------------------------------------------------------------------------------------


def test_verify_finds_damage(tmp_path: Path, make_image: MakeImage) -> None:
    folder = tmp_path / "in"
    make_folder(folder, make_image, 4)
    out = tmp_path / "out"
    vlmtile.preprocess(config(folder, out, format="webdataset"))
    runner = CliRunner()
    ok = runner.invoke(cli, ["verify", str(out)])
    assert ok.exit_code == 0 and "OK: 2 shards, 4 records + 0 errors = 4 of 4 inputs" in ok.output

    shard = out / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF  # one flipped bit inside a member
    shard.write_bytes(bytes(data))
    damaged = runner.invoke(cli, ["verify", str(out)])
    assert damaged.exit_code == 1
    assert "shard-000001.tar: checksum differs" in damaged.output
    quick = runner.invoke(cli, ["verify", str(out), "--quick"])  # same size, same count: quick cannot see it
    assert quick.exit_code == 0

    shard.unlink()
    (out / "shard-000007.tar").write_bytes(b"")
    missing = runner.invoke(cli, ["verify", str(out), "--quick"])
    assert missing.exit_code == 1
    assert "shard-000001.tar: missing" in missing.output
    assert "shard-000007.tar looks like a shard but is not in the manifest" in missing.output
    assert (
        "records + errors = 2, but there were 4 inputs" not in missing.output
    )  # counts come from the manifest
    nothing = runner.invoke(cli, ["verify", str(tmp_path)])
    assert nothing.exit_code == 1 and "no _manifest.json" in nothing.output


def test_two_concurrent_runs_one_refuses(big_folder: tuple[Path, list[Path]], tmp_path: Path) -> None:
    folder, inputs = big_folder
    out = tmp_path / "out"
    first = subprocess.Popen(_command(folder, out), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (out / "_lock").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    second = subprocess.run(_command(folder, out), capture_output=True, text=True, timeout=120)
    _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err
    assert second.returncode == 1
    assert "another vlmtile run holds" in second.stderr
    assert_exactly_once(out, inputs)


def test_unwritable_output_is_a_clear_error(tmp_path: Path, make_image: MakeImage) -> None:
    folder = tmp_path / "in"
    make_folder(folder, make_image, 1)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory\n")
    result = CliRunner().invoke(
        cli, ["preprocess", str(folder), "-o", str(blocker / "out"), "-s", "internvl"]
    )
    assert result.exit_code == 1
    assert f"cannot write to {blocker / 'out'}" in result.output
    assert "Traceback" not in result.output
