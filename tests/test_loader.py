"""vlmtile.loader: `collate` against `Strategy.process` on real outputs of both formats, the shard split's
properties, and the PyTorch IterableDataset under a real multi-worker DataLoader (skipped without torch).
"""

from __future__ import annotations

import json
import pickle
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from e2e_helpers import MakeImage, save_image
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

import vlmtile
from vlmtile.dtypes import bfloat16
from vlmtile.loader import collate, collate_torch, split_shards, torch_dataset

BFLOAT16 = bfloat16()

IMAGES = (
    ("pano", 500, 180),
    ("photo", 640, 480),
    ("square", 120, 120),
    ("tall", 200, 500),
    ("wide", 300, 200),
)
"""(stem, width, height), in the order the records come out (sorted paths); seeded by width."""
KEYS = [f"{stem}_png" for stem, _, _ in IMAGES]
SHARD_KEYS = (KEYS[0:2], KEYS[2:4], KEYS[4:5])
"""The keys of each shard at shard_size=2."""
FORMATS = ("parquet", "webdataset")
INTERNVL = vlmtile.get_strategy("internvl", max_tiles=2)
QWEN = vlmtile.get_strategy("qwen2-vl")
XCOMPOSER_4KHD = vlmtile.get_strategy("xcomposer2-4khd", hd_num=4)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory, make_image: MakeImage) -> Path:
    root = tmp_path_factory.mktemp("in")
    for stem, width, height in IMAGES:
        save_image(make_image(width, height, "RGB", width), root / f"{stem}.png", "PNG")
    return root


def build(
    source: Path, out: Path, strategy: vlmtile.Strategy, fmt: str, dtype: str = "float32", **kwargs: Any
) -> Path:
    config = vlmtile.RunConfig(
        inputs=(str(source),),
        output=str(out),
        strategy=strategy,
        format=fmt,
        dtype=dtype,
        workers=1,
        shard_size=2,
        progress=False,
        **kwargs,
    )
    vlmtile.preprocess(config)
    return out


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory, folder: Path) -> dict[tuple[str, str], Path]:
    """(strategy, format) -> a finished output directory of the five images in three shards."""
    root = tmp_path_factory.mktemp("out")
    built = {}
    for strategy in (INTERNVL, QWEN):
        for fmt in FORMATS:
            built[strategy.name, fmt] = build(folder, root / f"{strategy.name}-{fmt}", strategy, fmt)
    built[XCOMPOSER_4KHD.name, "parquet"] = build(folder, root / "xc", XCOMPOSER_4KHD, "parquet")
    return built


def processed(folder: Path, strategy: vlmtile.Strategy, key: str) -> vlmtile.Result:
    stem = key.removesuffix("_png")
    with Image.open(folder / f"{stem}.png") as image:
        return strategy.process(image)


