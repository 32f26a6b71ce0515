"""The `navit` strategy: NaFlex geometry and pixels against transformers' SigLIP-2 processor, the size
rule's properties for every size from 1x1, token dropping (fixed, resolution-dependent, Beta) and
resolution sampling, and the determinism of every draw under (seed, key, index).

Reference: transformers 5.23 `Siglip2ImageProcessorPil` (NaFlex's `resize_to_sequence` ported to Python:
`get_image_size_for_max_num_patches`) with `do_convert_rgb=True`; its rows past the image's own patches
are padding (`pixel_attention_mask` 0), which vlmtile leaves to `pack`.
"""

from __future__ import annotations

import math
from collections import Counter
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from e2e_helpers import read_manifest, save_image
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers.models.siglip2.image_processing_pil_siglip2 import (
    Siglip2ImageProcessorPil,
    get_image_size_for_max_num_patches,
)

import vlmtile
from vlmtile import get_strategy
from vlmtile.stats import Column, compute_stats
from vlmtile.strategies.navit import NaViT, kept_count, resize_to_patches

MODES = ("RGB", "RGBA", "L", "P+trns", "CMYK", "LA", "1", "I;16")


@cache
def siglip2(max_patches: int, patch: int = 16) -> Siglip2ImageProcessorPil:
    return Siglip2ImageProcessorPil(do_convert_rgb=True, max_num_patches=max_patches, patch_size=patch)


def navit(**params: object) -> NaViT:
    strategy = get_strategy("navit", **params)
    assert isinstance(strategy, NaViT)
    return strategy


def meta(strategy: NaViT, width: int, height: int) -> dict[str, object]:
    return strategy.plan(width, height).metadata()


# ---------------------------------------------------------------------------------------------------------
# Parity with SigLIP-2 NaFlex (transformers)


SIZES = [(1920, 1080), (640, 480), (1, 1), (100, 100), (37, 1500), (17, 33), (1000, 7), (448, 448)]
PARITY_CASES = [(256, mode, size) for mode in MODES for size in SIZES] + [
    (budget, mode, size) for budget in (64, 1024) for mode in ("RGB", "RGBA") for size in SIZES
]


@pytest.mark.parametrize(("max_patches", "mode", "size"), PARITY_CASES)
def test_pixels_equal_siglip2_processor(make_image, max_patches, mode, size):
    image = make_image(*size, mode, sum(size))
    out = siglip2(max_patches)(images=image, return_tensors="np")
    rows = int(out["pixel_attention_mask"][0].sum())
    result = navit(max_patches=max_patches).process(image)
    assert out["pixel_values"].dtype == np.float32
    assert np.array_equal(out["pixel_values"][0][:rows], result.pixel_values)  # bit-exact, not close
    assert tuple(out["spatial_shapes"][0]) == tuple(result.metadata["grid_hw"])
    assert result.plan.num_tokens == rows


def test_sample_images_equal_siglip2_processor(sample_path: Path):
    with Image.open(sample_path) as image:
        image.load()
        out = siglip2(256)(images=image, return_tensors="np")
        result = navit().process(image)
    rows = int(out["pixel_attention_mask"][0].sum())
    assert np.array_equal(out["pixel_values"][0][:rows], result.pixel_values)


@settings(max_examples=2000, deadline=None)
@given(
    width=st.integers(1, 20000),
    height=st.integers(1, 20000),
    max_patches=st.sampled_from([1, 16, 64, 196, 256, 576, 729, 1024, 4096]),
    patch=st.sampled_from([14, 16, 32]),
)
def test_size_rule_equals_naflex(width, height, max_patches, patch):
    expected = get_image_size_for_max_num_patches(height, width, patch, max_patches)
    assert resize_to_patches(height, width, patch, max_patches, 0, True) == expected
    plan = navit(max_patches=max_patches, patch_size=patch).plan(width, height)
    assert (plan.resized_height, plan.resized_width) == expected


# ---------------------------------------------------------------------------------------------------------
# Geometry: every size, every rule


