"""InternLM-XComposer2 (IXC2, IXC2-VL), IXC2-4KHD and IXC-2.5: `HD_transform` / `Image_transform`, plus the
fixed-resolution squash of the first IXC2 checkpoints.

Parity targets (InternLM/InternLM-XComposer, read at 0f70c3e):

* IXC2-4KHD: `finetune/ixc_utils.py` `HD_transform` + `padding_336`, fed by `finetune/data_mix.py`
  `ImageProcessorHD` (`Image.open(p).convert("RGB")`, then torchvision `ToTensor` + `Normalize` with the
  OpenAI-CLIP mean/std). The long side is cut into `scale` 336-px columns, the largest `scale` with
  `scale * ceil(scale / ratio) <= hd_num`; the image is stretched to `336*scale` wide (height
  `int(new_w / ratio)`, truncated) with torchvision's `resize` on a PIL image (= Pillow BILINEAR), then
  padded with opaque white, centred vertically, to a multiple of 336. Portrait images are transposed first
  and back at the end, so their padding is left/right.
* IXC-2.5: `InternLM-XComposer-2.5-OmniLive/internlm-xcomposer2d5-ol-7b/base/ixc_utils.py`
  `Image_transform`: the same with 560-px units, the scale capped at `ceil(long side / 560)` (no upscaling
  beyond one extra partial column) and bottom-only padding (right-only for portrait images).
* IXC2 / IXC2-VL: `Resize((S, S), BICUBIC)` + `ToTensor` + `Normalize` (the `vis_processor` of the HF remote
  code and `finetune/data_mix.py` `ImageProcessor`), S = 224 (internlm-xcomposer2-7b) or 490
  (internlm-xcomposer2-vl-7b).

The white padding is applied to the uint8 PIL image, *before* `ToTensor` / `Normalize`, so padded pixels are
uint8 255 and the exact per-channel table of `Strategy.normalize` covers them.

What is stored is the padded HD canvas, channel-first, `(3, H, W)`: the tensor the reference transform
returns (the model's `encode_img` adds the batch axis). The model cuts it row-major into `unit`-px sub-images
itself and also builds a *global view* from it with `torch.nn.functional.interpolate(..., mode="bicubic")` on
the normalised floats; that view is not stored (it needs torch's bicubic on float32, which Pillow cannot
reproduce). `Plan.thumbnail` is True to say "the model adds a global view", so `num_tiles = rows*cols + 1`
and the tile boxes are the `unit`-px boxes over the padded canvas.
"""

from __future__ import annotations

import dataclasses
import math
import types
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from .base import (
    ALPHA_MODES,
    CLIP_MEAN,
    CLIP_STD,
    Box,
    Plan,
    Preset,
    Strategy,
    check_size,
    gather,
    grid_boxes,
    image_view,
    param,
)

PAD_VALUE = 255
"""torchvision `pad(..., fill=[255, 255, 255])` on the uint8 PIL image: opaque white."""


@dataclass(frozen=True)
class HDGeometry:
    """`HD_transform` / `Image_transform` geometry for one image, in the reference's own terms."""

    transposed: bool
    """True for portrait images (width < height): the reference works on the transposed image."""
    scale: int
    """Columns of `unit`-px sub-images along the long side."""
    new_w: int
    """Resized long side (transposed frame width)."""
    new_h: int
    """Resized short side (transposed frame height), `int(new_w / ratio)`."""
    top: int
    """Padding before the resized short side (transposed frame: rows above)."""
    target: int
    """Padded short side: `ceil(new_h / unit) * unit`."""


def hd_geometry(width: int, height: int, unit: int, hd_num: int, cap_scale: bool, center: bool) -> HDGeometry:
    """The reference scale search, resize size and padding, same operations in the same order (float64).

    Raises ValueError where the reference's resize would get a zero height (aspect ratio above
    `scale * unit`, e.g. 8401x1 at hd_num 25): Pillow refuses a 0-pixel side.
    """
    transposed = width < height
    if transposed:
        width, height = height, width
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale -= 1
    if cap_scale:
        scale = min(math.ceil(width / unit), scale)
    new_w = scale * unit
    new_h = int(new_w / ratio)
    if new_w < 1 or new_h < 1:
        raise ValueError(
            f"aspect ratio {ratio:.6g} ({width}x{height} after orientation) is too extreme for "
            f"hd_num={hd_num}: the reference would resize to {new_w}x{new_h}, which Pillow refuses"
        )
    target = math.ceil(new_h / unit) * unit
    top = (target - new_h) // 2 if center else 0
    return HDGeometry(transposed, scale, new_w, new_h, top, target)


