"""Property tests of `Strategy.plan` for every registered strategy, plus the registry's contract.

The generic `Plan` contract is checked for every name `list_strategies()` returns, so a new strategy is
covered as soon as it is registered. Formula checks (and the comparison with transformers' own geometry
functions) are keyed by strategy class and run for every preset of that class.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from vlmtile import Plan, Strategy, get_strategy, list_strategies
from vlmtile.strategies import get_preset
from vlmtile.strategies.base import to_rgb, tunable_fields
from vlmtile.strategies.internvl import InternVL
from vlmtile.strategies.qwen import QwenVL

NAMES = list_strategies()
INTERNVL_NAMES = [n for n in NAMES if issubclass(get_preset(n).cls, InternVL)]
QWEN_NAMES = [n for n in NAMES if issubclass(get_preset(n).cls, QwenVL)]
BASE_METADATA = {
    "orig_width",
    "orig_height",
    "resized_width",
    "resized_height",
    "grid",
    "thumbnail",
    "num_tiles",
    "num_tokens",
    # Grounding fields, the same for every strategy (docs/grounding.md).
    "content_box",
    "transposed",
    "tile_boxes",
}

sides = st.integers(1, 20000)


@st.composite
def extreme_sizes(draw: st.DrawFn) -> tuple[int, int]:
    """(width, height) with one side tiny and the other up to a million pixels, either orientation."""
    short = draw(st.integers(1, 64))
    long = draw(st.integers(1, 1_000_000))
    return (long, short) if draw(st.booleans()) else (short, long)


def plan_or_none(strategy: Strategy, width: int, height: int) -> Plan | None:
    """`plan()` either returns a Plan or raises ValueError with a message; anything else propagates."""
    try:
        plan = strategy.plan(width, height)
    except ValueError as exc:
        assert str(exc).strip(), f"{strategy.name}: ValueError without a message for {width}x{height}"
        return None
    assert isinstance(plan, Plan)
    return plan


def check_plan_contract(strategy: Strategy, plan: Plan, width: int, height: int) -> None:
    """The generic Plan contract every strategy must honour."""
    assert plan.strategy == strategy.name
    assert (plan.orig_width, plan.orig_height) == (width, height)
    rw, rh = plan.resized_width, plan.resized_height
    assert isinstance(rw, int) and isinstance(rh, int) and rw >= 1 and rh >= 1

    # Tile boxes: inside the resized image, row-major, disjoint, and covering it exactly.
    boxes = plan.tile_boxes
    assert len(boxes) >= 1
    for left, top, right, bottom in boxes:
        assert all(isinstance(v, int) for v in (left, top, right, bottom))
        assert 0 <= left < right <= rw, (boxes, rw)
        assert 0 <= top < bottom <= rh, (boxes, rh)
    for a, b in itertools.combinations(boxes, 2):
        overlap_w = min(a[2], b[2]) - max(a[0], b[0])
        overlap_h = min(a[3], b[3]) - max(a[1], b[1])
        assert overlap_w <= 0 or overlap_h <= 0, f"boxes {a} and {b} overlap"
    assert sum((r - left) * (b - t) for left, t, r, b in boxes) == rw * rh
    assert list(boxes) == sorted(boxes, key=lambda box: (box[1], box[0])), "boxes are not row-major"

    cols, rows = plan.grid
    assert cols >= 1 and rows >= 1
    assert cols * rows == len(boxes)
    assert plan.num_tiles == len(boxes) + int(plan.thumbnail)
    assert isinstance(plan.num_tokens, int) and plan.num_tokens >= 1
    assert all(isinstance(n, int) and n >= 1 for n in plan.shape)

    # Strategy-specific metadata: exactly the declared keys, and everything JSON-able.
    assert {key for key, _ in plan.extra} == set(type(strategy).metadata_fields)
    meta = plan.metadata()
    assert set(meta) == BASE_METADATA | set(type(strategy).metadata_fields)
    json.dumps(meta)

    # Deterministic and picklable.
    assert strategy.plan(width, height) == plan
    assert pickle.loads(pickle.dumps(plan)) == plan


# ---------------------------------------------------------------------------------------------------------
# Generic contract, every registered strategy


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=1000, deadline=None)
@given(width=sides, height=sides)
def test_plan_contract(name, width, height):
    strategy = get_strategy(name)
    plan = plan_or_none(strategy, width, height)
    if plan is not None:
        check_plan_contract(strategy, plan, width, height)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=500, deadline=None)
@given(size=extreme_sizes())
def test_plan_contract_extreme_aspect_ratios(name, size):
    strategy = get_strategy(name)
    plan = plan_or_none(strategy, *size)
    if plan is not None:
        check_plan_contract(strategy, plan, *size)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    ("width", "height"), [(0, 5), (5, 0), (0, 0), (-3, 10), (10, -3), (True, 5), (5, False)]
)
def test_plan_rejects_degenerate_sizes(name, width, height):
    with pytest.raises(ValueError, match="1x1"):
        get_strategy(name).plan(width, height)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=8, deadline=None)
@given(width=st.integers(1, 200), height=st.integers(1, 200), seed=st.integers(0, 2**16))
def test_render_matches_plan_shape(make_image, name, width, height, seed):
    strategy = get_strategy(name)
    image = make_image(width, height, "RGB", seed)
    plan = strategy.plan(width, height)
    pixels = strategy.render(to_rgb(image, strategy.alpha), plan)
    assert pixels.dtype == np.uint8
    assert pixels.shape == plan.shape
    assert pixels.size == math.prod(plan.shape)
    result = strategy.process(image)
    assert result.plan == plan
    assert result.pixel_values.dtype == np.float32
    assert result.pixel_values.shape == plan.shape
    assert result.metadata == plan.metadata()


# ---------------------------------------------------------------------------------------------------------
# InternVL formula, against transformers' get_optimal_tiled_canvas


@pytest.mark.parametrize("name", INTERNVL_NAMES)
@settings(max_examples=1000, deadline=None)
@given(
    width=sides,
    height=sides,
    max_tiles=st.integers(1, 40),
    min_fraction=st.floats(0, 1),
    thumbnail=st.booleans(),
)
def test_internvl_formula(name, width, height, max_tiles, min_fraction, thumbnail):
    min_tiles = 1 + int(min_fraction * (max_tiles - 1))
    strategy = get_strategy(name, min_tiles=min_tiles, max_tiles=max_tiles, thumbnail=thumbnail)
    assert isinstance(strategy, InternVL)
    plan = strategy.plan(width, height)
    check_plan_contract(strategy, plan, width, height)

    t = strategy.tile_size
    cols, rows = plan.grid
    assert min_tiles <= cols * rows <= max_tiles
    assert plan.grid == get_optimal_tiled_canvas((height, width), (t, t), min_tiles, max_tiles)
    assert (plan.resized_width, plan.resized_height) == (t * cols, t * rows)
    assert plan.thumbnail == (thumbnail and cols * rows != 1)
    assert plan.num_tiles == cols * rows + int(plan.thumbnail)
    assert plan.num_tokens == strategy.tokens_per_tile * plan.num_tiles
    assert plan.shape == (plan.num_tiles, 3, t, t)
    assert all(r - left == t and b - top == t for left, top, r, b in plan.tile_boxes)


@pytest.mark.parametrize("name", INTERNVL_NAMES)
@settings(max_examples=500, deadline=None)
@given(size=extreme_sizes(), max_tiles=st.integers(1, 40))
def test_internvl_formula_extreme_aspect_ratios(name, size, max_tiles):
    width, height = size
    plan = get_strategy(name, max_tiles=max_tiles).plan(width, height)
    assert plan.grid == get_optimal_tiled_canvas((height, width), (448, 448), 1, max_tiles)


def test_internvl_preset_constants():
    strategy = get_strategy("internvl")
    assert (strategy.min_tiles, strategy.max_tiles, strategy.thumbnail) == (1, 12, True)
    assert strategy.tile_size == 448
    # (448 / 14)^2 patches, pixel shuffle with downsample ratio 0.5
    assert strategy.tokens_per_tile == int((448 // 14) ** 2 * 0.5**2) == 256


# ---------------------------------------------------------------------------------------------------------
# Qwen formula, against transformers' smart_resize

budgets = st.one_of(
    st.sampled_from([(3136, 12845056), (3136, 1003520), (65536, 16777216)]),
    st.tuples(st.integers(1, 2_000_000), st.integers(1, 20_000_000)).map(sorted).map(tuple),
)


@pytest.mark.parametrize("name", QWEN_NAMES)
@settings(max_examples=1000, deadline=None)
@given(width=sides, height=sides, budget=budgets)
def test_qwen_formula(name, width, height, budget):
    min_pixels, max_pixels = budget
    strategy = get_strategy(name, min_pixels=min_pixels, max_pixels=max_pixels)
    assert isinstance(strategy, QwenVL)
    f, p, m = strategy.factor, strategy.patch_size, strategy.merge_size
    try:
        expected = hf_smart_resize(height, width, f, min_pixels, max_pixels)
    except ValueError:
        with pytest.raises(ValueError, match="aspect ratio"):
            strategy.plan(width, height)
        return
    plan = strategy.plan(width, height)
    check_plan_contract(strategy, plan, width, height)

    h, w = plan.resized_height, plan.resized_width
    assert (h, w) == expected
    assert h % f == 0 and w % f == 0
    gh, gw = h // p, w // p
    assert dict(plan.extra)["image_grid_thw"] == (1, gh, gw)
    assert plan.num_tokens == gh * gw // (m * m)
    assert plan.shape == (gh * gw, 3 * strategy.temporal_patch_size * p * p)
    assert (plan.grid, plan.tile_boxes, plan.thumbnail, plan.num_tiles) == ((1, 1), ((0, 0, w, h),), False, 1)

    # The budget is respected whenever smart_resize scales down, unless a side hit the factor floor.
    if round(height / f) * f * round(width / f) * f > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        if math.floor(height / beta / f) >= 1 and math.floor(width / beta / f) >= 1:
            assert h * w <= max_pixels


@pytest.mark.parametrize("name", QWEN_NAMES)
@settings(max_examples=500, deadline=None)
@given(size=extreme_sizes())
def test_qwen_aspect_ratio_limit(name, size):
    width, height = size
    strategy = get_strategy(name)
    if max(width, height) / min(width, height) > 200:
        with pytest.raises(ValueError, match="aspect ratio"):
            strategy.plan(width, height)
    else:
        plan = strategy.plan(width, height)
        assert (plan.resized_height, plan.resized_width) == hf_smart_resize(
            height, width, strategy.factor, strategy.min_pixels, strategy.max_pixels
        )


QWEN_PRESET_CONSTANTS = {
    # name: (patch, merge, temporal, min_pixels, max_pixels, mean), from the checkpoints' preprocessor configs
    "qwen2-vl": (14, 2, 2, 3136, 12845056, (0.48145466, 0.4578275, 0.40821073)),
    "qwen2.5-vl": (14, 2, 2, 3136, 12845056, (0.48145466, 0.4578275, 0.40821073)),
    "qwen3-vl": (16, 2, 2, 65536, 16777216, (0.5, 0.5, 0.5)),
}


@pytest.mark.parametrize("name", sorted(QWEN_PRESET_CONSTANTS))
def test_qwen_preset_constants(name):
    strategy = get_strategy(name)
    assert (
        strategy.patch_size,
        strategy.merge_size,
        strategy.temporal_patch_size,
        strategy.min_pixels,
        strategy.max_pixels,
        strategy.mean,
    ) == QWEN_PRESET_CONSTANTS[name]


# ---------------------------------------------------------------------------------------------------------
# Registry


def test_list_strategies():
    names = list_strategies()
    assert names == sorted(names)
    assert len(set(names)) == len(names)
    assert {"internvl", "qwen2-vl", "qwen2.5-vl"} <= set(names)


@pytest.mark.parametrize(
    ("alias", "canonical"),
    [
        ("qwen2vl", "qwen2-vl"),
        ("Qwen2-VL", "qwen2-vl"),
        ("qwen2_vl", "qwen2-vl"),
        ("qwen2.5vl", "qwen2.5-vl"),
        ("Qwen2.5-VL", "qwen2.5-vl"),
        ("qwen25vl", "qwen2.5-vl"),
        ("qwen25-vl", "qwen2.5-vl"),
        ("InternVL", "internvl"),
        ("internvl2.5", "internvl"),
        ("InternVL3", "internvl"),
    ],
)
def test_aliases_resolve(alias, canonical):
    assert get_preset(alias).name == canonical
    strategy = get_strategy(alias)
    assert strategy.name == canonical
    assert strategy == get_strategy(canonical)


@pytest.mark.parametrize("name", NAMES)
def test_canonical_names_resolve(name):
    assert get_strategy(name).name == name


@pytest.mark.parametrize("name", ["nope", "", "qwen", "internvl4", "qwen4-vl"])
def test_unknown_strategy_lists_valid_names(name):
    with pytest.raises(ValueError, match="unknown strategy") as info:
        get_strategy(name)
    for valid in list_strategies():
        assert valid in str(info.value)


@pytest.mark.parametrize(("name", "param"), [("internvl", "max_pixels"), ("qwen2-vl", "max_tiles")])
def test_unknown_parameter_lists_valid_parameters(name, param):
    with pytest.raises(ValueError, match=param) as info:
        get_strategy(name, **{param: 5})
    message = str(info.value)
    assert "valid parameters" in message
    for f in tunable_fields(get_preset(name).cls):
        assert f.name in message


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("internvl", {"max_tiles": "12"}),
        ("internvl", {"max_tiles": True}),
        ("internvl", {"max_tiles": 12.0}),
        ("internvl", {"min_tiles": None}),
        ("internvl", {"thumbnail": 1}),
        ("internvl", {"exif_transpose": "yes"}),
        ("internvl", {"alpha": None}),
        ("qwen2-vl", {"max_pixels": 1003520.0}),
        ("qwen2-vl", {"min_pixels": False}),
    ],
)
def test_wrong_parameter_types(name, params):
    (param,) = params
    with pytest.raises(ValueError, match=param):
        get_strategy(name, **params)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("internvl", {"max_tiles": 0}),
        ("internvl", {"min_tiles": 0}),
        ("internvl", {"max_tiles": -1}),
        ("internvl", {"min_tiles": 13}),
        ("internvl", {"min_tiles": 7, "max_tiles": 6}),
        ("qwen2-vl", {"min_pixels": 20_000_000}),
        ("qwen2.5-vl", {"min_pixels": 4000, "max_pixels": 3999}),
        ("qwen2-vl", {"max_pixels": 0}),
        ("qwen2-vl", {"min_pixels": 0}),
        ("internvl", {"alpha": "pink"}),
        ("qwen2-vl", {"alpha": "black"}),
    ],
)
def test_invalid_parameter_values(name, params):
    with pytest.raises(ValueError, match="|".join(params)):
        get_strategy(name, **params)


def test_boundary_parameter_values_are_accepted():
    six = get_strategy("internvl", min_tiles=6, max_tiles=6).plan(100, 100)
    assert six.grid in {(1, 6), (2, 3), (3, 2), (6, 1)}
    assert get_strategy("internvl", max_tiles=1).plan(1920, 1080).num_tiles == 1
    plan = get_strategy("qwen2-vl", min_pixels=1003520, max_pixels=1003520).plan(640, 480)
    assert plan.resized_height % 28 == 0 and plan.resized_width % 28 == 0


@pytest.mark.parametrize(
    ("name", "param", "value"),
    [
        ("qwen2-vl", "patch_size", 16),
        ("qwen2.5-vl", "merge_size", 1),
        ("qwen2-vl", "temporal_patch_size", 1),
        ("qwen2-vl", "mean", (0.5, 0.5, 0.5)),
        ("internvl", "tile_size", 384),
        ("internvl", "tokens_per_tile", 64),
        ("internvl", "std", (0.5, 0.5, 0.5)),
    ],
)
def test_non_tunable_fields_cannot_be_set(name, param, value):
    assert param not in {f.name for f in tunable_fields(get_preset(name).cls)}
    with pytest.raises(ValueError, match=param):
        get_strategy(name, **{param: value})


@pytest.mark.parametrize("name", NAMES)
def test_strategies_are_frozen(name):
    strategy = get_strategy(name)
    for f in dataclasses.fields(strategy):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(strategy, f.name, getattr(strategy, f.name))


@pytest.mark.parametrize("name", NAMES)
def test_strategies_are_picklable(name):
    strategy = get_strategy(name)
    clone = pickle.loads(pickle.dumps(strategy))
    assert clone == strategy
    assert type(clone) is type(strategy)
    assert clone.params() == strategy.params()
    assert clone.plan(1920, 1080) == strategy.plan(1920, 1080)


@pytest.mark.parametrize("name", NAMES)
def test_params_are_json_able(name):
    params = get_strategy(name).params()
    assert params["name"] == name
    assert json.loads(json.dumps(params)) == params
    fields = dataclasses.fields(get_preset(name).cls)
    # Every field, except one added after outputs existed while it has its default (`param`).
    later = {f.name for f in fields if not f.metadata["recorded_at_default"]}
    assert {f.name for f in fields} - later == set(params)


@pytest.mark.parametrize("name", NAMES)
def test_presets_build_with_defaults_only(name):
    """Every preset is a valid strategy as registered, and `get_strategy` returns its class."""
    preset = get_preset(name)
    strategy = get_strategy(name)
    assert type(strategy) is preset.cls
    for key, value in preset.params.items():
        assert getattr(strategy, key) == value
    assert preset.description
