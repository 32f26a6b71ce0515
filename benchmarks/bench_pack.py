#!/usr/bin/env python
"""Patch n' Pack benchmark: padding on a realistic size distribution, and `vlmtile pack` throughput.

Standalone script, not part of the test suite; it generates everything it uses (no downloads).

  padding     `vlmtile.packing.simulate` (the packer `pack` runs, on the lengths `stats` computes from
              headers) over N image sizes drawn like web photos: common aspect ratios (4:3, 16:9, 1:1,
              3:2 and portrait ones) with +-10% jitter, long side log-normal around 900 px (64..6000 px).
              For each strategy configuration and sequence length (4..64 images' worth of tokens), first-
              and best-fit decreasing, with pack's default buffer of 4096 images.
  throughput  generated images -> `preprocess` (navit, float16, Parquet) -> `pack` (timed) -> reading
              every packed sequence back with `open_dataset` and unpacking it (timed).

    python benchmarks/bench_pack.py                     # 20,000 sizes, 400 images end to end
    python benchmarks/bench_pack.py --sizes 5000 --images 100
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time

import numpy as np
from PIL import Image

import vlmtile
from vlmtile.pack import PackConfig, pack
from vlmtile.packing import DEFAULT_BUFFER, simulate, unpack

CONFIGS = [
    (
        "navit, native <= 1024 patches (--max-patches 1024 --no-upscale)",
        "navit",
        {"max_patches": 1024, "upscale": False},
    ),
    ("navit, NaFlex 256 (preset)", "navit", {}),
    (
        "navit, native <= 1024, Beta drop (mean 0.3, k 4)",
        "navit",
        {"max_patches": 1024, "upscale": False, "drop_rate": 0.3, "drop_concentration": 4.0},
    ),
    ("qwen2-vl, max_pixels 1003520", "qwen2-vl", {"max_pixels": 1003520}),
]


def realistic_sizes(count: int, seed: int = 0) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    ratios = rng.choice(
        [4 / 3, 3 / 4, 16 / 9, 9 / 16, 1.0, 3 / 2, 2 / 3],
        size=count,
        p=[0.3, 0.1, 0.2, 0.05, 0.15, 0.15, 0.05],
    ) * np.exp(rng.normal(0, 0.1, count))
    long = np.clip(np.exp(rng.normal(np.log(900), 0.6, count)), 64, 6000)
    width = np.where(ratios >= 1, long, long * ratios)
    height = np.where(ratios >= 1, long / ratios, long)
    return [(max(1, round(w)), max(1, round(h))) for w, h in zip(width, height, strict=True)]


def padding_table(count: int) -> None:
    sizes = realistic_sizes(count)
    print(f"\n### Padding: {count:,} realistic sizes, buffer {DEFAULT_BUFFER}\n")
    print(
        "| configuration | mean tokens | N (images' worth) | padding FFD | padding BFD | images / sequence |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for label, name, params in CONFIGS:
        strategy = vlmtile.get_strategy(name, **params)
        lengths = [strategy.for_image(f"img{i}", 0).plan(w, h).shape[0] for i, (w, h) in enumerate(sizes)]
        mean = float(np.mean(lengths))
        unit = strategy.sequence_unit()
        for worth in (4, 8, 16, 32, 64):
            n = int(worth * mean)
            n -= n % unit
            first = simulate(lengths, n, buffer=DEFAULT_BUFFER, fit="first").summary()
            best = simulate(lengths, n, buffer=DEFAULT_BUFFER, fit="best").summary()
            print(
                f"| {label} | {mean:,.1f} | {n:,} ({worth}) | {first['padding_fraction']:.2%} | "
                f"{best['padding_fraction']:.2%} | {first['images_per_sequence']['mean']:.1f} |"
            )


def throughput(images: int) -> None:
    root = tempfile.mkdtemp(prefix="bench_pack_")
    try:
        src = os.path.join(root, "src")
        os.makedirs(src)
        rng = np.random.default_rng(1)
        for i, (w, h) in enumerate(realistic_sizes(images, seed=2)):
            w, h = min(w, 1600), min(h, 1600)  # keep generation quick
            pixels = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).resize((w, h), Image.Resampling.BILINEAR).save(
                os.path.join(src, f"img{i:05d}.jpg"), quality=90
            )
        tiles = os.path.join(root, "tiles")
        strategy = vlmtile.get_strategy("navit", max_patches=1024, upscale=False)
        started = time.perf_counter()
        vlmtile.preprocess(vlmtile.RunConfig((src,), tiles, strategy, workers=1, progress=False))
        preprocess_seconds = time.perf_counter() - started
        dataset = vlmtile.open_dataset(tiles)
        mean = dataset.manifest["totals"]["tokens"] / len(dataset)
        n = 16 * int(mean)
        out = os.path.join(root, "packed")
        started = time.perf_counter()
        summary = pack(PackConfig(tiles, out, n, progress=False))
        pack_seconds = time.perf_counter() - started
        started = time.perf_counter()
        segments = sum(len(unpack(record)) for record in vlmtile.open_dataset(out))
        read_seconds = time.perf_counter() - started
        stored = summary.bytes
        print(f"\n### Throughput: {images} images, navit <= 1024 patches, float16 Parquet, N = {n:,}\n")
        print("| step | seconds | images/s | MB/s (packed bytes) |")
        print("|---|---:|---:|---:|")
        rate = images / preprocess_seconds
        print(f"| preprocess (1 worker, for reference) | {preprocess_seconds:.2f} | {rate:,.0f} | |")
        print(
            f"| pack (1 worker) | {pack_seconds:.2f} | {images / pack_seconds:,.0f} | "
            f"{stored / 1e6 / pack_seconds:,.0f} |"
        )
        print(
            f"| open_dataset + unpack (float32) | {read_seconds:.2f} | {segments / read_seconds:,.0f} | "
            f"{stored / 1e6 / read_seconds:,.0f} |"
        )
        print(f"\n{summary.line()}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, default=20000, help="image sizes for the padding table")
    parser.add_argument("--images", type=int, default=400, help="images for the throughput run")
    args = parser.parse_args()
    python = platform.python_version()
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, Python {python}, numpy {np.__version__}")
    padding_table(args.sizes)
    throughput(args.images)


if __name__ == "__main__":
    main()
