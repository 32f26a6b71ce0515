"""NaViT-style native resolution ("Patch n' Pack"): keep the aspect ratio, cut p x p patches, keep a sequence.

No official NaViT code is public, so this strategy states where each choice comes from
(docs/strategies.md#navit):

- The size rule is NaFlex's `resize_to_sequence` (google-research/big_vision `ops_naflex.py`, ported to
  Python as transformers' `get_image_size_for_max_num_patches`): a binary search for the largest scale
  whose grid, each side rounded *up* to a patch multiple and at least one patch, fits the budget. vlmtile
  adds a longest-side limit, per-image sampling of that limit, and a switch that forbids upscaling (the
  paper's "native resolution").
- Pixels follow transformers' `Siglip2ImageProcessorPil` (the one shipped NaViT-style processor): Pillow
  BILINEAR, rows of (p, p, channel) values in raster order. With the default preset the rows are bit-exact
  with that processor's unpadded rows.
- Token dropping keeps `max(1, int(n * (1 - rate)))` patches, a uniform random subset (lucidrains'
  `na_vit.py`), at a fixed rate, a rate that grows with the patch count, or a per-image rate drawn from a
  Beta distribution (the paper's continuous and resolution-dependent dropping).

Every random choice is drawn from a generator seeded with (seed, the image's key and index), carried by the
strategy that `for_image` returns, so `plan` stays a pure function of its inputs and a rerun, another
worker count or `stats` gives the same sizes and the same kept patches.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from .base import SIGLIP_MEAN, SIGLIP_STD, Plan, Preset, Strategy, check_size, param

SEARCH_EPS = 1e-5
"""NaFlex's tolerance on the scale: the search stops when the bracket is narrower than this."""
MAX_SCALE = 100.0
"""NaFlex's upper bound on the scale (so a 1x1 image is upscaled at most to 100x100 before rounding)."""


def scaled_side(size: int, scale: float, patch: int) -> int:
    """One side at `scale`, rounded up to a multiple of `patch` and at least one patch (NaFlex's rounding:
    up, so no pixel row is cut off, at the price of a slight aspect change)."""
    return max(patch, math.ceil(size * scale / patch) * patch)


