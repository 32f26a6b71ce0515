"""LLaVA-NeXT (v1.6) and LLaVA-OneVision anyres: parity with transformers and with the original repositories.

References:
* transformers 5.23 `LlavaNextImageProcessorPil` / `LlavaOnevisionImageProcessorPil`, configured as the
  llava-hf checkpoints' preprocessor_config.json (llava-v1.6: shortest_edge 336, crop 336, CLIP mean/std;
  onevision-ov: 384x384, mean = std = 0.5), and the token counts of `LlavaNextProcessor` /
  `LlavaOnevisionProcessor._get_num_multimodal_tokens` with the checkpoints' processor_config.json;
* the original haotian-liu/LLaVA (`llava/mm_utils.py`, `llava/model/llava_arch.py`) and LLaVA-VL/LLaVA-NeXT
  anyres code, restated below, for `pinpoint_order="wh"`.
"""

from __future__ import annotations

import functools
import json
import math
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import LlavaNextImageProcessorPil, LlavaOnevisionImageProcessorPil
from transformers.image_processing_utils import get_patch_output_size
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ChannelDimension
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor
from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

from vlmtile import get_strategy
from vlmtile.strategies import get_preset
from vlmtile.strategies.base import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD, normalization_table
from vlmtile.strategies.llava import LlavaNext

NAMES = ("llava-next", "llava-onevision")
V16_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
OV_PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
OV_PINPOINT_STRING = ",".join(f"({i}x{j})" for i in range(1, 7) for j in range(1, 7))  # "(1x1),...,(6x6)"


# ---------------------------------------------------------------------------------------------------------
# transformers references


@functools.cache
def image_processor(name: str) -> Any:
    """The Pil image processor configured as the llava-hf checkpoints' preprocessor_config.json."""
    if name == "llava-next":
        return LlavaNextImageProcessorPil(
            size={"shortest_edge": 336},
            crop_size={"height": 336, "width": 336},
            do_center_crop=True,
            resample=3,
            image_mean=OPENAI_CLIP_MEAN,
            image_std=OPENAI_CLIP_STD,
            image_grid_pinpoints=V16_PINPOINTS,
        )
    # The class defaults to CLIP mean/std; the onevision-*-ov-hf checkpoints set 0.5 / 0.5.
    return LlavaOnevisionImageProcessorPil(
        size={"height": 384, "width": 384},
        resample=3,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        image_grid_pinpoints=OV_PINPOINTS,
    )


@functools.cache
def token_processor(name: str) -> Any:
    """The processor whose `_get_num_multimodal_tokens` counts placeholder tokens.

    Its constructor insists on a real tokenizer (class check, convert_tokens_to_ids), which these tests do not
    have; the token methods only read the attributes set here, so the object is built without __init__,
    with the checkpoints' processor_config.json values.
    """
    if name == "llava-next":
        proc = LlavaNextProcessor.__new__(LlavaNextProcessor)
        proc.patch_size = 14
        proc.num_additional_image_tokens = 1
        proc.vision_feature_select_strategy = "default"
    else:
        proc = LlavaOnevisionProcessor.__new__(LlavaOnevisionProcessor)
        proc.num_image_tokens = 729
        proc.vision_feature_select_strategy = "full"
        proc.vision_aspect_ratio = "anyres_max_9"
    proc.image_processor = image_processor(name)
    return proc


def hf_tokens(name: str, width: int, height: int) -> int:
    data = token_processor(name)._get_num_multimodal_tokens(image_sizes=[[height, width]])
    return int(data.num_image_tokens[0])


def hf_grid(name: str, width: int, height: int) -> tuple[int, int]:
    """(cols, rows) of the pinpoint transformers picks: select_best_resolution reads pairs as (h, w)."""
    tile = 336 if name == "llava-next" else 384
    best_h, best_w = hf_select_best_resolution((height, width), image_processor(name).image_grid_pinpoints)
    return best_w // tile, best_h // tile


