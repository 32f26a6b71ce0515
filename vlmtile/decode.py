"""Turning input bytes into a loaded PIL image, and deciding what is an image at all.

Images are recognised by content: Pillow identifies the format from the bytes, whatever the suffix says.
Every way this can fail becomes an `ImageError` whose message says what is wrong with the file, so that
the error record is useful to a person at 3 a.m. without a traceback.
"""

from __future__ import annotations

import io
import os
import stat
import threading
import warnings
from collections.abc import Callable

from PIL import Image, UnidentifiedImageError

from .errors import ImageError

IMAGE_SUFFIXES = frozenset(
    ".jpg .jpeg .jpe .jfif .png .webp .bmp .dib .gif .tif .tiff .ppm .pgm .pbm .pnm .tga .ico .jp2 .j2k "
    ".avif .heic .heif".split()
)
"""Suffixes taken as images without looking inside (a wrong one still fails by content, loudly)."""

DEFAULT_MAX_IMAGE_PIXELS = 16384 * 16384
"""Images with more pixels (268,435,456 = 16384 x 16384) are refused before decoding: decompression bombs.

The largest legitimate training inputs are ~100-250 MP (high-DPI scans of maps, posters and newspaper
pages; stitched panoramas); 16384 x 16384 keeps all of them, with the largest WebP (16383 x 16383) just
under it. Pillow's own default (89,478,485 pixels, a hard error only at twice that, ~179 MP) would refuse
a 200 MP scan. At this limit one worker holds at most ~0.8 GB of decoded RGB (~1.6 GB with the converted
copy of a palette or CMYK image), which a machine running a worker per core can afford; a 40000 x 40000
bomb would be 4.8 GB per worker. `--max-image-pixels` raises or lowers it; None (CLI: 0) turns it off."""

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

_FORMAT_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
)
"""Signatures long enough that a file starting with one (or cut inside one) is that format, damaged.

BMP's "BM" and the PNM "P1".."P6" are left out: plenty of text and binary files start like that."""

_FILE_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)

_PILLOW_LIMIT = threading.Lock()
"""Held while `Image.MAX_IMAGE_PIXELS` is changed for one decode (see `decode_image`)."""


def open_regular(path: str) -> int:
    """A read-only descriptor of `path` if it is a regular file; otherwise `ImageError` saying what it is.

    Opened non-blocking and checked with fstat before any read: a FIFO with an image suffix would
    otherwise block the worker forever (no writer), and a device such as /dev/zero would never end.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        if os.path.islink(path):
            raise ImageError(
                f"broken symbolic link: its target {_display(os.readlink(path))} does not exist"
            ) from None
        raise ImageError("file not found (removed after it was listed?)") from None
    except IsADirectoryError:
        raise ImageError("is a directory, not an image file") from None
    except PermissionError:
        raise ImageError("cannot read file: permission denied") from None
    except OSError as e:
        raise ImageError(f"cannot read file: {e.strerror or e}") from None
    try:
        mode = os.fstat(fd).st_mode
    except OSError as e:
        os.close(fd)
        raise ImageError(f"cannot read file: {e.strerror or e}") from None
    if stat.S_ISREG(mode):
        return fd
    os.close(fd)
    if stat.S_ISDIR(mode):
        raise ImageError("is a directory, not an image file")
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
    raise ImageError(f"is {kind}, not a regular file")


def _display(path: str) -> str:
    """A path as valid UTF-8 for a message (undecodable bytes as `\\xNN`), like `sources.display_path`."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def looks_like_image(path: str) -> bool:
    """Sniff the first bytes of a file without an image suffix (e.g. `photo` or `img.bin`).

    Only regular files are sniffed: opening a FIFO found while listing a folder must not hang the run.
    """
    try:
        fd = open_regular(path)
    except ImageError:
        return False
    try:
        with open(fd, "rb") as f:
            head = f.read(16)
    except OSError:
        return False
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return True
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis", b"heic", b"heix", b"mif1"):
        return True
    return head.startswith(_MAGIC)


def read_bytes(path: str) -> bytes:
    """Read a whole input file, turning OS errors and non-files (directories, FIFOs, broken links) into
    reasons."""
    fd = open_regular(path)
    try:
        with open(fd, "rb") as f:
            return f.read()
    except OSError as e:
        raise ImageError(f"cannot read file: {e.strerror or e}") from None


def _damaged_format(data: bytes) -> str | None:
    """The format a file Pillow could not identify claims to be by its signature, if it claims one.

    A file cut inside its signature (e.g. the 2 bytes `\\xff\\xd8`) counts: it is a truncated image, not
    some other kind of file.
    """
    for magic, name in _FORMAT_MAGIC:
        if data.startswith(magic) or (len(data) >= 2 and magic.startswith(data)):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return None


