"""`stats`: visual-token accounting from image headers, through the same `plan()` that `preprocess` uses.

Only headers are read (`PIL.Image.open` is lazy: width, height and the EXIF orientation come from the file
header; no pixel is decoded), so a folder of multi-megapixel JPEGs is counted at file-open speed. Because
the numbers come from `Strategy.plan`, they are by construction the ones `preprocess` writes. A finished
output directory is reported from its stored metadata, never its pixel arrays.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import tarfile
import warnings
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from .dtypes import STORAGE_DTYPES, numpy_dtype
from .errors import ImageError, VlmtileError
from .executors import Progress, run_tasks
from .ledger import MANIFEST
from .packing import DEFAULT_BUFFER, DEFAULT_BUFFER_BYTES, PackReport, group_shards, simulate
from .samples import Failure, ImageRef, Sample, SourceOptions, StreamInput, iter_stream, list_samples
from .sources import InputItem, display_path
from .strategies import Plan, Strategy, describe
from .streams import is_url, read_bytes_url
from .work import Budget

STATS_SCHEMA_VERSION = 1
MIN_CHUNK = 1024
"""Fewest inputs per parallel task: header reads are ~0.1 ms each, a worker start costs more than 100."""
PROGRESS_EVERY = 256
"""Images between progress messages from a worker (one message per header would cost more than it)."""

_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
_ORIENTATION_TAG = 0x0112


@dataclass(frozen=True)
class Column:
    """One strategy with one parameter set: a column of the report."""

    label: str
    strategy: Strategy


@dataclass
class ColumnStats:
    """Mergeable tallies for one column (`+` combines chunks computed in parallel)."""

    images: int = 0
    failure_reasons: Counter[str] = field(default_factory=Counter)
    tokens: array[int] = field(default_factory=lambda: array("q"))
    tiles: Counter[int] = field(default_factory=Counter)
    elements: int = 0
    """Sum over images of the number of elements in `pixel_values` (bytes = elements * itemsize)."""
    rows: array[int] = field(default_factory=lambda: array("q"))
    """Per image, in input order: its patch-sequence length (`pixel_values` rows) when the strategy's
    output can be packed, else 0 (for `--pack-len`)."""

    def add(self, num_tokens: int, num_tiles: int, elements: int, rows: int = 0) -> None:
        self.images += 1
        self.tokens.append(num_tokens)
        self.tiles[num_tiles] += 1
        self.elements += elements
        self.rows.append(rows)

    def fail(self, reason: str) -> None:
        self.failure_reasons[reason] += 1

    def __add__(self, other: ColumnStats) -> ColumnStats:
        tokens = array("q", self.tokens)
        tokens.extend(other.tokens)
        rows = array("q", self.rows)
        rows.extend(other.rows)
        return ColumnStats(
            images=self.images + other.images,
            failure_reasons=self.failure_reasons + other.failure_reasons,
            tokens=tokens,
            tiles=self.tiles + other.tiles,
            elements=self.elements + other.elements,
            rows=rows,
        )

    def packable(self) -> bool:
        return bool(self.rows) and min(self.rows) > 0

    def pack_estimate(self, pack_len: int) -> PackReport | None:
        """What `vlmtile pack --max-seq-len pack_len` would report (default buffer, no cap, no split), the
        images cut into buffers of `DEFAULT_BUFFER` in input order; None when the output is not packable."""
        if not self.packable():
            return None
        return simulate(self.rows, pack_len, buffer=DEFAULT_BUFFER)

    def summary(
        self, budget: int | None, pack_len: int | None = None, pack: PackReport | None = None
    ) -> dict[str, Any]:
        """The documented per-column JSON object (docs/stats.md); `pack` is an exact packing report to use
        instead of the estimate (`stats OUT_DIR`)."""
        if pack is None and pack_len is not None:
            pack = self.pack_estimate(pack_len)
        tokens = np.frombuffer(self.tokens, dtype=np.int64) if self.images else np.zeros(0, np.int64)

        def pct(q: float) -> int | None:
            # Nearest rank: a token count some image really has, never an interpolated one.
            return int(np.percentile(tokens, q, method="inverted_cdf")) if tokens.size else None

        return {
            "images": self.images,
            "failures": sum(self.failure_reasons.values()),
            "failure_reasons": dict(sorted(self.failure_reasons.items())),
            "total_tokens": int(tokens.sum()),
            "mean_tokens": float(tokens.mean()) if tokens.size else None,
            "p50_tokens": pct(50),
            "p90_tokens": pct(90),
            "p99_tokens": pct(99),
            "max_tokens": int(tokens.max()) if tokens.size else None,
            "tiles_histogram": {str(k): v for k, v in sorted(self.tiles.items())},
            "bytes": {d: self.elements * numpy_dtype(d).itemsize for d in STORAGE_DTYPES},
            "budget": budget,
            "over_budget": int((tokens > budget).sum()) if budget is not None else None,
            "pack": pack.summary() if pack is not None else None,
        }


@dataclass(frozen=True)
class Header:
    """What `stats` needs from a file: its stored size and EXIF orientation."""

    width: int
    height: int
    orientation: int


def read_header(path: str | bytes, png_orientation: bool = True) -> Header:
    """Width, height and EXIF orientation from the file header, without decoding pixels.

    The orientation is what `ImageOps.exif_transpose` would use (Pillow's `getexif`, which also reads
    XMP and PNG text-chunk profiles), so `stats` and `preprocess --exif-transpose` agree. Pillow finds a
    PNG eXIf chunk that follows the image data only by decoding; vlmtile walks the chunk list instead
    (`png_orientation`, on when some strategy honours EXIF). Pillow's TIFF reader applies the orientation
    itself (the size it reports is already upright), so TIFF orientation counts as 1.
    """
    try:
        with warnings.catch_warnings():
            # As in decode.py: the warning is Pillow being cautious; the hard limit still raises below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(path) if isinstance(path, bytes) else path) as image:
                width, height = image.size
                found = 1
                if image.format == "PNG":
                    if png_orientation:
                        found = _png_orientation(image, path)
                elif image.format != "TIFF":
                    found = _orientation(image.getexif())
    except FileNotFoundError:
        raise ValueError("file not found") from None
    except IsADirectoryError:
        raise ValueError("is a directory, not an image file") from None
    except PermissionError:
        raise ValueError("cannot read file: permission denied") from None
    except UnidentifiedImageError:
        raise ValueError("not an image: content not recognised by Pillow") from None
    except Image.DecompressionBombError as e:
        raise ValueError(f"image too large to decode safely: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ValueError(f"unreadable image header: {e}") from None
    if width < 1 or height < 1:
        raise ValueError(f"image has no pixels ({width}x{height})")
    return Header(width, height, found)


def _orientation(exif: Image.Exif) -> int:
    return int(exif.get(_ORIENTATION_TAG, 1) or 1)


def _png_orientation(image: Image.Image, path: str | bytes) -> int:
    """A PNG's orientation as Pillow would find it after decoding, found by skipping through chunks."""
    if "exif" not in image.info:
        exif = _png_exif_chunk(path)
        if exif is not None:
            image.info["exif"] = b"Exif\x00\x00" + exif  # what Pillow's eXIf handler stores
    # The base-class getexif: PngImageFile's own would load() the pixels first.
    return _orientation(Image.Image.getexif(image))


