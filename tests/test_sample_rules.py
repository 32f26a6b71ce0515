"""Per-sample rules (`Strategy.for_sample`) and grounding metadata (`Plan.metadata`, `vlmtile.grounding`).

The automatic multi-image rules restate the reference trainers:
* DeepSeek-VL2 `processing_deepseek_vl_v2.py`: `cropping=len(images) <= 2`;
* InternLM-XComposer-2.5 `interleav_wrap_chat`: `if image_nums > 1: hd_num = 6`;
* LLaVA-OneVision: transformers 5.23 `LlavaOnevisionImageProcessorPil` patches only images of single-image
  samples (`need_patching = [n == 1 ...]`), the others are `pad_to_square`d to one view, and
  `LlavaOnevisionProcessor.replace_image_token` counts `num_image_tokens + 1` for them; LLaVA-NeXT's
  train.py does the same ("overwrite to process with simple pad");
* InternVL's finetune script `max(1, max_dynamic_patch // num_image)` is the max_tiles budget.
The OneVision rule is checked bit for bit against transformers below; the grounding fields are checked on
the pixels: a red marker at a known original position must land where `map_box` says, in every strategy.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import LlavaOnevisionImageProcessorPil
from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

from vlmtile import get_strategy, list_strategies
from vlmtile.grounding import map_box, map_point, tile_of_point
from vlmtile.strategies import get_preset
from vlmtile.strategies.base import BUDGETS, GROUNDING_FIELDS, Plan, Strategy
from vlmtile.strategies.deepseek import DeepSeekVL2
from vlmtile.strategies.internvl import InternVL
from vlmtile.strategies.llava import LlavaNext
from vlmtile.strategies.navit import NaViT
from vlmtile.strategies.qwen import QwenVL
from vlmtile.strategies.xcomposer import XComposerFixed, XComposerHD

NAMES = list_strategies()
DOCS = Path(__file__).resolve().parent.parent / "docs"

# ---------------------------------------------------------------------------------------------------------
# for_sample: the contract


@pytest.mark.parametrize("name", NAMES)
def test_single_image_without_budget_is_the_strategy_itself(name: str) -> None:
    strategy = get_strategy(name)
    assert strategy.for_sample(1) is strategy


@pytest.mark.parametrize("name", NAMES)
def test_rule_descriptions_and_budget_keys(name: str) -> None:
    cls = get_preset(name).cls
    assert isinstance(cls.multi_image_rule, str) and cls.multi_image_rule.strip()
    assert set(cls.budget_rules) <= set(BUDGETS)
    assert all(isinstance(v, str) and v.strip() for v in cls.budget_rules.values())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [0, -1, True, 2.0, None])
def test_num_images_must_be_a_positive_int(name: str, bad: Any) -> None:
    with pytest.raises(ValueError, match="num_images"):
        get_strategy(name).for_sample(bad)


@pytest.mark.parametrize("bad", [0, -5, True, 3.5])
@pytest.mark.parametrize("budget", ["max_tiles", "max_tokens"])
def test_budgets_must_be_positive_ints(bad: Any, budget: str) -> None:
    with pytest.raises(ValueError, match=budget):
        get_strategy("internvl").for_sample(2, **{budget: bad})


# ---------------------------------------------------------------------------------------------------------
# Automatic reference rules


def expected_rule(name: str, num_images: int) -> dict[str, Any] | None:
    """The fields the reference changes for a sample of `num_images` images; None: nothing changes."""
    if name == "deepseek-vl2" and num_images >= 3:
        return {"tiling": False}
    if name == "xcomposer2.5" and num_images > 1:
        return {"hd_num": 6}
    if name == "llava-onevision" and num_images > 1:
        return {"anyres": False}
    return None


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("num_images", [1, 2, 3, 5, 7])
def test_automatic_rules(name: str, num_images: int) -> None:
    strategy = get_strategy(name)
    got = strategy.for_sample(num_images)
    changes = expected_rule(name, num_images)
    if changes is None:
        assert got is strategy, (name, num_images)
    else:
        assert got == dataclasses.replace(strategy, **changes)


def test_deepseek_rule_is_len_images_le_2() -> None:
    """Two images keep tiling (1920x1080: 4x2, 1807 tokens); three turn it off (421 tokens each)."""
    ds = get_strategy("deepseek-vl2")
    assert ds.for_sample(2).plan(1920, 1080).num_tokens == 1807
    off = ds.for_sample(3)
    assert isinstance(off, DeepSeekVL2) and off.tiling is False
    plan = off.plan(1920, 1080)
    assert (plan.grid, plan.num_tiles, plan.num_tokens, plan.metadata()["images_spatial_crop"]) == (
        (1, 1),
        2,
        421,
        [1, 1],
    )
    assert get_strategy("deepseek-vl2", tiling=False).for_sample(1).tiling is False


def test_xcomposer25_rule_is_hd_num_6_for_several_images() -> None:
    """The docs' IXC-2.5 hd 6 column: 1920x1080 -> 1680x1120, 3x2, 2861 tokens."""
    ixc = get_strategy("xcomposer2.5")
    assert ixc.for_sample(1).plan(1920, 1080).num_tokens == 5281
    plan = ixc.for_sample(2).plan(1920, 1080)
    assert ((plan.resized_width, plan.resized_height), plan.grid, plan.num_tokens) == (
        (1680, 1120),
        (3, 2),
        2861,
    )
    # A user hd_num below 6 is kept (rules only lower), one above is lowered to 6.
    assert get_strategy("xcomposer2.5", hd_num=4).for_sample(3).hd_num == 4
    assert get_strategy("xcomposer2.5", hd_num=55).for_sample(3).hd_num == 6
    # 4KHD has no such rule in its reference.
    khd = get_strategy("xcomposer2-4khd")
    assert khd.for_sample(4) is khd