def check_geometry_vs_transformers(name: str, width: int, height: int) -> None:
    """Grid, canvas, content box (resize-to-fit + floor-centred padding) and tokens, from transformers' own
    functions; the image is a zero-cost broadcast array, only its shape is read."""
    plan = get_strategy(name).plan(width, height)
    tile = plan.shape[-1]
    best_h, best_w = hf_select_best_resolution((height, width), image_processor(name).image_grid_pinpoints)
    assert (plan.resized_width, plan.resized_height) == (best_w, best_h)
    assert plan.grid == (best_w // tile, best_h // tile)
    shape_only = np.broadcast_to(np.uint8(0), (3, height, width))
    new_h, new_w = get_patch_output_size(shape_only, (best_h, best_w), ChannelDimension.FIRST)
    (top, _), (left, _) = image_processor(name)._get_padding_size((new_h, new_w), (best_h, best_w))
    assert plan.image_box == (left, top, left + new_w, top + new_h)
    assert plan.num_tokens == hf_tokens(name, width, height)


def assert_identical(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != reference {expected.shape}"
    assert actual.dtype == np.float32 and expected.dtype == np.float32, what
    if not np.array_equal(actual, expected):
        diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
        pytest.fail(f"{what}: max abs diff {diff.max():.3g}, {np.count_nonzero(diff)} of {diff.size} differ")


def check_vs_transformers(name: str, image: Image.Image) -> None:
    result = get_strategy(name).process(image)
    ref = image_processor(name)(image, return_tensors="np")
    assert ref["pixel_values"].shape[0] == 1
    assert_identical(result.pixel_values, ref["pixel_values"][0], name)
    meta = result.metadata
    assert [meta["image_sizes"]] == ref["image_sizes"].tolist()
    assert meta["num_tokens"] == hf_tokens(name, image.width, image.height)
    assert tuple(meta["grid"]) == hf_grid(name, image.width, image.height)


# ---------------------------------------------------------------------------------------------------------
# Pixel parity with transformers

MODES = ("RGB", "L", "RGBA", "P+trns", "CMYK")
SMALL_SIZES = (
    (1, 1),
    (2, 3),
    (100, 100),
    (200, 100),
    (110, 352),
    (336, 336),
    (337, 335),
    (672, 336),
    (640, 480),
)
LARGE_SIZES = ((1920, 1080), (1080, 1920), (3000, 500), (500, 3000))  # RGB only


def _cases() -> list[Any]:
    cases = []
    for seed, (w, h) in enumerate(SMALL_SIZES):
        for mode in MODES:
            cases.append(pytest.param(w, h, mode, seed, id=f"{w}x{h}-{mode}"))
    for w, h in LARGE_SIZES:
        cases.append(pytest.param(w, h, "RGB", w + h, id=f"{w}x{h}-RGB"))
    for mode in ("P", "LA", "1"):  # no further conversion subtleties: one size each
        cases.append(pytest.param(200, 100, mode, 11, id=f"200x100-{mode}"))
    return cases


_IMAGES: dict[tuple[int, int, str, int], Image.Image] = {}


def cached_image(make_image: Any, width: int, height: int, mode: str, seed: int) -> Image.Image:
    """Each generated image once for both presets (palette quantization is slow); nothing mutates it."""
    key = (width, height, mode, seed)
    if key not in _IMAGES:
        _IMAGES[key] = make_image(width, height, mode, seed)
    return _IMAGES[key]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("width", "height", "mode", "seed"), _cases())
def test_matches_transformers(make_image, name, width, height, mode, seed):
    check_vs_transformers(name, cached_image(make_image, width, height, mode, seed))


def _open(path: Path) -> Image.Image:
    image = Image.open(path)
    image.load()
    return image


@pytest.mark.parametrize("name", NAMES)
def test_sample_matches_transformers(sample_path, name):
    check_vs_transformers(name, _open(sample_path))


# ---------------------------------------------------------------------------------------------------------
# Token counts and grids against the processors' own formulas, over many sizes

sides = st.integers(1, 20000)


@st.composite
def extreme_sizes(draw: st.DrawFn) -> tuple[int, int]:
    short = draw(st.integers(1, 40))
    long = draw(st.integers(1, 200_000))
    return (long, short) if draw(st.booleans()) else (short, long)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=800, deadline=None)