def _png_exif_chunk(path: str | bytes) -> bytes | None:
    """The data of the first eXIf chunk in a PNG file, reading chunk headers only (seeking past data)."""
    with io.BytesIO(path) if isinstance(path, bytes) else open(path, "rb") as f:
        if f.read(8) != b"\x89PNG\r\n\x1a\n":
            return None
        while header := f.read(8):
            if len(header) < 8:
                return None
            length, kind = struct.unpack(">I4s", header)
            if kind == b"eXIf":
                return f.read(length)
            if kind == b"IEND":
                return None
            f.seek(length + 4, os.SEEK_CUR)  # data and CRC
    return None


def planned_size(header: Header, strategy: Strategy) -> tuple[int, int]:
    """The size `plan` sees: transposed when the strategy honours EXIF and the orientation rotates."""
    if strategy.exif_transpose and header.orientation in _TRANSPOSING_ORIENTATIONS:
        return header.height, header.width
    return header.width, header.height


@dataclass(frozen=True)
class StatsTask:
    index: int
    items: tuple[InputItem, ...]
    columns: tuple[Column, ...]
    budget: int | None
    emit: bool
    orientation: bool
    """Read PNG EXIF orientation (only when some column honours it: it can mean reading the whole file)."""
    samples: tuple[Sample, ...] = ()
    stream: StreamInput | None = None
    sources: SourceOptions = field(default_factory=SourceOptions)
    sample_budget: Budget = field(default_factory=Budget)