# LLaVA-OneVision multi-image: transformers' own processor on a nested (one sample) list


@pytest.fixture(scope="module")
def onevision_processor() -> Any:
    return LlavaOnevisionImageProcessorPil(
        size={"height": 384, "width": 384},
        resample=3,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        image_grid_pinpoints=[[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)],
    )


def onevision_tokens(processor: Any, image_inputs: dict[str, Any], index: int) -> int:
    """`LlavaOnevisionProcessor.replace_image_token` with the -ov-hf processor_config (built without a
    tokenizer: the method reads only these attributes)."""
    proc = LlavaOnevisionProcessor.__new__(LlavaOnevisionProcessor)
    proc.num_image_tokens = 729
    proc.vision_feature_select_strategy = "full"
    proc.vision_aspect_ratio = "anyres_max_9"
    proc.image_token = "<image>"
    proc.image_processor = processor
    return len(proc.replace_image_token(image_inputs, index)) // len("<image>")


@pytest.mark.parametrize("sizes", [[(900, 500), (333, 1001)], [(384, 384), (5, 700), (1280, 719)]])
def test_onevision_multi_image_matches_transformers(
    onevision_processor: Any, make_image: Any, sizes: list[tuple[int, int]]
) -> None:
    images = [make_image(w, h, "RGB", seed) for seed, (w, h) in enumerate(sizes)]
    ref = onevision_processor([images], return_tensors="np")
    assert list(ref["batch_num_images"]) == [len(images)]
    strategy = get_strategy("llava-onevision").for_sample(len(images))
    for index, image in enumerate(images):
        result = strategy.process(image)
        assert result.pixel_values.shape == (1, 3, 384, 384)
        assert np.array_equal(result.pixel_values[0], ref["pixel_values"][index][0])
        assert result.plan.num_tokens == onevision_tokens(onevision_processor, ref, index) == 730
        assert result.metadata["image_sizes"] == [image.height, image.width]
        assert result.metadata["feature_grid"] == [0, 0]
        assert (result.plan.grid, result.plan.num_tiles, result.plan.thumbnail) == ((1, 1), 1, False)


def test_onevision_single_image_sample_keeps_anyres(onevision_processor: Any, make_image: Any) -> None:
    image = make_image(900, 500, "RGB", 3)
    ref = onevision_processor([[image]], return_tensors="np")
    result = get_strategy("llava-onevision").for_sample(1).process(image)
    assert np.array_equal(result.pixel_values, ref["pixel_values"][0][: result.plan.num_tiles])
    assert result.plan.num_tokens == onevision_tokens(onevision_processor, ref, 0)


def test_onevision_square_padding_colour_and_box(make_image: Any) -> None:
    """1000x500: padded to 1000x1000 with rows 250..750 holding the image, scaled by 0.384: rows 96..288 of
    the 384x384 view; above and below (clear of the bicubic kernel's reach) is uint8 127 (int(0.5 * 255))."""
    strategy = get_strategy("llava-onevision").for_sample(2)
    plan = strategy.plan(1000, 500)
    assert plan.content_box == (0, 96, 384, 288)
    pixels = strategy.render(make_image(1000, 500, "RGB", 1), plan)
    assert (pixels[0, :, :90] == 127).all() and (pixels[0, :, 294:] == 127).all()


