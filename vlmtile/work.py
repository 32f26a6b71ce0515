"""The per-image work: decode -> prepare -> plan -> render -> encode, as a value (`Record` or `Failure`).

Nothing here knows about processes, shards or output formats, so it runs the same inline, in a pool
worker or on a Ray task, and a bad image can never take a worker down: every failure is a value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .decode import load_image
from .dtypes import encode_pixels
from .errors import ImageError
from .sources import InputItem, display_path
from .strategies import Strategy


@dataclass(frozen=True)
class Record:
    """One processed image, ready for a sink."""

    key: str
    source: str
    pixels: np.ndarray
    """The stored array (storage dtype, model layout)."""
    metadata: dict[str, Any]
    """key, source, shape, dtype and the plan's metadata (JSON-able)."""


@dataclass(frozen=True)
class Failure:
    """One input that produced no record, and why."""

    key: str
    source: str
    stage: str
    """Where it failed: "read", "decode", "plan" or "render"."""
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"source": self.source, "key": self.key, "stage": self.stage, "reason": self.reason}


def process_input(item: InputItem, strategy: Strategy, dtype: str) -> Record | Failure:
    """Everything that happens to one input image."""
    source = display_path(item.source)
    try:
        image = load_image(item.source)
    except ImageError as e:
        return Failure(item.key, source, "decode", str(e))
    try:
        rgb = strategy.prepare(image)
    except (ValueError, OSError) as e:  # an exotic mode Pillow cannot convert, or a damaged EXIF block
        return Failure(item.key, source, "decode", f"cannot convert {image.mode} image to RGB: {e}")
    try:
        plan = strategy.plan(*rgb.size)
    except ValueError as e:
        return Failure(item.key, source, "plan", f"refused by {strategy.name}: {e}")
    try:
        pixels = encode_pixels(strategy, strategy.render(rgb, plan), dtype)
    except (MemoryError, ValueError, OSError) as e:
        return Failure(item.key, source, "render", f"{type(e).__name__}: {e}")
    metadata: dict[str, Any] = {
        "key": item.key,
        "source": source,
        "shape": list(pixels.shape),
        "dtype": dtype,
        **plan.metadata(),
    }
    return Record(item.key, source, pixels, metadata)
