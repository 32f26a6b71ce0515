"""Storage dtypes for pixel arrays, and the exact way from stored bytes back to the model's float32.

uint8 stores the resized pixels before normalization (4x smaller than float32); the reader normalizes
them through the strategy's table and gets the float32 bits `process` returns. float16 and bfloat16 are
rounded to nearest-even from float32, as `tensor.half()` / `.bfloat16()` do.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from PIL import Image

from .strategies import Plan, Strategy

STORAGE_DTYPES = ("float32", "float16", "bfloat16", "uint8")


@functools.cache
def bfloat16() -> np.dtype[Any]:
    """numpy's bfloat16 from ml_dtypes, imported on first use: the import costs ~1.3 s (it computes
    `finfo` tables for a dozen types), which every command would otherwise pay at start-up."""
    import ml_dtypes

    dtype: np.dtype[Any] = np.dtype(ml_dtypes.bfloat16)
    return dtype


def numpy_dtype(name: str) -> np.dtype[Any]:
    """The numpy dtype for a storage dtype name (bfloat16 through ml_dtypes)."""
    if name == "bfloat16":
        return bfloat16()
    if name not in STORAGE_DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid: {', '.join(STORAGE_DTYPES)}")
    dtype: np.dtype[Any] = np.dtype(name)
    return dtype


def render_stored(strategy: Strategy, image: Image.Image, plan: Plan, dtype: str) -> np.ndarray:
    """An RGB image -> the array to store: `render`'s uint8 pixels, or them normalized into `dtype`."""
    if dtype == "uint8":
        return strategy.render(image, plan)
    return strategy.render_normalized(image, plan, numpy_dtype(dtype))


def decode_pixels(strategy: Strategy, stored: np.ndarray, dtype: str) -> np.ndarray:
    """A stored array -> float32 normalized, in the model's layout (exact for float32 and uint8 storage)."""
    if dtype == "uint8":
        return strategy.expand(strategy.normalize(stored))
    return strategy.expand(stored.astype(np.float32))