# ---------------------------------------------------------------------------------------------------------
# Budgets: exact values


def test_internvl_max_tiles_budget() -> None:
    internvl = get_strategy("internvl")
    assert internvl.for_sample(3, max_tiles=12) == dataclasses.replace(internvl, max_tiles=4)
    assert internvl.for_sample(5, max_tiles=12).max_tiles == 2
    assert internvl.for_sample(13, max_tiles=12).max_tiles == 1  # max(1, 0)
    assert internvl.for_sample(1, max_tiles=40) is internvl  # never raised above max_tiles 12
    assert get_strategy("internvl", max_tiles=6).for_sample(1, max_tiles=12).max_tiles == 6
    # min_tiles is the floor, as min_dynamic_patch is for the reference
    assert get_strategy("internvl", min_tiles=2).for_sample(3, max_tiles=3).max_tiles == 2


@pytest.mark.parametrize(
    ("num_images", "budget", "max_tiles"),
    [
        (1, 3328, 12),  # 12 tiles + thumbnail = 13 * 256: the default already fits
        (1, 3327, 11),
        (2, 2048, 3),  # 1024 per image: 3 tiles + thumbnail
        (2, 1535, 1),  # 767 per image: 2 tiles + thumbnail is 768
        (4, 1024, 1),  # 256 per image: one tile, no thumbnail
    ],
)
def test_internvl_max_tokens_budget(num_images: int, budget: int, max_tiles: int) -> None:
    assert get_strategy("internvl").for_sample(num_images, max_tokens=budget).max_tiles == max_tiles


def test_internvl_budgets_combine_to_the_lower() -> None:
    got = get_strategy("internvl").for_sample(2, max_tiles=12, max_tokens=2048)
    assert got.max_tiles == 3  # tiles allow 6, tokens 3


def test_internvl_token_budget_too_small() -> None:
    with pytest.raises(ValueError, match=r"internvl: a token budget of 255 per image .* 256 tokens"):
        get_strategy("internvl").for_sample(2, max_tokens=511)


@pytest.mark.parametrize(
    ("name", "num_images", "budget", "max_pixels"),
    [
        ("qwen2.5-vl", 2, 1024, 512 * 28 * 28),
        ("qwen2-vl", 3, 3000, 1000 * 28 * 28),
        ("qwen3-vl", 2, 1024, 512 * 32 * 32),
        ("qwen2.5-vl", 1, 16384, 16384 * 28 * 28),  # 12845056 exactly: the default, unchanged
    ],
)
def test_qwen_max_tokens_budget(name: str, num_images: int, budget: int, max_pixels: int) -> None:
    strategy = get_strategy(name)
    got = strategy.for_sample(num_images, max_tokens=budget)
    assert isinstance(got, QwenVL)
    assert got.max_pixels == max_pixels
    assert got.min_pixels == strategy.min_pixels
    if max_pixels == strategy.max_pixels:
        assert got is strategy


def test_qwen_budget_never_raises_max_pixels() -> None:
    strategy = get_strategy("qwen2-vl", max_pixels=200704)
    assert strategy.for_sample(1, max_tokens=100_000) is strategy


def test_qwen_budget_below_min_pixels_is_refused() -> None:
    # qwen3-vl min_pixels 65536 = 64 tokens of 32x32; 100 tokens over 2 images is 50 each
    with pytest.raises(
        ValueError, match=r"qwen3-vl: .*50 per image .*max_pixels 51200, below min_pixels \(65536"
    ):
        get_strategy("qwen3-vl").for_sample(2, max_tokens=100)


def test_xcomposer_hd_budgets() -> None:
    ixc = get_strategy("xcomposer2.5")
    assert ixc.for_sample(2, max_tiles=12).hd_num == 6  # rule 6, share 6
    assert ixc.for_sample(2, max_tiles=8).hd_num == 4
    assert get_strategy("xcomposer2-4khd").for_sample(2, max_tiles=16).hd_num == 8
    # IXC-2.5 worst case for hd_num k: (k + 1) * 400 + 1 + (k + 1) * 20 = 420 (k + 1) + 1
    assert ixc.for_sample(1, max_tokens=5000).hd_num == 10  # 4621 <= 5000 < 5041
    assert ixc.for_sample(1, max_tokens=5041).hd_num == 11
    with pytest.raises(ValueError, match=r"xcomposer2.5: a token budget of 840 per image .* 841 tokens"):
        ixc.for_sample(2, max_tokens=1681)


