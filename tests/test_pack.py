"""`vlmtile pack` and `vlmtile.packing`: Patch n' Pack of navit and Qwen-family outputs.

- The packer (`assign`) on any lengths: every item exactly once, no bin over capacity or the image cap,
  and first-fit decreasing within its proven bound of the optimum.
- Padding on a realistic size distribution (aspect ratios and sizes like web photos): reported, and
  below 5% from 16 images' worth of tokens per sequence.
- End to end: unpacking every sequence returns exactly the stored patches of every image (nothing lost or
  duplicated, bit for bit), segment ids and cu_seqlens agree, positions are each image's grid (navit:
  raster order of the kept patches; Qwen: merge-window order, as transformers' vision encoder computes).
- Over-long images are error records (never truncated) or, asked for, split parts that reassemble.
- Byte-identical reruns and worker counts; resume after a failed task; new input shards are packed in new
  groups; other settings or a rebuilt input are refused; `verify`, `stats --pack-len` and the CLI.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from e2e_helpers import read_errors, read_manifest, save_image, shard_paths
from hypothesis import given, settings
from hypothesis import strategies as st

import vlmtile
from vlmtile import pack as pack_module
from vlmtile.cli import cli
from vlmtile.loader import collate
from vlmtile.pack import PackConfig, pack
from vlmtile.packing import (
    DEFAULT_BUFFER,
    PackReport,
    assign,
    attention_mask,
    fractional_positions,
    group_shards,
    simulate,
    split_lengths,
    unpack,
)
from vlmtile.stats import Column, compute_stats, stats_from_output
from vlmtile.verify import verify

# ---------------------------------------------------------------------------------------------------------
# The packer


@settings(max_examples=400, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 100), min_size=0, max_size=300),
    capacity=st.integers(100, 400),
    cap=st.integers(0, 6),
    fit=st.sampled_from(["first", "best"]),
)
def test_assign_places_every_item_once_within_limits(lengths, capacity, cap, fit):
    bins = assign(lengths, capacity, max_segments=cap, fit=fit)
    placed = [i for b in bins for i in b]
    assert sorted(placed) == list(range(len(lengths)))  # nothing lost, nothing twice
    for b in bins:
        assert b == sorted(b) and b  # input order inside a bin, never an empty bin
        assert sum(lengths[i] for i in b) <= capacity
        assert cap == 0 or len(b) <= cap
    if cap == 0 and fit == "first" and lengths:
        # FFD uses at most 11/9 OPT + 6/9 bins (Dosa 2007), and OPT >= the volume bound.
        assert len(bins) <= math.ceil(11 / 9 * max(1, math.ceil(sum(lengths) / capacity)) + 6 / 9) + 1
    assert assign(lengths, capacity, max_segments=cap, fit=fit) == bins  # deterministic


def test_assign_first_fit_decreasing_example():
    """The lucidrains README example (p = 32): 64, 16, 32, 32, 16 patches. Into 64, first-fit decreasing
    gives [64], [32, 32], [16, 16] where na_vit.py's next-fit in input order gives [64], [16, 32],
    [32, 16]: 3 sequences either way. Into 128: [64, 32, 32], [16, 16], 2 sequences, as next-fit's
    [112, 48]; 37.5% padding against 128 (lucidrains pads to the longest row, 112: 28.6%)."""
    lengths = [64, 16, 32, 32, 16]
    assert assign(lengths, 64) == [[0], [2, 3], [1, 4]]
    assert assign(lengths, 128) == [[0, 2, 3], [1, 4]]
    assert simulate(lengths, 128, buffer=5).summary()["padding_fraction"] == pytest.approx(96 / 256)


def test_best_fit_differs_from_first_fit():
    """Decreasing order 7, 5, 4, 1 into 10: both open [7] and [5, 4]; the 1 goes to the first sequence
    with room under first fit ([7, 1]) and to the fullest one under best fit ([5, 4, 1])."""
    lengths = [5, 7, 4, 1]
    assert assign(lengths, 10, fit="first") == [[1, 3], [0, 2]]
    assert assign(lengths, 10, fit="best") == [[1], [0, 2, 3]]


def test_assign_refuses_items_that_do_not_fit():
    with pytest.raises(ValueError, match="outside"):
        assign([5, 11], 10)
    with pytest.raises(ValueError, match="outside"):
        assign([0], 10)


def test_split_lengths_and_groups():
    assert split_lengths(10, 4) == [4, 4, 2]
    assert split_lengths(8, 4) == [4, 4]
    assert split_lengths(10, 6, unit=4) == [4, 4, 2]
    shards = [{"records": 3, "bytes": 10}] * 5 + [{"records": 50, "bytes": 10}, {"records": 1, "bytes": 10}]
    assert group_shards(shards, max_images=7, max_bytes=1000) == [[0, 1], [2, 3], [4], [5], [6]]
    assert group_shards(shards, max_images=1000, max_bytes=25) == [[0, 1], [2, 3], [4, 5], [6]]


# ---------------------------------------------------------------------------------------------------------
# Padding on a realistic size distribution


def realistic_sizes(count: int, seed: int = 0) -> list[tuple[int, int]]:
    """Web-photo-like sizes: common aspect ratios (4:3, 16:9, 1:1, 3:2, portrait ones) with jitter, long
    side log-normal around 900 px (64..6000)."""
    rng = np.random.default_rng(seed)
    ratios = rng.choice(
        [4 / 3, 3 / 4, 16 / 9, 9 / 16, 1.0, 3 / 2, 2 / 3],
        size=count,
        p=[0.3, 0.1, 0.2, 0.05, 0.15, 0.15, 0.05],
    ) * np.exp(rng.normal(0, 0.1, count))
    long = np.clip(np.exp(rng.normal(np.log(900), 0.6, count)), 64, 6000)
    width = np.where(ratios >= 1, long, long * ratios)
    height = np.where(ratios >= 1, long / ratios, long)
    return [(max(1, round(w)), max(1, round(h))) for w, h in zip(width, height, strict=True)]


REALISTIC = [
    ("navit:native<=1024", {"max_patches": 1024, "upscale": False}),
    ("navit:naflex256", {}),
    ("navit:beta-drop", {"max_patches": 1024, "upscale": False, "drop_rate": 0.3, "drop_concentration": 4.0}),
]


@pytest.mark.parametrize(("label", "params"), REALISTIC, ids=[r[0] for r in REALISTIC])
@pytest.mark.parametrize("images_worth", [16, 32, 64])
def test_padding_below_five_percent_from_16_images_worth(label, params, images_worth):
    strategy = vlmtile.get_strategy("navit", **params)
    lengths = [
        strategy.for_image(f"img{i}", 0).plan(w, h).num_tokens
        for i, (w, h) in enumerate(realistic_sizes(5000))
    ]
    n = images_worth * round(float(np.mean(lengths)))
    report = simulate(lengths, n, buffer=DEFAULT_BUFFER).summary()
    assert report["images"] == 5000 and report["too_long"] == 0
    assert report["tokens"] == sum(lengths)
    assert report["padding_tokens"] == report["sequences"] * n - sum(lengths)
    assert 0 <= report["padding_fraction"] < 0.05, (label, images_worth, report["padding_fraction"])
    assert report["images_per_sequence"]["mean"] == pytest.approx(5000 / report["sequences"])


def test_qwen_padding_below_five_percent():
    strategy = vlmtile.get_strategy("qwen2-vl", max_pixels=1003520)
    lengths = [strategy.plan(w, h).shape[0] for w, h in realistic_sizes(3000, seed=1)]
    n = 16 * round(float(np.mean(lengths)) / 4) * 4  # whole merge windows
    report = simulate(lengths, n, buffer=DEFAULT_BUFFER).summary()
    assert report["padding_fraction"] < 0.05


# ---------------------------------------------------------------------------------------------------------
# End to end


def write_images(root: Path, make_image: Any, count: int, seed: int = 0, start: int = 0) -> None:
    """Small images of assorted sizes and aspect ratios (16..200 px sides)."""
    rng = np.random.default_rng(seed)
    for i in range(start, start + count):
        width, height = (int(v) for v in rng.integers(16, 200, size=2))
        save_image(make_image(width, height, "RGB", i), root / f"img{i:04d}.png", "PNG")


def preprocess(src: Path, out: Path, strategy: vlmtile.Strategy, **options: Any) -> None:
    config = vlmtile.RunConfig(
        inputs=(str(src),), output=str(out), strategy=strategy, progress=False, workers=1, **options
    )
    vlmtile.preprocess(config)


NAVIT = {"max_patches": 0, "max_side": 160, "upscale": False, "drop_rate": 0.25, "seed": 3}


@pytest.fixture(scope="module")
def navit_input(tmp_path_factory: pytest.TempPathFactory, make_image: Any) -> Path:
    root = tmp_path_factory.mktemp("navit")
    write_images(root / "src", make_image, 120)
    preprocess(root / "src", root / "tiles", vlmtile.get_strategy("navit", **NAVIT), shard_size=16)
    return root / "tiles"


@pytest.fixture(scope="module")
def qwen_input(tmp_path_factory: pytest.TempPathFactory, make_image: Any) -> Path:
    root = tmp_path_factory.mktemp("qwen")
    write_images(root / "src", make_image, 40, seed=1)
    strategy = vlmtile.get_strategy("qwen2-vl", max_pixels=50176)
    preprocess(root / "src", root / "tiles", strategy, shard_size=16, format="webdataset", dtype="float32")
    return root / "tiles"


def stored_images(tiles: Path) -> dict[str, dict[str, Any]]:
    return {r["key"]: r for r in vlmtile.open_dataset(tiles, as_stored=True)}


def check_packed(out: Path, tiles: Path, n: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The packed directory holds every input image's rows exactly once; returns (records, manifest)."""
    images = stored_images(tiles)
    strategy = vlmtile.open_dataset(tiles).strategy
    records = list(vlmtile.open_dataset(out, as_stored=True))
    parts: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        ids, cu, positions = record["segment_ids"], record["cu_seqlens"], record["positions"]
        assert record["pixel_values"].shape == (n, images[record["keys"][0]]["pixel_values"].shape[1])
        assert ids.dtype == cu.dtype == positions.dtype == np.int32
        assert ids.shape == (n,) and positions.shape == (n, 2)
        lengths = np.diff(cu)
        assert cu[0] == 0 and (lengths > 0).all() and len(cu) == record["num_segments"] + 1
        expected_ids = np.concatenate(
            [np.repeat(np.arange(1, len(lengths) + 1), lengths), np.zeros(n - cu[-1])]
        )
        assert np.array_equal(ids, expected_ids)  # segment ids and cu_seqlens agree
        assert record["num_tokens"] == cu[-1] and record["num_padding"] == n - cu[-1]
        assert not record["pixel_values"][cu[-1] :].any() and not positions[cu[-1] :].any()  # zero padding
        mask = attention_mask(ids)
        assert mask.sum() == int((lengths**2).sum())  # block-diagonal, padding masked
        for part in unpack(record):
            parts.setdefault(part["key"], []).append(part)
    assert sorted(parts) == sorted(images)  # nothing lost
    for key, image in images.items():
        pieces = sorted(parts[key], key=lambda p: p["offset"])
        rows = np.concatenate([p["pixel_values"] for p in pieces])
        assert np.array_equal(rows, image["pixel_values"])  # bit for bit, nothing duplicated
        assert [p["offset"] for p in pieces] == list(
            np.cumsum([0] + [len(p["pixel_values"]) for p in pieces])[:-1]
        )
        positions = np.concatenate([p["positions"] for p in pieces])
        assert np.array_equal(positions, strategy.patch_positions(image))
        assert all(p["grid_hw"] == strategy.patch_grid(image) for p in pieces)
    return records, read_manifest(out)


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_navit_round_trip(navit_input: Path, tmp_path: Path, fmt: str):
    n = 16 * 96  # ~16 images' worth
    out = tmp_path / "packed"
    summary = pack(PackConfig(str(navit_input), str(out), n, format=fmt, progress=False))
    records, manifest = check_packed(out, navit_input, n)
    assert summary.failures == 0 and summary.sequences == len(records) == manifest["totals"]["records"]
    report = manifest["report"]
    assert report == summary.report
    assert report["images"] == manifest["totals"]["images"] == manifest["totals"]["inputs"] == 120
    assert report["tokens"] == sum(r["num_tokens"] for r in stored_images(navit_input).values())
    assert report["padding_tokens"] == sum(r["num_padding"] for r in records)
    assert report["padding_fraction"] == pytest.approx(report["padding_tokens"] / (len(records) * n))
    assert Counter(r["num_segments"] for r in records) == Counter(
        {int(k): v for k, v in report["images_per_sequence"]["histogram"].items()}
    )
    assert manifest["layout"] == "packed" and manifest["strategy"]["name"] == "navit"
    # Positions are each image's grid: the kept patches' (row, col) in raster order.
    for record in records[:3]:
        for part in unpack(record):
            rows, cols = part["grid_hw"]
            flat = part["positions"][:, 0] * cols + part["positions"][:, 1]
            assert (np.diff(flat) > 0).all() and flat.max() < rows * cols
    fractional = fractional_positions(records[0])
    assert fractional.dtype == np.float32 and (fractional >= 0).all() and (fractional < 1).all()
    grids = np.asarray(records[0]["grid_hw"])[records[0]["segment_ids"][: records[0]["num_tokens"]] - 1]
    np.testing.assert_allclose(
        fractional[: records[0]["num_tokens"]] * grids, records[0]["positions"][: records[0]["num_tokens"]]
    )
    assert verify(str(out)).ok


