"""Bad input never costs data: every bad input ends as exactly one error line with a readable reason.

One corpus of broken, hostile and merely unusual inputs goes through the real pipeline (`preprocess`, both
output formats, plain folder and folder + manifest + tar shard). Each bad input must give exactly one
line in `_errors.jsonl` with the expected stage and reason, each good image must be stored, and images in
unusual modes (CMYK, 16-bit, palette with transparency, LA, animated GIF, EXIF-rotated) must be converted,
bit for bit as `Strategy.process(Image.open(path))` does, never refused.

The decompression-bomb guard is tested on a real 40000 x 40000 PNG (1.6 gigapixels if decoded), built in
milliseconds, which must be refused from its header without allocating its pixels.
"""

from __future__ import annotations

import io
import os
import re
import struct
import tarfile
import threading
import time
import tracemalloc
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from e2e_helpers import MakeImage, read_errors, read_manifest, save_image
from PIL import Image

import vlmtile
from vlmtile.decode import DEFAULT_MAX_IMAGE_PIXELS, decode_image, load_image, looks_like_image, read_bytes
from vlmtile.errors import ImageError
from vlmtile.sources import list_inputs

STRATEGY = vlmtile.get_strategy("qwen2-vl")
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# -- building inputs ----------------------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bilevel_png(width: int, height: int) -> bytes:
    """A valid, all-black 1-bit PNG of any size, built without ever holding its raw rows.

    Deflate output after a full flush is byte-aligned and does not refer back to earlier data, so one
    compressed block of 1000 zero rows can be repeated as often as needed; only the Adler-32 of the
    whole raw stream is computed row block by row block. A 40000 x 40000 image is ~200 KB of PNG and
    takes ~0.1 s; decoded, Pillow would allocate 1.6 GB (one byte per pixel in mode "1").
    """
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    block_rows = min(height, 1000)
    block = row * block_rows
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    segment = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    full, rest = divmod(height, block_rows)
    adler = 1
    for _ in range(full):
        adler = zlib.adler32(block, adler)
    adler = zlib.adler32(row * rest, adler)
    # Whatever the compressor emits after a full flush refers to nothing before it: valid after any repeat.
    finish = compressor.compress(row * rest) + compressor.flush()
    stream = b"\x78\xda" + segment * full + finish + struct.pack(">I", adler)
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", stream) + _chunk(b"IEND", b"")