def hd_num_tokens(rows: int, cols: int, unit: int, patch_size: int) -> int:
    """Embeddings `CLIPVisionTower.forward` (build_mlp.py) emits for a rows x cols canvas.

    Each view is (unit/patch)^2 ViT patches merged 2x2 into side^2 tokens (side = unit/patch/2: 12 at 336,
    20 at 560). Global view: side rows of side tokens plus one `sub_GN` newline each; then one `glb_GN`
    separator; then the sub-image mosaic: rows*side rows of cols*side tokens plus one `sub_GN` newline each.
    Total (rows*cols + 1)*side^2 + 1 + (rows + 1)*side: the reference's `temp_len`.
    """
    side = unit // patch_size // 2
    return (rows * cols + 1) * side * side + 1 + (rows + 1) * side


@dataclass(frozen=True)
class XComposerHD(Strategy):
    """IXC2-4KHD / IXC-2.5 HD canvas: white-padded to a multiple of the ViT input, stored whole."""

    alpha: str = param(
        "drop",
        "How transparent pixels become RGB: 'white' composites over white (transformers processors), "
        "'drop' ignores alpha (the model repositories' convert('RGB')).",
        choices=ALPHA_MODES,
    )
    hd_num: int = param(
        25,
        "Most sub-images in the HD canvas (IXC2-4KHD / IXC-2.5 hd_num); the global view is not counted.",
        minimum=1,
    )
    unit: int = param(336, "Sub-image side: the ViT input size.", tunable=False)
    patch_size: int = param(14, "ViT patch side; 2x2 patches merge into one token.", tunable=False)
    center_padding: bool = param(
        True, "Pad the short side centred (4KHD) or after the image only (IXC-2.5).", tunable=False
    )
    cap_scale: bool = param(
        False, "Cap the column count at ceil(long side / unit) (IXC-2.5: no upscaling).", tunable=False
    )
    multi_image_hd_num: int = param(
        0,
        "hd_num the model forces when the prompt holds more than one image (IXC-2.5: 6, "
        "interleav_wrap_chat's `if image_nums > 1: hd_num = 6`); 0 = no such rule (4KHD).",
        minimum=0,
        tunable=False,
    )
    mean: tuple[float, ...] = param(CLIP_MEAN, "OpenAI CLIP mean.", tunable=False)
    std: tuple[float, ...] = param(CLIP_STD, "OpenAI CLIP std.", tunable=False)

    metadata_fields: ClassVar = types.MappingProxyType({"rows": "int", "cols": "int"})

    multi_image_rule: ClassVar[str] = (
        "hd_num = min(hd_num, multi_image_hd_num) when the sample has more than one image: 6 for "
        "xcomposer2.5 (its chat / interleav_wrap_chat set hd_num = 6 for image_nums > 1); none for "
        "xcomposer2-4khd"
    )
    budget_rules: ClassVar = types.MappingProxyType(
        {
            "max_tiles": "hd_num = max(1, budget // n), never above hd_num (hd_num counts sub-images, "
            "the global view not included, like InternVL's max_tiles)",
            "max_tokens": "hd_num = the largest k whose worst case, a k x 1 strip of sub-images "
            "((k + 1) * side^2 + 1 + (k + 1) * side tokens), fits budget // n",
        }
    )

    def geometry(self, width: int, height: int) -> HDGeometry:
        return hd_geometry(width, height, self.unit, self.hd_num, self.cap_scale, self.center_padding)

    def sample_rule(self, num_images: int) -> XComposerHD:
        """IXC-2.5 overrides hd_num with 6 for several images. A user hd_num below that is kept: budgets and
        rules only ever lower the limit the user set."""
        rule = self.multi_image_hd_num
        if rule and self.hd_num > rule:
            return dataclasses.replace(self, hd_num=rule)
        return self

    def worst_tokens(self, hd_num: int) -> int:
        """The most tokens one image can take with `hd_num`: rows*cols <= hd_num and the count grows with
        both the product and the rows, so a strip of hd_num rows (a tall image) is the worst case."""
        return hd_num_tokens(hd_num, 1, self.unit, self.patch_size)

    def limit_tiles(self, per_image: int) -> XComposerHD:
        limit = max(1, per_image)
        return self if limit >= self.hd_num else dataclasses.replace(self, hd_num=limit)

    def limit_tokens(self, per_image: int) -> XComposerHD:
        limit = self.hd_num
        while limit >= 1 and self.worst_tokens(limit) > per_image:
            limit -= 1
        if limit < 1:
            raise ValueError(
                f"{self.name}: a token budget of {per_image} per image is below the smallest worst case "
                f"(hd_num=1: {self.worst_tokens(1)} tokens)"
            )
        return self if limit == self.hd_num else dataclasses.replace(self, hd_num=limit)

    def plan(self, width: int, height: int) -> Plan:
        check_size(width, height)
        g = self.geometry(width, height)
        u = self.unit
        if g.transposed:  # back in the original orientation: padding lands left/right
            canvas_w, canvas_h = g.target, g.new_w
            content: Box = (g.top, 0, g.top + g.new_h, g.new_w)
        else:
            canvas_w, canvas_h = g.new_w, g.target
            content = (0, g.top, g.new_w, g.top + g.new_h)
        cols, rows = canvas_w // u, canvas_h // u
        boxes = grid_boxes(cols, rows, u)
        return Plan(
            strategy=self.name,
            orig_width=width,
            orig_height=height,
            resized_width=canvas_w,
            resized_height=canvas_h,
            grid=(cols, rows),
            tile_boxes=boxes,
            thumbnail=True,
            num_tiles=rows * cols + 1,
            num_tokens=hd_num_tokens(rows, cols, u, self.patch_size),
            shape=(3, canvas_h, canvas_w),
            extra=(("rows", rows), ("cols", cols)),
            content_box=None if content == (0, 0, canvas_w, canvas_h) else content,
            transposed=g.transposed,
        )

    def _resized(self, image: Image.Image, plan: Plan) -> Image.Image:
        """The image resized to its box on the canvas, upright.

        For a transposed plan the reference resizes the *transposed* image (Pillow's two resampling
        passes, each rounded to uint8, do not commute with a transpose, and Pillow picks their order
        from the sizes), so: transpose, resize, and turn the result back with Pillow's blocked
        transpose. numpy's transposing copy of the resized RGB image into the CHW canvas cost 4x as
        much (a 12 MP portrait photo for xcomposer2.5: 128 ms against 33 ms)."""
        left, top, right, bottom = plan.image_box
        bilinear = Image.Resampling.BILINEAR
        if not plan.transposed:
            return image.resize((right - left, bottom - top), bilinear)
        turned = image.transpose(Image.Transpose.TRANSPOSE).resize((bottom - top, right - left), bilinear)
        return turned.transpose(Image.Transpose.TRANSPOSE)

    def render(self, image: Image.Image, plan: Plan) -> np.ndarray:
        left, top, right, bottom = plan.image_box
        out = np.full(plan.shape, PAD_VALUE, dtype=np.uint8)
        out[:, top:bottom, left:right] = image_view(self._resized(image, plan)).transpose(2, 0, 1)
        return out

    def render_normalized(self, image: Image.Image, plan: Plan, dtype: Any = np.float32) -> np.ndarray:
        """Each of Pillow's channel planes (`split`) gathered straight into its place on the canvas,
        the padding set to the pad value's normalized value, no uint8 canvas in between. Measured,
        whole benchmark set, 1 worker, 3 paired runs: xcomposer2.5 1.07x, xcomposer2-4khd 1.02x
        (untransposed plans; transposed ones went through the uint8 canvas until they were turned
        upright with Pillow, see `_resized`)."""
        left, top, right, bottom = plan.image_box
        table = self.table(dtype)
        out = np.empty(plan.shape, dtype=table.dtype)
        pad = table[:, PAD_VALUE, None, None]
        out[:, :top] = pad
        out[:, bottom:] = pad
        out[:, top:bottom, :left] = pad
        out[:, top:bottom, right:] = pad
        for c, band in enumerate(self._resized(image, plan).split()):
            gather(table[c : c + 1], image_view(band)[:, None], out[c, top:bottom, left:right][:, None])
        return out

    def channel_view(self, pixels: np.ndarray) -> np.ndarray:
        return pixels[None]

    def views(self, pixels: np.ndarray, plan: Plan) -> list[tuple[str, np.ndarray]]:
        label = f"padded HD canvas, {self.unit}-px sub-images row-major (global view made model-side)"
        return [(label, pixels.transpose(1, 2, 0))]


