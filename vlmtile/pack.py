"""`vlmtile pack`: a finished `preprocess` output of patch sequences -> fixed-length packed sequences.

The input's shards are read in manifest order and cut into *groups* of consecutive shards holding at most
`buffer` images and `buffer_bytes` bytes: a group is one task, packed in memory with first-fit (or
best-fit) decreasing and written as part files, exactly like a `preprocess` task. Memory is one group per
worker, so it stays flat however large the input is; padding is lowest when a group holds many sequences'
worth of images (the last sequence of each group is the only one that is usually part-empty).

Everything about resuming is the runner's own machinery (`ledger`): the settings in `_run.json` (a rerun
with other settings is refused), the run lock, `_plan.jsonl` (a task is a list of input shard names),
completion records in `_shards/`, part files renamed to `PREFIX-%06d` in plan order, `_errors.jsonl`, and
`_manifest.json` last. A rerun finishes unfinished tasks and packs the input shards that a later
`preprocess` run added, in new groups after the existing ones; an input shard that changed since it was
packed (the input rebuilt with --overwrite) is refused rather than mixed in.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from tqdm import tqdm

from . import __version__
from .dataset import Dataset
from .errors import RunStopped, VlmtileError
from .executors import Interrupted, Progress, StopFlag, handle_signals, run_tasks
from .ledger import (
    ERRORS,
    MANIFEST,
    TASK_RECORDS,
    WIDS_INDEX,
    Plan,
    PlannedTask,
    check_settings,
    config_hash,
    finalize,
    is_enospc,
    load_records,
    plan_lock,
    prepare_output,
    record_path,
    remove_orphans,
    remove_output,
    remove_partial,
    remove_partials,
    run_lock,
    write_json_atomic,
)
from .packing import (
    DEFAULT_BUFFER,
    DEFAULT_BUFFER_BYTES,
    FITS,
    PackedSequence,
    PackReport,
    Segment,
    assign,
    build_sequence,
    group_shards,
    split_lengths,
)
from .runner import DEFAULT_PREFIX, DEFAULT_SHARD_BYTES, shard_pattern, wids_index
from .samples import Failure
from .sinks import PACKED_SINKS, RotatingWriter, ShardSink
from .strategies import Strategy

PACKED_LAYOUT = "packed"


@dataclass(frozen=True)
class PackConfig:
    """Everything `pack` needs; the CLI builds one from its options."""

    input: str
    output: str
    max_seq_len: int
    max_images: int = 0
    """Most segments (images, or parts of split images) per sequence; 0: no cap."""
    fit: str = "first"
    split_long: bool = False
    """Cut an image longer than max_seq_len over several sequences (strategies that allow it) instead of
    refusing it."""
    buffer: int = DEFAULT_BUFFER
    buffer_bytes: int = DEFAULT_BUFFER_BYTES
    format: str = "parquet"
    shard_bytes: int = DEFAULT_SHARD_BYTES
    prefix: str = DEFAULT_PREFIX
    workers: int = 1
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        checks = {
            "--max-seq-len": self.max_seq_len >= 1,
            "--max-images": self.max_images >= 0,
            "--buffer": self.buffer >= 1,
            "--buffer-bytes": self.buffer_bytes >= 1,
            "--shard-bytes": self.shard_bytes >= 1,
            "--workers": self.workers >= 1,
        }
        for option, ok in checks.items():
            if not ok:
                raise VlmtileError(f"{option} must be positive")
        if self.fit not in FITS:
            raise VlmtileError(f"unknown fit {self.fit!r}; valid: {', '.join(FITS)}")
        if self.format not in PACKED_SINKS:
            raise VlmtileError(f"unknown format {self.format!r}; valid: {', '.join(PACKED_SINKS)}")
        if not self.prefix or not all(c.isalnum() or c in "-_" for c in self.prefix):
            raise VlmtileError(f"shard prefix must be letters, digits, '-' or '_'; got {self.prefix!r}")

    def settings(self, source: dict[str, Any]) -> dict[str, Any]:
        """What determines the bytes of the output (the config hash): the input's own preprocessing (by
        its hash, so a moved input directory still resumes) and the packing options."""
        return {
            "input": {"config_hash": source["config_hash"], "layout": source.get("layout", "image")},
            "strategy": source["strategy"],
            "dtype": source["dtype"],
            "pack": {
                "max_seq_len": self.max_seq_len,
                "max_images": self.max_images,
                "fit": self.fit,
                "split_long": self.split_long,
                "buffer": self.buffer,
                "buffer_bytes": self.buffer_bytes,
            },
            "format": self.format,
            "shard_bytes": self.shard_bytes,
            "prefix": self.prefix,
        }


@dataclass(frozen=True)
class Source:
    """The input directory as `pack` sees it: its manifest and the strategy that wrote it."""

    manifest: dict[str, Any]
    strategy: Strategy

    @property
    def shards(self) -> dict[str, str]:
        """Input shard name -> sha256, in manifest order."""
        return {s["name"]: s["sha256"] for s in self.manifest["shards"]}


def open_source(config: PackConfig) -> Source:
    """Check that the input can be packed into these sequences; VlmtileError says why not."""
    path = config.input
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise VlmtileError(f"{path} has no {MANIFEST}: not a finished `vlmtile preprocess` output directory")
    if os.path.realpath(path) == os.path.realpath(config.output):
        raise VlmtileError("the output directory must not be the input directory")
    dataset = Dataset(path)
    manifest = dataset.manifest
    if manifest.get("layout") == PACKED_LAYOUT:
        raise VlmtileError(f"{path} is already packed")
    if not manifest.get("pixels", True):
        raise VlmtileError(f"{path} was written with --no-pixels: there is nothing to pack")
    strategy = dataset.strategy
    unit = strategy.sequence_unit()
    if unit == 0:
        raise VlmtileError(
            f"{path} holds {strategy.name} output, whose pixel_values are tiles or canvases, not patch "
            "sequences: pack takes navit and Qwen-family outputs"
        )
    if config.max_seq_len % unit:
        raise VlmtileError(
            f"--max-seq-len must be a multiple of {unit} for {strategy.name} ({unit} rows are one merge "
            f"window, one LLM token); got {config.max_seq_len}"
        )
    if config.split_long and not type(strategy).splittable:
        raise VlmtileError(
            f"--split-long: {strategy.name} images cannot be split (its vision encoder attends across the "
            "whole image, with rotary positions and windows computed per image)"
        )
    return Source(manifest, strategy)


@dataclass(frozen=True)
class PackTask:
    """One group of consecutive input shards, packed by one worker into this task's part files."""

    index: int
    shards: tuple[tuple[str, str], ...]
    """(name, sha256) of the input shards, in order."""
    config: PackConfig
    file_metadata: dict[str, Any]


