"""The `vlmtile` command end to end: generated images in, shards out, read back without vlmtile.

Every run goes through `click.testing.CliRunner`; the shards are read with pyarrow or webdataset alone and
compared bit for bit with `Strategy.process` (and with `open_dataset`).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import tarfile
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result
from e2e_helpers import (
    GOOD_IMAGES,
    MakeImage,
    expected_keys,
    leftover_temp_files,
    make_tree,
    read_errors,
    read_manifest,
    read_parquet_raw,
    read_webdataset_raw,
    reference,
    save_image,
    sha256,
    shard_paths,
    stored_reference,
)
from PIL import Image

import vlmtile
from vlmtile.cli import cli

# max_pixels small enough that the 600x200 input goes through smart_resize's downscale branch.
QWEN_MAX_PIXELS = 128 * 28 * 28
STRATEGY_ARGS: dict[str, list[str]] = {
    "internvl": ["--strategy", "internvl", "--max-tiles", "6"],
    "qwen2-vl": ["--strategy", "qwen2-vl", "--max-pixels", str(QWEN_MAX_PIXELS)],
}
STRATEGY_PARAMS: dict[str, dict[str, Any]] = {
    "internvl": {"max_tiles": 6},
    "qwen2-vl": {"max_pixels": QWEN_MAX_PIXELS},
}


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def preprocess_args(inputs: Path | list[Path], out: Path, *extra: str) -> list[str]:
    paths = inputs if isinstance(inputs, list) else [inputs]
    return ["preprocess", *map(str, paths), "-o", str(out), "--workers", "1", *extra]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory, make_image: MakeImage) -> Path:
    root = tmp_path_factory.mktemp("inputs")
    make_tree(root, make_image)
    return root


def _raw_records(out: Path, fmt: str) -> list[tuple[dict[str, Any], np.ndarray]]:
    """(metadata, stored pixels) per record, read with pyarrow or webdataset alone."""
    import ml_dtypes

    if fmt == "parquet":
        rows = read_parquet_raw(shard_paths(out))
        return [({k: v for k, v in row.items() if k != "pixel_values"}, row["pixel_values"]) for row in rows]
    records = []
    for sample in read_webdataset_raw(shard_paths(out)):
        meta, pixels = sample["json"], sample["npy"]
        assert sample["__key__"] == meta["key"]
        if meta["dtype"] == "bfloat16":
            assert pixels.dtype == np.uint16  # .npy has no bfloat16: the bits are stored as uint16
            pixels = pixels.view(ml_dtypes.bfloat16)
        records.append((meta, pixels))
    return records


def _check_geometry(strategy_name: str, meta: dict[str, Any], width: int, height: int) -> None:
    """Invariants of each model's layout that do not rely on the library's own plan."""
    assert (meta["orig_width"], meta["orig_height"]) == (width, height)
    if strategy_name == "internvl":
        cols, rows = meta["grid"]
        assert 1 <= cols * rows <= 6
        assert meta["num_tiles"] == cols * rows + int(cols * rows > 1)
        assert meta["thumbnail"] == (cols * rows > 1)
        assert meta["num_tokens"] == 256 * meta["num_tiles"]
        assert meta["shape"] == [meta["num_tiles"], 3, 448, 448]
        assert (meta["resized_width"], meta["resized_height"]) == (448 * cols, 448 * rows)
        assert "image_grid_thw" not in meta
    else:
        t, gh, gw = meta["image_grid_thw"]
        assert t == 1
        assert (meta["resized_width"], meta["resized_height"]) == (14 * gw, 14 * gh)
        assert meta["resized_width"] % 28 == 0 and meta["resized_height"] % 28 == 0
        assert 3136 <= meta["resized_width"] * meta["resized_height"] <= QWEN_MAX_PIXELS
        assert meta["shape"] == [gh * gw, 3 * 2 * 14 * 14]
        assert meta["num_tokens"] == gh * gw // 4
        assert meta["grid"] == [1, 1] and meta["num_tiles"] == 1


CASES = [
    ("parquet", "float32", "internvl"),
    ("parquet", "float16", "qwen2-vl"),
    ("parquet", "bfloat16", "internvl"),
    ("parquet", "uint8", "qwen2-vl"),
    ("webdataset", "float32", "qwen2-vl"),
    ("webdataset", "float16", "internvl"),
    ("webdataset", "bfloat16", "qwen2-vl"),
    ("webdataset", "uint8", "internvl"),
]


@pytest.mark.parametrize(("fmt", "dtype", "strategy_name"), CASES)
def test_preprocess_end_to_end(tree: Path, tmp_path: Path, fmt: str, dtype: str, strategy_name: str) -> None:
    out = tmp_path / "out"
    result = run(
        *preprocess_args(tree, out, "--format", fmt, "--dtype", dtype, "--shard-size", "3", "-q"),
        *STRATEGY_ARGS[strategy_name],
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == ""

    strategy = vlmtile.get_strategy(strategy_name, **STRATEGY_PARAMS[strategy_name])
    sizes = {str(tree / rel): (w, h) for rel, w, h, *_ in GOOD_IMAGES}
    suffix = ".parquet" if fmt == "parquet" else ".tar"
    manifest = read_manifest(out)
    assert [s["name"] for s in manifest["shards"]] == [f"shard-{i:06d}{suffix}" for i in range(3)]
    assert [s["records"] for s in manifest["shards"]] == [3, 3, 2]

    records = _raw_records(out, fmt)
    assert [meta["key"] for meta, _ in records] == expected_keys()
    assert [meta["source"] for meta, _ in records] == sorted(sizes)
    references = {}
    for meta, stored in records:
        ref = reference(strategy, meta["source"])
        references[meta["key"]] = ref
        expected_meta = {
            "key": meta["key"],
            "source": meta["source"],
            "shape": list(ref.plan.shape),
            "dtype": dtype,
            **ref.metadata,
        }
        assert meta == expected_meta
        _check_geometry(strategy_name, meta, *sizes[meta["source"]])
        assert stored.shape == ref.pixel_values.shape
        if dtype == "uint8":
            assert stored.dtype == np.uint8
            assert np.array_equal(strategy.normalize(stored), ref.pixel_values)
        else:
            want = stored_reference(ref, dtype)
            assert stored.dtype == want.dtype
            # Compare bits: NaN-free, but -0.0 vs 0.0 would still be a difference worth catching.
            assert np.array_equal(stored.view(f"u{stored.itemsize}"), want.view(f"u{want.itemsize}"))

    # The library reader: float32 normalized, exactly `process` for float32 and uint8 storage.
    dataset = vlmtile.open_dataset(out)
    assert len(dataset) == len(records)
    read_back = list(dataset)
    assert [r["key"] for r in read_back] == expected_keys()
    for row, (meta, _) in zip(read_back, records, strict=True):
        ref = references[row["key"]]
        assert {k: v for k, v in row.items() if k != "pixel_values"} == meta
        assert row["pixel_values"].dtype == np.float32
        if dtype in ("float32", "uint8"):
            assert np.array_equal(row["pixel_values"], ref.pixel_values)
        else:
            assert np.array_equal(row["pixel_values"], stored_reference(ref, dtype).astype(np.float32))
    for row, (_, stored) in zip(vlmtile.open_dataset(out, as_stored=True), records, strict=True):
        assert row["pixel_values"].dtype == stored.dtype
        assert np.array_equal(row["pixel_values"], stored)


def test_hidden_text_and_sidecar_files_are_not_inputs(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run(*preprocess_args(tree, out, "-q"), *STRATEGY_ARGS["internvl"])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert manifest["totals"]["inputs"] == len(GOOD_IMAGES)
    assert manifest["totals"]["failures"] == 0
    assert read_errors(out) == []


def test_summary_line_and_quiet(tree: Path, tmp_path: Path) -> None:
    result = run(*preprocess_args(tree, tmp_path / "loud"), *STRATEGY_ARGS["internvl"])
    assert result.exit_code == 0, result.output
    tokens = read_manifest(tmp_path / "loud")["totals"]["tokens"]
    line = result.stdout.strip()
    assert "\n" not in line
    assert re.fullmatch(
        rf"vlmtile: {len(GOOD_IMAGES)} images, 0 failures, {tokens:,} tokens, .* in 1 shards? -> "
        rf"{re.escape(str(tmp_path / 'loud'))} \(.*\)",
        line,
    ), line
    assert result.stderr == ""  # no progress bar when stderr is not a terminal

    quiet = run(*preprocess_args(tree, tmp_path / "quiet", "--quiet"), *STRATEGY_ARGS["internvl"])
    assert quiet.exit_code == 0
    assert quiet.stdout == ""
    assert quiet.stderr == ""


def test_manifest_contents(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = preprocess_args(tree, out, "--max-tiles", "6", "--dtype", "uint8", "--shard-size", "3", "-q")
    result = run(*args, "--strategy", "internvl")
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)

    assert manifest["vlmtile_version"] == vlmtile.__version__
    assert manifest["format_version"] == 2
    assert manifest["strategy"]["name"] == "internvl"
    params = manifest["strategy"]["params"]
    assert params == vlmtile.get_strategy("internvl", max_tiles=6).params()
    # Fully resolved: the option given, the defaults not given and the fixed model constants.
    assert params["max_tiles"] == 6
    assert params["min_tiles"] == 1
    assert params["thumbnail"] is True
    assert params["tile_size"] == 448
    assert params["mean"] == [0.485, 0.456, 0.406]
    assert (manifest["dtype"], manifest["format"], manifest["shard_size"]) == ("uint8", "parquet", 3)
    assert re.fullmatch(r"[0-9a-f]{64}", manifest["config_hash"])
    assert manifest["inputs"] == [str(tree)]
    assert manifest["errors_file"] == "_errors.jsonl"
    assert manifest["metadata_fields"] == {}
    assert datetime.fromisoformat(manifest["created_at"]).utcoffset() is not None

    rows = read_parquet_raw(shard_paths(out))
    assert [s["records"] for s in manifest["shards"]] == [3, 3, 2]
    start = 0
    for i, shard in enumerate(manifest["shards"]):
        path = out / shard["name"]
        assert shard["name"] == f"shard-{i:06d}.parquet"
        assert shard["sha256"] == sha256(path)
        assert shard["bytes"] == path.stat().st_size
        mine = rows[start : start + shard["records"]]
        start += shard["records"]
        assert shard["tokens"] == sum(r["num_tokens"] for r in mine)
        assert shard["tiles"] == sum(r["num_tiles"] for r in mine)
        # The task's completion record agrees with the manifest (one file per task here).
        record = json.loads((out / "_shards" / f"task-{i:06d}.json").read_text())
        (written,) = record["files"]
        assert written["part"] == f".part-{i:06d}-0000.parquet"  # its name before finalizing
        assert {k: v for k, v in written.items() if k != "part"} == shard
        assert (record["inputs"], record["records"], record["failures"]) == (
            shard["records"],
            shard["records"],
            0,
        )
        assert record["errors"] == []
    assert manifest["totals"] == {
        "inputs": len(GOOD_IMAGES),
        "records": len(rows),
        "failures": 0,
        "tokens": sum(r["num_tokens"] for r in rows),
        "tiles": sum(r["num_tiles"] for r in rows),
        "bytes": sum(s["bytes"] for s in manifest["shards"]),
    }


def test_manifest_qwen_metadata_fields(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run(*preprocess_args(tree, out, "-q", "--format", "webdataset"), *STRATEGY_ARGS["qwen2-vl"])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert manifest["metadata_fields"] == {"image_grid_thw": "list<int>"}
    assert manifest["strategy"]["params"]["max_pixels"] == QWEN_MAX_PIXELS
    assert manifest["strategy"]["params"]["min_pixels"] == 3136
    assert manifest["dtype"] == "float16"  # the documented default


def test_no_temporary_files_after_success(tree: Path, tmp_path: Path) -> None:
    for fmt in ("parquet", "webdataset"):
        out = tmp_path / fmt
        result = run(
            *preprocess_args(tree, out, "-q", "--format", fmt, "--shard-size", "4"), "-s", "internvl"
        )
        assert result.exit_code == 0, result.output
        assert leftover_temp_files(out) == []
        suffix = ".parquet" if fmt == "parquet" else ".tar"
        assert sorted(os.listdir(out)) == [
            "_changed.jsonl",
            "_errors.jsonl",
            *(["_index.wids.json"] if fmt == "webdataset" else []),
            "_lock",
            "_manifest.json",
            "_plan.jsonl",
            "_plan.lock",
            "_run.json",
            "_shards",
            f"shard-000000{suffix}",
            f"shard-000001{suffix}",
        ]
        assert sorted(os.listdir(out / "_shards")) == ["task-000000.json", "task-000001.json"]


# -- failures -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory, make_image: MakeImage) -> dict[str, Path]:
    """Three good images and five inputs that must each produce exactly one error record."""
    root = tmp_path_factory.mktemp("mixed")
    save_image(make_image(40, 30, "RGB", 1), root / "good_a.png", "PNG")
    save_image(make_image(64, 48, "RGB", 2), root / "good_b.jpg", "JPEG")
    save_image(make_image(30, 50, "L", 3), root / "sub" / "good_c.png", "PNG")
    (root / "empty.png").write_bytes(b"")
    (root / "garbage.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 300, np.uint8).tobytes())
    buf = io.BytesIO()
    make_image(200, 150, "RGB", 4).save(buf, "JPEG", quality=90)
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "text.png").write_text("this is a text file with an image suffix\n" * 4)
    save_image(make_image(1000, 1, "RGB", 5), root / "line_1000x1.png", "PNG")
    return {
        "root": root,
        "empty": root / "empty.png",
        "garbage": root / "garbage.jpg",
        "truncated": root / "truncated.jpg",
        "text": root / "text.png",
        "refused": root / "line_1000x1.png",
    }


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_failures_are_recorded_once_each(mixed: dict[str, Path], tmp_path: Path, fmt: str) -> None:
    out = tmp_path / "out"
    args = preprocess_args(mixed["root"], out, "--format", fmt, "--shard-size", "2", "-s", "qwen2-vl")
    if fmt == "webdataset":
        args.append("--quiet")  # failures are reported even when quiet
    result = run(*args)

    assert result.exit_code == 3, result.output
    # The summary goes where it always goes (stdout), or to stderr with --quiet; the failure notice is
    # always on stderr.
    if fmt == "webdataset":  # --quiet
        assert result.stdout == ""
        assert "3 images, 5 failures" in result.stderr
    else:
        assert result.stdout.count("\n") == 1 and "3 images, 5 failures" in result.stdout
        assert "3 images" not in result.stderr
    assert "5 inputs failed" in result.stderr
    assert str(out / "_errors.jsonl") in result.stderr

    errors = read_errors(out)
    by_source = {e["source"]: e for e in errors}
    assert len(by_source) == len(errors) == 5
    assert [e["source"] for e in errors] == sorted(by_source)
    for e in errors:
        assert set(e) == {"source", "key", "stage", "reason"}
        assert "." not in e["key"]
    expectations = {
        "empty": ("decode", r"empty"),
        "garbage": ("decode", r"not an image"),
        "truncated": ("decode", r"truncated"),
        "text": ("decode", r"not an image"),
        "refused": ("plan", r"qwen2-vl.*aspect ratio"),
    }
    for name, (stage, pattern) in expectations.items():
        error = by_source.pop(str(mixed[name]))
        assert error["stage"] == stage, error
        assert re.search(pattern, error["reason"]), error
    assert by_source == {}

    manifest = read_manifest(out)
    records = (
        read_parquet_raw(shard_paths(out))
        if fmt == "parquet"
        else [s["json"] for s in read_webdataset_raw(shard_paths(out))]
    )
    inputs = sorted(str(p) for p in mixed["root"].rglob("*") if p.is_file())
    stored = [r["source"] for r in records]
    failed = [e["source"] for e in errors]
    assert sorted(stored + failed) == inputs  # every input exactly once
    assert manifest["totals"]["inputs"] == len(inputs) == 8
    assert manifest["totals"]["records"] == len(stored) == 3
    assert manifest["totals"]["failures"] == 5
    assert sum(s["records"] for s in manifest["shards"]) == 3
    tasks = [json.loads(p.read_text()) for p in sorted((out / "_shards").iterdir())]
    assert sum(t["failures"] for t in tasks) == 5  # failures are counted per task (files hold records)
    assert sum(len(t["errors"]) for t in tasks) == 5
    assert len(vlmtile.open_dataset(out)) == 3
    assert [r["key"] for r in vlmtile.open_dataset(out)] == [
        "good_a_png",
        "good_b_jpg",
        "sub_good_c_png",
    ]


def test_refused_image_is_fine_for_another_strategy(mixed: dict[str, Path], tmp_path: Path) -> None:
    """1000x1 is refused by Qwen (aspect ratio > 200) but InternVL tiles it."""
    out = tmp_path / "out"
    result = run(*preprocess_args(mixed["refused"], out, "-q", "-s", "internvl", "--max-tiles", "4"))
    assert result.exit_code == 0, result.output
    (row,) = read_parquet_raw(shard_paths(out))
    assert (row["orig_width"], row["orig_height"]) == (1000, 1)
    assert row["grid"] == [4, 1]


# -- refusals -----------------------------------------------------------------------------------------


def test_rerun_resumes_other_settings_refused_overwrite_starts_again(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = run(*preprocess_args(tree, out, "-q", "-s", "internvl", "--shard-size", "3"))
    assert first.exit_code == 0, first.output
    (out / "keep_me.txt").write_text("user file\n")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    shards = {k: v for k, v in before.items() if k.startswith("shard-")}
    again = run(*preprocess_args(tree, out, "-q", "-s", "internvl", "--shard-size", "3"))
    assert again.exit_code == 0, again.output  # the same command resumes: nothing left to do
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name.startswith("shard-")} == shards

    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    other = run(*preprocess_args(tree, out, "-q", "-s", "internvl", "--format", "webdataset"))
    assert other.exit_code == 1
    assert "other settings (format: was 'parquet', now 'webdataset'" in other.stderr
    assert "--overwrite" in other.stderr
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "_lock"}  # (taken and freed)
    assert after == {k: v for k, v in before.items() if k != "_lock"}  # nothing touched

    replaced = run(
        *preprocess_args(tree, out, "-q", "-s", "internvl", "--format", "webdataset", "--overwrite")
    )
    assert replaced.exit_code == 0, replaced.output
    names = sorted(os.listdir(out))
    assert not [n for n in names if n.endswith(".parquet")]  # the old format's shards are gone
    assert names == [
        "_changed.jsonl",
        "_errors.jsonl",
        "_index.wids.json",
        "_lock",
        "_manifest.json",
        "_plan.jsonl",
        "_plan.lock",
        "_run.json",
        "_shards",
        "keep_me.txt",
        "shard-000000.tar",
    ]
    assert os.listdir(out / "_shards") == ["task-000000.json"]
    assert read_manifest(out)["format"] == "webdataset"


def test_no_images_found(tmp_path: Path, make_image: MakeImage) -> None:
    empty = tmp_path / "nothing"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello\n")
    save_image(make_image(16, 16, "RGB", 0), empty / ".hidden.png", "PNG")
    result = run(*preprocess_args(empty, tmp_path / "out", "-s", "internvl"))
    assert result.exit_code == 1
    assert "no images found" in result.stderr
    assert str(empty) in result.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_strategy_lists_valid_ones(tree: Path, tmp_path: Path) -> None:
    result = run(*preprocess_args(tree, tmp_path / "out", "-s", "llava-nope"))
    assert result.exit_code == 2
    assert "llava-nope" in result.stderr
    for name in vlmtile.list_strategies():
        assert name in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["-s", "qwen2-vl", "--max-tiles", "4"], "max_tiles"),
        (["-s", "internvl", "--max-pixels", "100000"], "max_pixels"),
        (["-s", "internvl", "--max-tiles", "0"], "max_tiles"),
        (["-s", "internvl", "--min-tiles", "5", "--max-tiles", "2"], "min_tiles"),
        (["-s", "qwen2-vl", "--min-pixels", "10000", "--max-pixels", "5000"], "min_pixels"),
        (["-s", "internvl", "--alpha", "black"], "alpha"),
        (["-s", "internvl", "--dtype", "int8"], "dtype"),
        (["-s", "internvl", "--format", "zip"], "format"),
        (["-s", "internvl", "--workers", "0"], "workers"),
        (["-s", "internvl", "--shard-size", "0"], "shard-size"),
    ],
)
def test_bad_options_are_usage_errors(tree: Path, tmp_path: Path, args: list[str], needle: str) -> None:
    result = run(*preprocess_args(tree, tmp_path / "out"), *args)
    assert result.exit_code == 2, result.output
    assert needle in result.stderr
    assert not (tmp_path / "out").exists()


def test_missing_input_and_file_as_output(tree: Path, tmp_path: Path) -> None:
    missing = run(*preprocess_args(tmp_path / "does-not-exist", tmp_path / "out", "-s", "internvl"))
    assert missing.exit_code == 2
    assert "does-not-exist" in missing.stderr

    target = tmp_path / "a-file"
    target.write_text("precious\n")
    as_file = run(*preprocess_args(tree, target, "-s", "internvl"))
    assert as_file.exit_code in (1, 2)
    assert target.read_text() == "precious\n"


@pytest.mark.parametrize(
    ("alias", "canonical"),
    [
        ("qwen2vl", "qwen2-vl"),
        ("qwen2.5vl", "qwen2.5-vl"),
        ("Qwen2.5-VL", "qwen2.5-vl"),
        ("qwen2_vl", "qwen2-vl"),
        ("internvl3", "internvl"),
    ],
)
def test_strategy_aliases(tmp_path: Path, make_image: MakeImage, alias: str, canonical: str) -> None:
    image = tmp_path / "one.png"
    save_image(make_image(60, 40, "RGB", 0), image, "PNG")
    out = tmp_path / "out"
    result = run(*preprocess_args(image, out, "-q", "-s", alias))
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert manifest["strategy"]["name"] == canonical
    (row,) = read_parquet_raw(shard_paths(out))
    ref = reference(vlmtile.get_strategy(canonical), image)
    assert np.array_equal(row["pixel_values"].astype(np.float32), ref.pixel_values.astype(np.float16))


def test_boolean_and_choice_strategy_options(tmp_path: Path, make_image: MakeImage) -> None:
    image = tmp_path / "wide.png"
    save_image(make_image(300, 100, "RGBA", 0), image, "PNG")
    out = tmp_path / "out"
    args = preprocess_args(image, out, "-q", "-s", "internvl", "--no-thumbnail", "--alpha", "drop")
    result = run(*args, "--dtype", "float32")
    assert result.exit_code == 0, result.output
    params = read_manifest(out)["strategy"]["params"]
    assert params["thumbnail"] is False
    assert params["alpha"] == "drop"
    (row,) = read_parquet_raw(shard_paths(out))
    assert row["thumbnail"] is False
    assert row["num_tiles"] == math.prod(row["grid"])
    strategy = vlmtile.get_strategy("internvl", thumbnail=False, alpha="drop")
    assert np.array_equal(row["pixel_values"], reference(strategy, image).pixel_values)


# -- determinism --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def det_tree(tmp_path_factory: pytest.TempPathFactory, make_image: MakeImage) -> Path:
    root = tmp_path_factory.mktemp("det")
    make_tree(root, make_image)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    return root


def _snapshot(out: Path) -> dict[str, bytes]:
    """Every file of an output directory except the manifest, whose created_at differs by design."""
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != "_manifest.json"
    }


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_workers_and_reruns_give_identical_output(det_tree: Path, tmp_path: Path, fmt: str) -> None:
    outs = {}
    for name, workers in [("w1", "1"), ("w2", "2"), ("w1-again", "1")]:
        out = tmp_path / name
        args = ["preprocess", str(det_tree), "-o", str(out), "-s", "internvl", "--max-tiles", "2"]
        result = run(*args, "--format", fmt, "--shard-size", "2", "--workers", workers, "-q")
        assert result.exit_code == 3, result.output  # broken.png
        outs[name] = out

    manifests = {name: read_manifest(out) for name, out in outs.items()}
    reference_manifest = manifests["w1"]
    assert len(reference_manifest["shards"]) == 5
    for name, manifest in manifests.items():
        assert manifest["shards"] == reference_manifest["shards"], name
        assert manifest["totals"] == reference_manifest["totals"], name
        assert manifest["config_hash"] == reference_manifest["config_hash"], name
        for shard in manifest["shards"]:
            assert sha256(outs[name] / shard["name"]) == shard["sha256"]
    snapshots = {name: _snapshot(out) for name, out in outs.items()}
    assert snapshots["w2"] == snapshots["w1"]
    assert snapshots["w1-again"] == snapshots["w1"]
    assert len(read_errors(outs["w2"])) == 1

    def records(out: Path) -> list[dict[str, Any]]:
        return [
            {k: (v.tobytes() if isinstance(v, np.ndarray) else v) for k, v in r.items()}
            for r in vlmtile.open_dataset(out, as_stored=True)
        ]

    assert [r["key"] for r in records(outs["w2"])] == expected_keys()
    assert records(outs["w2"]) == records(outs["w1"])


# -- the other commands -------------------------------------------------------------------------------


def test_strategies_command_lists_every_strategy_and_parameter() -> None:
    result = run("strategies")
    assert result.exit_code == 0
    for name in vlmtile.list_strategies():
        assert re.search(rf"^{re.escape(name)}: \S", result.stdout, re.MULTILINE), name
    assert "--max-tiles (default 12)" in result.stdout
    assert "--max-pixels (default 12845056)" in result.stdout
    assert "--min-pixels (default 3136)" in result.stdout


def test_version_option() -> None:
    from importlib import metadata

    try:
        metadata.version("vlmtile")
    except metadata.PackageNotFoundError:
        pytest.skip("vlmtile is not installed (running from a source tree)")
    result = run("--version")
    assert result.exit_code == 0
    assert vlmtile.__version__ in result.stdout


def test_tar_members_written_through_cli_are_regular_files(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run(*preprocess_args(tree, out, "-q", "-s", "internvl", "--format", "webdataset"))
    assert result.exit_code == 0, result.output
    with tarfile.open(shard_paths(out)[0]) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == [
        f"{k}.{ext}" for k in expected_keys() for ext in ("json", "npy")
    ]  # sorted
    assert all(m.isfile() and m.mtime == 0 for m in members)


def test_images_are_read_as_pillow_sees_them(tree: Path) -> None:
    """Sanity of the fixture itself: the suffix-less and wrong-suffix files really are PNGs."""
    with Image.open(tree / "no_suffix_image") as a, Image.open(tree / "wrong_suffix.jpg") as b:
        assert (a.format, b.format) == ("PNG", "PNG")


def test_exif_transpose_option(tmp_path: Path) -> None:
    """sample_data's EXIF-rotated JPEG: stored 600x512, Orientation 6, upright 512x600."""
    image = Path(__file__).resolve().parent.parent / "sample_data" / "grace_hopper_exif_orientation6.jpg"
    if not image.exists():
        pytest.skip("sample_data not present")
    sizes = {}
    for flag in ("--no-exif-transpose", "--exif-transpose"):
        out = tmp_path / flag
        result = run(*preprocess_args(image, out, "-q", "-s", "internvl", "--max-tiles", "2", flag))
        assert result.exit_code == 0, result.output
        assert read_manifest(out)["strategy"]["params"]["exif_transpose"] == (flag == "--exif-transpose")
        (row,) = read_parquet_raw(shard_paths(out))
        sizes[flag] = (row["orig_width"], row["orig_height"])
        strategy = vlmtile.get_strategy("internvl", max_tiles=2, exif_transpose=flag == "--exif-transpose")
        want = reference(strategy, image).pixel_values.astype(np.float16)
        assert np.array_equal(row["pixel_values"], want)
    assert sizes == {"--no-exif-transpose": (600, 512), "--exif-transpose": (512, 600)}
