"""InternVL 1.5 / 2 / 2.5 / 3 dynamic tiling (`dynamic_preprocess` in OpenGVLab/InternVL).

The grid is the (cols, rows) whose aspect ratio is closest to the image's; the image is stretched to
448*cols x 448*rows with Pillow's BICUBIC and cut row-major into 448-px tiles; a 448x448 squash of the
whole image is appended last as the thumbnail when there is more than one tile. Parity targets: the
reference `load_image` / `dynamic_preprocess` and transformers' `GotOcr2ImageProcessorPil` as the
InternVL3 `-hf` checkpoints configure it (size 448, ImageNet mean/std, crop_to_patches, max_patches 12).
"""

from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import numpy as np
from PIL import Image

from .base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
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


@lru_cache(maxsize=64)
def candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """Every (cols, rows) with min_tiles <= cols*rows <= max_tiles, in increasing tile count.

    Within one tile count the order is transformers' (cols outer, rows inner); the reference iterates a
    Python set instead, and an exhaustive sweep (docs/strategies.md) shows both pick the same grid.
    """
    grids = [
        (cols, rows)
        for cols in range(1, max_tiles + 1)
        for rows in range(1, max_tiles + 1)
        if min_tiles <= cols * rows <= max_tiles
    ]
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def closest_grid(width: int, height: int, tile_size: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """The reference `find_closest_aspect_ratio`, operation for operation (float64, exact ties).

    On an exact tie the later (larger) grid wins if the image has more than half of that grid's pixel
    area: this is why 1920x1080 at 12 tiles is 4x2, not 2x1.
    """
    aspect = width / height
    area = width * height
    best = (1, 1)
    best_diff = float("inf")
    for cols, rows in candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


@dataclass(frozen=True)
class InternVL(Strategy):
    """InternVL dynamic tiling: 448-px tiles, closest-aspect grid, squashed thumbnail last."""

    min_tiles: int = param(1, "Fewest tiles in the grid (thumbnail not counted).", minimum=1)
    max_tiles: int = param(
        12, "Most tiles in the grid (thumbnail not counted); InternVL's max_dynamic_patch.", minimum=1
    )
    thumbnail: bool = param(True, "Append a 448x448 squash of the whole image when there are 2+ tiles.")
    tile_size: int = param(448, "Tile side in pixels (InternViT input size).", tunable=False)
    tokens_per_tile: int = param(
        256, "(448/14)^2 patches after pixel shuffle with downsample_ratio 0.5.", tunable=False
    )
    mean: tuple[float, ...] = param(IMAGENET_MEAN, "ImageNet mean.", tunable=False)
    std: tuple[float, ...] = param(IMAGENET_STD, "ImageNet std.", tunable=False)

    multi_image_rule: ClassVar[str] = (
        "none automatic. InternVL's own finetune script (multi_modal_multi_image_get_item) gives each of n "
        "images max(1, max_dynamic_patch // n) tiles, while transformers' processor and ms-swift keep "
        "max_tiles per image; reproduce the finetune script with a max_tiles budget equal to max_tiles"
    )
    budget_rules: ClassVar = types.MappingProxyType(
        {
            "max_tiles": "max_tiles = max(min_tiles, budget // n), never above max_tiles (the finetune "
            "script's max_dynamic_patch // num_image; the thumbnail is not counted)",
            "max_tokens": "max_tiles = the largest k whose worst case, (k + 1 thumbnail if k > 1) * 256 "
            "tokens, fits budget // n",
        }
    )

    def validate(self) -> None:
        if self.min_tiles > self.max_tiles:
            raise ValueError(
                f"{self.name}: min_tiles ({self.min_tiles}) must not exceed max_tiles ({self.max_tiles})"
            )

    def worst_tokens(self, max_tiles: int) -> int:
        """The most tokens one image can take with `max_tiles`: an image of aspect k:1 gets the k x 1 grid,
        plus the thumbnail whenever there is more than one tile."""
        return (max_tiles + int(self.thumbnail and max_tiles > 1)) * self.tokens_per_tile

    def limit_tiles(self, per_image: int) -> InternVL:
        limit = max(self.min_tiles, per_image)
        return self if limit >= self.max_tiles else dataclasses.replace(self, max_tiles=limit)

    def limit_tokens(self, per_image: int) -> InternVL:
        limit = self.max_tiles
        while limit >= self.min_tiles and self.worst_tokens(limit) > per_image:
            limit -= 1
        if limit < self.min_tiles:
            raise ValueError(
                f"{self.name}: a token budget of {per_image} per image is below the smallest worst case "
                f"(min_tiles={self.min_tiles}: {self.worst_tokens(self.min_tiles)} tokens)"
            )
        return self if limit == self.max_tiles else dataclasses.replace(self, max_tiles=limit)

    def plan(self, width: int, height: int) -> Plan:
        check_size(width, height)
        t = self.tile_size
        cols, rows = closest_grid(width, height, t, self.min_tiles, self.max_tiles)
        boxes = grid_boxes(cols, rows, t)
        thumbnail = self.thumbnail and cols * rows != 1
        num_tiles = cols * rows + int(thumbnail)
        return Plan(
            strategy=self.name,
            orig_width=width,
            orig_height=height,
            resized_width=cols * t,
            resized_height=rows * t,
            grid=(cols, rows),
            tile_boxes=boxes,
            thumbnail=thumbnail,
            num_tiles=num_tiles,
            num_tokens=num_tiles * self.tokens_per_tile,
            shape=(num_tiles, 3, t, t),
        )

    def render(self, image: Image.Image, plan: Plan) -> np.ndarray:
        t = self.tile_size
        cols, rows = plan.grid
        out = np.empty(plan.shape, dtype=np.uint8)
        resized = image_view(
            image.resize((plan.resized_width, plan.resized_height), Image.Resampling.BICUBIC)
        )
        cut_tiles(resized, cols, rows, out[: cols * rows])
        if plan.thumbnail:
            thumb = image_view(image.resize((t, t), Image.Resampling.BICUBIC))
            out[cols * rows] = thumb.transpose(2, 0, 1)
        return out

    def source_size(self, plan: Plan) -> tuple[int, int]:
        t = self.tile_size if plan.thumbnail else 0
        return max(plan.resized_width, t), max(plan.resized_height, t)

    def views(self, pixels: np.ndarray, plan: Plan) -> list[tuple[str, np.ndarray]]:
        cols, rows = plan.grid
        views = [("tiles, row-major", join_tiles(pixels[: cols * rows], cols, rows))]
        if plan.thumbnail:
            views.append(("thumbnail (last)", pixels[cols * rows].transpose(1, 2, 0)))
        return views


PRESETS = [
    Preset(
        "internvl",
        InternVL,
        {},
        "InternVL 1.5/2/2.5/3: closest-aspect grid of 448-px tiles (max 12) + thumbnail, 256 tokens/tile.",
        aliases=("internvl2", "internvl2.5", "internvl3"),
    ),
]
