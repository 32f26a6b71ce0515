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
import os
import tarfile
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .strategies import Strategy
from .work import Record

TAR_MTIME = 0
"""Fixed member mtime, so the same records give a byte-identical tar."""

ROW_GROUP_BYTES = 128 * 1024 * 1024
"""Pixel bytes per Parquet row group: big rows need byte-sized groups, not pyarrow's 1M-row default."""

_META_TYPES = {
    "int": pa.int64(),
    "bool": pa.bool_(),
    "str": pa.string(),
    "list<int>": pa.list_(pa.int64()),
}


@dataclass(frozen=True)
class ShardFile:
    """A finished shard file: what the manifest records about it."""

    name: str
    bytes: int
    sha256: str


def parquet_schema(strategy: Strategy) -> pa.Schema:
    """The explicit schema of a Parquet shard for this strategy (no type inference drift)."""
    fields = [
        pa.field("key", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("pixel_values", pa.large_binary(), nullable=False),
        pa.field("shape", pa.list_(pa.int64()), nullable=False),
        pa.field("dtype", pa.string(), nullable=False),
        pa.field("orig_width", pa.int64(), nullable=False),
        pa.field("orig_height", pa.int64(), nullable=False),
        pa.field("resized_width", pa.int64(), nullable=False),
        pa.field("resized_height", pa.int64(), nullable=False),
        pa.field("grid", pa.list_(pa.int64()), nullable=False),
        pa.field("thumbnail", pa.bool_(), nullable=False),
        pa.field("num_tiles", pa.int64(), nullable=False),
        pa.field("num_tokens", pa.int64(), nullable=False),
    ]
    fields += [pa.field(name, _META_TYPES[kind]) for name, kind in strategy.metadata_fields.items()]
    return pa.schema(fields)


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ShardSink:
    """Base: temporary file, commit (fsync, checksum, rename) or abort (remove)."""

    suffix: ClassVar[str] = ""

    def __init__(self, path: str, strategy: Strategy, dtype: str, file_metadata: dict[str, Any]) -> None:
        self.path = path
        self.strategy = strategy
        self.dtype = dtype
        self.file_metadata = file_metadata
        directory, name = os.path.split(path)
        self.tmp_path = os.path.join(directory, f".{name}.tmp-{os.getpid()}")
        self.records = 0

    def write(self, record: Record) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        """Write the format's trailer (footer, end-of-archive blocks) and close the temporary file."""
        raise NotImplementedError

    def _discard(self) -> None:
        """Close the temporary file without caring whether it is valid."""
        raise NotImplementedError

    def commit(self) -> ShardFile:
        self._finish()
        _fsync(self.tmp_path)
        size = os.path.getsize(self.tmp_path)
        checksum = sha256_file(self.tmp_path)
        os.replace(self.tmp_path, self.path)
        _fsync(os.path.dirname(self.path) or ".")
        return ShardFile(os.path.basename(self.path), size, checksum)

    def abort(self) -> None:
        # The shard is being thrown away; the error that brought us here is the one that matters.
        with contextlib.suppress(Exception):
            self._discard()
        if os.path.exists(self.tmp_path):
            os.unlink(self.tmp_path)

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.abort()


class ParquetSink(ShardSink):
    """One row per image; pixels as raw C-order bytes in a large_binary column, with shape and dtype."""

    suffix = ".parquet"

    def __init__(self, path: str, strategy: Strategy, dtype: str, file_metadata: dict[str, Any]) -> None:
        super().__init__(path, strategy, dtype, file_metadata)
        schema = parquet_schema(strategy).with_metadata(
            {"vlmtile": json.dumps(file_metadata, sort_keys=True)}
        )
        self.schema = schema
        small = [n for n in schema.names if n != "pixel_values"]
        self._writer = pq.ParquetWriter(
            self.tmp_path,
            schema,
            # Normalized floats barely compress and uint8 little; spend no CPU on the pixel column.
            compression={n: ("NONE" if n == "pixel_values" else "ZSTD") for n in schema.names},
            use_dictionary=small,
            write_statistics=small,
        )
        self._rows: list[Record] = []
        self._buffered = 0

    def write(self, record: Record) -> None:
        self._rows.append(record)
        self._buffered += record.pixels.nbytes
        self.records += 1
        if self._buffered >= ROW_GROUP_BYTES:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        columns: dict[str, list[Any]] = {name: [] for name in self.schema.names}
        for record in self._rows:
            for name in self.schema.names:
                if name == "pixel_values":
                    columns[name].append(np.ascontiguousarray(record.pixels).view(np.uint8).tobytes())
                else:
                    columns[name].append(record.metadata.get(name))
        self._writer.write_table(pa.table(columns, schema=self.schema))
        self._rows.clear()
        self._buffered = 0

    def _finish(self) -> None:
        self._flush()
        self._writer.close()

    def _discard(self) -> None:
        self._rows.clear()
        self._writer.close()


class TarSink(ShardSink):
    """One WebDataset sample per image: `KEY.npy` (pixels) and `KEY.json` (metadata), in key order."""

    suffix = ".tar"

    def __init__(self, path: str, strategy: Strategy, dtype: str, file_metadata: dict[str, Any]) -> None:
        super().__init__(path, strategy, dtype, file_metadata)
        self._file = open(self.tmp_path, "wb")  # noqa: SIM115 - closed by _finish / _discard
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = TAR_MTIME
        info.mode = 0o644
        self._tar.addfile(info, io.BytesIO(data))

    def write(self, record: Record) -> None:
        pixels = record.pixels
        if self.dtype == "bfloat16":
            # .npy has no bfloat16: store the bits as uint16; KEY.json says "bfloat16".
            pixels = pixels.view(np.uint16)
        buf = io.BytesIO()
        np.lib.format.write_array(buf, np.ascontiguousarray(pixels), allow_pickle=False)
        self._add(f"{record.key}.npy", buf.getvalue())
        self._add(f"{record.key}.json", json.dumps(record.metadata, sort_keys=True).encode())
        self.records += 1

    def _finish(self) -> None:
        self._tar.close()
        self._file.close()

    def _discard(self) -> None:
        self._file.close()


SINKS: dict[str, type[ShardSink]] = {"parquet": ParquetSink, "webdataset": TarSink}
"""Output formats by CLI name."""
