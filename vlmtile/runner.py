"""`preprocess` as a library call: inputs -> deterministic shards -> per-shard workers -> manifest.

Shard i always holds inputs [i*shard_size, (i+1)*shard_size) of the sorted input list, whatever the number
of workers. Each shard is written atomically by its worker, which then writes a small completion record
in `_shards/`; the manifest and the error record are written last, by the parent, from the reports.
"""

from __future__ import annotations

import functools
import hashlib
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from tqdm import tqdm

from . import __version__, ray_executor, storage
from .decode import DEFAULT_MAX_IMAGE_PIXELS
from .dtypes import STORAGE_DTYPES
from .errors import RunStopped, VlmtileError
from .executors import (
    Interrupted,
    Outcome,
    Progress,
    StopFlag,
    SupportsIsSet,
    TaskFailed,
    WorkerDied,
    handle_signals,
    run_tasks,
)
from .ledger import (
    CHANGED,
    ERRORS,
    MANIFEST,
    RUN_FILE,
    TASK_RECORDS,
    WIDS_INDEX,
    Changes,
    Plan,
    PlannedTask,
    check_settings,
    compare,
    config_hash,
    current_errors,
    finalize,
    is_enospc,
    load_records,
    plan_lock,
    prepare_output,
    read_json,
    record_path,
    remove_orphans,
    remove_output,
    remove_partial,
    remove_partials,
    run_lock,
    stream_skip,
    write_json_atomic,
)
from .samples import (
    Failure,
    ImageRef,
    Listing,
    Sample,
    SourceOptions,
    StreamInput,
    input_kind,
    iter_stream,
    list_samples,
)
from .sinks import SINKS, RotatingWriter, ShardFile, ShardSink
from .sources import display_path, make_key
from .strategies import Strategy
from .streams import is_url, local_path
from .work import Budget, SampleRecord, process_sample

