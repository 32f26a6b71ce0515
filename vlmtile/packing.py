"""Patch n' Pack: variable-length patch sequences into fixed-length ones, and the way back.

Pure functions on lengths and arrays, no files, so that `vlmtile pack` (which feeds them buffers of images
read from a `preprocess` output), `stats --pack-len` (which feeds them token counts from image headers)
and a training loop (which unpacks) all run the same code.

- `assign`: first-fit (or best-fit) decreasing of lengths into bins of a capacity, at most
  `max_segments` items per bin. Items are placed longest first; bins come back in the order they were
  opened, items inside a bin in input order, so the result depends on the lengths and their order only.
- `build_sequence`: the segments of one bin concatenated into a `PackedSequence` of exactly `length`
  rows, padded with zeros: `segment_ids` (0 = padding, i = the i-th segment), `positions`, `cu_seqlens`.
- `unpack`, `attention_mask`, `fractional_positions`: what a reader needs, with numpy alone.
- `PackReport`: padding fraction, images per sequence and counts, mergeable across tasks.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DEFAULT_BUFFER = 4096
"""Images packed together at most (`pack --buffer`): with 16 images per sequence ~256 sequences, of which
only the last is usually part-empty."""
DEFAULT_BUFFER_BYTES = 1 << 30
"""Stored bytes packed together at most (`pack --buffer-bytes`: what one worker holds in memory)."""

FITS = ("first", "best")
"""`first`: the earliest opened sequence with room (first-fit decreasing); `best`: the one left fullest
(best-fit decreasing)."""


def assign(
    lengths: Sequence[int], capacity: int, *, max_segments: int = 0, fit: str = "first"
) -> list[list[int]]:
    """Bins of indices into `lengths`: each bin's lengths sum to at most `capacity` and, with
    `max_segments` > 0, it holds at most that many items.

    Decreasing order (ties in input order) is what makes greedy packing tight: the long items go first
    and the short ones fill the gaps they leave. Every length must be in [1, capacity] (the caller splits
    or refuses longer ones).
    """
    if fit not in FITS:
        raise ValueError(f"fit must be one of {', '.join(FITS)}; got {fit!r}")
    count = len(lengths)
    room = np.full(max(count, 1), -1, dtype=np.int64)  # free rows per opened bin; -1: closed to new items
    filled = np.zeros(max(count, 1), dtype=np.int64)
    bins: list[list[int]] = []
    for index in sorted(range(count), key=lambda i: (-lengths[i], i)):
        length = int(lengths[index])
        if not 1 <= length <= capacity:
            raise ValueError(f"item {index} has length {length}, outside [1, {capacity}]")
        opened = len(bins)
        target = opened
        if opened:
            fits = room[:opened] >= length
            if fit == "first":
                candidate = int(np.argmax(fits))
            else:
                candidate = int(np.argmin(np.where(fits, room[:opened], capacity + 1)))
            if fits[candidate]:
                target = candidate
        if target == opened:
            bins.append([])
            room[target] = capacity
        bins[target].append(index)
        room[target] -= length
        filled[target] += 1
        if max_segments and filled[target] >= max_segments:
            room[target] = -1
    return [sorted(b) for b in bins]


def split_lengths(length: int, capacity: int, unit: int = 1) -> list[int]:
    """An item cut into parts of at most `capacity` rows, each a multiple of `unit`: full parts first,
    then the rest (`--split-long`); an item that fits is one part, itself."""
    part = capacity - capacity % unit
    if part < 1:
        raise ValueError(f"capacity {capacity} holds no unit of {unit} rows")
    full, rest = divmod(length, part)
    return [part] * full + ([rest] if rest else [])


@dataclass(frozen=True)
class Segment:
    """One image (or, split, one part of one) as it goes into a packed sequence."""

    key: str
    source: str
    image: int
    """The image's index in its record (0 in the image layout; the i-th image of a sample otherwise)."""
    offset: int
    """The first stored row of this segment in the image's own `pixel_values` (0 unless split)."""
    pixels: np.ndarray
    """(rows, patch_dim) in the stored dtype, in stored order."""
    positions: np.ndarray
    """(rows, 2) int32 (row, col) of each row in the image's patch grid."""
    grid_hw: tuple[int, int]
    image_grid_thw: tuple[int, int, int] | None = None
    """Qwen family: the processor's (t, h, w), so that the model's 3-D rotary positions can be rebuilt."""

    @property
    def length(self) -> int:
        return int(self.pixels.shape[0])


