"""`--fast`: not bit-exact, but the same plans, shapes and token counts as strict mode, close pixels, and
never mixed with strict output in one directory. Timing is the benchmark's business, not the tests'.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from e2e_helpers import MakeImage, read_manifest
from PIL import Image

import vlmtile
from vlmtile.cli import cli
from vlmtile.fast import SourceReducer
from vlmtile.samples import ImageRef
from vlmtile.work import Failure, Record, process_image

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data"
PHOTOS = ("rocket_launch_3000x2000.jpg", "hubble_deep_field_1000x872.jpg", "photo_strip_tall_300x2400.jpg")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    diff = a.astype(np.float64) - b.astype(np.float64)
    mse = float(np.mean(diff * diff))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def both(ref: ImageRef, strategy: vlmtile.Strategy) -> tuple[Record, Record]:
    strict = process_image(ref, "k", strategy, "uint8")
    fast = process_image(ref, "k", strategy, "uint8", fast=True)
    assert isinstance(strict, Record) and isinstance(fast, Record), (strict, fast)
    return strict, fast


@pytest.mark.parametrize("name", vlmtile.list_strategies())
@pytest.mark.parametrize("photo", PHOTOS)
def test_same_plan_close_pixels(name: str, photo: str) -> None:
    strategy = vlmtile.get_strategy(name)
    strict, fast = both(ImageRef("image", photo, path=str(SAMPLE / photo)), strategy)
    assert fast.metadata == strict.metadata  # plan, grid, tokens, boxes: all the same
    assert fast.pixels is not None and strict.pixels is not None
    assert fast.pixels.shape == strict.pixels.shape
    # The benchmark's bar is 40 dB on its photos; these upscaled / tiny sample photos are kinder or
    # harsher by a few dB, so the test only guards against a broken fast path (a shifted or wrong image
    # is below 20 dB).
    assert psnr(fast.pixels, strict.pixels) > 33, name


def test_large_jpeg_is_drafted_and_reduced(make_image: MakeImage) -> None:
    """A 3000x2000 JPEG for a 448-px squash: decoded at 1/4 scale by the JPEG decoder itself."""
    buf = io.BytesIO()
    make_image(3000, 2000, "RGB", 1).save(buf, "JPEG", quality=90)
    strategy = vlmtile.get_strategy("xcomposer2")  # one 224x224 squash
    reducer = SourceReducer(strategy)
    with Image.open(io.BytesIO(buf.getvalue())) as image:
        wanted = reducer.draft(image)
        assert wanted == (224, 224)
        image.draft(None, wanted)
        assert image.size == (375, 250)  # 1/8 scale: the smallest that is still >= 224 on both sides
    assert reducer.plan is not None and reducer.plan.orig_width == 3000  # planned from the header
    strict, fast = both(ImageRef("image", "x", data=buf.getvalue()), strategy)
    assert fast.metadata == strict.metadata


def test_png_is_box_reduced_not_below_three_times_the_target(make_image: MakeImage) -> None:
    strategy = vlmtile.get_strategy("xcomposer2")  # one 224x224 squash
    plan = strategy.plan(3000, 1400)
    reduced = SourceReducer(strategy).reduce(make_image(3000, 1400, "RGB", 2), plan)
    # The height limits the factor: 1400 // (3 x 224) = 2, so both sides halve and stay >= 672.
    assert reduced.size == (1500, 700)
    small = SourceReducer(strategy).reduce(make_image(2000, 1000, "RGB", 2), plan)
    assert small.size == (2000, 1000)  # 1000 // 672 = 1: nothing to gain


def test_exif_rotated_jpeg_plans_like_strict(make_image: MakeImage) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, viewed portrait
    buf = io.BytesIO()
    make_image(1600, 1200, "RGB", 3).save(buf, "JPEG", quality=90, exif=exif.tobytes())
    for name in ("internvl", "qwen2-vl", "deepseek-vl2", "xcomposer2-4khd", "llava-next"):
        strategy = vlmtile.get_strategy(name, exif_transpose=True)
        strict, fast = both(ImageRef("image", "x", data=buf.getvalue()), strategy)
        assert (strict.metadata["orig_width"], strict.metadata["orig_height"]) == (1200, 1600)
        assert fast.metadata == strict.metadata, name
        assert fast.pixels is not None and strict.pixels is not None
        assert psnr(fast.pixels, strict.pixels) > 30, name


def test_refused_image_is_refused_in_fast_mode_too(make_image: MakeImage) -> None:
    buf = io.BytesIO()
    make_image(2000, 8, "RGB", 4).save(buf, "JPEG")
    out = process_image(
        ImageRef("image", "x", data=buf.getvalue()), "k", vlmtile.get_strategy("qwen2-vl"), "uint8", fast=True
    )
    assert isinstance(out, Failure) and out.stage == "plan" and "aspect ratio" in out.reason


def test_fast_is_a_setting_of_the_directory(tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["preprocess", str(SAMPLE / PHOTOS[0]), "-o", str(tmp_path / "out"), "-s", "internvl", "-q"]
    assert runner.invoke(cli, [*args, "--fast"]).exit_code == 0
    assert read_manifest(tmp_path / "out")["fast"] is True
    mixed = runner.invoke(cli, args)
    assert mixed.exit_code == 1 and "fast: was True, now False" in mixed.stderr
    (record,) = vlmtile.open_dataset(tmp_path / "out")
    strict = vlmtile.get_strategy("internvl").process(Image.open(SAMPLE / PHOTOS[0]))
    assert record["num_tokens"] == strict.plan.num_tokens
    assert record["pixel_values"].shape == strict.pixel_values.shape


@pytest.mark.parametrize("name", vlmtile.list_strategies())
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_render_normalized_is_normalize_of_render(name: str, dtype: type, make_image: MakeImage) -> None:
    """The fused path (Qwen's) gives the bits of the two steps apart, for every strategy."""
    strategy = vlmtile.get_strategy(name)
    for width, height in ((37, 91), (640, 480), (1000, 210)):
        image = make_image(width, height, "RGB", width)
        plan = strategy.plan(width, height)
        fused = strategy.render_normalized(image, plan, dtype)
        apart = strategy.normalize(strategy.render(image, plan), dtype)
        assert fused.dtype == apart.dtype and fused.shape == apart.shape
        assert np.array_equal(fused.view(np.uint8), apart.view(np.uint8)), (name, width, height)
