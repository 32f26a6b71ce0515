"""Samples from every input kind into every output kind: tar shards, manifests and Parquet datasets in,
Parquet and WebDataset out, with multi-image samples, text fields, dotted keys, failures and reruns.

Every pixel array read back is compared with `Strategy.process` on the same image bytes (under the
strategy the sample's image count calls for), so these are parity tests of the whole path.
"""

from __future__ import annotations

import base64
import gc
import hashlib
import io
import json
import os
import shlex
import tarfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from e2e_helpers import MakeImage, read_errors, read_manifest
from PIL import Image

import vlmtile

STRATEGY = vlmtile.get_strategy("internvl", max_tiles=4)
FORMATS = ("parquet", "webdataset")


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def jpeg_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def expected(images: list[bytes], strategy: vlmtile.Strategy = STRATEGY) -> list[np.ndarray]:
    """What the model's own preprocessing gives for a sample's images."""
    per_image = strategy.for_sample(max(len(images), 1))
    return [per_image.process(Image.open(io.BytesIO(b))).pixel_values for b in images]


def run(inputs: list[Any], out: Path, fmt: str, **kwargs: Any) -> vlmtile.RunSummary:
    config = vlmtile.RunConfig(
        inputs=tuple(str(i) for i in inputs),
        output=str(out),
        strategy=kwargs.pop("strategy", STRATEGY),
        format=fmt,
        dtype=kwargs.pop("dtype", "float32"),
        workers=kwargs.pop("workers", 1),
        progress=False,
        **kwargs,
    )
    return vlmtile.preprocess(config)


def by_key(out: Path) -> dict[str, dict[str, Any]]:
    return {r["key"]: r for r in vlmtile.open_dataset(out)}


# -- WebDataset tar input -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tar_input(tmp_path_factory: pytest.TempPathFactory, make_image: MakeImage) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("tars")
    a = png_bytes(make_image(500, 300, "RGB", 1))
    b = jpeg_bytes(make_image(200, 640, "RGB", 2))
    c = png_bytes(make_image(90, 90, "RGBA", 3))
    samples = [
        ("000001", {"jpg": b, "txt": b"a tall photo", "json": b'{"url": "http://x/1"}'}),
        ("000002", {"0.png": a, "1.png": c, "txt": b"two images", "cls": b"7"}),
        ("dir/000003", {"png": c, "bin": bytes([0, 255, 1])}),  # a directory key and a binary member
        ("000004", {"txt": b"text only"}),  # no image at all: kept, with no pixels
        ("000005", {"jpg": b"not a jpeg", "txt": b"broken"}),  # fails: error record, run goes on
    ]
    write_tar(root / "shards-000000.tar", samples[:3])
    write_tar(root / "shards-000001.tar", samples[3:])
    return {"root": root, "images": {"000001": [b], "000002": [a, c], "dir/000003": [c], "000004": []}}


@pytest.mark.parametrize("fmt", FORMATS)
def test_tar_shards_round_trip(tar_input: dict[str, Any], tmp_path: Path, fmt: str) -> None:
    out = tmp_path / "out"
    pattern = tar_input["root"] / "shards-{000000..000001}.tar"
    summary = run([pattern], out, fmt)
    assert (summary.inputs, summary.records, summary.failures) == (5, 4, 1)
    records = by_key(out)
    assert sorted(records) == [
        "shards-000000_000001",
        "shards-000000_000002",
        "shards-000000_dir_000003",
        "shards-000001_000004",
    ]
    for key, record in records.items():
        orig = record["orig_key"]
        images = tar_input["images"][orig]
        assert record["num_images"] == len(images) == len(record["pixel_values"])
        for got, want in zip(record["pixel_values"], expected(images), strict=True):
            assert np.array_equal(got, want), key
        assert record["num_tokens"] == sum(i["num_tokens"] for i in record["images"])
    two = records["shards-000000_000002"]
    assert [i["name"] for i in two["images"]] == ["0.png", "1.png"]  # image order as in the tar
    assert two["sample"] == {"txt": "two images", "cls": "7"}
    assert records["shards-000000_dir_000003"]["sample"] == {"bin": {"$base64": "AP8B"}}
    assert records["shards-000001_000004"]["pixel_values"] == []
    (error,) = read_errors(out)
    assert error["key"] == "shards-000001_000005"
    assert error["source"].endswith("shards-000001.tar:000005.jpg")
    assert "corrupt" in error["reason"] or "not an image" in error["reason"]