@dataclass(frozen=True)
class StatsReport:
    index: int
    stats: tuple[ColumnStats, ...]
    lengths: tuple[dict[str, Any], ...]


def count_chunk(task: StatsTask, progress: Progress) -> StatsReport:
    """Worker body: headers -> plans -> tallies for one chunk of inputs."""
    if task.samples or task.stream is not None:
        return _count_samples(task, progress)
    stats = tuple(ColumnStats() for _ in task.columns)
    lengths: list[dict[str, Any]] = []
    pending_images = pending_tokens = 0
    for item in task.items:
        if pending_images >= PROGRESS_EVERY:
            progress(pending_images, pending_tokens)
            pending_images = pending_tokens = 0
        source = display_path(item.source)
        try:
            header = read_header(item.source, png_orientation=task.orientation)
        except ValueError as e:
            for s in stats:
                s.fail(f"header: {e}")
            if task.emit:
                lengths.append({"source": source, "key": item.key, "error": str(e)})
            pending_images += 1
            continue
        per_column: dict[str, int | None] = {}
        tokens_here = 0
        for column, s in zip(task.columns, stats, strict=True):
            width, height = planned_size(header, column.strategy)
            try:
                plan = column.strategy.for_image(item.key, 0).plan(width, height)
            except ValueError as e:
                s.fail(f"refused: {_reason_class(str(e))}")
                per_column[column.label] = None
                continue
            s.add(plan.num_tokens, plan.num_tiles, int(np.prod(plan.shape)), _rows(column.strategy, plan))
            per_column[column.label] = plan.num_tokens
            tokens_here += plan.num_tokens
        if task.emit:
            lengths.append(
                {
                    "source": source,
                    "key": item.key,
                    "width": header.width,
                    "height": header.height,
                    "orientation": header.orientation,
                    "num_tokens": per_column,
                }
            )
        pending_images += 1
        pending_tokens += tokens_here
    progress(pending_images, pending_tokens)
    return StatsReport(task.index, stats, tuple(lengths))


def _image_header(ref: ImageRef, orientation: bool) -> Header:
    if ref.data is not None:
        return read_header(ref.data, png_orientation=orientation)
    if ref.path is None:
        raise ValueError("image has neither bytes nor a path")
    if ref.path.startswith("data:") or is_url(ref.path):
        try:
            return read_header(read_bytes_url(ref.path), png_orientation=orientation)
        except ImageError as e:
            raise ValueError(str(e)) from None
    return read_header(ref.path, png_orientation=orientation)


def _column_budget(strategy: Strategy, budget: Budget) -> Budget:
    """The per-sample budgets this column's strategy can honour (like strategy options, a budget applies
    to the columns that have such a limit; `compute_stats` refuses one that applies to none)."""
    rules = type(strategy).budget_rules
    return Budget(
        max_tiles=budget.max_tiles if "max_tiles" in rules else None,
        max_tokens=budget.max_tokens if "max_tokens" in rules else None,
    )


