"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL native resolution: `smart_resize` to multiples of patch*merge, then
flattened patches.

Parity target: transformers' `Qwen2VLImageProcessorPil` with the public checkpoints' preprocessor configs
(Qwen2/2.5-VL: patch 14, min_pixels 3136, max_pixels 12845056, CLIP mean/std; Qwen3-VL: patch 16,
min_pixels 65536, max_pixels 16777216, mean/std 0.5; Qwen3-VL checkpoints use the same processor class).
The output layout is the processor's `pixel_values` for one image:
(grid_h*grid_w, 3*temporal*patch*patch) rows, each run of merge*merge rows one merge window, the still
image repeated along the temporal axis; `image_grid_thw` = (1, grid_h, grid_w). With `temporal_copies` 1
the stored rows hold one temporal copy (3*patch*patch values) and `expand` repeats it.
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from .base import (
    CLIP_MEAN,
    CLIP_STD,
    GATHER_CHUNK,
    SIGLIP_MEAN,
    SIGLIP_STD,
    Plan,
    Preset,
    Strategy,
    check_size,
    gather,
    image_view,
    param,
)

MAX_ASPECT_RATIO = 200


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """transformers' `smart_resize` (v5), same operation order: returns (height, width).

    Python `round` is half-to-even and the divisions are float64, as in the reference; a reordering such as
    `h / (beta * factor)` changes results for some sizes.
    """
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be at most {MAX_ASPECT_RATIO}, got "
            f"{max(height, width) / min(height, width):.6g} ({width}x{height}); the reference refuses it"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class QwenVL(Strategy):
    """Qwen2-VL family: one resized image, cut into patch rows grouped by merge window."""

    min_pixels: int = param(3136, "Lower pixel budget for smart_resize (size.shortest_edge).", minimum=1)
    max_pixels: int = param(12845056, "Upper pixel budget for smart_resize (size.longest_edge).", minimum=1)
    patch_size: int = param(14, "Vision transformer patch side.", tunable=False)
    merge_size: int = param(2, "Spatial merge: merge_size^2 patches become one LLM token.", tunable=False)
    temporal_patch_size: int = param(2, "A still image is repeated this many times in time.", tunable=False)
    mean: tuple[float, ...] = param(CLIP_MEAN, "OpenAI CLIP mean.", tunable=False)
    std: tuple[float, ...] = param(CLIP_STD, "OpenAI CLIP std.", tunable=False)
    temporal_copies: int = param(
        2,
        "Temporal copies stored per patch row: temporal_patch_size is the processor's pixel_values; 1 "
        "stores half the bytes (the copies of a still image are equal) and open_dataset repeats it back, "
        "bit-exact. Code that reads the shards without open_dataset must repeat it itself.",
        minimum=1,
        recorded_at_default=False,
    )

    metadata_fields: ClassVar = types.MappingProxyType({"image_grid_thw": "list<int>"})

    multi_image_rule: ClassVar[str] = (
        "none: transformers' processor and the Qwen finetune code smart_resize every image of a sample "
        "with the same min_pixels / max_pixels"
    )
    budget_rules: ClassVar = types.MappingProxyType(
        {
            "max_tokens": "max_pixels = min(max_pixels, (budget // n) * (patch_size * merge_size)^2); "
            "refused when min_pixels is above that",
        }
    )

    def validate(self) -> None:
        if self.temporal_copies not in (1, self.temporal_patch_size):
            t, copies = self.temporal_patch_size, self.temporal_copies
            raise ValueError(
                f"{self.name}: temporal_copies must be 1 or temporal_patch_size ({t}); got {copies}"
            )
        if self.min_pixels > self.max_pixels:
            raise ValueError(
                f"{self.name}: min_pixels ({self.min_pixels}) must not exceed max_pixels ({self.max_pixels})"
            )

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def limit_tokens(self, per_image: int) -> QwenVL:
        """One token is one factor x factor merge window, so `per_image` tokens are that many windows of
        pixels. smart_resize keeps the budget except where the reference itself overshoots: the one-window
        clamp of aspect ratios near 200, and the min_pixels upscale of tiny images (`ceil` per side)."""
        cap = per_image * self.factor**2
        if cap >= self.max_pixels:
            return self
        if self.min_pixels > cap:
            raise ValueError(
                f"{self.name}: a token budget of {per_image} per image means max_pixels {cap}, below "
                f"min_pixels ({self.min_pixels} = {self.min_pixels / self.factor**2:g} tokens)"
            )
        return dataclasses.replace(self, max_pixels=cap)

    def plan(self, width: int, height: int) -> Plan:
        check_size(width, height)
        h, w = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
        grid_h, grid_w = h // self.patch_size, w // self.patch_size
        row = 3 * self.temporal_copies * self.patch_size**2
        return Plan(
            strategy=self.name,
            orig_width=width,
            orig_height=height,
            resized_width=w,
            resized_height=h,
            grid=(1, 1),
            tile_boxes=((0, 0, w, h),),
            thumbnail=False,
            num_tiles=1,
            num_tokens=grid_h * grid_w // self.merge_size**2,
            shape=(grid_h * grid_w, row),
            extra=(("image_grid_thw", (1, grid_h, grid_w)),),
        )

    def _patch_planes(self, image: Image.Image, plan: Plan) -> np.ndarray:
        """The resized image as (patches, 3, p*p) uint8, patches in merge-window order.

        Cut channel by channel from Pillow's planes (`split`): each copy then moves runs of p bytes,
        where cutting the interleaved RGB array moves single bytes 3 apart (uint8 `render` of a 12 MP
        image without its resize: 222 -> 197 ms, medians of 11). Each run is moved as one p-byte void
        element, so numpy's copy loops once per run instead of once per byte (the cut of a 12 MP image:
        53 -> 30 ms at patch 14, 40 -> 22 ms at patch 16, medians of 7)."""
        p, m = self.patch_size, self.merge_size
        _, grid_h, grid_w = dict(plan.extra)["image_grid_thw"]
        resized = image.resize((plan.resized_width, plan.resized_height), Image.Resampling.BICUBIC)
        planes = np.empty((grid_h // m, grid_w // m, m, m, 3, p, p), dtype=np.uint8)
        run = np.dtype(f"V{p}")  # one patch row of one channel
        runs = planes.view(run)[..., 0]  # (windows down, windows across, m, m, 3, p) runs
        for c, band in enumerate(resized.split()):
            plane = np.ascontiguousarray(image_view(band)).view(run)
            runs[:, :, :, :, c] = plane.reshape(grid_h // m, m, p, grid_w // m, m).transpose(0, 3, 1, 4, 2)
        return planes.reshape(grid_h * grid_w, 3, p * p)

    def render_normalized(self, image: Image.Image, plan: Plan, dtype: Any = np.float32) -> np.ndarray:
        """Normalize one frame's patch rows a block at a time and copy the block into every temporal
        copy while it is in cache: the same bits as `normalize(render(...))`, the table gather done
        once per value instead of `temporal_patch_size` times, and every copy contiguous per channel.
        One stored copy is gathered straight into the output."""
        t = self.temporal_copies
        planes = self._patch_planes(image, plan)
        n, _, area = planes.shape
        table = self.table(dtype)
        out = np.empty((n, 3, t, area), dtype=table.dtype)
        if t == 1:
            gather(table, planes, out.reshape(n, 3, area))
            return out.reshape(plan.shape)
        rows = max(1, GATHER_CHUNK // (3 * area))
        frame = np.empty((min(rows, n), 3, area), dtype=table.dtype)
        for start in range(0, n, rows):
            block = planes[start : start + rows]
            gather(table, block, frame[: len(block)])
            out[start : start + len(block)] = frame[: len(block), :, None]
        return out.reshape(plan.shape)

    def render(self, image: Image.Image, plan: Plan) -> np.ndarray:
        planes = self._patch_planes(image, plan)
        if self.temporal_copies == 1:
            return planes.reshape(plan.shape)
        out = np.empty((planes.shape[0], 3, self.temporal_copies, planes.shape[2]), dtype=np.uint8)
        out[...] = planes[:, :, None]  # a still image: every temporal copy is the same frame
        return out.reshape(plan.shape)

    def channel_view(self, pixels: np.ndarray) -> np.ndarray:
        return pixels.reshape(pixels.shape[0], 3, -1)

    def normalize(self, pixels: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
        """Normalize one temporal copy and repeat the floats: a still image's `temporal_patch_size` copies
        are equal (render repeats the frame), and the table gather costs ten times a copy. Arrays whose
        copies differ (not from `render`) take the general path."""
        t = self.temporal_copies
        n = pixels.shape[0]
        if t == 1:
            return super().normalize(pixels, dtype)
        frames = pixels.reshape(n, 3, t, -1)
        if not all(np.array_equal(frames[:, :, 0], frames[:, :, i]) for i in range(1, t)):
            return super().normalize(pixels, dtype)
        frame = np.ascontiguousarray(frames[:, :, 0]).reshape(n, -1)
        normalized = super().normalize(frame, dtype)
        out = np.empty((n, 3, t, frame.shape[1] // 3), dtype=normalized.dtype)
        out[...] = normalized.reshape(n, 3, 1, -1)
        return out.reshape(pixels.shape)

    def expand(self, stored: np.ndarray) -> np.ndarray:
        """Rows of `temporal_copies` copies -> rows of `temporal_patch_size` copies (the processor's
        `pixel_values`): every stored copy repeated, channel by channel, as `render` would have."""
        t = self.temporal_patch_size
        if self.temporal_copies == t:
            return stored
        n = stored.shape[0]
        out = np.empty((n, 3, t, stored.shape[1] // 3), dtype=stored.dtype)
        out[...] = stored.reshape(n, 3, 1, -1)
        return out.reshape(n, -1)

    def sequence_unit(self) -> int:
        """A merge window (merge_size^2 rows) becomes one LLM token: packing never cuts one apart."""
        return self.merge_size**2

    def patch_grid(self, metadata: Mapping[str, Any]) -> tuple[int, int]:
        _, grid_h, grid_w = metadata["image_grid_thw"]
        return int(grid_h), int(grid_w)

    def patch_positions(self, metadata: Mapping[str, Any]) -> np.ndarray:
        """(row, col) of each row in merge-window order, the vision encoder's own 2-D rotary position ids
        (transformers' `get_vision_position_ids` for a still image)."""
        return merge_window_positions(*self.patch_grid(metadata), self.merge_size)

    def views(self, pixels: np.ndarray, plan: Plan) -> list[tuple[str, np.ndarray]]:
        p, m, t = self.patch_size, self.merge_size, self.temporal_copies
        _, grid_h, grid_w = dict(plan.extra)["image_grid_thw"]
        blocks = pixels.reshape(grid_h // m, grid_w // m, m, m, 3, t, p, p)[:, :, :, :, :, 0]
        image = blocks.transpose(0, 2, 5, 1, 3, 6, 4).reshape(grid_h * p, grid_w * p, 3)
        return [(f"{p}-px patches, {m}x{m} merge windows", image)]


def merge_window_positions(grid_h: int, grid_w: int, merge: int) -> np.ndarray:
    """(grid_h*grid_w, 2) int32 (row, col) in merge-window order: windows in raster order, raster order
    inside each window. For a 4x6 grid and merge 2: (0,0) (0,1) (1,0) (1,1) (0,2) (0,3) (1,2) (1,3) ..."""
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    shape = (grid_h // merge, merge, grid_w // merge, merge)
    order = [a.reshape(shape).transpose(0, 2, 1, 3).reshape(-1) for a in (rows, cols)]
    return np.stack(order, axis=-1).astype(np.int32)


PRESETS = [
    Preset(
        "qwen2-vl",
        QwenVL,
        {"min_pixels": 3136, "max_pixels": 12845056},
        "Qwen2-VL: smart_resize to multiples of 28 in [min_pixels, max_pixels], 14-px patches, 2x2 merge.",
    ),
    Preset(
        "qwen2.5-vl",
        QwenVL,
        {"min_pixels": 3136, "max_pixels": 12845056},
        "Qwen2.5-VL: same image preprocessing as Qwen2-VL (its checkpoints ship the same config).",
        aliases=("qwen25-vl",),
    ),
    Preset(
        "qwen3-vl",
        QwenVL,
        {
            "min_pixels": 65536,
            "max_pixels": 16777216,
            "patch_size": 16,
            "mean": SIGLIP_MEAN,
            "std": SIGLIP_STD,
        },
        "Qwen3-VL: smart_resize to multiples of 32 in [65536, 16777216] pixels, 16-px patches, mean/std 0.5.",
    ),
]
