"""Turning input bytes into a loaded PIL image, and deciding what is an image at all.

Images are recognised by content: Pillow identifies the format from the bytes, whatever the suffix says.
Every way this can fail becomes an `ImageError` whose message says what is wrong with the file, so that
the error record is useful to a person at 3 a.m. without a traceback.
"""

from __future__ import annotations

import io
import os
import warnings

from PIL import Image, UnidentifiedImageError

from .errors import ImageError

IMAGE_SUFFIXES = frozenset(
    ".jpg .jpeg .jpe .jfif .png .webp .bmp .dib .gif .tif .tiff .ppm .pgm .pbm .pnm .tga .ico .jp2 .j2k "
    ".avif .heic .heif".split()
)
"""Suffixes taken as images without looking inside (a wrong one still fails by content, loudly)."""

_MAGIC = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"BM",  # BMP
    b"II*\x00",  # TIFF little-endian
    b"MM\x00*",  # TIFF big-endian
    b"\x00\x00\x00\x0cjP  ",  # JPEG 2000
    b"\xff\x4f\xff\x51",  # J2K codestream
    b"P1",
    b"P2",
    b"P3",
    b"P4",
    b"P5",
    b"P6",
)


def looks_like_image(path: str) -> bool:
    """Sniff the first bytes of a file without an image suffix (e.g. `photo` or `img.bin`)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return False
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return True
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis", b"heic", b"heix", b"mif1"):
        return True
    return head.startswith(_MAGIC)


def read_bytes(path: str) -> bytes:
    """Read a whole input file, turning OS errors into reasons."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ImageError("file not found (removed after it was listed?)") from None
    except IsADirectoryError:
        raise ImageError("is a directory, not an image file") from None
    except PermissionError:
        raise ImageError("cannot read file: permission denied") from None
    except OSError as e:
        raise ImageError(f"cannot read file: {e.strerror or e}") from None


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes fully (first frame), so that later steps cannot fail on lazy I/O."""
    if not data:
        raise ImageError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # A decompression-bomb *warning* is Pillow being cautious about large scans; the hard limit
            # (Image.MAX_IMAGE_PIXELS * 2) still raises below and becomes an error record.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
    except UnidentifiedImageError:
        raise ImageError(
            f"not an image: content not recognised by Pillow (starts with {data[:8]!r})"
        ) from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"image too large to decode safely: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"corrupt or truncated image data: {e}") from None
    if image.width < 1 or image.height < 1:
        raise ImageError(f"image has no pixels ({image.width}x{image.height})")
    return image


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Read and decode one image file."""
    return decode_image(read_bytes(os.fspath(path)))