def _count_samples(task: StatsTask, progress: Progress) -> StatsReport:
    """Samples (manifests, tar shards, Parquet): per-image tallies, per-sample lengths.

    Each image is planned under the strategy the sample's image count and budget call for, exactly as
    `preprocess` does, so a multi-image sample counts what training will see.
    """
    stats = tuple(ColumnStats() for _ in task.columns)
    lengths: list[dict[str, Any]] = []
    samples: Iterable[Sample | Failure] = (
        iter_stream(task.stream, task.sources) if task.stream is not None else task.samples
    )
    for sample in samples:
        if isinstance(sample, Failure):
            for s in stats:
                s.fail(f"{sample.stage}: {_reason_class(sample.reason)}")
            if task.emit:
                lengths.append({"source": sample.source, "key": sample.key, "error": sample.reason})
            progress(1, 0)
            continue
        try:
            headers = [_image_header(ref, task.orientation) for ref in sample.images]
        except ValueError as e:
            for s in stats:
                s.fail(f"header: {e}")
            if task.emit:
                lengths.append({"source": sample.source, "key": sample.key, "error": str(e)})
            progress(1, 0)
            continue
        per_column: dict[str, int | None] = {}
        for column, s in zip(task.columns, stats, strict=True):
            budget = _column_budget(column.strategy, task.sample_budget)
            try:
                strategy = column.strategy.for_sample(
                    max(len(headers), 1), max_tiles=budget.max_tiles, max_tokens=budget.max_tokens
                )
                plans = [
                    strategy.for_image(sample.key, i).plan(*planned_size(h, strategy))
                    for i, h in enumerate(headers)
                ]
            except ValueError as e:
                s.fail(f"refused: {_reason_class(str(e))}")
                per_column[column.label] = None
                continue
            for plan in plans:
                s.add(plan.num_tokens, plan.num_tiles, int(np.prod(plan.shape)), _rows(strategy, plan))
            per_column[column.label] = sum(p.num_tokens for p in plans)
        if task.emit:
            lengths.append(
                {
                    "source": sample.source,
                    "key": sample.key,
                    "images": [
                        {"width": h.width, "height": h.height, "orientation": h.orientation} for h in headers
                    ],
                    "num_tokens": per_column,
                }
            )
        progress(1, sum(v for v in per_column.values() if v is not None))
    return StatsReport(task.index, stats, tuple(lengths))


def _rows(strategy: Strategy, plan: Plan) -> int:
    """The image's patch-sequence length for packing, 0 when the strategy's output is not a sequence."""
    return plan.shape[0] if strategy.sequence_unit() else 0


def _reason_class(message: str) -> str:
    """Group refusals by kind (drop the per-image numbers) so the report stays short."""
    return message.split(",")[0].split(" got ")[0].strip()


@dataclass
class StatsResult:
    """A whole `stats` run: one `ColumnStats` per column, plus per-image lengths if asked for."""

    columns: tuple[Column, ...]
    stats: list[ColumnStats]
    lengths: list[dict[str, Any]]
    budget: int | None
    inputs: tuple[str, ...]
    from_output: bool = False
    pack_len: int | None = None
    """`--pack-len`: also estimate packing into sequences of this many tokens."""
    packs: tuple[PackReport | None, ...] = ()
    """Exact packing reports per column (`stats OUT_DIR`, which knows pack's buffers); else estimated."""

    def summaries(self) -> list[dict[str, Any]]:
        packs = self.packs or (None,) * len(self.stats)
        return [s.summary(self.budget, self.pack_len, p) for s, p in zip(self.stats, packs, strict=True)]

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": STATS_SCHEMA_VERSION,
            "inputs": list(self.inputs),
            "from_output_metadata": self.from_output,
            "budget": self.budget,
            "pack_len": self.pack_len,
            "strategies": [
                {"label": c.label, "strategy": c.strategy.name, "params": c.strategy.params(), **summary}
                for c, summary in zip(self.columns, self.summaries(), strict=True)
            ],
        }