@dataclass(frozen=True)
class PackTaskReport:
    index: int
    report: dict[str, Any]
    inputs: int
    failures: tuple[Failure, ...]


def _images(record: dict[str, Any]) -> Iterator[tuple[int, np.ndarray, dict[str, Any]]]:
    """(index, stored array, metadata) of each image of one input record, either layout."""
    if "images" in record:  # sample layout
        for index, (pixels, meta) in enumerate(zip(record["pixel_values"], record["images"], strict=True)):
            yield index, pixels, meta
    else:
        yield 0, record["pixel_values"], record


def _counts(sequence: PackedSequence) -> dict[str, int]:
    return {
        "tokens": sequence.num_tokens,
        "padding": sequence.num_padding,
        "segments": len(sequence.segments),
    }


def pack_task(task: PackTask, progress: Progress) -> PackTaskReport:
    """Worker entry point: read the group's images, pack them, write the sequences and the record."""
    config = task.config
    dataset = Dataset(config.input, as_stored=True)
    strategy = dataset.strategy
    n = config.max_seq_len
    unit = strategy.sequence_unit()
    report = PackReport(n)
    failures: list[Failure] = []
    parts: list[Segment] = []
    inputs = 0
    for name, _ in task.shards:
        for record in dataset.iter_shard(os.path.join(config.input, name)):
            for image, pixels, meta in _images(record):
                inputs += 1
                key, source = record["key"], meta["source"]
                length = int(pixels.shape[0])
                if length > n and not config.split_long:
                    which = f"image {image + 1} of {len(record['images'])}: " if "images" in record else ""
                    reason = f"{which}{length} patch rows, more than --max-seq-len {n} (never truncated)"
                    failures.append(Failure(key, source, "pack", reason))
                    report.too_long += 1
                    progress(1, 0)
                    continue
                positions = strategy.patch_positions(meta)
                grid = strategy.patch_grid(meta)
                thw = None
                if "image_grid_thw" in meta:
                    t, h, w = (int(v) for v in meta["image_grid_thw"])
                    thw = (t, h, w)
                offset = 0
                for part in split_lengths(length, n, unit):  # one part unless the image is longer than n
                    rows = slice(offset, offset + part)
                    parts.append(
                        Segment(key, source, image, offset, pixels[rows], positions[rows], grid, thw)
                    )
                    offset += part
                report.images += 1
                report.split += int(length > n)
                progress(1, length)
    writer = _writer(task, strategy, dataset.dtype)
    try:
        bins = assign([p.length for p in parts], n, max_segments=config.max_images, fit=config.fit)
        for number, placed in enumerate(bins):
            sequence = build_sequence(f"{task.index:06d}-{number:06d}", [parts[i] for i in placed], n)
            writer.write(sequence)
            report.add_sequence(len(placed), sequence.num_tokens)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        writer.cleanup()
    files = [{"part": f.name, **counts, "bytes": f.bytes, "sha256": f.sha256} for f, counts in writer.files]
    record_data = {
        "index": task.index,
        "files": files,
        "inputs_read": inputs,
        "input_shards": dict(task.shards),
        "report": report.summary(),
        "errors": [f.to_dict() for f in failures],
    }
    write_json_atomic(record_path(config.output, task.index), record_data)
    return PackTaskReport(task.index, report.summary(), inputs, tuple(failures))


