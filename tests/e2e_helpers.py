"""Helpers shared by the end-to-end tests: an input tree of generated images and format-only readers.

The readers use nothing from vlmtile on purpose (pyarrow / webdataset / tarfile alone), so that a test
comparing their output with `Strategy.process` checks the files as a downstream user would read them.
"""

from __future__ import annotations

import gc
import hashlib
import io
import json
import os
import tarfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_dtypes  # registers the "bfloat16" numpy dtype name used by np.frombuffer
import numpy as np
import pyarrow.parquet as pq
from PIL import Image

import vlmtile

MakeImage = Callable[..., Image.Image]

# (relative path, width, height, mode, Pillow format, expected record key)
GOOD_IMAGES: tuple[tuple[str, int, int, str, str, str], ...] = (
    ("rgb_40x30.jpg", 40, 30, "RGB", "JPEG", "rgb_40x30_jpg"),
    ("gray.png", 50, 20, "L", "PNG", "gray_png"),
    ("cmyk.jpg", 24, 36, "CMYK", "JPEG", "cmyk_jpg"),
    ("sub/rgba.png", 30, 60, "RGBA", "PNG", "sub_rgba_png"),
    ("sub/deeper/wide.webp", 600, 200, "RGB", "WEBP", "sub_deeper_wide_webp"),
    ("sub/deeper/palette.png", 64, 16, "P+trns", "PNG", "sub_deeper_palette_png"),
    ("no_suffix_image", 70, 20, "RGB", "PNG", "no_suffix_image"),  # found by content
    ("wrong_suffix.jpg", 33, 17, "LA", "PNG", "wrong_suffix_jpg"),  # PNG bytes named .jpg
)
"""The images `make_tree` writes that vlmtile must find, decode and store."""


def save_image(image: Image.Image, path: Path, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {}
    if fmt == "WEBP":
        kwargs["lossless"] = True
    if image.mode == "P" and "transparency" in image.info:
        kwargs["transparency"] = image.info["transparency"]
    with open(path, "wb") as f:
        image.save(f, fmt, **kwargs)


def make_tree(root: Path, make_image: MakeImage) -> list[Path]:
    """Write the GOOD_IMAGES plus things that must be skipped; returns the good paths, sorted."""
    paths = []
    for seed, (rel, width, height, mode, fmt, _) in enumerate(GOOD_IMAGES):
        save_image(make_image(width, height, mode, seed), root / rel, fmt)
        paths.append(root / rel)
    # Must be skipped: hidden file, hidden folder, a text file, a JSON sidecar.
    save_image(make_image(20, 20, "RGB", 100), root / ".hidden.png", "PNG")
    save_image(make_image(20, 20, "RGB", 101), root / ".cache" / "inside.png", "PNG")
    (root / "notes.txt").write_text("not an image\n")
    (root / "sub" / "labels.json").write_text('{"a": 1}\n')
    return sorted(paths, key=str)


def expected_keys() -> list[str]:
    """Record keys of GOOD_IMAGES in the order vlmtile stores them (sorted by source path)."""
    return [key for rel, *_, key in sorted(GOOD_IMAGES, key=lambda g: g[0])]


def reference(strategy: vlmtile.Strategy, path: str | os.PathLike[str]) -> vlmtile.Result:
    """What the library's own `process` gives for the file, opened the plain Pillow way."""
    with Image.open(path) as image:
        image.load()
        return strategy.process(image)


def stored_reference(result: vlmtile.Result, dtype: str) -> np.ndarray:
    """The array a run with `--dtype dtype` must store for this result (uint8: before normalization)."""
    if dtype == "float32":
        return result.pixel_values
    if dtype == "float16":
        return result.pixel_values.astype(np.float16)
    if dtype == "bfloat16":
        return result.pixel_values.astype(ml_dtypes.bfloat16)
    raise ValueError(dtype)


def read_parquet_raw(paths: list[str]) -> list[dict[str, Any]]:
    """Every row of the shards with pyarrow alone; `pixel_values` decoded from (bytes, dtype, shape)."""
    rows = []
    for path in paths:
        for row in pq.read_table(path).to_pylist():
            row["pixel_values"] = np.frombuffer(row["pixel_values"], row["dtype"]).reshape(row["shape"])
            rows.append(row)
    return rows


def read_webdataset_raw(paths: list[str]) -> list[dict[str, Any]]:
    """Every sample of the shards through `webdataset` alone: (__key__, npy array, json dict)."""
    import webdataset as wds

    samples = []
    # webdataset 1.0 leaves its shard file objects to the garbage collector; collect them here with the
    # ResourceWarning silenced, so pytest's `filterwarnings = error` does not blame the next test.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        dataset = wds.WebDataset(paths, shardshuffle=False).decode()
        for sample in dataset:
            samples.append({"__key__": sample["__key__"], "npy": sample["npy"], "json": sample["json"]})
        del dataset, sample
        gc.collect()
    return samples


def tar_members(path: str) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


def read_manifest(out: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((out / "_manifest.json").read_text(encoding="utf-8"))
    return result


def read_errors(out: Path) -> list[dict[str, Any]]:
    text = (out / "_errors.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


RUN_TIMING = frozenset({"created_at"})
"""Manifest fields that may differ between two runs of the same job."""


def assert_same_run_output(expected: Path, actual: Path, ignore: frozenset[str] = frozenset()) -> None:
    """What two runs of the same job must agree on, whatever ran them (pool, Ray, ranks and a merge,
    object storage): shard names and bytes, the manifest but for its timestamp (and `ignore`), the error
    record."""
    names = sorted(p.name for p in expected.glob("shard-*"))
    assert names and sorted(p.name for p in actual.glob("shard-*")) == names
    for name in names:
        assert (expected / name).read_bytes() == (actual / name).read_bytes(), name
    drop = RUN_TIMING | ignore
    assert {k: v for k, v in read_manifest(expected).items() if k not in drop} == {
        k: v for k, v in read_manifest(actual).items() if k not in drop
    }
    assert read_errors(expected) == read_errors(actual)


def sha256(path: str | os.PathLike[str]) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def shard_paths(out: Path) -> list[str]:
    return [str(out / s["name"]) for s in read_manifest(out)["shards"]]


def leftover_temp_files(out: Path) -> list[str]:
    """Anything that looks like an unfinished write, anywhere under the output directory."""
    return sorted(
        str(p.relative_to(out)) for p in out.rglob("*") if ".tmp-" in p.name or p.name.startswith(".part-")
    )


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()
