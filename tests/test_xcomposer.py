"""InternLM-XComposer presets: bit-exact parity with a restatement of the reference, and the token counts.

There is no transformers processor for IXC, so the reference is restated here from InternLM/InternLM-XComposer
(0f70c3e): `finetune/ixc_utils.py` `HD_transform` / `padding_336` (IXC2-4KHD), the IXC-2.5 `Image_transform`
(`InternLM-XComposer-2.5-OmniLive/internlm-xcomposer2d5-ol-7b/base/ixc_utils.py`), `finetune/data_mix.py`
(`Image.open(p).convert("RGB")`, `Resize((S, S), BICUBIC)`, `ToTensor`, `Normalize` with CLIP mean/std).
torchvision on a PIL image is Pillow: `F.resize(img, [h, w])` is `img.resize((w, h), BILINEAR)`,
`F.pad(img, [l, t, r, b], fill=[255, 255, 255])` is `ImageOps.expand(img, (l, t, r, b), fill=(255,) * 3)`,
and `Resize((S, S), BICUBIC)` is `img.resize((S, S), BICUBIC)`. `ToTensor` + `Normalize` is
float32(u8) / float32(255), then (x - mean32) / std32.

The restatement deliberately follows the reference's own steps (PIL transpose, resize, pad, transpose back)
where the implementation writes into a preallocated white canvas instead.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image
from PIL import Image, ImageOps

from vlmtile import get_strategy
from vlmtile.strategies import get_preset
from vlmtile.strategies.base import CLIP_MEAN, CLIP_STD, normalization_table
from vlmtile.strategies.xcomposer import XComposerFixed, XComposerHD, hd_geometry

HD_PRESETS = {
    # name: (unit, centred padding, scale capped at ceil(W / unit), default hd_num, ViT patches per side)
    "xcomposer2-4khd": (336, True, False, 25, 24),
    "xcomposer2.5": (560, False, True, 24, 40),
}
FIXED_PRESETS = {"xcomposer2-vl": 490, "xcomposer2": 224}
ALL_PRESETS = (*HD_PRESETS, *FIXED_PRESETS)

cached_image = functools.cache(make_image)
"""Generated images are shared by the presets and hd_num values (Pillow operations never modify them)."""

MEAN32 = np.asarray(CLIP_MEAN, dtype=np.float32)[:, None, None]
STD32 = np.asarray(CLIP_STD, dtype=np.float32)[:, None, None]


# ---------------------------------------------------------------------------------------------------------
# The reference, restated


def ref_hd_transform(img: Image.Image, hd_num: int, unit: int, center: bool, cap: bool) -> Image.Image:
    """`HD_transform` (4KHD: 336, centred padding) / `Image_transform` (2.5: 560, capped, bottom padding)."""
    width, height = img.size
    trans = False
    if width < height:
        img = img.transpose(Image.Transpose.TRANSPOSE)
        trans = True
        width, height = img.size
    ratio = width / height
    scale = 1
    while scale * np.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale -= 1
    if cap:
        scale = min(np.ceil(width / unit), scale)
    new_w = int(scale * unit)
    new_h = int(new_w / ratio)
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)  # transforms.functional.resize(img, [h, w])
    # padding_336(img, unit)
    width, height = img.size
    tar = int(np.ceil(height / unit) * unit)
    top_padding = int((tar - height) / 2) if center else 0
    bottom_padding = tar - height - top_padding
    img = ImageOps.expand(img, border=(0, top_padding, 0, bottom_padding), fill=(255, 255, 255))
    if trans:
        img = img.transpose(Image.Transpose.TRANSPOSE)
    return img


def ref_to_tensor_normalize(img: Image.Image) -> np.ndarray:
    """torchvision ToTensor + Normalize(CLIP): (3, H, W) float32."""
    x = np.asarray(img).transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    return (x - MEAN32) / STD32


def reference_pixels(image: Image.Image, name: str, hd_num: int | None = None) -> np.ndarray:
    image = image.convert("RGB")  # Image.open(p).convert("RGB"): alpha dropped
    if name in FIXED_PRESETS:
        size = FIXED_PRESETS[name]
        return ref_to_tensor_normalize(image.resize((size, size), Image.Resampling.BICUBIC))
    unit, center, cap, default_hd, _ = HD_PRESETS[name]
    hd = default_hd if hd_num is None else hd_num
    return ref_to_tensor_normalize(ref_hd_transform(image, hd, unit, center, cap))


def model_token_count(canvas_h: int, canvas_w: int, unit: int, patches: int) -> int:
    """`CLIPVisionTower.forward` in build_mlp.py, shapes only: the length of the embedding sequence it builds.

    Features are zeros with one channel; the reshapes / newline concatenations are the reference's.
    """
    h, w = canvas_h // unit, canvas_w // unit
    side, c = patches // 2, 1
    features = np.zeros((1 + h * w, patches * patches, c))
    glb = (
        features[:1].reshape(1, side, 2, side, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(1, side, side, 4 * c)
    )
    glb = np.concatenate([glb, np.zeros((1, side, 1, 4 * c))], axis=2).reshape(1, -1, 4 * c)  # sub_GN rows
    sub = (
        features[1:].reshape(h * w, side, 2, side, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(h * w, -1, 4 * c)
    )
    sub = (
        sub.reshape(1, h, w, side, side, -1).transpose(0, 1, 3, 2, 4, 5).reshape(1, h * side, w * side, 4 * c)
    )
    sub = np.concatenate([sub, np.zeros((1, h * side, 1, 4 * c))], axis=2).reshape(1, -1, 4 * c)
    out = np.concatenate([glb, np.zeros((1, 1, 4 * c)), sub], axis=1)  # glb, glb_GN, sub
    return int(out.shape[1])


def assert_identical(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != reference {expected.shape}"
    assert actual.dtype == np.float32 and expected.dtype == np.float32, what
    if not np.array_equal(actual, expected):
        diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
        where = tuple(int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape))
        pytest.fail(
            f"{what}: max abs diff {diff.max():.3g} at {where}; {np.count_nonzero(diff)} values differ"
        )


def check(image: Image.Image, name: str, hd_num: int | None = None) -> None:
    strategy = get_strategy(name) if hd_num is None else get_strategy(name, hd_num=hd_num)
    result = strategy.process(image)
    expected = reference_pixels(image, name, hd_num)
    assert_identical(result.pixel_values, expected, f"{name} hd_num={hd_num} {image.mode} {image.size}")
    plan = result.plan
    assert plan.shape == expected.shape
    _, canvas_h, canvas_w = expected.shape
    assert (plan.resized_width, plan.resized_height) == (canvas_w, canvas_h)
    if name in HD_PRESETS:
        unit, *_, patches = HD_PRESETS[name]
        assert plan.num_tokens == model_token_count(canvas_h, canvas_w, unit, patches)
        assert plan.grid == (canvas_w // unit, canvas_h // unit)
        assert plan.num_tiles == canvas_w // unit * (canvas_h // unit) + 1


# ---------------------------------------------------------------------------------------------------------
# Pixel parity: generated sizes x modes, every sample image, and an hd_num sweep

SIZES = (
    (1, 1),
    (2, 3),
    (100, 100),
    (336, 336),
    (337, 335),
    (560, 560),
    (640, 480),
    (1920, 1080),
    (1080, 1920),
    (3000, 500),
    (500, 3000),
)
MODES = ("RGB", "L", "RGBA", "P+trns", "CMYK")
LARGE = 1_000_000  # pixels: above this only RGB and RGBA run (the mode only changes the RGB conversion)


def _cases() -> list[pytest.ParameterSet]:
    cases = []
    for seed, (w, h) in enumerate(SIZES):
        for mode in MODES:
            if w * h > LARGE and mode not in ("RGB", "RGBA"):
                continue
            cases.append(pytest.param(w, h, mode, seed, id=f"{w}x{h}-{mode}"))
    cases.append(pytest.param(40, 30, "P", 99, id="40x30-P"))
    cases.append(pytest.param(30, 40, "1", 98, id="30x40-1"))
    return cases


@pytest.mark.parametrize("name", ALL_PRESETS)
@pytest.mark.parametrize(("width", "height", "mode", "seed"), _cases())
def test_matches_reference(name, width, height, mode, seed):
    check(cached_image(width, height, mode, seed), name)


HD_SWEEP_SIZES = ((1, 1), (337, 335), (640, 480), (1080, 1920), (3000, 500))


@pytest.mark.parametrize("hd_num", [16, 25, 55, 6, 1])
@pytest.mark.parametrize("name", list(HD_PRESETS))
@pytest.mark.parametrize(("width", "height"), HD_SWEEP_SIZES)
def test_hd_num_sweep_matches_reference(name, hd_num, width, height):
    check(cached_image(width, height, "RGB", width * 7 + height), name, hd_num)


@functools.cache
def _open(path: Path) -> Image.Image:
    image = Image.open(path)
    image.load()
    return image


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_sample_data_matches_reference(sample_path, name):
    check(_open(sample_path), name)


# ---------------------------------------------------------------------------------------------------------
# Padding is white uint8 *before* normalisation, so the table covers it


def test_clip_table_is_torchvision_arithmetic():
    values = np.arange(256, dtype=np.uint8)
    torchvision = (values.astype(np.float32)[None, :] / np.float32(255) - MEAN32[:, :, 0]) / STD32[:, :, 0]
    assert np.array_equal(normalization_table(CLIP_MEAN, CLIP_STD), torchvision)


@pytest.mark.parametrize(
    ("name", "hd_num", "width", "height", "box"),
    [
        # 1920x1080 at hd 16 -> 1680x945, centred in 1008 rows: 31 above, 32 below
        ("xcomposer2-4khd", 16, 1920, 1080, (0, 31, 1680, 976)),
        # portrait: the same, transposed: padding left/right
        ("xcomposer2-4khd", 16, 1080, 1920, (31, 0, 976, 1680)),
        # IXC-2.5 1920x1080 at hd 6 -> 1680x945 in 1120 rows, all padding below (right for portrait)
        ("xcomposer2.5", 6, 1920, 1080, (0, 0, 1680, 945)),
        ("xcomposer2.5", 6, 1080, 1920, (0, 0, 945, 1680)),
    ],
)
def test_padding_is_white_before_normalisation(name, hd_num, width, height, box):
    strategy = get_strategy(name, hd_num=hd_num)
    image = cached_image(width, height, "RGB", 5)
    plan = strategy.plan(width, height)
    assert plan.image_box == box
    assert plan.content_box == box
    pixels = strategy.render(image, plan)
    left, top, right, bottom = box
    mask = np.ones(pixels.shape[1:], dtype=bool)
    mask[top:bottom, left:right] = False
    assert mask.any()
    assert (pixels[:, mask] == 255).all()
    # The reference pads the uint8 image with 255, then normalises: (1 - mean32) / std32 per channel.
    expected = reference_pixels(image, name, hd_num)
    white = ((np.float32(255) / np.float32(255) - MEAN32) / STD32)[:, 0, 0]
    assert np.array_equal(expected[:, mask], np.broadcast_to(white[:, None], (3, int(mask.sum()))))
    assert_identical(strategy.normalize(pixels), expected, name)


# ---------------------------------------------------------------------------------------------------------
# Worked examples (docs/strategies.md section 5) and token counts


# width, height, hd_num, canvas (w, h), grid (cols, rows), tokens
FOURKHD_EXAMPLES = [
    (1920, 1080, 16, (1680, 1008), (5, 3), 2353),
    (1920, 1080, 25, (2016, 1344), (6, 4), 3661),
    (1920, 1080, 55, (3024, 2016), (9, 6), 8005),
    (1080, 1920, 16, (1008, 1680), (3, 5), 2377),
    (1080, 1920, 25, (1344, 2016), (4, 6), 3685),
    (1080, 1920, 55, (2016, 3024), (6, 9), 8041),
    (800, 600, 16, (1344, 1008), (4, 3), 1921),
    (640, 480, 25, (1680, 1344), (5, 4), 3085),
    (640, 480, 55, (2688, 2016), (8, 6), 7141),
    (336, 336, 16, (1344, 1344), (4, 4), 2509),
    (100, 100, 25, (1680, 1680), (5, 5), 3817),
    (100, 100, 55, (2352, 2352), (7, 7), 7297),
    (3000, 500, 16, (2688, 672), (8, 2), 2485),
    (3000, 500, 25, (4032, 672), (12, 2), 3637),
    (3000, 500, 55, (6048, 1008), (18, 3), 7969),
    (4000, 3000, 16, (1344, 1008), (4, 3), 1921),
    (4000, 3000, 25, (1680, 1344), (5, 4), 3085),
    (4000, 3000, 55, (2688, 2016), (8, 6), 7141),
]
IXC25_EXAMPLES = [
    (1920, 1080, 24, (2240, 1680), (4, 3), 5281),
    (1920, 1080, 6, (1680, 1120), (3, 2), 2861),
    (1080, 1920, 24, (1680, 2240), (3, 4), 5301),
    (1080, 1920, 6, (1120, 1680), (2, 3), 2881),
    (800, 600, 24, (1120, 1120), (2, 2), 2061),
    (640, 480, 6, (1120, 1120), (2, 2), 2061),
    (336, 336, 24, (560, 560), (1, 1), 841),
    (100, 100, 6, (560, 560), (1, 1), 841),
    (3000, 500, 24, (3360, 560), (6, 1), 2841),
    (3000, 500, 6, (3360, 560), (6, 1), 2841),
    (4000, 3000, 24, (2800, 2240), (5, 4), 8501),
    (4000, 3000, 6, (1120, 1120), (2, 2), 2061),
]


@pytest.mark.parametrize(
    ("name", "width", "height", "hd_num", "canvas", "grid", "tokens"),
    [("xcomposer2-4khd", *e) for e in FOURKHD_EXAMPLES] + [("xcomposer2.5", *e) for e in IXC25_EXAMPLES],
)
def test_worked_examples(name, width, height, hd_num, canvas, grid, tokens):
    plan = get_strategy(name, hd_num=hd_num).plan(width, height)
    assert (plan.resized_width, plan.resized_height) == canvas
    assert plan.grid == grid
    assert plan.num_tokens == tokens
    assert plan.num_tiles == grid[0] * grid[1] + 1 and plan.thumbnail
    assert plan.shape == (3, canvas[1], canvas[0])
    assert plan.metadata()["rows"] == grid[1] and plan.metadata()["cols"] == grid[0]
    unit, *_, patches = HD_PRESETS[name]
    assert model_token_count(canvas[1], canvas[0], unit, patches) == tokens


def test_worked_example_1920x1080_hd16_padding():
    """scale 5 (5*ceil(5/1.778) = 15 <= 16, 6*4 = 24 > 16); 1680x945, 31 white rows above and 32 below."""
    g = hd_geometry(1920, 1080, 336, 16, cap_scale=False, center=True)
    assert (g.scale, g.new_w, g.new_h, g.top, g.target) == (5, 1680, 945, 31, 1008)
    assert g.target - g.new_h - g.top == 32
    plan = get_strategy("xcomposer2-4khd", hd_num=16).plan(1920, 1080)
    assert plan.image_box == (0, 31, 1680, 976)


@pytest.mark.parametrize(("name", "size", "tokens"), [("xcomposer2-vl", 490, 1225), ("xcomposer2", 224, 256)])
@pytest.mark.parametrize(("width", "height"), [(1, 1), (1920, 1080), (300, 2400)])
def test_fixed_resolution_plans(name, size, tokens, width, height):
    plan = get_strategy(name).plan(width, height)
    assert plan.shape == (3, size, size)
    assert plan.num_tokens == tokens == (size // 14) ** 2
    assert (plan.grid, plan.num_tiles, plan.thumbnail) == ((1, 1), 1, False)


@pytest.mark.parametrize("name", list(HD_PRESETS))
@pytest.mark.parametrize("hd_num", [1, 6, 16, 24, 25, 55, 100])
def test_token_formula_matches_model_side_count(name, hd_num):
    unit, *_, patches = HD_PRESETS[name]
    strategy = get_strategy(name, hd_num=hd_num)
    for width, height in ((1, 1), (7, 3000), (1000, 999), (1920, 1080), (1080, 1920), (8000, 20)):
        try:
            plan = strategy.plan(width, height)
        except ValueError:
            assert hd_num * unit * min(width, height) < max(width, height)  # only ever for extreme ratios
            continue
        assert plan.num_tokens == model_token_count(plan.resized_height, plan.resized_width, unit, patches)
        cols, rows = plan.grid
        assert cols * rows <= hd_num


# ---------------------------------------------------------------------------------------------------------
# Geometry against the restatement on many sizes (plans only, no pixels)


@pytest.mark.parametrize("name", list(HD_PRESETS))
def test_geometry_matches_reference_on_a_size_sweep(name):
    unit, center, cap, _, _ = HD_PRESETS[name]
    rng = np.random.default_rng(3)
    sizes = [(int(w), int(h)) for w, h in rng.integers(1, 6000, size=(300, 2))]
    sizes += [(k * unit, unit) for k in range(1, 30)] + [(unit, k * unit + 1) for k in range(1, 30)]
    for hd_num in (6, 16, 24, 25, 55):
        strategy = get_strategy(name, hd_num=hd_num)
        for width, height in sizes:
            w, h = (height, width) if width < height else (width, height)
            ratio = w / h
            scale = 1
            while scale * np.ceil(scale / ratio) <= hd_num:
                scale += 1
            scale -= 1
            if cap:
                scale = min(np.ceil(w / unit), scale)
            new_w = int(scale * unit)
            new_h = int(new_w / ratio)
            tar = int(np.ceil(new_h / unit) * unit)
            canvas = (tar, new_w) if width < height else (new_w, tar)
            plan = strategy.plan(width, height)
            assert (plan.resized_width, plan.resized_height) == canvas, (width, height, hd_num)
            top = int((tar - new_h) / 2) if center else 0
            box = (top, 0, top + new_h, new_w) if width < height else (0, top, new_w, top + new_h)
            assert plan.image_box == box


@pytest.mark.parametrize(
    ("name", "width", "height"), [("xcomposer2-4khd", 8401, 1), ("xcomposer2.5", 1, 20000)]
)
def test_refuses_sizes_the_reference_cannot_resize(make_image, name, width, height):
    """new_h = int(new_w / ratio) is 0: the reference's resize raises in Pillow; so does the plan."""
    with pytest.raises(ValueError, match="aspect ratio"):
        get_strategy(name).plan(width, height)
    with pytest.raises(ValueError):
        reference_pixels(make_image(width, height, "RGB", 0), name)


