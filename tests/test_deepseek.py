"""DeepSeek-VL2: bit-exact parity with the original processor, token counts, candidates, worked examples.

There is no transformers port of DeepSeek-VL2 (transformers' `deepseek_vl_hybrid` is DeepSeek-VL 1), so the
reference is deepseek-ai/DeepSeek-VL2 `deepseek_vl2/models/processing_deepseek_vl_v2.py` (ef9f91e),
restated below with its control flow: `select_best_resolution`, the image part of
`DeepseekVLV2Processor.tokenize_with_images` (Pillow's own `ImageOps.pad`, called as the reference calls
it: default method and centering, `color=tuple(int(x * 255) for x in mean)`), `ImageTransform`
(torchvision `ToTensor` + `Normalize` arithmetic in float32) and `utils/io.py` `load_pil_images`
(`convert("RGB")`). The model-side count restates `prepare_inputs_embeds` (tile_tag "2D",
global_view_pos "head") on the SigLIP so400m-patch14-384 feature grid.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from vlmtile import get_strategy
from vlmtile.strategies import get_preset
from vlmtile.strategies.base import tunable_fields
from vlmtile.strategies.deepseek import CANDIDATE_RESOLUTIONS, DeepSeekVL2, pad_box, select_best_resolution

NAME = "deepseek-vl2"
IMAGE_TOKEN = -7  # stands for the tokenizer's `<image>` id; only the count matters here

# The checkpoints' processor_config.json `candidate_resolutions` ([w, h], in file order).
REF_CANDIDATES = [
    [384, 384], [384, 768], [768, 384], [384, 1152], [1152, 384], [384, 1536], [1536, 384], [768, 768],
    [384, 1920], [1920, 384], [384, 2304], [2304, 384], [768, 1152], [1152, 768], [384, 2688],
    [2688, 384], [384, 3072], [3072, 384], [768, 1536], [1536, 768], [384, 3456], [3456, 384],
    [1152, 1152],
]  # fmt: skip
REF_IMAGE_SIZE = REF_CANDIDATES[0][0]  # DeepseekVLV2Processor.image_size
REF_PATCH_SIZE = 14
REF_DOWNSAMPLE_RATIO = 2
REF_MEAN = (0.5, 0.5, 0.5)
REF_STD = (0.5, 0.5, 0.5)


# ---------------------------------------------------------------------------------------------------------
# Reference restatement


def ref_select_best_resolution(image_size, candidate_resolutions):
    original_width, original_height = image_size
    best_fit = None
    max_effective_resolution = 0
    min_wasted_resolution = float("inf")
    for width, height in candidate_resolutions:
        scale = min(width / original_width, height / original_height)
        downscaled_width, downscaled_height = int(original_width * scale), int(original_height * scale)
        effective_resolution = min(downscaled_width * downscaled_height, original_width * original_height)
        wasted_resolution = (width * height) - effective_resolution
        if effective_resolution > max_effective_resolution or (
            effective_resolution == max_effective_resolution and wasted_resolution < min_wasted_resolution
        ):
            max_effective_resolution = effective_resolution
            min_wasted_resolution = wasted_resolution
            best_fit = (width, height)
    return best_fit


def ref_image_transform(pil_img: Image.Image) -> np.ndarray:
    """T.ToTensor() (uint8 HWC -> float32 CHW / 255) then T.Normalize(mean, std), all in float32."""
    x = np.asarray(pil_img).transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    mean = np.asarray(REF_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(REF_STD, dtype=np.float32)[:, None, None]
    return (x - mean) / std


def ref_image_token_count(num_width_tiles: int, num_height_tiles: int) -> int:
    """The `add image tokens` block of tokenize_with_images: every appended id is the `<image>` id."""
    h = w = math.ceil((REF_IMAGE_SIZE // REF_PATCH_SIZE) / REF_DOWNSAMPLE_RATIO)
    tokenized_image = [IMAGE_TOKEN] * h * (w + 1)  # global view, one newline per row
    tokenized_image += [IMAGE_TOKEN]  # separator between global and local views
    tokenized_image += [IMAGE_TOKEN] * (num_height_tiles * h) * (num_width_tiles * w + 1)
    return len(tokenized_image)


def ref_tokenize_images(images: list[Image.Image], cropping: bool):
    """The image half of tokenize_with_images for a sample's images (already convert("RGB")-ed).

    Returns (images_list as one float32 array, images_spatial_crop, num_image_tokens, local views).
    """
    images_list, images_spatial_crop, num_image_tokens, local_views = [], [], [], []
    color = tuple(int(x * 255) for x in REF_MEAN)
    for image in images:
        if cropping:
            best_width, best_height = ref_select_best_resolution(image.size, REF_CANDIDATES)
        else:
            best_width, best_height = REF_IMAGE_SIZE, REF_IMAGE_SIZE
        global_view = ImageOps.pad(image, (REF_IMAGE_SIZE, REF_IMAGE_SIZE), color=color)
        images_list.append(ref_image_transform(global_view))
        local_view = ImageOps.pad(image, (best_width, best_height), color=color)
        local_views.append(local_view)
        for i in range(0, best_height, REF_IMAGE_SIZE):
            for j in range(0, best_width, REF_IMAGE_SIZE):
                tile = local_view.crop((j, i, j + REF_IMAGE_SIZE, i + REF_IMAGE_SIZE))
                images_list.append(ref_image_transform(tile))
        num_width_tiles, num_height_tiles = best_width // REF_IMAGE_SIZE, best_height // REF_IMAGE_SIZE
        images_spatial_crop.append([num_width_tiles, num_height_tiles])
        num_image_tokens.append(ref_image_token_count(num_width_tiles, num_height_tiles))
    return np.stack(images_list), images_spatial_crop, num_image_tokens, local_views


def model_sequence_length(num_width_tiles: int, num_height_tiles: int) -> int:
    """How many embeddings prepare_inputs_embeds scatters into the `<image>` positions for one image."""
    side = 384 // 14  # SigLIP so400m patch14-384: 27 x 27 features per view
    pad = REF_DOWNSAMPLE_RATIO - side % REF_DOWNSAMPLE_RATIO if side % REF_DOWNSAMPLE_RATIO else 0
    per_view = ((side + pad) // REF_DOWNSAMPLE_RATIO) ** 2  # MlpProjector: pad to 28, 2x2 unfold
    h = w = int(per_view**0.5)
    global_features = h * (w + 1)  # newline column appended
    local_features = (num_height_tiles * h) * (num_width_tiles * w + 1)
    return global_features + 1 + local_features  # head: global, view_seperator, local


def load_original(image: Image.Image) -> Image.Image:
    return image.convert("RGB")  # utils/io.py load_pil_images


def assert_identical(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert actual.dtype == expected.dtype == np.float32, what
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if not np.array_equal(actual, expected):
        diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
        raise AssertionError(f"{what}: {np.count_nonzero(diff)} values differ, max {diff.max():.3g}")


def check_vs_reference(image: Image.Image, tiling: bool = True) -> None:
    result = get_strategy(NAME, tiling=tiling).process(image)
    ref, spatial, tokens, _ = ref_tokenize_images([load_original(image)], cropping=tiling)
    assert_identical(result.pixel_values, ref, f"{image.mode} {image.size} tiling={tiling}")
    meta = result.metadata
    assert meta["images_spatial_crop"] == spatial[0]
    assert meta["num_tokens"] == tokens[0]
    assert meta["grid"] == spatial[0]
    assert meta["num_tiles"] == ref.shape[0]


# ---------------------------------------------------------------------------------------------------------
# Pixel parity

SIZES = [
    (1, 1),
    (2, 3),
    (100, 100),
    (384, 384),
    (385, 383),
    (768, 384),
    (640, 480),
    (1920, 1080),
    (1080, 1920),
    (3000, 500),
    (500, 3000),
    (1000, 378),  # global view: 145 rows at round(119.5) = 120
    (1000, 380),  # global view: 146 rows at 119
    (5000, 1),  # the 384x384 global view rounds to 0 rows: all padding (Pillow 13)
    (1, 5000),
]
MODES = ["RGB", "L", "RGBA", "P+trns", "CMYK"]
CASES = [
    pytest.param(w, h, mode, seed, id=f"{w}x{h}-{mode}")
    for seed, (w, h) in enumerate(SIZES)
    for mode in MODES
]


@pytest.mark.parametrize(("width", "height", "mode", "seed"), CASES)
def test_matches_reference(make_image, width, height, mode, seed):
    check_vs_reference(make_image(width, height, mode, seed))


@pytest.mark.parametrize("mode", ["P", "LA", "1", "I;16"])
def test_other_modes_match_reference(make_image, mode):
    check_vs_reference(make_image(517, 301, mode, 11))


@pytest.mark.parametrize(
    ("width", "height", "mode"),
    [(1920, 1080, "RGB"), (500, 3000, "RGBA"), (385, 383, "L"), (1, 1, "RGB"), (5000, 1, "RGB")],
)
def test_tiling_off_matches_reference(make_image, width, height, mode):
    check_vs_reference(make_image(width, height, mode, 4), tiling=False)


def _open(path: Path) -> Image.Image:
    image = Image.open(path)
    image.load()
    return image


def test_sample_matches_reference(sample_path):
    check_vs_reference(_open(sample_path))


def test_three_image_sample_is_tiling_off(make_image):
    """A 3-image sample: the reference sets cropping = len(images) <= 2 = False for every image."""
    images = [make_image(1920, 1080, "RGB", 1), make_image(300, 900, "RGBA", 2), make_image(64, 48, "L", 3)]
    ref, spatial, tokens, _ = ref_tokenize_images([load_original(im) for im in images], cropping=False)
    assert spatial == [[1, 1]] * 3 and tokens == [421] * 3
    ours = [get_strategy(NAME, tiling=False).process(im) for im in images]
    assert_identical(np.concatenate([r.pixel_values for r in ours]), ref, "3 images")
    # Two identical views per image: the reference pads the same image to 384x384 twice.
    for r in ours:
        assert r.plan.shape == (2, 3, 384, 384)
        assert np.array_equal(r.pixel_values[0], r.pixel_values[1])


def test_two_image_sample_keeps_tiling(make_image):
    images = [make_image(1920, 1080, "RGB", 5), make_image(640, 480, "RGB", 6)]
    ref, spatial, tokens, _ = ref_tokenize_images([load_original(im) for im in images], cropping=True)
    ours = [get_strategy(NAME).process(im) for im in images]
    assert_identical(np.concatenate([r.pixel_values for r in ours]), ref, "2 images")
    assert [r.metadata["images_spatial_crop"] for r in ours] == spatial == [[4, 2], [2, 2]]
    assert [r.plan.num_tokens for r in ours] == tokens == [1807, 1023]


def test_alpha_is_dropped_like_the_original(make_image):
    image = make_image(700, 300, "RGBA", 9)
    drop = get_strategy(NAME).process(image).pixel_values
    white = get_strategy(NAME, alpha="white").process(image).pixel_values
    assert not np.array_equal(drop, white)
    assert get_strategy(NAME).alpha == "drop"


def test_padding_value(make_image):
    """Grey 127 in uint8, normalized like any pixel: (127/255 - 0.5) / 0.5 in float32, not 0."""
    values = get_strategy(NAME).process(make_image(3000, 500, "RGB", 1)).pixel_values
    expected = (np.float32(127) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
    assert expected != 0
    top = round((384 - round(500 / 3000 * 384)) * 0.5)
    assert np.all(values[0, :, :top, :] == expected)


def test_views_show_the_reference_canvas(make_image):
    image = make_image(1100, 700, "RGB", 8)
    strategy = get_strategy(NAME)
    plan = strategy.plan(*image.size)
    views = strategy.views(strategy.render(image, plan), plan)
    _, _, _, (local_view,) = ref_tokenize_images([image], cropping=True)
    global_view = ImageOps.pad(image, (384, 384), color=(127, 127, 127))
    assert [v.shape for _, v in views] == [(768, 1152, 3), (384, 384, 3)]
    assert np.array_equal(views[0][1], np.asarray(local_view))
    assert np.array_equal(views[1][1], np.asarray(global_view))


# ---------------------------------------------------------------------------------------------------------
# Geometry and tokens (plan only, no pixels)

sides = st.integers(1, 20000)


@settings(max_examples=2000, deadline=None)
@given(width=sides, height=sides, tiling=st.booleans())
def test_plan_matches_reference_counting(width, height, tiling):
    plan = get_strategy(NAME, tiling=tiling).plan(width, height)
    if tiling:
        best_width, best_height = ref_select_best_resolution((width, height), REF_CANDIDATES)
    else:
        best_width, best_height = 384, 384
    nw, nh = best_width // 384, best_height // 384
    assert (plan.resized_width, plan.resized_height) == (best_width, best_height)
    assert plan.grid == (nw, nh)
    assert plan.metadata()["images_spatial_crop"] == [nw, nh]
    assert plan.num_tokens == ref_image_token_count(nw, nh) == 211 + 14 * nh * (14 * nw + 1)
    assert plan.num_tiles == 1 + nw * nh and plan.thumbnail
    assert plan.shape == (1 + nw * nh, 3, 384, 384)


@settings(max_examples=300, deadline=None)
@given(width=st.integers(1, 3000), height=st.integers(1, 3000), canvas=st.sampled_from(CANDIDATE_RESOLUTIONS))
def test_pad_box_matches_imageops_pad(width, height, canvas):
    """pad_box is where Pillow's ImageOps.pad pastes: a white image padded with black, then its bbox."""
    padded = ImageOps.pad(Image.new("L", (width, height), 255), canvas, Image.Resampling.NEAREST, color=0)
    bbox = padded.getbbox()
    left, top, right, bottom = pad_box(width, height, *canvas)
    if bbox is None:
        assert right == left or bottom == top
    else:
        assert bbox == (left, top, right, bottom)
    plan = get_strategy(NAME).plan(width, height)
    box = pad_box(width, height, plan.resized_width, plan.resized_height)
    assert plan.content_box == (None if box == (0, 0, plan.resized_width, plan.resized_height) else box)