def test_collate_batches_packed_sequences(navit_input: Path, tmp_path: Path):
    n = 512
    out = tmp_path / "packed"
    pack(PackConfig(str(navit_input), str(out), n, progress=False))
    records = list(vlmtile.open_dataset(out))[:3]
    batch = collate(records)  # packed records go to collate_packed
    assert batch["pixel_values"].shape == (3, n, 768) and batch["segment_ids"].shape == (3, n)
    assert batch["positions"].shape == (3, n, 2)
    assert batch["keys"] == [r["keys"] for r in records]
    # cu_seqlens over the flattened (3 * n) rows: a boundary wherever the segment changes, padding included.
    flat = np.concatenate([r["segment_ids"].astype(np.int64) + 1000 * b for b, r in enumerate(records)])
    changes = np.flatnonzero(np.diff(flat)) + 1
    cu = batch["cu_seqlens"]
    assert cu.dtype == np.int32 and cu[0] == 0 and cu[-1] == 3 * n
    assert np.array_equal(cu[1:-1], changes)
    with pytest.raises(ValueError, match="must not mix"):
        collate([records[0], next(iter(vlmtile.open_dataset(navit_input)))])


def test_float32_reading_normalizes_like_the_strategy(navit_input: Path, tmp_path: Path):
    out = tmp_path / "packed"
    pack(PackConfig(str(navit_input), str(out), 2048, progress=False))
    stored = next(iter(vlmtile.open_dataset(out, as_stored=True)))
    read = next(iter(vlmtile.open_dataset(out)))
    assert read["pixel_values"].dtype == np.float32
    assert np.array_equal(read["pixel_values"], stored["pixel_values"].astype(np.float32))  # float16 stored