def test_xcomposer_worst_case_is_reached() -> None:
    """A 300x6000 image at hd_num 10 is the 10 x 1 strip the token budget assumes: 4621 tokens."""
    plan = get_strategy("xcomposer2.5", hd_num=10).plan(300, 6000)
    assert plan.grid == (1, 10) and plan.num_tokens == 4621


@pytest.mark.parametrize(
    ("name", "budget", "supported"),
    [
        ("qwen2-vl", "max_tiles", "max_tokens (--max-tokens-per-sample)"),
        ("llava-next", "max_tiles", "none"),
        ("llava-onevision", "max_tokens", "none"),
        ("deepseek-vl2", "max_tokens", "none"),
        ("deepseek-vl2", "max_tiles", "none"),
        ("xcomposer2", "max_tokens", "none"),
        ("xcomposer2-vl", "max_tiles", "none"),
    ],
)
def test_unsupported_budgets_are_refused(name: str, budget: str, supported: str) -> None:
    with pytest.raises(ValueError) as info:
        get_strategy(name).for_sample(2, **{budget: 100_000})
    message = str(info.value)
    assert message.startswith(f"{name} cannot honour a per-sample {budget} budget ({BUDGETS[budget]})")
    assert message.endswith(f"Budgets it supports: {supported}")


# ---------------------------------------------------------------------------------------------------------
# Budgets: properties


@pytest.mark.parametrize("name", ["internvl", "xcomposer2-4khd", "xcomposer2.5"])
@settings(max_examples=300, deadline=None)
@given(
    width=st.integers(1, 20000),
    height=st.integers(1, 20000),
    num_images=st.integers(1, 6),
    budget=st.integers(1, 40000),
)
def test_token_budget_is_a_hard_cap_for_tile_strategies(
    name: str, width: int, height: int, num_images: int, budget: int
) -> None:
    try:
        strategy = get_strategy(name).for_sample(num_images, max_tokens=budget)
        plan = strategy.plan(width, height)
    except ValueError:
        return  # a budget below one view, or an aspect ratio the reference refuses
    assert plan.num_tokens <= budget // num_images


@pytest.mark.parametrize("name", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"])
@settings(max_examples=300, deadline=None)
@given(
    width=st.integers(300, 8000),
    height=st.integers(300, 8000),
    num_images=st.integers(1, 6),
    per_image=st.integers(200, 20000),
)
def test_qwen_token_budget_holds_away_from_the_references_clamps(
    name: str, width: int, height: int, num_images: int, per_image: int
) -> None:
    """smart_resize keeps max_pixels except for its one-window clamp (aspect ratio above the per-image
    token share) and its min_pixels upscale (sides under ~300 px); away from both, the budget holds."""
    assume(max(width, height) / min(width, height) <= 20)
    strategy = get_strategy(name).for_sample(num_images, max_tokens=per_image * num_images)
    assert strategy.plan(width, height).num_tokens <= per_image


def limits(strategy: Strategy) -> dict[str, int]:
    return {
        k: v
        for k, v in strategy.params().items()
        if k in ("max_tiles", "max_pixels", "hd_num") and isinstance(v, int)
    }


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=60, deadline=None)
@given(
    num_images=st.integers(1, 9),
    max_tiles=st.none() | st.integers(1, 100),
    max_tokens=st.none() | st.integers(1, 100_000),
)
def test_for_sample_only_lowers_limits(
    name: str, num_images: int, max_tiles: int | None, max_tokens: int | None
) -> None:
    strategy = get_strategy(name)
    try:
        got = strategy.for_sample(num_images, max_tiles=max_tiles, max_tokens=max_tokens)
    except ValueError as e:
        assert str(e).startswith(name)
        return
    before, after = limits(strategy), limits(got)
    assert before.keys() == after.keys()
    assert all(after[k] <= before[k] for k in before)
    assert type(got) is type(strategy) and got.name == strategy.name


# ---------------------------------------------------------------------------------------------------------
# Docs list every strategy's rule


