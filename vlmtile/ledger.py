"""The run's state on disk: settings, lock, task plan, completion records, and finalizing shard names.

Everything that lets `preprocess` run from cron lives here. The output directory is the only state: a
run reads it, adds to it and never trusts memory, so a killed run is finished by the next one.

- `_run.json`: the settings (strategy, params, output options) and their hash, written by the first run.
  A later run with other settings is refused: one directory never mixes two preprocessings.
- `_lock` (`_lock.rank-R` with `--rank`): held by a live run; a lock whose process is gone (same host) is
  stale and taken over, any other lock makes the run refuse.
- `_plan.jsonl`: every task ever planned (its inputs, by source), appended under `_plan.lock` so that
  concurrent ranks agree on it. Inputs not in the plan yet (new files, new manifest lines) become new tasks
  after the existing ones: this is the incremental mode.
- `_shards/task-NNNNNN.json`: a task's completion record, written after its files are in place. A planned
  task without one is redone (its partial files removed first).
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
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .errors import VlmtileError

RUN_FILE = "_run.json"
PLAN_FILE = "_plan.jsonl"
PLAN_LOCK = "_plan.lock"
TASK_RECORDS = "_shards"
MANIFEST = "_manifest.json"
ERRORS = "_errors.jsonl"
WIDS_INDEX = "_index.wids.json"


def write_json_atomic(path: str, data: Any, *, lines: bool = False) -> None:
    """Temp file, fsync, rename: a reader sees the old file or the new one, never half of one."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        if lines:
            for row in data:
                f.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")
        else:
            json.dump(data, f, indent=2, sort_keys=True, ensure_ascii=False)
            f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def config_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


# -- settings -------------------------------------------------------------------------------------------


def check_settings(output: str, settings: dict[str, Any], version: str) -> bool:
    """Record the settings on the first run; refuse a run whose settings differ. True if resuming."""
    path = os.path.join(output, RUN_FILE)
    digest = config_hash(settings)
    if not os.path.exists(path):
        write_json_atomic(path, {"settings": settings, "config_hash": digest, "vlmtile_version": version})
        return False
    with open(path, encoding="utf-8") as f:
        stored = json.load(f)
    if stored.get("config_hash") == digest:
        return True
    differ = _differences(stored.get("settings", {}), settings)
    raise VlmtileError(
        f"{output} was made with other settings ({'; '.join(differ[:4]) or 'unknown'}); "
        "a directory never mixes two preprocessings: use another output directory, or --overwrite to "
        "start this one again"
    )


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    if old != new:
        return [f"{prefix.rstrip('.')}: was {old!r}, now {new!r}"]
    return []


# -- locks ----------------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def run_lock(output: str, name: str = "_lock") -> Iterator[None]:
    """Hold `OUT/_lock` for the whole run; take over a stale lock left by a killed run on this host."""
    path = os.path.join(output, name)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": datetime.now(UTC).isoformat()}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except PermissionError:
            raise VlmtileError(f"cannot write to {output}: permission denied") from None
        except FileExistsError:
            holder = _read_lock(path)
            if holder is not None and not _stale(holder):
                raise VlmtileError(
                    f"another vlmtile run holds {path} (pid {holder.get('pid')} on {holder.get('host')}, "
                    f"since {holder.get('started')}); wait for it to finish"
                ) from None
            # Stale (or unreadable): move it aside; of two runs racing here only one rename succeeds.
            with contextlib.suppress(FileNotFoundError):
                os.rename(path, f"{path}.stale-{os.getpid()}")
                os.unlink(f"{path}.stale-{os.getpid()}")
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me, f)
        break
    else:
        raise VlmtileError(f"could not take {path}: another run keeps taking it")
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            if _read_lock(path) == me:
                os.unlink(path)


