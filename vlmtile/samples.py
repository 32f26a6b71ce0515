"""Samples: a training example's images plus everything else about it, from every kind of input.

Training data is rarely a bare folder: it is WebDataset tar shards, LLaVA / ms-swift manifests naming one
or several images per conversation, or Parquet datasets holding image bytes. vlmtile treats all of them as
*samples*: ordered images plus the non-image fields (captions, conversations, labels), which are written
with the pixels so that nothing of a sample is lost.

Inputs split in two by how they can be read:

- listed inputs (image files, folders of images, manifests) are enumerated by the parent up front, so
  their samples can be sorted, given globally unique keys and cut into shards of `--shard-size`;
- streamed inputs (tar shards, Parquet files, local or remote) are read once, sequentially, by the worker
  that owns them: one task per file, memory flat at one sample. Their keys are prefixed with the file's
  own unique key, which makes them unique without a global pass.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import VlmtileError
from .sources import InputItem, display_path, list_inputs, make_key
from .streams import (
    TarProblem,
    expand_braces,
    is_image_member,
    is_url,
    iter_tar_samples,
    local_path,
    open_stream,
)

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PARQUET_SUFFIXES = (".parquet",)
MANIFEST_SUFFIXES = (".json", ".jsonl")
AUTO_IMAGE_FIELDS = ("images", "image")
"""Manifest fields tried in order when `--image-field` is not given (ms-swift first, then LLaVA)."""
AUTO_IMAGE_COLUMNS = ("image", "images", "img", "jpg", "png")
RESERVED_MEMBER = re.compile(r"^(img\d+\.npy|npy|vlmtile\.json)$")
"""Member names vlmtile writes itself; an input member with one of them would be shadowed."""


@dataclass(frozen=True)
class ImageRef:
    """One image of a sample: where it is (`path`, read by the worker) or its bytes (`data`)."""

    name: str
    """How the sample names it: tar member extension ("jpg", "0.png"), manifest path as written, column."""
    source: str
    """Human-readable origin for metadata and error records."""
    path: str | None = None
    data: bytes | None = None


@dataclass(frozen=True)
class Sample:
    """One training example: ordered images plus every non-image field, under a unique, dot-free key."""

    key: str
    source: str
    images: tuple[ImageRef, ...]
    fields: dict[str, Any] = field(default_factory=dict)
    """JSON-able non-image fields (a manifest line, a Parquet row without its image column)."""
    members: tuple[tuple[str, bytes], ...] = ()
    """Non-image tar members (extension, bytes), written back verbatim."""
    orig_key: str | None = None


@dataclass(frozen=True)
class Failure:
    """One input that produced no record, and why (an error-record line)."""

    key: str
    source: str
    stage: str
    """Where it failed: "read", "decode", "plan", "render", "write" or "list"."""
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"source": self.source, "key": self.key, "stage": self.stage, "reason": self.reason}


@dataclass(frozen=True)
class SourceOptions:
    """How to find images in manifests and Parquet inputs."""

    image_field: str | None = None
    """Manifest field / Parquet column holding the image(s); None tries the usual names."""
    key_field: str = "id"
    """Field / column whose value becomes the sample key (kept as `orig_key`); else the line / row number."""
    image_root: str | None = None
    """Folder that relative image paths in manifests and Parquet `path`s are relative to (default: the
    manifest's or Parquet file's own folder)."""


@dataclass(frozen=True)
class StreamInput:
    """A tar shard or Parquet file that one worker reads once, start to end."""

    kind: str
    """"tar" or "parquet"."""
    url: str
    key: str
    """Unique among the run's streams; prefixes the keys of the samples inside."""

    @property
    def source(self) -> str:
        return display_path(self.url)


@dataclass
class Listing:
    """Everything a run will read: listed samples (in order), streams, and inputs that failed to list."""

    samples: list[Sample]
    streams: list[StreamInput]
    failures: list[Failure]
    layout: str
    """"image" (plain image inputs only: one record per image, the flat layout) or "sample"."""

    def __len__(self) -> int:
        return len(self.samples) + len(self.streams)


def input_kind(path: str) -> str:
    """ "tar", "parquet", "manifest" or "image", by name (images are confirmed by content later)."""
    lower = path.lower()
    if lower.startswith("pipe:") or lower.endswith(TAR_SUFFIXES):
        return "tar"
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if lower.endswith(MANIFEST_SUFFIXES):
        return "manifest"
    return "image"


def _is_container(path: str) -> bool:
    return input_kind(path) in ("tar", "parquet")