def test_docs_multi_image_section_lists_every_strategy() -> None:
    text = (DOCS / "strategies.md").read_text(encoding="utf-8")
    section = text.split("## Multi-image samples", 1)[1]
    names = [
        name
        for line in section.splitlines()
        if line.startswith("| `")
        for name in re.findall(r"`([^`]+)`", line.split("|")[1])
    ]
    assert sorted(names) == NAMES  # each strategy in exactly one row


# ---------------------------------------------------------------------------------------------------------
# Grounding metadata


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", [(1920, 1080), (1080, 1920), (333, 333), (37, 1500)])
def test_grounding_fields_are_present_and_json(name: str, size: tuple[int, int]) -> None:
    plan = get_strategy(name).plan(*size)
    meta = json.loads(json.dumps(plan.metadata()))
    assert set(GROUNDING_FIELDS) <= set(meta)
    left, top, right, bottom = meta["content_box"]
    assert all(isinstance(v, int) for v in meta["content_box"])
    assert 0 <= left <= right <= meta["resized_width"] and 0 <= top <= bottom <= meta["resized_height"]
    assert meta["transposed"] is (name in ("xcomposer2-4khd", "xcomposer2.5") and size[0] < size[1])
    assert meta["tile_boxes"] == [list(b) for b in plan.tile_boxes]
    if plan.content_box is None:
        assert meta["content_box"] == [0, 0, meta["resized_width"], meta["resized_height"]]


def variants() -> list[tuple[str, Strategy]]:
    """Every registered strategy, plus the per-sample variants that change the geometry."""
    out: list[tuple[str, Strategy]] = [(n, get_strategy(n)) for n in NAMES]
    out.append(("llava-onevision x2", get_strategy("llava-onevision").for_sample(2)))
    out.append(("deepseek-vl2 x3", get_strategy("deepseek-vl2").for_sample(3)))
    out.append(("xcomposer2.5 x2", get_strategy("xcomposer2.5").for_sample(2)))
    return out


VARIANTS = variants()

BASE_FIELDS = {
    "orig_width",
    "orig_height",
    "resized_width",
    "resized_height",
    "grid",
    "thumbnail",
    "num_tiles",
    "num_tokens",
}


@pytest.mark.parametrize(("label", "strategy"), VARIANTS, ids=[v[0] for v in VARIANTS])
@pytest.mark.parametrize("size", [(1, 1), (1920, 1080), (1080, 1920), (4000, 37)])
def test_per_sample_variants_keep_the_plan_contract(
    label: str, strategy: Strategy, size: tuple[int, int]
) -> None:
    """The geometry a rule switches to (untiled DeepSeek, padded-square OneVision, hd_num 6) is still a
    Plan like any other: tiles cover the canvas, counts agree, metadata keys are the declared ones."""
    plan = strategy.plan(*size)
    boxes = plan.tile_boxes
    assert sum((r - x) * (b - y) for x, y, r, b in boxes) == plan.resized_width * plan.resized_height
    assert plan.grid[0] * plan.grid[1] == len(boxes)
    assert plan.num_tiles == len(boxes) + int(plan.thumbnail)
    assert {k for k, _ in plan.extra} == set(type(strategy).metadata_fields)
    assert set(plan.metadata()) == BASE_FIELDS | set(GROUNDING_FIELDS) | set(type(strategy).metadata_fields)
    pixels = strategy.render(Image.new("RGB", size, (10, 200, 30)), plan)
    assert pixels.shape == plan.shape and pixels.dtype == np.uint8


MARKER = 60
"""Marker side in original pixels: >= 13 px even in the 224x224 squash of an 800-px-wide image."""


def marker_image(width: int, height: int, x: int, y: int) -> Image.Image:
    """Mid-grey image with a pure red MARKER x MARKER square at (x, y): red stands out from every
    strategy's padding (black, grey 127, white) and from the background."""
    pixels = np.full((height, width, 3), 90, dtype=np.uint8)
    pixels[y : y + MARKER, x : x + MARKER] = (255, 0, 0)
    return Image.fromarray(pixels)


def redness(canvas: np.ndarray) -> np.ndarray:
    rgb = canvas.astype(np.int32)
    return np.clip(rgb[..., 0] - np.maximum(rgb[..., 1], rgb[..., 2]), 0, 255)


