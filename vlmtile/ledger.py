"""The run's state on disk: settings, lock, task plan, completion records, and finalizing shard names.

Everything that lets `preprocess` run from cron lives here. The output directory is the only state: a
run reads it, adds to it and never trusts memory, so a killed run is finished by the next one.

- `_run.json`: the settings (strategy, params, output options) and their hash, written by the first run.
  A later run with other settings is refused: one directory never mixes two preprocessings.
- `_lock` (plus `_lock.rank-R` with `--rank`): flock held by a live run, released by the kernel however
  the run dies; a run that finds a free lock still naming a holder reports that run as killed.
- `_plan.jsonl`: every task ever planned (its inputs, by source), appended under `_plan.lock` so that
  concurrent ranks agree on it. Inputs not in the plan yet (new files, new manifest lines) become new tasks
  after the existing ones: this is the incremental mode.
- `_shards/task-NNNNNN.json`: a task's completion record, written after its files are in place, with
  each input's stamp (size and mtime) as processed. A planned task without one is redone (its partial
  files removed first). Comparing stamps tells a rerun which failed inputs changed (redone: a file that
  was still being copied) and which stored ones changed (kept, listed in `_changed.jsonl`).
- Finalizing, under `_plan.lock`, walks tasks in plan order and renames each completed task's files to the
  next `PREFIX-%06d` name, stopping at the first task not complete yet, so names never depend on timing;
  then `_errors.jsonl`, `_manifest.json` (last) and the wids index are rewritten from the records.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from . import storage
from .errors import VlmtileError

RUN_FILE = "_run.json"
PLAN_FILE = "_plan.jsonl"
PLAN_LOCK = "_plan.lock"
TASK_RECORDS = "_shards"
MANIFEST = "_manifest.json"
ERRORS = "_errors.jsonl"
WIDS_INDEX = "_index.wids.json"
CHANGED = "_changed.jsonl"


def write_json_atomic(path: str, data: Any, *, lines: bool = False) -> None:
    """Temp file, fsync, rename (or one object upload): a reader sees the old file or the new one."""
    if lines:
        text = "".join(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n" for row in data)
    else:
        text = json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    storage.write_atomic(path, text.encode("utf-8"))


def read_json(path: str) -> Any:
    """The parsed file; `FileNotFoundError` when it is not there."""
    return json.loads(storage.read_bytes(path).decode("utf-8"))


def config_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


# -- the directory --------------------------------------------------------------------------------------

_SHARD_NAME = re.compile(r"^\.?[\w-]+-\d{5,6}\.(parquet|tar)(\.tmp-\d+)?$")
_OURS = (MANIFEST, ERRORS, TASK_RECORDS, WIDS_INDEX, RUN_FILE, PLAN_FILE, PLAN_LOCK, CHANGED)
"""What --overwrite removes (besides shards and part files); the run locks stay: they are held by then."""


def existing_output(output: str) -> list[str]:
    """Names in `output` that vlmtile wrote (shards, part files, run state), sorted; nothing else."""
    if not storage.isdir(output):
        return []
    ours = []
    for name in storage.listdir(output):
        if name in _OURS or _SHARD_NAME.match(name) is not None or name.startswith((".part-", "..part-")):
            ours.append(name)
    return sorted(ours)


def remove_output(output: str) -> None:
    """--overwrite, under the run lock: remove everything vlmtile wrote in `output` (and nothing else)."""
    for name in existing_output(output):
        path = storage.join(output, name)
        if name == TASK_RECORDS:
            storage.rmtree(path)
        else:
            storage.remove(path)


def prepare_output(output: str) -> None:
    """Create the output directory (the run lock lives in it)."""
    if storage.is_remote(output):
        storage.filesystem(output)  # fsspec and the scheme's backend are there, or say so now
    elif os.path.exists(output) and not os.path.isdir(output):
        raise VlmtileError(f"output {output} exists and is not a directory")
    storage.makedirs(output)


# -- settings -------------------------------------------------------------------------------------------


def check_settings(output: str, settings: dict[str, Any], version: str) -> bool:
    """Record the settings on the first run; refuse a run whose settings differ. True if resuming."""
    path = storage.join(output, RUN_FILE)
    digest = config_hash(settings)
    if not storage.exists(path):
        write_json_atomic(path, {"settings": settings, "config_hash": digest, "vlmtile_version": version})
        return False
    stored = read_json(path)
    if stored.get("config_hash") == digest:
        return True
    differ = differences(stored.get("settings", {}), settings)
    raise VlmtileError(
        f"{output} was made with other settings ({'; '.join(differ[:4]) or 'unknown'}); "
        "a directory never mixes two preprocessings: use another output directory, or --overwrite to "
        "start this one again"
    )


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """`key.path: was X, now Y` for every setting that differs (for refusal messages)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            out += differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    if old != new:
        return [f"{prefix.rstrip('.')}: was {old!r}, now {new!r}"]
    return []