def list_samples(inputs: Iterable[str | os.PathLike[str]], options: SourceOptions | None = None) -> Listing:
    """Expand, classify and enumerate the inputs of a run (the parent's side; no image is decoded)."""
    options = options or SourceOptions()
    local: list[str] = []
    manifests: list[str] = []
    stream_urls: list[str] = []
    for raw in inputs:
        for path in expand_braces(os.fspath(raw)):
            kind = input_kind(path)
            if kind not in ("tar", "parquet"):  # folders, images and manifests under file:// are paths
                path = local_path(path)
            if is_url(path):
                if kind not in ("tar", "parquet"):
                    raise VlmtileError(
                        f"cannot tell what {path} is: remote and pipe: inputs must be tar shards "
                        "(.tar, .tar.gz, .tgz or pipe:) or .parquet files"
                    )
                stream_urls.append(path)
            elif kind == "manifest" and os.path.isfile(path):
                manifests.append(path)
            else:
                local.append(path)
    containers: list[str] = []
    items = list_inputs(local, containers=containers) if local else []
    stream_urls += containers
    streams = _stream_inputs(stream_urls)

    ordered: list[tuple[tuple[str, int], Sample]] = [
        ((item.source, 0), _image_sample(item)) for item in items
    ]
    failures: list[Failure] = []
    for manifest in sorted(set(manifests)):
        for position, sample_or_failure in enumerate(read_manifest(manifest, options)):
            if isinstance(sample_or_failure, Failure):
                failures.append(sample_or_failure)
            else:
                ordered.append(((manifest, position), sample_or_failure))
    ordered.sort(key=lambda pair: pair[0])
    samples = _unique_samples([sample for _, sample in ordered])
    layout = "image" if not manifests and not streams else "sample"
    return Listing(samples=samples, streams=streams, failures=failures, layout=layout)


def _image_sample(item: InputItem) -> Sample:
    source = display_path(item.source)
    return Sample(key=item.key, source=source, images=(ImageRef("image", source, path=item.source),))


def _stream_inputs(urls: Sequence[str]) -> list[StreamInput]:
    unique = sorted(set(urls))
    keys = _disambiguate([make_key(_stem(url)) for url in unique], unique)
    return [
        StreamInput(kind=input_kind(url), url=url, key=key) for url, key in zip(unique, keys, strict=True)
    ]