SHARD_RECORDS = TASK_RECORDS
FORMAT_VERSION = 2
DEFAULT_SHARD_SIZE = 64
"""Samples per task (listed inputs): ~1 GB of float16 InternVL tiles at 12 MP, and enough tasks to keep
workers busy. Tar shards and Parquet files are one task each."""
DEFAULT_SHARD_BYTES = 1 << 30
"""Largest output file: a task whose output grows past this continues in a new file."""
DEFAULT_PREFIX = "shard"
RATE_MIN_INPUTS = 100
"""A failure rate (--max-errors P%) is judged once this many inputs of the run have been processed."""
EXECUTORS = ("local", "ray")
DEFAULT_TASK_TIMEOUT = 600.0
"""A worker silent this long on one input is hung (a 12 MP image takes well under a second)."""


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
    workers: int | None = None
    """Tasks at once. None: every usable core (local), or every CPU of the Ray cluster (`ray`)."""
    shard_size: int = DEFAULT_SHARD_SIZE
    shard_bytes: int = DEFAULT_SHARD_BYTES
    prefix: str = DEFAULT_PREFIX
    pixels: bool = True
    """False: metadata only (plans, lengths, grids), no arrays."""
    budget: Budget = field(default_factory=Budget)
    sources: SourceOptions = field(default_factory=SourceOptions)
    overwrite: bool = False
    progress: bool = True
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
    """Refuse images above this many pixels (decompression bombs) before decoding them; None: no limit."""
    retry_failed: bool = False
    """Plan the inputs in the error record again (they may have failed for a transient reason)."""
    max_errors: int | None = None
    """Stop the run once more inputs than this have failed in it (what is done is kept)."""
    max_error_rate: float | None = None
    """Stop the run once more than this fraction of its inputs have failed, judged from
    `RATE_MIN_INPUTS` inputs on (so that the first bad file of a run does not stop it)."""
    rank: int = 0
    world_size: int = 1
    """Run only the tasks with index % world_size == rank (several machines on one output directory)."""
    task_timeout: float | None = DEFAULT_TASK_TIMEOUT
    """Seconds a worker may go without finishing an input before its task is killed and retried."""
    task_retries: int = 1
    """How often a task whose worker died or hung is started again before its inputs become errors."""
    fast: bool = False
    """Shrink sources before the strategy's resizes (`vlmtile.fast`): faster, NOT bit-exact."""
    executor: str = "local"
    """"local": a process pool on this machine; "ray": one Ray task per shard task (`vlmtile[ray]`).
    The output is the same either way, so neither this nor `workers` is part of the settings."""
    ray_address: str | None = None
    """The Ray cluster to use (else `RAY_ADDRESS`, else a local Ray started for the run)."""

    def __post_init__(self) -> None:
        # file:///mnt/shared/out is the mounted path; other URLs are object storage (see `storage`)
        output = local_path(self.output)
        if output.startswith("pipe:"):
            raise VlmtileError(f"output {self.output}: a pipe: command cannot be an output directory")
        object.__setattr__(self, "output", output)
        if self.format not in SINKS:
            raise VlmtileError(f"unknown format {self.format!r}; valid: {', '.join(SINKS)}")
        if self.dtype not in STORAGE_DTYPES:
            raise VlmtileError(f"unknown dtype {self.dtype!r}; valid: {', '.join(STORAGE_DTYPES)}")
        if self.shard_size < 1:
            raise VlmtileError(f"shard size must be at least 1, got {self.shard_size}")
        if self.workers is not None and self.workers < 1:
            raise VlmtileError(f"workers must be at least 1, got {self.workers}")
        if self.executor not in EXECUTORS:
            raise VlmtileError(f"unknown executor {self.executor!r}; valid: {', '.join(EXECUTORS)}")
        if self.ray_address is not None and self.executor != "ray":
            raise VlmtileError("--ray-address is for --executor ray")
        if not 0 <= self.rank < self.world_size:
            raise VlmtileError(
                f"--rank must be in [0, --world-size); got rank {self.rank} of {self.world_size}"
            )
        if self.max_errors is not None and self.max_errors < 0:
            raise VlmtileError(f"--max-errors must be at least 0, got {self.max_errors}")
        if self.max_error_rate is not None and not 0 <= self.max_error_rate < 1:
            raise VlmtileError(f"--max-errors as a rate must be in [0%, 100%), got {self.max_error_rate:.2%}")
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
            "fast": self.fast,
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
    stamps: dict[str, str | None] = field(default_factory=dict)
    """Each input's stamp as this run listed it (size and mtime, or a manifest line's hash), kept in the
    completion record so that later runs can tell whether the input changed since."""
    skip: frozenset[str] = frozenset()
    """Sample keys of this stream that an earlier, damaged attempt already stored or failed."""

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
                {"part": f.name, **counts, "bytes": f.bytes, "sha256": f.sha256} for f, counts in self.files
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
    complete: bool = True
    """False while planned tasks remain (an interrupted run, or other ranks still working)."""
    changed: int = 0
    """Stored inputs that changed since they were processed (kept as they were; listed in _changed.jsonl)."""
    changed_before: int = 0
    """The same count after the previous run: more now means new changes (worth a warning under -q)."""
    took_over: dict[str, Any] | None = None
    """The holder named in a lock left by a killed run, which this run took over."""

    def line(self) -> str:
        unit = "samples" if self.layout == "sample" else "images"
        state = "" if self.complete else " [incomplete: run again to finish]"
        return (
            f"vlmtile: {self.records:,} {unit}, {self.failures:,} failures, {self.tokens:,} tokens, "
            f"{self.bytes / 1e6:,.1f} MB in {self.shards} shard{'s' if self.shards != 1 else ''} -> "
            f"{self.output} ({self.seconds:.1f} s){state}"
        )


def _record_counts(record: SampleRecord) -> dict[str, int]:
    return {"tokens": record.num_tokens, "tiles": record.num_tiles}


def _writer(task: ShardTask) -> RotatingWriter[SampleRecord]:
    """The task's rotating output, through the format's sink."""
    config = task.config
    sink_cls = SINKS[config.format]

    def open_sink(path: str) -> ShardSink[SampleRecord]:
        return sink_cls(
            path, config.strategy, config.dtype, task.file_metadata, layout=task.layout, pixels=config.pixels
        )

    suffix, limit = sink_cls.suffix, config.shard_bytes
    return RotatingWriter(task.output, task.index, open_sink, suffix, limit, _record_counts)


def _task_samples(task: ShardTask) -> Iterable[Sample | Failure]:
    if task.stream is not None:
        return iter_stream(task.stream, task.config.sources)
    return task.samples