def compute_stats(
    inputs: Sequence[str],
    columns: Sequence[Column],
    *,
    budget: int | None = None,
    workers: int = 1,
    emit_lengths: bool = False,
    on_progress: Progress | None = None,
    sources: SourceOptions | None = None,
    sample_budget: Budget | None = None,
    pack_len: int | None = None,
) -> StatsResult:
    """Token statistics for every image under `inputs`, for each column, from headers only; with
    `pack_len`, also the padding `vlmtile pack --max-seq-len pack_len` would leave (estimated)."""
    sources = sources or SourceOptions()
    sample_budget = sample_budget or Budget()
    if not columns:
        raise VlmtileError("give at least one strategy")
    labels = [c.label for c in columns]
    if len(set(labels)) != len(labels):
        raise VlmtileError(f"column labels repeat: {', '.join(labels)}")
    orientation = any(c.strategy.exif_transpose for c in columns)
    for name, value in (("max_tiles", sample_budget.max_tiles), ("max_tokens", sample_budget.max_tokens)):
        if value is not None and not any(name in type(c.strategy).budget_rules for c in columns):
            raise VlmtileError(
                f"a per-sample {name.replace('_', ' ')} budget applies to none of the chosen strategies"
            )
    listing = list_samples(inputs, sources)
    if not listing.samples and not listing.streams and not listing.failures:
        raise VlmtileError(f"no images found in {', '.join(inputs)}")
    tasks: list[StatsTask]
    if listing.layout == "image":
        items = [InputItem(source=s.images[0].path or s.source, key=s.key) for s in listing.samples]
        # About four chunks per worker for balance, never so small that starting a worker dominates; a
        # folder that fits in one chunk is read inline (no worker start at all).
        chunk = max(MIN_CHUNK, math.ceil(len(items) / (4 * workers)))
        tasks = [
            StatsTask(
                i, tuple(items[start : start + chunk]), tuple(columns), budget, emit_lengths, orientation
            )
            for i, start in enumerate(range(0, len(items), chunk))
        ]
    else:

        def task(
            index: int, samples: tuple[Sample, ...] = (), stream: StreamInput | None = None
        ) -> StatsTask:
            return StatsTask(
                index,
                (),
                tuple(columns),
                budget,
                emit_lengths,
                orientation,
                samples=samples,
                stream=stream,
                sources=sources,
                sample_budget=sample_budget,
            )

        chunk = max(MIN_CHUNK, math.ceil(len(listing.samples) / (4 * workers)))
        tasks = [
            task(i, samples=tuple(listing.samples[start : start + chunk]))
            for i, start in enumerate(range(0, len(listing.samples), chunk))
        ]
        tasks += [task(len(tasks) + i, stream=stream) for i, stream in enumerate(listing.streams)]
    reports: list[StatsReport] = []
    for outcome in run_tasks(count_chunk, tasks, workers, on_progress):
        if outcome.result is None:
            raise VlmtileError(f"stats worker failed: {outcome.error}")
        reports.append(outcome.result)
    reports.sort(key=lambda r: r.index)
    stats = [sum((r.stats[i] for r in reports), start=ColumnStats()) for i in range(len(columns))]
    for failure in listing.failures:  # manifest lines that are not samples
        for column_stats in stats:
            column_stats.fail(f"{failure.stage}: {_reason_class(failure.reason)}")
    lengths = [line for r in reports for line in r.lengths]
    return StatsResult(tuple(columns), stats, lengths, budget, tuple(inputs), pack_len=pack_len)


def is_output_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST))


