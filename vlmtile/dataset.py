"""Reading a finished output directory back: `open_dataset(path)` for either format.

Records come back as dicts with `key`, `pixel_values` (float32 normalized: bit-exact with
`Strategy.process` for float32 and uint8 storage) and every metadata field. Only the manifest is trusted
to say what the directory holds: a directory without one is not finished.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from .dtypes import decode_pixels, numpy_dtype
from .errors import VlmtileError
from .ledger import MANIFEST
from .samples import members_as_json
from .strategies import Strategy, get_preset, get_strategy
from .strategies.base import tunable_fields
from .streams import is_url


def strategy_from_manifest(manifest: dict[str, Any]) -> Strategy:
    """Rebuild the exact strategy that wrote a directory, refusing if this version resolves it otherwise."""
    spec = manifest["strategy"]
    preset = get_preset(spec["name"])
    tunable = {f.name for f in tunable_fields(preset.cls)}
    strategy = get_strategy(spec["name"], **{k: v for k, v in spec["params"].items() if k in tunable})
    if strategy.params() != spec["params"]:
        raise VlmtileError(
            f"this vlmtile resolves strategy {spec['name']!r} differently from the one that wrote the data "
            f"(written: {spec['params']}, now: {strategy.params()})"
        )
    return strategy


class Dataset:
    """An iterable over the records of a finished vlmtile output directory."""

    def __init__(self, path: str | os.PathLike[str], *, as_stored: bool = False) -> None:
        self.path = os.fspath(path)
        if is_url(self.path):
            raise VlmtileError(
                f"{self.path}: reading an output on object storage is not supported by open_dataset yet; "
                "copy it to a local or mounted directory (pyarrow and webdataset read the shards by URL)"
            )
        manifest_path = os.path.join(self.path, MANIFEST)
        if not os.path.exists(manifest_path):
            raise VlmtileError(f"{self.path} has no {MANIFEST}: not a finished vlmtile output directory")
        with open(manifest_path, encoding="utf-8") as f:
            self.manifest: dict[str, Any] = json.load(f)
        self.strategy = strategy_from_manifest(self.manifest)
        self.format: str = self.manifest["format"]
        self.dtype: str = self.manifest["dtype"]
        self.layout: str = self.manifest.get("layout", "image")
        """"image": one record per image; "sample": one per sample, `pixel_values` a list (one per image);
        "packed" (`vlmtile pack`): one per packed sequence, with `segment_ids`, `positions`, `cu_seqlens`
        and per-segment lists (docs/packing.md)."""
        self.as_stored = as_stored
        """If True, `pixel_values` is the stored array (uint8 / float16 / bfloat16) instead of float32."""

    def __len__(self) -> int:
        return int(self.manifest["totals"]["records"])

    @property
    def shard_paths(self) -> list[str]:
        return [os.path.join(self.path, s["name"]) for s in self.manifest["shards"]]

    def _pixels(self, stored: np.ndarray) -> np.ndarray:
        return stored if self.as_stored else decode_pixels(self.strategy, stored, self.dtype)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for path in self.shard_paths:
            yield from self.iter_shard(path)

    def iter_shard(self, path: str) -> Iterator[dict[str, Any]]:
        """The records of one shard file (one of `shard_paths`): the unit loaders split across workers."""
        if self.layout == "packed" and self.format == "parquet":
            return self._parquet_packed(path)
        return self._parquet(path) if self.format == "parquet" else self._tar(path)

    def _parquet_packed(self, path: str) -> Iterator[dict[str, Any]]:
        """Packed sequences: the list columns become int32 arrays straight from Arrow (no Python lists of
        thousands of ints per row)."""
        arrays = ("segment_ids", "positions", "cu_seqlens")
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4):
            columns = {name: batch.column(name) for name in arrays}
            for i, row in enumerate(batch.drop_columns(list(arrays)).to_pylist()):
                row["segment_ids"] = columns["segment_ids"][i].values.to_numpy()
                row["cu_seqlens"] = columns["cu_seqlens"][i].values.to_numpy()
                row["positions"] = columns["positions"][i].values.flatten().to_numpy().reshape(-1, 2)
                stored = np.frombuffer(row["pixel_values"], numpy_dtype(row["dtype"])).reshape(row["shape"])
                row["pixel_values"] = self._pixels(stored)
                yield row

    def _parquet(self, path: str) -> Iterator[dict[str, Any]]:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4):
            for row in batch.to_pylist():
                if self.layout == "sample":
                    if "pixel_values" in row:
                        row["pixel_values"] = [
                            self._pixels(
                                np.frombuffer(raw, numpy_dtype(row["dtype"])).reshape(image["shape"])
                            )
                            for raw, image in zip(row["pixel_values"], row["images"], strict=True)
                        ]
                    row["sample"] = json.loads(row["sample"]) if row["sample"] is not None else None
                elif "pixel_values" in row:
                    stored = np.frombuffer(row["pixel_values"], numpy_dtype(row["dtype"])).reshape(
                        row["shape"]
                    )
                    row["pixel_values"] = self._pixels(stored)
                yield row

    def _tar(self, path: str) -> Iterator[dict[str, Any]]:
        sample: dict[str, bytes] = {}
        key = None
        with tarfile.open(path, mode="r") as tar:
            for member in tar:
                base, _, ext = member.name.partition(".")
                if key is not None and base != key:
                    yield self._tar_record(sample)
                    sample = {}
                key = base
                data = tar.extractfile(member)
                if data is not None:
                    sample[ext] = data.read()
        if sample:
            yield self._tar_record(sample)

    def _npy(self, data: bytes, dtype: str) -> np.ndarray:
        stored = np.load(io.BytesIO(data), allow_pickle=False)
        if dtype == "bfloat16":
            stored = stored.view(numpy_dtype("bfloat16"))
        return self._pixels(stored)

    def _tar_record(self, sample: dict[str, bytes]) -> dict[str, Any]:
        if self.layout == "packed":
            row: dict[str, Any] = json.loads(sample["json"])
            row["pixel_values"] = self._npy(sample["npy"], row["dtype"])
            for name in ("segment_ids", "positions", "cu_seqlens"):
                row[name] = np.load(io.BytesIO(sample[f"{name}.npy"]), allow_pickle=False)
            return row
        if self.layout == "image":
            row = json.loads(sample["json"])
            if "npy" in sample:
                row["pixel_values"] = self._npy(sample["npy"], row["dtype"])
            return row
        row = json.loads(sample.pop("vlmtile.json"))
        kind = row.pop("sample_kind", None)
        arrays = [sample.pop(f"img{i}.npy", None) for i in range(row["num_images"])]
        if all(a is not None for a in arrays) and arrays:
            row["pixel_values"] = [self._npy(a, row["dtype"]) for a in arrays if a is not None]
        elif self.manifest.get("pixels", True):
            row["pixel_values"] = []
        if kind == "fields":
            row["sample"] = json.loads(sample["json"])
        elif kind == "members":
            row["sample"] = members_as_json(sorted(sample.items()))
        else:
            row["sample"] = None
        return row


def open_dataset(path: str | os.PathLike[str], *, as_stored: bool = False) -> Dataset:
    """Open a finished `vlmtile preprocess` or `vlmtile pack` output directory (Parquet or WebDataset) for
    reading; the manifest says which layout it holds."""
    return Dataset(path, as_stored=as_stored)
