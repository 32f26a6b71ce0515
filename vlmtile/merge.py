"""`merge-manifests`: one finished output directory from the work of several `--rank` runs.

`--rank R --world-size W` splits the planned tasks over machines that need no cluster: Slurm array jobs,
a few cron hosts. Two layouts end here:

- the ranks shared one directory (NFS, Lustre): every task's files and completion record are already in
  it, and the last rank to finish has written the manifest; merging it alone re-finalizes it under the
  run lock and says whether every planned task is done: the check to put after a Slurm array;
- each rank wrote its own directory (local disks, no shared file system): the directories are merged
  into one. Each rank planned the same tasks from the same inputs (the plan is a pure function of the
  listing), did its share and kept the others' pending. Merging takes every task's completion record
  and files from the directory that finished it, then names the shards in plan order, as a single run
  would have: the same names, bytes and manifest (but its date).

Nothing is re-processed: merging reuses the ledger's plan, completion records and `finalize`, and the
runner's `write_results`. Directories made with other settings, or whose plans disagree (ranks that
listed different inputs), are refused rather than mixed. Files are hard-linked into the merged
directory when it is on the same file system (no copy, no extra space: committed files never change),
else copied; the source directories are left as they are, so each rank can go on incrementally.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from . import __version__, storage
from .dataset import strategy_from_manifest
from .errors import VlmtileError
from .ledger import (
    CHANGED,
    ERRORS,
    MANIFEST,
    RUN_FILE,
    TASK_RECORDS,
    Changes,
    Plan,
    check_settings,
    differences,
    load_records,
    plan_lock,
    record_path,
    remove_orphans,
    run_lock,
    write_json_atomic,
)
from .runner import RunConfig, RunSummary, write_results
from .samples import SourceOptions
from .work import Budget


@dataclass
class _Source:
    """What one directory holds: its settings, plan and completion records, and its own run's results."""

    path: str
    settings: dict[str, Any]
    config_hash: str
    plan: Plan
    records: dict[int, dict[str, Any]]
    manifest: dict[str, Any] | None
    listing_errors: list[dict[str, Any]] = field(default_factory=list)
    changed: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class MergeResult:
    """The merged directory's summary, and what is still missing from it."""

    summary: RunSummary
    copied: int
    """Tasks whose files and record were brought in from another directory by this merge."""
    pending: tuple[tuple[int, tuple[str, ...]], ...]
    """(task index, its inputs) of planned tasks that no directory has finished."""


def merge_manifests(dirs: Sequence[str], output: str | None = None) -> MergeResult:
    """Merge the output directories `dirs` into `output` (default: `dirs[0]`, which must then be alone).

    Raises `VlmtileError` for directories that are not vlmtile output, hold other settings, disagree on
    the plan, are in use by a run, or lack a file that their completion record lists.
    """
    started = time.perf_counter()
    if not dirs:
        raise VlmtileError("give at least one output directory")
    remote = [path for path in [*dirs, output or ""] if storage.is_remote(path)]
    if remote:
        raise VlmtileError(
            f"merge-manifests works on local or mounted directories, not {remote[0]}: copy the rank "
            "directories to one machine (or write them to a shared file system), then merge"
        )
    if output is None:
        if len(dirs) > 1:
            raise VlmtileError("merging several directories needs -o OUT, the directory to merge into")
        output = dirs[0]
    for path in dirs:
        if not os.path.isfile(os.path.join(path, RUN_FILE)):
            raise VlmtileError(f"{path} is not a vlmtile output directory (no {RUN_FILE})")
    if os.path.exists(output) and not os.path.isdir(output):
        raise VlmtileError(f"output {output} exists and is not a directory")
    os.makedirs(os.path.join(output, TASK_RECORDS), exist_ok=True)
    unique = _unique([output, *dirs])
    with contextlib.ExitStack() as locks:
        for path in unique:  # no run may work in any of them meanwhile
            locks.enter_context(run_lock(path))
        sources = [_read(path) for path in _unique(dirs)]
        first = sources[0]
        for source in sources[1:]:
            if source.config_hash != first.config_hash:
                differ = differences(first.settings, source.settings)
                raise VlmtileError(
                    f"{source.path} was made with other settings than {first.path} "
                    f"({'; '.join(differ[:4]) or 'unknown'}): only the same preprocessing can be merged"
                )
        check_settings(output, first.settings, __version__)  # records them in a new OUT; refuses others
        with plan_lock(output):
            own = Plan.load(output)
            plan = _merged_plan([(output, own), *((s.path, s.plan) for s in sources)])
            plan.save(output)
            done = load_records(output, plan)
            remove_orphans(output, set(done))  # parts of unfinished tasks (a merge or run stopped halfway)
            copied = 0
            for task in plan.tasks:
                if task.index in done:
                    continue
                owner = next((s for s in sources if task.index in s.records), None)
                if owner is None or _same(owner.path, output):
                    continue
                _bring(owner, task.index, output)
                copied += 1
        manifests = [m for m in [_manifest(output), *(s.manifest for s in sources)] if m is not None]
        if not manifests:
            raise VlmtileError(
                f"none of {', '.join(dirs)} has a {MANIFEST} yet (no run there got to its end): "
                "run the ranks again, then merge"
            )
        config = _config(first.settings, manifests[0], output)
        listing_errors = _union([e for s in sources for e in s.listing_errors])
        changes = Changes(changed=_union([c for s in sources for c in s.changed]))
        with plan_lock(output):
            plan = Plan.load(output)
            summary = write_results(
                config, plan, manifests[0]["layout"], listing_errors, started, changes, None
            )
            records = load_records(output, plan)
    pending = tuple((t.index, t.inputs) for t in plan.tasks if t.index not in records)
    return MergeResult(summary, copied, pending)