def tile_pixels(strategy: Strategy, pixels: np.ndarray, plan: Plan, index: int) -> np.ndarray:
    """Tile `index` of `tile_boxes` as the model receives it (HxWx3), from the stored layout itself."""
    if isinstance(strategy, InternVL):
        return pixels[index].transpose(1, 2, 0)  # tiles first, thumbnail last
    if isinstance(strategy, LlavaNext):
        return pixels[index + int(plan.thumbnail)].transpose(1, 2, 0)  # base image first (anyres)
    if isinstance(strategy, DeepSeekVL2):
        return pixels[index + 1].transpose(1, 2, 0)  # global view first
    if isinstance(strategy, (XComposerHD, XComposerFixed)):
        left, top, right, bottom = plan.tile_boxes[index]
        return pixels[:, top:bottom, left:right].transpose(1, 2, 0)  # the canvas, cut model-side
    assert isinstance(strategy, (QwenVL, NaViT))
    return strategy.views(pixels, plan)[0][1]  # one "tile": the resized image


@pytest.mark.parametrize(("label", "strategy"), VARIANTS, ids=[v[0] for v in VARIANTS])
@pytest.mark.parametrize(
    ("size", "at"),
    [((800, 600), (500, 150)), ((600, 900), (120, 610)), ((1500, 400), (1100, 300))],
    ids=["landscape", "portrait", "wide"],
)
def test_marker_lands_where_map_box_says(
    label: str, strategy: Strategy, size: tuple[int, int], at: tuple[int, int]
) -> None:
    width, height = size
    x, y = at
    plan = strategy.plan(width, height)
    pixels = strategy.render(marker_image(width, height, x, y), plan)
    canvas = strategy.views(pixels, plan)[0][1]
    assert canvas.shape == (plan.resized_height, plan.resized_width, 3)
    meta = json.loads(json.dumps(plan.metadata()))

    left, top, right, bottom = map_box(meta, (x, y, x + MARKER, y + MARKER))
    red = redness(canvas) > 127  # the marker, cut at half its contrast
    rows, cols = np.nonzero(red)
    assert rows.size, label
    # Centroid of the thresholded marker (pixel centres) vs the mapped centre: resampling is symmetric.
    assert abs((cols + 0.5).mean() - (left + right) / 2) <= 0.75, (label, cols.mean(), left, right)
    assert abs((rows + 0.5).mean() - (top + bottom) / 2) <= 0.75, (label, rows.mean(), top, bottom)
    # Its extent: the half-contrast edges sit on the mapped edges.
    assert abs(cols.min() - left) <= 1 and abs(cols.max() + 1 - right) <= 1, (label, cols.min(), left)
    assert abs(rows.min() - top) <= 1 and abs(rows.max() + 1 - bottom) <= 1, (label, rows.min(), top)

    # The marker centre is in the tile tile_of_point names, at the offset it gives, in the stored layout.
    index, tx, ty = tile_of_point(meta, x + MARKER / 2, y + MARKER / 2)
    tile = tile_pixels(strategy, pixels, plan, index)
    tl, tt, tr, tb = plan.tile_boxes[index]
    assert tile.shape == (tb - tt, tr - tl, 3)
    assert redness(tile[int(ty), int(tx)][None, None])[0, 0] > 200, (label, index, tx, ty)


# ---------------------------------------------------------------------------------------------------------
# vlmtile.grounding: exact values and edges


def test_map_box_internvl_1920x1080() -> None:
    """4x2 grid, 1792x896 canvas: x scaled by 1792/1920, y by 896/1080."""
    meta = get_strategy("internvl").plan(1920, 1080).metadata()
    got = map_box(meta, (100, 200, 400, 500))
    assert got == pytest.approx((100 * 1792 / 1920, 200 * 896 / 1080, 400 * 1792 / 1920, 500 * 896 / 1080))
    index, tx, ty = tile_of_point(meta, 250, 350)
    assert index == 0 and (tx, ty) == pytest.approx((250 * 1792 / 1920, 350 * 896 / 1080))
    assert tile_of_point(meta, 1000, 900)[0] == 6  # canvas (933.3, 746.7): column 2, row 1


def test_map_box_qwen25_1920x1080() -> None:
    meta = get_strategy("qwen2.5-vl").plan(1920, 1080).metadata()
    assert (meta["resized_width"], meta["resized_height"]) == (1932, 1092)
    assert map_box(meta, (100, 200, 400, 500)) == pytest.approx(
        (100 * 1932 / 1920, 200 * 1092 / 1080, 400 * 1932 / 1920, 500 * 1092 / 1080)
    )
    assert tile_of_point(meta, 1920, 1080) == (0, 1932.0, 1092.0)  # the far corner: still the one tile


