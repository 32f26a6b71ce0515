"""Shared test fixtures: seeded synthetic images in any Pillow mode, and the real images in sample_data/."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# transformers logs "PyTorch was not found" at import and "The channel dimension is ambiguous" for tiny
# images through its own logger (stderr, not the warnings module). Nothing above imports it; test modules
# import it after this conftest has run.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "sample_data"
SAMPLE_SUFFIXES = (".jpg", ".jpeg", ".png")
SAMPLE_PATHS = sorted(p for p in SAMPLE_DIR.iterdir() if p.suffix.lower() in SAMPLE_SUFFIXES)

IMAGE_MODES = ("RGB", "L", "RGBA", "P", "P+trns", "CMYK", "LA", "1", "I;16")
"""Every mode `make_image` builds. "P+trns" is a palette image with an `info["transparency"]` index."""


def _content(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) uint8 that looks like a photo to a resampler: smooth gradients, sharp edges and noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    y /= max(height - 1, 1)
    x /= max(width - 1, 1)
    img = np.empty((height, width, 3), dtype=np.float64)
    for c in range(3):
        gx, gy = rng.uniform(-120, 120, size=2)
        fx, fy = rng.uniform(0.5, 6, size=2)
        img[..., c] = 128 + gx * (x - 0.5) + gy * (y - 0.5)
        img[..., c] += rng.uniform(20, 50) * np.sin(2 * np.pi * (fx * x + fy * y) + rng.uniform(0, 2 * np.pi))
    for _ in range(int(rng.integers(3, 7))):  # hard-edged rectangles and discs
        colour = rng.uniform(0, 255, size=3)
        x0, x1 = np.sort(rng.uniform(0, 1, size=2))
        y0, y1 = np.sort(rng.uniform(0, 1, size=2))
        if rng.random() < 0.5:
            mask = (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
        else:
            cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.4)
            mask = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
        img[mask] = colour
    img += rng.normal(0, 6, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _alpha(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """(H, W) uint8 alpha with fully transparent, fully opaque and partially transparent regions."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    y /= max(height - 1, 1)
    x /= max(width - 1, 1)
    theta = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(theta) * (x - 0.5) + np.sin(theta) * (y - 0.5)  # in [-0.71, 0.71]
    alpha = np.clip((ramp + 0.25) * 500, 0, 255)  # a quarter transparent, a third opaque, a soft band between
    cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.3)
    alpha[(x - cx) ** 2 + (y - cy) ** 2 <= r * r] = 128
    return np.rint(alpha).astype(np.uint8)


def make_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A seeded synthetic `width` x `height` image in `mode` (one of `IMAGE_MODES`).

    Colour under transparent pixels is real content (not black or white), so alpha handling matters.
    """
    rng = np.random.default_rng(seed)
    rgb = _content(width, height, rng)
    size = (width, height)
    luma = np.rint(rgb @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
    if mode == "RGB":
        return Image.frombytes("RGB", size, rgb.tobytes())
    if mode == "L":
        return Image.frombytes("L", size, luma.tobytes())
    if mode == "RGBA":
        rgba = np.dstack([rgb, _alpha(width, height, rng)])
        return Image.frombytes("RGBA", size, np.ascontiguousarray(rgba).tobytes())
    if mode == "LA":
        la = np.dstack([luma, _alpha(width, height, rng)])
        return Image.frombytes("LA", size, np.ascontiguousarray(la).tobytes())
    if mode in ("P", "P+trns"):
        image = Image.frombytes("RGB", size, rgb.tobytes()).quantize(colors=63)
        if mode == "P+trns":
            # Index 63: a dark colour, fully transparent, painted where the alpha mask is 0.
            indices = np.asarray(image).copy()
            indices[_alpha(width, height, rng) == 0] = 63
            palette = image.getpalette() or []
            palette = (palette + [0] * 768)[:768]
            palette[3 * 63 : 3 * 64] = [40, 30, 20]
            image = Image.frombytes("P", size, indices.tobytes())
            image.putpalette(palette)
            image.info["transparency"] = 63
        return image
    if mode == "CMYK":
        k = np.rint(np.linspace(0, 96, width))[None, :].repeat(height, axis=0).astype(np.uint8)
        cmyk = np.dstack([255 - rgb, k])
        return Image.frombytes("CMYK", size, np.ascontiguousarray(cmyk).tobytes())
    if mode == "1":
        return Image.frombytes("L", size, luma.tobytes()).convert("1")
    if mode == "I;16":
        wide = np.rint(luma.astype(np.float64) * 1.25).astype("<u2")  # some values above 255
        return Image.frombytes("I;16", size, wide.tobytes())
    raise ValueError(f"make_image: unsupported mode {mode!r}; use one of {IMAGE_MODES}")


@pytest.fixture(scope="session", name="make_image")
def make_image_fixture() -> Callable[..., Image.Image]:
    """The `make_image(width, height, mode, seed)` helper."""
    return make_image


@pytest.fixture(scope="session")
def sample_paths() -> list[Path]:
    """Every image file in sample_data/, sorted by name."""
    return list(SAMPLE_PATHS)


@pytest.fixture(params=SAMPLE_PATHS, ids=[p.name for p in SAMPLE_PATHS])
def sample_path(request: pytest.FixtureRequest) -> Path:
    """Each image file in sample_data/ in turn."""
    return request.param
