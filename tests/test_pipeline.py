"""`vlmtile.preprocess` as a library call: configuration errors, output-directory rules, accounting of every
input (including shards that hold no record and workers that die), and `open_dataset`'s refusals.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from e2e_helpers import (
    MakeImage,
    leftover_temp_files,
    read_errors,
    read_manifest,
    read_webdataset_raw,
    save_image,
    sha256,
    shard_paths,
)
from PIL import Image

import vlmtile
from vlmtile.runner import RunConfig
from vlmtile.strategies.base import Plan
from vlmtile.strategies.internvl import InternVL

STRATEGY = vlmtile.get_strategy("internvl", max_tiles=1)


def config(inputs: Path | list[Path], out: Path, **kwargs: Any) -> RunConfig:
    paths = inputs if isinstance(inputs, list) else [inputs]
    defaults: dict[str, Any] = {"strategy": STRATEGY, "workers": 1, "progress": False}
    return RunConfig(inputs=tuple(map(str, paths)), output=str(out), **{**defaults, **kwargs})


@pytest.fixture
def folder(tmp_path: Path, make_image: MakeImage) -> Path:
    root = tmp_path / "in"
    for i in range(4):
        save_image(make_image(24 + i, 20, "RGB", i), root / f"img{i}.png", "PNG")
    return root


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"format": "zip"}, "unknown format 'zip'; valid: parquet, webdataset"),
        ({"dtype": "int8"}, "unknown dtype 'int8'; valid: float32, float16, bfloat16, uint8"),
        ({"shard_size": 0}, "shard size must be at least 1"),
        ({"workers": 0}, "workers must be at least 1"),
    ],
)
def test_run_config_validation(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(vlmtile.VlmtileError, match=message):
        config(tmp_path, tmp_path / "out", **kwargs)


def test_user_errors_raise_and_touch_nothing(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(vlmtile.VlmtileError, match="input not found"):
        vlmtile.preprocess(config([folder, tmp_path / "nope"], tmp_path / "out"))
    assert not (tmp_path / "out").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(vlmtile.VlmtileError, match="no images found"):
        vlmtile.preprocess(config(empty, tmp_path / "out"))
    assert not (tmp_path / "out").exists()

    target = tmp_path / "file"
    target.write_text("keep\n")
    with pytest.raises(vlmtile.VlmtileError, match="not a directory"):
        vlmtile.preprocess(config(folder, target))
    assert target.read_text() == "keep\n"


def test_summary_matches_manifest(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = vlmtile.preprocess(config(folder, out, shard_size=3))
    totals = read_manifest(out)["totals"]
    assert summary.output == str(out)
    assert (summary.inputs, summary.records, summary.failures) == (4, 4, 0)
    assert (summary.tokens, summary.bytes, summary.shards) == (totals["tokens"], totals["bytes"], 2)
    assert summary.tokens == 4 * 256
    assert summary.line().startswith("vlmtile: 4 images, 0 failures, 1,024 tokens, ")


def test_leftovers_of_a_killed_task_are_removed_and_the_task_redone(folder: Path, tmp_path: Path) -> None:
    """A task killed mid-write leaves hidden part / temporary files and no completion record."""
    out = tmp_path / "out"
    vlmtile.preprocess(config(folder, out, shard_size=2))
    (out / "_shards" / "task-000001.json").unlink()  # as if task 1 had been killed ...
    (out / "shard-000001.parquet").rename(out / ".part-000001-0000.parquet")  # ... before finalizing
    (out / "..part-000001-0001.parquet.tmp-12345").write_bytes(b"half a shard")
    (out / "..part-000042-0000.parquet.tmp-999").write_bytes(b"a task no plan knows")
    (out / "unrelated.txt").write_text("mine\n")
    summary = vlmtile.preprocess(config(folder, out, shard_size=2))
    assert (summary.records, summary.shards, summary.complete) == (4, 2, True)
    assert leftover_temp_files(out) == []
    assert (out / "unrelated.txt").read_text() == "mine\n"
    assert [r["key"] for r in vlmtile.open_dataset(out)] == [f"img{i}_png" for i in range(4)]


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_shard_whose_inputs_all_failed(folder: Path, tmp_path: Path, fmt: str) -> None:
    (folder / "000_bad.png").write_bytes(b"")
    (folder / "001_bad.jpg").write_text("nope\n")
    out = tmp_path / "out"
    summary = vlmtile.preprocess(config(folder, out, format=fmt, shard_size=2))
    assert (summary.inputs, summary.records, summary.failures) == (6, 4, 2)
    manifest = read_manifest(out)
    # A task whose every input failed writes no file at all (no empty shards); its record says why.
    assert [(s["name"], s["records"]) for s in manifest["shards"]] == [
        (f"shard-000000{'.parquet' if fmt == 'parquet' else '.tar'}", 2),
        (f"shard-000001{'.parquet' if fmt == 'parquet' else '.tar'}", 2),
    ]
    first_task = json.loads((out / "_shards" / "task-000000.json").read_text())
    assert (first_task["files"], first_task["inputs"], first_task["failures"]) == ([], 2, 2)
    for shard in manifest["shards"]:
        assert sha256(out / shard["name"]) == shard["sha256"]
    assert [r["key"] for r in vlmtile.open_dataset(out)] == [f"img{i}_png" for i in range(4)]
    if fmt == "webdataset":
        assert [s["__key__"] for s in read_webdataset_raw(shard_paths(out))] == [
            f"img{i}_png" for i in range(4)
        ]


@dataclass(frozen=True)
class CrashingInternVL(InternVL):
    """Kills its worker process outright (no exception) when it renders a 13-px-wide image."""

    def render(self, image: Image.Image, plan: Plan) -> np.ndarray:
        if plan.orig_width == 13:
            os._exit(17)
        return super().render(image, plan)


@pytest.fixture(scope="module")
def dead_worker_run(
    tmp_path_factory: pytest.TempPathFactory, make_image: MakeImage
) -> tuple[Path, Path, vlmtile.RunSummary]:
    """12 one-image shards on 2 workers; the worker that gets shard 1 dies while rendering it."""
    root = tmp_path_factory.mktemp("dead")
    folder = root / "in"
    for i in range(12):
        save_image(make_image(13 if i == 1 else 24 + i, 20, "RGB", i), folder / f"img{i:02d}.png", "PNG")
    strategy = CrashingInternVL(name="internvl", max_tiles=1)
    out = root / "out"
    summary = vlmtile.preprocess(config(folder, out, strategy=strategy, workers=2, shard_size=1))
    return folder, out, summary


def test_dead_worker_inputs_are_accounted_for(dead_worker_run: tuple[Path, Path, vlmtile.RunSummary]) -> None:
    folder, out, summary = dead_worker_run
    assert summary.inputs == 12
    assert summary.records + summary.failures == 12
    errors = read_errors(out)
    assert str(folder / "img01.png") in {e["source"] for e in errors}
    assert {e["stage"] for e in errors} == {"write"}
    assert [e["source"] for e in errors] == [str(folder / "img01.png")]
    assert errors[0]["reason"] == (
        f"task 1 ({folder / 'img01.png'}) was not written: "
        "worker process exited with status 17 without a result"
    )
    manifest = read_manifest(out)
    assert manifest["totals"]["records"] + manifest["totals"]["failures"] == 12
    for shard in manifest["shards"]:
        assert sha256(out / shard["name"]) == shard["sha256"]
    assert len(list(vlmtile.open_dataset(out))) == summary.records


def test_dead_worker_loses_only_shards_in_flight(
    dead_worker_run: tuple[Path, Path, vlmtile.RunSummary],
) -> None:
    _, _, summary = dead_worker_run
    assert (summary.records, summary.failures) == (11, 1)  # one process per shard: only its own is lost


def test_dead_worker_leaves_no_temporary_file(dead_worker_run: tuple[Path, Path, vlmtile.RunSummary]) -> None:
    _, out, _ = dead_worker_run
    assert leftover_temp_files(out) == []


def test_open_dataset_refusals(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(vlmtile.VlmtileError, match=r"_manifest\.json"):
        vlmtile.open_dataset(tmp_path)

    out = tmp_path / "out"
    vlmtile.preprocess(config(folder, out))
    manifest = read_manifest(out)
    manifest["strategy"]["params"]["tile_size"] = 336  # written by a build that tiled differently
    (out / "_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(vlmtile.VlmtileError, match="resolves strategy 'internvl' differently"):
        vlmtile.open_dataset(out)


def test_open_dataset_accepts_pathlike_and_reports_length(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    vlmtile.preprocess(config(folder, out, format="webdataset", dtype="uint8", shard_size=3))
    dataset = vlmtile.open_dataset(out)
    assert len(dataset) == 4
    assert dataset.format == "webdataset" and dataset.dtype == "uint8"
    assert [os.path.basename(p) for p in dataset.shard_paths] == ["shard-000000.tar", "shard-000001.tar"]
    assert dataset.strategy.params() == STRATEGY.params()
    assert next(iter(dataset))["pixel_values"].dtype == np.float32


def _non_utf8_name(folder: Path, stem: bytes) -> Path:
    """A file name that is not valid UTF-8 (legal on Linux, common in old Latin-1 archives)."""
    path = os.path.join(os.fsencode(folder), stem + b"\xe9.png")
    try:
        with open(path, "wb"):
            pass
    except OSError:
        pytest.skip("this file system refuses non-UTF-8 file names")
    return Path(os.fsdecode(path))


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_non_utf8_file_name(folder: Path, tmp_path: Path, make_image: MakeImage, fmt: str) -> None:
    path = _non_utf8_name(folder, b"caf")
    save_image(make_image(20, 20, "RGB", 0), path, "PNG")
    broken = _non_utf8_name(folder, b"broken")  # an empty file: must become an error record
    assert broken.stat().st_size == 0
    out = tmp_path / "out"
    summary = vlmtile.preprocess(config(folder, out, format=fmt))
    assert (summary.inputs, summary.records, summary.failures) == (6, 5, 1)
    assert leftover_temp_files(out) == []
    assert read_manifest(out)["totals"]["records"] == 5
    assert len(read_errors(out)) == 1