# -- locks ----------------------------------------------------------------------------------------------


def _holder() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": datetime.now(UTC).isoformat()}


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "details unknown"
    return f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('started')}"


def _try_flock(path: str, exclusive: bool) -> int | None:
    """An open descriptor holding flock on `path`, or None when another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError as e:
        os.close(fd)
        raise VlmtileError(
            f"cannot lock {path}: {e.strerror or e} (the file system must support flock; on NFS, "
            "mount with locking enabled)"
        ) from None
    return fd


def _read_holder(fd: int) -> dict[str, Any] | None:
    try:
        raw = os.pread(fd, 4096, 0)
        data = json.loads(raw) if raw.strip() else None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_holder(fd: int, holder: dict[str, Any] | None) -> None:
    os.ftruncate(fd, 0)
    if holder is not None:
        os.pwrite(fd, json.dumps(holder).encode(), 0)


@dataclass
class RunLock:
    """What taking the run lock found: the holder of a lock left by a killed run, if there was one."""

    took_over: dict[str, Any] | None = None


LEASE_SECONDS = 120.0
"""An object-storage run lock not renewed for this long belongs to a killed run."""
LEASE_RENEW = 20.0
"""How often a live run renews its lease."""
LEASE_SETTLE = 0.5
"""Seconds between writing a lease and reading it back, to see a run that started at the same moment."""


@contextlib.contextmanager
def run_lock(output: str, rank: int | None = None) -> Iterator[RunLock]:
    """Hold the run lock for the whole run (see `_flock_run_lock`; on object storage `_lease`)."""
    if storage.is_remote(output):
        if rank is not None:
            raise VlmtileError(
                f"--rank needs a shared lock, which object storage ({output}) cannot give: give each rank "
                "its own output and merge them with `vlmtile merge-manifests`, or use a shared file system"
            )
        with _lease(output) as state:
            yield state
    else:
        with _flock_run_lock(output, rank) as state:
            yield state


@contextlib.contextmanager
def _lease(output: str) -> Iterator[RunLock]:
    """The run lock on object storage, where there is no flock: a `_lock` object naming its holder,
    renewed every `LEASE_RENEW` seconds by a thread and removed at the end.

    A lease renewed within `LEASE_SECONDS` refuses the run; an older one was left by a killed run and is
    taken over (reported like a killed run's flock). Two runs starting within the same half second could
    both write a lease: each reads it back after `LEASE_SETTLE` and the one that finds the other's gives
    up, but a slower store could still let both in. This is advisory, not a guarantee like flock: start
    runs on object storage from one scheduler (one cron host). Clocks of the hosts involved must agree to
    well within a minute.
    """
    path = storage.join(output, "_lock")
    try:
        holder = read_json(path)
    except (FileNotFoundError, ValueError):
        holder = None
    now = time.time()
    if isinstance(holder, dict) and now - float(holder.get("renewed", 0)) < LEASE_SECONDS:
        raise VlmtileError(
            f"another vlmtile run holds {path} ({_describe(holder)}); wait for it to finish (a lease "
            f"renewed every {LEASE_RENEW:g} s: a killed run's expires after {LEASE_SECONDS:g} s)"
        )
    mine = {**_holder(), "token": uuid.uuid4().hex, "renewed": now}
    write_json_atomic(path, mine)
    time.sleep(LEASE_SETTLE)
    try:
        seen = read_json(path)
    except (FileNotFoundError, ValueError):
        seen = None
    if not isinstance(seen, dict) or seen.get("token") != mine["token"]:
        raise VlmtileError(f"another vlmtile run took {path} at the same moment ({_describe(seen)})")
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(LEASE_RENEW):
            with contextlib.suppress(Exception):  # a blip: the next renewal tries again
                write_json_atomic(path, {**mine, "renewed": time.time()})

    renewer = threading.Thread(target=renew, name="vlmtile-lease", daemon=True)
    renewer.start()
    try:
        yield RunLock(took_over=holder if isinstance(holder, dict) else None)
    finally:
        stop.set()
        renewer.join()
        storage.remove(path)


@contextlib.contextmanager
def _flock_run_lock(output: str, rank: int | None = None) -> Iterator[RunLock]:
    """Hold the run lock for the whole run; refuse when a live run holds it.

    The lock is `flock` on `OUT/_lock` (exclusive), or with `--rank` a shared lock on `_lock` plus an
    exclusive one on `_lock.rank-R`: ranks run side by side, but never beside a plain run or the same rank
    twice. The kernel releases a flock when its process dies however it dies (kill -9, OOM killer, power
    loss of an NFS client, once the server notices), so a lock can never be stale: there is no pid to
    check, and a pid reused after a reboot cannot keep cron out forever. The files stay (removing a file
    others may have open races with them); while held, the exclusive one names its holder (pid, host,
    start) for the message a refused run prints, and a holder still named there when the lock is free
    was killed: it is reported as taken over.
    """
    paths = [(os.path.join(output, "_lock"), rank is None)]
    if rank is not None:
        paths.append((os.path.join(output, f"_lock.rank-{rank}"), True))
    held: list[int] = []
    try:
        state = RunLock()
        for path, exclusive in paths:
            try:
                fd = _try_flock(path, exclusive)
            except PermissionError:
                raise VlmtileError(f"cannot write to {output}: permission denied") from None
            if fd is None:
                probe = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                try:
                    holder = _read_holder(probe)
                finally:
                    os.close(probe)
                if holder is None and rank is None:  # held shared, by runs with --rank
                    who = "runs with --rank hold"
                elif rank is not None and not exclusive:
                    who = "a run without --rank holds"
                else:
                    who = "another vlmtile run holds" if rank is None else f"another run of rank {rank} holds"
                raise VlmtileError(f"{who} {path} ({_describe(holder)}); wait for it to finish")
            held.append(fd)
            if exclusive:
                state.took_over = state.took_over or _read_holder(fd)
                _write_holder(fd, _holder())
        yield state
    finally:
        for fd, (_, exclusive) in zip(held, paths, strict=False):
            if exclusive:
                with contextlib.suppress(OSError):
                    _write_holder(fd, None)
            os.close(fd)


@contextlib.contextmanager
def plan_lock(output: str) -> Iterator[None]:
    """A short exclusive lock (flock) around reading and extending the plan and around finalizing.

    flock is released by the kernel when the process dies, so it can never go stale. On object storage
    the run lock (a lease) is all there is: a run there never has company (no --rank).
    """
    if storage.is_remote(output):
        yield
        return
    fd = os.open(os.path.join(output, PLAN_LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# -- the plan -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedTask:
    """One planned task: listed inputs (their sources, in order) or one stream."""

    index: int
    sources: tuple[str, ...] = ()
    stream: str | None = None
    run: int = 0
    """Which run planned it (1, 2, ...): for the summary and for debugging cron histories."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index, "run": self.run}
        if self.stream is not None:
            out["stream"] = self.stream
        else:
            out["sources"] = list(self.sources)
        return out

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.stream,) if self.stream is not None else self.sources