@given(size=st.one_of(st.tuples(sides, sides), st.tuples(st.integers(1, 2500), st.integers(1, 2500))))
def test_geometry_and_tokens_match_processor(name, size):
    check_geometry_vs_transformers(name, *size)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=500, deadline=None)
@given(size=extreme_sizes())
def test_geometry_and_tokens_match_processor_extreme(name, size):
    check_geometry_vs_transformers(name, *size)


# ---------------------------------------------------------------------------------------------------------
# Worked examples (docs/strategies.md section 3), as fixed expectations

NEXT_EXAMPLES = [
    # width, height, grid (cols, rows), unpadded feature grid (rows, cols), tokens (transformers)
    (1920, 1080, (2, 2), (28, 48), 1948),
    (1080, 1920, (2, 2), (48, 28), 1968),
    (800, 600, (2, 2), (36, 48), 2340),
    (640, 480, (2, 2), (36, 48), 2340),
    (1024, 768, (2, 2), (36, 48), 2340),
    (1000, 1000, (2, 2), (48, 48), 2928),
    (1344, 336, (3, 1), (18, 72), 1890),
    (500, 1500, (1, 3), (72, 24), 2376),
    (300, 900, (1, 3), (72, 24), 2376),
    (336, 336, (2, 1), (24, 24), 1176),
    (100, 100, (2, 1), (24, 24), 1176),
    (200, 100, (2, 1), (24, 48), 1752),
    (110, 352, (1, 2), (48, 16), 1392),
]


@pytest.mark.parametrize(("width", "height", "grid", "features", "tokens"), NEXT_EXAMPLES)
def test_llava_next_worked_examples(width, height, grid, features, tokens):
    plan = get_strategy("llava-next").plan(width, height)
    assert plan.grid == grid
    assert dict(plan.extra)["feature_grid"] == features
    assert plan.num_tokens == tokens == 576 + features[0] * (features[1] + 1)
    assert plan.shape == (1 + grid[0] * grid[1], 3, 336, 336)
    assert hf_tokens("llava-next", width, height) == tokens


ORIGINAL_NEXT_EXAMPLES = [
    # width, height, grid (cols, rows), tokens: the original (w, h) reading and int() unpad truncation
    (1920, 1080, (2, 2), 1948),
    (1080, 1920, (2, 2), 1968),
    (336, 336, (1, 2), 1176),
    (100, 100, (1, 2), 1176),
    (200, 100, (1, 2), 876),
    (110, 352, (1, 2), 1296),
]


@pytest.mark.parametrize(("width", "height", "grid", "tokens"), ORIGINAL_NEXT_EXAMPLES)
def test_llava_next_original_worked_examples(width, height, grid, tokens):
    plan = get_strategy("llava-next", pinpoint_order="wh").plan(width, height)
    assert plan.grid == grid
    assert plan.num_tokens == tokens == original_tokens(width, height, V16_PINPOINTS, 336, 24, 0)


OV_EXAMPLES = [
    # width, height, grid (cols, rows), final feature grid (rows, cols), tokens (original = transformers)
    (1920, 1080, (5, 3), (60, 108), 7269),
    (1080, 1920, (3, 5), (108, 60), 7317),
    (800, 600, (3, 2), (54, 73), 4725),
    (640, 480, (2, 2), (40, 54), 2929),
    (384, 384, (1, 1), (27, 27), 1485),
    (100, 100, (1, 1), (27, 27), 1485),
    (200, 100, (1, 1), (13, 27), 1093),
    (4000, 3000, (6, 5), (70, 93), 7309),
    (3000, 500, (6, 1), (27, 162), 5130),
    (1000, 1000, (3, 3), (81, 81), 7371),
]