@dataclass(frozen=True)
class XComposerFixed(Strategy):
    """IXC2 / IXC2-VL: one BICUBIC squash to image_size x image_size, one token per ViT patch."""

    alpha: str = param(
        "drop",
        "How transparent pixels become RGB: 'white' composites over white (transformers processors), "
        "'drop' ignores alpha (the model repositories' convert('RGB')).",
        choices=ALPHA_MODES,
    )
    image_size: int = param(490, "Square input side (position embeddings interpolated to it).", tunable=False)
    patch_size: int = param(14, "ViT patch side; one token per patch, no merge.", tunable=False)
    mean: tuple[float, ...] = param(CLIP_MEAN, "OpenAI CLIP mean.", tunable=False)
    std: tuple[float, ...] = param(CLIP_STD, "OpenAI CLIP std.", tunable=False)

    def plan(self, width: int, height: int) -> Plan:
        check_size(width, height)
        s = self.image_size
        return Plan(
            strategy=self.name,
            orig_width=width,
            orig_height=height,
            resized_width=s,
            resized_height=s,
            grid=(1, 1),
            tile_boxes=((0, 0, s, s),),
            thumbnail=False,
            num_tiles=1,
            num_tokens=(s // self.patch_size) ** 2,
            shape=(3, s, s),
        )

    def render(self, image: Image.Image, plan: Plan) -> np.ndarray:
        s = self.image_size
        resized = np.asarray(image.resize((s, s), Image.Resampling.BICUBIC))
        return np.ascontiguousarray(resized.transpose(2, 0, 1))

    def channel_view(self, pixels: np.ndarray) -> np.ndarray:
        return pixels[None]

    def views(self, pixels: np.ndarray, plan: Plan) -> list[tuple[str, np.ndarray]]:
        return [(f"{self.image_size}x{self.image_size} squash", pixels.transpose(1, 2, 0))]


PRESETS = [
    Preset(
        "xcomposer2-4khd",
        XComposerHD,
        {"alpha": "drop", "hd_num": 25, "unit": 336, "center_padding": True, "cap_scale": False},
        "InternLM-XComposer2-4KHD: HD_transform to a white-padded canvas of <= hd_num 336-px sub-images "
        "(25; 16 finetune, 55 README demo), (3, H, W); (rows*cols+1)*144 + 1 + (rows+1)*12 tokens.",
        aliases=("ixc2-4khd", "internlm-xcomposer2-4khd"),
    ),
    Preset(
        "xcomposer2.5",
        XComposerHD,
        {
            "alpha": "drop",
            "hd_num": 24,
            "unit": 560,
            "center_padding": False,
            "cap_scale": True,
            "multi_image_hd_num": 6,
        },
        "InternLM-XComposer-2.5: Image_transform, 560-px units, bottom/right white padding, no upscaling; "
        "hd_num 24 (6 in samples of several images); (rows*cols+1)*400 + 1 + (rows+1)*20 tokens.",
        aliases=("ixc2.5", "xcomposer2d5", "internlm-xcomposer2.5", "internlm-xcomposer2d5"),
    ),
    Preset(
        "xcomposer2-vl",
        XComposerFixed,
        {"alpha": "drop", "image_size": 490},
        "InternLM-XComposer2-VL: 490x490 BICUBIC squash, (3, 490, 490), 35*35 = 1225 tokens.",
        aliases=("ixc2-vl", "internlm-xcomposer2-vl"),
    ),
    Preset(
        "xcomposer2",
        XComposerFixed,
        {"alpha": "drop", "image_size": 224},
        "InternLM-XComposer2 (7b): 224x224 BICUBIC squash, (3, 224, 224), 16*16 = 256 tokens.",
        aliases=("ixc2", "internlm-xcomposer2"),
    ),
]