def test_docs_grounding_worked_example() -> None:
    """The numbers docs/grounding.md quotes for 1920x1080 and the box (100, 200, 400, 500)."""
    internvl = get_strategy("internvl").plan(1920, 1080).metadata()
    assert internvl["content_box"] == [0, 0, 1792, 896] and len(internvl["tile_boxes"]) == 8
    assert [round(v, 2) for v in map_box(internvl, (100, 200, 400, 500))] == [93.33, 165.93, 373.33, 414.81]
    assert [round(v, 2) for v in tile_of_point(internvl, 250, 350)] == [0, 233.33, 290.37]
    left, top, right, bottom = map_box(internvl, (400, 400, 600, 600))
    assert [round(v, 2) for v in (left, top, right, bottom)] == [373.33, 331.85, 560.0, 497.78]
    touched = [
        i
        for i, (tl, tt, tr, tb) in enumerate(internvl["tile_boxes"])
        if left < tr and right > tl and top < tb and bottom > tt
    ]
    assert touched == [0, 1, 4, 5]

    qwen = get_strategy("qwen2.5-vl").plan(1920, 1080).metadata()
    assert qwen["content_box"] == [0, 0, 1932, 1092] and qwen["image_grid_thw"] == [1, 78, 138]
    assert [round(v, 2) for v in map_box(qwen, (100, 200, 400, 500))] == [100.62, 202.22, 402.5, 505.56]
    _, qx, qy = tile_of_point(qwen, 250, 350)
    assert (int(qx // 14), int(qy // 14)) == (17, 25)

    llava = get_strategy("llava-next").plan(1920, 1080).metadata()
    assert llava["content_box"] == [0, 147, 672, 525]
    assert map_box(llava, (100, 200, 400, 500)) == (35.0, 217.0, 140.0, 322.0)

    ixc = get_strategy("xcomposer2.5")
    single, multi = ixc.plan(1920, 1080).metadata(), ixc.for_sample(2).plan(1920, 1080).metadata()
    assert [round(v, 2) for v in map_box(single, (100, 200, 400, 500))] == [116.67, 233.33, 466.67, 583.33]
    assert multi["content_box"] == [0, 0, 1680, 945]
    assert map_box(multi, (100, 200, 400, 500)) == (87.5, 175.0, 350.0, 437.5)


def test_map_point_with_padding_offset() -> None:
    """llava-next 640x480 -> 672x504 centred on 672x672 (content_box [0, 84, 672, 588])."""
    meta = get_strategy("llava-next").plan(640, 480).metadata()
    assert meta["content_box"] == [0, 84, 672, 588]
    assert map_point(meta, 0, 0) == (0.0, 84.0)
    assert map_point(meta, 640, 480) == (672.0, 588.0)
    assert map_point(meta, 320, 240) == (336.0, 336.0)
    assert tile_of_point(meta, 320, 240) == (3, 0.0, 0.0)  # a shared corner belongs to the tile after it


def test_transposed_canvas_needs_no_swap() -> None:
    """xcomposer2.5 1080x1920 (hd 6): the transposed resize is transposed back, padding on the right."""
    meta = get_strategy("xcomposer2.5", hd_num=6).plan(1080, 1920).metadata()
    assert meta["transposed"] is True and meta["content_box"] == [0, 0, 945, 1680]
    assert map_point(meta, 1080, 0) == (945.0, 0.0)
    assert map_point(meta, 0, 1920) == (0.0, 1680.0)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m: map_point(m, -1, 5), "outside"),
        (lambda m: map_point(m, 5, 1081), "outside"),
        (lambda m: map_box(m, (10, 10, 5, 20)), "left <= right"),
        (lambda m: tile_of_point(m, 2000, 5), "outside"),
        (lambda m: map_point({"orig_width": 5}, 1, 1), "orig_height"),
        (lambda m: map_point({**m, "content_box": [0, 0, 10]}, 1, 1), "content_box"),
        (lambda m: tile_of_point({**m, "tile_boxes": []}, 1, 1), "tile_boxes"),
    ],
)
def test_grounding_errors(call: Any, match: str) -> None:
    meta = get_strategy("internvl").plan(1920, 1080).metadata()
    with pytest.raises(ValueError, match=match):
        call(meta)