def _shard_metadata(path: str, manifest: dict[str, Any], shard: dict[str, Any]) -> Iterable[dict[str, Any]]:
    """Metadata of every image of one shard of a finished output directory, in stored order, never
    reading pixel arrays. Sample-layout records hold a list of images: each is yielded with the sample's
    key (its own `source` names the image within the sample)."""
    shard_path = os.path.join(path, shard["name"])
    sample_layout = manifest.get("layout") == "sample"
    if manifest["format"] == "parquet":
        parquet = pq.ParquetFile(shard_path)
        names = [n for n in parquet.schema_arrow.names if n not in ("pixel_values", "sample")]
        records: Iterable[dict[str, Any]] = parquet.read(columns=names).to_pylist()
    else:
        # Image layout: KEY.json is vlmtile's. Sample layout: KEY.vlmtile.json is, and KEY.json is the
        # sample's own content (a manifest line), which must not be mistaken for it.
        suffix = ".vlmtile.json" if sample_layout else ".json"
        records = _tar_json(shard_path, suffix)
    for record in records:
        if sample_layout:
            for image in record["images"]:
                yield {"key": record["key"], **image}
        else:
            yield record


def _tar_json(shard_path: str, suffix: str) -> Iterator[dict[str, Any]]:
    with tarfile.open(shard_path) as tar:
        for member in tar:
            if member.name.endswith(suffix):
                data = tar.extractfile(member)
                if data is not None:
                    yield json.loads(data.read())


def stats_from_output(
    path: str, budget: int | None = None, emit_lengths: bool = False, pack_len: int | None = None
) -> StatsResult:
    """The same report from a finished `preprocess` output's stored metadata. With `pack_len`, packing is
    simulated exactly as `vlmtile pack` (default buffers) would do it: the same shard groups, the same
    order, so the padding it reports is the one `pack` will report."""
    from .dataset import strategy_from_manifest  # dataset imports runner; keep stats importable alone

    with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("layout") == "packed":
        raise VlmtileError(
            f'{path} holds packed sequences; its packing report is the manifest\'s "report" (run stats on '
            "the directory it was packed from)"
        )
    strategy = strategy_from_manifest(manifest)
    column = Column(describe(strategy), strategy)
    stats = ColumnStats()
    lengths: list[dict[str, Any]] = []
    shard_rows: list[list[int]] = []
    for shard in manifest["shards"]:
        shard_rows.append([])
        for row in _shard_metadata(path, manifest, shard):
            rows = int(row["shape"][0]) if strategy.sequence_unit() else 0
            shard_rows[-1].append(rows)
            _add_stored(stats, row, rows, column, lengths if emit_lengths else None)
    errors_path = os.path.join(path, manifest.get("errors_file", "_errors.jsonl"))
    if os.path.exists(errors_path):
        with open(errors_path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    error = json.loads(line)
                    stats.fail(f"{error['stage']}: {_reason_class(error['reason'])}")
                    if emit_lengths:
                        lengths.append(
                            {"source": error["source"], "key": error["key"], "error": error["reason"]}
                        )
    lengths.sort(key=lambda line: line["source"])
    pack = None
    if pack_len is not None and stats.packable():
        pack = PackReport(pack_len)
        for group in group_shards(manifest["shards"], DEFAULT_BUFFER, DEFAULT_BUFFER_BYTES):
            group_rows = [r for i in group for r in shard_rows[i]]
            pack = pack + simulate(group_rows, pack_len, buffer=max(len(group_rows), 1))
    return StatsResult(
        (column,), [stats], lengths, budget, (path,), from_output=True, pack_len=pack_len, packs=(pack,)
    )


def _add_stored(
    stats: ColumnStats, row: dict[str, Any], rows: int, column: Column, lengths: list[dict[str, Any]] | None
) -> None:
    """One stored record into the tallies (and its --emit-lengths line)."""
    stats.add(row["num_tokens"], row["num_tiles"], int(np.prod(row["shape"])), rows)
    if lengths is not None:
        # The stored size is the planned one (after EXIF transposition, if the strategy applied it); the
        # file's own orientation is not stored, hence null.
        lengths.append(
            {
                "source": row["source"],
                "key": row["key"],
                "width": row["orig_width"],
                "height": row["orig_height"],
                "orientation": None,
                "num_tokens": {column.label: row["num_tokens"]},
            }
        )


def format_table(result: StatsResult) -> str:
    """A readable side-by-side table for a terminal."""
    summaries = result.summaries()
    rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("images", lambda s: f"{s['images']:,}"),
        ("failures", lambda s: f"{s['failures']:,}"),
        ("total tokens", lambda s: f"{s['total_tokens']:,}"),
        ("mean tokens", lambda s: "-" if s["mean_tokens"] is None else f"{s['mean_tokens']:,.1f}"),
        ("p50 tokens", lambda s: _int(s["p50_tokens"])),
        ("p90 tokens", lambda s: _int(s["p90_tokens"])),
        ("p99 tokens", lambda s: _int(s["p99_tokens"])),
        ("max tokens", lambda s: _int(s["max_tokens"])),
        ("tiles/image", lambda s: _histogram(s["tiles_histogram"])),
    ]
    for dtype in ("float16", "uint8", "float32"):
        rows.append((f"{dtype} bytes", _bytes_of(dtype)))
    if result.budget is not None:
        rows.append((f"> {result.budget:,} tokens", lambda s: f"{s['over_budget']:,}"))
    if result.pack_len is not None:
        rows.append((f"packed to {result.pack_len:,}", _packing))
    header = ["", *[c.label for c in result.columns]]
    body = [[name, *[fmt(s) for s in summaries]] for name, fmt in rows]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in [header, *body]
    ]
    reasons = [
        f"  {c.label}: {n:,} x {reason}"
        for c, s in zip(result.columns, summaries, strict=True)
        for reason, n in s["failure_reasons"].items()
    ]
    if reasons:
        lines += ["", "failures:", *reasons]
    return "\n".join(lines)