def encoded(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def exif_rotated_jpeg(make_image: MakeImage) -> bytes:
    """A 60x40 JPEG whose EXIF says "rotate 90 degrees clockwise to view" (Orientation 6)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(make_image(60, 40, "RGB", 7), "JPEG", quality=90, exif=exif.tobytes())


JPEG_CUTS = (2, 20, 100, "half", -2)
PNG_CUTS = (4, 20, 40, "half")
"""Cut points of the truncated files: inside the signature, inside the header, in the pixel data, and
(JPEG) just before the end marker. A PNG cut only after its last pixel data decodes completely in Pillow
and in the reference alike, so it is not a bad input and is not in the corpus."""


def _cut(data: bytes, at: int | str) -> bytes:
    if at == "half":
        return data[: len(data) // 2]
    assert isinstance(at, int)
    return data[:at]


ERROR = tuple[str, str]  # (stage, reason regex)


def build_corpus(root: Path, make_image: MakeImage) -> dict[str, Any]:
    """The folder of bad and unusual inputs, a manifest and a tar shard beside it, and what must happen.

    Returns {"folder", "manifest", "tar", "errors": {source: (stage, regex)}, "converted": {source: path},
    "stored": [sources of images stored without a reference check], "manifest_inputs", "tar_inputs"}.
    """
    folder = root / "corpus"
    folder.mkdir()
    errors: dict[str, ERROR] = {}
    converted: dict[str, Path] = {}

    def bad(name: str, data: bytes, stage: str, pattern: str) -> None:
        (folder / name).write_bytes(data)
        errors[str(folder / name)] = (stage, pattern)

    def good(name: str, image: Image.Image, fmt: str, mode: str) -> None:
        save_image(image, folder / name, fmt)
        with Image.open(folder / name) as check:  # the file really is in the mode the case is about
            assert check.mode == mode, (name, check.mode)
        converted[str(folder / name)] = folder / name

    good("good_rgb.png", make_image(40, 30, "RGB", 1), "PNG", "RGB")
    good("cmyk.jpg", make_image(48, 36, "CMYK", 2), "JPEG", "CMYK")
    good("gray16.png", make_image(50, 40, "I;16", 3), "PNG", "I;16")
    good("palette_trns.png", make_image(64, 32, "P+trns", 4), "PNG", "P")
    with Image.open(folder / "palette_trns.png") as palette:
        assert palette.info["transparency"] == 63
    good("gray_alpha.png", make_image(33, 47, "LA", 5), "PNG", "LA")
    frames = [make_image(40, 40, "RGB", seed) for seed in (10, 11, 12)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=40, loop=0)
    with Image.open(folder / "animated.gif") as gif:
        assert gif.n_frames == 3 and gif.mode == "P"
    converted[str(folder / "animated.gif")] = folder / "animated.gif"
    (folder / "exif_rotated.jpg").write_bytes(exif_rotated_jpeg(make_image))
    converted[str(folder / "exif_rotated.jpg")] = folder / "exif_rotated.jpg"

    bad("empty.png", b"", "decode", r"^empty file \(0 bytes\)$")
    jpeg = encoded(make_image(200, 150, "RGB", 20), "JPEG", quality=90)
    png = encoded(make_image(200, 150, "RGB", 21), "PNG")
    header = r"^corrupt or truncated {} file: its header cannot be read \([\d,]+ bytes in all\)$"
    data = r"^corrupt or truncated {} data: .*(truncated|Truncated)"
    for at in JPEG_CUTS:
        pattern = (header if at in (2, 20) else data).format("JPEG")
        bad(f"cut_{at}.jpg", _cut(jpeg, at), "decode", pattern)
    for at in PNG_CUTS:
        pattern = (header if at in (4, 40) else data).format("PNG")
        bad(f"cut_{at}.png", _cut(png, at), "decode", pattern)
    garbage = bytes(np.random.default_rng(0).integers(0, 256, 300, np.uint8))
    garbage = b"\x07\x00" + garbage  # no image signature, and not text
    bad("garbage.jpg", garbage, "decode", r"^not an image: content not recognised by Pillow \(starts with b'")
    bad(
        "notes.png",
        "a caption, not an image — 猫\n".encode() * 5,
        "decode",
        r"^not an image: the file holds text \(starts with b'a captio'\)$",
    )
    (folder / "folder.jpg").mkdir()  # a directory named like an image ...
    save_image(make_image(30, 30, "RGB", 30), folder / "folder.jpg" / "inside.png", "PNG")  # ... holding one
    errors[str(folder / "folder.jpg")] = ("decode", r"^is a directory, not an image file$")
    os.mkfifo(folder / "pipe.png")  # nobody writes to it: reading it naively would hang the run
    errors[str(folder / "pipe.png")] = ("decode", r"^is a FIFO \(named pipe\), not a regular file$")
    os.mkfifo(folder / "pipe_without_suffix")  # not an image by name, and not sniffed: skipped
    (folder / "broken_link.jpg").symlink_to(folder / "gone.jpg")
    errors[str(folder / "broken_link.jpg")] = (
        "decode",
        r"^broken symbolic link: its target .*gone\.jpg does not exist$",
    )
    save_image(make_image(20, 20, "RGB", 31), folder / "locked.png", "PNG")
    os.chmod(folder / "locked.png", 0)
    stored = [str(folder / "folder.jpg" / "inside.png")]
    if IS_ROOT:  # root reads a mode-000 file: it is then a good image (see test_permission_denied)
        stored.append(str(folder / "locked.png"))
    else:
        errors[str(folder / "locked.png")] = ("decode", r"^cannot read file: permission denied$")
    (folder / "bomb_40000x40000.png").write_bytes(bilevel_png(40000, 40000))
    errors[str(folder / "bomb_40000x40000.png")] = (
        "decode",
        r"^image is 40000x40000 = 1600 MP, above the --max-image-pixels limit of 268,435,456 \(268 MP\)",
    )
    save_image(make_image(1000, 1, "RGB", 32), folder / "line_1000x1.png", "PNG")
    errors[str(folder / "line_1000x1.png")] = ("plan", r"^refused by qwen2-vl: .*aspect ratio")

    # A manifest (ms-swift JSONL): a good line, a line that is not JSON, one that is not UTF-8, one whose
    # image is missing. Its sources are "manifest.jsonl:LINE" (line failures) or ":LINE:images" (images).
    manifest = root / "manifest.jsonl"
    manifest.write_bytes(
        b'{"id": "ok", "images": "corpus/good_rgb.png", "caption": "fine"}\n'
        b'{"id": "cut", "images": "corpus/good_rgb.png"\n'
        b'{"id": "latin1", "caption": "caf\xe9"}\n'
        b'{"id": "gone", "images": "corpus/missing.png"}\n'
    )
    errors[f"{manifest}:2"] = ("list", r"^not valid JSON: ")
    errors[f"{manifest}:3"] = ("list", r"^not UTF-8 text: byte 33 of the line$")  # the \xe9
    errors[f"{manifest}:4:images"] = ("decode", r"^file not found")

    # A tar shard: a good sample, a sample whose image is garbage, then a sample ended by a damaged header:
    # it may be incomplete, so it is dropped with the damage, and the rest of the tar cannot be read. The
    # damage is one failure of the tar itself.
    tar_path = root / "shard.tar"
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        members = [
            ("a.png", encoded(make_image(24, 24, "RGB", 40), "PNG")),
            ("a.txt", b"a caption"),
            ("b.jpg", garbage),
            ("c.png", encoded(make_image(24, 24, "RGB", 41), "PNG")),
            ("d.png", encoded(make_image(24, 24, "RGB", 42), "PNG")),
            ("e.png", encoded(make_image(24, 24, "RGB", 43), "PNG")),
        ]
        for name, content in members:
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    raw = bytearray(tar_path.read_bytes())
    d_header = raw.index(b"d.png\x00")
    raw[d_header + 148 : d_header + 156] = b"garbage!"  # the header checksum field
    tar_path.write_bytes(bytes(raw))
    errors[f"{tar_path}:b.jpg"] = ("decode", r"^not an image: content not recognised")
    errors[str(tar_path)] = (
        "read",
        r"^corrupt or truncated tar after member c\.png: invalid member header; sample 'c' may be "
        r"incomplete and was skipped$",
    )

    return {
        "folder": folder,
        "manifest": manifest,
        "tar": tar_path,
        "errors": errors,
        "converted": converted,
        "stored": stored,
        "manifest_inputs": 4,
        "tar_inputs": 3,  # a, b and the damage
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, make_image: MakeImage) -> dict[str, Any]:
    return build_corpus(tmp_path_factory.mktemp("bad"), make_image)


def run(inputs: list[Path], out: Path, fmt: str, strategy: vlmtile.Strategy = STRATEGY) -> vlmtile.RunSummary:
    config = vlmtile.RunConfig(
        inputs=tuple(str(p) for p in inputs),
        output=str(out),
        strategy=strategy,
        format=fmt,
        workers=1,
        progress=False,
    )
    return vlmtile.preprocess(config)


def reference(path: Path, strategy: vlmtile.Strategy = STRATEGY) -> np.ndarray:
    """What the model's own preprocessing gives for the file opened the plain Pillow way, as stored."""
    with Image.open(path) as image:
        return strategy.process(image).pixel_values.astype(np.float16)


# -- the corpus through the pipeline ------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
@pytest.mark.parametrize("with_streams", [False, True], ids=["folder", "folder+manifest+tar"])
def test_every_bad_input_is_one_error_line(
    corpus: dict[str, Any], tmp_path: Path, fmt: str, with_streams: bool
) -> None:
    out = tmp_path / "out"
    folder: Path = corpus["folder"]
    inputs = [folder, corpus["manifest"], corpus["tar"]] if with_streams else [folder]
    expected_errors = {
        source: want
        for source, want in corpus["errors"].items()
        if with_streams or source.startswith(f"{folder}{os.sep}")
    }
    started = time.perf_counter()
    summary = run(inputs, out, fmt)
    assert time.perf_counter() - started < 10

    errors = read_errors(out)
    sources = [e["source"] for e in errors]
    assert len(sources) == len(set(sources)), "an input has more than one error line"
    assert sorted(sources) == sorted(expected_errors), "missing or unexpected error lines"
    for error in errors:
        stage, pattern = expected_errors[error["source"]]
        assert error["stage"] == stage, error
        assert re.search(pattern, error["reason"]), error
        assert "\n" not in error["reason"] and "Traceback" not in error["reason"]
        assert " object at 0x" not in error["reason"], error  # no "<_io.BytesIO object at 0x...>"

    # Every good image is stored, each once, and the converted ones bit for bit as the reference.
    dataset = vlmtile.open_dataset(out, as_stored=True)
    assert dataset.layout == ("sample" if with_streams else "image")
    stored: dict[str, np.ndarray] = {}
    for record in dataset:
        if dataset.layout == "image":
            stored[record["source"]] = record["pixel_values"]
        else:
            for image, pixels in zip(record["images"], record["pixel_values"], strict=True):
                stored[image["source"]] = pixels  # a folder image's source is its sample's
    want_stored = {*corpus["converted"], *corpus["stored"]}
    if with_streams:
        want_stored |= {f"{corpus['manifest']}:1:images", f"{corpus['tar']}:a.png"}
    assert sorted(stored) == sorted(want_stored)
    for source, path in corpus["converted"].items():
        assert stored[source].dtype == np.float16
        assert np.array_equal(stored[source], reference(path)), source
    if with_streams:  # the manifest's good line names the same file
        ok = stored[f"{corpus['manifest']}:1:images"]
        assert np.array_equal(ok, reference(folder / "good_rgb.png"))

    # The EXIF orientation is not applied by default (qwen2-vl's processor given a PIL image does not).
    exif = next(r for r in vlmtile.open_dataset(out) if r["source"].endswith("exif_rotated.jpg"))
    meta = exif if dataset.layout == "image" else exif["images"][0]
    assert (meta["orig_width"], meta["orig_height"]) == (60, 40)

    # Accounting: every input once, as a record or as a failure.
    totals = read_manifest(out)["totals"]
    folder_inputs = (
        len(corpus["converted"])
        + len(corpus["stored"])
        + sum(1 for s in corpus["errors"] if s.startswith(f"{folder}{os.sep}"))
    )
    inputs_count = folder_inputs + (corpus["manifest_inputs"] + corpus["tar_inputs"] if with_streams else 0)
    records = len(corpus["converted"]) + len(corpus["stored"]) + (2 if with_streams else 0)  # line 1, a
    assert totals["inputs"] == inputs_count
    assert (totals["records"], totals["failures"]) == (records, len(expected_errors))
    assert totals["records"] + totals["failures"] == totals["inputs"]
    assert (summary.records, summary.failures, summary.inputs) == (
        records,
        len(expected_errors),
        inputs_count,
    )


def test_exif_rotation_is_applied_only_with_exif_transpose(corpus: dict[str, Any], tmp_path: Path) -> None:
    path = corpus["folder"] / "exif_rotated.jpg"
    strategy = vlmtile.get_strategy("qwen2-vl", exif_transpose=True)
    run([path], tmp_path / "out", "parquet", strategy)
    (record,) = vlmtile.open_dataset(tmp_path / "out", as_stored=True)
    assert (record["orig_width"], record["orig_height"]) == (40, 60)  # upright
    assert np.array_equal(record["pixel_values"], reference(path, strategy))


# -- the decompression-bomb guard ---------------------------------------------------------------------


def test_bilevel_png_is_a_real_image() -> None:
    """The bomb builder makes valid PNGs (checked on a size small enough to decode)."""
    for width, height in ((9, 1), (1001, 2003), (64, 3000)):
        with Image.open(io.BytesIO(bilevel_png(width, height))) as image:
            image.load()
            assert (image.size, image.mode) == ((width, height), "1")
            assert not np.asarray(image).any()


def test_bomb_is_refused_from_its_header_in_milliseconds(tmp_path: Path) -> None:
    bomb = bilevel_png(40000, 40000)
    assert len(bomb) < 300_000
    (tmp_path / "bomb.png").write_bytes(bomb)
    for decode in (lambda: decode_image(bomb), lambda: load_image(tmp_path / "bomb.png")):
        tracemalloc.start()
        started = time.perf_counter()
        try:
            with pytest.raises(ImageError) as info:
                decode()
            elapsed = time.perf_counter() - started
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert elapsed < 1.0
        assert peak < 5_000_000  # the file is 0.2 MB; its pixels would be 1.6 GB
        assert str(info.value) == (
            "image is 40000x40000 = 1600 MP, above the --max-image-pixels limit of 268,435,456 (268 MP): "
            "refused without decoding it (decompression-bomb guard)"
        )


def test_limit_is_per_call_and_exact() -> None:
    png = bilevel_png(100, 100)
    assert decode_image(png, max_pixels=10_000).size == (100, 100)
    with pytest.raises(ImageError, match=r"^image is 100x100 = 0\.01 MP, above .* limit of 9,999 "):
        decode_image(png, max_pixels=9_999)
    assert decode_image(bilevel_png(40000, 1), max_pixels=None).size == (40000, 1)
    with pytest.raises(ValueError, match="at least 1 or None"):
        decode_image(png, max_pixels=0)


def test_pillow_global_limit_neither_refuses_first_nor_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow's own bomb check (a module global) must not refuse an image under our limit, nor warn
    (pytest turns warnings into errors here), and the global is left as the caller set it."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow's hard error would be at 2000 pixels
    png = bilevel_png(100, 100)
    assert decode_image(png).size == (100, 100)
    with pytest.raises(ImageError, match=r"^image is 100x100"):
        decode_image(png, max_pixels=5000)
    assert Image.MAX_IMAGE_PIXELS == 1000
    with pytest.raises(Image.DecompressionBombError):  # the caller's own Pillow use keeps its setting
        Image.open(io.BytesIO(png))


def test_image_over_pillow_default_limit_decodes() -> None:
    """182 MP (13500 x 13500, Pillow's default refuses above 179 MP) is under our default: it decodes.

    Mode "1" keeps it cheap: 182 MB in memory, ~0.2 s."""
    pixels = 13500 * 13500
    assert Image.MAX_IMAGE_PIXELS is not None and pixels > 2 * Image.MAX_IMAGE_PIXELS
    assert pixels < DEFAULT_MAX_IMAGE_PIXELS
    image = decode_image(bilevel_png(13500, 13500))
    assert (image.size, image.mode) == ((13500, 13500), "1")
    del image


def test_decoding_from_threads_keeps_the_global(monkeypatch: pytest.MonkeyPatch) -> None:
    """Threads decoding with different limits: each gets its own limit, and Pillow's global survives."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 12345)
    png = bilevel_png(300, 300)
    outcomes: list[bool] = []

    def work(limit: int) -> None:
        for _ in range(20):
            try:
                decode_image(png, max_pixels=limit)
                outcomes.append(limit >= 90_000)
            except ImageError:
                outcomes.append(limit < 90_000)

    threads = [threading.Thread(target=work, args=(limit,)) for limit in (1_000, 90_000, 10**9, 50_000)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(outcomes) == 80 and all(outcomes)
    assert Image.MAX_IMAGE_PIXELS == 12345


# -- reading files that are not regular files --------------------------------------------------------


def test_permission_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file the worker may not read. Root reads a mode-000 file, so then the denial is simulated."""
    path = tmp_path / "locked.png"
    path.write_bytes(encoded(Image.new("RGB", (4, 4)), "PNG"))
    path.chmod(0)
    if IS_ROOT:
        real_open = os.open

        def denying_open(file: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            if os.fspath(file) == str(path):
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(file, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", denying_open)
    with pytest.raises(ImageError, match=r"^cannot read file: permission denied$"):
        read_bytes(str(path))
    assert not looks_like_image(str(path))


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    started = time.perf_counter()
    with pytest.raises(ImageError, match=r"^is a FIFO \(named pipe\), not a regular file$"):
        read_bytes(str(fifo))
    assert not looks_like_image(str(fifo))  # listing a folder with a FIFO in it does not hang either
    assert list_inputs([tmp_path]) == []
    assert time.perf_counter() - started < 1.0


def test_directory_named_like_an_image_is_listed_and_walked(tmp_path: Path) -> None:
    (tmp_path / "d.png").mkdir()
    (tmp_path / "d.png" / "a.png").write_bytes(encoded(Image.new("RGB", (4, 4)), "PNG"))
    (tmp_path / "plain_dir").mkdir()
    items = list_inputs([tmp_path])
    assert [(i.source, i.key) for i in items] == [
        (str(tmp_path / "d.png"), "d_png"),
        (str(tmp_path / "d.png" / "a.png"), "d_png_a_png"),
    ]
    with pytest.raises(ImageError, match=r"^is a directory, not an image file$"):
        read_bytes(str(tmp_path / "d.png"))
    # Given as an argument, a directory is a folder to walk, whatever its name.
    assert [i.source for i in list_inputs([tmp_path / "d.png"])] == [str(tmp_path / "d.png" / "a.png")]


def test_broken_symlink_and_symlink_loop(tmp_path: Path) -> None:
    (tmp_path / "dangling.jpg").symlink_to("nowhere.jpg")
    with pytest.raises(ImageError, match=r"^broken symbolic link: its target nowhere\.jpg does not exist$"):
        read_bytes(str(tmp_path / "dangling.jpg"))
    (tmp_path / "loop.jpg").symlink_to("loop.jpg")
    with pytest.raises(ImageError, match=r"^cannot read file: Too many levels of symbolic links$"):
        read_bytes(str(tmp_path / "loop.jpg"))


def test_manifest_with_byte_order_mark(tmp_path: Path) -> None:
    """A JSONL written by a Windows editor starts with a BOM; its first line is still a sample."""
    (tmp_path / "a.png").write_bytes(encoded(Image.new("RGB", (30, 30), (10, 20, 30)), "PNG"))
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(b'\xef\xbb\xbf{"id": "first", "images": "a.png"}\n{"id": "second"}\n')
    summary = run([manifest], tmp_path / "out", "parquet")
    assert (summary.inputs, summary.records, summary.failures) == (2, 2, 0)
