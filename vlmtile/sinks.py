"""Shard writers: Parquet and WebDataset tar, one file per shard, written atomically.

A shard is written under a hidden temporary name, flushed to disk, checksummed and only then renamed to
its final name, so a crash or a full disk never leaves a file that looks like a finished shard. Records
stream through: a writer holds at most one row group of pixels in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import mmap
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .packing import PackedSequence
from .samples import members_as_json
from .strategies import Strategy
from .work import SampleRecord

R = TypeVar("R")

TAR_MTIME = 0
"""Fixed member mtime, so the same records give a byte-identical tar."""

ROW_GROUP_BYTES = 32 * 1024 * 1024
"""Pixel bytes per Parquet row group: big rows need byte-sized groups, not pyarrow's 1M-row default. Small
enough that a shard reaches the disk while its worker computes the next images (see `ArrowHashingFile`),
and that a reader holds little to get at one row; 2-3 12-MP InternVL images, ~30 at 1 MP in uint8."""
WRITEBACK_BYTES = 8 * 1024 * 1024
"""How often (in bytes written) a shard file asks the kernel to start writing it to disk."""

_META_TYPES = {
    "int": pa.int64(),
    "bool": pa.bool_(),
    "str": pa.string(),
    "list<int>": pa.list_(pa.int64()),
}
LAYOUTS = ("image", "sample")
"""image: one record per image (plain image inputs); sample: one record per sample, images as lists."""


@dataclass(frozen=True)
class ShardFile:
    """A finished shard file: what the manifest records about it."""

    name: str
    bytes: int
    sha256: str


def image_fields(strategy: Strategy) -> list[pa.Field]:
    """Per-image metadata columns: the same in a flat row and inside a sample's `images` list."""
    fields = [
        pa.field("orig_width", pa.int64(), nullable=False),
        pa.field("orig_height", pa.int64(), nullable=False),
        pa.field("resized_width", pa.int64(), nullable=False),
        pa.field("resized_height", pa.int64(), nullable=False),
        pa.field("grid", pa.list_(pa.int64()), nullable=False),
        pa.field("thumbnail", pa.bool_(), nullable=False),
        pa.field("num_tiles", pa.int64(), nullable=False),
        pa.field("num_tokens", pa.int64(), nullable=False),
        # Grounding: where the image lies on the resized canvas and how the canvas is cut.
        pa.field("content_box", pa.list_(pa.int64())),
        pa.field("transposed", pa.bool_()),
        pa.field("tile_boxes", pa.list_(pa.list_(pa.int64()))),
    ]
    fields += [pa.field(name, _META_TYPES[kind]) for name, kind in strategy.metadata_fields.items()]
    return fields


def parquet_schema(strategy: Strategy, layout: str = "image", pixels: bool = True) -> pa.Schema:
    """The explicit schema of a Parquet shard (no type inference drift)."""
    if layout == "image":
        fields = [
            pa.field("key", pa.string(), nullable=False),
            pa.field("source", pa.string(), nullable=False),
            pa.field("pixel_values", pa.large_binary(), nullable=False),
            pa.field("shape", pa.list_(pa.int64()), nullable=False),
            pa.field("dtype", pa.string(), nullable=False),
            *image_fields(strategy),
        ]
    else:
        per_image = [
            pa.field("name", pa.string(), nullable=False),
            pa.field("source", pa.string(), nullable=False),
            pa.field("shape", pa.list_(pa.int64()), nullable=False),
            *image_fields(strategy),
        ]
        fields = [
            pa.field("key", pa.string(), nullable=False),
            pa.field("source", pa.string(), nullable=False),
            pa.field("orig_key", pa.string()),
            pa.field("num_images", pa.int64(), nullable=False),
            pa.field("num_tiles", pa.int64(), nullable=False),
            pa.field("num_tokens", pa.int64(), nullable=False),
            pa.field("dtype", pa.string(), nullable=False),
            pa.field("pixel_values", pa.list_(pa.large_binary()), nullable=False),
            pa.field("images", pa.list_(pa.struct(per_image)), nullable=False),
            pa.field("sample", pa.string()),
        ]
    if not pixels:
        fields = [f for f in fields if f.name != "pixel_values"]
    return pa.schema(fields)