def _is_text(data: bytes) -> bool:
    """Whether the start of `data` reads as UTF-8 text (a caption, a JSON sidecar, an HTML error page)."""
    head = data[:1024]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:  # not just a character cut at the end of the window
            return False
        text = head[: e.start].decode("utf-8")
    return bool(text) and all(c.isprintable() or c in "\t\n\r\f\v" for c in text)


def _not_an_image(data: bytes) -> ImageError:
    name = _damaged_format(data)
    if name is not None:
        return ImageError(
            f"corrupt or truncated {name} file: its header cannot be read ({len(data):,} bytes in all)"
        )
    if _is_text(data):
        return ImageError(f"not an image: the file holds text (starts with {data[:8]!r})")
    return ImageError(f"not an image: content not recognised by Pillow (starts with {data[:8]!r})")


def _format_name(image: Image.Image | None, data: bytes) -> str:
    return (image.format if image is not None else None) or _damaged_format(data) or "image"


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.0f} MP" if pixels >= 10_000_000 else f"{pixels / 1e6:.2g} MP"


def _check_limit(width: int, height: int, max_pixels: int | None) -> None:
    """Refuse a size above the limit, from the header alone (nothing is allocated yet)."""
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(
            f"image is {width}x{height} = {_megapixels(width * height)}, above the --max-image-pixels "
            f"limit of {max_pixels:,} ({_megapixels(max_pixels)}): refused without decoding it "
            "(decompression-bomb guard)"
        )


def decode_image(
    data: bytes,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    *,
    draft: Callable[[Image.Image], tuple[int, int] | None] | None = None,
) -> Image.Image:
    """Decode image bytes fully (first frame), so that later steps cannot fail on lazy I/O.

    Images above `max_pixels` (None: no limit) are refused from their header, before a pixel is
    allocated: `Image.open` only reads the header, the size check runs before `load()`.

    Pillow has no per-call limit: its own decompression-bomb check reads the module global
    `Image.MAX_IMAGE_PIXELS` (in `Image.open`, and again while loading GIF frames, TIFF tiles and MPO
    pictures). Left at Pillow's default it would refuse a legitimate 200 MP scan below our limit, and its
    error would pre-empt ours (which names the size and the option to change) for every bomb above
    ~179 MP. So the global is set for the duration of the call and restored after it, under a lock:
    switched off while the header is read (our check follows at once), then set so that Pillow's hard
    error falls at `max_pixels`, a backstop for sizes a header does not show. vlmtile decodes in worker
    processes, one image at a time, so the lock is never contended there; threads of a library caller
    decode one after another instead of racing on the global.

    `draft` (fast mode only): called with the opened image before it is decoded; a size it returns is
    passed to `Image.draft`, which lets the JPEG decoder scale down in the DCT domain (not bit-exact).
    """
    if max_pixels is not None and max_pixels < 1:
        raise ValueError(f"max_pixels must be at least 1 or None (no limit), got {max_pixels}")
    if not data:
        raise ImageError("empty file (0 bytes)")
    image: Image.Image | None = None
    size: tuple[int, int] | None = None
    with _PILLOW_LIMIT:
        saved = Image.MAX_IMAGE_PIXELS
        try:
            with warnings.catch_warnings():
                # Between Pillow's setting and twice it, Pillow warns instead of raising; our limit
                # already decided that the image is fine to decode.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                Image.MAX_IMAGE_PIXELS = None
                image = Image.open(io.BytesIO(data))
                size = image.size
                _check_limit(*size, max_pixels)
                wanted = draft(image) if draft is not None else None
                if wanted is not None:
                    image.draft(None, wanted)
                # Pillow raises above 2 x its setting; rounding up keeps an image of exactly max_pixels.
                Image.MAX_IMAGE_PIXELS = None if max_pixels is None else (max_pixels + 1) // 2
                image.load()
                loaded = image
        except UnidentifiedImageError:
            raise _not_an_image(data) from None
        except Image.DecompressionBombError as e:
            raise ImageError(f"image too large to decode safely: {e}") from None
        except MemoryError:
            what = f"a {size[0]}x{size[1]} image" if size else "the image"
            raise ImageError(
                f"out of memory decoding {what}; lower --max-image-pixels to refuse such images up front"
            ) from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ImageError(f"corrupt or truncated {_format_name(image, data)} data: {e}") from None
        except ImageError:
            raise
        except Exception as e:  # noqa: BLE001 - a decoder's own bug on hostile bytes is this file's failure
            raise ImageError(
                f"corrupt {_format_name(image, data)} data: Pillow failed with {type(e).__name__}: {e}"
            ) from None
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    if loaded.width < 1 or loaded.height < 1:
        raise ImageError(f"image has no pixels ({loaded.width}x{loaded.height})")
    return loaded


def load_image(
    path: str | os.PathLike[str], max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> Image.Image:
    """Read and decode one image file (refused above `max_pixels`, as in `decode_image`)."""
    return decode_image(read_bytes(os.fspath(path)), max_pixels)