@dataclass(frozen=True)
class PackedSequence:
    """A packed sequence of exactly `length` rows, as written to one record."""

    key: str
    pixel_values: np.ndarray
    """(length, patch_dim), stored dtype; rows past `cu_seqlens[-1]` are zeros (padding)."""
    segment_ids: np.ndarray
    """(length,) int32: 0 for padding, i for the rows of the i-th segment (1-based)."""
    positions: np.ndarray
    """(length, 2) int32 (row, col) of each row in its image's grid; (0, 0) for padding."""
    cu_seqlens: np.ndarray
    """(segments + 1,) int32 segment boundaries, [0, l1, l1 + l2, ...]; the last is the real token count."""
    segments: tuple[Segment, ...]

    @property
    def num_tokens(self) -> int:
        return int(self.cu_seqlens[-1])

    @property
    def num_padding(self) -> int:
        return int(self.pixel_values.shape[0]) - self.num_tokens

    def metadata(self, dtype: str) -> dict[str, Any]:
        """Everything but the arrays, JSON-able: the tar `KEY.json` and the Parquet scalar / list columns."""
        meta: dict[str, Any] = {
            "key": self.key,
            "shape": list(self.pixel_values.shape),
            "dtype": dtype,
            "num_segments": len(self.segments),
            "num_tokens": self.num_tokens,
            "num_padding": self.num_padding,
            "keys": [s.key for s in self.segments],
            "sources": [s.source for s in self.segments],
            "images": [s.image for s in self.segments],
            "offsets": [s.offset for s in self.segments],
            "grid_hw": [list(s.grid_hw) for s in self.segments],
        }
        if any(s.image_grid_thw is not None for s in self.segments):
            meta["image_grid_thw"] = [list(s.image_grid_thw or ()) for s in self.segments]
        return meta


def build_sequence(key: str, segments: Sequence[Segment], length: int) -> PackedSequence:
    """Concatenate `segments` in order and pad with zeros to exactly `length` rows."""
    if not segments:
        raise ValueError("a packed sequence needs at least one segment")
    used = sum(s.length for s in segments)
    if used > length:
        raise ValueError(f"segments hold {used} rows, more than the sequence length {length}")
    first = segments[0].pixels
    pixels = np.zeros((length, first.shape[1]), dtype=first.dtype)
    segment_ids = np.zeros(length, dtype=np.int32)
    positions = np.zeros((length, 2), dtype=np.int32)
    cu_seqlens = np.zeros(len(segments) + 1, dtype=np.int32)
    start = 0
    for number, segment in enumerate(segments, start=1):
        end = start + segment.length
        pixels[start:end] = segment.pixels
        segment_ids[start:end] = number
        positions[start:end] = segment.positions
        cu_seqlens[number] = end
        start = end
    return PackedSequence(key, pixels, segment_ids, positions, cu_seqlens, tuple(segments))


# -- reading packed records back (numpy only) ------------------------------------------------------------


