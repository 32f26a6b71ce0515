"""Finding inputs (`list_inputs`, keys) and decoding them (`load_image` / `decode_image` reasons)."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np
import pytest
from e2e_helpers import MakeImage, save_image
from PIL import Image

import vlmtile
from vlmtile.decode import decode_image, load_image, looks_like_image
from vlmtile.errors import ImageError, VlmtileError
from vlmtile.sources import list_inputs, make_key
from vlmtile.work import Failure, Record, process_input

KEY_RE = re.compile(r"[\w-]+")  # letters (any script), digits, _ and -; never a dot


def png(root: Path, rel: str, make_image: MakeImage, seed: int = 0) -> Path:
    path = root / rel
    save_image(make_image(16, 12, "RGB", seed), path, "PNG")
    return path


# -- list_inputs --------------------------------------------------------------------------------------


def test_walk_is_sorted_skips_hidden_and_sniffs_content(tmp_path: Path, make_image: MakeImage) -> None:
    root = tmp_path / "in"
    for seed, rel in enumerate(["b.png", "a/z.jpg", "a/b/c.webp", "A.PNG", "m/n/o/p.gif"]):
        png(root, rel, make_image, seed)  # PNG bytes whatever the suffix
    png(root, "no_suffix", make_image, 10)
    png(root, "image.bin", make_image, 11)
    png(root, ".hidden.png", make_image, 12)
    png(root, ".git/objects/x.png", make_image, 13)
    png(root, "a/.thumbs/t.png", make_image, 14)
    (root / "readme.txt").write_text("text\n")
    (root / "data.json").write_text("{}\n")
    (root / "a" / "empty.bin").write_bytes(b"")

    items = list_inputs([root])
    sources = [item.source for item in items]
    assert sources == sorted(sources)
    assert [os.path.relpath(s, root) for s in sources] == [
        "A.PNG",
        "a/b/c.webp",
        "a/z.jpg",
        "b.png",
        "image.bin",
        "m/n/o/p.gif",
        "no_suffix",
    ]
    assert [item.key for item in items] == [
        "A_PNG",
        "a_b_c_webp",
        "a_z_jpg",
        "b_png",
        "image_bin",
        "m_n_o_p_gif",
        "no_suffix",
    ]
    assert list_inputs([root]) == items  # same listing every time


def test_image_suffix_is_taken_without_sniffing(tmp_path: Path) -> None:
    """A file with an image suffix is an input even if its content is not (it then fails loudly)."""
    (tmp_path / "fake.jpg").write_text("not a jpeg\n")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "fake.txt").write_text("not a jpeg\n")
    assert [i.key for i in list_inputs([tmp_path])] == ["empty_png", "fake_jpg"]


@pytest.mark.parametrize(
    ("relpath", "key"),
    [
        ("a/b.c.jpg", "a_b_c_jpg"),
        ("photos/cat.jpg", "photos_cat_jpg"),
        ("with space/and (parens).png", "with_space_and_parens_png"),
        ("café/naïve.jpg", "café_naïve_jpg"),
        ("..weird..name..png", "weird_name_png"),
        ("dash-ok_under-ok.jpg", "dash-ok_under-ok_jpg"),
        ("猫.jpg", "猫_jpg"),
        ("caf\udce9.png", "caf_xe9_png"),  # an undecodable byte, shown as \\xe9
        ("...", "image"),
    ],
)
def test_make_key_is_webdataset_safe(relpath: str, key: str) -> None:
    assert make_key(relpath) == key
    assert KEY_RE.fullmatch(make_key(relpath))


def test_colliding_keys_get_distinct_deterministic_suffixes(tmp_path: Path, make_image: MakeImage) -> None:
    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    png(d1, "x.jpg", make_image, 1)
    png(d2, "x.jpg", make_image, 2)
    png(d1, "a_b.jpg", make_image, 3)
    png(d1, "a/b.jpg", make_image, 4)
    png(d1, "unique.png", make_image, 5)

    items = list_inputs([d1, d2])
    keys = {os.path.relpath(i.source, tmp_path): i.key for i in items}
    assert len(set(keys.values())) == len(keys) == 5
    assert keys["d1/unique.png"] == "unique_png"  # only colliding keys get a suffix
    for rel in ("d1/x.jpg", "d2/x.jpg"):
        assert re.fullmatch(r"x_jpg-[0-9a-f]{8}", keys[rel]), keys
    for rel in ("d1/a_b.jpg", "d1/a/b.jpg"):
        assert re.fullmatch(r"a_b_jpg-[0-9a-f]{8}", keys[rel]), keys
    assert all(KEY_RE.fullmatch(k) for k in keys.values())
    assert list_inputs([d1, d2]) == items
    assert list_inputs([d2, d1]) == items  # argument order does not matter here


def test_same_file_counted_once(tmp_path: Path, make_image: MakeImage) -> None:
    root = tmp_path / "in"
    a = png(root, "a.png", make_image, 1)
    png(root, "sub/b.png", make_image, 2)
    os.symlink(a, root / "link_to_a.png")
    assert len(list_inputs([a, a])) == 1
    assert len(list_inputs([root, root])) == 2  # the symlink is the same file as a.png
    assert len(list_inputs([root, root / "sub", root / "sub" / "b.png"])) == 2
    assert len(list_inputs([a, root])) == 2


def test_missing_input_raises(tmp_path: Path, make_image: MakeImage) -> None:
    png(tmp_path, "ok.png", make_image)
    with pytest.raises(VlmtileError, match=r"input not found: .*missing\.png"):
        list_inputs([tmp_path / "ok.png", tmp_path / "missing.png"])


def test_explicit_file_keeps_given_path_and_basename_key(tmp_path: Path, make_image: MakeImage) -> None:
    path = png(tmp_path, "deep/er/photo.png", make_image)
    (item,) = list_inputs([path])
    assert item.source == str(path)
    assert item.key == "photo_png"
    (text,) = list_inputs([tmp_path / "deep"])  # folders: key from the path below the folder
    assert text.key == "er_photo_png"


def test_keys_do_not_depend_on_argument_order(tmp_path: Path, make_image: MakeImage) -> None:
    root = tmp_path / "in"
    b = png(root, "sub/b.png", make_image)
    png(root, "a.png", make_image, 1)
    assert list_inputs([b, root]) == list_inputs([root, b])


def test_hashed_key_cannot_collide_with_a_natural_key(tmp_path: Path, make_image: MakeImage) -> None:
    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    png(d1, "x.jpg", make_image, 1)
    png(d2, "x.jpg", make_image, 2)
    hashed = {i.source: i.key for i in list_inputs([d1, d2])}[str(d1 / "x.jpg")]
    png(d2, hashed, make_image, 3)  # a PNG without suffix whose name is that key
    keys = [i.key for i in list_inputs([d1, d2])]
    assert len(keys) == 3
    assert len(set(keys)) == 3, keys


# -- decoding -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def reason(data: bytes) -> str:
    with pytest.raises(ImageError) as info:
        decode_image(data)
    return str(info.value)


def test_decode_reasons_are_distinct_and_readable(jpeg_bytes: bytes) -> None:
    empty = reason(b"")
    garbage = reason(np.random.default_rng(1).integers(0, 256, 200, np.uint8).tobytes())
    text = reason(b"hello, this is text\n" * 10)
    truncated = reason(jpeg_bytes[: len(jpeg_bytes) // 2])
    assert "empty" in empty
    assert "not an image" in garbage and "not an image" in text
    assert "truncated" in truncated
    assert len({empty, garbage, truncated}) == 3
    assert "empty" not in garbage + truncated and "truncated" not in empty + garbage
    for message in (empty, garbage, text, truncated):
        assert "\n" not in message and "Traceback" not in message
    assert "b'hello, t'" in text  # says what the file starts with


def test_decode_valid_image_fully_loaded(jpeg_bytes: bytes) -> None:
    image = decode_image(jpeg_bytes)
    assert image.size == (96, 64)
    assert image.mode == "RGB"
    assert np.asarray(image).shape == (64, 96, 3)


def test_load_image_os_errors(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="file not found"):
        load_image(tmp_path / "gone.png")
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)


def test_looks_like_image(tmp_path: Path, make_image: MakeImage) -> None:
    image = make_image(16, 16, "RGB", 0)
    for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM"):
        path = tmp_path / f"{fmt.lower()}_no_suffix"
        image.save(path, fmt)
        assert looks_like_image(str(path)), fmt
    (tmp_path / "text").write_text("hello world, not an image\n")
    (tmp_path / "empty").write_bytes(b"")
    assert not looks_like_image(str(tmp_path / "text"))
    assert not looks_like_image(str(tmp_path / "empty"))
    assert not looks_like_image(str(tmp_path / "missing"))


@pytest.mark.parametrize(
    ("name", "data_kind", "stage", "pattern"),
    [
        ("empty.png", "empty", "decode", "empty"),
        ("garbage.jpg", "garbage", "decode", "not an image"),
        ("truncated.jpg", "truncated", "decode", "truncated"),
        ("text.png", "text", "decode", "not an image"),
        ("line.png", "line", "plan", "refused by qwen2-vl: .*aspect ratio"),
    ],
)
def test_process_input_failures(
    tmp_path: Path,
    jpeg_bytes: bytes,
    make_image: MakeImage,
    name: str,
    data_kind: str,
    stage: str,
    pattern: str,
) -> None:
    path = tmp_path / name
    if data_kind == "line":
        save_image(make_image(1000, 1, "RGB", 0), path, "PNG")
    else:
        path.write_bytes(
            {
                "empty": b"",
                "garbage": bytes(range(256)),
                "truncated": jpeg_bytes[: len(jpeg_bytes) // 2],
                "text": b"plain text\n" * 8,
            }[data_kind]
        )
    (item,) = list_inputs([path])
    out = process_input(item, vlmtile.get_strategy("qwen2-vl"), "float16")
    assert isinstance(out, Failure)
    assert (out.source, out.key, out.stage) == (str(path), item.key, stage)
    assert re.search(pattern, out.reason), out.reason


def test_process_input_every_mode(tmp_path: Path, make_image: MakeImage) -> None:
    """Every mode the shared fixture builds survives the whole per-image path in every storage dtype."""
    strategy = vlmtile.get_strategy("internvl", max_tiles=2)
    for seed, mode in enumerate(("RGB", "L", "RGBA", "P", "P+trns", "CMYK", "LA", "1", "I;16")):
        image = make_image(40, 24, mode, seed)
        fmt = "JPEG" if mode == "CMYK" else "PNG"
        path = tmp_path / f"m{seed}.{fmt.lower()}"
        save_image(image, path, fmt)
        (item,) = list_inputs([path])
        with Image.open(path) as opened:
            want = strategy.process(opened).pixel_values
        for dtype in ("float32", "uint8"):
            out = process_input(item, strategy, dtype)
            assert isinstance(out, Record), (mode, out)
            pixels = out.pixels if dtype == "float32" else strategy.normalize(out.pixels)
            assert np.array_equal(pixels, want), (mode, dtype)