# -- collate on real outputs ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_collate_internvl_concatenates_tiles_exactly(
    outputs: dict[tuple[str, str], Path], folder: Path, fmt: str
) -> None:
    records = list(vlmtile.open_dataset(outputs["internvl", fmt]))
    batch = collate(records)
    expected = np.concatenate([processed(folder, INTERNVL, key).pixel_values for key in KEYS])
    assert expected.shape == (9, 3, 448, 448)
    assert batch["pixel_values"].dtype == np.float32
    assert np.array_equal(batch["pixel_values"], expected)
    assert batch["keys"] == KEYS
    assert batch["num_tiles"] == [3, 1, 1, 3, 1]  # max_tiles=2: a 1x2 / 2x1 grid plus the thumbnail
    assert batch["split_sizes"] == [3, 1, 1, 3, 1]
    assert batch["images_per_record"] == [1, 1, 1, 1, 1]
    assert "image_grid_thw" not in batch
    assert batch["orig_width"] == [500, 640, 120, 200, 300]
    assert batch["grid"] == [[2, 1], [1, 1], [1, 1], [1, 2], [1, 1]]
    assert batch["shape"] == [[n, 3, 448, 448] for n in (3, 1, 1, 3, 1)]
    assert batch["num_tokens"] == [768, 256, 256, 768, 256]
    assert batch["source"] == [str(folder / f"{stem}.png") for stem, _, _ in IMAGES]
    per_image = np.split(batch["pixel_values"], np.cumsum(batch["split_sizes"])[:-1])
    for array, record in zip(per_image, records, strict=True):
        assert np.array_equal(array, record["pixel_values"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_collate_qwen_concatenates_patches_and_stacks_grid_thw(
    outputs: dict[tuple[str, str], Path], folder: Path, fmt: str
) -> None:
    records = list(vlmtile.open_dataset(outputs["qwen2-vl", fmt]))
    batch = collate(records)
    expected = np.concatenate([processed(folder, QWEN, key).pixel_values for key in KEYS])
    assert expected.shape == (2872, 1176)
    assert np.array_equal(batch["pixel_values"], expected)
    thw = batch["image_grid_thw"]
    assert thw.dtype == np.int64
    assert thw.tolist() == [[1, 12, 36], [1, 34, 46], [1, 8, 8], [1, 36, 14], [1, 14, 22]]
    # One "tile" per image for Qwen, but t*h*w patch rows: what the model splits pixel_values by.
    assert batch["num_tiles"] == [1, 1, 1, 1, 1]
    assert batch["split_sizes"] == [432, 1564, 64, 504, 308]
    assert batch["split_sizes"] == thw.prod(axis=1).tolist()
    assert batch["num_tokens"] == [108, 391, 16, 126, 77]  # patches / merge_size**2


def test_collate_two_records_of_a_batch_in_record_order(outputs: dict[tuple[str, str], Path]) -> None:
    records = list(vlmtile.open_dataset(outputs["internvl", "parquet"]))
    batch = collate([records[3], records[0]])
    assert batch["keys"] == ["tall_png", "pano_png"]
    assert batch["pixel_values"].shape == (6, 3, 448, 448)
    assert np.array_equal(batch["pixel_values"][:3], records[3]["pixel_values"])
    assert np.array_equal(batch["pixel_values"][3:], records[0]["pixel_values"])


def test_collate_xcomposer_canvases_of_different_sizes_stay_a_list(
    outputs: dict[tuple[str, str], Path], folder: Path
) -> None:
    records = list(vlmtile.open_dataset(outputs["xcomposer2-4khd", "parquet"]))
    batch = collate(records)
    pixels = batch["pixel_values"]
    assert isinstance(pixels, list)
    assert [a.shape for a in pixels] == [
        (3, 336, 672),
        (3, 672, 672),
        (3, 672, 672),
        (3, 672, 336),
        (3, 672, 672),
    ]
    for array, key in zip(pixels, KEYS, strict=True):
        assert np.array_equal(array, processed(folder, XCOMPOSER_4KHD, key).pixel_values)
    assert "split_sizes" not in batch
    assert batch["num_tiles"] == [3, 5, 5, 3, 5]
    assert batch["content_box"][0] == [0, 47, 672, 288]  # the 500x180 pano, letterboxed


def test_collate_same_size_canvases_stack_as_images_not_channels(
    outputs: dict[tuple[str, str], Path],
) -> None:
    records = list(vlmtile.open_dataset(outputs["xcomposer2-4khd", "parquet"]))
    same = [records[1], records[2], records[4]]  # photo, square, wide: all 672x672 canvases
    batch = collate(same)
    assert batch["pixel_values"].shape == (3, 3, 672, 672)  # (images, channels, H, W), never (9, 672, 672)
    assert batch["split_sizes"] == [1, 1, 1]
    for i, record in enumerate(same):
        assert np.array_equal(batch["pixel_values"][i], record["pixel_values"])


def test_collate_as_stored_bfloat16_keeps_the_stored_bits(tmp_path: Path, folder: Path) -> None:
    out = build(folder, tmp_path / "bf16", INTERNVL, "webdataset", dtype="bfloat16")
    records = list(vlmtile.open_dataset(out, as_stored=True))
    batch = collate(records)
    assert batch["pixel_values"].dtype == BFLOAT16
    float32 = np.concatenate([processed(folder, INTERNVL, key).pixel_values for key in KEYS])
    assert np.array_equal(batch["pixel_values"].view(np.uint16), float32.astype(BFLOAT16).view(np.uint16))


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory, folder: Path) -> Path:
    """A JSONL manifest: two images, one image, and a text-only sample."""
    path = tmp_path_factory.mktemp("manifest") / "train.jsonl"
    lines = [
        {"id": "a", "images": [str(folder / "wide.png"), str(folder / "tall.png")], "text": "two"},
        {"id": "b", "images": [str(folder / "photo.png")], "text": "one"},
        {"id": "c", "images": [], "text": "none"},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.mark.parametrize("fmt", FORMATS)
def test_collate_sample_layout_output(tmp_path: Path, folder: Path, manifest: Path, fmt: str) -> None:
    out = build(manifest, tmp_path / "samples", QWEN, fmt)
    records = list(vlmtile.open_dataset(out))
    batch = collate(records)
    expected = np.concatenate(
        [processed(folder, QWEN, key).pixel_values for key in ("wide", "tall", "photo")]
    )
    assert np.array_equal(batch["pixel_values"], expected)
    assert batch["keys"] == ["a", "b", "c"]
    assert batch["images_per_record"] == [2, 1, 0]
    assert batch["num_tiles"] == [1, 1, 1]
    assert batch["split_sizes"] == [308, 504, 1564]
    assert batch["image_grid_thw"].tolist() == [[1, 14, 22], [1, 36, 14], [1, 34, 46]]
    assert batch["num_tokens"] == [77 + 126, 391, 0]  # per record: the sums over its images
    assert [s["text"] for s in batch["sample"]] == ["two", "one", "none"]

    metadata_only = build(manifest, tmp_path / "plans", QWEN, fmt, pixels=False)
    plans = collate(list(vlmtile.open_dataset(metadata_only)))
    assert "pixel_values" not in plans
    assert "split_sizes" not in plans
    assert plans["image_grid_thw"].tolist() == batch["image_grid_thw"].tolist()
    assert plans["images_per_record"] == [2, 1, 0]
    assert plans["num_tokens"] == batch["num_tokens"]


# -- collate on sample-layout and hand-made records -------------------------------------------------------


def tiles(n: int, start: int) -> np.ndarray:
    return np.arange(start, start + n * 3 * 2 * 2, dtype=np.float32).reshape(n, 3, 2, 2)


def image_meta(num_tiles: int, **extra: Any) -> dict[str, Any]:
    return {"name": "image", "source": "x", "num_tiles": num_tiles, "num_tokens": 4 * num_tiles, **extra}


def sample(key: str, arrays: list[np.ndarray], metas: list[dict[str, Any]], text: str) -> dict[str, Any]:
    return {
        "key": key,
        "source": f"train.jsonl:{key}",
        "orig_key": None,
        "num_images": len(arrays),
        "num_tiles": sum(m["num_tiles"] for m in metas),
        "num_tokens": sum(m["num_tokens"] for m in metas),
        "dtype": "float32",
        "pixel_values": arrays,
        "images": metas,
        "sample": {"text": text},
    }


def test_collate_sample_layout_flattens_images_in_order() -> None:
    a, b, c = tiles(2, 0), tiles(3, 1000), tiles(1, 5000)
    records = [
        sample("s0", [a, b], [image_meta(2), image_meta(3)], "two images"),
        sample("s1", [], [], "text only"),
        sample("s2", [c], [image_meta(1)], "one image"),
    ]
    batch = collate(records)
    assert np.array_equal(batch["pixel_values"], np.concatenate([a, b, c]))
    assert batch["pixel_values"][2, 0, 0, 0] == 1000.0
    assert batch["num_tiles"] == [2, 3, 1]  # per image, not the records' sums
    assert batch["split_sizes"] == [2, 3, 1]
    assert batch["images_per_record"] == [2, 0, 1]
    assert batch["keys"] == ["s0", "s1", "s2"]
    assert batch["num_images"] == [2, 0, 1]
    assert batch["num_tokens"] == [20, 0, 4]
    assert batch["sample"] == [{"text": "two images"}, {"text": "text only"}, {"text": "one image"}]
    assert batch["images"][0] == [image_meta(2), image_meta(3)]
    assert batch["orig_key"] == [None, None, None]


def test_collate_sample_layout_qwen_grid_thw_per_image() -> None:
    patches = [np.full((n, 1176), i, dtype=np.float32) for i, n in enumerate((4, 16, 8))]
    thw = [[1, 2, 2], [1, 4, 4], [1, 2, 4]]
    records = [
        sample(
            "a", patches[:2], [image_meta(1, image_grid_thw=thw[0]), image_meta(1, image_grid_thw=thw[1])], ""
        ),
        sample("b", patches[2:], [image_meta(1, image_grid_thw=thw[2])], ""),
    ]
    batch = collate(records)
    assert batch["pixel_values"].shape == (28, 1176)
    assert batch["image_grid_thw"].tolist() == thw
    assert batch["image_grid_thw"].dtype == np.int64
    assert batch["split_sizes"] == [4, 16, 8]


def test_collate_mixed_layouts_fill_missing_fields_with_none() -> None:
    image_record = {
        "key": "img",
        "source": "a.png",
        "pixel_values": tiles(1, 0),
        "num_tiles": 1,
        "grid": [1, 1],
    }
    batch = collate([image_record, sample("s", [tiles(2, 9)], [image_meta(2)], "hi")])
    assert batch["num_tiles"] == [1, 2]
    assert batch["images_per_record"] == [1, 1]
    assert batch["grid"] == [[1, 1], None]
    assert batch["sample"] == [None, {"text": "hi"}]
    assert batch["source"] == ["a.png", "train.jsonl:s"]


def test_collate_text_only_batch_has_no_pixels() -> None:
    batch = collate([sample("t", [], [], "no image")])
    assert batch["pixel_values"] == []
    assert batch["num_tiles"] == []
    assert batch["images_per_record"] == [0]
    assert "split_sizes" not in batch
    assert "image_grid_thw" not in batch


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([], "at least one record"),
        (
            [{"key": "a", "pixel_values": tiles(1, 0), "num_tiles": 1}, {"key": "b", "num_tiles": 1}],
            "1 of 2 records have no pixel_values",
        ),
        ([{"pixel_values": tiles(1, 0), "num_tiles": 1}], "record 0 has no 'key'"),
        ([{"key": "k", "pixel_values": "x", "num_tiles": 1}], "must be an array .* or a list of arrays"),
        ([{"key": "k", "pixel_values": [tiles(1, 0)], "images": []}], r"1 arrays, images: 0"),
        ([{"key": "k", "pixel_values": [tiles(1, 0)]}], "1 arrays, images: none"),
        ([{"key": "k", "pixel_values": [[1.0]], "images": [{}]}], "image 0: expected an array, got list"),
        ([{"key": "k", "pixel_values": [tiles(1, 0)], "images": [1]}], "'images' must be a list of metadata"),
        ([{"key": "k", "pixel_values": tiles(1, 0)}], "no integer 'num_tiles'"),
        ([{"key": "k", "pixel_values": tiles(1, 0), "num_tiles": True}], "no integer 'num_tiles'"),
        (
            [{"key": "k", "pixel_values": np.zeros(5, np.float32), "num_tiles": 1}],
            r"shape \(5,\) is not a vlmtile",
        ),
        (
            [
                {"key": "a", "pixel_values": tiles(1, 0), "num_tiles": 1},
                {"key": "b", "pixel_values": tiles(1, 0).astype(np.float16), "num_tiles": 1},
            ],
            r"different dtypes in one batch: \['float16', 'float32'\]",
        ),
        (
            [
                {
                    "key": "a",
                    "pixel_values": np.zeros((4, 8), np.float32),
                    "num_tiles": 1,
                    "image_grid_thw": [1, 2, 2],
                },
                {"key": "b", "pixel_values": np.zeros((4, 8), np.float32), "num_tiles": 1},
            ],
            "image_grid_thw is present for 1 of 2 images",
        ),
        (
            [
                {
                    "key": "a",
                    "pixel_values": np.zeros((4, 8), np.float32),
                    "num_tiles": 1,
                    "image_grid_thw": [2, 2],
                }
            ],
            r"\(t, h, w\) per image, got an array of shape \(1, 2\)",
        ),
        (
            [{"key": "k", "pixel_values": tiles(1, 0), "num_tiles": 1, "split_sizes": [1]}],
            "field 'split_sizes'",
        ),
    ],
)
def test_collate_refuses(records: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        collate(records)


# -- split_shards -----------------------------------------------------------------------------------------


def test_split_shards_round_robin_over_global_slots() -> None:
    shards = [f"s{i}" for i in range(10)]
    # world_size 2 x 2 workers = 4 slots; rank 1 worker 0 is slot 2.
    assert split_shards(shards, rank=1, world_size=2, worker=0, num_workers=2) == ["s2", "s6"]
    assert split_shards(shards, rank=0, world_size=2, worker=1, num_workers=2) == ["s1", "s5", "s9"]
    assert split_shards(shards, rank=0, world_size=1, worker=0, num_workers=1) == shards
    # Fewer shards than slots: the surplus workers get nothing rather than an error.
    assert split_shards(["s0", "s1"], rank=1, world_size=2, worker=1, num_workers=2) == []
    assert split_shards((), rank=0, world_size=1, worker=0, num_workers=1) == []


@given(
    n=st.integers(0, 60),
    world_size=st.integers(1, 5),
    num_workers=st.integers(1, 5),
)
def test_split_shards_is_a_deterministic_partition(n: int, world_size: int, num_workers: int) -> None:
    shards = [f"shard-{i:05d}.tar" for i in range(n)]
    shares = {
        (rank, worker): split_shards(
            shards, rank=rank, world_size=world_size, worker=worker, num_workers=num_workers
        )
        for rank in range(world_size)
        for worker in range(num_workers)
    }
    every = [shard for share in shares.values() for shard in share]
    assert sorted(every) == shards  # complete and disjoint: each shard exactly once
    sizes = [len(share) for share in shares.values()]
    assert max(sizes) - min(sizes) <= 1
    for (rank, worker), share in shares.items():
        assert share == sorted(share)  # the list's own order within a share
        again = split_shards(
            list(shards), rank=rank, world_size=world_size, worker=worker, num_workers=num_workers
        )
        assert again == share


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 2, "world_size": 2}, r"rank must be in \[0, 2\), got 2"),
        ({"rank": -1}, r"rank must be in \[0, 1\), got -1"),
        ({"worker": 3, "num_workers": 3}, r"worker must be in \[0, 3\), got 3"),
        ({"world_size": 0}, "world_size must be at least 1, got 0"),
        ({"num_workers": 0, "worker": 0}, "num_workers must be at least 1, got 0"),
        ({"rank": 0.0}, "rank must be an int, got 0.0"),
        ({"worker": True}, "worker must be an int, got True"),
    ],
)
def test_split_shards_validates(kwargs: dict[str, Any], message: str) -> None:
    args = {"rank": 0, "world_size": 1, "worker": 0, "num_workers": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        split_shards(["a", "b"], **args)


def test_split_shards_refuses_a_string() -> None:
    with pytest.raises(ValueError, match="not one string"):
        split_shards("shard-00000.tar", rank=0, world_size=1, worker=0, num_workers=1)


# -- PyTorch ----------------------------------------------------------------------------------------------


def test_torch_missing_names_the_install_command(
    monkeypatch: pytest.MonkeyPatch, outputs: dict[tuple[str, str], Path]
) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(ImportError, match="pip install torch"):
        torch_dataset(outputs["internvl", "parquet"])
    with pytest.raises(ImportError, match="pip install torch"):
        collate_torch([{"key": "k", "pixel_values": tiles(1, 0), "num_tiles": 1}])


def keys_of(loader: Any) -> list[str]:
    return [record["key"] for record in loader]


@pytest.mark.parametrize("fmt", FORMATS)
def test_torch_dataloader_two_workers_reads_every_record_once(
    outputs: dict[tuple[str, str], Path], fmt: str
) -> None:
    torch = pytest.importorskip("torch")
    path = outputs["internvl", fmt]
    expected = Counter(r["key"] for r in vlmtile.open_dataset(path))
    loader = torch.utils.data.DataLoader(torch_dataset(path), batch_size=None, num_workers=2)
    records = list(loader)
    assert Counter(r["key"] for r in records) == expected == Counter(KEYS)
    assert {r["key"]: tuple(r["pixel_values"].shape) for r in records}["tall_png"] == (3, 3, 448, 448)


def test_torch_ranks_and_workers_split_the_shards(
    outputs: dict[tuple[str, str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    torch = pytest.importorskip("torch")
    path = outputs["qwen2-vl", "webdataset"]
    per_rank = {}
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        loader = torch.utils.data.DataLoader(torch_dataset(path), batch_size=None, num_workers=2)
        per_rank[rank] = keys_of(loader)
    # 3 shards (pano+photo, square+tall, wide) over 4 slots: rank 0 has shards 0 and 1, rank 1 shard 2.
    assert sorted(per_rank[0]) == ["pano_png", "photo_png", "square_png", "tall_png"]
    assert per_rank[1] == ["wide_png"]
    monkeypatch.delenv("WORLD_SIZE")
    # Explicit placement, read in this process (one worker): 2 slots, rank 1 has shard 1.
    monkeypatch.setenv("RANK", "0")
    assert keys_of(torch_dataset(path, rank=1, world_size=2)) == ["square_png", "tall_png"]


def test_torch_pickle_keeps_the_parents_rank_and_epoch(
    outputs: dict[tuple[str, str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spawned workers get the dataset pickled: the rank found in the parent must travel with it."""
    torch = pytest.importorskip("torch")
    path = outputs["internvl", "parquet"]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    dataset = torch_dataset(path, shuffle_shards=True, seed=7)
    dataset.set_epoch(4)
    copy = pickle.loads(pickle.dumps(dataset))
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert isinstance(copy, torch.utils.data.IterableDataset)
    assert (copy.rank, copy.world_size, copy.epoch, copy.seed) == (1, 3, 4, 7)
    assert copy.shard_order() == dataset.shard_order()
    same = torch_dataset(path, shuffle_shards=True, seed=7, rank=1, world_size=3)
    same.set_epoch(4)
    assert keys_of(copy) == keys_of(same)
    # Rank 1 of 3, read in this process: the second shard of the (seed, epoch) permutation.
    assert keys_of(copy) == SHARD_KEYS[np.random.default_rng((7, 4)).permutation(3)[1]]


def test_torch_forkserver_workers_read_every_record_once(outputs: dict[tuple[str, str], Path]) -> None:
    torch = pytest.importorskip("torch")
    path = outputs["internvl", "webdataset"]
    loader = torch.utils.data.DataLoader(
        torch_dataset(path), batch_size=None, num_workers=2, multiprocessing_context="forkserver"
    )
    assert Counter(keys_of(loader)) == Counter(KEYS)


def test_torch_shuffle_shards_by_seed_and_epoch(outputs: dict[tuple[str, str], Path]) -> None:
    pytest.importorskip("torch")
    path = outputs["internvl", "parquet"]
    dataset = torch_dataset(path, shuffle_shards=True, seed=3)
    shards = vlmtile.open_dataset(path).shard_paths
    orders = []
    for epoch in range(8):
        dataset.set_epoch(epoch)
        keys = keys_of(dataset)
        assert sorted(keys) == KEYS
        assert keys == keys_of(dataset)  # same epoch, same order
        permutation = np.random.default_rng((3, epoch)).permutation(3)
        assert dataset.shard_order() == [shards[i] for i in permutation]
        assert keys == [key for i in permutation for key in SHARD_KEYS[i]]
        orders.append(tuple(permutation))
    assert len(set(orders)) > 1
    unshuffled = torch_dataset(path)
    unshuffled.set_epoch(5)
    assert keys_of(unshuffled) == KEYS


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"rank": 0}, ValueError, "give both rank and world_size"),
        ({"rank": 2, "world_size": 2}, ValueError, r"rank must be in \[0, 2\)"),
        ({"seed": -1}, ValueError, "seed must be non-negative"),
    ],
)
def test_torch_dataset_validates(
    outputs: dict[tuple[str, str], Path], kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    pytest.importorskip("torch")
    with pytest.raises(error, match=message):
        torch_dataset(outputs["internvl", "parquet"], **kwargs)


def test_torch_dataset_refuses_unfinished_directory_and_bad_env(
    tmp_path: Path, outputs: dict[tuple[str, str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("torch")
    with pytest.raises(vlmtile.VlmtileError, match=r"has no _manifest\.json: not a finished"):
        torch_dataset(tmp_path)
    monkeypatch.setenv("RANK", "zero")
    with pytest.raises(vlmtile.VlmtileError, match="RANK='zero' is not an integer"):
        keys_of(torch_dataset(outputs["internvl", "parquet"]))
    with pytest.raises(ValueError, match="epoch must be non-negative"):
        torch_dataset(outputs["internvl", "parquet"]).set_epoch(-1)


def test_collate_torch_batches_from_a_dataloader(outputs: dict[tuple[str, str], Path], folder: Path) -> None:
    torch = pytest.importorskip("torch")
    path = outputs["qwen2-vl", "parquet"]
    loader = torch.utils.data.DataLoader(torch_dataset(path), batch_size=2, collate_fn=collate_torch)
    batches = list(loader)
    assert [b["keys"] for b in batches] == [KEYS[:2], KEYS[2:4], KEYS[4:]]
    first = batches[0]
    assert first["pixel_values"].dtype == torch.float32
    assert tuple(first["pixel_values"].shape) == (432 + 1564, 1176)
    expected = np.concatenate([processed(folder, QWEN, key).pixel_values for key in KEYS[:2]])
    assert np.array_equal(first["pixel_values"].numpy(), expected)
    assert first["image_grid_thw"].dtype == torch.int64
    assert first["image_grid_thw"].tolist() == [[1, 12, 36], [1, 34, 46]]


def test_collate_torch_bfloat16_bits_match_torch_rounding(tmp_path: Path, folder: Path) -> None:
    torch = pytest.importorskip("torch")
    out = build(folder, tmp_path / "bf16", INTERNVL, "parquet", dtype="bfloat16")
    records = list(vlmtile.open_dataset(out, as_stored=True))
    # The documented recipe for as-stored bfloat16 (batch_size=None would hit torch's default_convert).
    loader = torch.utils.data.DataLoader(
        torch_dataset(out, as_stored=True), batch_size=5, collate_fn=collate_torch
    )
    (batch,) = list(loader)
    assert batch["keys"] == KEYS
    pixels = batch["pixel_values"]
    assert pixels.dtype == torch.bfloat16
    assert tuple(pixels.shape) == (9, 3, 448, 448)
    stored = np.concatenate([r["pixel_values"] for r in records])
    assert np.array_equal(pixels.view(torch.int16).numpy(), stored.view(np.int16))
    # And the same bits torch's own float32 -> bfloat16 cast gives on the reference pixels.
    float32 = np.concatenate([processed(folder, INTERNVL, key).pixel_values for key in KEYS])
    assert torch.equal(pixels.view(torch.int16), torch.from_numpy(float32).bfloat16().view(torch.int16))


def test_collate_torch_float16_and_read_only_canvases(outputs: dict[tuple[str, str], Path]) -> None:
    torch = pytest.importorskip("torch")
    canvases = [
        r["pixel_values"].astype(np.float16)
        for r in vlmtile.open_dataset(outputs["xcomposer2-4khd", "parquet"])
    ]
    for array in canvases:
        array.flags.writeable = False  # as an as-stored array straight from a Parquet buffer is
    records = [{"key": f"k{i}", "pixel_values": a, "num_tiles": 1} for i, a in enumerate(canvases)]
    batch = collate_torch(records)  # filterwarnings=error: torch's non-writable warning would fail here
    assert isinstance(batch["pixel_values"], list)
    assert [t.dtype for t in batch["pixel_values"]] == [torch.float16] * 5
    for tensor, array in zip(batch["pixel_values"], canvases, strict=True):
        assert np.array_equal(tensor.numpy().view(np.uint16), array.view(np.uint16))


def test_collate_torch_sample_layout_through_a_dataloader(
    tmp_path: Path, folder: Path, manifest: Path
) -> None:
    torch = pytest.importorskip("torch")
    out = build(manifest, tmp_path / "samples", QWEN, "webdataset")
    loader = torch.utils.data.DataLoader(
        torch_dataset(out), batch_size=2, num_workers=2, collate_fn=collate_torch
    )
    batches = {tuple(b["keys"]): b for b in loader}
    # Shards [a, b] and [c]: one per worker, so batches never cross a shard here.
    assert sorted(batches) == [("a", "b"), ("c",)]
    first = batches["a", "b"]
    expected = np.concatenate(
        [processed(folder, QWEN, key).pixel_values for key in ("wide", "tall", "photo")]
    )
    assert torch.equal(first["pixel_values"], torch.from_numpy(expected))
    assert first["image_grid_thw"].tolist() == [[1, 14, 22], [1, 36, 14], [1, 34, 46]]
    assert first["images_per_record"] == [2, 1]
    text_only = batches[("c",)]
    assert text_only["pixel_values"] == []
    assert text_only["images_per_record"] == [0]