def unpack(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The segments of one packed record (as `open_dataset` yields it), in order: per segment its `key`,
    `image`, `offset`, `grid_hw` (and `image_grid_thw` for Qwen inputs), and its `pixel_values` and
    `positions` rows. Concatenating the parts of a split image by `offset` gives the image back."""
    cu = np.asarray(record["cu_seqlens"])
    out = []
    for i in range(len(cu) - 1):
        rows = slice(int(cu[i]), int(cu[i + 1]))
        part: dict[str, Any] = {
            "key": record["keys"][i],
            "source": record["sources"][i],
            "image": record["images"][i],
            "offset": record["offsets"][i],
            "grid_hw": tuple(record["grid_hw"][i]),
            "pixel_values": record["pixel_values"][rows],
            "positions": record["positions"][rows],
        }
        if "image_grid_thw" in record:
            part["image_grid_thw"] = tuple(record["image_grid_thw"][i])
        out.append(part)
    return out


def attention_mask(segment_ids: np.ndarray) -> np.ndarray:
    """(N, N) bool block-diagonal mask: row i may attend to column j when both are in the same segment
    (padding attends to nothing and nothing attends to it). Quadratic in N: for long sequences prefer
    `cu_seqlens` with a variable-length attention kernel."""
    ids = np.asarray(segment_ids)
    mask: np.ndarray = (ids[:, None] == ids[None, :]) & (ids[:, None] > 0)
    return mask


def fractional_positions(record: Mapping[str, Any]) -> np.ndarray:
    """(N, 2) float32 (row / rows, col / cols) per token, NaViT's fractional coordinates in [0, 1)
    (size-independent; padding 0)."""
    positions = np.asarray(record["positions"], dtype=np.float32)
    grids = np.asarray(record["grid_hw"], dtype=np.float32).reshape(-1, 2)
    ids = np.asarray(record["segment_ids"])
    out = np.zeros_like(positions)
    real = ids > 0
    out[real] = positions[real] / grids[ids[real] - 1]
    return out


# -- reporting ---------------------------------------------------------------------------------------------


@dataclass
class PackReport:
    """What packing produced, mergeable (`+`) across buffers and tasks."""

    max_seq_len: int
    sequences: int = 0
    images: int = 0
    """Images packed (an image split over several sequences counts once)."""
    segments: int = 0
    tokens: int = 0
    too_long: int = 0
    """Images longer than `max_seq_len` that were refused (error records)."""
    split: int = 0
    """Images longer than `max_seq_len` that were cut into parts (`--split-long`)."""
    per_sequence: Counter[int] = field(default_factory=Counter)
    """Segments per sequence -> number of sequences."""

    def add_sequence(self, segments: int, tokens: int) -> None:
        self.sequences += 1
        self.segments += segments
        self.tokens += tokens
        self.per_sequence[segments] += 1

    def __add__(self, other: PackReport) -> PackReport:
        return PackReport(
            self.max_seq_len,
            self.sequences + other.sequences,
            self.images + other.images,
            self.segments + other.segments,
            self.tokens + other.tokens,
            self.too_long + other.too_long,
            self.split + other.split,
            self.per_sequence + other.per_sequence,
        )

    @property
    def padding(self) -> int:
        return self.sequences * self.max_seq_len - self.tokens

    def summary(self) -> dict[str, Any]:
        """The documented `pack` report (docs/packing.md), as in the manifest and `stats --json`."""
        slots = self.sequences * self.max_seq_len
        counts = sorted(self.per_sequence.elements())
        return {
            "max_seq_len": self.max_seq_len,
            "sequences": self.sequences,
            "images": self.images,
            "segments": self.segments,
            "tokens": self.tokens,
            "padding_tokens": self.padding,
            "padding_fraction": self.padding / slots if slots else None,
            "images_per_sequence": {
                "mean": self.segments / self.sequences if self.sequences else None,
                "min": counts[0] if counts else None,
                "max": counts[-1] if counts else None,
                "histogram": {str(k): v for k, v in sorted(self.per_sequence.items())},
            },
            "too_long": self.too_long,
            "split": self.split,
        }

    @classmethod
    def from_summary(cls, data: Mapping[str, Any]) -> PackReport:
        histogram = Counter({int(k): int(v) for k, v in data["images_per_sequence"]["histogram"].items()})
        return cls(
            int(data["max_seq_len"]),
            int(data["sequences"]),
            int(data["images"]),
            int(data["segments"]),
            int(data["tokens"]),
            int(data["too_long"]),
            int(data["split"]),
            histogram,
        )


def simulate(
    lengths: Iterable[int],
    max_seq_len: int,
    *,
    buffer: int,
    max_segments: int = 0,
    fit: str = "first",
    split_unit: int = 0,
) -> PackReport:
    """What `pack` would report for these per-image lengths, in this order, cut into buffers of `buffer`
    images (`stats --pack-len`). `split_unit` > 0 splits over-long images into parts of that unit;
    0 counts them as refused."""
    report = PackReport(max_seq_len)
    chunk: list[int] = []

    def flush() -> None:
        for placed in assign(chunk, max_seq_len, max_segments=max_segments, fit=fit):
            report.add_sequence(len(placed), sum(chunk[i] for i in placed))
        chunk.clear()

    for length in lengths:
        if length > max_seq_len:
            if not split_unit:
                report.too_long += 1
                continue
            report.split += 1
            chunk.extend(split_lengths(length, max_seq_len, split_unit))
        else:
            chunk.append(length)
        report.images += 1
        if len(chunk) >= buffer:
            flush()
    if chunk:
        flush()
    return report


def group_shards(shards: Sequence[Mapping[str, Any]], max_images: int, max_bytes: int) -> list[list[int]]:
    """Consecutive shards (manifest entries with `records` and `bytes`) grouped into buffers of at most
    `max_images` images and `max_bytes` bytes; a shard above either limit is a group of its own. What
    `pack` holds in memory at once is one group."""
    groups: list[list[int]] = []
    images = size = 0
    for index, shard in enumerate(shards):
        records, nbytes = int(shard["records"]), int(shard["bytes"])
        if groups and images + records <= max_images and size + nbytes <= max_bytes:
            groups[-1].append(index)
            images += records
            size += nbytes
        else:
            groups.append([index])
            images, size = records, nbytes
    return groups
