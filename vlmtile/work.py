"""The per-sample work: for each image decode -> prepare -> plan -> render -> encode; a value comes back.

Nothing here knows about processes, shards or output formats, so it runs the same inline, in a pool
worker or on a Ray task, and a bad image can never take a worker down: every failure is a value. A sample
fails as a whole when any of its images fails, because a conversation whose `<image>` tags no longer match
its images is worse for training than a missing sample (and the error record says which image and why).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from .decode import DEFAULT_MAX_IMAGE_PIXELS, decode_image, read_bytes
from .dtypes import render_stored
from .errors import ImageError
from .fast import SourceReducer
from .samples import Failure, ImageRef, Sample
from .sources import InputItem, display_path
from .strategies import Strategy
from .streams import is_url, read_bytes_url

__all__ = ["Budget", "Failure", "Record", "SampleRecord", "process_input", "process_sample"]


@dataclass(frozen=True)
class Record:
    """One processed image, ready for a sink."""

    key: str
    source: str
    pixels: np.ndarray | None
    """The stored array (storage dtype, model layout); None in metadata-only runs."""
    metadata: dict[str, Any]
    """key, source, shape, dtype and the plan's metadata (JSON-able)."""


@dataclass(frozen=True)
class SampleRecord:
    """One processed sample: its images' records in order, plus everything else it carried."""

    sample: Sample
    images: tuple[Record, ...]

    @property
    def key(self) -> str:
        return self.sample.key

    @property
    def num_tokens(self) -> int:
        return sum(int(r.metadata["num_tokens"]) for r in self.images)

    @property
    def num_tiles(self) -> int:
        return sum(int(r.metadata["num_tiles"]) for r in self.images)

    @property
    def pixel_bytes(self) -> int:
        return sum(r.pixels.nbytes for r in self.images if r.pixels is not None)


@dataclass(frozen=True)
class Budget:
    """Optional per-sample limits, shared out over a sample's images by the strategy's own rule."""

    max_tiles: int | None = None
    max_tokens: int | None = None


def _image_bytes(ref: ImageRef) -> bytes:
    if ref.data is not None:
        return ref.data
    if ref.path is None:
        raise ImageError("image has neither bytes nor a path")
    if ref.path.startswith("data:") or is_url(ref.path):
        return read_bytes_url(ref.path)
    return read_bytes(ref.path)


def process_image(
    ref: ImageRef,
    key: str,
    strategy: Strategy,
    dtype: str,
    *,
    pixels: bool = True,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    fast: bool = False,
) -> Record | Failure:
    """Everything that happens to one image; `key` and `ref.source` go into its metadata.

    Images above `max_pixels` (None: no limit) are refused from their header, before decoding. `fast`
    shrinks the source before the strategy's resizes (`vlmtile.fast`): same plan, not bit-exact pixels.
    """
    source = ref.source
    reducer = SourceReducer(strategy) if fast and pixels else None
    try:
        image = decode_image(_image_bytes(ref), max_pixels, draft=reducer.draft if reducer else None)
    except ImageError as e:
        return Failure(key, source, "decode", str(e))
    try:
        rgb = strategy.prepare(image)
    except (ValueError, OSError, MemoryError, Image.DecompressionBombError) as e:
        # An exotic mode Pillow cannot convert, a damaged EXIF block, or no memory for the copy.
        return Failure(key, source, "decode", f"cannot convert {image.mode} image to RGB: {e}")
    except Exception as e:  # noqa: BLE001 - Pillow's EXIF parser on hostile bytes: this image's failure
        return Failure(
            key, source, "decode", f"cannot orient or convert {image.mode} image: {type(e).__name__}: {e}"
        )
    try:
        plan = reducer.plan if reducer is not None and reducer.plan is not None else strategy.plan(*rgb.size)
    except ValueError as e:
        return Failure(key, source, "plan", f"refused by {strategy.name}: {e}")
    stored = None
    if pixels:
        try:
            if reducer is not None:
                rgb = reducer.reduce(rgb, plan)
            stored = render_stored(strategy, rgb, plan, dtype)
        except (MemoryError, ValueError, OSError, Image.DecompressionBombError) as e:
            return Failure(key, source, "render", f"{type(e).__name__}: {e}")
    metadata: dict[str, Any] = {
        "key": key,
        "source": source,
        "shape": list(stored.shape if stored is not None else plan.shape),
        "dtype": dtype,
        **plan.metadata(),
    }
    return Record(key, source, stored, metadata)


def process_sample(
    sample: Sample,
    strategy: Strategy,
    dtype: str,
    budget: Budget | None = None,
    *,
    pixels: bool = True,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    fast: bool = False,
) -> SampleRecord | Failure:
    """Every image of a sample under the strategy the sample's image count and budget call for.

    `max_pixels` is the decompression-bomb limit of every image (`decode_image`); None: no limit.
    """
    budget = budget or Budget()
    n = len(sample.images)
    try:
        per_image = strategy.for_sample(max(n, 1), max_tiles=budget.max_tiles, max_tokens=budget.max_tokens)
    except ValueError as e:
        return Failure(sample.key, sample.source, "plan", str(e))
    records = []
    for index, ref in enumerate(sample.images):
        strategy_here = per_image.for_image(sample.key, index)
        out = process_image(
            ref, sample.key, strategy_here, dtype, pixels=pixels, max_pixels=max_pixels, fast=fast
        )
        if isinstance(out, Failure):
            which = f"image {index + 1} of {n} ({ref.name}): " if n > 1 else ""
            return Failure(sample.key, ref.source, out.stage, which + out.reason)
        out.metadata["name"] = ref.name
        records.append(out)
    return SampleRecord(sample, tuple(records))


def process_input(
    item: InputItem, strategy: Strategy, dtype: str, *, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> Record | Failure:
    """One image file (the flat layout of plain image folders)."""
    source = display_path(item.source)
    ref = ImageRef("image", source, path=item.source)
    out = process_image(ref, item.key, strategy.for_image(item.key, 0), dtype, max_pixels=max_pixels)
    if isinstance(out, Record):
        out.metadata.pop("name", None)
    return out
