"""`preprocess` as a library call: inputs -> deterministic shards -> per-shard workers -> manifest.

Shard i always holds inputs [i*shard_size, (i+1)*shard_size) of the sorted input list, whatever the number
of workers. Each shard is written atomically by its worker, which then writes a small completion record
in `_shards/`; the manifest and the error record are written last, by the parent, from the reports.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from tqdm import tqdm

from . import __version__
from .dtypes import STORAGE_DTYPES
from .errors import VlmtileError
from .executors import Progress, TaskFailed, WorkerDied, run_tasks
from .sinks import SINKS, ShardFile
from .sources import InputItem, display_path, list_inputs
from .strategies import Strategy
from .work import Failure, process_input

MANIFEST = "_manifest.json"
ERRORS = "_errors.jsonl"
SHARD_RECORDS = "_shards"
FORMAT_VERSION = 1
DEFAULT_SHARD_SIZE = 64
"""Images per shard: ~1 GB of float16 InternVL tiles at 12 MP, and enough shards to keep workers busy."""


def available_cpus() -> int:
    """CPUs this process may run on (respects taskset / cgroup cpusets, unlike os.cpu_count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass(frozen=True)
class RunConfig:
    """Everything `preprocess` needs; the CLI builds one from its options."""

    inputs: tuple[str, ...]
    output: str
    strategy: Strategy
    format: str = "parquet"
    dtype: str = "float16"
    workers: int = field(default_factory=lambda: available_cpus())
    shard_size: int = DEFAULT_SHARD_SIZE
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.format not in SINKS:
            raise VlmtileError(f"unknown format {self.format!r}; valid: {', '.join(SINKS)}")
        if self.dtype not in STORAGE_DTYPES:
            raise VlmtileError(f"unknown dtype {self.dtype!r}; valid: {', '.join(STORAGE_DTYPES)}")
        if self.shard_size < 1:
            raise VlmtileError(f"shard size must be at least 1, got {self.shard_size}")
        if self.workers < 1:
            raise VlmtileError(f"workers must be at least 1, got {self.workers}")

    def settings(self) -> dict[str, Any]:
        """What determines the bytes of the output (and so goes into the config hash)."""
        return {
            "strategy": {"name": self.strategy.name, "params": self.strategy.params()},
            "format": self.format,
            "dtype": self.dtype,
            "shard_size": self.shard_size,
        }


@dataclass(frozen=True)
class ShardTask:
    """One unit of parallel work: these inputs into this shard file."""

    index: int
    name: str
    items: tuple[InputItem, ...]
    output: str
    strategy: Strategy
    format: str
    dtype: str
    file_metadata: dict[str, Any]


@dataclass(frozen=True)
class ShardReport:
    """What a worker sends back: counts and failures, never pixels."""

    index: int
    file: ShardFile | None
    records: int
    tokens: int
    tiles: int
    failures: tuple[Failure, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.file.name if self.file else None,
            "records": self.records,
            "failures": len(self.failures),
            "tokens": self.tokens,
            "tiles": self.tiles,
            "bytes": self.file.bytes if self.file else 0,
            "sha256": self.file.sha256 if self.file else None,
        }


@dataclass(frozen=True)
class RunSummary:
    """The outcome of a run, as printed in the one-line summary and returned to library callers."""

    output: str
    inputs: int
    records: int
    failures: int
    tokens: int
    bytes: int
    shards: int
    seconds: float

    def line(self) -> str:
        return (
            f"vlmtile: {self.records:,} images, {self.failures:,} failures, {self.tokens:,} tokens, "
            f"{self.bytes / 1e6:,.1f} MB in {self.shards} shard{'s' if self.shards != 1 else ''} -> "
            f"{self.output} ({self.seconds:.1f} s)"
        )


def _write_json_atomic(path: str, data: Any, *, lines: bool = False) -> None:
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


def process_shard(task: ShardTask, progress: Progress) -> ShardReport:
    """Worker entry point: process this shard's inputs and write its file and completion record."""
    path = os.path.join(task.output, task.name)
    failures: list[Failure] = []
    records = tokens = tiles = 0
    with SINKS[task.format](path, task.strategy, task.dtype, task.file_metadata) as sink:
        for item in task.items:
            out = process_input(item, task.strategy, task.dtype)
            if isinstance(out, Failure):
                failures.append(out)
                progress(1, 0)
                continue
            sink.write(out)
            records += 1
            tokens += out.metadata["num_tokens"]
            tiles += out.metadata["num_tiles"]
            progress(1, out.metadata["num_tokens"])
        shard_file = sink.commit()
    report = ShardReport(task.index, shard_file, records, tokens, tiles, tuple(failures))
    _write_json_atomic(
        os.path.join(task.output, SHARD_RECORDS, f"{os.path.splitext(task.name)[0]}.json"),
        {**report.to_dict(), "errors": [f.to_dict() for f in failures]},
    )
    return report


def _existing_output(output: str) -> list[str]:
    if not os.path.isdir(output):
        return []
    ours = []
    for name in os.listdir(output):
        if (
            name in (MANIFEST, ERRORS, SHARD_RECORDS)
            or (name.startswith(("shard-", ".shard-")) and name.split(".")[-1] in ("parquet", "tar"))
            or (name.startswith(".shard-") and ".tmp-" in name)
        ):
            ours.append(name)
    return sorted(ours)


def _prepare_output(config: RunConfig) -> None:
    if os.path.exists(config.output) and not os.path.isdir(config.output):
        raise VlmtileError(f"output {config.output} exists and is not a directory")
    existing = _existing_output(config.output)
    if existing and not config.overwrite:
        raise VlmtileError(
            f"output directory {config.output} already holds vlmtile output ({', '.join(existing[:3])}"
            f"{', ...' if len(existing) > 3 else ''}); choose another directory or pass --overwrite"
        )
    for name in existing:
        path = os.path.join(config.output, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    os.makedirs(os.path.join(config.output, SHARD_RECORDS), exist_ok=True)


def config_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def plan_shards(items: list[InputItem], config: RunConfig) -> list[ShardTask]:
    """Cut the sorted inputs into consecutive shards of `shard_size`."""
    suffix = SINKS[config.format].suffix
    file_metadata = {"vlmtile_version": __version__, **config.settings()}
    return [
        ShardTask(
            index=i,
            name=f"shard-{i:05d}{suffix}",
            items=tuple(items[start : start + config.shard_size]),
            output=config.output,
            strategy=config.strategy,
            format=config.format,
            dtype=config.dtype,
            file_metadata=file_metadata,
        )
        for i, start in enumerate(range(0, len(items), config.shard_size))
    ]


def _failed_shard(task: ShardTask, error: BaseException, pid: int | None) -> ShardReport:
    """A shard whose worker raised or died: all its inputs go to the error record.

    A worker that died could not remove its temporary file; the parent knows its pid, so it does.
    """
    if pid is not None:
        tmp = os.path.join(task.output, f".{task.name}.tmp-{pid}")
        if os.path.exists(tmp):
            os.unlink(tmp)
    detail = str(error) if isinstance(error, TaskFailed | WorkerDied) else f"{type(error).__name__}: {error}"
    reason = f"shard {task.name} was not written: {detail}"
    failures = tuple(Failure(item.key, display_path(item.source), "write", reason) for item in task.items)
    return ShardReport(task.index, None, 0, 0, 0, failures)


def preprocess(config: RunConfig) -> RunSummary:
    """Run the whole job; returns the summary. Raises `VlmtileError` for problems the user must fix."""
    started = time.perf_counter()
    items = list_inputs(config.inputs)
    if not items:
        raise VlmtileError(f"no images found in {', '.join(config.inputs)}")
    _prepare_output(config)
    tasks = plan_shards(items, config)

    show = config.progress and sys.stderr.isatty()
    bar = tqdm(total=len(items), unit="img", disable=not show, dynamic_ncols=True, leave=False)
    seen_tokens = 0

    def on_progress(images: int, tokens: int) -> None:
        nonlocal seen_tokens
        seen_tokens += tokens
        bar.set_postfix_str(f"{seen_tokens:,} tokens", refresh=False)
        bar.update(images)

    reports: list[ShardReport] = []
    try:
        for outcome in run_tasks(process_shard, tasks, config.workers, on_progress):
            if outcome.error is not None or outcome.result is None:
                error = outcome.error or RuntimeError("no result")
                reports.append(_failed_shard(outcome.task, error, outcome.pid))
            else:
                reports.append(outcome.result)
    finally:
        bar.close()
    reports.sort(key=lambda r: r.index)

    failures = sorted((f for r in reports for f in r.failures), key=lambda f: f.source)
    _write_json_atomic(os.path.join(config.output, ERRORS), [f.to_dict() for f in failures], lines=True)
    shards = [r.to_dict() for r in reports if r.file is not None]
    totals = {
        "inputs": len(items),
        "records": sum(r.records for r in reports),
        "failures": len(failures),
        "tokens": sum(r.tokens for r in reports),
        "tiles": sum(r.tiles for r in reports),
        "bytes": sum(s["bytes"] for s in shards),
    }
    settings = config.settings()
    manifest = {
        "vlmtile_version": __version__,
        "format_version": FORMAT_VERSION,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **settings,
        "config_hash": config_hash(settings),
        "metadata_fields": dict(config.strategy.metadata_fields),
        "inputs": list(config.inputs),
        "shards": shards,
        "totals": totals,
        "errors_file": ERRORS,
    }
    _write_json_atomic(os.path.join(config.output, MANIFEST), manifest)
    return RunSummary(
        output=config.output,
        inputs=len(items),
        records=totals["records"],
        failures=totals["failures"],
        tokens=totals["tokens"],
        bytes=totals["bytes"],
        shards=len(shards),
        seconds=time.perf_counter() - started,
    )