def _writer(task: PackTask, strategy: Strategy, dtype: str) -> RotatingWriter[PackedSequence]:
    config = task.config
    sink_cls = PACKED_SINKS[config.format]

    def open_sink(path: str) -> ShardSink[PackedSequence]:
        return sink_cls(path, strategy, dtype, task.file_metadata, layout=PACKED_LAYOUT)

    return RotatingWriter(config.output, task.index, open_sink, sink_cls.suffix, config.shard_bytes, _counts)


@dataclass(frozen=True)
class PackSummary:
    """The outcome of a `pack` run, as printed in its one-line summary."""

    output: str
    inputs: int
    """Images read."""
    report: dict[str, Any]
    failures: int
    bytes: int
    shards: int
    seconds: float
    complete: bool = True

    @property
    def sequences(self) -> int:
        return int(self.report["sequences"])

    def line(self) -> str:
        r = self.report
        per = r["images_per_sequence"]["mean"]
        padding = r["padding_fraction"]
        shape = f"{r['sequences']:,} sequences of {r['max_seq_len']:,} tokens" + (
            f" ({per:.1f} images each, {padding:.2%} padding)" if per is not None else ""
        )
        state = "" if self.complete else " [incomplete: run again to finish]"
        return (
            f"vlmtile pack: {r['images']:,} images -> {shape}, {self.failures:,} failures, "
            f"{self.bytes / 1e6:,.1f} MB in {self.shards} shard{'s' if self.shards != 1 else ''} -> "
            f"{self.output} ({self.seconds:.1f} s){state}"
        )


def pack(config: PackConfig) -> PackSummary:
    """Pack (or resume, or extend) `config.output` from `config.input`; returns the summary.

    Raises `VlmtileError` for problems the user must fix and `RunStopped` when the run was interrupted,
    ran out of disk or a task failed: what finished is kept and the same command continues.
    """
    started = time.perf_counter()
    source = open_source(config)
    try:
        prepare_output(config.output)
    except OSError as e:
        raise VlmtileError(f"cannot write to {config.output}: {e.strerror or e}") from None
    try:
        return _pack_locked(config, source, started)
    except OSError as e:  # the parent's own writes (plan, records, manifest): a full disk, a read-only mount
        what = "disk full" if is_enospc(e) else "cannot write"
        raise RunStopped(
            f"{what} in {config.output}: {e.strerror or e} ({getattr(e, 'filename', None) or 'output'}); "
            "nothing half-written was marked done"
        ) from None


def _pack_locked(config: PackConfig, source: Source, started: float) -> PackSummary:
    with run_lock(config.output):
        if config.overwrite:
            remove_output(config.output)
        settings = config.settings(source.manifest)
        check_settings(config.output, settings, __version__)
        os.makedirs(os.path.join(config.output, TASK_RECORDS), exist_ok=True)
        with plan_lock(config.output):
            plan = Plan.load(config.output)
            _check_unchanged(config, plan, load_records(config.output, plan), source)
            _extend(plan, config, source)
            plan.save(config.output)
        records = load_records(config.output, plan)
        file_metadata = {"vlmtile_version": __version__, "layout": PACKED_LAYOUT, **settings}
        shards = source.shards
        todo = [
            PackTask(t.index, tuple((name, shards[name]) for name in t.sources), config, file_metadata)
            for t in plan.tasks
            if t.index not in records
        ]
        remove_partials(config.output, {task.index for task in todo})  # what killed attempts left
        remove_orphans(config.output, {t.index for t in plan.tasks})
        stopped = _run(todo, config)
        with plan_lock(config.output):
            summary = _write_results(config, Plan.load(config.output), source, started)
    if stopped is not None:
        raise RunStopped(f"{stopped}; {summary.line()}", summary)
    return summary