def _one_thread_per_worker() -> None:
    """In a worker process, keep pyarrow to one thread: the pool already runs one worker per core, and
    pyarrow's default pool (one thread per core) would only make workers compete for the same cores."""
    if multiprocessing.parent_process() is not None:
        import pyarrow as pa

        pa.set_cpu_count(1)
        pa.set_io_thread_count(1)


def process_shard(task: ShardTask, progress: Progress) -> ShardReport:
    """Worker entry point: process this task's samples, write its files and its completion record."""
    _one_thread_per_worker()
    config = task.config
    failures: list[Failure] = []
    failed_inputs: list[str | None] = []
    done_keys: list[str] = []
    damaged = False
    inputs = records = tokens = tiles = 0
    writer = _writer(task)
    try:
        for sample in _task_samples(task):
            identity: str | None = sample.source
            if task.stream is not None:
                # A stream-level failure (damage, unreadable file) is the stream's own; the samples
                # before it are its samples, and those an earlier attempt did are not done again.
                if isinstance(sample, Failure) and sample.source == task.stream.source:
                    identity = task.stream.source
                    damaged = True
                elif sample.key in task.skip:
                    continue
                else:
                    identity = None
                    done_keys.append(sample.key)
            inputs += 1
            if isinstance(sample, Failure):
                failures.append(sample)
                failed_inputs.append(identity)
                progress(1, 0)
                continue
            out = process_sample(
                sample,
                config.strategy,
                config.dtype,
                config.budget,
                pixels=config.pixels,
                max_pixels=config.max_image_pixels,
                fast=config.fast,
            )
            if isinstance(out, Failure):
                failures.append(out)
                failed_inputs.append(identity)
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
    finally:
        writer.cleanup()
    report = ShardReport(task.index, tuple(writer.files), inputs, records, tokens, tiles, tuple(failures))
    errors = [
        {**f.to_dict(), **({"input": i} if i is not None else {})}
        for f, i in zip(failures, failed_inputs, strict=True)
    ]
    record: dict[str, Any] = {**report.to_dict(), "errors": errors}
    if task.stream is not None:
        record["stamp"] = task.stamps.get(task.stream.source)
        if damaged:  # a retry reads on from here
            record["done_keys"] = done_keys
    else:
        record["stamps"] = {s.source: task.stamps.get(s.source) for s in task.samples}
    write_json_atomic(record_path(task.output, task.index), record)
    return report


def _clear_output(config: RunConfig) -> None:
    """Under the run lock: with --overwrite, remove everything vlmtile wrote in OUT (and nothing else);
    without it, refuse output of an older vlmtile that has no run state to resume from."""
    if config.overwrite:
        remove_output(config.output)
    elif storage.exists(storage.join(config.output, MANIFEST)) and not storage.exists(
        storage.join(config.output, RUN_FILE)
    ):
        raise VlmtileError(
            f"output directory {config.output} holds output of an older vlmtile (no {RUN_FILE}) that cannot "
            "be resumed; choose another directory or pass --overwrite"
        )


def file_stamp(path: str) -> str | None:
    """`SIZE:MTIME_NS` of a local file (following links), None when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return f"{st.st_size}:{st.st_mtime_ns}"


def sample_stamp(sample: Sample) -> str | None:
    """How a later run recognises this input unchanged: an image file's size and mtime, or the hash of a
    manifest line's content (manifest lines are identified by position, so an edited line shows here)."""
    if len(sample.images) == 1 and sample.images[0].path is not None and not sample.fields:
        path = sample.images[0].path
        if display_path(path) == sample.source and not is_url(path):
            return file_stamp(path)
    text = json.dumps(sample.fields, sort_keys=True, ensure_ascii=False, default=str)
    return "sha1:" + hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()


def stream_stamp(stream: StreamInput) -> str | None:
    """A local tar / Parquet file's size and mtime; None for URLs and pipes (never seen as changed)."""
    return None if is_url(stream.url) else file_stamp(stream.url)


