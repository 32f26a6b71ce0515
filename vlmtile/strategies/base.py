"""What every strategy shares: parameters, the frozen `Plan`, RGB conversion and exact normalization.

A strategy is split in two on purpose. `plan(width, height)` is pure integer geometry, so `stats` can
count tokens from image headers and tests can sweep millions of sizes without touching a pixel.
`render(image, plan)` is the only step that touches pixels; it returns the resized uint8 pixels already in
the model's layout, and `normalize` maps them to float32 through a 256-entry table per channel computed
with the reference arithmetic, which makes the float32 output (and uint8 storage read back later) equal
to the reference bit for bit by construction.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from PIL import Image, ImageOps

Box = tuple[int, int, int, int]
"""A tile box (left, top, right, bottom) in pixels of the resized image, as `PIL.Image.crop` takes it."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

ALPHA_MODES = ("white", "drop")

BUDGETS = types.MappingProxyType(
    {"max_tiles": "--max-tiles-per-sample", "max_tokens": "--max-tokens-per-sample"}
)
"""Per-sample budgets `Strategy.for_sample` understands, and the CLI option that sets each."""

GROUNDING_FIELDS = types.MappingProxyType(
    {"content_box": "list<int>", "transposed": "bool", "tile_boxes": "list<list<int>>"}
)
"""Metadata every strategy's `Plan.metadata()` carries (beside the base geometry) so that boxes and points
in original pixels can be mapped onto the stored canvas and its tiles (`vlmtile.grounding`)."""


def param(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    minimum: int | None = None,
    tunable: bool = True,
    recorded_at_default: bool = True,
) -> Any:
    """Declare a strategy field. Tunable fields become `get_strategy` keywords and CLI options.

    Non-tunable fields (patch size, mean/std, ...) are fixed by a preset: changing them would describe a
    different model, not a different budget for the same one. A field added after outputs were already
    written declares `recorded_at_default=False`: `params()` leaves it out while it has its default, so
    the manifests and settings of those outputs still match and they stay readable and resumable.
    """
    return field(
        default=default,
        metadata={
            "help": help,
            "choices": choices,
            "minimum": minimum,
            "tunable": tunable,
            "recorded_at_default": recorded_at_default,
        },
    )


@dataclass(frozen=True)
class Plan:
    """The geometry of one image under one strategy: no pixels, cheap to build, safe to pickle."""

    strategy: str
    orig_width: int
    orig_height: int
    resized_width: int
    resized_height: int
    grid: tuple[int, int]
    """Tile grid as (cols, rows); (1, 1) for strategies that do not tile."""
    tile_boxes: tuple[Box, ...]
    """Row-major boxes over the resized image; together they cover it exactly, without overlap."""
    thumbnail: bool
    num_tiles: int
    """Number of views the vision encoder sees (tiles plus thumbnail / global view)."""
    num_tokens: int
    """Visual placeholder tokens the language model sees for this image (wrapper tokens excluded)."""
    shape: tuple[int, ...]
    """Shape of the stored `pixel_values`: the model's own layout, except that Qwen with `temporal_copies`
    1 stores one temporal copy per patch row (`Strategy.expand` gives the model's layout)."""
    extra: tuple[tuple[str, Any], ...] = ()
    """Strategy-specific metadata the model needs (e.g. Qwen's `image_grid_thw`), as JSON-able pairs."""
    content_box: Box | None = None
    """Where the image lies inside the resized canvas when the rest is padding; None: the whole canvas."""
    transposed: bool = False
    """True when the reference resized the *transposed* image and transposed the result back (XComposer HD,
    portrait images). The canvas is in the original orientation either way, so coordinates map without a
    swap; the flag records that the resampling (and the padding side) followed the transposed frame."""

    @property
    def image_box(self) -> Box:
        """The image's box on the canvas: `content_box`, or the whole canvas when nothing is padding."""
        if self.content_box is None:
            return (0, 0, self.resized_width, self.resized_height)
        return self.content_box

    def metadata(self) -> dict[str, Any]:
        """Per-image metadata as stored with every record (JSON-able, lists instead of tuples).

        The grounding fields (`GROUNDING_FIELDS`) are the same for every strategy, so one function
        (`vlmtile.grounding.map_box`) maps annotations whatever the model: `content_box` is always a box
        (the whole canvas when there is no padding), `tile_boxes` the row-major tiles over that canvas.
        """
        meta: dict[str, Any] = {
            "orig_width": self.orig_width,
            "orig_height": self.orig_height,
            "resized_width": self.resized_width,
            "resized_height": self.resized_height,
            "grid": list(self.grid),
            "thumbnail": self.thumbnail,
            "num_tiles": self.num_tiles,
            "num_tokens": self.num_tokens,
            "content_box": list(self.image_box),
            "transposed": self.transposed,
            "tile_boxes": [list(box) for box in self.tile_boxes],
        }
        for key, value in self.extra:
            meta[key] = list(value) if isinstance(value, tuple) else value
        return meta


