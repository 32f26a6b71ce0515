"""DeepSeek-VL2 candidate tiling with a global view (`DeepseekVLV2Processor` in deepseek-ai/DeepSeek-VL2).

The local canvas is the candidate resolution (multiples of 384 with at most 9 tiles) that keeps the most
image pixels and wastes the fewest; the image is fitted into it aspect-preserving and centred on grey
(127, 127, 127) with Pillow's `ImageOps.pad` (BICUBIC, banker's rounding for both the fitted size and the
offset), then cut row-major into 384-px tiles. The global view is the same `ImageOps.pad` of the
**original** image into 384x384 and comes first. Samples with three or more images switch tiling off
(`tiling=False`): the canvas is then 384x384, so every image is a global view plus one identical local
view, 421 tokens.

Parity target: `tokenize_with_images` / `select_best_resolution` / `ImageTransform` of
`deepseek_vl2/models/processing_deepseek_vl_v2.py` (ToTensor + Normalize, mean = std = 0.5), images loaded
with `convert("RGB")` (`utils/io.py`), run with the Pillow major version vlmtile pins (13).
"""

from __future__ import annotations

import dataclasses
import math
import types
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from PIL import Image

from .base import (
    SIGLIP_MEAN,
    SIGLIP_STD,
    Box,
    Plan,
    Preset,
    Strategy,
    check_size,
    cut_tiles,
    grid_boxes,
    join_tiles,
    param,
)

CANDIDATE_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (384, 384),
    (384, 768),
    (768, 384),
    (384, 1152),
    (1152, 384),
    (384, 1536),
    (1536, 384),
    (768, 768),
    (384, 1920),
    (1920, 384),
    (384, 2304),
    (2304, 384),
    (768, 1152),
    (1152, 768),
    (384, 2688),
    (2688, 384),
    (384, 3072),
    (3072, 384),
    (768, 1536),
    (1536, 768),
    (384, 3456),
    (3456, 384),
    (1152, 1152),
)
"""The checkpoints' `candidate_resolutions` as (width, height), in their order (the order breaks ties):
every (384*m, 384*n) with m*n <= 9."""