@dataclass
class Plan:
    tasks: list[PlannedTask] = field(default_factory=list)

    @classmethod
    def load(cls, output: str) -> Plan:
        path = storage.join(output, PLAN_FILE)
        tasks: list[PlannedTask] = []
        try:
            text = storage.read_bytes(path).decode("utf-8")
        except FileNotFoundError:
            text = ""
        for line in text.splitlines():
            if line.strip():
                row = json.loads(line)
                tasks.append(
                    PlannedTask(
                        index=row["index"],
                        sources=tuple(row.get("sources", ())),
                        stream=row.get("stream"),
                        run=row.get("run", 0),
                    )
                )
        return cls(tasks)

    def save(self, output: str) -> None:
        write_json_atomic(storage.join(output, PLAN_FILE), [t.to_dict() for t in self.tasks], lines=True)

    @property
    def runs(self) -> int:
        return max((t.run for t in self.tasks), default=0)

    def planned_inputs(self) -> set[str]:
        return {source for t in self.tasks for source in t.inputs}

    def extend(
        self, listed: list[str], streams: list[str], shard_size: int, redo: set[str] | None = None
    ) -> list[PlannedTask]:
        """Plan every input not planned before, and those in `redo` again, in new tasks at the end."""
        known = self.planned_inputs() - (redo or set())
        run = self.runs + 1
        new_listed = [s for s in listed if s not in known]
        new_streams = [s for s in streams if s not in known]
        added: list[PlannedTask] = []
        index = len(self.tasks)
        for start in range(0, len(new_listed), shard_size):
            added.append(PlannedTask(index, tuple(new_listed[start : start + shard_size]), run=run))
            index += 1
        for stream in new_streams:
            added.append(PlannedTask(index, stream=stream, run=run))
            index += 1
        self.tasks += added
        return added