@dataclass(frozen=True)
class Result:
    """What `Strategy.process` returns for one image."""

    pixel_values: np.ndarray
    """float32, normalized, in the model's own layout (`Strategy.expand` of `plan.shape`)."""
    plan: Plan

    @property
    def metadata(self) -> dict[str, Any]:
        return self.plan.metadata()


def to_rgb(image: Image.Image, alpha: str) -> Image.Image:
    """Convert any Pillow mode to RGB the way the chosen reference does.

    "white" is transformers' `convert_to_rgb`: anything with an alpha band or a transparency entry is
    alpha-composited over opaque white. "drop" is the model repositories' `Image.open(p).convert("RGB")`,
    which keeps whatever colour sits under transparent pixels. Both agree on images without transparency.
    """
    if alpha == "white" and ("A" in image.getbands() or image.info.get("transparency") is not None):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


def normalization_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(3, 256) float32 table: `table[c, v]` is what the reference computes for channel c, value v.

    The arithmetic is transformers' PIL backend: float32(float64(v) * (1/255)), then (x - mean) / std in
    float32. torchvision's ToTensor + Normalize (the original repositories) gives the same bits for all
    256 values; tests check both.
    """
    values = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    mean32 = np.asarray(mean, dtype=np.float32)[:, None]
    std32 = np.asarray(std, dtype=np.float32)[:, None]
    table = (values[None, :] - mean32) / std32
    return np.ascontiguousarray(table, dtype=np.float32)


@dataclass(frozen=True)
class Strategy:
    """Base of every strategy: a frozen set of resolved parameters plus plan / render / normalize.

    Subclasses are dataclasses whose fields are declared with `param`; the registry builds them from a
    preset (model name -> params) plus the user's keyword arguments.
    """

    name: str = param("", "Registered name this strategy was created under.", tunable=False)
    alpha: str = param(
        "white",
        "How transparent pixels become RGB: 'white' composites over white (transformers processors), "
        "'drop' ignores alpha (the model repositories' convert('RGB')).",
        choices=ALPHA_MODES,
    )
    exif_transpose: bool = param(
        False,
        "Apply the EXIF orientation before planning (transformers' load_image does; the model "
        "repositories and processors given a PIL image do not).",
    )

    mean: tuple[float, ...] = param(IMAGENET_MEAN, "Per-channel normalization mean.", tunable=False)
    std: tuple[float, ...] = param(IMAGENET_STD, "Per-channel normalization std.", tunable=False)

    metadata_fields: ClassVar[Mapping[str, str]] = types.MappingProxyType({})
    """Strategy-specific metadata keys and their type ("int", "list<int>", "bool", "str")."""

    multi_image_rule: ClassVar[str] = "none: each image is processed as if it were alone"
    """What the reference trainer changes by itself for a sample with several images (`for_sample`)."""
    budget_rules: ClassVar[Mapping[str, str]] = types.MappingProxyType({})
    """Per-sample budgets (`BUDGETS` keys) this strategy can honour, and the limit each one lowers."""

    def __post_init__(self) -> None:
        hints = _type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            expected = typing.get_origin(hints[f.name]) or hints[f.name]
            # What JSON and Python callers naturally pass: a list for a tuple (manifests store lists), an
            # int for a float (`drop_rate=0`). Anything else must already have the declared type.
            if expected is tuple and isinstance(value, list):
                value = tuple(value)
                object.__setattr__(self, f.name, value)
            elif expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                object.__setattr__(self, f.name, value)
            ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
            if not ok:
                raise ValueError(
                    f"{self.name or type(self).__name__}: parameter {f.name!r} must be "
                    f"{getattr(expected, '__name__', expected)}, got {value!r}"
                )
            choices = f.metadata.get("choices")
            if choices is not None and value not in choices:
                raise ValueError(
                    f"{self.name}: parameter {f.name!r} must be one of {', '.join(choices)}; got {value!r}"
                )
            minimum = f.metadata.get("minimum")
            if minimum is not None and value < minimum:
                raise ValueError(f"{self.name}: parameter {f.name!r} must be >= {minimum}; got {value!r}")
        self.validate()

    # -- to be provided by subclasses -------------------------------------------------------------
    def validate(self) -> None:
        """Cross-field checks (e.g. min <= max); raise ValueError with a message a user can act on."""

    def plan(self, width: int, height: int) -> Plan:
        """Pure geometry for an image of `width` x `height` pixels (after EXIF transposition if enabled)."""
        raise NotImplementedError

    def render(self, image: Image.Image, plan: Plan) -> np.ndarray:
        """Resize and tile an RGB image per `plan`; uint8 pixels in the stored layout (`plan.shape`)."""
        raise NotImplementedError

    def channel_view(self, pixels: np.ndarray) -> np.ndarray:
        """A view of a C-contiguous `plan.shape` array with the colour channel on axis 1 (for
        normalization); a reshape, so that every axis after the channel is contiguous."""
        return pixels

    def source_size(self, plan: Plan) -> tuple[int, int]:
        """The largest width and height any resize of `render` produces from the image (per axis).

        `--fast` shrinks the source cheaply (JPEG DCT scaling, box reduction) but never below this, so the
        strategy's own resizes still only reduce. Default: the image's box on the canvas; strategies with a
        second view (thumbnail, base image, global view) take the larger of the two per axis.
        """
        left, top, right, bottom = plan.image_box
        return right - left, bottom - top

    def expand(self, stored: np.ndarray) -> np.ndarray:
        """The stored layout (`plan.shape`) -> the model's own layout. The same array for every strategy
        but Qwen with `temporal_copies` 1, which stores one temporal copy of each patch row and repeats it
        here: the copies of a still image are equal, so the bits are the reference's."""
        return stored

    def views(self, pixels: np.ndarray, plan: Plan) -> list[tuple[str, np.ndarray]]:
        """Undo the layout for people: (label, HxWx3 uint8) images, the resized canvas first.

        `inspect` draws these, so a picture shows the pixels the model gets, not a re-creation of them.
        """
        raise NotImplementedError

    def sample_rule(self, num_images: int) -> Strategy:
        """The reference's own change for a sample of `num_images` (> 1) images; self when it has none."""
        return self

    def limit_tiles(self, per_image: int) -> Strategy:
        """Lower the tile limit for a share of `per_image` tiles (only for strategies listing "max_tiles"
        in `budget_rules`)."""
        raise NotImplementedError

    def limit_tokens(self, per_image: int) -> Strategy:
        """Lower the resolution limit so that no image exceeds `per_image` tokens (only for strategies
        listing "max_tokens" in `budget_rules`)."""
        raise NotImplementedError

    def for_image(self, key: str, index: int) -> Strategy:
        """The strategy for image `index` of sample `key`: self, unless the strategy draws at random.

        A strategy with per-image randomness (`navit`'s resolution sampling and token dropping) returns a
        copy that carries the image's identity, so that its `plan` stays a pure function of the strategy and
        the size while each image gets its own draws: the same (seed, key, index) gives the same plan in
        `preprocess` and `stats`, whatever the worker count or the order the images are processed in.
        """
        return self

    def sequence_unit(self) -> int:
        """How many consecutive `pixel_values` rows must stay together when rows are packed into sequences
        (`vlmtile pack`): 1 for plain patch sequences, merge_size^2 for Qwen's merge windows, 0 when the
        rows are not a patch sequence at all (tiles, canvases), which makes the output not packable."""
        return 0

    splittable: ClassVar[bool] = False
    """Whether `pack --split-long` may cut one image's rows over several sequences (the model then attends
    within each part only)."""

    def patch_grid(self, metadata: Mapping[str, Any]) -> tuple[int, int]:
        """(rows, cols) of the image's patch grid, from its stored metadata (packable strategies only)."""
        raise NotImplementedError(f"{self.name}: pixel_values rows are not a patch sequence")

    def patch_positions(self, metadata: Mapping[str, Any]) -> np.ndarray:
        """(rows, 2) int32: the (row, col) grid coordinates of each stored `pixel_values` row, in stored
        order, from the image's metadata (packable strategies only)."""
        raise NotImplementedError(f"{self.name}: pixel_values rows are not a patch sequence")

    # -- shared behaviour -------------------------------------------------------------------------
    def for_sample(
        self, num_images: int, *, max_tiles: int | None = None, max_tokens: int | None = None
    ) -> Strategy:
        """The strategy to apply to *each* image of a sample with `num_images` images.

        Reference trainers do not always treat an image of a multi-image sample like a lone image
        (DeepSeek-VL2 stops tiling at 3 images, XComposer-2.5 drops to hd_num 6, LLaVA-OneVision pads each
        image to one square view): `sample_rule` applies that, so a multi-image sample gets the pixels and
        token counts the model saw in training. The optional budgets then split a per-sample limit evenly
        (`budget // num_images` per image) and only ever *lower* the strategy's own limits. A budget this
        strategy has no limit for raises ValueError up front instead of being silently ignored.

        Returns self when nothing changes, otherwise a `dataclasses.replace` of it.
        """
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"{self.name}: num_images must be a positive integer, got {num_images!r}")
        budgets = {"max_tiles": max_tiles, "max_tokens": max_tokens}
        for key, value in budgets.items():
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{self.name}: {key} must be a positive integer, got {value!r}")
            if key not in self.budget_rules:
                supported = ", ".join(f"{k} ({BUDGETS[k]})" for k in self.budget_rules) or "none"
                raise ValueError(
                    f"{self.name or type(self).__name__} cannot honour a per-sample {key} budget "
                    f"({BUDGETS[key]}): it has no limit of that kind to lower. "
                    f"Budgets it supports: {supported}"
                )
        strategy = self.sample_rule(num_images) if num_images > 1 else self
        if max_tiles is not None:
            strategy = strategy.limit_tiles(max_tiles // num_images)
        if max_tokens is not None:
            strategy = strategy.limit_tokens(max_tokens // num_images)
        return strategy

    def params(self) -> dict[str, Any]:
        """Every resolved field, tunable or not: what the manifest records and the config hash covers.

        A field declared `recorded_at_default=False` is left out while it has its default (see `param`)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not f.metadata.get("recorded_at_default", True) and value == f.default:
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def prepare(self, image: Image.Image) -> Image.Image:
        """Orientation and RGB conversion, exactly as the reference does before any resize."""
        if self.exif_transpose:
            image = ImageOps.exif_transpose(image)
        return to_rgb(image, self.alpha)

    def normalize(self, pixels: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
        """uint8 pixels (as `render` returns them) -> normalized `dtype`, bit-exact with the reference.

        For float16 / bfloat16 the table itself is cast, so one gather gives exactly
        `normalize(pixels).astype(dtype)` without the float32 intermediate.
        """
        table = self.table(dtype)
        out = np.empty(pixels.shape, dtype=table.dtype)
        src = self.channel_view(np.ascontiguousarray(pixels))
        dst = self.channel_view(out)
        n = src.shape[0]
        gather(table, src.reshape(n, 3, -1), dst.reshape(n, 3, -1))
        return out

    def table(self, dtype: Any = np.float32) -> np.ndarray:
        """The (3, 256) normalization table in `dtype` (cached)."""
        return _table(self.mean, self.std, np.dtype(dtype))

    def render_normalized(self, image: Image.Image, plan: Plan, dtype: Any = np.float32) -> np.ndarray:
        """`normalize(render(image, plan), dtype)`, bit for bit; a strategy whose layout makes the two
        steps costly apart (Qwen's patch rows) fuses them. `preprocess` and `process` both go this way."""
        return self.normalize(self.render(image, plan), dtype)

    def process(self, image: Image.Image) -> Result:
        """Full reference preprocessing of one PIL image in any mode (in the model's layout, `expand`ed)."""
        rgb = self.prepare(image)
        plan = self.plan(*rgb.size)
        return Result(pixel_values=self.expand(self.render_normalized(rgb, plan)), plan=plan)


_HINTS: dict[type[Strategy], dict[str, Any]] = {}


def _type_hints(cls: type[Strategy]) -> dict[str, Any]:
    """`typing.get_type_hints`, once per class: `for_sample` builds strategies per sample, and resolving
    the string annotations each time (~150 us) would cost more than planning the sample's images."""
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


_TABLES: dict[tuple[tuple[float, ...], tuple[float, ...], np.dtype[Any]], np.ndarray] = {}
GATHER_CHUNK = 1 << 17
"""Values per `np.take` call in `normalize` (measured: 2^16..2^18 are equally fast, all ~2.5x faster
than one call per channel on a 12-tile InternVL image)."""


def _table(mean: tuple[float, ...], std: tuple[float, ...], dtype: np.dtype[Any]) -> np.ndarray:
    key = (mean, std, dtype)
    table = _TABLES.get(key)
    if table is None:
        table = _TABLES[key] = normalization_table(mean, std).astype(dtype)
    return table


@dataclass(frozen=True)
class Preset:
    """A named model configuration: which strategy class, with which fixed and default params.

    Each strategy module lists its presets in a module-level `PRESETS`; the registry collects them.
    """

    name: str
    cls: type[Strategy]
    params: dict[str, Any]
    description: str
    aliases: tuple[str, ...] = ()


def gather(table: np.ndarray, src: np.ndarray, dst: np.ndarray) -> None:
    """dst[i, c, j] = table[c, src[i, c, j]] for (n, channels, m) uint8 `src` and a `dst` of the table's
    dtype (a (channels, 256) table).

    In slices of GATHER_CHUNK values: np.take converts its indices to intp (8 bytes each) before it
    gathers, and a slice's worth stays in cache; one call over a 12 MP image is 2.5x slower.
    `mode="clip"` because np.take buffers `out` in its default mode (every value copied once more): a
    uint8 index never reaches past a 256-entry table, so clipping changes nothing, and the gather of a
    13-tile InternVL image takes 12.5 ms instead of 19.3 (medians of 40).
    """
    if src.dtype != np.uint8 or table.shape[-1] != 256:
        raise TypeError(
            f"gather needs uint8 indices into a 256-entry table, got {src.dtype} indices and "
            f"{table.shape[-1]} entries"
        )
    n, channels, per = src.shape
    rows = max(1, GATHER_CHUNK // per)
    cols = min(per, GATHER_CHUNK)
    for start in range(0, n, rows):
        for c in range(channels):
            for col in range(0, per, cols):
                np.take(
                    table[c],
                    src[start : start + rows, c, col : col + cols],
                    out=dst[start : start + rows, c, col : col + cols],
                    mode="clip",
                )


def image_view(image: Image.Image) -> np.ndarray:
    """A read-only view of an RGB or L image's own memory as (H, W, 3) or (H, W) uint8.

    Through Pillow's Arrow export, which shares the image's buffer: `np.asarray` goes through `tobytes`,
    two copies of every pixel (3 ms for a 1792x1344 RGB image, 4 ms for a plane of a 12 MP photo; a view
    costs 0.01-0.02 ms). Pillow stores RGB as 4 bytes per pixel, so an RGB view is strided. An image
    that Pillow's allocator stored in more than one block (above 16 MiB by default: a 4.2 MP RGB image)
    cannot be exported in one piece and is copied as before; other modes are copied as well.
    """
    if image.mode not in ("RGB", "L") or image.width == 0 or image.height == 0:
        return np.asarray(image)
    import pyarrow as pa

    try:
        exported = pa.array(image)
    except ValueError:  # rows in more than one block
        return np.asarray(image)
    if image.mode == "L":
        plane: np.ndarray = exported.to_numpy(zero_copy_only=True)
        return plane.reshape(image.height, image.width)
    values: np.ndarray = exported.values.to_numpy(zero_copy_only=True)
    return values.reshape(image.height, image.width, 4)[:, :, :3]


def tunable_fields(cls: type[Strategy]) -> list[dataclasses.Field[Any]]:
    """The fields a user may set through `get_strategy` or the CLI."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("tunable", False)]


def grid_boxes(cols: int, rows: int, tile: int) -> tuple[Box, ...]:
    """Boxes of a cols x rows grid of square tiles, row-major: the order every tiling reference crops in."""
    return tuple(
        (c * tile, r * tile, (c + 1) * tile, (r + 1) * tile) for r in range(rows) for c in range(cols)
    )


def cut_tiles(canvas: np.ndarray, cols: int, rows: int, out: np.ndarray) -> None:
    """Write the row-major tiles of an (rows*t, cols*t, 3) canvas into `out`, (cols*rows, 3, t, t).

    One copy, straight into the output array: the crops and the HWC -> CHW transpose in a single pass.
    """
    t = out.shape[-1]
    out.reshape(rows, cols, 3, t, t)[...] = canvas.reshape(rows, t, cols, t, 3).transpose(0, 2, 4, 1, 3)


def join_tiles(tiles: np.ndarray, cols: int, rows: int) -> np.ndarray:
    """The inverse of `cut_tiles`, for `views`: (cols*rows, 3, t, t) -> the (rows*t, cols*t, 3) canvas."""
    t = tiles.shape[-1]
    return tiles.reshape(rows, cols, 3, t, t).transpose(0, 3, 1, 4, 2).reshape(rows * t, cols * t, 3)


def check_size(width: int, height: int) -> None:
    """Reject sizes no reference can process (zero or negative sides) with a clear message."""
    if isinstance(width, bool) or isinstance(height, bool) or width < 1 or height < 1:
        raise ValueError(f"image size must be at least 1x1, got {width}x{height}")