@pytest.mark.parametrize("tiling", [True, False])
def test_model_consumes_exactly_the_tokens(tiling):
    """prepare_inputs_embeds' masked_scatter needs as many embeddings as `<image>` positions."""
    strategy = get_strategy(NAME, tiling=tiling)
    for width, height in [*CANDIDATE_RESOLUTIONS, (1920, 1080), (7, 9000)]:
        plan = strategy.plan(width, height)
        assert plan.num_tokens == model_sequence_length(*plan.metadata()["images_spatial_crop"])


def test_candidate_resolutions():
    assert len(CANDIDATE_RESOLUTIONS) == 23
    assert [list(c) for c in CANDIDATE_RESOLUTIONS] == REF_CANDIDATES
    assert len(set(CANDIDATE_RESOLUTIONS)) == 23
    every = {(384 * m, 384 * n) for m in range(1, 10) for n in range(1, 10) if m * n <= 9}
    assert set(CANDIDATE_RESOLUTIONS) == every


@pytest.mark.parametrize("size", [(1, 1), (2, 3), (10**6, 1), (1, 10**6), (20000, 20000), (383, 385)])
def test_select_best_resolution_edge_cases(size):
    assert select_best_resolution(*size) == ref_select_best_resolution(size, REF_CANDIDATES)