def test_largest_accepted_aspect_ratio_renders(make_image):
    check(make_image(8400, 1, "RGB", 0), "xcomposer2-4khd")  # new_h = int(8400 / 8400) = 1


# ---------------------------------------------------------------------------------------------------------
# Presets


def test_preset_constants():
    for name, (unit, center, cap, hd_num, _) in HD_PRESETS.items():
        strategy = get_strategy(name)
        assert isinstance(strategy, XComposerHD)
        assert (strategy.unit, strategy.center_padding, strategy.cap_scale, strategy.hd_num) == (
            unit,
            center,
            cap,
            hd_num,
        )
        assert (strategy.mean, strategy.std, strategy.alpha) == (CLIP_MEAN, CLIP_STD, "drop")
    for name, size in FIXED_PRESETS.items():
        strategy = get_strategy(name)
        assert isinstance(strategy, XComposerFixed)
        assert (strategy.image_size, strategy.mean, strategy.std, strategy.alpha) == (
            size,
            CLIP_MEAN,
            CLIP_STD,
            "drop",
        )


@pytest.mark.parametrize(
    ("alias", "canonical"),
    [
        ("ixc2-4khd", "xcomposer2-4khd"),
        ("InternLM-XComposer2-4KHD", "xcomposer2-4khd"),
        ("ixc2.5", "xcomposer2.5"),
        ("xcomposer2d5", "xcomposer2.5"),
        ("ixc2-vl", "xcomposer2-vl"),
        ("ixc2", "xcomposer2"),
    ],
)
def test_aliases(alias, canonical):
    assert get_preset(alias).name == canonical


@pytest.mark.parametrize("params", [{"hd_num": 0}, {"hd_num": -3}, {"hd_num": 2.5}, {"hd_num": True}])
def test_invalid_hd_num(params):
    with pytest.raises(ValueError, match="hd_num"):
        get_strategy("xcomposer2-4khd", **params)


def test_fixed_presets_have_no_hd_num():
    with pytest.raises(ValueError, match="hd_num"):
        get_strategy("xcomposer2-vl", hd_num=4)


def test_hd_num_one_is_one_sub_image_plus_global():
    plan = get_strategy("xcomposer2-4khd", hd_num=1).plan(1920, 1080)
    assert plan.grid == (1, 1) and plan.num_tiles == 2
    assert plan.num_tokens == (1 + 1) * 144 + 1 + 2 * 12
    assert math.prod(plan.shape) == 3 * 336 * 336