def _shard_task(
    planned: PlannedTask,
    by_source: dict[str, Sample],
    streams: dict[str, StreamInput],
    stamps: dict[str, str | None],
    skip: frozenset[str],
    config: RunConfig,
    layout: str,
    file_metadata: dict[str, Any],
) -> ShardTask:
    """The executable task for a planned one, from this run's listing."""
    if planned.stream is not None:
        stream = streams.get(planned.stream)
        if stream is None:  # planned by an earlier run, not among this run's inputs
            stream = StreamInput(
                kind=input_kind(planned.stream), url=planned.stream, key=_gone_key(planned.stream)
            )
        task_stamps = {planned.stream: stamps.get(planned.stream)}
        return ShardTask(
            planned.index, (), stream, config.output, config, layout, file_metadata, task_stamps, skip
        )
    samples = tuple(by_source.get(source) or _gone(source) for source in planned.sources)
    task_stamps = {source: stamps.get(source) for source in planned.sources}
    return ShardTask(planned.index, samples, None, config.output, config, layout, file_metadata, task_stamps)


def _gone_key(source: str) -> str:
    return make_key(os.path.basename(source)) or "input"


def _gone(source: str) -> Sample:
    """An input planned by an earlier run that this run's listing no longer has: it fails when read."""
    return Sample(key=_gone_key(source), source=source, images=(ImageRef("image", source, path=source),))


def _task_failed(task: ShardTask, error: BaseException) -> None:
    """A task whose worker raised or died (after its retries): its inputs become error lines.

    Its partial files are removed and a completion record lists every input as failed, so the run
    accounts for them and `--retry-failed` can try them again later.
    """
    remove_partial(task.output, task.index)
    detail = str(error) if isinstance(error, TaskFailed | WorkerDied) else f"{type(error).__name__}: {error}"
    reason = f"task {task.index} ({task.source}) was not written: {detail}"
    if task.stream is not None:
        source = task.stream.source
        errors = [{**Failure(task.stream.key, source, "write", reason).to_dict(), "input": source}]
        inputs = 1
    else:
        errors = [
            {**Failure(s.key, s.source, "write", reason).to_dict(), "input": s.source} for s in task.samples
        ]
        inputs = len(task.samples)
    record = {
        "index": task.index,
        "files": [],
        "inputs": inputs,
        "records": 0,
        "failures": len(errors),
        "tokens": 0,
        "tiles": 0,
        "errors": errors,
        "stream_failed": task.stream is not None,
    }
    if task.stream is not None:
        record["stamp"] = task.stamps.get(task.stream.source)
        record["done_keys"] = []
    else:
        record["stamps"] = {s.source: task.stamps.get(s.source) for s in task.samples}
    write_json_atomic(record_path(task.output, task.index), record)


def _is_disk_full(error: BaseException) -> bool:
    text = str(error)
    return is_enospc(error) or "[Errno 28]" in text or "[Errno 122]" in text


def shard_pattern(prefix: str, count: int, suffix: str) -> str | None:
    """The brace pattern naming every shard (`shard-{000000..000012}.tar`), as WebDataset takes it."""
    if count == 0:
        return None
    if count == 1:
        return f"{prefix}-000000{suffix}"
    return f"{prefix}-{{000000..{count - 1:06d}}}{suffix}"


def preprocess(config: RunConfig) -> RunSummary:
    """Run (or resume, or extend) the job; returns the summary.

    Raises `VlmtileError` for problems the user must fix, and `RunStopped` (a VlmtileError) when the run
    was interrupted, ran out of disk or passed --max-errors: what finished is kept and the next run of the
    same command continues from there.
    """
    started = time.perf_counter()
    if config.executor == "ray" and not ray_executor.ray_available():
        raise VlmtileError(ray_executor.RAY_MISSING)  # before anything is read or written
    listing = list_samples(config.inputs, config.sources)  # before touching OUT: bad inputs change nothing
    if not listing.samples and not listing.streams and not listing.failures:
        raise VlmtileError(f"no images found in {', '.join(config.inputs)}")
    try:
        prepare_output(config.output)
    except OSError as e:  # a read-only or missing parent, a full disk: say so, in one line
        raise VlmtileError(f"cannot write to {config.output}: {e.strerror or e}") from None
    try:
        return _preprocess_locked(config, listing, started)
    except OSError as e:  # the parent's own writes (plan, records, manifest): a full disk, a read-only mount
        what = "disk full" if is_enospc(e) else "cannot write"
        raise RunStopped(
            f"{what} in {config.output}: {e.strerror or e} ({getattr(e, 'filename', None) or 'output'}); "
            "nothing half-written was marked done"
        ) from None