def sample_json(record: SampleRecord) -> str | None:
    """A sample's non-image content as JSON text (manifest / Parquet fields, or tar members)."""
    sample = record.sample
    if sample.fields:
        return json.dumps(sample.fields, sort_keys=True, ensure_ascii=False)
    if sample.members:
        return json.dumps(members_as_json(sample.members), sort_keys=True, ensure_ascii=False)
    return None


def sample_metadata(record: SampleRecord, dtype: str) -> dict[str, Any]:
    """The sample-level metadata (`KEY.vlmtile.json` in tar shards, the scalar columns in Parquet)."""
    sample = record.sample
    return {
        "key": sample.key,
        "source": sample.source,
        "orig_key": sample.orig_key,
        "num_images": len(record.images),
        "num_tiles": record.num_tiles,
        "num_tokens": record.num_tokens,
        "dtype": dtype,
        "images": [{k: v for k, v in r.metadata.items() if k not in ("key", "dtype")} for r in record.images],
        # How the reader rebuilds `sample` from a tar: one JSON member, or the original members.
        "sample_kind": "fields" if sample.fields else ("members" if sample.members else None),
    }


class HashingFile(io.RawIOBase):
    """A write-only file that hashes what goes through it: the tar shard's file (Parquet's is
    `ArrowHashingFile`). The checksum costs no second read.

    The tar is written strictly sequentially, so the digest of the writes is the digest of the file. A
    big write (a whole array) goes through `WRITEBACK_BYTES` at a time: each piece is hashed while it
    is still in cache, then written.

    Every `WRITEBACK_BYTES` it also asks the kernel to start writing the file out
    (`posix_fadvise(DONTNEED)` starts writeback of dirty pages without waiting, and drops pages already
    written). Measured: the commit's fsync then finds almost nothing left to write (0.5 s -> 0.02 s for
    240 MB written between computations), the writes are not throttled as dirty memory piles up, and a
    long run does not push the input images out of the page cache with its own output.
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        self._file = open(path, "wb")  # noqa: SIM115 - closed by close()
        self.digest = hashlib.sha256()
        self.position = 0
        self._unadvised = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:  # tarfile asks where it is; it never seeks
        return self.position

    def write(self, data: Any) -> int:
        with memoryview(data) as whole, whole.cast("B") as view:
            for start in range(0, view.nbytes, WRITEBACK_BYTES):  # a whole array at most 8 MiB at a time
                with view[start : start + WRITEBACK_BYTES] as chunk:
                    self._write(chunk)
            return view.nbytes

    def _write(self, chunk: memoryview) -> None:
        self.digest.update(chunk)
        self._file.write(chunk)
        self.position += chunk.nbytes
        self._unadvised += chunk.nbytes
        if self._unadvised >= WRITEBACK_BYTES and hasattr(os, "posix_fadvise"):
            self._file.flush()
            os.posix_fadvise(self._file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            self._unadvised = 0

    def flush(self) -> None:
        self._file.flush()

    def fileno(self) -> int:
        return self._file.fileno()

    def close(self) -> None:
        if not self.closed:
            super().close()  # flushes first
            self._file.close()


class ArrowHashingFile:
    """A native Arrow output file, hashed behind its writer: the Parquet shard's file.

    Given a Python file object, pyarrow copies every page it writes into a new `bytes` object before
    calling `write` (fresh memory for each multi-MB page). A native file writes the pages straight from
    Arrow's buffers; the checksum then reads each row group back from the page cache right after it was
    written (`catch_up`, through `mmap`: no copy), and starts its writeback like `HashingFile`. Measured
    on 208 MB of rows: 466 ms through `HashingFile`, 340 ms this way; whole runs, 5 paired repeats:
    qwen2-vl (67 MB per image) 1.08x, xcomposer2.5 (26 MB) 1.04x, internvl (12.5 MB) unchanged.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.stream = pa.OSFile(path, "wb")
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except BaseException:
            self.stream.close()
            raise
        self.digest = hashlib.sha256()
        self.hashed = 0
        self.closed = False
        self._mappable = True

    def catch_up(self) -> None:
        """Hash what the writer has written since the last call; the writer writes sequentially.

        A window of `WRITEBACK_BYTES` is mapped at a time: mapped file pages count in the worker's
        memory, and a 144 MB row must not count twice. Where the file cannot be mapped (some FUSE
        mounts of object stores refuse `mmap`), it is read back with `pread` instead."""
        end = self.stream.tell()
        while self.hashed < end:
            base = self.hashed - self.hashed % mmap.ALLOCATIONGRANULARITY  # mmap offsets: page-aligned
            stop = min(end, base + WRITEBACK_BYTES)
            if self._mappable:
                try:
                    mapped = mmap.mmap(self._fd, stop - base, access=mmap.ACCESS_READ, offset=base)
                except (OSError, ValueError):
                    self._mappable = False
            if self._mappable:
                with mapped, memoryview(mapped) as view, view[self.hashed - base :] as fresh:
                    self.digest.update(fresh)
            else:
                self._hash_read(stop)
            self.hashed = stop
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def _hash_read(self, stop: int) -> None:
        position = self.hashed
        while position < stop:
            data = os.pread(self._fd, stop - position, position)
            if not data:
                raise OSError(f"{self.path} ended at byte {position} while being hashed")
            self.digest.update(data)
            position += len(data)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                if not self.stream.closed:
                    self.catch_up()
                    self.stream.close()
            finally:
                os.close(self._fd)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ShardSink(Generic[R]):
    """Base: temporary file, commit (fsync, checksum, rename) or abort (remove); `R` is the record type
    (`SampleRecord` for `preprocess`, `PackedSequence` for `pack`)."""

    suffix: ClassVar[str] = ""

    def __init__(
        self,
        path: str,
        strategy: Strategy,
        dtype: str,
        file_metadata: dict[str, Any],
        *,
        layout: str = "image",
        pixels: bool = True,
    ) -> None:
        self.path = path
        self.strategy = strategy
        self.dtype = dtype
        self.file_metadata = file_metadata
        self.layout = layout
        self.pixels = pixels
        directory, name = os.path.split(path)
        self.tmp_path = os.path.join(directory, f".{name}.tmp-{os.getpid()}")
        self.file = self._open_file(self.tmp_path)
        self.records = 0
        self.bytes = 0
        """Bytes written so far (pixels plus metadata, approximately the file size): rotation reads it."""

    def _open_file(self, path: str) -> HashingFile | ArrowHashingFile:
        return HashingFile(path)

    def write(self, record: R) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        """Write the format's trailer (footer, end-of-archive blocks) and close the temporary file."""
        raise NotImplementedError

    def _discard(self) -> None:
        """Close the temporary file without caring whether it is valid."""
        raise NotImplementedError

    def commit(self) -> ShardFile:
        self._finish()
        self.file.close()
        _fsync(self.tmp_path)
        size = os.path.getsize(self.tmp_path)
        checksum = self.file.digest.hexdigest()
        os.replace(self.tmp_path, self.path)
        _fsync(os.path.dirname(self.path) or ".")
        return ShardFile(os.path.basename(self.path), size, checksum)

    def abort(self) -> None:
        # The shard is being thrown away; the error that brought us here is the one that matters.
        with contextlib.suppress(Exception):
            self._discard()
        with contextlib.suppress(Exception):
            self.file.close()
        if os.path.exists(self.tmp_path):
            os.unlink(self.tmp_path)

    def __enter__(self) -> ShardSink[R]:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.abort()


