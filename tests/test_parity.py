"""Reference parity: vlmtile's float32 pixel_values must equal the reference's bit for bit.

References:
* transformers 5.23 `GotOcr2ImageProcessorPil` as the InternVL3 `-hf` checkpoints configure it, and
  `Qwen2VLImageProcessorPil` with the Qwen2/2.5-VL checkpoints' budget and with its class default;
* the original OpenGVLab/InternVL `load_image` / `dynamic_preprocess` / `build_transform`, restated below
  from its description (docs/strategies.md section 1), with torchvision's ToTensor + Normalize arithmetic.
"""

from __future__ import annotations

import gc
import math
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps
from transformers import GotOcr2ImageProcessorPil, Qwen2VLImageProcessorPil
from transformers.image_transforms import convert_to_rgb
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
)
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas
from transformers.models.internvl.processing_internvl import InternVLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor

from vlmtile import get_strategy
from vlmtile.dtypes import decode_pixels, render_stored
from vlmtile.strategies.base import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    gather,
    image_view,
    normalization_table,
    to_rgb,
)

TILE = 448
QWEN_CHECKPOINT_MAX = 12845056  # Qwen2-VL / Qwen2.5-VL preprocessor_config.json (16384 * 28 * 28)
QWEN_CLASS_DEFAULT_MAX = 1003520  # Qwen2VLImageProcessor class default (1280 * 28 * 28)
QWEN_PRESETS = ("qwen2-vl", "qwen2.5-vl")


# ---------------------------------------------------------------------------------------------------------
# References


@cache
def got_processor(max_tiles: int) -> GotOcr2ImageProcessorPil:
    """GotOcr2ImageProcessorPil configured as the InternVL3 -hf checkpoints configure it."""
    return GotOcr2ImageProcessorPil(
        size={"height": TILE, "width": TILE},
        image_mean=IMAGENET_DEFAULT_MEAN,
        image_std=IMAGENET_DEFAULT_STD,
        crop_to_patches=True,
        min_patches=1,
        max_patches=max_tiles,
    )


@cache
def qwen_processor(max_pixels: int) -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=max_pixels)


@cache
def reference_grids(min_num: int, max_num: int) -> tuple[tuple[int, int], ...]:
    """The original's candidate grids: a Python set (its iteration order), then sorted by tile count."""
    grids = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    }
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def reference_closest_grid(width: int, height: int, min_num: int, max_num: int) -> tuple[int, int]:
    """The original's find_closest_aspect_ratio: float64 diffs, exact ties go to the later grid if the
    image covers more than half of that grid's area."""
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in reference_grids(min_num, max_num):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * TILE * TILE * cols * rows:
            best = (cols, rows)
    return best


