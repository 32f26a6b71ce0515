"""`vlmtile stats`: header-only token accounting that agrees with `plan()` and with `preprocess`.

Every registered strategy is checked (whatever `vlmtile.list_strategies()` holds when the tests run):
the totals, per-image lengths, tile counts, byte estimates and failures that `stats` reports from image
headers are compared with the plan of the decoded image and with what `preprocess` really wrote. Output
directories are read back with pyarrow / tarfile alone. Header-only reading is proven twice: with Pillow's
pixel loading patched to raise, and with JPEGs whose headers are fine but whose pixel data is not.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result
from conftest import SAMPLE_DIR
from e2e_helpers import GOOD_IMAGES, MakeImage, make_tree, read_errors, read_manifest, save_image
from PIL import Image, ImageFile, PngImagePlugin

import vlmtile
from vlmtile import stats as stats_module
from vlmtile.cli import cli
from vlmtile.decode import load_image
from vlmtile.errors import ImageError
from vlmtile.sources import list_inputs
from vlmtile.stats import Column, compute_stats, format_table, stats_from_output
from vlmtile.strategies import get_strategy
from vlmtile.strategies.base import tunable_fields

STRATEGIES = vlmtile.list_strategies()
EXIF_SAMPLE = SAMPLE_DIR / "grace_hopper_exif_orientation6.jpg"  # stored 600x512, EXIF orientation 6
DOC = Path(__file__).resolve().parent.parent / "docs" / "stats.md"
DTYPE_ITEMSIZE = {"uint8": 1, "float16": 2, "bfloat16": 2, "float32": 4}

TOP_LEVEL_KEYS = {"schema_version", "inputs", "from_output_metadata", "budget", "pack_len", "strategies"}
STRATEGY_KEYS = {
    "label",
    "strategy",
    "params",
    "images",
    "failures",
    "failure_reasons",
    "total_tokens",
    "mean_tokens",
    "p50_tokens",
    "p90_tokens",
    "p99_tokens",
    "max_tokens",
    "tiles_histogram",
    "bytes",
    "budget",
    "over_budget",
    "pack",
}
LENGTH_KEYS = {"source", "key", "width", "height", "orientation", "num_tokens"}
LENGTH_ERROR_KEYS = {"source", "key", "error"}

# Qwen's smart_resize refuses an aspect ratio above 200 (the reference raises); 402x2 is 201.
THIN = (402, 2)
NOT_AN_IMAGE = "bad/not_an_image.jpg"


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def run_json(*args: str) -> dict[str, Any]:
    result = run("stats", *args, "--json", "--workers", "1")
    assert result.exit_code == 0, result.output
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def read_lengths(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def decoded_plan(strategy: vlmtile.Strategy, path: str | Path) -> vlmtile.Plan | None:
    """The plan `preprocess` makes for a file: decode, prepare (EXIF, RGB), plan; None if it fails."""
    try:
        return strategy.plan(*strategy.prepare(load_image(path)).size)
    except (ImageError, ValueError):
        return None


def records(out: Path) -> list[dict[str, Any]]:
    """Metadata of every record in an output directory (Parquet or WebDataset), without vlmtile."""
    manifest = read_manifest(out)
    rows: list[dict[str, Any]] = []
    for shard in manifest["shards"]:
        path = out / shard["name"]
        if manifest["format"] == "parquet":
            table = pq.read_table(path)
            lengths = pc.binary_length(table["pixel_values"]).to_pylist()
            for row, nbytes in zip(table.drop(["pixel_values"]).to_pylist(), lengths, strict=True):
                rows.append({**row, "pixel_bytes": nbytes})
        else:
            with tarfile.open(path) as tar:
                for member in tar:
                    if member.name.endswith(".json"):
                        data = tar.extractfile(member)
                        assert data is not None
                        rows.append(json.loads(data.read()))
    return rows


def summary_of(result: stats_module.StatsResult, index: int = 0) -> dict[str, Any]:
    column: dict[str, Any] = result.to_json()["strategies"][index]
    return column


# ---------------------------------------------------------------------------------------------------------
# Inputs and preprocess outputs shared by the module
# ---------------------------------------------------------------------------------------------------------


def jpeg_bytes(width: int, height: int, seed: int = 0, **save: Any) -> bytes:
    image = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


def header_only_jpeg(width: int, height: int, tail: bytes = b"") -> bytes:
    """A JPEG cut right after its SOS segment header (plus `tail`): the header is intact, the scan is not."""
    data = jpeg_bytes(width, height)
    sos = data.index(b"\xff\xda")
    end = sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")
    return data[:end] + tail


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, make_image: MakeImage) -> Path:
    """GOOD_IMAGES (8 files in 6 modes and 4 formats, skipped files beside them) plus the awkward ones:
    an EXIF-rotated photo, a 1x1 pixel, a 402x2 strip Qwen refuses and a text file named .jpg."""
    root = tmp_path_factory.mktemp("stats_inputs")
    make_tree(root, make_image)
    (root / "exif").mkdir()
    shutil.copy(EXIF_SAMPLE, root / "exif" / EXIF_SAMPLE.name)
    save_image(make_image(1, 1, "RGB", 7), root / "one_pixel.png", "PNG")
    save_image(make_image(*THIN, "RGB", 8), root / "thin_402x2.png", "PNG")
    (root / NOT_AN_IMAGE).parent.mkdir()
    (root / NOT_AN_IMAGE).write_text("this is not an image\n")
    return root


@pytest.fixture(scope="module")
def outputs(inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`preprocess` of `inputs` (uint8) with every registered strategy (presets' defaults), on first use."""

    class Outputs(dict[str, Path]):
        def __missing__(self, name: str) -> Path:
            out = tmp_path_factory.mktemp(f"out_{name}")
            config = vlmtile.RunConfig(
                inputs=(str(inputs),),
                output=str(out),
                strategy=get_strategy(name),
                dtype="uint8",  # the cheapest to write; `bytes` is checked against its real size
                workers=1,
                shard_size=5,
                overwrite=True,
                progress=False,
            )
            vlmtile.preprocess(config)
            self[name] = out
            return out

    return Outputs()


