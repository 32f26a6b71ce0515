"""LLaVA-NeXT (llava-v1.6) "anyres" and LLaVA-OneVision "anyres_max_9" tiling.

The image is resized to fit the best grid pinpoint (a canvas whose sides are multiples of the tile size),
centred on a black canvas, and cut row-major into tiles. A squash of the whole image to one tile comes
FIRST in the output (the "base" image), then the tiles: pixel_values is (1 + cols*rows, 3, tile, tile).

Parity targets (transformers 5.23, PIL backend), configured as the public -hf checkpoints configure them:

* `llava-next`: `LlavaNextImageProcessorPil` as llava-hf/llava-v1.6-* (size shortest_edge 336, crop 336,
  BICUBIC, CLIP mean/std, pinpoints [[336,672],[672,336],[672,672],[1008,336],[336,1008]]) and
  `LlavaNextProcessor` token counting (patch_size 14, vision_feature_select_strategy "default",
  num_additional_image_tokens 1).
* `llava-onevision`: `LlavaOnevisionImageProcessorPil` as llava-hf/llava-onevision-qwen2-*-ov-hf (size
  384x384, BICUBIC, mean = std = 0.5 -- the class defaults are CLIP's, the checkpoints override them --,
  36 pinpoints 1x1..6x6 tiles of 384) and `LlavaOnevisionProcessor` token counting (num_image_tokens 729,
  "full" feature selection, vision_aspect_ratio "anyres_max_9").

The reference pads the resized uint8 image with 0 before rescale/normalize, so black padding is the uint8
value 0 and the shared exact normalization table applies unchanged. The per-crop resize / centre crop the
processors apply afterwards are no-ops on crops that already have the tile size.

In a sample with several images, llava-onevision does not tile (`anyres=False`, set by `for_sample`): each
image is padded to a square with the mean colour and resized to one 384x384 view, as transformers'
`LlavaOnevisionImageProcessor` does for `batch_num_images != 1` and LLaVA-NeXT's train.py ("pad").

`pinpoint_order="wh"` switches to the original repositories (haotian-liu/LLaVA for v1.6, LLaVA-VL/LLaVA-NeXT
for OneVision): the same numeric pinpoint list read as (width, height) instead of transformers'
(height, width), and `int()` truncation instead of `int(round(x, 7))` in the unpad step of the token count.
"""

from __future__ import annotations

import dataclasses
import math
import types
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import numpy as np
from PIL import Image

from .base import (
    CLIP_MEAN,
    CLIP_STD,
    SIGLIP_MEAN,
    SIGLIP_STD,
    Box,
    Plan,
    Preset,
    Strategy,
    check_size,
    cut_tiles,
    grid_boxes,
    image_view,
    join_tiles,
    param,
)

PINPOINT_ORDERS = ("hw", "wh")

V16_PINPOINTS = (336, 672, 672, 336, 672, 672, 1008, 336, 336, 1008)
"""llava-v1.6 `image_grid_pinpoints` [[336,672],[672,336],[672,672],[1008,336],[336,1008]], flattened."""

ONEVISION_PINPOINTS = tuple(v for i in range(1, 7) for j in range(1, 7) for v in (384 * i, 384 * j))
"""OneVision "(1x1),...,(6x6)" expanded as the checkpoints list it: [[384,384],[384,768],...,[2304,2304]]."""