def reference_internvl(image: Image.Image, max_num: int = 12) -> np.ndarray:
    """The original load_image + dynamic_preprocess + build_transform, as float32 (N, 3, 448, 448)."""
    image = image.convert("RGB")  # load_image: Image.open(...).convert("RGB"), alpha dropped
    cols, rows = reference_closest_grid(image.width, image.height, 1, max_num)
    big = image.resize((TILE * cols, TILE * rows))  # Pillow default filter
    tiles = [
        big.crop(((k % cols) * TILE, (k // cols) * TILE, (k % cols + 1) * TILE, (k // cols + 1) * TILE))
        for k in range(cols * rows)
    ]
    if len(tiles) != 1:
        tiles.append(image.resize((TILE, TILE)))
    mean = np.asarray(IMAGENET_DEFAULT_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(IMAGENET_DEFAULT_STD, dtype=np.float32)[:, None, None]
    out = []
    for tile in tiles:
        tile = tile.convert("RGB").resize((TILE, TILE), Image.Resampling.BICUBIC)  # T.Lambda, T.Resize
        x = np.asarray(tile).transpose(2, 0, 1).astype(np.float32) / np.float32(255)  # T.ToTensor
        out.append((x - mean) / std)  # T.Normalize
    return np.stack(out)


def assert_identical(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    """Exact equality (dtype, shape, bits), with the max abs diff in the failure message."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != reference {expected.shape}"
    assert actual.dtype == np.float32, f"{what}: dtype {actual.dtype}"
    assert expected.dtype == np.float32, f"{what}: reference dtype {expected.dtype}"
    if not np.array_equal(actual, expected):
        diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
        where = tuple(int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape))
        pytest.fail(
            f"{what}: max abs diff {diff.max():.3g} at {where}; "
            f"{np.count_nonzero(diff)} of {diff.size} values differ"
        )


def check_internvl_vs_transformers(image: Image.Image, max_tiles: int = 12) -> None:
    result = get_strategy("internvl", max_tiles=max_tiles).process(image)
    ref = got_processor(max_tiles)(image, return_tensors="np")
    assert_identical(result.pixel_values, ref["pixel_values"], f"internvl max_tiles={max_tiles}")
    assert ref["num_patches"].tolist() == [result.plan.num_tiles]
    assert result.plan.shape == ref["pixel_values"].shape


def check_internvl_vs_original(image: Image.Image, max_tiles: int = 12) -> None:
    result = get_strategy("internvl", alpha="drop", max_tiles=max_tiles).process(image)
    assert_identical(result.pixel_values, reference_internvl(image, max_tiles), "internvl vs original")


def check_qwen_vs_transformers(image: Image.Image, max_pixels: int) -> None:
    ref = qwen_processor(max_pixels)(image, return_tensors="np")
    (grid_thw,) = ref["image_grid_thw"].tolist()
    for name in QWEN_PRESETS:
        strategy = (
            get_strategy(name)
            if max_pixels == QWEN_CHECKPOINT_MAX
            else get_strategy(name, max_pixels=max_pixels)
        )
        result = strategy.process(image)
        assert_identical(result.pixel_values, ref["pixel_values"], f"{name} max_pixels={max_pixels}")
        plan = result.plan
        assert list(dict(plan.extra)["image_grid_thw"]) == grid_thw
        assert plan.metadata()["image_grid_thw"] == grid_thw
        assert plan.num_tokens == grid_thw[1] * grid_thw[2] // 4
        assert (plan.resized_height, plan.resized_width) == (grid_thw[1] * 14, grid_thw[2] * 14)


# ---------------------------------------------------------------------------------------------------------
# The image spread: generated sizes x modes, plus every file in sample_data/

MODES = ("RGB", "L", "RGBA", "P+trns", "CMYK", "LA")
SMALL_SIZES = (
    (1, 1),
    (2, 3),
    (27, 29),
    (28, 28),
    (56, 56),
    (447, 449),
    (448, 448),
    (250, 100),
    (300, 120),
    (1000, 400),
    (200, 1),
    (1, 200),
    (10, 1000),
)
LARGE_SIZES = ((896, 448), (1920, 1080), (1080, 1920), (3000, 500), (4100, 300))  # RGB only


def _cases() -> list[pytest.ParameterSet]:
    cases = []
    for seed, (w, h) in enumerate(SMALL_SIZES):
        for mode in MODES:
            cases.append(pytest.param(w, h, mode, seed, id=f"{w}x{h}-{mode}"))
    for w, h in LARGE_SIZES:
        cases.append(pytest.param(w, h, "RGB", w + h, id=f"{w}x{h}-RGB"))
    # Modes with no alpha band and no conversion subtleties beyond Pillow's own: a few sizes suffice.
    for mode in ("P", "1", "I;16"):
        for w, h in ((27, 29), (1000, 400)):
            cases.append(pytest.param(w, h, mode, 7, id=f"{w}x{h}-{mode}"))
    return cases


CASES = _cases()
# The max_tiles sweep (6 and 1) runs on RGB plus one transparent mode, which is enough to exercise the
# grid choice and the no-thumbnail path; every other mode only changes the RGB conversion.
TILE_SWEEP_CASES = [c for c in CASES if c.values[2] in ("RGB", "RGBA")]


@pytest.mark.parametrize(("width", "height", "mode", "seed"), CASES)
def test_internvl_matches_transformers(make_image, width, height, mode, seed):
    check_internvl_vs_transformers(make_image(width, height, mode, seed))


@pytest.mark.parametrize("max_tiles", [6, 1])
@pytest.mark.parametrize(("width", "height", "mode", "seed"), TILE_SWEEP_CASES)
def test_internvl_max_tiles_matches_transformers(make_image, width, height, mode, seed, max_tiles):
    check_internvl_vs_transformers(make_image(width, height, mode, seed), max_tiles)


@pytest.mark.parametrize(("width", "height", "mode", "seed"), CASES)
def test_internvl_drop_alpha_matches_original(make_image, width, height, mode, seed):
    check_internvl_vs_original(make_image(width, height, mode, seed))


@pytest.mark.parametrize("max_tiles", [6, 1])
@pytest.mark.parametrize(("width", "height", "mode", "seed"), TILE_SWEEP_CASES)
def test_internvl_drop_alpha_max_tiles_matches_original(make_image, width, height, mode, seed, max_tiles):
    check_internvl_vs_original(make_image(width, height, mode, seed), max_tiles)


@pytest.mark.parametrize("max_pixels", [QWEN_CHECKPOINT_MAX, QWEN_CLASS_DEFAULT_MAX])
@pytest.mark.parametrize(("width", "height", "mode", "seed"), CASES)
def test_qwen_matches_transformers(make_image, width, height, mode, seed, max_pixels):
    check_qwen_vs_transformers(make_image(width, height, mode, seed), max_pixels)


def test_sample_data_is_complete(sample_paths):
    assert len(sample_paths) == 13, [p.name for p in sample_paths]


def _open(path: Path) -> Image.Image:
    image = Image.open(path)
    image.load()
    return image


def test_sample_internvl_matches_transformers(sample_path):
    check_internvl_vs_transformers(_open(sample_path))


def test_sample_internvl_drop_alpha_matches_original(sample_path):
    check_internvl_vs_original(_open(sample_path))


@pytest.mark.parametrize("max_pixels", [QWEN_CHECKPOINT_MAX, QWEN_CLASS_DEFAULT_MAX])
def test_sample_qwen_matches_transformers(sample_path, max_pixels):
    check_qwen_vs_transformers(_open(sample_path), max_pixels)


# ---------------------------------------------------------------------------------------------------------
# Aspect-ratio limit (Qwen): strictly more than 200:1 is refused, exactly 200:1 is accepted


@pytest.mark.parametrize("name", QWEN_PRESETS)
@pytest.mark.parametrize(("width", "height"), [(1000, 1), (1, 201), (201, 1), (2, 401), (5000, 24)])
def test_qwen_refuses_aspect_ratio_above_200(name, width, height):
    with pytest.raises(ValueError, match="aspect ratio"):
        get_strategy(name).plan(width, height)
    with pytest.raises(ValueError, match="aspect ratio"):
        hf_smart_resize(height, width, 28, 3136, QWEN_CHECKPOINT_MAX)


def test_qwen_refuses_aspect_ratio_above_200_on_pixels(make_image):
    image = make_image(1000, 1, "RGB", 0)
    with pytest.raises(ValueError, match="aspect ratio"):
        get_strategy("qwen2-vl").process(image)
    with pytest.raises(ValueError, match="aspect ratio"):
        qwen_processor(QWEN_CHECKPOINT_MAX)(image, return_tensors="np")


@pytest.mark.parametrize(("width", "height"), [(200, 1), (1, 200), (400, 2), (5600, 28)])
def test_qwen_accepts_aspect_ratio_200(make_image, width, height):
    for name in QWEN_PRESETS:
        plan = get_strategy(name).plan(width, height)
        assert (plan.resized_height, plan.resized_width) == hf_smart_resize(
            height, width, 28, 3136, QWEN_CHECKPOINT_MAX
        )
    check_qwen_vs_transformers(make_image(width, height, "RGB", 1), QWEN_CHECKPOINT_MAX)


# ---------------------------------------------------------------------------------------------------------
# Worked examples from docs/strategies.md (plans only), each also checked against transformers

INTERNVL_EXAMPLES = [
    # width, height, max_tiles, grid (cols, rows), tiles incl. thumbnail, image tokens
    (1920, 1080, 12, (4, 2), 9, 2304),
    (1080, 1920, 12, (2, 4), 9, 2304),
    (1920, 1080, 6, (2, 1), 3, 768),
    (2560, 1440, 12, (4, 2), 9, 2304),
    (3840, 2160, 12, (4, 2), 9, 2304),
    (800, 600, 12, (4, 3), 13, 3328),
    (640, 480, 12, (4, 3), 13, 3328),
    (1024, 768, 12, (4, 3), 13, 3328),
    (4000, 3000, 12, (4, 3), 13, 3328),
    (1024, 768, 6, (3, 2), 7, 1792),
    (1024, 1024, 12, (3, 3), 10, 2560),
    (3000, 500, 12, (6, 1), 7, 1792),
    (500, 3000, 12, (1, 6), 7, 1792),
    (448, 448, 12, (1, 1), 1, 256),
    (100, 100, 12, (1, 1), 1, 256),
    (1000, 400, 6, (3, 1), 4, 1024),
    (250, 100, 6, (2, 1), 3, 768),
    (1280, 720, 6, (2, 1), 3, 768),
    (1280, 720, 40, (7, 4), 29, 7424),
    (300, 120, 12, (5, 2), 11, 2816),
]


@pytest.mark.parametrize(("width", "height", "max_tiles", "grid", "tiles", "tokens"), INTERNVL_EXAMPLES)
def test_internvl_worked_examples(width, height, max_tiles, grid, tiles, tokens):
    plan = get_strategy("internvl", max_tiles=max_tiles).plan(width, height)
    assert plan.grid == grid
    assert plan.num_tiles == tiles
    assert plan.num_tokens == tokens
    assert (plan.resized_width, plan.resized_height) == (TILE * grid[0], TILE * grid[1])
    assert plan.shape == (tiles, 3, TILE, TILE)
    assert plan.thumbnail == (tiles > 1)
    # transformers and the original agree with the table
    assert get_optimal_tiled_canvas((height, width), (TILE, TILE), 1, max_tiles) == grid
    assert got_processor(max_tiles).get_number_of_image_patches(height, width) == tiles
    assert reference_closest_grid(width, height, 1, max_tiles) == grid


QWEN_EXAMPLES = [
    # width, height, max_pixels, resized (h, w) or None where the doc gives tokens only, tokens
    (1920, 1080, QWEN_CHECKPOINT_MAX, (1092, 1932), 2691),
    (1080, 1920, QWEN_CHECKPOINT_MAX, (1932, 1092), 2691),
    (640, 480, QWEN_CHECKPOINT_MAX, (476, 644), 391),
    (800, 600, QWEN_CHECKPOINT_MAX, (588, 812), 609),
    (100, 100, QWEN_CHECKPOINT_MAX, (112, 112), 16),
    (28, 28, QWEN_CHECKPOINT_MAX, (56, 56), 4),
    (10, 1000, QWEN_CHECKPOINT_MAX, (560, 28), 20),
    (4000, 3000, QWEN_CHECKPOINT_MAX, (2996, 4004), 15301),
    (8000, 6000, QWEN_CHECKPOINT_MAX, (3080, 4116), 16170),
    (333, 777, QWEN_CHECKPOINT_MAX, (784, 336), 336),
    (1920, 1080, QWEN_CLASS_DEFAULT_MAX, (728, 1316), 1222),
    (1080, 1920, QWEN_CLASS_DEFAULT_MAX, None, 1222),
    (640, 480, QWEN_CLASS_DEFAULT_MAX, None, 391),
    (800, 600, QWEN_CLASS_DEFAULT_MAX, None, 609),
    (100, 100, QWEN_CLASS_DEFAULT_MAX, None, 16),
    (28, 28, QWEN_CLASS_DEFAULT_MAX, None, 4),
    (10, 1000, QWEN_CLASS_DEFAULT_MAX, None, 20),
    (4000, 3000, QWEN_CLASS_DEFAULT_MAX, (840, 1148), 1230),
    (8000, 6000, QWEN_CLASS_DEFAULT_MAX, None, 1230),
    (333, 777, QWEN_CLASS_DEFAULT_MAX, None, 336),
]


@pytest.mark.parametrize("name", QWEN_PRESETS)
@pytest.mark.parametrize(("width", "height", "max_pixels", "resized", "tokens"), QWEN_EXAMPLES)
def test_qwen_worked_examples(name, width, height, max_pixels, resized, tokens):
    plan = get_strategy(name, max_pixels=max_pixels).plan(width, height)
    h, w = plan.resized_height, plan.resized_width
    if resized is not None:
        assert (h, w) == resized
    assert plan.num_tokens == tokens
    assert dict(plan.extra)["image_grid_thw"] == (1, h // 14, w // 14)
    assert plan.shape == ((h // 14) * (w // 14), 1176)
    # transformers agrees with the table
    assert hf_smart_resize(height, width, 28, 3136, max_pixels) == (h, w)
    assert qwen_processor(max_pixels).get_number_of_image_patches(height, width) // 4 == tokens


# ---------------------------------------------------------------------------------------------------------
# The InternVL grid rule against the original's candidate order (a Python set), beyond the worked examples


@settings(max_examples=400, deadline=None)
@given(
    width=st.integers(1, 20000),
    height=st.integers(1, 20000),
    max_tiles=st.integers(1, 40),
)
def test_internvl_grid_matches_original_candidate_order(width, height, max_tiles):
    plan = get_strategy("internvl", max_tiles=max_tiles).plan(width, height)
    assert plan.grid == reference_closest_grid(width, height, 1, max_tiles)


@pytest.mark.parametrize("max_tiles", [6, 12, 24, 40])
def test_internvl_grid_matches_original_on_exact_ties(max_tiles):
    """Sizes whose aspect ratio is exactly some grid's, and the area-rule boundary around it."""
    strategy = get_strategy("internvl", max_tiles=max_tiles)
    for cols, rows in reference_grids(1, max_tiles):
        for scale in (1, 7, 100, 223, 224, 225, 448):
            width, height = cols * scale, rows * scale
            assert strategy.plan(width, height).grid == reference_closest_grid(width, height, 1, max_tiles)


@pytest.mark.parametrize("max_tiles", [6, 12, 24, 40])
def test_internvl_grid_matches_original_on_area_boundary(max_tiles):
    """Every size whose area is exactly half a grid's pixel area (the tie-break's strict '>' boundary),
    e.g. 1008x896 = 0.5 * 448^2 * 9: the 2x2 / 3x3 tie stays 2x2."""
    strategy = get_strategy("internvl", max_tiles=max_tiles)
    checked = 0
    for n in range(1, max_tiles + 1):
        area = TILE * TILE * n // 2
        for width in range(1, math.isqrt(area) + 1):
            if area % width:
                continue
            for w, h in ((width, area // width), (area // width, width)):
                expected = reference_closest_grid(w, h, 1, max_tiles)
                assert strategy.plan(w, h).grid == expected, (w, h)
                assert get_optimal_tiled_canvas((h, w), (TILE, TILE), 1, max_tiles) == expected, (w, h)
                checked += 1
    assert checked > 100
    if max_tiles in (12, 24):  # with 40 tiles, 6x5 fits 1008x896 better than any square grid
        assert strategy.plan(1008, 896).grid == (2, 2)


# ---------------------------------------------------------------------------------------------------------
# Normalization table: transformers' arithmetic and torchvision's arithmetic, all 256 values


@pytest.mark.parametrize(
    ("mean", "std", "hf_mean", "hf_std"),
    [
        (IMAGENET_MEAN, IMAGENET_STD, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
        (CLIP_MEAN, CLIP_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    ],
    ids=["imagenet", "clip"],
)
def test_normalization_table(mean, std, hf_mean, hf_std):
    assert list(mean) == list(hf_mean)
    assert list(std) == list(hf_std)
    table = normalization_table(mean, std)
    assert table.shape == (3, 256)
    assert table.dtype == np.float32

    # transformers' PIL backend: rescale (float64 * 1/255 -> float32), then normalize in float32
    processor = got_processor(12)
    values = np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 1, 256)).copy()  # (C, H, W)
    hf = processor.normalize(processor.rescale(values, processor.rescale_factor), hf_mean, hf_std)
    assert_identical(table, hf[:, 0, :], "table vs transformers")

    # torchvision ToTensor + Normalize: float32(u8) / float32(255), then (x - mean32) / std32
    x = np.arange(256, dtype=np.uint8).astype(np.float32) / np.float32(255)
    tv = np.stack([(x - np.float32(m)) / np.float32(s) for m, s in zip(mean, std, strict=True)])
    assert_identical(table, tv, "table vs torchvision")


def test_gather_is_the_table_lookup_and_refuses_wider_indices():
    """gather runs np.take in clip mode, which would clamp an index past the table without a word: it
    takes uint8 indices only, and gives exactly table[c, v] for every value, in every chunk."""
    table = normalization_table(IMAGENET_MEAN, IMAGENET_STD)
    rng = np.random.default_rng(0)
    # rows shorter than a chunk (several rows per np.take), and longer (each row cut, with a remainder)
    for shape in ((5, 3, 100_000), (2, 3, 300_000), (4000, 3, 147)):
        src = rng.integers(0, 256, shape, dtype=np.uint8)
        dst = np.empty(src.shape, np.float32)
        gather(table, src, dst)
        assert_identical(dst, table[np.arange(3)[None, :, None], src], f"gather vs fancy indexing {shape}")
    with pytest.raises(TypeError, match="uint8"):
        gather(table, src.astype(np.int16), dst)


def assert_same_pixels(actual: np.ndarray, expected: np.ndarray) -> None:
    assert (actual.shape, actual.dtype) == (expected.shape, expected.dtype)
    np.testing.assert_array_equal(actual, expected)


@pytest.mark.parametrize(
    ("mode", "size"), [("RGB", (37, 23)), ("L", (37, 23)), ("RGB", (1, 1)), ("L", (4099, 1))]
)
def test_image_view_is_a_view_of_the_image(make_image, mode, size):
    """`image_view` shares the image's memory (a pixel written afterwards shows in the array) and keeps it
    alive after the image is gone; values as np.asarray gives them."""
    image = make_image(*size, mode, 7)
    view = image_view(image)
    expected = np.asarray(image).copy()
    assert_same_pixels(view, expected)
    assert not view.flags.writeable
    first = image.getpixel((0, 0))
    changed = tuple(255 - v for v in first) if mode == "RGB" else 255 - first
    image.putpixel((0, 0), changed)
    expected[0, 0] = changed
    assert_same_pixels(view, expected)  # the pixel written after the view was taken
    del image
    gc.collect()
    others = [Image.new(mode, size, 200 - i) for i in range(4)]  # reuse freed memory if it was freed
    assert_same_pixels(view, expected)  # after its image was deleted
    del others


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "I;16"])
def test_image_view_copies_what_it_cannot_view(make_image, mode):
    """Images above Pillow's 16 MiB block (2100x2100 RGB is 17.6 MB as Pillow stores it) and modes
    other than RGB / L go through np.asarray: same values."""
    image = make_image(2100, 2100, mode, 3) if mode == "RGB" else make_image(31, 17, mode, 3)
    assert_same_pixels(image_view(image), np.asarray(image))


@pytest.mark.parametrize("name", ["internvl", "qwen2-vl"])
def test_strategy_normalize_uses_table(name, make_image):
    strategy = get_strategy(name)
    image = to_rgb(make_image(300, 120, "RGB", 3), "white")
    pixels = strategy.render(image, strategy.plan(*image.size))
    table = normalization_table(strategy.mean, strategy.std)
    channels = strategy.channel_view(pixels)
    expected = np.empty(channels.shape, dtype=np.float32)
    for c in range(3):
        expected[:, c] = table[c][channels[:, c]]
    assert_identical(strategy.normalize(pixels), expected.reshape(pixels.shape), name)


# ---------------------------------------------------------------------------------------------------------
# RGB conversion


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "P+trns", "P", "L", "CMYK", "1", "I;16"])
def test_to_rgb_white_matches_transformers(make_image, mode):
    image = make_image(37, 23, mode, 5)
    ours = to_rgb(image, "white")
    assert ours.mode == "RGB"
    assert ours.size == image.size
    np.testing.assert_array_equal(np.asarray(ours), convert_to_rgb(image, return_numpy=True))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "P+trns", "P", "L", "CMYK", "1", "I;16"])
def test_to_rgb_drop_is_plain_convert(make_image, mode):
    image = make_image(37, 23, mode, 5)
    np.testing.assert_array_equal(np.asarray(to_rgb(image, "drop")), np.asarray(image.convert("RGB")))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P+trns"])
def test_alpha_modes_differ_on_transparent_images(make_image, mode):
    """The generated transparent images really are transparent: white composite != dropped alpha."""
    image = make_image(37, 23, mode, 5)
    assert not np.array_equal(np.asarray(to_rgb(image, "white")), np.asarray(to_rgb(image, "drop")))


def test_sample_rgba_white_vs_drop(sample_paths):
    (path,) = [p for p in sample_paths if p.name.startswith("horse_silhouette_rgba")]
    image = _open(path)
    assert image.mode == "RGBA"
    white = get_strategy("internvl").process(image).pixel_values
    drop = get_strategy("internvl", alpha="drop").process(image).pixel_values
    assert not np.array_equal(white, drop)


# ---------------------------------------------------------------------------------------------------------
# EXIF orientation


def test_exif_orientation6(sample_paths):
    (path,) = [p for p in sample_paths if "exif_orientation6" in p.name]
    image = _open(path)
    assert image.getexif().get(0x0112) == 6
    upright = ImageOps.exif_transpose(image)
    assert (image.size, upright.size) == ((600, 512), (512, 600))

    raw = get_strategy("internvl").process(image)
    turned = get_strategy("internvl", exif_transpose=True).process(image)
    assert (raw.plan.orig_width, raw.plan.orig_height) == (600, 512)
    assert (turned.plan.orig_width, turned.plan.orig_height) == (512, 600)
    assert raw.plan != turned.plan
    assert_identical(raw.pixel_values, got_processor(12)(image, return_tensors="np")["pixel_values"], "raw")
    assert_identical(
        turned.pixel_values, got_processor(12)(upright, return_tensors="np")["pixel_values"], "transposed"
    )

    qwen = qwen_processor(QWEN_CHECKPOINT_MAX)
    for name in QWEN_PRESETS:
        raw_q = get_strategy(name).process(image)
        turned_q = get_strategy(name, exif_transpose=True).process(image)
        assert (raw_q.plan.resized_width, raw_q.plan.resized_height) == (
            turned_q.plan.resized_height,
            turned_q.plan.resized_width,
        )
        assert_identical(raw_q.pixel_values, qwen(image, return_tensors="np")["pixel_values"], name)
        assert_identical(turned_q.pixel_values, qwen(upright, return_tensors="np")["pixel_values"], name)


def test_exif_transpose_is_noop_without_orientation(make_image):
    image = make_image(300, 120, "RGB", 2)
    a = get_strategy("internvl").process(image)
    b = get_strategy("internvl", exif_transpose=True).process(image)
    assert a.plan == b.plan
    assert_identical(a.pixel_values, b.pixel_values, "exif no-op")


# ---------------------------------------------------------------------------------------------------------
# Qwen3-VL: the same processor class, configured as the Qwen3-VL checkpoints' preprocessor_config.json
# (patch 16, so factor 32; min/max pixels 65536 / 16777216; mean = std = 0.5)


@cache
def qwen3_processor() -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(
        patch_size=16, image_mean=[0.5] * 3, image_std=[0.5] * 3, min_pixels=65536, max_pixels=16777216
    )


def check_qwen3_vs_transformers(image: Image.Image) -> None:
    ref = qwen3_processor()(image, return_tensors="np")
    (grid_thw,) = ref["image_grid_thw"].tolist()
    result = get_strategy("qwen3-vl").process(image)
    assert_identical(result.pixel_values, ref["pixel_values"], "qwen3-vl")
    assert result.pixel_values.shape[1] == 1536
    assert result.plan.metadata()["image_grid_thw"] == grid_thw
    assert result.plan.num_tokens == grid_thw[1] * grid_thw[2] // 4


QWEN3_CASES = [c for c in CASES if c.values[2] in ("RGB", "RGBA", "L") or c.values[0] * c.values[1] < 2000]


@pytest.mark.parametrize(("width", "height", "mode", "seed"), QWEN3_CASES)
def test_qwen3_matches_transformers(make_image, width, height, mode, seed):
    check_qwen3_vs_transformers(make_image(width, height, mode, seed))


def test_sample_qwen3_matches_transformers(sample_path):
    check_qwen3_vs_transformers(_open(sample_path))


@pytest.mark.parametrize("dtype", ["float32", "uint8", "float16"])
@pytest.mark.parametrize("name", ["qwen2-vl", "qwen3-vl"])
def test_qwen_one_temporal_copy_reads_back_as_the_reference(sample_path, name, dtype):
    """`temporal_copies=1` stores half of each row, and what the reader makes of it (`decode_pixels`, which
    `open_dataset` uses) is the processor's `pixel_values`, bit for bit (float16: its rounding of them)."""
    image = _open(sample_path)
    if name == "qwen2-vl":
        one = get_strategy(name, max_pixels=QWEN_CLASS_DEFAULT_MAX, temporal_copies=1)
        ref = qwen_processor(QWEN_CLASS_DEFAULT_MAX)(image, return_tensors="np")["pixel_values"]
    else:
        one = get_strategy(name, temporal_copies=1)
        ref = qwen3_processor()(image, return_tensors="np")["pixel_values"]
    assert_identical(one.process(image).pixel_values, ref, f"{name} one copy, process")
    rgb = one.prepare(image)
    plan = one.plan(*rgb.size)
    stored = render_stored(one, rgb, plan, dtype)
    assert stored.shape == plan.shape == (ref.shape[0], ref.shape[1] // 2)
    assert stored.dtype == np.dtype(dtype)
    expected = ref.astype(np.float16).astype(np.float32) if dtype == "float16" else ref
    assert_identical(decode_pixels(one, stored, dtype), expected, f"{name} one copy, {dtype} read back")


QWEN3_EXAMPLES = [
    # width, height, resized (h, w), tokens: the Qwen3-VL column of the reference notes
    (1920, 1080, (1088, 1920), 2040),
    (1080, 1920, (1920, 1088), 2040),
    (640, 480, (480, 640), 300),
    (800, 600, (608, 800), 475),
    (100, 100, (256, 256), 64),
    (28, 28, (256, 256), 64),
    (10, 1000, (2560, 32), 80),
    (4000, 3000, (3008, 4000), 11750),
    (8000, 6000, (3520, 4704), 16170),
    (333, 777, (768, 320), 240),
]


@pytest.mark.parametrize(("width", "height", "resized", "tokens"), QWEN3_EXAMPLES)
def test_qwen3_worked_examples(width, height, resized, tokens):
    plan = get_strategy("qwen3-vl").plan(width, height)
    h, w = resized
    assert (plan.resized_height, plan.resized_width) == resized
    assert plan.num_tokens == tokens
    assert plan.shape == ((h // 16) * (w // 16), 1536)
    assert hf_smart_resize(height, width, 32, 65536, 16777216) == resized
    assert qwen3_processor().get_number_of_image_patches(height, width) // 4 == tokens


# ---------------------------------------------------------------------------------------------------------
# Token counts against the transformers processors' own formulas (`_get_num_multimodal_tokens`), built
# without a tokenizer (the formulas only need the image processor and the checkpoints' constants)


@cache
def internvl_token_processor(max_tiles: int) -> InternVLProcessor:
    processor = InternVLProcessor.__new__(InternVLProcessor)
    processor.image_processor = got_processor(max_tiles)
    processor.image_seq_length = 256  # the InternVL3 -hf processor_config.json
    return processor


@cache
def qwen_token_processor(name: str) -> Qwen2VLProcessor:
    processor = Qwen2VLProcessor.__new__(Qwen2VLProcessor)
    processor.image_processor = (
        qwen3_processor() if name == "qwen3-vl" else qwen_processor(QWEN_CHECKPOINT_MAX)
    )
    return processor


@settings(max_examples=300, deadline=None)
@given(width=st.integers(1, 12000), height=st.integers(1, 12000), max_tiles=st.sampled_from([1, 6, 12, 24]))
def test_internvl_tokens_match_processor_formula(width, height, max_tiles):
    plan = get_strategy("internvl", max_tiles=max_tiles).plan(width, height)
    data = internvl_token_processor(max_tiles)._get_num_multimodal_tokens(image_sizes=[[height, width]])
    assert data.num_image_patches == [plan.num_tiles]
    assert data.num_image_tokens == [plan.num_tokens + 2]  # + <img> and </img>, which vlmtile leaves out


@pytest.mark.parametrize("name", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"])
@settings(max_examples=150, deadline=None)
@given(width=st.integers(1, 12000), height=st.integers(1, 12000))
def test_qwen_tokens_match_processor_formula(name, width, height):
    if max(width, height) / min(width, height) > 200:
        return  # refused by both (tested above)
    plan = get_strategy(name).plan(width, height)
    data = qwen_token_processor(name)._get_num_multimodal_tokens(image_sizes=[[height, width]])
    assert data.num_image_tokens == [plan.num_tokens]
    assert data.num_image_patches == [plan.shape[0]]