def _check_unchanged(
    config: PackConfig, plan: Plan, records: dict[int, dict[str, Any]], source: Source
) -> None:
    """Every input shard planned before must still be in the input, with the same content."""
    shards = source.shards
    for task in plan.tasks:
        packed = records.get(task.index, {}).get("input_shards", {})
        for name in task.sources:
            if name not in shards or (name in packed and packed[name] != shards[name]):
                raise VlmtileError(
                    f"input shard {name} of {config.input} is gone or changed since it was packed into "
                    f"{config.output} (was the input rebuilt?); pack again with --overwrite"
                )


def _extend(plan: Plan, config: PackConfig, source: Source) -> None:
    """Plan the input shards no task has yet, in groups after the existing tasks (incremental)."""
    known = plan.planned_inputs()
    new = [s for s in source.manifest["shards"] if s["name"] not in known]
    run = plan.runs + 1
    for group in group_shards(new, config.buffer, config.buffer_bytes):
        plan.tasks.append(PlannedTask(len(plan.tasks), tuple(new[i]["name"] for i in group), run=run))


def _run(tasks: list[PackTask], config: PackConfig) -> str | None:
    """Execute the tasks; None when all ran, else why the run stopped (the rest waits for a rerun)."""
    show = config.progress and sys.stderr.isatty() and bool(tasks)
    bar = tqdm(unit="img", disable=not show, dynamic_ncols=True, leave=False)
    stop = StopFlag()
    reason: str | None = None

    def on_progress(images: int, tokens: int) -> None:
        bar.update(images)

    try:
        with handle_signals(stop):
            for outcome in run_tasks(pack_task, tasks, config.workers, on_progress, stop=stop):
                error = outcome.error
                if error is None:
                    continue
                remove_partial(config.output, outcome.task.index)
                if isinstance(error, Interrupted):
                    reason = reason or "interrupted (SIGINT / SIGTERM)"
                    continue
                what = "disk full" if is_enospc(error) or "[Errno 28]" in str(error) else "failed"
                reason = reason or f"task {outcome.task.index} {what}: {error}"
                stop.set()
    finally:
        bar.close()
    return reason


def _write_results(config: PackConfig, plan: Plan, source: Source, started: float) -> PackSummary:
    """Finalize names, then the error record, the wids index and (last) the manifest, from the records."""
    suffix = PACKED_SINKS[config.format].suffix
    shards, done = finalize(config.output, plan, config.prefix, suffix)
    records = load_records(config.output, plan)
    report = PackReport(config.max_seq_len)
    errors: list[dict[str, Any]] = []
    inputs = 0
    for task in plan.tasks[:done]:
        record = records[task.index]
        report = report + PackReport.from_summary(record["report"])
        errors += record["errors"]
        inputs += int(record["inputs_read"])
    errors.sort(key=lambda e: (e["source"], e["key"]))
    pending = len(plan.tasks) - done
    summary = report.summary()
    total_bytes = sum(int(s["bytes"]) for s in shards)
    write_json_atomic(os.path.join(config.output, ERRORS), errors, lines=True)
    settings = config.settings(source.manifest)
    manifest = {
        "vlmtile_version": __version__,
        "format_version": 1,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **settings,
        "layout": PACKED_LAYOUT,
        "config_hash": config_hash(settings),
        "input": {**settings["input"], "path": config.input, "shards": len(source.manifest["shards"])},
        "metadata_fields": source.manifest.get("metadata_fields", {}),
        "runs": plan.runs,
        "complete": pending == 0,
        "pending_tasks": pending,
        "shard_pattern": shard_pattern(config.prefix, len(shards), suffix),
        "shards": shards,
        "totals": {
            "inputs": inputs,
            "images": report.images,
            "records": report.sequences,
            "failures": len(errors),
            "tokens": report.tokens,
            "padding": report.padding,
            "segments": report.segments,
            "bytes": total_bytes,
        },
        "report": summary,
        "errors_file": ERRORS,
    }
    if config.format == "webdataset":
        write_json_atomic(os.path.join(config.output, WIDS_INDEX), wids_index(shards))
    write_json_atomic(os.path.join(config.output, MANIFEST), manifest)
    return PackSummary(
        output=config.output,
        inputs=inputs,
        report=summary,
        failures=len(errors),
        bytes=total_bytes,
        shards=len(shards),
        seconds=time.perf_counter() - started,
        complete=pending == 0,
    )


def is_packed(manifest: dict[str, Any]) -> bool:
    return manifest.get("layout") == PACKED_LAYOUT


__all__ = ["PackConfig", "PackSummary", "is_packed", "open_source", "pack"]