# ---------------------------------------------------------------------------------------------------------
# stats == sum of plan().num_tokens == sum of what preprocess wrote, for every strategy
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", STRATEGIES)
def test_totals_equal_plans_and_preprocess_output(name: str, inputs: Path, outputs: dict[str, Path]) -> None:
    strategy = get_strategy(name)
    result = compute_stats([str(inputs)], [Column(name, strategy)], workers=1, emit_lengths=True)
    summary = summary_of(result)
    items = list_inputs([str(inputs)])

    # 1. The plan of every decoded image (what preprocess plans), summed.
    plans = {item.key: decoded_plan(strategy, item.source) for item in items}
    planned = [p for p in plans.values() if p is not None]
    assert summary["total_tokens"] == sum(p.num_tokens for p in planned)
    assert summary["images"] == len(planned)
    assert summary["failures"] == len(items) - len(planned)

    # 2. What preprocess wrote: the same per-image tokens, tiles and pixel bytes; the same failures.
    out = outputs[name]
    rows = records(out)
    assert (
        summary["total_tokens"]
        == sum(r["num_tokens"] for r in rows)
        == read_manifest(out)["totals"]["tokens"]
    )
    assert summary["images"] == len(rows)
    assert summary["failures"] == len(read_errors(out))
    assert summary["tiles_histogram"] == {
        str(k): v for k, v in sorted(Counter(r["num_tiles"] for r in rows).items())
    }
    elements = sum(int(np.prod(r["shape"])) for r in rows)
    assert summary["bytes"] == {d: elements * size for d, size in DTYPE_ITEMSIZE.items()}
    assert summary["bytes"]["uint8"] == sum(r["pixel_bytes"] for r in rows)  # the bytes really written

    tokens = sorted(r["num_tokens"] for r in rows)
    assert summary["max_tokens"] == tokens[-1]
    assert summary["mean_tokens"] == pytest.approx(sum(tokens) / len(tokens))
    for q in (50, 90, 99):  # nearest rank: a count some image really has
        assert summary[f"p{q}_tokens"] == tokens[max(0, -(-q * len(tokens) // 100) - 1)]

    # 3. Per image: the lengths line of every input joins the record (or the error) of the same key.
    by_key = {r["key"]: r for r in rows}
    failed = {e["key"] for e in read_errors(out)}
    assert [line["key"] for line in result.lengths] == [item.key for item in items]
    for line in result.lengths:
        if line["key"] in by_key:
            assert line["num_tokens"] == {name: by_key[line["key"]]["num_tokens"]}
        else:
            assert line["key"] in failed
            assert "error" in line or line["num_tokens"] == {name: None}


@pytest.mark.parametrize("name", STRATEGIES)
def test_stats_of_output_dir_equals_headers_mode(name: str, inputs: Path, outputs: dict[str, Path]) -> None:
    headers = run_json(str(inputs), "-s", name, "--budget", "1000")
    stored = run_json(str(outputs[name]), "--budget", "1000")
    assert stored["from_output_metadata"] is True and headers["from_output_metadata"] is False
    assert stored["inputs"] == [str(outputs[name])]
    (h,), (s,) = headers["strategies"], stored["strategies"]
    assert set(s) == set(h) == STRATEGY_KEYS
    # The corrupt / refused inputs fail at different stages (header vs decode vs plan), so the reason text
    # differs; their number does not.
    for key in STRATEGY_KEYS - {"failure_reasons"}:
        assert s[key] == h[key], key
    assert sum(s["failure_reasons"].values()) == sum(h["failure_reasons"].values())


def test_output_dir_label_names_non_default_params(tmp_path: Path) -> None:
    """The column label (and so the --emit-lengths key) is the same in both modes."""
    out = tmp_path / "out"
    photo = str(SAMPLE_DIR / "coffee_600x400.jpg")
    strategy = get_strategy("internvl", max_tiles=6)
    vlmtile.preprocess(
        vlmtile.RunConfig((photo,), str(out), strategy, dtype="uint8", workers=1, progress=False)
    )
    headers = run_json(photo, "-s", "internvl:max_tiles=6")
    stored = run_json(str(out))
    assert stored["strategies"][0]["total_tokens"] == headers["strategies"][0]["total_tokens"]
    assert stored["strategies"][0]["label"] == headers["strategies"][0]["label"] == "internvl[max_tiles=6]"


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
@pytest.mark.parametrize("name", ["internvl", "qwen2-vl"])
def test_output_dir_of_samples_counts_every_image(fmt: str, name: str, tmp_path: Path) -> None:
    """A sample-layout output (a manifest with a two-image line) reports the same images and tokens as the
    headers of its inputs; in tars the sample's own KEY.json (the manifest line) is not metadata."""
    manifest = tmp_path / "m.jsonl"
    two = [str(SAMPLE_DIR / "coffee_600x400.jpg"), str(SAMPLE_DIR / "tiny_16x12.png")]
    lines = [{"images": two, "text": "a"}, {"image": str(SAMPLE_DIR / "astronaut_448x448.jpg")}]
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    config = vlmtile.RunConfig(
        (str(manifest),), str(out), get_strategy(name), format=fmt, workers=1, progress=False
    )
    vlmtile.preprocess(config)
    assert json.loads((out / "_manifest.json").read_text())["layout"] == "sample"
    stored = run_json(str(out), "--pack-len", "16384" if name == "qwen2-vl" else "4096")
    headers = run_json(str(manifest), "-s", name)
    (s,), (h,) = stored["strategies"], headers["strategies"]
    assert s["images"] == h["images"] == 3
    assert s["total_tokens"] == h["total_tokens"]
    expected = sum(get_strategy(name).plan(*load_image(p).size).num_tokens for p in [*two, lines[1]["image"]])
    assert s["total_tokens"] == expected


def _corrupt_parquet_pixels(path: Path) -> None:
    """Overwrite every `pixel_values` column chunk of a Parquet file with junk; other columns stay valid."""
    metadata = pq.ParquetFile(path).metadata
    spans = []
    for g in range(metadata.num_row_groups):
        group = metadata.row_group(g)
        for c in range(group.num_columns):
            column = group.column(c)
            if column.path_in_schema == "pixel_values":
                start = column.dictionary_page_offset or column.data_page_offset
                spans.append((start, column.total_compressed_size))
    assert spans
    with open(path, "r+b") as f:
        for start, size in spans:
            f.seek(start)
            f.write(b"\xa5" * size)


def _corrupt_tar_pixels(path: Path) -> None:
    """Overwrite every `.npy` member's data in a WebDataset tar with junk; the JSON members stay valid."""
    with tarfile.open(path) as tar:
        spans = [(m.offset_data, m.size) for m in tar.getmembers() if m.name.endswith(".npy")]
    assert spans
    with open(path, "r+b") as f:
        for start, size in spans:
            f.seek(start)
            f.write(b"\xa5" * size)


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_output_dir_never_reads_pixel_arrays(fmt: str, inputs: Path, tmp_path: Path) -> None:
    """With every stored pixel array destroyed, `stats OUT_DIR` still gives the same report."""
    out = tmp_path / "out"
    strategy = get_strategy("qwen2-vl", max_pixels=128 * 28 * 28)
    vlmtile.preprocess(
        vlmtile.RunConfig(
            (str(inputs),), str(out), strategy, format=fmt, shard_size=4, workers=1, progress=False
        )
    )
    before = run_json(str(out), "--budget", "50")
    lengths_before = tmp_path / "before.jsonl"
    assert run("stats", out, "--emit-lengths", lengths_before).exit_code == 0
    for shard in read_manifest(out)["shards"]:
        path = out / shard["name"]
        if fmt == "parquet":
            _corrupt_parquet_pixels(path)
            with pytest.raises(Exception):  # noqa: B017 - any pyarrow error: the pixels are unreadable
                pq.read_table(path)
        else:
            _corrupt_tar_pixels(path)
            with tarfile.open(path) as tar:
                npy = next(m for m in tar.getmembers() if m.name.endswith(".npy"))
                data = tar.extractfile(npy)
                assert data is not None
                with pytest.raises(ValueError):
                    np.load(io.BytesIO(data.read()), allow_pickle=False)
    assert run_json(str(out), "--budget", "50") == before
    lengths_after = tmp_path / "after.jsonl"
    assert run("stats", out, "--emit-lengths", lengths_after).exit_code == 0
    assert read_lengths(lengths_after) == read_lengths(lengths_before)
    column = before["strategies"][0]
    assert column["images"] > 0 and column["failures"] == 2  # not an image; 402x2 refused by Qwen
    assert column["images"] + column["failures"] == len(read_lengths(lengths_before))


@pytest.mark.parametrize("name", ["internvl", "qwen2-vl"])
def test_output_dir_lengths_match_headers_mode_lines(
    name: str, inputs: Path, outputs: dict[str, Path], tmp_path: Path
) -> None:
    """One line per input in both modes, same keys and token counts; the output directory does not store
    the EXIF orientation (null), and an image the strategy refused is an `error` line there."""
    assert run("stats", inputs, "-s", name, "--emit-lengths", tmp_path / "h.jsonl").exit_code == 0
    assert run("stats", outputs[name], "--emit-lengths", tmp_path / "o.jsonl").exit_code == 0
    headers = read_lengths(tmp_path / "h.jsonl")
    stored = read_lengths(tmp_path / "o.jsonl")
    assert [line["key"] for line in stored] == [line["key"] for line in headers]
    assert [line["source"] for line in stored] == [line["source"] for line in headers]
    errors = {e["key"]: e for e in read_errors(outputs[name])}
    for h, o in zip(headers, stored, strict=True):
        if o["key"] in errors:
            assert set(o) == LENGTH_ERROR_KEYS and o["error"] == errors[o["key"]]["reason"]
            assert "error" in h or h["num_tokens"] == {name: None}
            continue
        assert set(o) == set(h) == LENGTH_KEYS
        assert o["num_tokens"] == h["num_tokens"]
        assert o["orientation"] is None and type(h["orientation"]) is int
        assert (o["width"], o["height"]) == (h["width"], h["height"])  # no exif_transpose: stored size


# ---------------------------------------------------------------------------------------------------------
# Only headers are read
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "transpose",
    [
        False,
        True,
    ],
    ids=["presets", "exif_transpose"],
)
def test_no_pixel_is_decoded(transpose: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow's pixel loading raises for the whole run: stats still counts every sample image."""
    columns = [Column(name, get_strategy(name, exif_transpose=transpose)) for name in STRATEGIES]
    expected = compute_stats([str(SAMPLE_DIR)], columns, workers=1)

    def no_decoding(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("stats decoded pixels")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    monkeypatch.setattr(Image.Image, "load", no_decoding)
    result = compute_stats([str(SAMPLE_DIR)], columns, workers=1)
    count = len(list_inputs([str(SAMPLE_DIR)]))
    for i, _ in enumerate(columns):
        assert summary_of(result, i) == summary_of(expected, i)
        assert summary_of(result, i)["images"] + summary_of(result, i)["failures"] == count
        assert summary_of(result, i)["failures"] == 0


# libjpeg decodes some random scans without complaint; this seeded one it rejects (checked in the test).
GARBAGE = np.random.default_rng(0).integers(0, 256, 2048, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("tail", [b"", b"\x00" * 64, GARBAGE], ids=["cut-after-sos", "zeros", "garbage"])
def test_header_only_jpeg_counts_in_stats_and_fails_in_preprocess(tail: bytes, tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    (src / "broken_64x48.jpg").write_bytes(header_only_jpeg(64, 48, tail))
    with pytest.raises(ImageError):  # the pixel data really is unreadable
        load_image(src / "broken_64x48.jpg")
    for name in STRATEGIES:
        strategy = get_strategy(name)
        lengths = tmp_path / f"{name}.jsonl"
        data = run_json(str(src), "-s", name, "--emit-lengths", str(lengths))
        column = data["strategies"][0]
        assert (column["images"], column["failures"]) == (1, 0)
        assert column["total_tokens"] == strategy.plan(64, 48).num_tokens
        (line,) = read_lengths(lengths)
        assert (line["width"], line["height"]) == (64, 48)
        assert line["num_tokens"] == {name: strategy.plan(64, 48).num_tokens}
    out = tmp_path / "out"
    result = run("preprocess", src, "-o", out, "-s", STRATEGIES[0], "--workers", "1", "-q")
    assert result.exit_code == 3, result.output
    (error,) = read_errors(out)
    assert error["source"] == str(src / "broken_64x48.jpg")
    assert error["stage"] == "decode"
    assert "truncated" in error["reason"] or "broken data stream" in error["reason"]
    assert read_manifest(out)["totals"]["records"] == 0


# ---------------------------------------------------------------------------------------------------------
# EXIF orientation
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", STRATEGIES)
def test_exif_orientation_only_with_exif_transpose(name: str, tmp_path: Path) -> None:
    """grace_hopper is stored 600x512 with orientation 6: 512x600 for the model only with exif_transpose."""
    for transpose in (False, True):
        strategy = get_strategy(name, exif_transpose=transpose)
        header = stats_module.read_header(str(EXIF_SAMPLE))
        assert (header.width, header.height, header.orientation) == (600, 512, 6)
        planned = stats_module.planned_size(header, strategy)
        assert planned == ((512, 600) if transpose else (600, 512))

        result = compute_stats([str(EXIF_SAMPLE)], [Column(name, strategy)], emit_lengths=True)
        (line,) = result.lengths
        assert (line["width"], line["height"], line["orientation"]) == (600, 512, 6)  # as stored

        out = tmp_path / f"out-{transpose}"
        vlmtile.preprocess(
            vlmtile.RunConfig((str(EXIF_SAMPLE),), str(out), strategy, workers=1, progress=False)
        )
        (record,) = records(out)
        assert (record["orig_width"], record["orig_height"]) == planned
        assert line["num_tokens"] == {name: record["num_tokens"]}
        assert summary_of(result)["total_tokens"] == record["num_tokens"]
        assert summary_of(result)["bytes"]["float16"] == record["pixel_bytes"]


def test_exif_transpose_spec_via_cli(tmp_path: Path) -> None:
    lengths = tmp_path / "l.jsonl"
    specs = ["internvl", "internvl:exif_transpose=true", "qwen2-vl", "qwen2-vl:exif_transpose=true"]
    args = [a for spec in specs for a in ("-s", spec)]
    data = run_json(str(EXIF_SAMPLE), *args, "--emit-lengths", str(lengths))
    labels = [c["label"] for c in data["strategies"]]
    assert labels == [
        "internvl",
        "internvl[exif_transpose=True]",
        "qwen2-vl",
        "qwen2-vl[exif_transpose=True]",
    ]
    (line,) = read_lengths(lengths)
    for label, column in zip(labels, data["strategies"], strict=True):
        strategy = get_strategy(column["strategy"], exif_transpose=column["params"]["exif_transpose"])
        assert (
            line["num_tokens"][label]
            == column["total_tokens"]
            == decoded_plan(strategy, EXIF_SAMPLE).num_tokens
        )


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, pos = [], 8
    while pos < len(data):
        (size,) = struct.unpack(">I", data[pos : pos + 4])
        chunks.append((data[pos + 4 : pos + 8], data[pos : pos + 12 + size]))
        pos += 12 + size
    return chunks


def _orientation_exif(value: int = 6) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


def _write_oriented(kind: str, path: Path, image: Image.Image) -> None:
    """An image stored 64x48 whose metadata says "rotate 90" (orientation 6) in one of Pillow's ways."""
    if kind == "jpeg-exif":
        image.save(path, "JPEG", exif=_orientation_exif())
    elif kind == "webp-exif":
        image.save(path, "WEBP", lossless=True, exif=_orientation_exif())
    elif kind == "png-exif":
        image.save(path, "PNG", exif=_orientation_exif())
    elif kind == "jpeg-xmp":
        xmp = (
            b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax'
            b'-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/>'
            b"</rdf:RDF></x:xmpmeta>"
        )
        image.save(path, "JPEG", xmp=xmp)
    elif kind == "png-raw-profile":  # ImageMagick / exiftool style text chunk
        data = _orientation_exif().tobytes()
        info = PngImagePlugin.PngInfo()
        info.add_text("Raw profile type exif", f"\nexif\n{len(data):8}\n{data.hex()}\n")
        image.save(path, "PNG", pnginfo=info)
    elif kind == "png-exif-after-idat":
        buf = io.BytesIO()
        image.save(buf, "PNG", exif=_orientation_exif())
        chunks = _png_chunks(buf.getvalue())
        order = [b"IHDR", b"IDAT", b"eXIf", b"IEND"]
        chunks.sort(key=lambda c: order.index(c[0]) if c[0] in order else 1)
        path.write_bytes(buf.getvalue()[:8] + b"".join(raw for _, raw in chunks))
    elif kind == "tiff-tag":
        image.save(path, "TIFF", exif=_orientation_exif())
    else:
        raise ValueError(kind)


ORIENTED = [
    "jpeg-exif",
    "webp-exif",
    "png-exif",
    "jpeg-xmp",
    "png-raw-profile",
    "png-exif-after-idat",
    "tiff-tag",
]


@pytest.mark.parametrize("kind", ORIENTED)
def test_orientation_metadata_agrees_with_preprocess(kind: str, tmp_path: Path) -> None:
    """Wherever Pillow finds an orientation (EXIF, XMP, PNG text, TIFF tag), stats plans the size
    `preprocess` plans, with and without exif_transpose."""
    path = tmp_path / f"oriented.{kind.split('-')[0].replace('jpeg', 'jpg')}"
    _write_oriented(kind, path, Image.fromarray(np.full((48, 64, 3), 90, dtype=np.uint8)))
    for transpose in (False, True):
        strategy = get_strategy("internvl", exif_transpose=transpose)
        result = compute_stats([str(path)], [Column("c", strategy)], emit_lengths=True)
        (line,) = result.lengths
        header = stats_module.Header(line["width"], line["height"], line["orientation"])
        plan = decoded_plan(strategy, path)
        assert plan is not None
        assert stats_module.planned_size(header, strategy) == (plan.orig_width, plan.orig_height), transpose
        assert line["num_tokens"] == {"c": plan.num_tokens}
        if transpose:
            assert (plan.orig_width, plan.orig_height) == (48, 64)  # the metadata really says "rotate"


@pytest.mark.parametrize("transpose", [False, True])
def test_damaged_exif_block_does_not_fail_the_image(transpose: bool, tmp_path: Path) -> None:
    path = tmp_path / "bad_exif.jpg"
    path.write_bytes(jpeg_bytes(64, 48, exif=b"Exif\x00\x00not a tiff header"))
    strategy = get_strategy("internvl", exif_transpose=transpose)
    plan = decoded_plan(strategy, path)
    assert plan is not None  # preprocess' path accepts it
    summary = summary_of(compute_stats([str(path)], [Column("internvl", strategy)]))
    assert (summary["images"], summary["failures"]) == (1, 0)
    assert summary["total_tokens"] == plan.num_tokens


def _png_with_header_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR claims `width` x `height` (CRC fixed): a header Pillow opens lazily."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_oversized_header_is_one_failure_not_a_crash(tmp_path: Path, make_image: MakeImage) -> None:
    """Above 2 x Image.MAX_IMAGE_PIXELS Pillow refuses to open the file: one failure, as in preprocess."""
    (tmp_path / "huge_20000x20000.png").write_bytes(_png_with_header_size(20000, 20000))
    save_image(make_image(30, 20, "RGB", 1), tmp_path / "ok.png", "PNG")
    summary = summary_of(compute_stats([str(tmp_path)], [Column("internvl", get_strategy("internvl"))]))
    assert (summary["images"], summary["failures"]) == (1, 1)
    (reason,) = summary["failure_reasons"]
    assert "too large" in reason


def test_large_header_is_counted_without_warnings(tmp_path: Path) -> None:
    """A 100 MP panorama is a legitimate input; stats counts it quietly (pytest turns warnings to errors)."""
    (tmp_path / "pano_10000x10000.png").write_bytes(_png_with_header_size(10000, 10000))
    summary = summary_of(compute_stats([str(tmp_path)], [Column("internvl", get_strategy("internvl"))]))
    assert (summary["images"], summary["failures"]) == (1, 0)


# ---------------------------------------------------------------------------------------------------------
# Failures, JSON schema, lengths
# ---------------------------------------------------------------------------------------------------------


def test_failures_are_counted_per_column_with_reasons(inputs: Path) -> None:
    columns = [Column(n, get_strategy(n)) for n in ("internvl", "qwen2-vl")]
    result = compute_stats([str(inputs)], columns, workers=1)
    internvl, qwen = summary_of(result, 0), summary_of(result, 1)
    count = len(list_inputs([str(inputs)]))
    assert internvl["failures"] == 1 and internvl["images"] == count - 1
    assert qwen["failures"] == 2 and qwen["images"] == count - 2
    (reason,) = internvl["failure_reasons"]
    assert "not an image" in reason
    assert internvl["failure_reasons"][reason] == 1
    assert set(qwen["failure_reasons"].values()) == {1}
    assert reason in qwen["failure_reasons"]
    (refusal,) = set(qwen["failure_reasons"]) - {reason}
    assert "aspect ratio" in refusal
    table = format_table(result)
    assert "failures:" in table
    assert f"internvl: 1 x {reason}" in table and f"qwen2-vl: 1 x {refusal}" in table


def test_failed_inputs_match_preprocess_error_record(inputs: Path, outputs: dict[str, Path]) -> None:
    """For every strategy, the inputs stats counts as failures are exactly those in _errors.jsonl."""
    columns = [Column(n, get_strategy(n)) for n in STRATEGIES]
    result = compute_stats([str(inputs)], columns, workers=1, emit_lengths=True)
    for name in STRATEGIES:
        failed = {
            line["source"] for line in result.lengths if "error" in line or line["num_tokens"][name] is None
        }
        assert failed == {e["source"] for e in read_errors(outputs[name])}, name


def test_json_schema(inputs: Path) -> None:
    data = run_json(str(inputs), "-s", "internvl:max_tiles=6", "-s", "qwen2-vl", "--budget", "1000")
    assert set(data) == TOP_LEVEL_KEYS
    assert data["schema_version"] == 1
    assert data["inputs"] == [str(inputs)]
    assert data["from_output_metadata"] is False
    assert data["budget"] == 1000
    assert [c["label"] for c in data["strategies"]] == ["internvl[max_tiles=6]", "qwen2-vl"]
    for column in data["strategies"]:
        assert set(column) == STRATEGY_KEYS
        assert column["params"] == get_strategy(column["strategy"], **_tuned(column)).params()
        for key in ("images", "failures", "total_tokens", "p50_tokens", "p90_tokens", "p99_tokens"):
            assert type(column[key]) is int, key
        assert type(column["max_tokens"]) is int and type(column["mean_tokens"]) is float
        assert column["failures"] == sum(column["failure_reasons"].values())
        assert all(type(k) is str and type(v) is int for k, v in column["failure_reasons"].items())
        assert all(re.fullmatch(r"[1-9]\d*", k) for k in column["tiles_histogram"])
        assert sum(column["tiles_histogram"].values()) == column["images"]
        assert set(column["bytes"]) == set(DTYPE_ITEMSIZE)
        assert all(type(v) is int for v in column["bytes"].values())
        assert column["budget"] == 1000 and type(column["over_budget"]) is int
        assert column["p50_tokens"] <= column["p90_tokens"] <= column["p99_tokens"] <= column["max_tokens"]

    none = run_json(str(inputs), "-s", "internvl")
    assert (
        none["budget"] is None
        and none["strategies"][0]["over_budget"] is None
        and none["strategies"][0]["budget"] is None
    )


def _tuned(column: dict[str, Any]) -> dict[str, Any]:
    cls = type(get_strategy(column["strategy"]))
    return {f.name: column["params"][f.name] for f in tunable_fields(cls) if f.name in column["params"]}


def test_json_of_only_failures_has_nulls(tmp_path: Path) -> None:
    (tmp_path / "x.jpg").write_text("no")
    column = run_json(str(tmp_path), "-s", "internvl")["strategies"][0]
    assert (column["images"], column["failures"], column["total_tokens"]) == (0, 1, 0)
    for key in ("mean_tokens", "p50_tokens", "p90_tokens", "p99_tokens", "max_tokens"):
        assert column[key] is None
    assert column["tiles_histogram"] == {} and set(column["bytes"].values()) == {0}


def test_budget_counts_images_above_it(inputs: Path) -> None:
    result = compute_stats(
        [str(inputs)], [Column("internvl", get_strategy("internvl"))], budget=1024, emit_lengths=True
    )
    tokens = [line["num_tokens"]["internvl"] for line in result.lengths if "error" not in line]
    assert summary_of(result)["over_budget"] == sum(t > 1024 for t in tokens) > 0
    table = run("stats", inputs, "-s", "internvl", "--budget", "1024", "--workers", "1").stdout
    assert re.search(rf"^> 1,024 tokens\s+{summary_of(result)['over_budget']}$", table, re.MULTILINE)


def test_emit_lengths_join_back_to_inputs(inputs: Path, tmp_path: Path) -> None:
    lengths = tmp_path / "lengths.jsonl"
    specs = ["internvl:max_tiles=6", "internvl", "qwen2-vl:max_pixels=200704"]
    data = run_json(str(inputs), *(a for s in specs for a in ("-s", s)), "--emit-lengths", str(lengths))
    labels = [c["label"] for c in data["strategies"]]
    assert labels == ["internvl[max_tiles=6]", "internvl", "qwen2-vl[max_pixels=200704]"]
    lines = read_lengths(lengths)
    items = list_inputs([str(inputs)])
    assert [line["source"] for line in lines] == [item.source for item in items]  # one per input, in order
    assert [line["key"] for line in lines] == [item.key for item in items]
    strategies = [
        stats_module.Column(label, _strategy(column))
        for label, column in zip(labels, data["strategies"], strict=True)
    ]
    totals = Counter[str]()
    for line, item in zip(lines, items, strict=True):
        if item.source.endswith(NOT_AN_IMAGE):
            assert set(line) == LENGTH_ERROR_KEYS and "not an image" in line["error"]
            continue
        assert set(line) == LENGTH_KEYS
        assert set(line["num_tokens"]) == set(labels)
        with Image.open(item.source) as image:
            assert (line["width"], line["height"]) == image.size
        for column in strategies:
            plan = decoded_plan(column.strategy, item.source)
            assert line["num_tokens"][column.label] == (plan.num_tokens if plan else None)
            totals[column.label] += line["num_tokens"][column.label] or 0
    assert totals == {c["label"]: c["total_tokens"] for c in data["strategies"]}
    sizes = {str(inputs / rel): (w, h) for rel, w, h, *_ in GOOD_IMAGES}
    for line in lines:
        if line["source"] in sizes:
            assert (line["width"], line["height"]) == sizes[line["source"]]


def _strategy(column: dict[str, Any]) -> vlmtile.Strategy:
    return get_strategy(column["strategy"], **_tuned(column))


@pytest.mark.parametrize(
    "specs",
    [["internvl", "internvl2"], ["internvl", "internvl:max_tiles=12"], ["qwen2-vl:max_pixels=1000000"] * 2],
    ids=["alias", "default-value", "twice"],
)
def test_duplicate_columns_are_a_usage_error(specs: list[str], inputs: Path, tmp_path: Path) -> None:
    """Two specs for one configuration would share one --emit-lengths key: refused, exit status 2."""
    lengths = tmp_path / "l.jsonl"
    result = run("stats", inputs, *(a for spec in specs for a in ("-s", spec)), "--emit-lengths", lengths)
    assert result.exit_code == 2
    assert "repeat" in result.stderr
    assert not lengths.exists()
    strategy = get_strategy("internvl")
    with pytest.raises(vlmtile.VlmtileError, match="repeat"):
        compute_stats([str(inputs)], [Column("x", strategy), Column("x", strategy)])


def test_parallel_equals_serial(inputs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Several chunks over two worker processes give the same report and lines, in input order."""
    columns = [Column(n, get_strategy(n)) for n in ("internvl", "qwen2-vl")]
    serial = compute_stats([str(inputs)], columns, workers=1, emit_lengths=True, budget=500)
    monkeypatch.setattr(stats_module, "MIN_CHUNK", 5)  # 3 chunks, 2 processes at a time
    seen: list[int] = []
    parallel = compute_stats(
        [str(inputs)],
        columns,
        workers=2,
        emit_lengths=True,
        budget=500,
        on_progress=lambda images, tokens: seen.append(images),
    )
    assert parallel.to_json() == serial.to_json()
    assert parallel.lengths == serial.lengths
    assert sum(seen) == len(list_inputs([str(inputs)]))


def test_json_keys_are_documented() -> None:
    if not DOC.exists():
        pytest.skip("docs/stats.md not written yet")
    doc = DOC.read_text(encoding="utf-8")
    for key in sorted(TOP_LEVEL_KEYS | STRATEGY_KEYS | LENGTH_KEYS | LENGTH_ERROR_KEYS):
        assert f"`{key}`" in doc, f"docs/stats.md does not document the JSON key {key!r}"


# ---------------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------------


def test_table_output(inputs: Path) -> None:
    result = run("stats", inputs, "-s", "internvl:max_tiles=6", "-s", "qwen2-vl", "--workers", "1")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""  # no progress bar when stderr is not a terminal
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["internvl[max_tiles=6]", "qwen2-vl"]
    names = [re.split(r"\s{2,}", line.strip())[0] for line in lines[1:] if line.strip()]
    for row in ("images", "failures", "total tokens", "mean tokens", "p50 tokens", "p90 tokens"):
        assert row in names
    for row in ("p99 tokens", "max tokens", "tiles/image", "float16 bytes", "uint8 bytes", "float32 bytes"):
        assert row in names
    expected = compute_stats([str(inputs)], [Column("internvl", get_strategy("internvl", max_tiles=6))])
    total = next(line for line in lines if line.startswith("total tokens"))
    assert f"{summary_of(expected)['total_tokens']:,}" == total.split()[2]


def test_exit_codes_and_usage_errors(inputs: Path, tmp_path: Path, outputs: dict[str, Path]) -> None:
    assert run("stats", inputs, "-s", "internvl").exit_code == 0  # failures are reported, not an error

    unknown = run("stats", inputs, "-s", "no-such-model")
    assert unknown.exit_code == 2
    assert "unknown strategy" in unknown.stderr and all(n in unknown.stderr for n in STRATEGIES)

    for args, needle in [
        (["-s", "internvl:max_tiles"], "bad strategy parameter"),  # no "="
        (["-s", "internvl:max_tiles=six"], "takes an integer"),
        (["-s", "internvl:thumbnail=maybe"], "takes true or false"),
        (["-s", "internvl:max_tiles=0"], ">= 1"),
        (["-s", "internvl:min_tiles=7,max_tiles=6"], "must not exceed"),
        (["-s", "internvl:alpha=pink"], "must be one of"),
        (["-s", "qwen2-vl", "--max-tiles", "6"], "--max-tiles applies to none of the chosen strategies"),
        ([], "give at least one --strategy"),
    ]:
        result = run("stats", inputs, *args)
        assert result.exit_code == 2, (args, result.output)
        assert needle in result.stderr, (args, result.stderr)

    out = outputs["internvl"]
    for args in (["-s", "internvl"], [str(inputs)]):
        result = run("stats", out, *args)
        assert result.exit_code == 2 and "output directory is reported alone" in result.stderr

    assert run("stats", tmp_path / "missing", "-s", "internvl").exit_code == 2
    (tmp_path / "empty").mkdir()
    empty = run("stats", tmp_path / "empty", "-s", "internvl")
    assert empty.exit_code == 1 and "no images found" in empty.stderr


@pytest.mark.parametrize("name", STRATEGIES)
def test_bad_key_lists_valid_keys(name: str, inputs: Path) -> None:
    result = run("stats", inputs, "-s", f"{name}:no_such_key=1")
    assert result.exit_code == 2
    message = " ".join(result.stderr.split())
    valid = sorted(f.name for f in tunable_fields(type(get_strategy(name))))
    assert f"key one of: {', '.join(valid)}" in message


def test_generated_option_applies_to_the_strategies_that_have_it(inputs: Path) -> None:
    data = run_json(str(inputs), "-s", "internvl", "-s", "qwen2-vl", "--max-tiles", "6")
    internvl, qwen = data["strategies"]
    assert internvl["label"] == "internvl[max_tiles=6]" and internvl["params"]["max_tiles"] == 6
    assert qwen["label"] == "qwen2-vl" and qwen["params"] == get_strategy("qwen2-vl").params()
    # key=value in the spec wins over the generated option.
    spec = run_json(str(inputs), "-s", "internvl:max_tiles=2", "--max-tiles", "6")
    assert spec["strategies"][0]["params"]["max_tiles"] == 2


def _stderr_on_a_terminal(*args: str) -> str:
    """Run `python -m vlmtile ARGS` with stderr on a pseudo-terminal; returns what it wrote there."""
    pty = pytest.importorskip("pty")
    import fcntl
    import termios

    primary, secondary = pty.openpty()
    # A fresh pseudo-terminal is 0 columns wide, and tqdm draws nothing into 0 columns.
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "vlmtile", *args],
            stdout=subprocess.PIPE,
            stderr=secondary,
            stdin=subprocess.DEVNULL,
            check=False,
            timeout=60,
        )
        os.close(secondary)
        secondary = -1
        assert done.returncode == 0, done.stdout
        chunks = []
        while True:
            try:
                chunk = os.read(primary, 1 << 16)
            except OSError:  # EIO: the terminal's other end is closed and everything was read
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks).decode("utf-8", "replace")
    finally:
        os.close(primary)
        if secondary >= 0:
            os.close(secondary)


def test_progress_bar_only_on_a_terminal(inputs: Path) -> None:
    assert "img" in _stderr_on_a_terminal("stats", str(inputs), "-s", "internvl", "--workers", "1")
    assert _stderr_on_a_terminal("stats", str(inputs), "-s", "internvl", "--workers", "1", "-q") == ""
    assert run("stats", inputs, "-s", "internvl").stderr == ""  # not a terminal


def test_plot_writes_png(inputs: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    plot = tmp_path / "tokens.png"
    result = run(
        "stats", inputs, "-s", "internvl", "-s", "qwen2-vl", "--budget", "1000", "--plot", plot, "-q"
    )
    assert result.exit_code == 0, result.output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(plot) as image:
        assert image.width >= 400 and image.height >= 2 * 200  # one panel per column
        assert len(image.getcolors(1 << 16) or range(1 << 16)) > 2  # drawn, not blank


def test_plot_and_lengths_from_output_dir(outputs: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = outputs["internvl"]
    result = run("stats", out, "--plot", tmp_path / "p.png", "--emit-lengths", tmp_path / "l.jsonl")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    lines = read_lengths(tmp_path / "l.jsonl")
    stored = [line for line in lines if "error" not in line]  # failed inputs get an error line each
    assert [line["key"] for line in stored] == [r["key"] for r in records(out)]
    assert len(lines) - len(stored) == read_manifest(out)["totals"]["failures"]
    assert sum(line["num_tokens"]["internvl"] for line in stored) == read_manifest(out)["totals"]["tokens"]


def test_stats_from_output_library_call(outputs: dict[str, Path], inputs: Path) -> None:
    out = outputs["qwen2-vl"]
    result = stats_from_output(str(out), budget=100)
    assert result.from_output
    assert summary_of(result)["over_budget"] == sum(r["num_tokens"] > 100 for r in records(out))