def _read_lock(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _stale(holder: dict[str, Any]) -> bool:
    """A lock is stale when its process is gone. Another host's lock cannot be checked: never stale."""
    if holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    return not isinstance(pid, int) or not _alive(pid)


@contextlib.contextmanager
def plan_lock(output: str) -> Iterator[None]:
    """A short exclusive lock (flock) around reading and extending the plan and around finalizing.

    flock is released by the kernel when the process dies, so it can never go stale.
    """
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
        path = os.path.join(output, PLAN_FILE)
        tasks: list[PlannedTask] = []
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                for line in f:
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
        write_json_atomic(os.path.join(output, PLAN_FILE), [t.to_dict() for t in self.tasks], lines=True)

    @property
    def runs(self) -> int:
        return max((t.run for t in self.tasks), default=0)

    def planned_inputs(self) -> set[str]:
        return {source for t in self.tasks for source in t.inputs}

    def extend(
        self, listed: list[str], streams: list[str], shard_size: int, skip: set[str] | None = None
    ) -> list[PlannedTask]:
        """Plan every input not planned before (or in `skip`'s complement: retried failures)."""
        known = self.planned_inputs() - (skip or set())
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
    return os.path.join(output, TASK_RECORDS, f"task-{index:06d}.json")


def load_record(output: str, index: int) -> dict[str, Any] | None:
    path = record_path(output, index)
    try:
        with open(path, encoding="utf-8") as f:
            data: dict[str, Any] = json.load(f)
            return data
    except FileNotFoundError:
        return None
    except ValueError:  # a record is written atomically; an unreadable one is damage: redo the task
        os.unlink(path)
        return None


def remove_partial(output: str, index: int) -> None:
    """Remove what an unfinished attempt at task `index` left (parts and their temporary files)."""
    prefixes = (f".part-{index:06d}-", f"..part-{index:06d}-")
    for name in os.listdir(output):
        if name.startswith(prefixes):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(output, name))


_PART = re.compile(r"^\.{1,2}part-(?P<index>\d{6})-")


def remove_orphans(output: str, planned: set[int]) -> None:
    """Remove part files of tasks the plan does not know (left by a run killed while planning)."""
    for name in os.listdir(output):
        match = _PART.match(name)
        if match and int(match["index"]) not in planned:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(output, name))


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
                part = os.path.join(output, entry["part"])
                target = os.path.join(output, final)
                if os.path.exists(part):
                    os.replace(part, target)
                elif not (os.path.exists(target) and _sha256(target) == entry["sha256"]):
                    raise VlmtileError(
                        f"{output}: task {task.index}'s file {entry['part']} is missing (removed by hand?); "
                        "run with --overwrite to rebuild the directory"
                    )
                entry["name"] = final
                changed = True
            shards.append({k: entry[k] for k in ("name", "records", "tokens", "tiles", "bytes", "sha256")})
        if changed:
            write_json_atomic(record_path(output, task.index), record)
    if shards:
        fd = os.open(output, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return shards, done


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def current_errors(output: str, plan: Plan, limit: int) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The error record and totals from the first `limit` (finalized) tasks: the latest attempt wins.

    An input retried with --retry-failed appears in a later task; if it succeeded there, its old error
    line is gone, if it failed again, the newer reason replaces the old one.
    """
    tasks = plan.tasks[:limit]
    latest: dict[str, int] = {}
    for task in tasks:
        for source in task.inputs:
            latest[source] = task.index
    errors: dict[str, dict[str, Any]] = {}
    totals = {"inputs": 0, "records": 0, "failures": 0, "tokens": 0, "tiles": 0}
    for task in tasks:
        record = load_record(output, task.index)
        if record is None:
            continue
        current = [s for s in task.inputs if latest.get(s) == task.index]
        if task.stream is not None:
            if not current:
                continue
            totals["inputs"] += record["inputs"]
            totals["records"] += record["records"]
            totals["tokens"] += record["tokens"]
            totals["tiles"] += record["tiles"]
            for error in record["errors"]:
                errors[error["source"]] = error
            continue
        current_set = set(current)
        failed = {e["input"]: e for e in record["errors"] if e.get("input") in current_set}
        totals["inputs"] += len(current)
        totals["records"] += record["records"]  # records are never retried: a stored input is done
        totals["tokens"] += record["tokens"]
        totals["tiles"] += record["tiles"]
        for error in failed.values():
            errors[error["input"]] = {k: v for k, v in error.items() if k != "input"}
    ordered = sorted(errors.values(), key=lambda e: e["source"])
    totals["failures"] = len(ordered)
    return ordered, totals


def failed_inputs(output: str, plan: Plan) -> set[str]:
    """Inputs whose latest attempt failed (what --retry-failed plans again)."""
    latest: dict[str, int] = {}
    for task in plan.tasks:
        for source in task.inputs:
            latest[source] = task.index
    failed: set[str] = set()
    for task in plan.tasks:
        record = load_record(output, task.index)
        if record is None:
            continue
        if task.stream is not None:
            if latest.get(task.stream) == task.index and record.get("stream_failed"):
                failed.add(task.stream)
            continue
        failed |= {e["input"] for e in record["errors"] if latest.get(e.get("input", "")) == task.index}
    return failed


def is_enospc(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