def select_best_resolution(
    width: int, height: int, candidates: tuple[tuple[int, int], ...]
) -> tuple[int, int]:
    """The anyres `select_best_resolution` over (width, height) candidates, in list order.

    Most effective (downscaled, capped at the original) pixels wins; ties go to the least wasted canvas,
    and remaining ties to the earlier candidate. Same float64 operations as the references.
    """
    best = candidates[0]
    max_effective = 0
    min_wasted = math.inf
    for cand_w, cand_h in candidates:
        scale = min(cand_w / width, cand_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = cand_w * cand_h - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            best, max_effective, min_wasted = (cand_w, cand_h), effective, wasted
    return best


def fit_size(width: int, height: int, target_w: int, target_h: int) -> tuple[int, int]:
    """(new_w, new_h) of the aspect-preserving resize into the canvas (`get_patch_output_size`).

    The side with the smaller scale fills the canvas; the other is `ceil`ed and capped.
    """
    scale_w = target_w / width
    scale_h = target_h / height
    if scale_w < scale_h:
        return target_w, min(math.ceil(height * scale_w), target_h)
    return min(math.ceil(width * scale_h), target_w), target_h


def feature_grid(
    width: int,
    height: int,
    cols: int,
    rows: int,
    side: int,
    max_num_patches: int,
    truncate: bool,
) -> tuple[int, int]:
    """(rows, cols) of the tile feature map after unpadding (and the anyres_max downscale, if any).

    `truncate=True` is the original `unpad_image` (`int(x)`); False is transformers' `int(round(x, 7))`.
    """
    cur_h, cur_w = rows * side, cols * side
    if width / height > cur_w / cur_h:
        scaled = height * (cur_w / width)
        new_h = int(scaled) if truncate else int(round(scaled, 7))
        cur_h -= 2 * ((cur_h - new_h) // 2)
    else:
        scaled = width * (cur_h / height)
        new_w = int(scaled) if truncate else int(round(scaled, 7))
        cur_w -= 2 * ((cur_w - new_w) // 2)
    if max_num_patches:
        times = math.sqrt(cur_h * cur_w / (max_num_patches * side**2))
        if times > 1.1:
            cur_h, cur_w = int(cur_h // times), int(cur_w // times)
    return cur_h, cur_w


def square_pad_box(width: int, height: int, side: int) -> Box:
    """Where the image lies after transformers' `pad_to_square` and the resize of that square to side x side.

    The short side is centred with a floor offset, `(long - short) // 2`, as both `pad_to_square` and the
    original `expand2square` do; the whole square is then scaled by side / long, so the edges are rounded
    to the nearest pixel (half to even) here: at most half a pixel off the exact, fractional position.
    """
    long = max(width, height)
    left = (long - width) // 2
    top = (long - height) // 2
    scale = side / long
    return (
        round(left * scale),
        round(top * scale),
        round((left + width) * scale),
        round((top + height) * scale),
    )


@lru_cache(maxsize=32)
def _pairs(flat: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    return tuple((flat[k], flat[k + 1]) for k in range(0, len(flat), 2))


@dataclass(frozen=True)
class LlavaNext(Strategy):
    """LLaVA anyres: best-fit pinpoint canvas, black centred padding, row-major tiles, base image FIRST."""

    pinpoint_order: str = param(
        "hw",
        "How pinpoint pairs are read: 'hw' = (height, width) as transformers' processors do (the default, "
        "matching the -hf checkpoints); 'wh' = (width, height) as the original LLaVA repositories do, "
        "together with their int() truncation in the unpadded token count. Grids differ only for "
        "llava-next images with both sides <= 336 (or beyond ~1000:1); tokens for a few more sizes.",
        choices=PINPOINT_ORDERS,
    )
    image_grid_pinpoints: tuple[int, ...] = param(
        V16_PINPOINTS,
        "The checkpoint's image_grid_pinpoints, pairs flattened (a0, b0, a1, b1, ...); each pair is read "
        "per pinpoint_order. Every value is a multiple of tile_size.",
        tunable=False,
    )
    tile_size: int = param(336, "Crop side in pixels (vision tower input size).", tunable=False)
    features_per_side: int = param(
        24, "Vision features per tile side (tile_size // 14); base image = its square.", tunable=False
    )
    max_num_patches: int = param(
        0,
        "anyres_max_N: downscale the unpadded feature map when it exceeds N tiles' worth by more than "
        "1.1x (OneVision: 9); 0 = never.",
        tunable=False,
    )
    anyres: bool = param(
        True,
        "Tile with anyres. False: pad the image to a square with the mean colour and resize it to one "
        "tile_size view, the processing transformers (and LLaVA-NeXT's train.py, its 'pad' override) apply "
        "to every image of a multi-image sample; for_sample sets it when multi_image_anyres is False.",
        tunable=False,
    )
    multi_image_anyres: bool = param(
        True,
        "Whether images of a multi-image sample keep anyres (llava-next: transformers' LlavaNext processor "
        "has no multi-image rule) or become one padded square view each (llava-onevision: False).",
        tunable=False,
    )
    mean: tuple[float, ...] = param(CLIP_MEAN, "Normalization mean.", tunable=False)
    std: tuple[float, ...] = param(CLIP_STD, "Normalization std.", tunable=False)

    metadata_fields: ClassVar = types.MappingProxyType(
        {"image_sizes": "list<int>", "feature_grid": "list<int>"}
    )

    multi_image_rule: ClassVar[str] = (
        "llava-onevision: with more than one image, each image is padded to a square (mean colour, 127) "
        "and resized to one 384x384 view, 729 + 1 newline tokens (transformers' need_patching = n == 1, "
        "LLaVA-NeXT train.py's 'pad' override); llava-next: none"
    )

    @property
    def pad_color(self) -> tuple[int, ...]:
        """`tuple(int(x * 255) for x in image_mean)`: the square padding colour of both references."""
        return tuple(int(m * 255) for m in self.mean)

    def sample_rule(self, num_images: int) -> LlavaNext:
        if self.anyres and not self.multi_image_anyres:
            return dataclasses.replace(self, anyres=False)
        return self

    def validate(self) -> None:
        flat = self.image_grid_pinpoints
        if not flat or len(flat) % 2:
            raise ValueError(f"{self.name}: image_grid_pinpoints must hold (a, b) pairs, got {flat!r}")
        if any(isinstance(v, bool) or not isinstance(v, int) for v in flat):
            raise ValueError(f"{self.name}: image_grid_pinpoints must be integers, got {flat!r}")
        if self.tile_size < 1 or any(v < 1 or v % self.tile_size for v in flat):
            raise ValueError(
                f"{self.name}: every image_grid_pinpoints value must be a positive multiple of "
                f"tile_size {self.tile_size}, got {flat!r}"
            )

    def candidates(self) -> tuple[tuple[int, int], ...]:
        """The pinpoints as (width, height) canvases, in list order."""
        pairs = _pairs(self.image_grid_pinpoints)
        return pairs if self.pinpoint_order == "wh" else tuple((b, a) for a, b in pairs)

    def plan(self, width: int, height: int) -> Plan:
        """Geometry: `resized_*` is the chosen pinpoint canvas; tile_boxes cut it row-major; the base
        image (thumbnail) is view 0 of `shape`, before the tiles."""
        check_size(width, height)
        t = self.tile_size
        if not self.anyres:
            return self._square_plan(width, height)
        canvas_w, canvas_h = select_best_resolution(width, height, self.candidates())
        cols, rows = canvas_w // t, canvas_h // t
        new_w, new_h = fit_size(width, height, canvas_w, canvas_h)
        left, top = (canvas_w - new_w) // 2, (canvas_h - new_h) // 2
        side = self.features_per_side
        grid_h, grid_w = feature_grid(
            width, height, cols, rows, side, self.max_num_patches, truncate=self.pinpoint_order == "wh"
        )
        boxes = grid_boxes(cols, rows, t)
        num_tiles = 1 + cols * rows
        content = (left, top, left + new_w, top + new_h)
        return Plan(
            strategy=self.name,
            orig_width=width,
            orig_height=height,
            resized_width=canvas_w,
            resized_height=canvas_h,
            grid=(cols, rows),
            tile_boxes=boxes,
            thumbnail=True,
            num_tiles=num_tiles,
            num_tokens=side * side + grid_h * (grid_w + 1),
            shape=(num_tiles, 3, t, t),
            extra=(("image_sizes", (height, width)), ("feature_grid", (grid_h, grid_w))),
            content_box=None if content == (0, 0, canvas_w, canvas_h) else content,
        )

    def _square_plan(self, width: int, height: int) -> Plan:
        """`anyres=False`: one tile_size view of the padded square; its features (side^2) plus the one
        image_newline the model appends to an unpatched image (`num_image_tokens + 1` in transformers).
        `feature_grid` is (0, 0): there is no tile feature map."""
        t = self.tile_size
        content = square_pad_box(width, height, t)
        return Plan(
            strategy=self.name,
            orig_width=width,
            orig_height=height,
            resized_width=t,
            resized_height=t,
            grid=(1, 1),
            tile_boxes=((0, 0, t, t),),
            thumbnail=False,
            num_tiles=1,
            num_tokens=self.features_per_side**2 + 1,
            shape=(1, 3, t, t),
            extra=(("image_sizes", (height, width)), ("feature_grid", (0, 0))),
            content_box=None if content == (0, 0, t, t) else content,
        )

    def _render_square(self, image: Image.Image) -> np.ndarray:
        """transformers' `pad_to_square(image, mean colour)` then the BICUBIC resize to tile_size."""
        t = self.tile_size
        width, height = image.size
        square = image
        if width != height:
            long = max(width, height)
            padded = np.empty((long, long, 3), dtype=np.uint8)
            padded[...] = np.asarray(self.pad_color, dtype=np.uint8)
            left, top = (long - width) // 2, (long - height) // 2
            padded[top : top + height, left : left + width] = np.asarray(image)
            square = Image.fromarray(padded)
        out = np.empty((1, 3, t, t), dtype=np.uint8)
        out[0] = image_view(square.resize((t, t), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
        return out

    def source_size(self, plan: Plan) -> tuple[int, int]:
        t = self.tile_size
        if not self.anyres:  # the padded square's long side becomes t
            long = max(plan.orig_width, plan.orig_height)
            return -(-plan.orig_width * t // long), -(-plan.orig_height * t // long)
        width, height = super().source_size(plan)
        return max(width, t), max(height, t)  # the base image is a t x t squash

    def render(self, image: Image.Image, plan: Plan) -> np.ndarray:
        """uint8 (1 + cols*rows, 3, t, t): the base image squashed to t x t first, then the tiles
        (anyres=False: (1, 3, t, t), the padded square)."""
        if not self.anyres:
            return self._render_square(image)
        t = self.tile_size
        cols, rows = plan.grid
        left, top, right, bottom = plan.image_box
        out = np.empty(plan.shape, dtype=np.uint8)
        out[0] = image_view(image.resize((t, t), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
        canvas = np.zeros((plan.resized_height, plan.resized_width, 3), dtype=np.uint8)
        canvas[top:bottom, left:right] = np.asarray(
            image.resize((right - left, bottom - top), Image.Resampling.BICUBIC)
        )
        cut_tiles(canvas, cols, rows, out[1:])
        return out

    def views(self, pixels: np.ndarray, plan: Plan) -> list[tuple[str, np.ndarray]]:
        if not self.anyres:
            return [("padded square, one view (multi-image sample)", pixels[0].transpose(1, 2, 0))]
        cols, rows = plan.grid
        return [
            ("padded canvas, tiles row-major", join_tiles(pixels[1:], cols, rows)),
            ("base image (first view)", pixels[0].transpose(1, 2, 0)),
        ]


PRESETS = [
    Preset(
        "llava-next",
        LlavaNext,
        {},
        "LLaVA-NeXT (v1.6) anyres: best of 5 pinpoints, black-padded 336-px tiles after a squashed base "
        "image, CLIP mean/std; 576 + unpadded rows x (cols + 1) tokens.",
        aliases=("llava-v1.6", "llava1.6"),
    ),
    Preset(
        "llava-onevision",
        LlavaNext,
        {
            "image_grid_pinpoints": ONEVISION_PINPOINTS,
            "tile_size": 384,
            "features_per_side": 27,
            "max_num_patches": 9,
            "multi_image_anyres": False,
            "mean": SIGLIP_MEAN,
            "std": SIGLIP_STD,
        },
        "LLaVA-OneVision anyres_max_9: best of 1x1..6x6 grids of 384-px SigLIP tiles after a squashed base "
        "image, mean/std 0.5; 729 + unpadded (downscaled past 9 tiles) rows x (cols + 1) tokens.",
        aliases=("llava-ov",),
    ),
]