# ---------------------------------------------------------------------------------------------------------
# Worked examples (docs/strategies.md and the reference notes, section 4)

WORKED_EXAMPLES = [
    # width, height, best canvas (w, h), views, tokens
    (1920, 1080, (1536, 768), 9, 1807),
    (1080, 1920, (768, 1536), 9, 1835),
    (800, 600, (1152, 768), 7, 1415),
    (1024, 768, (1152, 768), 7, 1415),
    (640, 480, (768, 768), 5, 1023),
    (384, 384, (384, 384), 2, 421),
    (100, 100, (384, 384), 2, 421),
    (1000, 1000, (1152, 1152), 10, 2017),
    (4000, 3000, (1152, 1152), 10, 2017),
    (3000, 500, (2304, 384), 7, 1401),
    (500, 3000, (384, 2304), 7, 1471),
]


@pytest.mark.parametrize(("width", "height", "canvas", "views", "tokens"), WORKED_EXAMPLES)
def test_worked_examples(width, height, canvas, views, tokens):
    plan = get_strategy(NAME).plan(width, height)
    assert (plan.resized_width, plan.resized_height) == canvas
    assert plan.grid == (canvas[0] // 384, canvas[1] // 384)
    assert plan.num_tiles == views
    assert plan.num_tokens == tokens
    off = get_strategy(NAME, tiling=False).plan(width, height)
    assert (off.resized_width, off.resized_height, off.num_tiles, off.num_tokens) == (384, 384, 2, 421)


@pytest.mark.parametrize(
    ("width", "height", "box"),
    [
        (1920, 1080, (0, 84, 384, 300)),  # "x 0-383, y 84-299"
        (800, 600, (0, 48, 384, 336)),  # "y 48-335"
        (1000, 378, (0, 120, 384, 265)),  # 145 rows, round(119.5) = 120
        (1000, 380, (0, 119, 384, 265)),  # 146 rows at 119
        (384, 384, (0, 0, 384, 384)),
    ],
)
def test_global_view_content_box(width, height, box):
    assert pad_box(width, height, 384, 384) == box


def test_preset():
    strategy = get_strategy("DeepSeek-VL2")
    assert isinstance(strategy, DeepSeekVL2) and strategy.name == NAME
    assert get_strategy("deepseekvl2") == strategy
    assert strategy.alpha == "drop" and strategy.tiling is True and strategy.exif_transpose is False
    assert (strategy.tile_size, strategy.patch_size, strategy.downsample_ratio) == (384, 14, 2)
    assert strategy.mean == strategy.std == (0.5, 0.5, 0.5)
    assert strategy.pad_color == (127, 127, 127) == tuple(int(x * 255) for x in REF_MEAN)
    assert strategy.tokens_per_side == 14
    assert {f.name for f in tunable_fields(get_preset(NAME).cls)} == {"alpha", "exif_transpose", "tiling"}
    assert dict(get_strategy(NAME).plan(1920, 1080).extra) == {"images_spatial_crop": (4, 2)}


@pytest.mark.parametrize(("param", "value"), [("tile_size", 448), ("patch_size", 16), ("mean", (0.4,) * 3)])
def test_fixed_parameters(param, value):
    with pytest.raises(ValueError, match=param):
        get_strategy(NAME, **{param: value})


@pytest.mark.parametrize("value", [1, "no", None])
def test_tiling_must_be_bool(value):
    with pytest.raises(ValueError, match="tiling"):
        get_strategy(NAME, tiling=value)
