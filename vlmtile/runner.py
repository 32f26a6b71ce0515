"""`preprocess` as a library call: inputs -> deterministic shards -> per-shard workers -> manifest.

Shard i always holds inputs [i*shard_size, (i+1)*shard_size) of the sorted input list, whatever the number
of workers. Each shard is written atomically by its worker, which then writes a small completion record
in `_shards/`; the manifest and the error record are written last, by the parent, from the reports.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from tqdm import tqdm

from . import __version__
from .dtypes import STORAGE_DTYPES
from .errors import VlmtileError
from .executors import Progress, TaskFailed, WorkerDied, run_tasks
from .samples import Failure, Sample, SourceOptions, StreamInput, iter_stream, list_samples
from .sinks import SINKS, ShardFile, ShardSink
from .strategies import Strategy
from .work import Budget, SampleRecord, process_sample

MANIFEST = "_manifest.json"
ERRORS = "_errors.jsonl"
SHARD_RECORDS = "_shards"
WIDS_INDEX = "_index.wids.json"
FORMAT_VERSION = 2
DEFAULT_SHARD_SIZE = 64
"""Samples per task (listed inputs): ~1 GB of float16 InternVL tiles at 12 MP, and enough tasks to keep
workers busy. Tar shards and Parquet files are one task each."""
DEFAULT_SHARD_BYTES = 1 << 30
"""Largest output file: a task whose output grows past this continues in a new file."""
DEFAULT_PREFIX = "shard"


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
    shard_bytes: int = DEFAULT_SHARD_BYTES
    prefix: str = DEFAULT_PREFIX
    pixels: bool = True
    """False: metadata only (plans, lengths, grids), no arrays."""
    budget: Budget = field(default_factory=Budget)
    sources: SourceOptions = field(default_factory=SourceOptions)
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
        if self.shard_bytes < 1:
            raise VlmtileError(f"shard bytes must be at least 1, got {self.shard_bytes}")
        if not self.prefix or not all(c.isalnum() or c in "-_" for c in self.prefix):
            raise VlmtileError(f"shard prefix must be letters, digits, '-' or '_'; got {self.prefix!r}")
        for name in ("max_tiles", "max_tokens"):
            value = getattr(self.budget, name)
            if value is not None and value < 1:
                raise VlmtileError(f"per-sample {name.replace('_', ' ')} must be at least 1, got {value}")
        if self.budget.max_tiles is not None or self.budget.max_tokens is not None:
            try:  # a budget the strategy cannot honour is refused now, not once per sample
                self.strategy.for_sample(
                    1, max_tiles=self.budget.max_tiles, max_tokens=self.budget.max_tokens
                )
            except ValueError as e:
                raise VlmtileError(str(e)) from None

    def settings(self) -> dict[str, Any]:
        """What determines the bytes of the output (and so goes into the config hash)."""
        return {
            "strategy": {"name": self.strategy.name, "params": self.strategy.params()},
            "format": self.format,
            "dtype": self.dtype,
            "shard_size": self.shard_size,
            "shard_bytes": self.shard_bytes,
            "prefix": self.prefix,
            "pixels": self.pixels,
            "budget": {
                "max_tiles_per_sample": self.budget.max_tiles,
                "max_tokens_per_sample": self.budget.max_tokens,
            },
            "sources": {
                "image_field": self.sources.image_field,
                "key_field": self.sources.key_field,
                "image_root": self.sources.image_root,
            },
        }


@dataclass(frozen=True)
class ShardTask:
    """One unit of parallel work: these listed samples, or this stream, into this task's output files."""

    index: int
    samples: tuple[Sample, ...]
    stream: StreamInput | None
    output: str
    config: RunConfig
    layout: str
    file_metadata: dict[str, Any]

    @property
    def source(self) -> str:
        if self.stream is not None:
            return self.stream.source
        if len(self.samples) == 1:
            return self.samples[0].source
        return f"{self.samples[0].source} .. {self.samples[-1].source}"


