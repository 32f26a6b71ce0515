"""Qwen's `temporal_copies=1`: half the stored bytes, the same `pixel_values` read back.

The parity of the rows themselves against transformers is in test_parity.py
(`test_qwen_one_temporal_copy_reads_back_as_the_reference`); here the option goes through a whole run,
both formats, `pack`, the manifest and the CLI.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from e2e_helpers import MakeImage, save_image

import vlmtile
from vlmtile.cli import cli
from vlmtile.pack import PackConfig, pack

BUDGET = 50176  # 64 tokens at most: small arrays, several merge windows


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory, make_image: MakeImage) -> Path:
    root = tmp_path_factory.mktemp("src")
    for i, (width, height) in enumerate([(97, 61), (300, 200), (33, 240), (512, 512), (28, 28)]):
        save_image(make_image(width, height, "RGB", i), root / f"img{i}.png", "PNG")
    return root


def run(src: Path, out: Path, copies: int, **options: Any) -> dict[str, Any]:
    strategy = vlmtile.get_strategy("qwen2-vl", max_pixels=BUDGET, temporal_copies=copies)
    config = vlmtile.RunConfig(
        inputs=(str(src),), output=str(out), strategy=strategy, progress=False, workers=1, **options
    )
    vlmtile.preprocess(config)
    manifest: dict[str, Any] = json.loads((out / "_manifest.json").read_text())
    return manifest


def bits(array: np.ndarray) -> np.ndarray:
    return array.view(np.uint32)


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
@pytest.mark.parametrize("dtype", ["float16", "uint8", "float32"])
def test_one_copy_reads_back_as_the_full_rows(images: Path, tmp_path: Path, fmt: str, dtype: str) -> None:
    full = run(images, tmp_path / "full", 2, format=fmt, dtype=dtype)
    one = run(images, tmp_path / "one", 1, format=fmt, dtype=dtype)
    assert "temporal_copies" not in full["strategy"]["params"]  # as written before the option existed
    assert one["strategy"]["params"]["temporal_copies"] == 1
    assert one["config_hash"] != full["config_hash"]

    read_full = list(vlmtile.open_dataset(tmp_path / "full"))
    read_one = list(vlmtile.open_dataset(tmp_path / "one"))
    assert len(read_one) == len(read_full) == 5
    for a, b in zip(read_full, read_one, strict=True):
        assert a["key"] == b["key"]
        assert a["pixel_values"].dtype == b["pixel_values"].dtype == np.float32
        assert np.array_equal(bits(a["pixel_values"]), bits(b["pixel_values"]))
        assert b["shape"] == [a["shape"][0], a["shape"][1] // 2]
        assert b["image_grid_thw"] == a["image_grid_thw"] and b["num_tokens"] == a["num_tokens"]

    stored_full = list(vlmtile.open_dataset(tmp_path / "full", as_stored=True))
    stored_one = list(vlmtile.open_dataset(tmp_path / "one", as_stored=True))
    for a, b in zip(stored_full, stored_one, strict=True):
        n = a["pixel_values"].shape[0]
        assert b["pixel_values"].shape == (n, 588)
        # The stored copy is the first of the processor's two, channel by channel.
        first = a["pixel_values"].reshape(n, 3, 2, 196)[:, :, 0].reshape(n, 588)
        assert np.array_equal(b["pixel_values"], first)
    pixel_bytes = [sum(r["pixel_values"].nbytes for r in s) for s in (stored_full, stored_one)]
    assert pixel_bytes[1] * 2 == pixel_bytes[0]
    assert one["totals"]["bytes"] < 0.6 * full["totals"]["bytes"]


def test_pack_of_a_one_copy_output_reads_back_as_the_full_rows(images: Path, tmp_path: Path) -> None:
    run(images, tmp_path / "full", 2)
    run(images, tmp_path / "one", 1)
    for name in ("full", "one"):
        pack(PackConfig(str(tmp_path / name), str(tmp_path / f"packed-{name}"), 256, progress=False))
    full = list(vlmtile.open_dataset(tmp_path / "packed-full"))
    one = list(vlmtile.open_dataset(tmp_path / "packed-one"))
    assert len(full) == len(one) > 1
    for a, b in zip(full, one, strict=True):
        assert a["pixel_values"].shape == b["pixel_values"].shape == (256, 1176)
        assert np.array_equal(bits(a["pixel_values"]), bits(b["pixel_values"]))
        assert np.array_equal(a["segment_ids"], b["segment_ids"])
    stored = next(iter(vlmtile.open_dataset(tmp_path / "packed-one", as_stored=True)))
    assert stored["pixel_values"].shape == (256, 588)


def test_a_directory_keeps_its_number_of_copies(images: Path, tmp_path: Path) -> None:
    run(images, tmp_path / "out", 2)
    with pytest.raises(vlmtile.VlmtileError, match="temporal_copies"):
        run(images, tmp_path / "out", 1)
    run(images, tmp_path / "out", 2)  # the same settings resume (nothing left to do)


def test_only_one_or_the_temporal_patch_size() -> None:
    assert "temporal_copies" not in vlmtile.get_strategy("qwen3-vl").params()
    assert (
        vlmtile.get_strategy("qwen3-vl", temporal_copies=2).params()
        == vlmtile.get_strategy("qwen3-vl").params()
    )
    with pytest.raises(ValueError, match=r"temporal_copies must be 1 or temporal_patch_size \(2\); got 3"):
        vlmtile.get_strategy("qwen2-vl", temporal_copies=3)
    with pytest.raises(ValueError, match="must be >= 1"):
        vlmtile.get_strategy("qwen2-vl", temporal_copies=0)
    with pytest.raises(ValueError, match="no parameter 'temporal_copies'"):
        vlmtile.get_strategy("internvl", temporal_copies=1)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-s", "internvl", "--temporal-copies", "1"], "no parameter 'temporal_copies'"),
        (["-s", "qwen2.5-vl", "--temporal-copies", "3"], "temporal_copies must be 1 or temporal_patch_size"),
    ],
)
def test_cli_refuses_what_does_not_apply(images: Path, tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, ["preprocess", str(images), "-o", str(tmp_path / "out"), *args])
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "out").exists()


def test_cli_stats_counts_the_stored_bytes(images: Path) -> None:
    specs = [f"qwen2-vl:max_pixels={BUDGET}", f"qwen2-vl:max_pixels={BUDGET},temporal_copies=1"]
    result = CliRunner().invoke(cli, ["stats", str(images), "-s", specs[0], "-s", specs[1], "--json"])
    assert result.exit_code == 0, result.output
    full, one = json.loads(result.output)["strategies"]
    assert one["label"] == f"qwen2-vl[max_pixels={BUDGET},temporal_copies=1]"
    assert full["total_tokens"] == one["total_tokens"] > 0
    assert {k: 2 * v for k, v in one["bytes"].items()} == full["bytes"]