def _preprocess_locked(config: RunConfig, listing: Listing, started: float) -> RunSummary:
    with run_lock(config.output, None if config.world_size == 1 else config.rank) as lock:
        _clear_output(config)
        settings = config.settings()
        check_settings(config.output, settings, __version__)
        storage.makedirs(storage.join(config.output, SHARD_RECORDS))
        by_source = {s.source: s for s in listing.samples}
        streams = {s.source: s for s in listing.streams}
        stamps = {s.source: sample_stamp(s) for s in listing.samples}
        stamps.update((source, stream_stamp(stream)) for source, stream in streams.items())
        with plan_lock(config.output):
            plan = Plan.load(config.output)
            records = load_records(config.output, plan)
            changes = compare(plan, records, stamps, config.retry_failed)
            plan.extend([s.source for s in listing.samples], list(streams), config.shard_size, changes.redo)
            plan.save(config.output)
        file_metadata = {"vlmtile_version": __version__, "layout": listing.layout, **settings}
        todo = [
            _shard_task(
                t,
                by_source,
                streams,
                stamps,
                stream_skip(plan, records, t) if t.stream is not None else frozenset(),
                config,
                listing.layout,
                file_metadata,
            )
            for t in plan.tasks
            if t.index % config.world_size == config.rank and t.index not in records
        ]
        remove_partials(config.output, {task.index for task in todo})  # what killed attempts left
        if config.world_size == 1:
            remove_orphans(config.output, {t.index for t in plan.tasks})
        stopped = _run(todo, config, listing.layout)
        with plan_lock(config.output):
            plan = Plan.load(config.output)
            listing_errors = [f.to_dict() for f in listing.failures]
            summary = write_results(
                config, plan, listing.layout, listing_errors, started, changes, lock.took_over
            )
    if stopped is not None:
        raise RunStopped(f"{stopped}; {summary.line()}", summary)
    return summary