# -- completion records ---------------------------------------------------------------------------------


def record_path(output: str, index: int) -> str:
    return storage.join(output, TASK_RECORDS, f"task-{index:06d}.json")


def load_record(output: str, index: int) -> dict[str, Any] | None:
    path = record_path(output, index)
    try:
        data: dict[str, Any] = read_json(path)
        return data
    except FileNotFoundError:
        return None
    except ValueError:  # a record is written atomically; an unreadable one is damage: redo the task
        storage.remove(path)
        return None


def remove_partial(output: str, index: int) -> None:
    """Remove what an unfinished attempt at task `index` left (parts and their temporary files)."""
    remove_partials(output, {index})


def remove_partials(output: str, indices: set[int]) -> None:
    """`remove_partial` for several tasks with one listing of the directory (a listing of an object
    store's prefix is a request per thousand names, not a system call)."""
    if not indices:
        return
    for name in storage.listdir(output):
        index = part_index(name)
        if index is not None and index in indices:
            storage.remove(storage.join(output, name))


_PART = re.compile(r"^\.{1,2}part-(?P<index>\d{6})-")


def part_index(name: str) -> int | None:
    """The task index of a part file (or of its temporary file), None for any other name."""
    match = _PART.match(name)
    return int(match["index"]) if match else None


def remove_orphans(output: str, planned: set[int]) -> None:
    """Remove part files of tasks the plan does not know (left by a run killed while planning)."""
    for name in storage.listdir(output):
        index = part_index(name)
        if index is not None and index not in planned:
            storage.remove(storage.join(output, name))


_FINAL = re.compile(r"^(?P<prefix>[\w-]+)-(?P<n>\d{6})\.(parquet|tar)$")


def finalize(output: str, plan: Plan, prefix: str, suffix: str) -> tuple[list[dict[str, Any]], int]:
    """Give completed tasks' files their final names, in plan order; return (shards, tasks finalized).

    Finalizing stops at the first task not complete yet (interrupted, or another rank's): the tasks
    before it are what the manifest describes, so its totals always match its shards.

    A task's record keeps each file's pre-rename `part` name and gets its `name` once renamed; if a run
    died between the rename and the record update, the file is found under its final name by checksum.
    """
    shards: list[dict[str, Any]] = []
    done = 0
    for task in plan.tasks:
        record = load_record(output, task.index)
        if record is None:
            break
        done += 1
        changed = False
        for entry in record["files"]:
            final = f"{prefix}-{len(shards):06d}{suffix}"
            if entry.get("name") != final:
                part = storage.join(output, entry["part"])
                target = storage.join(output, final)
                if storage.exists(part):
                    storage.replace(part, target)
                elif not (storage.exists(target) and storage.sha256(target) == entry["sha256"]):
                    raise VlmtileError(
                        f"{output}: task {task.index}'s file {entry['part']} is missing (removed by hand?); "
                        "run with --overwrite to rebuild the directory"
                    )
                entry["name"] = final
                changed = True
            shards.append({k: v for k, v in entry.items() if k != "part"})
        if changed:
            write_json_atomic(record_path(output, task.index), record)
    if shards:
        storage.sync_dir(output)
    return shards, done


def load_records(output: str, plan: Plan) -> dict[int, dict[str, Any]]:
    """Every planned task's completion record (tasks without one are not finished)."""
    records = {}
    for task in plan.tasks:
        record = load_record(output, task.index)
        if record is not None:
            records[task.index] = record
    return records


@dataclass(frozen=True)
class Outcome:
    """The latest finished attempt at one input: which task, the input's stamp then, and whether it failed.

    A stream (tar / Parquet file) failed when it could not be read to its end: its samples before the
    damage are stored, the rest is retried from there.
    """

    task: int
    stamp: str | None
    failed: bool