def _unique(paths: Sequence[str]) -> list[str]:
    """The paths in order, each directory once however it is spelled."""
    seen: set[str] = set()
    out = []
    for path in paths:
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            out.append(path)
    return out


def _same(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _read(path: str) -> _Source:
    with open(os.path.join(path, RUN_FILE), encoding="utf-8") as f:
        run = json.load(f)
    plan = Plan.load(path)
    errors = _json_lines(os.path.join(path, ERRORS))
    return _Source(
        path=path,
        settings=run.get("settings", {}),
        config_hash=run.get("config_hash", ""),
        plan=plan,
        records=load_records(path, plan),
        manifest=_manifest(path),
        listing_errors=[e for e in errors if e.get("stage") == "list"],
        changed=_json_lines(os.path.join(path, CHANGED)),
    )


def _manifest(path: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _json_lines(path: str) -> list[dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def _union(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per source (the ranks listed the same inputs, so their listing errors are the same)."""
    by_source = {row["source"]: row for row in rows}
    return [by_source[source] for source in sorted(by_source)]


def _merged_plan(plans: list[tuple[str, Plan]]) -> Plan:
    """The longest plan, once every plan is checked to be a prefix of it (task by task, same inputs)."""
    longest_path, longest = max(plans, key=lambda p: len(p[1].tasks))
    for path, plan in plans:
        for task, other in zip(plan.tasks, longest.tasks, strict=False):
            if task.inputs != other.inputs:
                raise VlmtileError(
                    f"{path} and {longest_path} planned different inputs for task {task.index} "
                    f"({_describe(task.inputs)} vs {_describe(other.inputs)}): the ranks listed "
                    "different inputs; run every rank on the same inputs, then merge"
                )
    return Plan(list(longest.tasks))


def _describe(inputs: tuple[str, ...]) -> str:
    if not inputs:
        return "nothing"
    return inputs[0] if len(inputs) == 1 else f"{inputs[0]} .. {inputs[-1]} ({len(inputs)} inputs)"


def _bring(source: _Source, index: int, output: str) -> None:
    """Task `index`'s files (under their part names) and then its completion record, into `output`.

    The record comes last, as in a run: a merge stopped halfway leaves files without a record, which
    the next run or merge removes and brings again.
    """
    record = dict(source.records[index])
    files = []
    for entry in record["files"]:
        entry = dict(entry)
        candidates = [entry.get("name"), entry["part"]]
        found = next(
            (
                os.path.join(source.path, name)
                for name in candidates
                if name and os.path.isfile(os.path.join(source.path, name))
            ),
            None,
        )
        if found is None or os.path.getsize(found) != entry["bytes"]:
            what = "missing" if found is None else f"{os.path.getsize(found)} bytes, not {entry['bytes']}"
            raise VlmtileError(
                f"{source.path}: task {index}'s file {entry.get('name') or entry['part']} is {what}; "
                "run that rank's `vlmtile preprocess` again (with --overwrite to rebuild it), then merge"
            )
        _link_or_copy(found, os.path.join(output, entry["part"]))
        entry.pop("name", None)  # named by this directory's own finalize
        files.append(entry)
    record["files"] = files
    write_json_atomic(record_path(output, index), record)


def _link_or_copy(source: str, target: str) -> None:
    tmp = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.tmp-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    try:
        os.link(source, tmp)
    except OSError:  # another file system, or one without hard links
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def _config(settings: dict[str, Any], manifest: dict[str, Any], output: str) -> RunConfig:
    """The RunConfig that wrote these settings, for the merged manifest (which names every setting)."""
    budget = settings["budget"]
    config = RunConfig(
        inputs=tuple(manifest.get("inputs", ())),
        output=output,
        strategy=strategy_from_manifest(settings),
        format=settings["format"],
        dtype=settings["dtype"],
        shard_size=settings["shard_size"],
        shard_bytes=settings["shard_bytes"],
        prefix=settings["prefix"],
        pixels=settings["pixels"],
        fast=settings.get("fast", False),
        budget=Budget(max_tiles=budget["max_tiles_per_sample"], max_tokens=budget["max_tokens_per_sample"]),
        sources=SourceOptions(**settings["sources"]),
        progress=False,
    )
    if config.settings() != settings:
        differ = differences(settings, config.settings())
        raise VlmtileError(
            f"this vlmtile ({__version__}) cannot rebuild the settings of {output} "
            f"({'; '.join(differ[:4])}): merge with the version that wrote it"
        )
    return config