def select_best_resolution(
    width: int, height: int, candidates: tuple[tuple[int, int], ...] = CANDIDATE_RESOLUTIONS
) -> tuple[int, int]:
    """The reference `select_best_resolution`: the (w, h) candidate keeping the most image pixels.

    Per candidate: scale = min(w/W, h/H) in float64, the scaled size truncated with `int`, the effective
    resolution capped at W*H; a candidate wins on strictly more effective pixels, or on equal effective
    pixels and strictly less waste (w*h - effective). The first candidate therefore always wins ties.
    """
    best = candidates[0]
    best_effective = 0
    best_wasted = math.inf
    for cand_w, cand_h in candidates:
        scale = min(cand_w / width, cand_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = cand_w * cand_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (cand_w, cand_h), effective, wasted
    return best


def pad_box(width: int, height: int, canvas_width: int, canvas_height: int) -> Box:
    """Where Pillow 13's `ImageOps.pad(image, (canvas_width, canvas_height))` puts a W x H image.

    Returns (left, top, right, bottom) of the resized content inside the canvas. `contain` keeps the side
    whose ratio is limiting and rounds the other (`round`, half to even, same float64 operation order);
    the offset along the padded axis is `round(slack * 0.5)`, half to even too (1000x378 in 384x384: 145
    rows at y=120). When the rounded side is 0 (a 384x384 view of an image thinner than 1:768) Pillow 13
    returns an empty image and the canvas stays all padding: the box is then empty (right == left or
    bottom == top). Pillow 12 and older raise ValueError there instead (python-pillow/Pillow#9997).
    """
    content_w, content_h = canvas_width, canvas_height
    image_ratio = width / height
    canvas_ratio = canvas_width / canvas_height
    if image_ratio != canvas_ratio:
        if image_ratio > canvas_ratio:
            content_h = round(height / width * canvas_width)
        else:
            content_w = round(width / height * canvas_height)
    if content_w != canvas_width:
        left = round((canvas_width - content_w) * 0.5)
        return (left, 0, left + content_w, content_h)
    if content_h != canvas_height:
        top = round((canvas_height - content_h) * 0.5)
        return (0, top, content_w, top + content_h)
    return (0, 0, canvas_width, canvas_height)


@dataclass(frozen=True)
class DeepSeekVL2(Strategy):
    """DeepSeek-VL2: 384-px tiles of a grey-padded candidate canvas, padded global view first."""

    tiling: bool = param(
        True,
        "Tile over the candidate resolutions (the reference's cropping=True, which it uses when the sample "
        "has at most 2 images; for_sample turns it off for samples with 3 or more). tiling=False "
        "(--no-tiling) forces it off: each image is then a 384x384 global view plus one identical local "
        "view, 421 tokens.",
    )
    tile_size: int = param(384, "Tile and global-view side (SigLIP so400m input size).", tunable=False)
    patch_size: int = param(14, "SigLIP patch side (processor patch_size).", tunable=False)
    downsample_ratio: int = param(
        2, "Projector 2x2 unfold: 27x27 patches padded to 28x28 become 14x14 tokens.", tunable=False
    )
    mean: tuple[float, ...] = param(SIGLIP_MEAN, "Mean 0.5; the pad colour is int(mean*255).", tunable=False)
    std: tuple[float, ...] = param(SIGLIP_STD, "Std 0.5.", tunable=False)

    metadata_fields: ClassVar = types.MappingProxyType({"images_spatial_crop": "list<int>"})

    max_tiled_images: ClassVar[int] = 2
    """`cropping = len(images) <= 2` in the reference processor (`DeepseekVLV2Processor.__call__`)."""
    multi_image_rule: ClassVar[str] = (
        "tiling off (the processor's cropping = len(images) <= 2) when the sample has 3 or more images: "
        "each image is a 384x384 global view plus one identical local view, 421 tokens"
    )

    @property
    def pad_color(self) -> tuple[int, ...]:
        """The reference's `tuple(int(x * 255) for x in mean)`: (127, 127, 127) for mean 0.5."""
        return tuple(int(m * 255) for m in self.mean)

    @property
    def tokens_per_side(self) -> int:
        """Tokens per view side: ceil((384 // 14) / 2) = 14."""
        return math.ceil((self.tile_size // self.patch_size) / self.downsample_ratio)

    def num_tokens(self, cols: int, rows: int) -> int:
        """`<image>` positions: global rows with a newline each, one separator, the local mosaic's rows
        with a newline each (211 + 14*rows*(14*cols + 1) for the preset)."""
        n = self.tokens_per_side
        return n * (n + 1) + 1 + (rows * n) * (cols * n + 1)

    def sample_rule(self, num_images: int) -> DeepSeekVL2:
        if num_images > self.max_tiled_images and self.tiling:
            return dataclasses.replace(self, tiling=False)
        return self

    def plan(self, width: int, height: int) -> Plan:
        check_size(width, height)
        t = self.tile_size
        if self.tiling:
            canvas_w, canvas_h = select_best_resolution(width, height)
        else:
            canvas_w, canvas_h = t, t
        cols, rows = canvas_w // t, canvas_h // t
        boxes = grid_boxes(cols, rows, t)
        content = pad_box(width, height, canvas_w, canvas_h)
        return Plan(
            strategy=self.name,
            orig_width=width,
            orig_height=height,
            resized_width=canvas_w,
            resized_height=canvas_h,
            grid=(cols, rows),
            tile_boxes=boxes,
            thumbnail=True,
            num_tiles=1 + cols * rows,
            num_tokens=self.num_tokens(cols, rows),
            shape=(1 + cols * rows, 3, t, t),
            extra=(("images_spatial_crop", (cols, rows)),),
            content_box=None if content == (0, 0, canvas_w, canvas_h) else content,
        )

    def _pad(self, image: Image.Image, canvas_width: int, canvas_height: int, box: Box | None) -> np.ndarray:
        """`ImageOps.pad(image, (canvas_width, canvas_height), color=pad_color)` as (H, W, 3) uint8, the
        image resized (BICUBIC, from the original) into `box` (None: the whole canvas)."""
        canvas = np.empty((canvas_height, canvas_width, 3), dtype=np.uint8)
        # One row of the pad colour, copied into the bands around the box only: broadcasting the
        # 3-byte colour over the whole canvas cost more than the rest of the layout together.
        row = np.empty((canvas_width, 3), dtype=np.uint8)
        row[...] = np.asarray(self.pad_color, dtype=np.uint8)
        left, top, right, bottom = (0, 0, canvas_width, canvas_height) if box is None else box
        if right <= left or bottom <= top:
            canvas[...] = row
            return canvas
        resized = image.resize((right - left, bottom - top), Image.Resampling.BICUBIC)
        canvas[top:bottom, left:right] = np.asarray(resized)
        canvas[:top] = row
        canvas[bottom:] = row
        canvas[top:bottom, :left] = row[:left]
        canvas[top:bottom, right:] = row[right:]
        return canvas

    def render(self, image: Image.Image, plan: Plan) -> np.ndarray:
        t = self.tile_size
        cols, rows = plan.grid
        out = np.empty(plan.shape, dtype=np.uint8)
        global_view = self._pad(image, t, t, pad_box(plan.orig_width, plan.orig_height, t, t))
        out[0] = global_view.transpose(2, 0, 1)
        if (plan.resized_width, plan.resized_height) == (t, t):
            local = global_view  # the reference pads the same image to the same size twice
        else:
            local = self._pad(image, plan.resized_width, plan.resized_height, plan.content_box)
        cut_tiles(local, cols, rows, out[1:])
        return out

    def source_size(self, plan: Plan) -> tuple[int, int]:
        t = self.tile_size
        left, top, right, bottom = pad_box(plan.orig_width, plan.orig_height, t, t)
        width, height = super().source_size(plan)
        return max(width, right - left), max(height, bottom - top)

    def views(self, pixels: np.ndarray, plan: Plan) -> list[tuple[str, np.ndarray]]:
        cols, rows = plan.grid
        return [
            ("local canvas, row-major tiles (after the global view)", join_tiles(pixels[1:], cols, rows)),
            ("global view (first)", pixels[0].transpose(1, 2, 0)),
        ]


PRESETS = [
    Preset(
        "deepseek-vl2",
        DeepSeekVL2,
        {"alpha": "drop"},
        "DeepSeek-VL2: grey-padded 384-px tiles over 23 candidate canvases (max 9 tiles) "
        "+ padded global view first; 211 + 14*rows*(14*cols + 1) tokens; untiled (421) in samples of 3+ "
        "images.",
    ),
]