class ParquetShard(ShardSink[R]):
    """A Parquet file of rows cut into row groups of `ROW_GROUP_BYTES`; subclasses give the schema (to
    `_open`) and turn a record into a row (`_row`, `_row_bytes`)."""

    suffix = ".parquet"
    file: ArrowHashingFile

    def _open_file(self, path: str) -> ArrowHashingFile:
        return ArrowHashingFile(path)

    def _open(self, schema: pa.Schema, arrays: tuple[str, ...] = ()) -> None:
        """Start the file; `arrays` are list columns of thousands of values per row (packed sequences'
        ids and positions): compressed like metadata, but no dictionary or statistics would pay for them."""
        self.schema = schema.with_metadata({"vlmtile": json.dumps(self.file_metadata, sort_keys=True)})
        small = [n for n in schema.names if n != "pixel_values" and n not in arrays]
        self._writer = pq.ParquetWriter(
            self.file.stream,
            self.schema,
            # Normalized floats barely compress and uint8 little; spend no CPU on the pixel column.
            compression={n: ("NONE" if n == "pixel_values" else "ZSTD") for n in schema.names},
            use_dictionary=small,
            write_statistics=small,
        )
        self._rows: list[dict[str, Any]] = []
        self._buffered = 0

    def _row(self, record: R) -> dict[str, Any]:
        raise NotImplementedError

    def _row_bytes(self, record: R) -> int:
        raise NotImplementedError

    def _table(self, rows: list[dict[str, Any]]) -> pa.Table:
        names = self.schema.names
        if "pixel_values" in names and isinstance(rows[0].get("pixel_values"), np.ndarray):
            # Arrays are wrapped, not copied (`tobytes` plus `from_pylist` would copy every pixel twice).
            small = self.schema.remove(names.index("pixel_values"))
            table = pa.Table.from_pylist([{n: row.get(n) for n in small.names} for row in rows], small)
            column = _binary_column([row["pixel_values"] for row in rows])
            return table.append_column(self.schema.field("pixel_values"), column).select(names)
        return pa.Table.from_pylist([{n: row.get(n) for n in names} for row in rows], schema=self.schema)

    def write(self, record: R) -> None:
        row = self._row(record)
        self._rows.append(row)
        size = self._row_bytes(record)
        self._buffered += size
        self.bytes += size
        self.records += 1
        if self._buffered >= ROW_GROUP_BYTES:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        self._writer.write_table(self._table(self._rows), row_group_size=len(self._rows))
        self._rows.clear()
        self._buffered = 0
        self.file.catch_up()

    def _finish(self) -> None:
        self._flush()
        self._writer.close()

    def _discard(self) -> None:
        self._rows.clear()
        self._writer.close()