def _stem(url: str) -> str:
    name = url.rstrip("/").rsplit("/", 1)[-1]
    if url.startswith("pipe:"):
        name = re.split(r"[\s/]", url.rstrip())[-1] or "pipe"
    for suffix in (*TAR_SUFFIXES, *PARQUET_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _disambiguate(keys: list[str], sources: Sequence[str]) -> list[str]:
    """Append a short hash of the source to every key that is not unique, growing it until all are."""
    result = list(keys)
    for digits in (8, 16, 40):
        counts = Counter(result)
        colliding = [i for i, key in enumerate(result) if counts[key] > 1]
        if not colliding:
            return result
        for i in colliding:
            digest = hashlib.sha1(sources[i].encode("utf-8", "surrogateescape")).hexdigest()
            result[i] = f"{keys[i]}-{digest[:digits]}"
    raise VlmtileError("could not make unique sample keys (the same source listed twice?)")


def _unique_samples(samples: list[Sample]) -> list[Sample]:
    keys = _disambiguate([s.key for s in samples], [s.source for s in samples])
    return [
        s if s.key == key else Sample(key, s.source, s.images, s.fields, s.members, s.orig_key)
        for s, key in zip(samples, keys, strict=True)
    ]


# -- manifests --------------------------------------------------------------------------------------------


def read_manifest(path: str, options: SourceOptions) -> Iterator[Sample | Failure]:
    """Samples of a LLaVA-style JSON list or an ms-swift-style JSONL file, in file order.

    A line that is not a JSON object becomes a `Failure` for that line (the rest of the file still counts),
    so that every sample of the manifest is accounted for.
    """
    shown = display_path(path)
    stem = make_key(_stem(os.path.basename(path)).rsplit(".", 1)[0])
    root = options.image_root or os.path.dirname(os.path.abspath(path))
    try:
        if path.lower().endswith(".jsonl"):
            with open(path, "rb") as binary:  # decoded line by line: one bad byte costs one line
                rows: Iterable[tuple[int, Any]] = list(_jsonl_rows(binary, shown))
        else:
            with open(path, encoding="utf-8-sig") as f:
                try:
                    data = json.load(f)
                except json.JSONDecodeError as e:
                    raise VlmtileError(f"{shown}: not valid JSON: {e}") from None
            if not isinstance(data, list):
                raise VlmtileError(f"{shown}: a JSON manifest must be a list of samples")
            rows = enumerate(data, start=1)
    except (OSError, UnicodeDecodeError) as e:
        raise VlmtileError(f"cannot read manifest {shown}: {e}") from None
    for number, row in rows:
        source = f"{shown}:{number}"
        if isinstance(row, json.JSONDecodeError):
            yield Failure(f"{stem}-{number:06d}", source, "list", f"not valid JSON: {row}")
            continue
        if isinstance(row, UnicodeDecodeError):
            yield Failure(
                f"{stem}-{number:06d}", source, "list", f"not UTF-8 text: byte {row.start + 1} of the line"
            )
            continue
        if not isinstance(row, dict):
            yield Failure(f"{stem}-{number:06d}", source, "list", "not a JSON object")
            continue
        orig = row.get(options.key_field)
        orig_key = str(orig) if isinstance(orig, str | int) and not isinstance(orig, bool) else None
        key = make_key(orig_key) if orig_key else f"{stem}-{number:06d}"
        try:
            images = tuple(_manifest_images(row, options.image_field, root, source))
        except ValueError as e:
            yield Failure(key, source, "list", str(e))
            continue
        yield Sample(key=key, source=source, images=images, fields=row, orig_key=orig_key)


def _jsonl_rows(lines: Iterable[bytes], shown: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) per non-blank line; a line that is not JSON (or not UTF-8) gives its
    exception as the value, so that it becomes one failure and the lines around it still count."""
    for number, raw in enumerate(lines, start=1):
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # a UTF-8 byte order mark (Windows editors): not part of the first sample
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield number, e
            continue
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            yield number, e


def _manifest_images(
    row: dict[str, Any], image_field: str | None, root: str, source: str
) -> Iterator[ImageRef]:
    names = (image_field,) if image_field else AUTO_IMAGE_FIELDS
    name = next((n for n in names if n in row and row[n] is not None), None)
    if name is None:
        return  # a text-only sample: kept, with no images
    value = row[name]
    values = value if isinstance(value, list) else [value]
    for i, entry in enumerate(values):
        where = f"{source}:{name}[{i}]" if isinstance(value, list) else f"{source}:{name}"
        if isinstance(entry, dict):  # ms-swift / HF style {"path": ..., "bytes": ...}
            if entry.get("bytes") is not None:
                yield ImageRef(str(entry.get("path") or name), where, data=_as_bytes(entry["bytes"], where))
                continue
            entry = entry.get("path") or entry.get("url") or entry.get("image")
        if not isinstance(entry, str) or not entry:
            raise ValueError(f"{where}: expected an image path, URL or data URI, got {entry!r}")
        if entry.startswith("data:") or is_url(entry) or os.path.isabs(entry):
            yield ImageRef(entry if not entry.startswith("data:") else "data-uri", where, path=entry)
        else:
            yield ImageRef(entry, where, path=os.path.join(root, entry))


def _as_bytes(value: Any, where: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except ValueError:
            raise ValueError(f"{where}: 'bytes' is neither bytes nor base64") from None
    raise ValueError(f"{where}: 'bytes' is neither bytes nor base64")


# -- streams (the worker's side) ----------------------------------------------------------------------


def iter_stream(stream: StreamInput, options: SourceOptions) -> Iterator[Sample | Failure]:
    """Every sample of one tar shard or Parquet file, read once, in file order; damage becomes failures."""
    if stream.kind == "tar":
        yield from _tar_samples(stream)
    else:
        yield from _parquet_samples(stream, options)


def _tar_samples(stream: StreamInput) -> Iterator[Sample | Failure]:
    seen: set[str] = set()
    with open_stream(stream.url) as f:
        for item in iter_tar_samples(f, stream.source):
            if isinstance(item, TarProblem):
                key = f"{stream.key}_{make_key(item.key)}" if item.key else stream.key
                yield Failure(key, item.source, "read", item.reason)
                continue
            key = _stream_key(stream.key, item.key, item.source, seen)
            images = tuple(
                ImageRef(ext, f"{item.source}.{ext}", data=data)
                for ext, data in item.members
                if is_image_member(ext)
            )
            members = tuple((ext, data) for ext, data in item.members if not is_image_member(ext))
            clash = [ext for ext, _ in members if RESERVED_MEMBER.match(ext)]
            if clash:
                yield Failure(
                    key, item.source, "read", f"member .{clash[0]} would collide with vlmtile's own"
                )
                continue
            yield Sample(key=key, source=item.source, images=images, members=members, orig_key=item.key)


def _stream_key(prefix: str, orig: str, source: str, seen: set[str]) -> str:
    """`prefix_key`, sanitized; a second sample sanitizing to the same key gets a hash of its origin."""
    key = f"{prefix}_{make_key(orig)}"
    if key in seen:
        key = f"{key}-{hashlib.sha1(source.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"
    seen.add(key)
    return key


def _parquet_samples(stream: StreamInput, options: SourceOptions) -> Iterator[Sample | Failure]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    seen: set[str] = set()
    root = options.image_root or (
        os.path.dirname(os.path.abspath(stream.url)) if not is_url(stream.url) else ""
    )
    with open_stream(stream.url) if is_url(stream.url) else open(stream.url, "rb") as f:
        try:
            parquet = pq.ParquetFile(f)
        except (pa.ArrowException, OSError) as e:
            yield Failure(stream.key, stream.source, "read", f"not a readable Parquet file: {e}")
            return
        column = _image_column(parquet.schema_arrow, options.image_field)
        if column is None:
            yield Failure(
                stream.key,
                stream.source,
                "read",
                f"no image column (tried {', '.join(AUTO_IMAGE_COLUMNS)} and binary columns; "
                f"columns: {', '.join(parquet.schema_arrow.names)}); choose one with --image-field",
            )
            return
        row_number = 0
        try:
            for batch in parquet.iter_batches(batch_size=64):
                for row in batch.to_pylist():
                    source = f"{stream.source}:{row_number}"
                    orig = row.get(options.key_field)
                    orig_key = (
                        str(orig) if isinstance(orig, str | int) and not isinstance(orig, bool) else None
                    )
                    key = _stream_key(stream.key, orig_key or f"{row_number:08d}", source, seen)
                    row_number += 1
                    try:
                        images = tuple(_cell_images(row.pop(column), column, root, source))
                    except ValueError as e:
                        yield Failure(key, source, "read", str(e))
                        continue
                    fields = {k: _json_safe(v) for k, v in row.items()}
                    yield Sample(key=key, source=source, images=images, fields=fields, orig_key=orig_key)
        except (pa.ArrowException, OSError) as e:
            yield Failure(
                stream.key, stream.source, "read", f"Parquet file damaged after row {row_number}: {e}"
            )


def _image_column(schema: Any, wanted: str | None) -> str | None:
    import pyarrow as pa

    if wanted:
        return wanted if wanted in schema.names else None

    def holds_images(t: Any) -> bool:
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            return True
        if pa.types.is_struct(t):
            return bool(t.get_field_index("bytes") >= 0)
        if pa.types.is_list(t) or pa.types.is_large_list(t):
            return holds_images(t.value_type)
        return False

    for name in AUTO_IMAGE_COLUMNS:
        if name in schema.names and holds_images(schema.field(name).type):
            return name
    return next((f.name for f in schema if holds_images(f.type)), None)


def _cell_images(cell: Any, column: str, root: str, source: str) -> Iterator[ImageRef]:
    """A Parquet cell: raw bytes, an HF `{bytes, path}` struct, or a list of either (multi-image)."""
    if cell is None:
        return
    values = cell if isinstance(cell, list) else [cell]
    for i, value in enumerate(values):
        name = f"{column}[{i}]" if isinstance(cell, list) else column
        where = f"{source}:{name}"
        if isinstance(value, bytes):
            yield ImageRef(name, where, data=value)
        elif isinstance(value, dict) and value.get("bytes") is not None:
            yield ImageRef(str(value.get("path") or name), where, data=value["bytes"])
        elif isinstance(value, dict) and value.get("path"):
            path = value["path"]
            yield ImageRef(
                path, where, path=path if os.path.isabs(path) or is_url(path) else os.path.join(root, path)
            )
        else:
            raise ValueError(f"{where}: image cell has neither bytes nor a path")


def _json_safe(value: Any) -> Any:
    """Parquet values as JSON: bytes as {"$base64": ...}; dates and decimals as strings."""
    if isinstance(value, bytes):
        return {"$base64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def members_as_json(members: Sequence[tuple[str, bytes]]) -> dict[str, Any]:
    """Tar members for a Parquet `sample` column: UTF-8 text as is, anything else as {"$base64": ...}."""
    out: dict[str, Any] = {}
    for ext, data in members:
        try:
            out[ext] = data.decode("utf-8")
        except UnicodeDecodeError:
            out[ext] = {"$base64": base64.b64encode(data).decode("ascii")}
    return out