@pytest.mark.parametrize(("width", "height", "grid", "features", "tokens"), OV_EXAMPLES)
def test_llava_onevision_worked_examples(width, height, grid, features, tokens):
    for order in ("hw", "wh"):
        plan = get_strategy("llava-onevision", pinpoint_order=order).plan(width, height)
        assert plan.grid == grid
        assert dict(plan.extra)["feature_grid"] == features
        assert plan.num_tokens == tokens == 729 + features[0] * (features[1] + 1)
        assert plan.shape == (1 + grid[0] * grid[1], 3, 384, 384)
    assert hf_tokens("llava-onevision", width, height) == tokens
    assert (
        original_tokens(width, height, parse_pinpoint_string(OV_PINPOINT_STRING, 384), 384, 27, 9) == tokens
    )


# ---------------------------------------------------------------------------------------------------------
# The original repositories, restated (pinpoint_order="wh")


def original_select_best_resolution(original_size, possible_resolutions):
    """mm_utils.select_best_resolution: sizes and pinpoints as (width, height)."""
    original_width, original_height = original_size
    best_fit = None
    max_effective_resolution = 0
    min_wasted_resolution = float("inf")
    for width, height in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        downscaled_width = int(original_width * scale)
        downscaled_height = int(original_height * scale)
        effective_resolution = min(downscaled_width * downscaled_height, original_width * original_height)
        wasted_resolution = width * height - effective_resolution
        if effective_resolution > max_effective_resolution or (
            effective_resolution == max_effective_resolution and wasted_resolution < min_wasted_resolution
        ):
            max_effective_resolution = effective_resolution
            min_wasted_resolution = wasted_resolution
            best_fit = (width, height)
    return best_fit