@dataclass(frozen=True)
class ShardReport:
    """What a worker sends back: counts, file names and failures, never pixels."""

    index: int
    files: tuple[tuple[ShardFile, dict[str, int]], ...]
    """The task's output files (in the order written) with their counts (records, tokens, tiles)."""
    inputs: int
    records: int
    tokens: int
    tiles: int
    failures: tuple[Failure, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "files": [
                {"name": f.name, **counts, "bytes": f.bytes, "sha256": f.sha256} for f, counts in self.files
            ],
            "inputs": self.inputs,
            "records": self.records,
            "failures": len(self.failures),
            "tokens": self.tokens,
            "tiles": self.tiles,
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
    layout: str = "image"

    def line(self) -> str:
        unit = "samples" if self.layout == "sample" else "images"
        return (
            f"vlmtile: {self.records:,} {unit}, {self.failures:,} failures, {self.tokens:,} tokens, "
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


def part_name(index: int, part: int, suffix: str) -> str:
    """A task's output file before the run gives it its final, contiguous shard number."""
    return f".part-{index:06d}-{part:04d}{suffix}"


class _RotatingWriter:
    """A task's output: one file after another, each closed once it holds `shard_bytes`."""

    def __init__(self, task: ShardTask) -> None:
        self.task = task
        self.files: list[tuple[ShardFile, dict[str, int]]] = []
        self.sink: ShardSink | None = None
        self.counts = {"records": 0, "tokens": 0, "tiles": 0}

    def write(self, record: SampleRecord) -> None:
        if self.sink is None:
            config = self.task.config
            sink_cls = SINKS[config.format]
            path = os.path.join(
                self.task.output, part_name(self.task.index, len(self.files), sink_cls.suffix)
            )
            self.sink = sink_cls(
                path,
                config.strategy,
                config.dtype,
                self.task.file_metadata,
                layout=self.task.layout,
                pixels=config.pixels,
            )
        self.sink.write(record)
        self.counts["records"] += 1
        self.counts["tokens"] += record.num_tokens
        self.counts["tiles"] += record.num_tiles
        if self.sink.bytes >= self.task.config.shard_bytes:
            self.close()

    def close(self) -> None:
        if self.sink is not None:
            sink, self.sink = self.sink, None
            self.files.append((sink.commit(), self.counts))
            self.counts = {"records": 0, "tokens": 0, "tiles": 0}

    def abort(self) -> None:
        if self.sink is not None:
            self.sink.abort()
        for shard_file, _ in self.files:
            path = os.path.join(self.task.output, shard_file.name)
            if os.path.exists(path):
                os.unlink(path)


def _task_samples(task: ShardTask) -> Iterable[Sample | Failure]:
    if task.stream is not None:
        return iter_stream(task.stream, task.config.sources)
    return task.samples


def process_shard(task: ShardTask, progress: Progress) -> ShardReport:
    """Worker entry point: process this task's samples, write its files and its completion record."""
    config = task.config
    failures: list[Failure] = []
    inputs = records = tokens = tiles = 0
    writer = _RotatingWriter(task)
    try:
        for sample in _task_samples(task):
            inputs += 1
            if isinstance(sample, Failure):
                failures.append(sample)
                progress(1, 0)
                continue
            out = process_sample(sample, config.strategy, config.dtype, config.budget, pixels=config.pixels)
            if isinstance(out, Failure):
                failures.append(out)
                progress(1, 0)
                continue
            writer.write(out)
            records += 1
            tokens += out.num_tokens
            tiles += out.num_tiles
            progress(1, out.num_tokens)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    report = ShardReport(task.index, tuple(writer.files), inputs, records, tokens, tiles, tuple(failures))
    _write_json_atomic(
        os.path.join(task.output, SHARD_RECORDS, f"task-{task.index:06d}.json"),
        {**report.to_dict(), "errors": [f.to_dict() for f in failures]},
    )
    return report


_SHARD_NAME = re.compile(r"^\.?[\w-]+-\d{5,6}\.(parquet|tar)(\.tmp-\d+)?$")


def _existing_output(output: str) -> list[str]:
    if not os.path.isdir(output):
        return []
    ours = []
    for name in os.listdir(output):
        if (
            name in (MANIFEST, ERRORS, SHARD_RECORDS)
            or name == WIDS_INDEX
            or (_SHARD_NAME.match(name) is not None)
            or name.startswith(".part-")
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


def plan_shards(
    samples: list[Sample], streams: list[StreamInput], config: RunConfig, layout: str
) -> list[ShardTask]:
    """Cut the listed samples into consecutive tasks of `shard_size`; one more task per stream."""
    file_metadata = {"vlmtile_version": __version__, "layout": layout, **config.settings()}
    tasks = [
        ShardTask(
            i,
            tuple(samples[start : start + config.shard_size]),
            None,
            config.output,
            config,
            layout,
            file_metadata,
        )
        for i, start in enumerate(range(0, len(samples), config.shard_size))
    ]
    tasks += [
        ShardTask(len(tasks) + i, (), stream, config.output, config, layout, file_metadata)
        for i, stream in enumerate(streams)
    ]
    return tasks


def _failed_shard(task: ShardTask, error: BaseException, pid: int | None) -> ShardReport:
    """A task whose worker raised or died: its inputs go to the error record, its partial files away.

    A worker that died could not remove its files; the parent knows the task's names and the pid.
    """
    for name in os.listdir(task.output):
        if name.startswith((f".part-{task.index:06d}-", f"..part-{task.index:06d}-")):
            os.unlink(os.path.join(task.output, name))
    detail = str(error) if isinstance(error, TaskFailed | WorkerDied) else f"{type(error).__name__}: {error}"
    reason = f"task {task.index} ({task.source}) was not written: {detail}"
    if task.stream is not None:
        failures: tuple[Failure, ...] = (Failure(task.stream.key, task.stream.source, "write", reason),)
    else:
        failures = tuple(Failure(s.key, s.source, "write", reason) for s in task.samples)
    return ShardReport(task.index, (), len(failures), 0, 0, 0, failures)


def _finalize_names(reports: list[ShardReport], config: RunConfig) -> list[dict[str, Any]]:
    """Give every task's files their final, contiguous names `PREFIX-000000.ext`, in task order.

    Names are assigned only once every task has finished, so they depend on the inputs and settings alone,
    never on which worker finished first.
    """
    suffix = SINKS[config.format].suffix
    shards: list[dict[str, Any]] = []
    for report in reports:
        for shard_file, counts in report.files:
            name = f"{config.prefix}-{len(shards):06d}{suffix}"
            os.replace(os.path.join(config.output, shard_file.name), os.path.join(config.output, name))
            shards.append({"name": name, **counts, "bytes": shard_file.bytes, "sha256": shard_file.sha256})
    if shards:
        _fsync_dir(config.output)
    return shards


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def shard_pattern(prefix: str, count: int, suffix: str) -> str | None:
    """The brace pattern naming every shard (`shard-{000000..000012}.tar`), as WebDataset takes it."""
    if count == 0:
        return None
    if count == 1:
        return f"{prefix}-000000{suffix}"
    return f"{prefix}-{{000000..{count - 1:06d}}}{suffix}"


def preprocess(config: RunConfig) -> RunSummary:
    """Run the whole job; returns the summary. Raises `VlmtileError` for problems the user must fix."""
    started = time.perf_counter()
    listing = list_samples(config.inputs, config.sources)
    if not listing.samples and not listing.streams and not listing.failures:
        raise VlmtileError(f"no images found in {', '.join(config.inputs)}")
    _prepare_output(config)
    tasks = plan_shards(listing.samples, listing.streams, config, listing.layout)

    show = config.progress and sys.stderr.isatty()
    total = len(listing.samples) if not listing.streams else None
    bar = tqdm(
        total=total,
        unit="sample" if listing.layout == "sample" else "img",
        disable=not show,
        dynamic_ncols=True,
        leave=False,
    )
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
    shards = _finalize_names(reports, config)

    failures = sorted([*listing.failures, *(f for r in reports for f in r.failures)], key=lambda f: f.source)
    _write_json_atomic(os.path.join(config.output, ERRORS), [f.to_dict() for f in failures], lines=True)
    totals = {
        "inputs": len(listing.failures) + sum(r.inputs for r in reports),
        "records": sum(r.records for r in reports),
        "failures": len(failures),
        "tokens": sum(r.tokens for r in reports),
        "tiles": sum(r.tiles for r in reports),
        "bytes": sum(s["bytes"] for s in shards),
    }
    suffix = SINKS[config.format].suffix
    settings = config.settings()
    manifest = {
        "vlmtile_version": __version__,
        "format_version": FORMAT_VERSION,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **settings,
        "layout": listing.layout,
        "config_hash": config_hash(settings),
        "metadata_fields": dict(config.strategy.metadata_fields),
        "inputs": list(config.inputs),
        "shard_pattern": shard_pattern(config.prefix, len(shards), suffix),
        "shards": shards,
        "totals": totals,
        "errors_file": ERRORS,
    }
    if config.format == "webdataset":
        _write_json_atomic(os.path.join(config.output, WIDS_INDEX), wids_index(shards))
    _write_json_atomic(os.path.join(config.output, MANIFEST), manifest)
    return RunSummary(
        output=config.output,
        inputs=totals["inputs"],
        records=totals["records"],
        failures=totals["failures"],
        tokens=totals["tokens"],
        bytes=totals["bytes"],
        shards=len(shards),
        seconds=time.perf_counter() - started,
        layout=listing.layout,
    )


def wids_index(shards: list[dict[str, Any]]) -> dict[str, Any]:
    """The `wids` shard index (webdataset's indexed reader): shard URLs relative to the index file."""
    return {
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "shardlist": [{"url": s["name"], "nsamples": s["records"], "filesize": s["bytes"]} for s in shards],
    }
