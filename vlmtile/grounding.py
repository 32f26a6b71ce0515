"""Map boxes and points from original-image pixels onto the stored canvas and its tiles.

Grounding data (detection boxes, referring expressions, GUI clicks) is annotated on the original image,
but the model sees a resized, sometimes padded canvas cut into tiles. Every strategy stores the same three
fields for that (`GROUNDING_FIELDS`: `content_box`, `transposed`, `tile_boxes`, beside `orig_width` /
`orig_height`), so these functions need nothing but one image's metadata dict, whatever the model, and can
run long after preprocessing (from a Parquet row or a WebDataset JSON).

Coordinates are continuous pixel coordinates: pixel column i spans [i, i + 1), so a box (0, 0, W, H) is the
whole image and the centre of pixel i is i + 0.5. This is the convention Pillow's resize uses, which makes
the mapping exact: the image is resized to exactly the size of `content_box`, edge to edge, so an original
x lands at `left + x * (right - left) / orig_width` (y likewise, with its own scale: squashes such as
xcomposer2's change the aspect ratio).

`transposed` (XComposer HD, portrait images) needs no special handling here: the reference transposes the
image, resizes and pads it, then transposes the canvas back, so the canvas and `content_box` are in the
original orientation. The flag only records that the resampling ran in the transposed frame.

What is mapped is the resized canvas (`resized_width` x `resized_height`): the local tiles. The thumbnail
/ global view (InternVL, LLaVA, DeepSeek-VL2) is a separate view of the whole image and is not covered.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["map_box", "map_point", "tile_of_point"]


def _int_list(metadata: Mapping[str, Any], key: str, length: int) -> list[int]:
    value = metadata.get(key)
    if not isinstance(value, Sequence) or len(value) != length:
        raise ValueError(f"metadata has no valid {key!r} (a list of {length} ints): {value!r}")
    return [int(v) for v in value]


def _frame(metadata: Mapping[str, Any]) -> tuple[int, int, list[int]]:
    """(orig_width, orig_height, content_box) after checking they are there and sane."""
    try:
        width, height = int(metadata["orig_width"]), int(metadata["orig_height"])
    except KeyError as e:
        raise ValueError(f"metadata lacks {e.args[0]!r}: not a vlmtile per-image metadata dict") from e
    left, top, right, bottom = box = _int_list(metadata, "content_box", 4)
    if width < 1 or height < 1 or right < left or bottom < top:
        raise ValueError(f"metadata has an invalid frame: {width}x{height}, content_box {box}")
    return width, height, box


def map_point(metadata: Mapping[str, Any], x: float, y: float) -> tuple[float, float]:
    """(x, y) in original pixels -> (x, y) on the resized canvas.

    Raises ValueError for a point outside the original image (0 <= x <= orig_width, same for y).
    """
    width, height, (left, top, right, bottom) = _frame(metadata)
    if not (0 <= x <= width and 0 <= y <= height):
        raise ValueError(f"point ({x}, {y}) lies outside the original {width}x{height} image")
    return left + x * (right - left) / width, top + y * (bottom - top) / height


def map_box(
    metadata: Mapping[str, Any], box: tuple[float, float, float, float]
) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) in original pixels -> the same box on the resized canvas.

    The mapping is a per-axis scale plus offset, so mapping the corners maps the box exactly.
    """
    x0, y0, x1, y1 = box
    if x1 < x0 or y1 < y0:
        raise ValueError(f"box {box} is not (left, top, right, bottom) with left <= right and top <= bottom")
    left, top = map_point(metadata, x0, y0)
    right, bottom = map_point(metadata, x1, y1)
    return left, top, right, bottom


def tile_of_point(metadata: Mapping[str, Any], x: float, y: float) -> tuple[int, float, float]:
    """(x, y) in original pixels -> (tile index, x in that tile, y in that tile).

    The index is into `tile_boxes` (row-major over the canvas). Tiles are half-open, [left, right), so a
    point on a shared edge belongs to the tile right of / below it; the canvas' own right and bottom edges
    belong to the last column and row. Note where the tiles sit in `pixel_values`: after the base image /
    global view for LLaVA and DeepSeek-VL2 (tile i is view i + 1), before the thumbnail for InternVL (view
    i), and XComposer HD stores the whole canvas, which the model cuts along these same boxes.
    """
    cx, cy = map_point(metadata, x, y)
    tiles = metadata.get("tile_boxes")
    if not isinstance(tiles, Sequence) or not tiles:
        raise ValueError(f"metadata has no valid 'tile_boxes': {tiles!r}")
    boxes = [_int_list({"box": t}, "box", 4) for t in tiles]
    canvas_right = max(b[2] for b in boxes)
    canvas_bottom = max(b[3] for b in boxes)
    for index, (left, top, right, bottom) in enumerate(boxes):
        inside_x = left <= cx < right or (cx == right == canvas_right)
        inside_y = top <= cy < bottom or (cy == bottom == canvas_bottom)
        if inside_x and inside_y:
            return index, cx - left, cy - top
    raise ValueError(f"canvas point ({cx}, {cy}) is in no tile of {boxes}")