def reference_qwen_positions(t: int, h: int, w: int, merge: int) -> np.ndarray:
    """transformers' `get_vision_position_ids` for one image (vision_utils.py), restated with numpy."""
    hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    shape = (h // merge, merge, w // merge, merge)
    hpos = hpos.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    wpos = wpos.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    return np.tile(np.stack([hpos, wpos], axis=-1), (t, 1))


def test_qwen_round_trip_keeps_grid_thw_and_merge_window_positions(qwen_input: Path, tmp_path: Path):
    n = 1024
    out = tmp_path / "packed"
    pack(PackConfig(str(qwen_input), str(out), n, progress=False))
    records, manifest = check_packed(out, qwen_input, n)
    images = stored_images(qwen_input)
    for record in records:
        assert len(record["image_grid_thw"]) == record["num_segments"]
        for part in unpack(record):
            thw = tuple(images[part["key"]]["image_grid_thw"])
            assert part["image_grid_thw"] == thw and part["grid_hw"] == thw[1:]
            assert np.array_equal(part["positions"], reference_qwen_positions(*thw, 2))
        # transformers' cu_seqlens for these grids: [0] + cumsum(h * w per frame).
        thw = np.asarray(record["image_grid_thw"])
        expected = np.concatenate([[0], np.cumsum(np.repeat(thw[:, 1] * thw[:, 2], thw[:, 0]))])
        assert np.array_equal(record["cu_seqlens"], expected)
        assert all(length % 4 == 0 for length in np.diff(record["cu_seqlens"]))  # whole merge windows
    assert manifest["metadata_fields"] == {"image_grid_thw": "list<int>"}


def test_qwen_needs_whole_merge_windows_and_refuses_split(qwen_input: Path, tmp_path: Path):
    with pytest.raises(vlmtile.VlmtileError, match="multiple of 4"):
        pack(PackConfig(str(qwen_input), str(tmp_path / "a"), 1022))
    with pytest.raises(vlmtile.VlmtileError, match="cannot be split"):
        pack(PackConfig(str(qwen_input), str(tmp_path / "b"), 1024, split_long=True))


def test_too_long_images_are_error_records_never_truncated(navit_input: Path, tmp_path: Path):
    images = stored_images(navit_input)
    n = 60
    long = sorted(k for k, r in images.items() if r["num_tokens"] > n)
    assert long  # the fixture has images above 60 patches
    out = tmp_path / "packed"
    summary = pack(PackConfig(str(navit_input), str(out), n, progress=False))
    errors = read_errors(out)
    assert [e["key"] for e in errors] == long and {e["stage"] for e in errors} == {"pack"}
    assert all("more than --max-seq-len 60" in e["reason"] for e in errors)
    manifest = read_manifest(out)
    assert (
        manifest["totals"]["images"] + manifest["totals"]["failures"] == manifest["totals"]["inputs"] == 120
    )
    assert summary.report["too_long"] == len(long) == summary.failures
    packed = {part["key"] for record in vlmtile.open_dataset(out) for part in unpack(record)}
    assert packed == set(images) - set(long)
    assert verify(str(out)).ok


def test_split_long_images_reassemble(navit_input: Path, tmp_path: Path):
    n = 60
    out = tmp_path / "packed"
    summary = pack(PackConfig(str(navit_input), str(out), n, split_long=True, progress=False))
    assert summary.failures == 0 and summary.report["split"] > 0
    check_packed(out, navit_input, n)  # every image, split ones included, comes back whole


def test_max_images_per_sequence(navit_input: Path, tmp_path: Path):
    out = tmp_path / "packed"
    pack(PackConfig(str(navit_input), str(out), 4096, max_images=5, progress=False))
    records, _ = check_packed(out, navit_input, 4096)
    assert max(r["num_segments"] for r in records) == 5


def sha256s(out: Path) -> list[str]:
    return [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in shard_paths(out)]


def test_deterministic_bytes_whatever_the_workers(navit_input: Path, tmp_path: Path):
    config = {"max_seq_len": 1024, "buffer": 40, "progress": False}  # several groups, several tasks
    one = tmp_path / "one"
    two = tmp_path / "two"
    pack(PackConfig(str(navit_input), str(one), workers=1, **config))
    pack(PackConfig(str(navit_input), str(two), workers=2, **config))
    tasks = (one / "_plan.jsonl").read_text().splitlines()
    assert len(tasks) == 4  # 8 input shards of 16, 16, ..., 8 images: groups of at most 40 images
    assert [len(json.loads(t)["sources"]) for t in tasks] == [2, 2, 2, 2]
    assert sha256s(one) == sha256s(two)
    assert read_manifest(one)["report"] == read_manifest(two)["report"]


def test_same_seed_same_bytes_other_seed_other_drops(tmp_path: Path, make_image: Any):
    write_images(tmp_path / "src", make_image, 10)
    outs = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        preprocess(
            tmp_path / "src", tmp_path / name, vlmtile.get_strategy("navit", **{**NAVIT, "seed": seed})
        )
        pack(PackConfig(str(tmp_path / name), str(tmp_path / f"p{name}"), 512, progress=False))
        outs.append(tmp_path / f"p{name}")
    assert sha256s(outs[0]) == sha256s(outs[1])
    assert sha256s(outs[0]) != sha256s(outs[2])


def test_resume_after_a_failed_task_gives_the_same_bytes(
    navit_input: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    config = {"max_seq_len": 1024, "buffer": 40, "progress": False}
    clean = tmp_path / "clean"
    pack(PackConfig(str(navit_input), str(clean), **config))
    real = pack_module.pack_task

    def failing(task: Any, progress: Any) -> Any:
        if task.index == 1:
            raise OSError(5, "Input/output error")
        return real(task, progress)

    monkeypatch.setattr(pack_module, "pack_task", failing)
    out = tmp_path / "resumed"
    with pytest.raises(vlmtile.RunStopped, match="task 1 failed"):
        pack(PackConfig(str(navit_input), str(out), **config))
    manifest = read_manifest(out)
    assert manifest["complete"] is False and manifest["pending_tasks"] == 3  # task 1 failed, 2 and 3 waited
    assert len(manifest["shards"]) == 1  # task 0's file only: names stop at the first unfinished task
    assert not verify(str(out)).ok
    monkeypatch.setattr(pack_module, "pack_task", real)
    summary = pack(PackConfig(str(navit_input), str(out), **config))
    assert summary.complete
    assert sha256s(out) == sha256s(clean)
    assert verify(str(out)).ok


def test_new_input_shards_are_packed_in_new_groups(tmp_path: Path, make_image: Any):
    strategy = vlmtile.get_strategy("navit", **NAVIT)
    write_images(tmp_path / "src", make_image, 20)
    preprocess(tmp_path / "src", tmp_path / "tiles", strategy, shard_size=10)
    out = tmp_path / "packed"
    first = pack(PackConfig(str(tmp_path / "tiles"), str(out), 512, progress=False))
    before = sha256s(out)
    write_images(tmp_path / "src", make_image, 10, seed=5, start=20)  # cron brings more images
    preprocess(tmp_path / "src", tmp_path / "tiles", strategy, shard_size=10)
    again = pack(PackConfig(str(tmp_path / "tiles"), str(out), 512, progress=False))
    assert sha256s(out)[: len(before)] == before  # existing shards untouched
    assert again.report["images"] == first.report["images"] + 10 == 30
    check_packed(out, tmp_path / "tiles", 512)
    assert read_manifest(out)["runs"] == 2
    after = sha256s(out)
    idle = pack(PackConfig(str(tmp_path / "tiles"), str(out), 512, progress=False))  # nothing new
    assert idle.report == again.report and sha256s(out) == after


def test_other_settings_and_rebuilt_input_are_refused(tmp_path: Path, make_image: Any):
    write_images(tmp_path / "src", make_image, 8)
    preprocess(tmp_path / "src", tmp_path / "tiles", vlmtile.get_strategy("navit", **NAVIT))
    out = tmp_path / "packed"
    pack(PackConfig(str(tmp_path / "tiles"), str(out), 512, progress=False))
    with pytest.raises(vlmtile.VlmtileError, match="other settings"):
        pack(PackConfig(str(tmp_path / "tiles"), str(out), 1024, progress=False))
    # The input rebuilt with the same settings but other images: same config hash, other shard bytes.
    for path in (tmp_path / "src").glob("*.png"):
        path.unlink()
    write_images(tmp_path / "src", make_image, 8, seed=9)
    vlmtile.preprocess(
        vlmtile.RunConfig(
            inputs=(str(tmp_path / "src"),),
            output=str(tmp_path / "tiles"),
            strategy=vlmtile.get_strategy("navit", **NAVIT),
            progress=False,
            workers=1,
            overwrite=True,
        )
    )
    with pytest.raises(vlmtile.VlmtileError, match="changed since it was packed"):
        pack(PackConfig(str(tmp_path / "tiles"), str(out), 512, progress=False))
    rebuilt = pack(PackConfig(str(tmp_path / "tiles"), str(out), 512, overwrite=True, progress=False))
    assert rebuilt.report["images"] == 8


def test_inputs_that_cannot_be_packed(tmp_path: Path, make_image: Any):
    write_images(tmp_path / "src", make_image, 3)
    preprocess(tmp_path / "src", tmp_path / "internvl", vlmtile.get_strategy("internvl", max_tiles=1))
    with pytest.raises(vlmtile.VlmtileError, match="not patch sequences"):
        pack(PackConfig(str(tmp_path / "internvl"), str(tmp_path / "a"), 1024))
    preprocess(tmp_path / "src", tmp_path / "meta", vlmtile.get_strategy("navit"), pixels=False)
    with pytest.raises(vlmtile.VlmtileError, match="no-pixels"):
        pack(PackConfig(str(tmp_path / "meta"), str(tmp_path / "b"), 1024))
    with pytest.raises(vlmtile.VlmtileError, match="not a finished"):
        pack(PackConfig(str(tmp_path / "src"), str(tmp_path / "c"), 1024))
    preprocess(tmp_path / "src", tmp_path / "ok", vlmtile.get_strategy("navit"))
    pack(PackConfig(str(tmp_path / "ok"), str(tmp_path / "packed"), 1024, progress=False))
    with pytest.raises(vlmtile.VlmtileError, match="already packed"):
        pack(PackConfig(str(tmp_path / "packed"), str(tmp_path / "d"), 1024))
    with pytest.raises(vlmtile.VlmtileError, match="must not be the input"):
        pack(PackConfig(str(tmp_path / "ok"), str(tmp_path / "ok"), 1024))


def test_sample_layout_segments_are_images_of_samples(tmp_path: Path, make_image: Any):
    """A manifest with a two-image sample: each image is a segment, `images` says which one."""
    write_images(tmp_path / "img", make_image, 3)
    lines = [
        {"id": "a", "images": ["img0000.png", "img0001.png"], "text": "two"},
        {"id": "b", "images": ["img0002.png"], "text": "one"},
    ]
    manifest = tmp_path / "img" / "train.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    preprocess(manifest, tmp_path / "tiles", vlmtile.get_strategy("navit", **NAVIT))
    pack(PackConfig(str(tmp_path / "tiles"), str(tmp_path / "packed"), 1024, progress=False))
    (record,) = list(vlmtile.open_dataset(tmp_path / "packed", as_stored=True))
    samples = {r["key"]: r for r in vlmtile.open_dataset(tmp_path / "tiles", as_stored=True)}
    got = {(p["key"], p["image"]): p["pixel_values"] for p in unpack(record)}
    assert sorted(got) == [("a", 0), ("a", 1), ("b", 0)]
    for (key, image), rows in got.items():
        assert np.array_equal(rows, samples[key]["pixel_values"][image])


# ---------------------------------------------------------------------------------------------------------
# docs/packing.md, stats --pack-len, verify, CLI


def test_packing_doc_examples_run(tmp_path: Path, make_image: Any, monkeypatch: pytest.MonkeyPatch):
    """Every Python block of docs/packing.md runs as written, on `tiles/` (navit, token dropping, one image
    long enough to be split) and `packed/` in the current directory."""
    write_images(tmp_path / "src", make_image, 30)
    save_image(make_image(400, 300, "RGB", 99), tmp_path / "src" / "big.png", "PNG")
    monkeypatch.chdir(tmp_path)
    preprocess(Path("src"), Path("tiles"), vlmtile.get_strategy("navit", **{**NAVIT, "max_side": 400}))
    summary = pack(PackConfig("tiles", "packed", 256, split_long=True, progress=False))
    assert summary.report["split"] == 1  # the example meets a split image
    text = (Path(__file__).resolve().parent.parent / "docs" / "packing.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    assert len(blocks) == 3
    for block in blocks:
        exec(compile(block, "docs/packing.md", "exec"), {})  # the documentation's own code


def test_stats_pack_len_predicts_the_pack_report(navit_input: Path, tmp_path: Path):
    out = tmp_path / "packed"
    summary = pack(PackConfig(str(navit_input), str(out), 1024, progress=False))
    exact = stats_from_output(str(navit_input), pack_len=1024).to_json()["strategies"][0]["pack"]
    assert exact == summary.report
    # From headers alone: one buffer here, the same order and the same lengths, so the same numbers.
    src = navit_input.parent / "src"
    strategy = vlmtile.get_strategy("navit", **NAVIT)
    headers = compute_stats([str(src)], [Column("navit", strategy)], pack_len=1024).to_json()
    assert headers["pack_len"] == 1024
    assert headers["strategies"][0]["pack"] == summary.report
    internvl = compute_stats([str(src)], [Column("internvl", vlmtile.get_strategy("internvl"))], pack_len=64)
    assert internvl.to_json()["strategies"][0]["pack"] is None  # tiles are not sequences


def test_pack_report_merges():
    a = simulate([3, 3, 3], 4, buffer=10)
    b = simulate([2, 2], 4, buffer=10)
    merged = (a + b).summary()
    assert (merged["sequences"], merged["tokens"], merged["padding_tokens"]) == (4, 13, 3)
    assert PackReport.from_summary(merged).summary() == merged


def run(*args: Any) -> Any:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_cli_pack_exit_codes_and_summary(navit_input: Path, tmp_path: Path):
    ok = run("pack", navit_input, "-o", tmp_path / "a", "--max-seq-len", "2048")
    assert ok.exit_code == 0, ok.output
    assert ok.stdout.startswith("vlmtile pack: 120 images -> ") and "padding" in ok.stdout
    assert run("verify", tmp_path / "a").exit_code == 0
    some_failed = run("pack", navit_input, "-o", tmp_path / "b", "--max-seq-len", "60", "-q")
    assert some_failed.exit_code == 3
    assert "images were not packed" in some_failed.stderr and some_failed.stdout == ""
    bad = run("pack", navit_input, "-o", tmp_path / "c", "--max-seq-len", "0")
    assert bad.exit_code == 2
    not_packable = run("pack", tmp_path / "a", "-o", tmp_path / "d", "--max-seq-len", "64")
    assert not_packable.exit_code == 2 and "already packed" in not_packable.stderr
    other = run("pack", navit_input, "-o", tmp_path / "a", "--max-seq-len", "1024")
    assert other.exit_code == 1 and "other settings" in other.stderr
    stats = run("stats", navit_input, "--pack-len", "2048", "--json")
    assert json.loads(stats.stdout)["strategies"][0]["pack"] == read_manifest(tmp_path / "a")["report"]
    refused = run("stats", tmp_path / "a")
    assert refused.exit_code == 1 and "packed sequences" in refused.stderr
    qwen_len = run("stats", navit_input.parent / "src", "-s", "qwen2-vl", "--pack-len", "1022")
    assert qwen_len.exit_code == 2 and "multiple of 4" in qwen_len.stderr