def _packing(summary: dict[str, Any]) -> str:
    """`1.3% padding, 15.9 img/seq`, plus the images too long to pack; `-` when not packable."""
    pack = summary["pack"]
    if pack is None or pack["padding_fraction"] is None:
        return "-"
    text = f"{pack['padding_fraction']:.1%} padding, {pack['images_per_sequence']['mean']:.1f} img/seq"
    return text + (f", {pack['too_long']:,} too long" if pack["too_long"] else "")


def _bytes_of(dtype: str) -> Callable[[dict[str, Any]], str]:
    return lambda s: _bytes(s["bytes"][dtype])


def _int(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)


def _histogram(histogram: dict[str, int]) -> str:
    """Compact tiles distribution: "1:5 3:2 13:40" (tiles:images)."""
    return " ".join(f"{k}:{v}" for k, v in histogram.items()) or "-"


def write_lengths(path: str, lengths: Iterable[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for line in lengths:
            f.write(json.dumps(line, ensure_ascii=False, sort_keys=True) + "\n")


def plot_histograms(path: str, result: StatsResult) -> None:
    """Token histograms per column into a PNG (needs the optional `plot` extra: matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise VlmtileError('--plot needs matplotlib: pip install "vlmtile[plot]"') from None
    n = len(result.columns)
    fig, axes = plt.subplots(n, 1, figsize=(8, 2.6 * n), squeeze=False)
    for ax, column, stats in zip(axes[:, 0], result.columns, result.stats, strict=True):
        tokens = np.frombuffer(stats.tokens, dtype=np.int64) if stats.images else np.zeros(0, np.int64)
        ax.hist(tokens, bins=min(60, max(1, len(set(tokens.tolist())))), color="#3b6ea8")
        if result.budget is not None:
            ax.axvline(result.budget, color="#c0392b", linestyle="--", label=f"budget {result.budget:,}")
            ax.legend()
        ax.set_title(f"{column.label}: {stats.images:,} images, {int(tokens.sum()):,} tokens")
        ax.set_xlabel("visual tokens per image")
        ax.set_ylabel("images")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