def outcomes(plan: Plan, records: dict[int, dict[str, Any]]) -> dict[str, Outcome]:
    """Each finished input's latest outcome (later tasks win: they are retries)."""
    latest: dict[str, Outcome] = {}
    for task in plan.tasks:
        record = records.get(task.index)
        if record is None:
            continue
        if task.stream is not None:
            failed = bool(record.get("stream_failed")) or any(
                e.get("input") == task.stream for e in record["errors"]
            )
            latest[task.stream] = Outcome(task.index, record.get("stamp"), failed)
            continue
        failed_here = {e.get("input") for e in record["errors"]}
        stamps = record.get("stamps", {})
        for source in task.sources:
            latest[source] = Outcome(task.index, stamps.get(source), source in failed_here)
    return latest


@dataclass
class Changes:
    """What a run finds when it compares its inputs with what earlier runs did."""

    redo: set[str] = field(default_factory=set)
    """Failed inputs to plan again: changed since they failed (a file still being copied), or all failed
    ones with --retry-failed."""
    changed: list[dict[str, Any]] = field(default_factory=list)
    """Stored inputs whose stamp differs now: their records are kept, and they are reported."""


def compare(
    plan: Plan, records: dict[int, dict[str, Any]], stamps: dict[str, str | None], retry_failed: bool
) -> Changes:
    """Which of this run's inputs (`stamps`: input -> stamp now) to redo, and which changed after storing.

    An input whose latest task has not finished yet is left to that task.
    """
    latest = outcomes(plan, records)
    pending = {s for t in plan.tasks if t.index not in records for s in t.inputs}
    found = Changes()
    for source, now in stamps.items():
        done = latest.get(source)
        if done is None or source in pending:
            continue
        if done.failed:
            if retry_failed or (now is not None and now != done.stamp):
                found.redo.add(source)
        elif now is not None and done.stamp is not None and now != done.stamp:
            found.changed.append({"source": source, "processed": done.stamp, "now": now})
    found.changed.sort(key=lambda c: c["source"])
    return found


def stream_skip(plan: Plan, records: dict[int, dict[str, Any]], task: PlannedTask) -> frozenset[str]:
    """Sample keys an earlier, damaged attempt at this stream already stored or failed: not read again."""
    keys: set[str] = set()
    for earlier in plan.tasks[: task.index]:
        if earlier.stream == task.stream and earlier.index in records:
            keys.update(records[earlier.index].get("done_keys", ()))
    return frozenset(keys)


def current_errors(
    plan: Plan, records: dict[int, dict[str, Any]], limit: int
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The error record and totals from the first `limit` (finalized) tasks: the latest attempt wins.

    An input retried (with --retry-failed, or because it changed since it failed) appears in a later
    task; if it succeeded there, its old error line is gone, if it failed again, the newer reason replaces
    the old one. A stream's stored samples always count; its stream-level failure (damage) only from its
    latest attempt, which read on from where the earlier one stopped.
    """
    tasks = plan.tasks[:limit]
    latest: dict[str, int] = {}
    for task in tasks:
        for source in task.inputs:
            latest[source] = task.index
    errors: dict[str, dict[str, Any]] = {}
    totals = {"inputs": 0, "records": 0, "failures": 0, "tokens": 0, "tiles": 0}
    for task in tasks:
        record = records[task.index]
        totals["records"] += record["records"]  # stored inputs are never redone: records never repeat
        totals["tokens"] += record["tokens"]
        totals["tiles"] += record["tiles"]
        if task.stream is not None:
            is_latest = latest[task.stream] == task.index
            totals["inputs"] += record["inputs"]
            for error in record["errors"]:
                if error.get("input") == task.stream and not is_latest:
                    totals["inputs"] -= 1  # superseded by the retry's own outcome
                    continue
                errors[error["source"]] = {k: v for k, v in error.items() if k != "input"}
            continue
        current = {s for s in task.sources if latest[s] == task.index}
        totals["inputs"] += len(current)
        for error in record["errors"]:
            if error.get("input") in current:
                errors[error["input"]] = {k: v for k, v in error.items() if k != "input"}
    ordered = sorted(errors.values(), key=lambda e: e["source"])
    totals["failures"] = len(ordered)
    return ordered, totals


def is_enospc(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