def test_tar_output_keeps_original_members_and_reads_with_webdataset(
    tar_input: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    run([tar_input["root"]], out, "webdataset")  # a folder of tar shards
    manifest = read_manifest(out)
    assert manifest["layout"] == "sample"
    assert manifest["shard_pattern"] == "shard-{000000..000001}.tar"
    url = str(out / manifest["shard_pattern"])
    with warnings.catch_warnings():  # webdataset leaves its file objects to the garbage collector
        warnings.simplefilter("ignore", ResourceWarning)
        dataset = wds.WebDataset(url, shardshuffle=False).decode()
        samples = {s["__key__"]: s for s in dataset}
        del dataset
        gc.collect()
    first = samples["shards-000000_000001"]
    assert first["txt"] == "a tall photo"
    assert first["json"] == {"url": "http://x/1"}  # the sample's own member, untouched
    assert np.array_equal(first["img0.npy"], expected(tar_input["images"]["000001"])[0])
    assert first["vlmtile.json"]["num_images"] == 1
    second = samples["shards-000000_000002"]
    assert sorted(k for k in second if not k.startswith("__")) == [
        "cls",
        "img0.npy",
        "img1.npy",
        "txt",
        "vlmtile.json",
    ]
    index = json.loads((out / "_index.wids.json").read_text())
    assert [s["nsamples"] for s in index["shardlist"]] == [s["records"] for s in manifest["shards"]]


def test_webdataset_rerun_is_byte_identical(tar_input: dict[str, Any], tmp_path: Path) -> None:
    digests = []
    for name, workers in (("a", 1), ("b", 2)):
        out = tmp_path / name
        run([tar_input["root"]], out, "webdataset", workers=workers)
        manifest = read_manifest(out)
        digests.append(
            [hashlib.sha256((out / s["name"]).read_bytes()).hexdigest() for s in manifest["shards"]]
        )
    assert digests[0] == digests[1]
    assert len(digests[0]) == 2


def test_pipe_and_fsspec_inputs(tar_input: dict[str, Any], tmp_path: Path) -> None:
    fsspec = pytest.importorskip("fsspec")
    shard = tar_input["root"] / "shards-000000.tar"
    memory = fsspec.filesystem("memory")
    memory.pipe("/bucket/shards-000000.tar", shard.read_bytes())
    results = {}
    for name, url in (
        ("local", str(shard)),
        ("pipe", f"pipe:cat {shlex.quote(str(shard))}"),
        ("memory", "memory://bucket/shards-000000.tar"),
    ):
        out = tmp_path / name
        summary = run([url], out, "parquet")
        assert (summary.records, summary.failures) == (3, 0), name
        results[name] = [
            (r["key"], [p.tobytes() for p in r["pixel_values"]]) for r in vlmtile.open_dataset(out)
        ]
    assert results["pipe"] == results["local"] == results["memory"]


def test_failing_pipe_is_an_error_record(tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = run(["pipe:exit 3"], out, "parquet")
    assert (summary.records, summary.failures) == (0, 1)
    (error,) = read_errors(out)
    assert "status 3" in error["reason"]


# -- manifests ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifest_input(tmp_path_factory: pytest.TempPathFactory, make_image: MakeImage) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("manifest")
    images = root / "images"
    images.mkdir()
    raw = {}
    for i, (w, h) in enumerate([(640, 480), (300, 900), (1200, 200), (448, 448)]):
        data = png_bytes(make_image(w, h, "RGB", 10 + i))
        (images / f"im{i}.png").write_bytes(data)
        raw[f"im{i}.png"] = data
    conversations = [
        {"from": "human", "value": "<image>\nWhat is this?"},
        {"from": "gpt", "value": "A test."},
    ]
    llava = [
        {"id": "v1.sample.1", "image": "im0.png", "conversations": conversations},
        {"id": "multi", "image": ["im1.png", "im2.png", "im3.png"], "conversations": conversations},
        {"id": "missing", "image": "nope.png", "conversations": conversations},
        {"id": "text", "conversations": conversations},
    ]
    (root / "llava.json").write_text(json.dumps(llava))
    data_uri = "data:image/png;base64," + base64.b64encode(raw["im3.png"]).decode()
    swift_lines = [
        json.dumps(
            {"messages": [{"role": "user", "content": "<image><image>hi"}], "images": ["im0.png", "im1.png"]}
        ),
        "{not json",
        json.dumps({"messages": [], "images": [data_uri]}),
    ]
    (root / "swift.jsonl").write_text("\n".join(swift_lines) + "\n")
    return {"root": root, "images": images, "raw": raw}


@pytest.mark.parametrize("fmt", FORMATS)
def test_llava_manifest_round_trip(manifest_input: dict[str, Any], tmp_path: Path, fmt: str) -> None:
    out = tmp_path / "out"
    root = manifest_input["root"]
    sources = vlmtile.SourceOptions(image_root=str(manifest_input["images"]))
    summary = run([root / "llava.json"], out, fmt, sources=sources)
    assert (summary.inputs, summary.records, summary.failures) == (4, 3, 1)
    records = by_key(out)
    assert sorted(records) == ["multi", "text", "v1_sample_1"]  # the dotted id is sanitized ...
    assert records["v1_sample_1"]["orig_key"] == "v1.sample.1"  # ... and kept
    raw = manifest_input["raw"]
    multi = records["multi"]
    want = expected([raw["im1.png"], raw["im2.png"], raw["im3.png"]])
    assert len(multi["pixel_values"]) == 3
    for got, ref in zip(multi["pixel_values"], want, strict=True):
        assert np.array_equal(got, ref)
    assert multi["sample"]["conversations"][0]["value"] == "<image>\nWhat is this?"
    assert multi["sample"]["image"] == ["im1.png", "im2.png", "im3.png"]
    assert records["text"]["num_images"] == 0 and records["text"]["num_tokens"] == 0
    (error,) = read_errors(out)
    assert error["key"] == "missing"
    assert error["reason"] == "file not found (removed after it was listed?)"
    assert error["source"].endswith("llava.json:3:image")


def test_jsonl_manifest_with_bad_line_and_data_uri(manifest_input: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = run(
        [manifest_input["root"] / "swift.jsonl"],
        out,
        "parquet",
        sources=vlmtile.SourceOptions(image_root=str(manifest_input["images"])),
    )
    assert (summary.inputs, summary.records, summary.failures) == (3, 2, 1)
    records = list(vlmtile.open_dataset(out))
    assert [r["key"] for r in records] == ["swift-000001", "swift-000003"]
    assert records[0]["num_images"] == 2
    raw = manifest_input["raw"]
    assert np.array_equal(records[1]["pixel_values"][0], expected([raw["im3.png"]])[0])
    (error,) = read_errors(out)
    assert error["source"].endswith("swift.jsonl:2") and error["reason"].startswith("not valid JSON")


def test_per_sample_tile_budget(manifest_input: dict[str, Any], tmp_path: Path) -> None:
    """InternVL's multi-image rule: max_tiles // n_images per image (here 12 // 3 = 4, from max 12)."""
    out = tmp_path / "out"
    strategy = vlmtile.get_strategy("internvl")
    run(
        [manifest_input["root"] / "llava.json"],
        out,
        "parquet",
        strategy=strategy,
        budget=vlmtile.Budget(max_tiles=12),
        sources=vlmtile.SourceOptions(image_root=str(manifest_input["images"])),
    )
    multi = by_key(out)["multi"]
    per_image = strategy.for_sample(3, max_tiles=12)
    assert per_image.params()["max_tiles"] == 4
    raw = manifest_input["raw"]
    for got, data in zip(
        multi["pixel_values"], [raw["im1.png"], raw["im2.png"], raw["im3.png"]], strict=True
    ):
        assert np.array_equal(got, per_image.process(Image.open(io.BytesIO(data))).pixel_values)
    assert all(i["num_tiles"] <= 5 for i in multi["images"])  # 4 tiles + thumbnail at most


# -- Parquet input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_parquet_dataset_round_trip(tmp_path: Path, make_image: MakeImage, fmt: str) -> None:
    a = png_bytes(make_image(333, 222, "RGB", 21))
    b = jpeg_bytes(make_image(120, 480, "RGB", 22))
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "id": ["x.1", "x.2", "x.3"],
            "images": pa.array(
                [
                    [{"bytes": a, "path": "a.png"}],
                    [{"bytes": a, "path": None}, {"bytes": b, "path": "b.jpg"}],
                    None,
                ],
                type=pa.list_(image_type),
            ),
            "caption": ["one", "two", "none"],
            "score": [0.5, 1.5, 2.5],
        }
    )
    pq.write_table(table, tmp_path / "train-00000-of-00001.parquet")
    out = tmp_path / "out"
    summary = run([tmp_path / "train-00000-of-00001.parquet"], out, fmt)
    assert (summary.records, summary.failures) == (3, 0)
    records = list(vlmtile.open_dataset(out))
    assert [r["orig_key"] for r in records] == ["x.1", "x.2", "x.3"]
    assert [r["key"] for r in records] == [
        "train-00000-of-00001_x_1",
        "train-00000-of-00001_x_2",
        "train-00000-of-00001_x_3",
    ]
    for got, want in zip(records[1]["pixel_values"], expected([a, b]), strict=True):
        assert np.array_equal(got, want)
    assert records[1]["sample"] == {"id": "x.2", "caption": "two", "score": 1.5}
    assert records[2]["num_images"] == 0


# -- outputs ------------------------------------------------------------------------------------------


def test_parquet_output_metadata_and_duckdb(tar_input: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "out"
    run([tar_input["root"]], out, "parquet", dtype="float16")
    manifest = read_manifest(out)
    path = out / manifest["shards"][0]["name"]
    meta = json.loads(pq.read_schema(path).metadata[b"vlmtile"])
    assert meta["strategy"]["name"] == "internvl" and meta["layout"] == "sample"
    assert meta["vlmtile_version"] == vlmtile.__version__
    schema = pq.read_schema(path)
    assert schema.field("pixel_values").type == pa.list_(pa.large_binary())
    duckdb = pytest.importorskip("duckdb")
    rows = duckdb.sql(
        f"SELECT key, num_images, num_tokens FROM read_parquet('{out}/shard-*.parquet') ORDER BY key"
    ).fetchall()
    assert rows == [
        (r["key"], r["num_images"], r["num_tokens"])
        for r in sorted(by_key(out).values(), key=lambda r: r["key"])
    ]


def test_shards_rotate_by_bytes(tar_input: dict[str, Any], tmp_path: Path) -> None:
    """A task whose output passes --shard-bytes continues in a new file; names stay contiguous."""
    out = tmp_path / "out"
    run([tar_input["root"]], out, "parquet", shard_bytes=1)  # every record closes its file
    manifest = read_manifest(out)
    assert [s["name"] for s in manifest["shards"]] == [f"shard-{i:06d}.parquet" for i in range(4)]
    assert [s["records"] for s in manifest["shards"]] == [1, 1, 1, 1]
    assert len(list(vlmtile.open_dataset(out))) == 4


@pytest.mark.parametrize("fmt", FORMATS)
def test_no_pixels_mode(manifest_input: dict[str, Any], tmp_path: Path, fmt: str) -> None:
    out = tmp_path / "out"
    sources = vlmtile.SourceOptions(image_root=str(manifest_input["images"]))
    run([manifest_input["root"] / "llava.json"], out, fmt, sources=sources, pixels=False)
    with_pixels = tmp_path / "full"
    run([manifest_input["root"] / "llava.json"], with_pixels, fmt, sources=sources)
    light, full = by_key(out), by_key(with_pixels)
    assert sorted(light) == sorted(full)
    for key in light:
        assert "pixel_values" not in light[key]
        assert light[key]["images"] == full[key]["images"]  # same plans, grids and token counts
    assert (
        sum(s["bytes"] for s in read_manifest(out)["shards"])
        < sum(s["bytes"] for s in read_manifest(with_pixels)["shards"]) / 100
    )


def test_stats_counts_samples_like_preprocess(
    manifest_input: dict[str, Any], tar_input: dict[str, Any], tmp_path: Path
) -> None:
    from vlmtile.stats import Column, compute_stats

    sources = vlmtile.SourceOptions(image_root=str(manifest_input["images"]))
    inputs = [str(manifest_input["root"] / "llava.json")]
    result = compute_stats(inputs, [Column("internvl", STRATEGY)], emit_lengths=True, sources=sources)
    out = tmp_path / "out"
    run(inputs, out, "parquet", sources=sources, pixels=False)
    records = by_key(out)
    summary = result.to_json()["strategies"][0]
    assert summary["total_tokens"] == sum(r["num_tokens"] for r in records.values())
    lengths = {line["key"]: line for line in result.lengths}
    assert {k: v["num_tokens"]["internvl"] for k, v in lengths.items() if "error" not in v} == {
        k: r["num_tokens"] for k, r in records.items()
    }
    assert "error" in lengths["missing"]
    tar_result = compute_stats([str(tar_input["root"])], [Column("internvl", STRATEGY)])
    tar_out = tmp_path / "tar"
    run([tar_input["root"]], tar_out, "parquet", pixels=False)
    assert tar_result.to_json()["strategies"][0]["total_tokens"] == sum(
        r["num_tokens"] for r in by_key(tar_out).values()
    )


def test_keys_never_collide(tmp_path: Path, make_image: MakeImage) -> None:
    """Two tars named alike in different folders, and keys that sanitize alike, stay distinct."""
    data = png_bytes(make_image(40, 40, "RGB", 5))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_tar(
        tmp_path / "a" / "data.tar", [("x-y", {"png": data}), ("x_y", {"png": data}), ("x/y", {"png": data})]
    )
    write_tar(tmp_path / "b" / "data.tar", [("x-y", {"png": data})])
    out = tmp_path / "out"
    summary = run([tmp_path / "a", tmp_path / "b"], out, "webdataset")
    assert summary.records == 4
    keys = [r["key"] for r in vlmtile.open_dataset(out)]
    assert len(set(keys)) == 4
    assert all("." not in k and "/" not in k for k in keys)
    assert sorted(r["orig_key"] for r in vlmtile.open_dataset(out)) == ["x-y", "x-y", "x/y", "x_y"]
    assert os.path.exists(out / "_manifest.json")


# -- command line -------------------------------------------------------------------------------------


def test_cli_manifest_preprocess_and_stats(manifest_input: dict[str, Any], tmp_path: Path) -> None:
    from click.testing import CliRunner

    from vlmtile.cli import cli

    runner = CliRunner()
    root = manifest_input["root"]
    common = ["--image-root", str(manifest_input["images"]), "--max-tiles-per-sample", "12"]
    out = tmp_path / "out"
    result = runner.invoke(
        cli, ["preprocess", str(root / "llava.json"), "-o", str(out), "-s", "internvl", *common]
    )
    assert result.exit_code == 3, result.output  # one sample names a missing image
    assert "3 samples, 1 failures" in result.stdout
    lengths = tmp_path / "lengths.jsonl"
    stats = runner.invoke(
        cli,
        [
            "stats",
            str(root / "llava.json"),
            "-s",
            "internvl",
            "-s",
            "qwen2-vl",
            *common,
            "--emit-lengths",
            str(lengths),
            "--json",
        ],
    )
    assert stats.exit_code == 0, stats.output
    report = json.loads(stats.stdout)
    records = by_key(out)
    internvl = report["strategies"][0]
    assert internvl["total_tokens"] == sum(r["num_tokens"] for r in records.values())
    lines = {json.loads(line)["key"]: json.loads(line) for line in lengths.read_text().splitlines()}
    assert lines["multi"]["num_tokens"]["internvl"] == records["multi"]["num_tokens"]
    assert len(lines["multi"]["images"]) == 3
    # The tile budget does not apply to Qwen (no tile limit), like a strategy option it lacks.
    assert lines["multi"]["num_tokens"]["qwen2-vl"] == sum(
        vlmtile.get_strategy("qwen2-vl").plan(w, h).num_tokens
        for w, h in [(300, 900), (1200, 200), (448, 448)]
    )

    refused = runner.invoke(
        cli, ["preprocess", str(root / "llava.json"), "-o", str(tmp_path / "q"), "-s", "qwen2-vl", *common]
    )
    assert refused.exit_code == 2
    assert "qwen2-vl cannot honour a per-sample max_tiles budget" in refused.output
    none = runner.invoke(cli, ["stats", str(root / "llava.json"), "-s", "llava-next", *common])
    assert none.exit_code == 1
    assert "applies to none of the chosen strategies" in none.output


def test_image_column_option_picks_the_column(tmp_path: Path, make_image: MakeImage) -> None:
    """Two binary columns: the first is taken by default, --image-column picks the other."""
    from click.testing import CliRunner

    from vlmtile.cli import cli

    small = png_bytes(make_image(30, 20, "RGB", 31))
    large = png_bytes(make_image(900, 300, "RGB", 32))
    pq.write_table(pa.table({"id": [1], "thumb": [small], "photo": [large]}), tmp_path / "d.parquet")
    tokens = {}
    for option in ([], ["--image-column", "photo"]):
        out = tmp_path / ("picked" if option else "auto")
        result = CliRunner().invoke(
            cli, ["preprocess", str(tmp_path / "d.parquet"), "-o", str(out), "-s", "internvl", "-q", *option]
        )
        assert result.exit_code == 0, result.output
        (record,) = vlmtile.open_dataset(out)
        tokens[bool(option)] = record["num_tokens"]
        assert record["key"] == "d_1"
    # 30x20 is aspect 1.5: InternVL picks the 3x2 grid (6 tiles + thumbnail); 900x300: 3x1 + thumbnail.
    assert tokens == {False: 7 * 256, True: 4 * 256}
    missing = CliRunner().invoke(
        cli,
        [
            "preprocess",
            str(tmp_path / "d.parquet"),
            "-o",
            str(tmp_path / "m"),
            "-s",
            "internvl",
            "--image-column",
            "nope",
        ],
    )
    assert missing.exit_code == 3
    assert "no image column" in (tmp_path / "m" / "_errors.jsonl").read_text()