class ParquetSink(ParquetShard[SampleRecord]):
    """One row per image (image layout) or per sample (sample layout, images as list columns); pixels as
    raw C-order bytes in large_binary cells, with shape and dtype beside them."""

    def __init__(
        self,
        path: str,
        strategy: Strategy,
        dtype: str,
        file_metadata: dict[str, Any],
        *,
        layout: str = "image",
        pixels: bool = True,
    ) -> None:
        super().__init__(path, strategy, dtype, file_metadata, layout=layout, pixels=pixels)
        self._open(parquet_schema(strategy, layout, pixels))

    def _row(self, record: SampleRecord) -> dict[str, Any]:
        if self.layout == "image":
            (image,) = record.images
            row = {k: v for k, v in image.metadata.items() if k != "name"}
            if self.pixels and image.pixels is not None:
                row["pixel_values"] = np.ascontiguousarray(image.pixels)  # wrapped, not copied: `_table`
            return row
        row = sample_metadata(record, self.dtype)
        row["sample"] = sample_json(record)
        if self.pixels:
            row["pixel_values"] = [_raw(r.pixels) for r in record.images if r.pixels is not None]
        return row

    def _row_bytes(self, record: SampleRecord) -> int:
        return record.pixel_bytes + 512


def _binary_column(arrays: list[np.ndarray]) -> pa.ChunkedArray:
    """A large_binary column holding each array's bytes, one chunk per array, without copying them: the
    Parquet writer reads the numpy buffers directly (`tobytes` plus `from_pylist` copied every pixel
    twice, ~4% of a 12-tile InternVL image's time)."""
    chunks = [
        pa.LargeBinaryArray.from_buffers(
            pa.large_binary(),
            1,
            [
                None,
                pa.py_buffer(np.array([0, a.nbytes], dtype=np.int64)),
                pa.py_buffer(a.reshape(-1).view(np.uint8)),
            ],
        )
        for a in arrays
    ]
    return pa.chunked_array(chunks, type=pa.large_binary())


