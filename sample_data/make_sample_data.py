"""Regenerate the demo images in this folder.

Every file is either drawn here (numpy / Pillow, seeded RNG) or derived from a
public-domain / CC0 photograph that ships inside the scikit-image or matplotlib
wheel, so no network access is needed.  scikit-image and matplotlib are needed
only to run this script, not to use vlmtile:

    python3 -m venv /tmp/sdvenv
    /tmp/sdvenv/bin/pip install scikit-image matplotlib "pillow>=13,<14" numpy
    /tmp/sdvenv/bin/python sample_data/make_sample_data.py

The output is deterministic for a given Pillow build (libjpeg / zlib / FreeType
versions); pixel content may differ by a few levels across builds.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
from matplotlib import cbook
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from skimage import data as skdata

OUT = Path(__file__).resolve().parent
SEED = 20240601
JPEG_QUALITY = 85
EXIF_ORIENTATION = 0x0112


def _save_jpeg(img: Image.Image, name: str, quality: int = JPEG_QUALITY, **kw: object) -> None:
    # optimize=True only shrinks the Huffman tables; output stays deterministic.
    img.save(OUT / name, "JPEG", quality=quality, optimize=True, **kw)


def _save_png(img: Image.Image, name: str, **kw: object) -> None:
    img.save(OUT / name, "PNG", optimize=True, **kw)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow's built-in default font (scalable when Pillow has FreeType).
    return ImageFont.load_default(size=size)


def _grace_hopper() -> Image.Image:
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        return Image.open(f).convert("RGB")


# --------------------------------------------------------------------------- photographs


def rocket_large() -> None:
    """SpaceX DSCOVR launch photo (public domain), upscaled 640x427 -> 3000x2000."""
    img = Image.fromarray(skdata.rocket())
    img = img.resize((3000, 2000), Image.Resampling.LANCZOS)
    _save_jpeg(img, "rocket_launch_3000x2000.jpg")


def coffee() -> None:
    """Coffee cup (CC0, Rachel Michetti), native 600x400."""
    _save_jpeg(Image.fromarray(skdata.coffee()), "coffee_600x400.jpg")


def chelsea() -> None:
    """Chelsea the cat (CC0, Stefan van der Walt), native 451x300 (odd width)."""
    _save_jpeg(Image.fromarray(skdata.chelsea()), "chelsea_cat_451x300.jpg")


def hubble() -> None:
    """Hubble eXtreme Deep Field (NASA, public domain), native 1000x872."""
    _save_jpeg(Image.fromarray(skdata.hubble_deep_field()), "hubble_deep_field_1000x872.jpg")


def camera_gray() -> None:
    """Camera man (CC0, Lav Varshney), grayscale (mode L) JPEG, square 512x512."""
    img = Image.fromarray(skdata.camera())
    assert img.mode == "L"
    _save_jpeg(img, "camera_gray_512x512.jpg")


def astronaut_448() -> None:
    """Eileen Collins (NASA, public domain), 512x512 resized to exactly 448x448."""
    img = Image.fromarray(skdata.astronaut()).resize((448, 448), Image.Resampling.LANCZOS)
    _save_jpeg(img, "astronaut_448x448.jpg", quality=90)


def exif_rotated() -> None:
    """Grace Hopper (US Navy photo, public domain) stored sideways with EXIF Orientation 6.

    The pixels are stored rotated 90 degrees counter-clockwise (600x512 landscape);
    a viewer that honours Orientation 6 rotates them 90 degrees clockwise and shows
    the upright 512x600 portrait, as ``PIL.ImageOps.exif_transpose`` does.
    """
    upright = _grace_hopper()
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    exif[0x010E] = "vlmtile sample: stored sideways, EXIF Orientation 6 makes it upright"  # ImageDescription
    _save_jpeg(stored, "grace_hopper_exif_orientation6.jpg", exif=exif.tobytes())


def tall_strip() -> None:
    """Very tall 300x2400 photo strip made of the public-domain / CC0 photos above (camera in gray)."""
    width, height, gap = 300, 2400, 8
    sources = [
        skdata.coffee(),
        skdata.chelsea(),
        skdata.astronaut(),
        skdata.rocket(),
        skdata.hubble_deep_field(),
        np.asarray(_grace_hopper()),
        skdata.retina(),
        skdata.camera(),
    ]
    canvas = Image.new("RGB", (width, height), (245, 245, 240))
    y = 0
    # Cycle through the photos until the strip is full; the last one is cut off at the bottom edge.
    for arr in itertools.cycle(sources):
        if y >= height:
            break
        tile = Image.fromarray(arr).convert("RGB")
        tile_h = round(tile.height * width / tile.width)
        canvas.paste(tile.resize((width, tile_h), Image.Resampling.LANCZOS), (0, y))
        y += tile_h + gap
    _save_jpeg(canvas, "photo_strip_tall_300x2400.jpg")


# --------------------------------------------------------------------------- drawn here


def wide_banner(rng: np.random.Generator) -> None:
    """Very wide 3000x300 procedural landscape (sky gradient, layered ridges), RGB PNG."""
    width, height = 3000, 300
    yy = np.linspace(0.0, 1.0, height)[:, None, None]
    top, bottom = np.array([40, 90, 170]), np.array([250, 200, 150])
    sky = (top * (1 - yy) + bottom * yy) * np.ones((1, width, 1))
    img = Image.fromarray(np.round(sky).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    draw.ellipse((2200, 60, 2280, 140), fill=(255, 240, 200))
    x = np.arange(width)
    layers = [(150, (90, 110, 150)), (190, (60, 85, 110)), (230, (35, 60, 70)), (265, (20, 35, 30))]
    for base, colour in layers:
        ridge = np.full(width, float(base))
        for _ in range(4):
            period = rng.uniform(150, 1200)
            ridge += rng.uniform(5, 30) * np.sin(2 * np.pi * x / period + rng.uniform(0, 2 * np.pi))
        points = [
            (0, height),
            *zip(x.tolist(), np.round(ridge).astype(int).tolist(), strict=True),
            (width, height),
        ]
        draw.polygon(points, fill=colour)
    _save_png(img, "mountains_wide_3000x300.png")


def tiny(rng: np.random.Generator) -> None:
    """Tiny 16x12 RGB PNG: a red-green gradient with a few random pixels."""
    xs = np.linspace(0, 255, 16)[None, :]
    ys = np.linspace(0, 255, 12)[:, None]
    arr = np.stack([xs + 0 * ys, ys + 0 * xs, np.full((12, 16), 128.0)], axis=-1)
    arr = np.round(arr).astype(np.uint8)
    for _ in range(6):
        arr[rng.integers(0, 12), rng.integers(0, 16)] = rng.integers(0, 256, size=3)
    _save_png(Image.fromarray(arr, "RGB"), "tiny_16x12.png")


def rgba_cutout() -> None:
    """640x480 RGBA: the CC0 horse silhouette filled with a gradient, a half-transparent yellow
    disc behind it and a fully transparent background; the horse's edges are soft, so alpha
    takes the values 0, 128, 255 and many in between."""
    width, height = 640, 480
    horse = Image.fromarray((~skdata.horse()).astype(np.uint8) * 255, "L")  # 255 on the horse
    horse = horse.resize((480, 394), Image.Resampling.LANCZOS).filter(ImageFilter.GaussianBlur(1.2))
    canvas = Image.new("L", (width, height), 0)
    canvas.paste(horse, (40, 70))
    horse_a = np.asarray(canvas, dtype=np.float64)[..., None] / 255.0
    disc_img = Image.new("L", (width, height), 0)
    ImageDraw.Draw(disc_img).ellipse((380, 20, 620, 260), fill=1)
    disc = np.asarray(disc_img, dtype=np.float64)[..., None]

    xx = np.linspace(0, 1, width)[None, :, None]
    yy = np.linspace(0, 1, height)[:, None, None]
    gradient = np.concatenate(
        [200 * (1 - xx) + 40 * yy, 60 + 120 * yy + 0 * xx, 80 + 150 * xx + 0 * yy], axis=-1
    )
    yellow = np.array([255.0, 200.0, 40.0])
    rgb = gradient * horse_a + (disc * yellow + (1 - disc) * gradient) * (1 - horse_a)
    alpha = np.maximum(horse_a * 255.0, disc * 128.0)
    rgba = np.concatenate([rgb, alpha], axis=-1)
    img = Image.fromarray(np.round(np.clip(rgba, 0, 255)).astype(np.uint8), "RGBA")
    _save_png(img, "horse_silhouette_rgba_640x480.png")


def palette_icons() -> None:
    """Palette (mode P) PNG, 320x240, 8 colours; index 0 is fully transparent (tRNS chunk)."""
    palette = [
        (0, 0, 0),  # 0: transparent background
        (230, 57, 70),
        (241, 250, 238),
        (168, 218, 220),
        (69, 123, 157),
        (29, 53, 87),
        (255, 183, 3),
        (42, 157, 143),
    ]
    img = Image.new("P", (320, 240), 0)
    img.putpalette([c for rgb in palette for c in rgb])
    draw = ImageDraw.Draw(img)
    for i in range(4):
        for j in range(3):
            x0, y0 = 16 + i * 76, 12 + j * 76
            colour = 1 + (i + 2 * j) % 7
            if (i + j) % 3 == 0:
                draw.ellipse((x0, y0, x0 + 64, y0 + 64), fill=colour, outline=5, width=3)
            elif (i + j) % 3 == 1:
                draw.rectangle((x0, y0, x0 + 64, y0 + 64), fill=colour, outline=5, width=3)
            else:
                draw.polygon([(x0 + 32, y0), (x0 + 64, y0 + 64), (x0, y0 + 64)], fill=colour, outline=5)
    _save_png(img, "palette_icons_transparent.png", transparency=0)


DOC_TEXT = [
    "Dynamic-resolution tiling splits a large image into a grid of fixed-size",
    "tiles that a vision encoder can read, plus an optional low-resolution",
    "thumbnail of the whole image. The grid is chosen so that its aspect ratio",
    "is as close as possible to the image's own, within a budget of tiles.",
    "",
    "Pre-tiling the images once, offline, saves the data loader from resizing",
    "and cropping the same pictures at every epoch, and makes the exact pixels",
    "seen by the model easy to inspect and to reproduce.",
]


def document_scan() -> None:
    """A4 page at 150 dpi (1240x1754), grayscale PNG: text, a table and a figure box
    rendered with Pillow's default font on an off-white page."""
    width, height = 1240, 1754
    img = Image.new("L", (width, height), 250)
    draw = ImageDraw.Draw(img)
    margin = 120
    draw.text((margin, 110), "Sample document for vlmtile", fill=20, font=_font(44))
    draw.text((margin, 175), "A synthetic page used to demonstrate document tiling.", fill=70, font=_font(24))
    draw.line((margin, 220, width - margin, 220), fill=40, width=2)
    body = _font(26)
    y = 260
    for section in (1, 2):
        draw.text(
            (margin, y), f"{section}. {'Tiling' if section == 1 else 'Why offline'}", fill=20, font=_font(32)
        )
        y += 56
        lines = DOC_TEXT[:4] if section == 1 else DOC_TEXT[5:]
        for line in lines:
            draw.text((margin, y), line, fill=30, font=body)
            y += 38
        y += 30
    # A small table.
    draw.text((margin, y), "Table 1. Example grids for a 448 px tile.", fill=20, font=_font(26))
    y += 50
    rows = [
        ("image size", "grid", "tiles"),
        ("448 x 448", "1 x 1", "1"),
        ("1344 x 448", "3 x 1", "3"),
        ("896 x 896", "2 x 2", "4"),
        ("1792 x 1344", "4 x 3", "12"),
    ]
    col_x = [margin, margin + 360, margin + 620, margin + 820]
    for r, row in enumerate(rows):
        top = y + r * 48
        draw.rectangle((col_x[0], top, col_x[-1], top + 48), outline=60, width=2, fill=225 if r == 0 else 250)
        for c, cell in enumerate(row):
            draw.text((col_x[c] + 14, top + 10), cell, fill=20, font=body)
        for cx in col_x[1:-1]:
            draw.line((cx, top, cx, top + 48), fill=60, width=2)
    y += len(rows) * 48 + 60
    # A figure: an image split into a 3 x 2 grid.
    fx0, fy0, fw, fh = margin + 150, y, 660, 440
    draw.rectangle((fx0, fy0, fx0 + fw, fy0 + fh), outline=30, width=3, fill=235)
    for k in range(1, 3):
        draw.line((fx0 + k * fw // 3, fy0, fx0 + k * fw // 3, fy0 + fh), fill=90, width=2)
    draw.line((fx0, fy0 + fh // 2, fx0 + fw, fy0 + fh // 2), fill=90, width=2)
    for k in range(6):
        cx = fx0 + (k % 3) * fw // 3 + fw // 6 - 10
        cy = fy0 + (k // 3) * fh // 2 + fh // 4 - 16
        draw.text((cx, cy), str(k + 1), fill=40, font=_font(32))
    draw.text((fx0, fy0 + fh + 16), "Figure 1. A 3 x 2 tile grid.", fill=20, font=_font(24))
    draw.text((width // 2 - 20, height - 100), "- 1 -", fill=60, font=_font(24))
    _save_png(img, "document_scan_a4_1240x1754.png")


# --------------------------------------------------------------------------- main


def main() -> int:
    rng = np.random.default_rng(SEED)
    rocket_large()
    coffee()
    chelsea()
    hubble()
    camera_gray()
    astronaut_448()
    exif_rotated()
    tall_strip()
    wide_banner(rng)
    tiny(rng)
    rgba_cutout()
    palette_icons()
    document_scan()

    total = 0
    for path in sorted(OUT.iterdir()):
        if path.suffix not in {".jpg", ".png"}:
            continue
        with Image.open(path) as im:
            size = path.stat().st_size
            total += size
            print(f"| `{path.name}` | {im.width}x{im.height} | {im.mode} | {im.format} | {size:,} |")
    print(f"total: {total:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