@settings(max_examples=1500, deadline=None)
@given(
    width=st.integers(1, 30000),
    height=st.integers(1, 30000),
    patch=st.integers(1, 40),
    max_patches=st.sampled_from([0, 1, 7, 256, 1024]),
    max_side=st.sampled_from([0, 40, 224, 1000]),
    upscale=st.booleans(),
)
def test_size_rule_properties(width, height, patch, max_patches, max_side, upscale):
    if max_side and max_side < patch:
        max_side = patch
    if upscale and not (max_patches or max_side):
        upscale = False
    strategy = navit(patch_size=patch, max_patches=max_patches, max_side=max_side, upscale=upscale)
    plan = strategy.plan(width, height)
    h, w = plan.resized_height, plan.resized_width
    rows, cols = plan.metadata()["grid_hw"]
    assert h % patch == 0 and w % patch == 0 and h >= patch and w >= patch
    assert (rows, cols) == (h // patch, w // patch)
    assert plan.num_tokens == rows * cols == plan.shape[0]  # no dropping: every patch is a token
    assert plan.shape == (rows * cols, patch * patch * 3)
    assert plan.metadata()["kept_patches"] is None  # every patch, raster order
    if max_patches:
        assert rows * cols <= max_patches
    if max_side:
        assert max(h, w) <= max_side
    if not upscale:  # never above the native size rounded up to patches
        assert h <= math.ceil(height / patch) * patch and w <= math.ceil(width / patch) * patch
        if (not max_patches or math.ceil(height / patch) * math.ceil(width / patch) <= max_patches) and (
            not max_side or max(math.ceil(height / patch), math.ceil(width / patch)) * patch <= max_side
        ):
            assert (h, w) == (math.ceil(height / patch) * patch, math.ceil(width / patch) * patch)


@settings(max_examples=500, deadline=None)
@given(width=st.integers(600, 20000), height=st.integers(600, 20000))
def test_no_upscale_equals_naflex_when_downscaling(width, height):
    """A budget that binds below the native size gives the same size with or without upscaling."""
    with_up = navit(max_patches=256).plan(width, height)
    without = navit(max_patches=256, upscale=False).plan(width, height)
    assert (with_up.resized_width, with_up.resized_height) == (without.resized_width, without.resized_height)


def test_aspect_ratio_is_kept_up_to_rounding():
    plan = navit(max_patches=0, max_side=1024).plan(1920, 1080)  # 1024 x 576: exact multiples of 16
    assert (plan.resized_width, plan.resized_height) == (1024, 576)
    plan = navit(max_patches=0, upscale=False).plan(1000, 701)  # native, rounded up: 1008 x 704
    assert (plan.resized_width, plan.resized_height) == (1008, 704)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        # (width, height) -> (resized width, height, grid rows, cols, tokens) under the preset (256 x 16 px)
        ((1920, 1080), (336, 192, 12, 21, 252)),
        ((640, 480), (288, 224, 14, 18, 252)),
        ((100, 100), (256, 256, 16, 16, 256)),
        ((1, 1), (112, 112, 7, 7, 49)),  # NaFlex scales at most 100x
        ((37, 1500), (48, 1360, 85, 3, 255)),
    ],
)
def test_preset_worked_examples(size, expected):
    plan = navit().plan(*size)
    rows, cols = plan.metadata()["grid_hw"]
    assert (plan.resized_width, plan.resized_height, rows, cols, plan.num_tokens) == expected