def _raw(pixels: np.ndarray | None) -> bytes:
    assert pixels is not None
    return np.ascontiguousarray(pixels).view(np.uint8).tobytes()


Member = bytes | tuple[bytes, memoryview]
"""A tar member's content: bytes, or an `.npy` file as its header and a view of the array's memory."""


def npy_member(array: np.ndarray, dtype: str) -> tuple[bytes, memoryview]:
    """The bytes `np.save` writes for an array, as (header, a view of the array's data): the pixels go
    to the shard without being copied into a bytes object first. bfloat16 (which .npy cannot name) is
    stored as its uint16 bits."""
    if dtype == "bfloat16":
        array = array.view(np.uint16)
    array = np.ascontiguousarray(array)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    return header.getvalue(), array.reshape(-1).view(np.uint8).data


def member_size(data: Member) -> int:
    return len(data[0]) + data[1].nbytes if isinstance(data, tuple) else len(data)


class TarShard(ShardSink[R]):
    """A tar of WebDataset samples: each record is `KEY.EXT` members (sorted, mtime 0, mode 0644) given by
    the subclass's `_members`.

    The tar is written here, not by `tarfile.TarFile`: `addfile` wants a file object to copy from, so
    every array went through `np.save` into a BytesIO, then out again in 16 KiB reads, each hashed and
    written on its own (208 MB: 817 ms). Here a member is `TarInfo.tobuf` (the header `addfile`
    writes), the array's memory and the zero padding; the archive ends the way `TarFile.close` ends it.
    Same bytes, 261 ms."""

    suffix = ".tar"
    file: HashingFile

    def __init__(
        self,
        path: str,
        strategy: Strategy,
        dtype: str,
        file_metadata: dict[str, Any],
        *,
        layout: str = "image",
        pixels: bool = True,
    ) -> None:
        super().__init__(path, strategy, dtype, file_metadata, layout=layout, pixels=pixels)

    def _members(self, record: R) -> tuple[str, dict[str, Member]]:
        raise NotImplementedError

    def _add(self, name: str, data: Member) -> int:
        """Write one member; returns its content's size."""
        info = tarfile.TarInfo(name)
        info.size = member_size(data)
        info.mtime = TAR_MTIME
        info.mode = 0o644
        header = info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")
        padding = -info.size % tarfile.BLOCKSIZE
        self.file.write(header)
        for part in data if isinstance(data, tuple) else (data,):
            self.file.write(part)
        self.file.write(bytes(padding))
        return info.size

    def write(self, record: R) -> None:
        key, members = self._members(record)
        for ext in sorted(members):  # sorted member names: byte-identical reruns
            self.bytes += 512 + self._add(f"{key}.{ext}", members[ext])
        self.records += 1

    def _finish(self) -> None:
        """Two zero blocks, then zeros up to a whole record (the archive is the whole file, so the
        file's position is its length); the file itself stays open for commit."""
        end = self.file.tell() + 2 * tarfile.BLOCKSIZE
        self.file.write(bytes(2 * tarfile.BLOCKSIZE + -end % tarfile.RECORDSIZE))

    def _discard(self) -> None:
        self.file.close()