def original_resize_and_pad_image(image: Image.Image, target_resolution) -> Image.Image:
    """mm_utils.resize_and_pad_image: fit (ceil on the free side), paste centred on black."""
    original_width, original_height = image.size
    target_width, target_height = target_resolution
    scale_w = target_width / original_width
    scale_h = target_height / original_height
    if scale_w < scale_h:
        new_width = target_width
        new_height = min(math.ceil(original_height * scale_w), target_height)
    else:
        new_height = target_height
        new_width = min(math.ceil(original_width * scale_h), target_width)
    resized = image.resize((new_width, new_height))  # Pillow's default filter (BICUBIC)
    canvas = Image.new("RGB", (target_width, target_height), (0, 0, 0))
    canvas.paste(resized, ((target_width - new_width) // 2, (target_height - new_height) // 2))
    return canvas


def original_divide_to_patches(image: Image.Image, patch_size: int) -> list[Image.Image]:
    width, height = image.size
    return [
        image.crop((j, i, j + patch_size, i + patch_size))
        for i in range(0, height, patch_size)
        for j in range(0, width, patch_size)
    ]


def parse_pinpoint_string(text: str, tile: int) -> list[list[int]]:
    """LLaVA-NeXT's "(1x1),...,(6x6)" grid notation -> pixel pinpoints, in the string's order."""
    return [[int(a) * tile, int(b) * tile] for a, b in re.findall(r"\((\d+)x(\d+)\)", text)]


def original_process_anyres_image(image: Image.Image, pinpoints, tile: int, mean, std) -> np.ndarray:
    """process_anyres_image + the per-crop image processor (resize / crop are no-ops at `tile`):
    transformers' numpy rescale (float64 * 1/255 -> float32) and float32 normalize."""
    image = image.convert("RGB")  # the repositories' Image.open(...).convert("RGB"): alpha dropped
    best = original_select_best_resolution(image.size, pinpoints)
    patches = original_divide_to_patches(original_resize_and_pad_image(image, best), tile)
    crops = [image.resize((tile, tile)), *patches]
    mean32 = np.asarray(mean, dtype=np.float32)[:, None, None]
    std32 = np.asarray(std, dtype=np.float32)[:, None, None]
    out = []
    for crop in crops:
        x = (np.asarray(crop).transpose(2, 0, 1).astype(np.float64) * (1 / 255)).astype(np.float32)
        out.append((x - mean32) / std32)
    return np.stack(out)


def original_tokens(width: int, height: int, pinpoints, tile: int, side: int, max_num_patches: int) -> int:
    """llava_arch: get_anyres_image_grid_shape, unpad_image (int() truncation, tensor slicing), the
    anyres_max `times > 1.1` downscale, one image_newline per row, the base image's features first."""
    best_w, best_h = original_select_best_resolution((width, height), pinpoints)
    cols, rows = best_w // tile, best_h // tile
    current_height, current_width = rows * side, cols * side
    if width / height > current_width / current_height:
        new_height = int(height * (current_width / width))
        padding = (current_height - new_height) // 2
        h, w = len(range(current_height)[padding : current_height - padding]), current_width
    else:
        new_width = int(width * (current_height / height))
        padding = (current_width - new_width) // 2
        h, w = current_height, len(range(current_width)[padding : current_width - padding])
    if max_num_patches:
        times = math.sqrt(h * w / (max_num_patches * side**2))
        if times > 1.1:
            h, w = int(h // times), int(w // times)
    return side * side + h * (w + 1)


ORIGINALS = {
    # name: (pinpoints as the original reads them, tile, features per side, anyres_max N, mean, std)
    "llava-next": (V16_PINPOINTS, 336, 24, 0, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    "llava-onevision": (parse_pinpoint_string(OV_PINPOINT_STRING, 384), 384, 27, 9, [0.5] * 3, [0.5] * 3),
}

ORIGINAL_CASES = [
    pytest.param(w, h, mode, id=f"{w}x{h}-{mode}")
    for (w, h) in ((1, 1), (2, 3), (100, 100), (200, 100), (110, 352), (336, 336), (337, 335), (640, 480))
    for mode in ("RGB", "RGBA")
] + [pytest.param(w, h, "RGB", id=f"{w}x{h}-RGB") for (w, h) in ((1920, 1080), (500, 3000))]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("width", "height", "mode"), ORIGINAL_CASES)
def test_wh_matches_original(make_image, name, width, height, mode):
    image = cached_image(make_image, width, height, mode, 5)
    pinpoints, tile, side, max_n, mean, std = ORIGINALS[name]
    result = get_strategy(name, pinpoint_order="wh", alpha="drop").process(image)
    assert_identical(
        result.pixel_values, original_process_anyres_image(image, pinpoints, tile, mean, std), name
    )
    assert result.plan.num_tokens == original_tokens(width, height, pinpoints, tile, side, max_n)


@pytest.mark.parametrize("name", NAMES)
def test_sample_wh_matches_original(sample_path, name):
    image = _open(sample_path)
    pinpoints, tile, side, max_n, mean, std = ORIGINALS[name]
    result = get_strategy(name, pinpoint_order="wh", alpha="drop").process(image)
    assert_identical(
        result.pixel_values, original_process_anyres_image(image, pinpoints, tile, mean, std), name
    )
    assert result.plan.num_tokens == original_tokens(image.width, image.height, pinpoints, tile, side, max_n)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=800, deadline=None)
@given(
    size=st.one_of(
        st.tuples(sides, sides), st.tuples(st.integers(1, 2500), st.integers(1, 2500)), extreme_sizes()
    )
)
def test_wh_tokens_and_grid_match_original(name, size):
    width, height = size
    pinpoints, tile, side, max_n, _, _ = ORIGINALS[name]
    plan = get_strategy(name, pinpoint_order="wh").plan(width, height)
    best_w, best_h = original_select_best_resolution((width, height), pinpoints)
    assert plan.grid == (best_w // tile, best_h // tile)
    assert (plan.resized_width, plan.resized_height) == (best_w, best_h)
    assert plan.num_tokens == original_tokens(width, height, pinpoints, tile, side, max_n)


# Sizes where int() truncation (original) and int(round(x, 7)) (transformers) give different unpadded counts.
TRUNCATION_CASES = [
    ("llava-next", 110, 352, 1296, 1392),
    ("llava-next", 352, 110, 1262, 1360),
    ("llava-next", 47, 1128, 792, 936),
    ("llava-onevision", 820, 1107, 5589, 5751),
    ("llava-onevision", 1375, 750, 6075, 6183),
]


@pytest.mark.parametrize(("name", "width", "height", "original", "hf"), TRUNCATION_CASES)
def test_unpad_truncation_differs(name, width, height, original, hf):
    pinpoints, tile, side, max_n, _, _ = ORIGINALS[name]
    hw = get_strategy(name).plan(width, height)
    wh = get_strategy(name, pinpoint_order="wh").plan(width, height)
    assert hw.grid == wh.grid
    assert wh.num_tokens == original_tokens(width, height, pinpoints, tile, side, max_n)
    assert hw.num_tokens == hf_tokens(name, width, height)
    assert (wh.num_tokens, hw.num_tokens) == (original, hf)


def test_pinpoint_orders_differ_only_for_small_images():
    """llava-next: (w, h) vs (h, w) reading picks transposed grids when both sides are <= 336 (every
    pinpoint then holds the whole image; 336x672 and 672x336 tie and the first listed wins), and the same
    grid otherwise (sampled; degenerate sizes beyond 1:1000 aspect, where every pinpoint's effective
    resolution truncates to 0, also tie)."""
    hw, wh = get_strategy("llava-next"), get_strategy("llava-next", pinpoint_order="wh")
    for width in range(1, 337, 5):
        for height in range(1, 337, 7):
            assert hw.plan(width, height).grid == (2, 1)
            assert wh.plan(width, height).grid == (1, 2)
    rng = random.Random(0)
    checked = 0
    while checked < 3000:
        width, height = rng.randint(1, 5000), rng.randint(1, 5000)
        if max(width, height) <= 336 or max(width, height) > 1000 * min(width, height):
            continue
        assert hw.plan(width, height).grid == wh.plan(width, height).grid, (width, height)
        checked += 1


# ---------------------------------------------------------------------------------------------------------
# Layout, padding, metadata, parameters


def test_base_image_first_and_black_padding(make_image):
    """View 0 is the squashed whole image; the padding inside the tiles is uint8 0 (black) before
    normalization, i.e. -mean/std after it."""
    image = make_image(3000, 500, "RGB", 2)
    strategy = get_strategy("llava-next")
    plan = strategy.plan(3000, 500)
    assert plan.grid == (3, 1) and (plan.resized_width, plan.resized_height) == (1008, 336)
    assert plan.image_box == (0, 84, 1008, 252)  # 3000x500 -> 1008x168, centred
    _, top, _, bottom = plan.image_box
    pixels = strategy.render(image, plan)
    assert np.array_equal(
        pixels[0], np.asarray(image.resize((336, 336), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    )
    tiles = pixels[1:]
    assert not tiles[:, :, :top].any() and not tiles[:, :, bottom:].any()
    values = strategy.normalize(pixels)
    table = normalization_table(CLIP_MEAN, CLIP_STD)
    for c in range(3):
        assert np.all(values[1:, c, :top] == table[c, 0])


def test_metadata(make_image):
    plan = get_strategy("llava-next").plan(640, 480)
    meta = plan.metadata()
    assert meta["image_sizes"] == [480, 640]
    assert meta["content_box"] == [0, 84, 672, 588]  # 640x480 -> 672x504, centred on 672x672
    assert meta["feature_grid"] == [36, 48]
    assert meta["thumbnail"] is True and meta["num_tiles"] == 5 and meta["grid"] == [2, 2]
    assert (meta["resized_width"], meta["resized_height"]) == (672, 672)
    assert plan.content_box == (0, 84, 672, 588)
    assert get_strategy("llava-next").plan(672, 336).content_box is None  # no padding: the whole canvas


def test_views_undo_the_layout(make_image):
    strategy = get_strategy("llava-onevision")
    image = make_image(900, 500, "RGB", 4)
    plan = strategy.plan(900, 500)
    pixels = strategy.render(image, plan)
    (_, canvas), (_, base) = strategy.views(pixels, plan)
    assert canvas.shape == (plan.resized_height, plan.resized_width, 3)
    left, top, right, bottom = plan.image_box
    resized = image.resize((right - left, bottom - top), Image.Resampling.BICUBIC)
    assert np.array_equal(canvas[top:bottom, left:right], np.asarray(resized))
    assert not canvas[:top].any() and not canvas[bottom:].any()
    assert np.array_equal(base, np.asarray(image.resize((384, 384), Image.Resampling.BICUBIC)))
    assert set(LlavaNext.metadata_fields) == {"image_sizes", "feature_grid"}  # content_box: a base field


@pytest.mark.parametrize("name", NAMES)
def test_params_round_trip_through_json(name):
    """The manifest stores params() as JSON and compares it on read: pinpoints are a flat int tuple."""
    params = get_strategy(name).params()
    assert json.loads(json.dumps(params)) == params


def test_preset_constants():
    nxt, ov = get_strategy("llava-next"), get_strategy("llava-onevision")
    assert isinstance(nxt, LlavaNext) and isinstance(ov, LlavaNext)
    assert [
        list(p) for p in zip(nxt.image_grid_pinpoints[::2], nxt.image_grid_pinpoints[1::2], strict=True)
    ] == (LlavaNextImageProcessorPil.image_grid_pinpoints)
    assert [
        list(p) for p in zip(ov.image_grid_pinpoints[::2], ov.image_grid_pinpoints[1::2], strict=True)
    ] == (LlavaOnevisionImageProcessorPil.image_grid_pinpoints)
    assert (nxt.tile_size, nxt.features_per_side, nxt.max_num_patches) == (336, 24, 0)
    assert (ov.tile_size, ov.features_per_side, ov.max_num_patches) == (384, 27, 9)
    assert nxt.features_per_side == 336 // 14 and ov.features_per_side**2 == 729
    assert (nxt.mean, nxt.std) == (CLIP_MEAN, CLIP_STD)
    assert list(nxt.mean) == list(OPENAI_CLIP_MEAN) and list(nxt.std) == list(OPENAI_CLIP_STD)
    assert (ov.mean, ov.std) == (SIGLIP_MEAN, SIGLIP_STD)
    assert nxt.pinpoint_order == ov.pinpoint_order == "hw"
    assert nxt.alpha == ov.alpha == "white"
    assert get_preset("llava-v1.6").name == "llava-next"
    assert get_preset("llava_ov").name == "llava-onevision"


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"pinpoint_order": "xy"}, "pinpoint_order"),
        ({"pinpoint_order": "HW"}, "pinpoint_order"),
        ({"image_grid_pinpoints": (336,)}, "pairs"),
        ({"image_grid_pinpoints": ()}, "pairs"),
        ({"image_grid_pinpoints": (336, 600)}, "multiple"),
        ({"image_grid_pinpoints": (336, 0)}, "multiple"),
        ({"image_grid_pinpoints": (336, True)}, "integers"),
    ],
)
def test_invalid_parameters(params, match):
    with pytest.raises(ValueError, match=match):
        LlavaNext(name="llava-next", **params)


def test_pinpoint_order_is_the_only_new_knob():
    with pytest.raises(ValueError, match="valid parameters"):
        get_strategy("llava-next", image_grid_pinpoints=(336, 336))
    assert get_strategy("llava-onevision", pinpoint_order="wh").pinpoint_order == "wh"