def resize_to_patches(
    height: int, width: int, patch: int, max_patches: int, max_side: int, upscale: bool
) -> tuple[int, int]:
    """(height, width) of the resized image: the largest scale that fits every limit, sides rounded up.

    Limits (0 = none): at most `max_patches` patches, the longer side at most `max_side` pixels. With
    `upscale`, the search is NaFlex's own, float64 as in transformers' port: the scale is searched in
    (SEARCH_EPS / 10, MAX_SCALE) until the bracket is narrower than SEARCH_EPS, keeping the feasible end.
    Without it, an image whose own size (rounded up to patches) fits is kept at that size, and only
    larger ones are searched, which then gives the same size as with `upscale`.
    """

    def fits(h: int, w: int) -> bool:
        if max_patches and (h // patch) * (w // patch) > max_patches:
            return False
        return not (max_side and max(h, w) > max_side)

    if not upscale:
        native = scaled_side(height, 1.0, patch), scaled_side(width, 1.0, patch)
        if fits(*native):
            return native
    low, high = SEARCH_EPS / 10, MAX_SCALE
    while high - low >= SEARCH_EPS:
        mid = (low + high) / 2
        if fits(scaled_side(height, mid, patch), scaled_side(width, mid, patch)):
            low = mid
        else:
            high = mid
    h, w = scaled_side(height, low, patch), scaled_side(width, low, patch)
    if not fits(h, w):
        raise ValueError(
            f"no size with at least one {patch}-px patch per side fits max_patches {max_patches} / "
            f"max_side {max_side} ({width}x{height} is too elongated)"
        )
    return h, w


def kept_count(patches: int, rate: float) -> int:
    """Patches kept at drop `rate`: lucidrains' `max(1, int(n * (1 - rate)))` (floor, never zero)."""
    if rate <= 0:
        return patches
    return max(1, int(patches * (1 - rate)))


@dataclass(frozen=True)
class NaViT(Strategy):
    """Native aspect ratio, patch multiples, a patch sequence per image; optional resolution sampling and
    token dropping. Unlike the model presets, every parameter here is tunable (mean/std included): no
    NaViT checkpoint is public, so the normalization is whatever the model being trained uses."""

    patch_size: int = param(16, "Patch side in pixels.", minimum=1)
    max_patches: int = param(
        256,
        "Patch budget per image: the largest aspect-preserving size within it (NaFlex); 0: none.",
        minimum=0,
    )
    max_side: int = param(0, "Longest side of the resized image in pixels at most this; 0: none.", minimum=0)
    upscale: bool = param(
        True,
        "Scale small images up to the limits (NaFlex); --no-upscale keeps them at native size (rounded up "
        "to patch multiples).",
    )
    sizes: tuple[int, ...] = param(
        (),
        "Resolution sampling: each image's longest-side limit is drawn from these (comma-separated), "
        "seeded by --seed and the image key.",
    )
    seed: int = param(0, "Seed of every per-image draw (sizes, drop rates, kept patches).", minimum=0)
    drop_rate: float = param(0.0, "Fraction of patches dropped per image (token dropping); 0: none.")
    drop_rate_max: float = param(
        0.0,
        "Resolution-dependent dropping: the rate at max_patches patches, rising linearly from drop_rate "
        "at one patch; 0: off.",
    )
    drop_concentration: float = param(
        0.0,
        "Per-image rate from Beta(k*r, k*(1-r)) with mean r (the rate above) and this concentration k; "
        "0: the rate itself.",
    )
    mean: tuple[float, ...] = param(SIGLIP_MEAN, "Per-channel normalization mean (comma-separated).")
    std: tuple[float, ...] = param(SIGLIP_STD, "Per-channel normalization std (comma-separated).")
    draw_key: str = param(
        "", "The image identity per-image draws are seeded with (set by for_image).", tunable=False
    )

    metadata_fields: ClassVar = types.MappingProxyType({"grid_hw": "list<int>", "kept_patches": "list<int>"})
    """`grid_hw`: (rows, cols) of the patch grid. `kept_patches`: raster indices (row * cols + col) of the
    stored patches, ascending, when tokens were dropped; null when every patch is stored (a list of every
    index would cost as much metadata as it says nothing)."""

    multi_image_rule: ClassVar[str] = (
        "none: every image of a sample is sized and dropped as if alone, with its own draws (seeded by the "
        "sample key and the image's index)"
    )
    budget_rules: ClassVar = types.MappingProxyType(
        {"max_tokens": "max_patches = min(max_patches, budget // n) (budget // n when max_patches is 0)"}
    )
    splittable: ClassVar[bool] = True

    def validate(self) -> None:
        name = self.name or "navit"
        p = self.patch_size
        if self.max_side and self.max_side < p:
            raise ValueError(f"{name}: max_side ({self.max_side}) must be at least patch_size ({p})")
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= p for s in self.sizes):
            raise ValueError(f"{name}: sizes must be integers of at least patch_size ({p}); got {self.sizes}")
        if self.sizes and self.max_side:
            raise ValueError(f"{name}: give max_side or sizes (a max_side drawn per image), not both")
        if self.upscale and not (self.max_patches or self.max_side or self.sizes):
            raise ValueError(
                f"{name}: upscale needs a limit to scale up to (max_patches, max_side or sizes), "
                "or use upscale=False for native size"
            )
        for field_name in ("drop_rate", "drop_rate_max"):
            value = getattr(self, field_name)
            if not 0 <= value < 1:
                raise ValueError(f"{name}: parameter {field_name!r} must be in [0, 1); got {value!r}")
        if self.drop_rate_max:
            if not self.max_patches:
                raise ValueError(f"{name}: drop_rate_max is the rate at max_patches: set max_patches")
            if self.drop_rate_max < self.drop_rate:
                raise ValueError(
                    f"{name}: drop_rate_max ({self.drop_rate_max}) must not be below drop_rate "
                    f"({self.drop_rate})"
                )
        if self.drop_concentration < 0 or not math.isfinite(self.drop_concentration):
            raise ValueError(f"{name}: drop_concentration must be >= 0; got {self.drop_concentration!r}")
        for field_name in ("mean", "std"):
            values = getattr(self, field_name)
            ok = len(values) == 3 and all(isinstance(v, int | float) and math.isfinite(v) for v in values)
            if not ok or (field_name == "std" and min(values) <= 0):
                raise ValueError(f"{name}: {field_name} must be three finite numbers (std > 0); got {values}")
        if any(isinstance(v, int) for v in (*self.mean, *self.std)):  # 0 in a list means 0.0
            object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
            object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    @property
    def draws(self) -> bool:
        """Whether plans draw at random (size sampling or token dropping)."""
        return bool(self.sizes) or self.drop_rate > 0 or self.drop_rate_max > 0

    def for_image(self, key: str, index: int) -> NaViT:
        if not self.draws:
            return self
        # A copy with only the identity changed: every other field was validated already, and
        # `dataclasses.replace` would validate them again for every image (~0.3 ms, more than the plan).
        keyed = copy.copy(self)
        object.__setattr__(keyed, "draw_key", f"{key}#{index}")
        return keyed

    def limit_tokens(self, per_image: int) -> NaViT:
        """Tokens are kept patches, never more than the patches: a patch budget is a token budget."""
        if self.max_patches and self.max_patches <= per_image:
            return self
        return dataclasses.replace(self, max_patches=per_image)

    def mean_drop_rate(self, patches: int) -> float:
        """The drop rate for an image of `patches` patches before any Beta draw: `drop_rate`, or with
        `drop_rate_max` linear in the patch count from `drop_rate` (one patch) to `drop_rate_max`
        (`max_patches` patches)."""
        if not self.drop_rate_max:
            return self.drop_rate
        span = self.max_patches - 1
        t = 1.0 if span <= 0 else min(1.0, (patches - 1) / span)
        return self.drop_rate + (self.drop_rate_max - self.drop_rate) * t

    def _generator(self) -> np.random.Generator:
        """This image's generator: PCG64 seeded with (seed, 128 bits of BLAKE2b of the image identity)."""
        digest = hashlib.blake2b(self.draw_key.encode("utf-8", "surrogateescape"), digest_size=16).digest()
        words = [int(w) for w in np.frombuffer(digest, dtype="<u4")]
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, *words])))

    def plan(self, width: int, height: int) -> Plan:
        check_size(width, height)
        p = self.patch_size
        rng = self._generator() if self.draws else None
        max_side = self.max_side
        if self.sizes:  # draw 1: the longest-side limit
            assert rng is not None
            max_side = self.sizes[int(rng.integers(len(self.sizes)))]
        h, w = resize_to_patches(height, width, p, self.max_patches, max_side, self.upscale)
        rows, cols = h // p, w // p
        patches = rows * cols
        rate = self.mean_drop_rate(patches)
        if rng is not None and self.drop_concentration > 0 and 0 < rate < 1:  # draw 2: this image's rate
            k = self.drop_concentration
            rate = float(rng.beta(k * rate, k * (1 - rate)))
        keep = kept_count(patches, rate)
        kept: tuple[int, ...] | None = None  # every patch, in raster order
        if keep < patches:  # draw 3: which patches stay (in raster order, like the rest of the sequence)
            assert rng is not None
            kept = tuple(np.sort(rng.choice(patches, size=keep, replace=False)).tolist())
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
            num_tokens=keep,
            shape=(keep, p * p * 3),
            extra=(("grid_hw", (rows, cols)), ("kept_patches", kept)),
        )

    def render(self, image: Image.Image, plan: Plan) -> np.ndarray:
        p = self.patch_size
        extra = dict(plan.extra)
        rows, cols = extra["grid_hw"]
        resized = np.asarray(
            image.resize((plan.resized_width, plan.resized_height), Image.Resampling.BILINEAR)
        )
        # (H, W, C) -> (rows, p, cols, p, C) -> (rows, cols, p, p, C): one row per patch, raster order.
        patches = resized.reshape(rows, p, cols, p, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, -1)
        kept = extra["kept_patches"]
        if kept is None:
            return np.ascontiguousarray(patches)
        return patches[np.asarray(kept, dtype=np.int64)]

    def channel_view(self, pixels: np.ndarray) -> np.ndarray:
        return pixels.reshape(pixels.shape[0], -1, 3).transpose(0, 2, 1)

    def views(self, pixels: np.ndarray, plan: Plan) -> list[tuple[str, np.ndarray]]:
        p = self.patch_size
        extra = dict(plan.extra)
        rows, cols = extra["grid_hw"]
        kept = _kept(extra["kept_patches"], rows * cols)
        grid = np.full((rows * cols, p, p, 3), 128, dtype=np.uint8)  # dropped patches show grey
        grid[kept] = pixels.reshape(-1, p, p, 3)
        canvas = grid.reshape(rows, cols, p, p, 3).transpose(0, 2, 1, 3, 4).reshape(rows * p, cols * p, 3)
        label = f"{p}-px patches, {rows}x{cols}"
        if len(kept) < rows * cols:
            label += f", {len(kept)} of {rows * cols} kept (dropped: grey)"
        return [(label, canvas)]

    def sequence_unit(self) -> int:
        return 1

    def patch_grid(self, metadata: Mapping[str, Any]) -> tuple[int, int]:
        rows, cols = metadata["grid_hw"]
        return int(rows), int(cols)

    def patch_positions(self, metadata: Mapping[str, Any]) -> np.ndarray:
        """(row, col) of each stored patch: `divmod(kept_patches, cols)`, or the whole grid in raster order
        when nothing was dropped."""
        rows, cols = self.patch_grid(metadata)
        kept = _kept(metadata["kept_patches"], rows * cols)
        return np.stack(np.divmod(kept, cols), axis=-1).astype(np.int32)


def _kept(kept_patches: Sequence[int] | None, patches: int) -> np.ndarray:
    """The stored patches' raster indices: `kept_patches`, or all of them when it is None (no dropping)."""
    if kept_patches is None:
        return np.arange(patches, dtype=np.int64)
    return np.asarray(kept_patches, dtype=np.int64)


PRESETS = [
    Preset(
        "navit",
        NaViT,
        {},
        "NaViT / NaFlex native resolution: aspect-preserving resize to <= 256 16-px patches (sides rounded "
        "up), BILINEAR, mean/std 0.5 (SigLIP-2 NaFlex); optional resolution sampling and token dropping.",
        aliases=("naflex",),
    ),
]