class TarSink(TarShard[SampleRecord]):
    """One WebDataset sample per record. Image layout: `KEY.npy` + `KEY.json` (metadata). Sample layout:
    `KEY.img0.npy`, `KEY.img1.npy`, ... in image order, `KEY.vlmtile.json` (metadata), and the sample's
    own members (`KEY.txt`, `KEY.json`, ...) as they came; a manifest line or Parquet row is `KEY.json`."""

    def _members(self, record: SampleRecord) -> tuple[str, dict[str, Member]]:
        members: dict[str, Member] = {}
        if self.layout == "image":
            (image,) = record.images
            if self.pixels and image.pixels is not None:
                members["npy"] = npy_member(image.pixels, self.dtype)
            metadata = {k: v for k, v in image.metadata.items() if k != "name"}
            members["json"] = json.dumps(metadata, sort_keys=True).encode()
        else:
            members.update(record.sample.members)
            if record.sample.fields:
                text = json.dumps(record.sample.fields, sort_keys=True, ensure_ascii=False)
                members["json"] = text.encode()
            if self.pixels:
                for i, image in enumerate(record.images):
                    if image.pixels is not None:
                        members[f"img{i}.npy"] = npy_member(image.pixels, self.dtype)
            members["vlmtile.json"] = json.dumps(sample_metadata(record, self.dtype), sort_keys=True).encode()
        return record.key, members


# -- packed sequences (`vlmtile pack`) ---------------------------------------------------------------------


def packed_schema(strategy: Strategy) -> pa.Schema:
    """One row per packed sequence: the arrays, then one list entry per segment (docs/formats.md)."""
    int_pairs = pa.list_(pa.list_(pa.int64()))
    fields = [
        pa.field("key", pa.string(), nullable=False),
        pa.field("pixel_values", pa.large_binary(), nullable=False),
        pa.field("shape", pa.list_(pa.int64()), nullable=False),
        pa.field("dtype", pa.string(), nullable=False),
        pa.field("segment_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("positions", pa.list_(pa.list_(pa.int32(), 2)), nullable=False),
        pa.field("cu_seqlens", pa.list_(pa.int32()), nullable=False),
        pa.field("num_segments", pa.int64(), nullable=False),
        pa.field("num_tokens", pa.int64(), nullable=False),
        pa.field("num_padding", pa.int64(), nullable=False),
        pa.field("keys", pa.list_(pa.string()), nullable=False),
        pa.field("sources", pa.list_(pa.string()), nullable=False),
        pa.field("images", pa.list_(pa.int64()), nullable=False),
        pa.field("offsets", pa.list_(pa.int64()), nullable=False),
        pa.field("grid_hw", int_pairs, nullable=False),
    ]
    if "image_grid_thw" in strategy.metadata_fields:
        fields.append(pa.field("image_grid_thw", int_pairs, nullable=False))
    return pa.schema(fields)


class PackedParquetSink(ParquetShard[PackedSequence]):
    """One row per packed sequence (`packed_schema`); pixels as raw bytes like the image layout."""

    def __init__(
        self,
        path: str,
        strategy: Strategy,
        dtype: str,
        file_metadata: dict[str, Any],
        *,
        layout: str = "packed",
        pixels: bool = True,
    ) -> None:
        super().__init__(path, strategy, dtype, file_metadata, layout=layout, pixels=pixels)
        self._open(packed_schema(strategy), arrays=("segment_ids", "positions", "cu_seqlens"))

    def _row(self, record: PackedSequence) -> dict[str, Any]:
        row = record.metadata(self.dtype)
        row["pixel_values"] = record.pixel_values  # wrapped by `_table`, not copied
        row["segment_ids"] = record.segment_ids
        row["cu_seqlens"] = record.cu_seqlens
        row["positions"] = record.positions
        return row

    def _row_bytes(self, record: PackedSequence) -> int:
        return record.pixel_values.nbytes + record.positions.nbytes + 2 * record.segment_ids.nbytes + 512

    def _table(self, rows: list[dict[str, Any]]) -> pa.Table:
        """pyarrow builds lists from 1-D arrays but not (N, 2) ones: the positions column is assembled
        from one flat int32 buffer and offsets instead."""
        positions = [row.pop("positions") for row in rows]
        table = super()._table(rows)
        flat = np.concatenate([p.reshape(-1) for p in positions]).astype(np.int32, copy=False)
        offsets = np.concatenate([[0], np.cumsum([len(p) for p in positions])]).astype(np.int32)
        pairs = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.int32()), 2)
        column = pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), pairs)
        index = self.schema.get_field_index("positions")
        return table.set_column(index, self.schema.field("positions"), column)