def test_render_is_raster_order_of_p_p_c_patches():
    """Row r*cols + c of pixel_values is the patch at (r, c), flattened (y, x, channel)."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)  # already 3 x 4 patches of 16
    strategy = navit(max_patches=0, upscale=False)
    plan = strategy.plan(64, 48)
    out = strategy.render(Image.fromarray(pixels), plan)
    assert out.shape == (12, 768)
    for index in range(12):
        r, c = divmod(index, 4)
        assert np.array_equal(out[index], pixels[16 * r : 16 * r + 16, 16 * c : 16 * c + 16].reshape(-1))
    assert np.array_equal(strategy.views(out, plan)[0][1], pixels)


# ---------------------------------------------------------------------------------------------------------
# Token dropping


@settings(max_examples=500, deadline=None)
@given(
    width=st.integers(1, 5000),
    height=st.integers(1, 5000),
    rate=st.floats(0.0, 0.95),
    key=st.text(min_size=0, max_size=12),
    index=st.integers(0, 5),
)
def test_fixed_rate_keeps_the_formula_count(width, height, rate, key, index):
    strategy = navit(drop_rate=rate).for_image(key, index)
    plan = strategy.plan(width, height)
    rows, cols = plan.metadata()["grid_hw"]
    n = rows * cols
    kept = plan.metadata()["kept_patches"]
    expected = n if rate == 0 else max(1, int(n * (1 - rate)))
    if kept is None:
        assert expected == n
        kept = list(range(n))
    assert plan.num_tokens == len(kept) == kept_count(n, rate) == expected
    assert kept == sorted(set(kept)) and all(0 <= i < n for i in kept)  # distinct, raster order
    assert abs(len(kept) / n - (1 - rate)) <= 1 / n or len(kept) == 1  # within one patch of the rate
    positions = strategy.patch_positions(plan.metadata())
    assert positions.dtype == np.int32 and positions.shape == (len(kept), 2)
    assert [r * cols + c for r, c in positions.tolist()] == kept
    assert strategy.plan(width, height) == plan  # a pure function of (strategy, size)


def test_dropped_pixels_are_the_kept_rows_of_the_full_sequence(make_image):
    image = make_image(300, 200, "RGB", 1)
    full = navit().process(image)
    dropped = navit(drop_rate=0.5, seed=7).for_image("img", 0).process(image)
    kept = dropped.metadata["kept_patches"]
    assert len(kept) == int(len(full.pixel_values) * 0.5)
    assert np.array_equal(dropped.pixel_values, full.pixel_values[kept])


def test_drops_are_reproducible_and_depend_on_seed_key_and_index():
    def kept(seed: int, key: str, index: int) -> list[int]:
        plan = navit(drop_rate=0.5, seed=seed).for_image(key, index).plan(640, 480)
        return list(plan.metadata()["kept_patches"])

    assert kept(1, "a", 0) == kept(1, "a", 0)
    assert kept(1, "a", 0) != kept(2, "a", 0)
    assert kept(1, "a", 0) != kept(1, "b", 0)
    assert kept(1, "a", 0) != kept(1, "a", 1)


def test_pinned_draws():
    """The exact draws for one (seed, key): a NumPy or hashing change that would make reruns differ
    from earlier output fails here first."""
    plan = navit(drop_rate=0.9, seed=3, max_patches=16).for_image("cat_jpg", 0).plan(64, 64)
    assert plan.metadata()["grid_hw"] == [4, 4] and plan.metadata()["kept_patches"] == [2]  # 1 of 16
    sampled = navit(sizes=(64, 128, 256, 512), max_patches=0).for_image("cat_jpg", 0).plan(1000, 1000)
    assert sampled.resized_width == 256
    beta = navit(drop_rate=0.5, drop_concentration=2.0, seed=3).for_image("cat_jpg", 0).plan(640, 480)
    assert beta.num_tokens == 231  # of 252


def test_resolution_dependent_rate_is_linear_in_patches():
    strategy = navit(drop_rate=0.1, drop_rate_max=0.5, max_patches=257, upscale=False)
    assert strategy.mean_drop_rate(1) == pytest.approx(0.1)
    assert strategy.mean_drop_rate(129) == pytest.approx(0.3)
    assert strategy.mean_drop_rate(257) == pytest.approx(0.5)
    assert strategy.mean_drop_rate(10_000) == pytest.approx(0.5)
    small = strategy.for_image("k", 0).plan(16, 16)  # one patch: always kept
    assert small.num_tokens == 1
    big = strategy.for_image("k", 0).plan(4000, 4000)  # 16 x 16 = 256 patches at rate ~0.498
    assert big.num_tokens == kept_count(256, strategy.mean_drop_rate(256)) == 128


@pytest.mark.parametrize(("rate", "concentration"), [(0.3, 4.0), (0.5, 20.0), (0.1, 1.0)])
def test_beta_rates_average_to_the_requested_rate(rate, concentration):
    strategy = navit(drop_rate=rate, drop_concentration=concentration, seed=11)
    fractions = []
    for i in range(2000):
        plan = strategy.for_image(f"img{i}", 0).plan(256, 256)  # 256 patches each
        fractions.append(1 - plan.num_tokens / 256)
    fractions_arr = np.asarray(fractions)
    # Mean of Beta(k r, k (1 - r)) is r; the floor in kept_count adds up to 1/256 of dropping.
    assert abs(fractions_arr.mean() - rate) < 0.02
    expected_sd = math.sqrt(rate * (1 - rate) / (concentration + 1))
    assert abs(fractions_arr.std() - expected_sd) < 0.2 * expected_sd  # a real spread, not a fixed rate
    again = [strategy.for_image(f"img{i}", 0).plan(256, 256).num_tokens for i in range(50)]
    assert again == [round(256 * (1 - f)) for f in fractions[:50]]


# ---------------------------------------------------------------------------------------------------------
# Resolution sampling


def test_sampled_sizes_are_drawn_per_image_and_kept_aspect():
    sizes = (128, 256, 384, 512)
    strategy = navit(sizes=sizes, max_patches=0, seed=5)
    seen = Counter()
    for i in range(400):
        plan = strategy.for_image(f"k{i}", 0).plan(2000, 1000)
        assert plan.resized_width in sizes  # the longest side is the drawn size (multiples of 16 here)
        assert plan.resized_height == plan.resized_width // 2
        seen[plan.resized_width] += 1
    assert set(seen) == set(sizes) and min(seen.values()) > 60  # every size, roughly uniform
    again = [strategy.for_image(f"k{i}", 0).plan(2000, 1000).resized_width for i in range(20)]
    assert again == [strategy.for_image(f"k{i}", 0).plan(2000, 1000).resized_width for i in range(20)]


def test_sampled_size_and_patch_budget_both_limit():
    strategy = navit(sizes=(4096,), max_patches=256)
    plan = strategy.for_image("x", 0).plan(1000, 1000)
    assert (plan.resized_width, plan.resized_height) == (256, 256)


# ---------------------------------------------------------------------------------------------------------
# Parameters


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"max_side": 8}, "max_side"),
        ({"sizes": (8,)}, "sizes"),
        ({"sizes": (256,), "max_side": 512}, "not both"),
        ({"max_patches": 0}, "upscale"),
        ({"drop_rate": 1.0}, "drop_rate"),
        ({"drop_rate": -0.1}, "drop_rate"),
        ({"drop_rate_max": 0.5, "max_patches": 0, "upscale": False}, "max_patches"),
        ({"drop_rate": 0.5, "drop_rate_max": 0.2}, "drop_rate_max"),
        ({"drop_concentration": -1.0}, "drop_concentration"),
        ({"mean": (0.5, 0.5)}, "mean"),
        ({"std": (0.5, 0.0, 0.5)}, "std"),
        ({"patch_size": 0}, "patch_size"),
        ({"seed": -1}, "seed"),
        ({"draw_key": "x"}, "draw_key"),  # set by for_image, not a parameter
    ],
)
def test_bad_parameters_are_refused(params, needle):
    with pytest.raises(ValueError, match=needle):
        get_strategy("navit", **params)


def test_json_values_are_accepted():
    """Manifests store lists, and `drop_rate=0` is an int: both resolve to the declared types."""
    strategy = navit(sizes=[224, 256], mean=[0, 0, 0], std=[1, 1, 1], drop_rate=0)
    assert strategy.sizes == (224, 256) and strategy.mean == (0.0, 0.0, 0.0) and strategy.drop_rate == 0.0
    stored = {k: v for k, v in strategy.params().items() if k not in ("name", "draw_key")}  # as in a manifest
    assert get_strategy("navit", **stored) == strategy


def test_token_budget_lowers_max_patches():
    strategy = navit()
    assert strategy.for_sample(2, max_tokens=1000) is strategy  # 500 per image: above 256
    assert strategy.for_sample(4, max_tokens=400).max_patches == 100
    assert navit(max_patches=0, max_side=512).for_sample(1, max_tokens=64).max_patches == 64
    assert strategy.for_sample(4, max_tokens=400).plan(1920, 1080).num_tokens <= 100


def test_for_image_is_self_without_draws():
    strategy = navit()
    assert strategy.for_image("a", 3) is strategy
    assert navit(drop_rate=0.1).for_image("a", 3).draw_key == "a#3"


# ---------------------------------------------------------------------------------------------------------
# End to end: preprocess and stats agree on every draw, whatever the worker count


def test_preprocess_and_stats_agree_on_draws(tmp_path: Path, make_image):
    src = tmp_path / "src"
    for i in range(12):
        save_image(make_image(50 + 37 * i, 300 - 11 * i, "RGB", i), src / f"img{i:02d}.png", "PNG")
    params = {"drop_rate": 0.2, "drop_rate_max": 0.6, "drop_concentration": 5.0, "sizes": (96, 160, 256)}
    strategy = navit(**params, seed=4)
    outs = {}
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        config = vlmtile.RunConfig(
            inputs=(str(src),),
            output=str(out),
            strategy=strategy,
            workers=workers,
            shard_size=5,
            progress=False,
        )
        vlmtile.preprocess(config)
        outs[workers] = out
        assert read_manifest(out)["strategy"]["params"]["draw_key"] == ""
    stored = {r["key"]: r for r in vlmtile.open_dataset(outs[1])}
    assert [(k, r["kept_patches"]) for k, r in stored.items()] == [
        (r["key"], r["kept_patches"]) for r in vlmtile.open_dataset(outs[2])
    ]
    tokens = [r["num_tokens"] for r in stored.values()]
    result = compute_stats([str(src)], [Column("navit", strategy)], emit_lengths=True)
    assert [line["num_tokens"]["navit"] for line in result.lengths] == tokens
    assert len(set(tokens)) > 3  # the draws really differ per image
    for r in stored.values():
        assert r["pixel_values"].shape == (r["num_tokens"], 768)
        assert max(r["resized_width"], r["resized_height"]) in (96, 160, 256) or r["grid_hw"] == [16, 16]