def _run(tasks: list[ShardTask], config: RunConfig, layout: str) -> str | None:
    """Execute the tasks; None when all ran, else why the run stopped early (the rest waits for a rerun)."""
    show = config.progress and sys.stderr.isatty()
    total = sum(len(t.samples) for t in tasks) if all(t.stream is None for t in tasks) else None
    bar = tqdm(
        total=total,
        unit="sample" if layout == "sample" else "img",
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

    stop = StopFlag()
    reason: str | None = None
    failures = processed = 0

    def cleanup(task: ShardTask, pid: int | None) -> None:
        remove_partial(task.output, task.index)

    try:
        with handle_signals(stop):
            for outcome in _executor(config)(
                process_shard,
                tasks,
                config.workers,
                on_progress,
                stop=stop,
                timeout=config.task_timeout,
                retries=config.task_retries,
                on_retry=cleanup,
            ):
                error = outcome.error
                if error is None and outcome.result is not None:
                    failures += len(outcome.result.failures)
                    processed += outcome.result.inputs
                elif isinstance(error, Interrupted):
                    remove_partial(config.output, outcome.task.index)
                    reason = reason or "interrupted"
                    continue
                elif error is not None and _is_disk_full(error):
                    remove_partial(config.output, outcome.task.index)
                    if reason is None:
                        reason = f"disk full while writing task {outcome.task.index}: {error}"
                    stop.set()
                    continue
                else:
                    _task_failed(outcome.task, error or RuntimeError("no result"))
                    failures += len(outcome.task.samples) or 1
                    processed += len(outcome.task.samples) or 1
                if reason is None:
                    reason = _too_many_errors(config, failures, processed)
                    if reason is not None:
                        stop.set()
    finally:
        bar.close()
    if reason == "interrupted":
        reason = "interrupted (SIGINT / SIGTERM)"
    return reason


class _RunTasks(Protocol):
    """What `_run` needs of an executor: `executors.run_tasks`'s signature and contract."""

    def __call__(
        self,
        fn: Callable[[ShardTask, Progress], ShardReport],
        tasks: Sequence[ShardTask],
        workers: int | None,
        on_progress: Progress | None = None,
        *,
        stop: SupportsIsSet | None = None,
        timeout: float | None = None,
        retries: int = 0,
        on_retry: Callable[[ShardTask, int | None], None] | None = None,
    ) -> Iterator[Outcome[ShardTask, ShardReport]]: ...


def _executor(config: RunConfig) -> _RunTasks:
    """The engine that runs the tasks: the local pool, or Ray. Both yield the same outcomes."""
    if config.executor == "ray":
        return functools.partial(ray_executor.run_tasks, address=config.ray_address)
    return _local


def _local(
    fn: Callable[[ShardTask, Progress], ShardReport],
    tasks: Sequence[ShardTask],
    workers: int | None,
    on_progress: Progress | None = None,
    **kwargs: Any,
) -> Iterator[Outcome[ShardTask, ShardReport]]:
    """The local pool, on every usable core unless told otherwise."""
    return run_tasks(fn, tasks, workers or available_cpus(), on_progress, **kwargs)


def _too_many_errors(config: RunConfig, failures: int, processed: int) -> str | None:
    """Why the run must stop under --max-errors, or None."""
    if config.max_errors is not None and failures > config.max_errors:
        return f"stopped after {failures} failed inputs (--max-errors {config.max_errors})"
    rate = config.max_error_rate
    if rate is not None and processed >= RATE_MIN_INPUTS and failures > rate * processed:
        return (
            f"stopped: {failures} of {processed} inputs failed ({failures / processed:.1%}; "
            f"--max-errors {rate * 100:.4g}%)"
        )
    return None


def write_results(
    config: RunConfig,
    plan: Plan,
    layout: str,
    listing_errors: list[dict[str, Any]],
    started: float,
    changes: Changes,
    took_over: dict[str, Any] | None,
) -> RunSummary:
    """Finalize names, then the error record, the wids index and (last) the manifest, from the records.

    `listing_errors`: inputs that failed before any task (manifest lines that are not JSON), which no
    completion record holds. Also what `merge-manifests` ends with, for the directory it merged into.
    """
    suffix = SINKS[config.format].suffix
    shards, done = finalize(config.output, plan, config.prefix, suffix)
    errors, totals = current_errors(plan, load_records(config.output, plan), done)
    errors = sorted([*errors, *listing_errors], key=lambda e: e["source"])
    totals["inputs"] += len(listing_errors)
    totals["failures"] = len(errors)
    totals["bytes"] = sum(s["bytes"] for s in shards)
    pending = len(plan.tasks) - done
    changed_before = _previous_changed(config.output)
    write_json_atomic(storage.join(config.output, CHANGED), changes.changed, lines=True)
    write_json_atomic(storage.join(config.output, ERRORS), errors, lines=True)
    settings = config.settings()
    manifest = {
        "vlmtile_version": __version__,
        "format_version": FORMAT_VERSION,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **settings,
        "layout": layout,
        "config_hash": config_hash(settings),
        "metadata_fields": dict(config.strategy.metadata_fields),
        "inputs": list(config.inputs),
        "runs": plan.runs,
        "complete": pending == 0,
        "pending_tasks": pending,
        "shard_pattern": shard_pattern(config.prefix, len(shards), suffix),
        "shards": shards,
        "totals": totals,
        "errors_file": ERRORS,
        "changed_inputs": len(changes.changed),
    }
    if config.format == "webdataset":
        write_json_atomic(storage.join(config.output, WIDS_INDEX), wids_index(shards))
    write_json_atomic(storage.join(config.output, MANIFEST), manifest)
    return RunSummary(
        output=config.output,
        inputs=totals["inputs"],
        records=totals["records"],
        failures=totals["failures"],
        tokens=totals["tokens"],
        bytes=totals["bytes"],
        shards=len(shards),
        seconds=time.perf_counter() - started,
        layout=layout,
        complete=manifest["complete"],
        changed=len(changes.changed),
        changed_before=changed_before,
        took_over=took_over,
    )


def _previous_changed(output: str) -> int:
    try:
        return int(read_json(storage.join(output, MANIFEST)).get("changed_inputs", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


def wids_index(shards: list[dict[str, Any]]) -> dict[str, Any]:
    """The `wids` shard index (webdataset's indexed reader): shard URLs relative to the index file."""
    return {
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "shardlist": [{"url": s["name"], "nsamples": s["records"], "filesize": s["bytes"]} for s in shards],
    }