class PackedTarSink(TarShard[PackedSequence]):
    """One WebDataset sample per sequence: `KEY.npy` (pixel_values), `KEY.segment_ids.npy`,
    `KEY.positions.npy`, `KEY.cu_seqlens.npy` (int32) and `KEY.json` (the per-segment metadata)."""

    def _members(self, record: PackedSequence) -> tuple[str, dict[str, Member]]:
        return record.key, {
            "npy": npy_member(record.pixel_values, self.dtype),
            "segment_ids.npy": npy_member(record.segment_ids, "int32"),
            "positions.npy": npy_member(record.positions, "int32"),
            "cu_seqlens.npy": npy_member(record.cu_seqlens, "int32"),
            "json": json.dumps(record.metadata(self.dtype), sort_keys=True).encode(),
        }


def part_name(index: int, part: int, suffix: str) -> str:
    """A task's output file before the run gives it its final, contiguous shard number."""
    return f".part-{index:06d}-{part:04d}{suffix}"


class RotatingWriter(Generic[R]):
    """A task's output: one part file after another, each committed once it holds `shard_bytes`, with
    the counts (`records` plus what `count` returns per record) of each file."""

    def __init__(
        self,
        output: str,
        index: int,
        open_sink: Callable[[str], ShardSink[R]],
        suffix: str,
        shard_bytes: int,
        count: Callable[[R], Mapping[str, int]],
    ) -> None:
        self.output = output
        self.index = index
        self.open_sink = open_sink
        self.suffix = suffix
        self.shard_bytes = shard_bytes
        self.count = count
        self.files: list[tuple[ShardFile, dict[str, int]]] = []
        self.sink: ShardSink[R] | None = None
        self.counts: dict[str, int] = {}
        self.staging: str | None = None
        """Object-storage output: each file is written in this local directory, then uploaded whole."""
        if storage.is_remote(output):
            self.staging = tempfile.mkdtemp(prefix=f"vlmtile-stage-{index:06d}-")

    def write(self, record: R) -> None:
        if self.sink is None:
            path = os.path.join(
                self.staging or self.output, part_name(self.index, len(self.files), self.suffix)
            )
            self.sink = self.open_sink(path)
            self.counts = {"records": 0}
        self.sink.write(record)
        self.counts["records"] += 1
        for name, value in self.count(record).items():
            self.counts[name] = self.counts.get(name, 0) + value
        if self.sink.bytes >= self.shard_bytes:
            self.close()

    def close(self) -> None:
        if self.sink is not None:
            sink, self.sink = self.sink, None
            shard_file = sink.commit()
            if self.staging is not None:  # the object appears whole once the upload completes
                local = os.path.join(self.staging, shard_file.name)
                storage.upload(local, storage.join(self.output, shard_file.name))
                os.unlink(local)
            self.files.append((shard_file, self.counts))

    def abort(self) -> None:
        if self.sink is not None:
            self.sink.abort()
        for shard_file, _ in self.files:
            storage.remove(storage.join(self.output, shard_file.name))

    def cleanup(self) -> None:
        """Remove the local staging directory (object-storage output), whatever happened."""
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)


SINKS: dict[str, type[ShardSink[SampleRecord]]] = {"parquet": ParquetSink, "webdataset": TarSink}
"""Output formats by CLI name."""

PACKED_SINKS: dict[str, type[ShardSink[PackedSequence]]] = {
    "parquet": PackedParquetSink,
    "webdataset": PackedTarSink,
}
"""The same formats for packed sequences (`vlmtile pack`)."""
