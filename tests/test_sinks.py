"""Shard files in detail: Parquet schema and row groups, tar layout, bfloat16, and failed writes.

These tests call the library (`vlmtile.preprocess(RunConfig(...))`) with one worker, so that monkeypatched
module state (row group size, a failing `write`) applies to the code that writes the shards.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from e2e_helpers import (
    MakeImage,
    leftover_temp_files,
    read_errors,
    read_manifest,
    read_parquet_raw,
    reference,
    save_image,
    sha256,
    shard_paths,
)

import vlmtile
from vlmtile import sinks
from vlmtile.runner import RunConfig

INTERNVL_1 = vlmtile.get_strategy("internvl", max_tiles=1)  # one 448x448 tile per image: 602,112 uint8 bytes
TILE_BYTES = 3 * 448 * 448


def make_folder(root: Path, make_image: MakeImage, count: int) -> list[Path]:
    paths = []
    for i in range(count):
        path = root / f"img{i:02d}.png"
        save_image(make_image(20 + 7 * i, 16 + 5 * i, "RGB", i), path, "PNG")
        paths.append(path)
    return paths


def config(inputs: Path | list[Path], out: Path, **kwargs: Any) -> RunConfig:
    paths = inputs if isinstance(inputs, list) else [inputs]
    defaults: dict[str, Any] = {"strategy": INTERNVL_1, "workers": 1, "progress": False}
    return RunConfig(inputs=tuple(map(str, paths)), output=str(out), **{**defaults, **kwargs})


def member_bytes(tar: tarfile.TarFile, name: str) -> bytes:
    f = tar.extractfile(name)
    assert f is not None, name
    return f.read()


def member_npy(tar: tarfile.TarFile, name: str) -> np.ndarray:
    array: np.ndarray = np.load(io.BytesIO(member_bytes(tar, name)), allow_pickle=False)
    return array


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory, make_image: MakeImage) -> Path:
    root = tmp_path_factory.mktemp("sinks")
    make_folder(root, make_image, 6)
    return root


# -- Parquet ------------------------------------------------------------------------------------------


def test_parquet_schema_and_file_metadata(folder: Path, tmp_path: Path) -> None:
    qwen = vlmtile.get_strategy("qwen2-vl", max_pixels=200_000)
    out = tmp_path / "out"
    vlmtile.preprocess(config(folder, out, strategy=qwen, dtype="bfloat16", shard_size=4))
    for path in shard_paths(out):
        schema = pq.read_schema(path)
        assert schema.field("pixel_values").type == pa.large_binary()
        assert schema.field("shape").type == pa.list_(pa.int64())
        assert schema.field("grid").type == pa.list_(pa.int64())
        assert schema.field("image_grid_thw").type == pa.list_(pa.int64())
        assert schema.field("thumbnail").type == pa.bool_()
        for name in (
            "orig_width",
            "orig_height",
            "resized_width",
            "resized_height",
            "num_tiles",
            "num_tokens",
        ):
            assert schema.field(name).type == pa.int64(), name
        for name in ("key", "source", "dtype"):
            assert schema.field(name).type == pa.string(), name
        meta = json.loads(schema.metadata[b"vlmtile"])
        assert meta["strategy"] == {"name": "qwen2-vl", "params": qwen.params()}
        assert meta["strategy"]["params"]["max_pixels"] == 200_000
        assert meta["vlmtile_version"] == vlmtile.__version__
        assert (meta["format"], meta["dtype"], meta["shard_size"]) == ("parquet", "bfloat16", 4)

    # bfloat16 with pyarrow + ml_dtypes alone, against process() cast the ml_dtypes way.
    for row in read_parquet_raw(shard_paths(out)):
        assert row["pixel_values"].dtype == ml_dtypes.bfloat16
        want = reference(qwen, row["source"]).pixel_values.astype(ml_dtypes.bfloat16)
        assert np.array_equal(row["pixel_values"].view(np.uint16), want.view(np.uint16))


def test_parquet_row_groups_are_bounded(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    unbounded = tmp_path / "one-group"
    vlmtile.preprocess(config(folder, unbounded, dtype="uint8"))
    assert pq.ParquetFile(shard_paths(unbounded)[0]).metadata.num_row_groups == 1

    # Two uint8 tiles per group: 6 images -> groups of 2, 2, 2.
    monkeypatch.setattr(sinks, "ROW_GROUP_BYTES", 2 * TILE_BYTES)
    bounded = tmp_path / "bounded"
    vlmtile.preprocess(config(folder, bounded, dtype="uint8"))
    (path,) = shard_paths(bounded)
    meta = pq.ParquetFile(path).metadata
    assert meta.num_row_groups == 3
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [2, 2, 2]
    # Same records either way, in the same order.
    assert pq.read_table(path).equals(pq.read_table(shard_paths(unbounded)[0]))

    monkeypatch.setattr(sinks, "ROW_GROUP_BYTES", 1)  # every row its own group
    single = tmp_path / "single"
    vlmtile.preprocess(config(folder, single, dtype="uint8", shard_size=4))
    assert [pq.ParquetFile(p).metadata.num_row_groups for p in shard_paths(single)] == [4, 2]
    assert [r["key"] for r in vlmtile.open_dataset(single)] == [f"img{i:02d}_png" for i in range(6)]
    # The checksum is taken behind the writer, one row group at a time (`ArrowHashingFile`): groups
    # start at offsets that are not page-aligned, and the footer comes after the last one.
    for out in (unbounded, bounded, single):
        for shard in read_manifest(out)["shards"]:
            assert shard["sha256"] == sha256(out / shard["name"])


@pytest.mark.parametrize("mappable", [True, False])
def test_arrow_hashing_file_hashes_what_was_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mappable: bool
) -> None:
    """Writes of odd sizes, hashed at odd moments (twice in a row, after nothing new, across page
    boundaries, over several mapped windows), give the file's SHA-256; `close` hashes the rest. On a
    filesystem that refuses `mmap` (some FUSE mounts) the same, read back with `pread`."""
    if not mappable:

        def refuse(*args: Any, **kwargs: Any) -> None:
            raise OSError(19, "No such device")

        monkeypatch.setattr(sinks.mmap, "mmap", refuse)
    path = tmp_path / "f.bin"
    file = sinks.ArrowHashingFile(str(path))
    rng = np.random.default_rng(0)
    big = 2 * sinks.WRITEBACK_BYTES + 5  # hashed in three mapped windows
    for size in (1, 4095, 4097, 0, 70_000, 3, big, 1 << 20):
        file.stream.write(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
        file.catch_up()
        if size == 3:
            file.catch_up()
    file.stream.write(b"tail, never caught up")
    file.close()
    file.close()  # closing twice is harmless (abort after a failed commit does it)
    assert file.digest.hexdigest() == sha256(path)
    assert file.hashed == path.stat().st_size == 1 + 4095 + 4097 + 70_000 + 3 + big + (1 << 20) + 21


def test_parquet_directory_readable_by_pyarrow_discovery(folder: Path, tmp_path: Path) -> None:
    """formats.md: `_manifest.json`, `_errors.jsonl` and `_shards/` are invisible to dataset discovery."""
    out = tmp_path / "out"
    vlmtile.preprocess(config(folder, out, shard_size=4))
    table = ds.dataset(str(out), format="parquet").to_table()
    assert table.num_rows == 6
    assert sorted(table.column("key").to_pylist()) == [f"img{i:02d}_png" for i in range(6)]
    assert pq.ParquetDataset(str(out)).read().num_rows == 6


# -- tar ----------------------------------------------------------------------------------------------


def test_tar_layout(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    vlmtile.preprocess(config(folder, out, format="webdataset", dtype="float32", shard_size=4))
    keys = []
    for path in shard_paths(out):
        with tarfile.open(path) as tar:
            members = tar.getmembers()
            shard_keys = [m.name.split(".")[0] for m in members[::2]]
            assert [m.name for m in members] == [
                f"{k}.{ext}" for k in shard_keys for ext in ("json", "npy")
            ]  # sorted
            for member in members:
                assert member.isfile()
                assert member.mtime == 0
                assert member.mode == 0o644
                assert (member.uid, member.gid, member.uname, member.gname) == (0, 0, "", "")
                assert member.name.count(".") == 1  # keys have no dots
            for key in shard_keys:
                meta = json.loads(member_bytes(tar, f"{key}.json"))
                assert meta["key"] == key
                pixels = member_npy(tar, f"{key}.npy")
                assert np.array_equal(pixels, reference(INTERNVL_1, meta["source"]).pixel_values)
        assert shard_keys == sorted(shard_keys)
        keys += shard_keys
    assert keys == [f"img{i:02d}_png" for i in range(6)]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "uint8"])
def test_tar_bytes_are_what_tarfile_writes(tmp_path: Path, make_image: MakeImage, dtype: str) -> None:
    """The tar sink writes its own headers and padding (no `TarFile.addfile` copies): the file must be
    byte for byte what `tarfile` writes for the same members, PAX headers for long non-ASCII names and
    the end-of-archive record padding included, and each `.npy` exactly `np.save`'s bytes."""
    folder = tmp_path / "in"
    folder.mkdir()
    names = ["a.png", "é" * 60 + ".png", "x" * 120 + ".png"]  # a short name, PAX for utf-8 and for length
    for i, name in enumerate(names):
        save_image(make_image(30 + 11 * i, 20 + 3 * i, "RGB", i), folder / name, "PNG")
    out = tmp_path / "out"
    qwen = vlmtile.get_strategy("qwen2.5-vl")
    vlmtile.preprocess(config(folder, out, strategy=qwen, format="webdataset", dtype=dtype))
    (path,) = shard_paths(out)
    with tarfile.open(path) as tar:
        members = [(m.name, member_bytes(tar, m.name)) for m in tar.getmembers()]
    assert len(members) == 6 and any(len(name) > 100 for name, _ in members)
    again = io.BytesIO()
    with tarfile.open(fileobj=again, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    assert Path(path).read_bytes() == again.getvalue()
    for name, data in members:
        if name.endswith(".npy"):
            array = np.load(io.BytesIO(data))
            saved = io.BytesIO()
            np.save(saved, array)
            assert data == saved.getvalue()


@pytest.mark.parametrize(
    "array",
    [
        np.arange(24, dtype=np.float32).reshape(2, 3, 4),
        np.arange(6, dtype=np.float32).reshape(2, 3).T,  # not C-contiguous
        np.zeros((0, 1176), dtype=np.float16),
        np.array(7, dtype=np.int32),
        np.arange(10, dtype=np.int64)[::3],
    ],
)
def test_npy_member_is_np_save(array: np.ndarray) -> None:
    """`np.save` of the C-contiguous array (what the sink always stored: readers get C order, and
    `ascontiguousarray` makes a 0-d array 1-d)."""
    header, data = sinks.npy_member(array, str(array.dtype))
    saved = io.BytesIO()
    np.save(saved, np.ascontiguousarray(array))
    assert header + data.tobytes() == saved.getvalue()
    assert sinks.member_size((header, data)) == len(saved.getvalue())


def test_npy_member_stores_bfloat16_as_uint16_bits() -> None:
    array = np.array([[1.5, -2.0], [0.1, 3e38]], dtype=ml_dtypes.bfloat16)
    header, data = sinks.npy_member(array, "bfloat16")
    stored = np.load(io.BytesIO(header + data.tobytes()))
    assert stored.dtype == np.uint16
    assert np.array_equal(stored, array.view(np.uint16))


def test_tar_bfloat16_round_trip(folder: Path, tmp_path: Path) -> None:
    qwen = vlmtile.get_strategy("qwen2.5-vl")
    out = tmp_path / "out"
    vlmtile.preprocess(config(folder, out, strategy=qwen, format="webdataset", dtype="bfloat16"))
    (path,) = shard_paths(out)
    stored = {}
    with tarfile.open(path) as tar:
        for member in tar:
            if member.name.endswith(".npy"):
                stored[member.name[:-4]] = member_npy(tar, member.name)
            else:
                assert json.loads(member_bytes(tar, member.name))["dtype"] == "bfloat16"
    assert len(stored) == 6
    for record, as_stored in zip(
        vlmtile.open_dataset(out), vlmtile.open_dataset(out, as_stored=True), strict=True
    ):
        bits = stored[record["key"]]
        assert bits.dtype == np.uint16
        want = reference(qwen, record["source"]).pixel_values.astype(ml_dtypes.bfloat16)
        assert np.array_equal(bits, want.view(np.uint16))
        assert as_stored["pixel_values"].dtype == ml_dtypes.bfloat16
        assert np.array_equal(as_stored["pixel_values"].view(np.uint16), bits)
        assert record["pixel_values"].dtype == np.float32
        assert np.array_equal(record["pixel_values"], want.astype(np.float32))  # exact bf16 -> f32


def test_tar_members_follow_source_order_when_paths_and_keys_sort_differently(
    tmp_path: Path, make_image: MakeImage
) -> None:
    root = tmp_path / "in"
    for i, rel in enumerate(["a-b.png", "a.png", "a/b.png"]):
        save_image(make_image(16, 16, "RGB", i), root / rel, "PNG")
    out = tmp_path / "out"
    vlmtile.preprocess(config(root, out, format="webdataset", dtype="uint8"))
    with tarfile.open(shard_paths(out)[0]) as tar:
        keys = [m.name.split(".")[0] for m in tar.getmembers()[::2]]
    # Records follow sorted source paths (docs/formats.md), not sorted keys.
    assert keys == ["a-b_png", "a_png", "a_b_png"]


# -- failed writes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_disk_full_mid_shard_stops_the_run_and_the_rerun_finishes(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    """A full disk is nobody's input's fault: no error lines, no half shard marked done, a clear stop."""
    sink_cls = sinks.SINKS[fmt]
    real_write = sink_cls.write
    failing_shard = f".part-000001-0000{sink_cls.suffix}"  # task 1's first file
    calls: list[str] = []

    def write(self: sinks.ShardSink, record: Any) -> None:
        calls.append(os.path.basename(self.path))
        if os.path.basename(self.path) == failing_shard and self.records == 1:
            # The temporary file exists and holds one record when the disk fills up.
            assert os.path.exists(self.tmp_path)
            raise OSError(28, "No space left on device")
        real_write(self, record)

    monkeypatch.setattr(sink_cls, "write", write)
    out = tmp_path / "out"
    with pytest.raises(vlmtile.RunStopped, match="disk full while writing task 1") as stopped:
        vlmtile.preprocess(config(folder, out, format=fmt, dtype="uint8", shard_size=2))
    assert calls.count(failing_shard) == 2  # the failure happened on the shard's second record
    summary = stopped.value.summary
    assert isinstance(summary, vlmtile.RunSummary)
    assert (summary.records, summary.failures, summary.shards, summary.complete) == (2, 0, 1, False)
    assert not (out / failing_shard).exists()
    assert leftover_temp_files(out) == []
    assert not (out / "_shards" / "task-000001.json").exists()
    assert read_errors(out) == []

    monkeypatch.setattr(sink_cls, "write", real_write)  # space was freed
    again = vlmtile.preprocess(config(folder, out, format=fmt, dtype="uint8", shard_size=2))
    assert (again.inputs, again.records, again.failures, again.shards) == (6, 6, 0, 3)
    manifest = read_manifest(out)
    assert [s["name"] for s in manifest["shards"]] == [f"shard-{i:06d}{sink_cls.suffix}" for i in range(3)]
    for shard in manifest["shards"]:
        assert shard["sha256"] == sha256(out / shard["name"])
    assert [r["key"] for r in vlmtile.open_dataset(out)] == [f"img{i:02d}_png" for i in range(6)]


def test_failure_in_commit_leaves_no_file(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure after the last record (e.g. fsync on a full disk) is handled like one during writing."""
    real_fsync = sinks._fsync

    def fsync(path: str) -> None:
        if os.path.basename(path).startswith("..part-000000-"):  # task 0's temporary file
            raise OSError(5, "Input/output error")
        real_fsync(path)

    monkeypatch.setattr(sinks, "_fsync", fsync)
    out = tmp_path / "out"
    summary = vlmtile.preprocess(config(folder, out, format="webdataset", shard_size=3))
    assert (summary.records, summary.failures) == (3, 3)
    assert sorted(os.listdir(out)) == [
        "_changed.jsonl",
        "_errors.jsonl",
        "_index.wids.json",
        "_lock",
        "_manifest.json",
        "_plan.jsonl",
        "_plan.lock",
        "_run.json",
        "_shards",
        "shard-000000.tar",
    ]
    assert leftover_temp_files(out) == []
    assert {e["stage"] for e in read_errors(out)} == {"write"}


@pytest.mark.parametrize(("preset", "expected"), [(None, "0"), ("250", "250")])
def test_pyarrow_allocator_gives_back_freed_pages_unless_user_chose(
    preset: str | None, expected: str
) -> None:
    """vlmtile sets MIMALLOC_PURGE_DELAY=0 before pyarrow loads (a Qwen worker otherwise kept ~290 MB of
    freed Parquet pages); a value already in the environment is the user's and stays."""
    env = {k: v for k, v in os.environ.items() if k != "MIMALLOC_PURGE_DELAY"}
    if preset is not None:
        env["MIMALLOC_PURGE_DELAY"] = preset
    code = "import os, sys, vlmtile; print(os.environ['MIMALLOC_PURGE_DELAY'], 'pyarrow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [expected, "True"]
