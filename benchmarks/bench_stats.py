#!/usr/bin/env python
"""Throughput benchmark: `vlmtile stats` (headers only) vs. `vlmtile preprocess` on the same JPEGs.

Standalone script, not part of the test suite. It generates its own images (deterministic, no downloads):
by default 24 photo-like 12 MP JPEGs (4000x3000, quality 90, 4:2:0, with a camera-style EXIF block of
~32 KB including a maker note; every other one is a "portrait phone photo" stored landscape with EXIF
orientation 6). Then, in the same run and on the same folder, it measures:

  stats        `compute_stats([folder], [internvl])` with 1 and 2 workers
  stats-big    the same on a folder of many hard links to those 24 files (default 24 x 2,000 = 48,000
               entries), because `stats` works in chunks of at least 1,024 inputs per task (a smaller
               folder is counted inline): only a larger folder can show how it scales with cores
  stats-cli    the whole `vlmtile stats DIR -s internvl --json` command, timed from outside (interpreter
               start-up and imports included)
  preprocess   `preprocess(RunConfig(folder, internvl, parquet, float16))` with 1 and 2 workers; shard size
               6 so that 2 workers have 4 shards to share (the default of 64 would be one shard)

Every measured run happens in a fresh child process; the time is taken inside the child around the
library call only (imports and interpreter start-up are not counted; the worker-process start-up of a
parallel run is). The input files are in the page cache for every case (they are read once before the
first measurement), so disk reads cost the same for all. Before the final measurement the script waits,
up to --wait-timeout seconds, for the 1-minute load average to drop below --wait-load (the benchmark
machine is shared). Cases are interleaved across repeats and medians are reported.

    /work/venv/bin/python benchmarks/bench_stats.py                  # 24 x 12 MP, 3 repeats, ~3 min
    /work/venv/bin/python benchmarks/bench_stats.py --quick          # 4 x 12 MP, smoke run
    /work/venv/bin/python benchmarks/bench_stats.py --json out.json --markdown section.md

The requirement it checks: `stats` is at least 50x faster per image than `preprocess`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

REQUIRED_RATIO = 50.0
BICUBIC = Image.Resampling.BICUBIC
GENERATOR_VERSION = 1
"""Bump when `make_photo` or `save_photo` change, so cached images are regenerated."""

# ---------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------


def make_photo(width: int, height: int, seed: int) -> Image.Image:
    """A photo-like RGB image: smooth colour gradients and soft blobs, hard edges, texture and grain.

    At JPEG quality 90 this compresses to roughly 2-3 bits per pixel, like camera photos; pure noise would
    be far bigger and slower to decode than real photos, flat colour far smaller and faster.
    """
    rng = np.random.default_rng(seed)
    w, h = width, height
    # Smooth background: a coarse random colour field, upsampled (sky / wall / bokeh gradients).
    coarse = rng.integers(30, 226, (4, 5, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((w, h), BICUBIC)
    mid = rng.integers(0, 256, (max(2, h // 150), max(2, w // 150), 3), dtype=np.uint8)
    image = Image.blend(image, Image.fromarray(mid).resize((w, h), BICUBIC), 0.3)
    # Soft blobs and hard-edged objects.
    draw = ImageDraw.Draw(image)
    side = min(w, h)
    for _ in range(25):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        r = int(rng.integers(side // 30, side // 5))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.ellipse((x - r, y - r, x + r, y + int(r * rng.uniform(0.6, 1.4))), fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(side / 200))  # soft, out-of-focus shapes
    draw = ImageDraw.Draw(image)
    for _ in range(30):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        r = int(rng.integers(side // 40, side // 8))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        points = [(x + int(rng.integers(-r, r)), y + int(rng.integers(-r, r))) for _ in range(5)]
        draw.polygon(points, fill=colour)
    for _ in range(40):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        ends = [(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(2)]
        draw.line(ends, fill=colour, width=int(rng.integers(1, max(2, side // 300))))
    image = image.filter(ImageFilter.GaussianBlur(0.8))  # lens softness on the edges
    # Texture (foliage, fabric) at a few pixels' scale, plus sensor grain.
    pixels = np.asarray(image).astype(np.int16)
    texture = rng.integers(0, 256, (h // 3 + 1, w // 3 + 1), dtype=np.uint8)
    texture = np.asarray(Image.fromarray(texture).resize((w, h), Image.Resampling.BILINEAR), dtype=np.int16)
    luminance = ((texture - 128) * 3) // 16 + rng.integers(-5, 6, (h, w), dtype=np.int16)
    pixels += luminance[:, :, None]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def camera_exif(seed: int, orientation: int) -> Image.Exif:
    """A camera-style EXIF block: make, model, date, orientation and a ~32 KB maker note."""
    rng = np.random.default_rng(seed)
    exif = Image.Exif()
    exif[0x010F] = "BenchCam"  # Make
    exif[0x0110] = "BC-12"  # Model
    exif[0x0112] = orientation  # Orientation
    exif[0x0132] = f"2024:05:17 10:{seed % 60:02d}:{seed * 7 % 60:02d}"  # DateTime
    sub = exif.get_ifd(0x8769)  # the Exif sub-IFD
    sub[0x829A] = 1 / 125  # ExposureTime
    sub[0x8827] = 200  # ISO
    sub[0x927C] = rng.integers(0, 256, 32 * 1024, dtype=np.uint8).tobytes()  # MakerNote
    return exif


def generate(directory: str, count: int, width: int, height: int) -> list[dict[str, Any]]:
    """Write `count` photos into `directory` (reused if already there); returns one dict per image."""
    os.makedirs(directory, exist_ok=True)
    images = []
    for i in range(count):
        path = os.path.join(directory, f"photo_{i:03d}.jpg")
        orientation = 6 if i % 2 else 1
        if not os.path.exists(path):
            tmp = path + ".tmp"
            make_photo(width, height, 1000 + i).save(
                tmp, "JPEG", quality=90, subsampling="4:2:0", exif=camera_exif(i, orientation)
            )
            os.replace(tmp, path)
        images.append({"path": path, "bytes": os.path.getsize(path), "orientation": orientation})
    return images


def link_farm(directory: str, files: list[str], copies: int) -> int:
    """`copies` hard links to each file under `directory` (distinct paths, so `stats` counts each)."""
    os.makedirs(directory, exist_ok=True)
    n = 0
    for c in range(copies):
        sub = os.path.join(directory, f"d{c // 50:03d}")
        os.makedirs(sub, exist_ok=True)
        for path in files:
            target = os.path.join(sub, f"{c:04d}_{os.path.basename(path)}")
            if not os.path.exists(target):
                try:
                    os.link(path, target)
                except OSError:  # no hard links on this file system: a symlink would be deduplicated
                    shutil.copyfile(path, target)
            n += 1
    return n


# ---------------------------------------------------------------------------------------------------------
# Measured cases, each run in a child process
# ---------------------------------------------------------------------------------------------------------


def warm_up(scratch: str) -> None:
    """One tiny JPEG through `stats` and `preprocess` first: Pillow loads its format plugins and the EXIF
    parser lazily, on first use, and that one-off import is not a per-image cost."""
    import vlmtile
    from vlmtile.stats import Column, compute_stats

    folder = tempfile.mkdtemp(dir=scratch)
    path = os.path.join(folder, "warm.jpg")
    make_photo(64, 48, 0).save(path, "JPEG", quality=90, exif=camera_exif(0, 6))
    strategy = vlmtile.get_strategy("internvl")
    compute_stats([path], [Column("internvl", strategy)], workers=1)
    config = vlmtile.RunConfig((path,), os.path.join(folder, "out"), strategy, workers=1, progress=False)
    vlmtile.preprocess(config)
    shutil.rmtree(folder)


def child(spec: dict[str, Any]) -> dict[str, Any]:
    import vlmtile
    from vlmtile.stats import Column, compute_stats

    warm_up(spec["scratch"])
    strategy = vlmtile.get_strategy("internvl")
    if spec["case"] == "stats":
        started = time.perf_counter()
        result = compute_stats([spec["input"]], [Column("internvl", strategy)], workers=spec["workers"])
        seconds = time.perf_counter() - started
        summary = result.to_json()["strategies"][0]
        return {"seconds": seconds, "images": summary["images"], "tokens": summary["total_tokens"]}
    config = vlmtile.RunConfig(
        inputs=(spec["input"],),
        output=spec["output"],
        strategy=strategy,
        format="parquet",
        dtype="float16",
        workers=spec["workers"],
        shard_size=spec["shard_size"],
        progress=False,
    )
    started = time.perf_counter()
    summary = vlmtile.preprocess(config)
    seconds = time.perf_counter() - started
    shutil.rmtree(spec["output"])
    return {"seconds": seconds, "images": summary.records, "tokens": summary.tokens, "bytes": summary.bytes}


def run_cli(spec: dict[str, Any]) -> dict[str, Any]:
    """The whole `vlmtile stats` command, timed from outside: interpreter start-up and imports included."""
    command = [sys.executable, "-m", "vlmtile", "stats", spec["input"], "-s", "internvl", "--json"]
    started = time.perf_counter()
    done = subprocess.run([*command, "--workers", str(spec["workers"])], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{command} failed:\n{done.stderr}")
    summary = json.loads(done.stdout)["strategies"][0]
    return {"seconds": seconds, "images": summary["images"], "tokens": summary["total_tokens"]}


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    if spec["case"] == "stats-cli":
        return run_cli(spec)
    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"child {spec} failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def wait_for_quiet(threshold: float, timeout: float) -> dict[str, Any]:
    """Poll the 1-minute load average until it is below `threshold`, for at most `timeout` seconds."""
    started = time.monotonic()
    first = os.getloadavg()[0]
    while True:
        load = os.getloadavg()[0]
        if load < threshold:
            return {
                "settled": True,
                "load_first": first,
                "load": load,
                "waited_s": time.monotonic() - started,
            }
        if time.monotonic() - started >= timeout:
            return {
                "settled": False,
                "load_first": first,
                "load": load,
                "waited_s": time.monotonic() - started,
            }
        print(f"  waiting for load < {threshold} (now {load:.2f})", file=sys.stderr, flush=True)
        time.sleep(min(15.0, max(1.0, timeout - (time.monotonic() - started))))


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, default=24, help="Number of photos [24].")
    parser.add_argument("--size", default="4000x3000", help="Photo size WxH [4000x3000 = 12 MP].")
    parser.add_argument("--links", type=int, default=2000, help="Hard-link copies for stats-big [2000].")
    parser.add_argument("--repeats", type=int, default=3, help="Repeats per case; medians reported [3].")
    parser.add_argument("--shard-size", type=int, default=6, help="preprocess shard size [6].")
    parser.add_argument("--data-dir", help="Where to keep the generated images [a cache under $TMPDIR].")
    parser.add_argument("--wait-load", type=float, default=0.7, help="Wait for 1-min load below this [0.7].")
    parser.add_argument("--wait-timeout", type=float, default=600, help="Longest wait in seconds [600].")
    parser.add_argument("--quick", action="store_true", help="4 photos, 300 links, 1 repeat, no waiting.")
    parser.add_argument("--json", help="Also write all results to this JSON file.")
    parser.add_argument("--markdown", help="Also write the results table as Markdown to this file.")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.quick:
        args.images, args.links, args.repeats, args.wait_timeout = 4, 300, 1, 0
    width, height = map(int, args.size.lower().split("x"))

    tag = hashlib.sha256(f"{GENERATOR_VERSION}-{width}x{height}".encode()).hexdigest()[:10]
    data_dir = args.data_dir or os.path.join(tempfile.gettempdir(), f"vlmtile-bench-stats-{tag}")
    photos_dir = os.path.join(data_dir, f"photos-{args.images}")
    started = time.perf_counter()
    images = generate(photos_dir, args.images, width, height)
    # A folder of exactly these images (older runs with more images leave more files in the cache).
    print(
        f"{len(images)} photos {width}x{height}, {sum(i['bytes'] for i in images) / 1e6:.1f} MB "
        f"({sum(i['bytes'] for i in images) * 8 / (width * height * len(images)):.2f} bits/pixel) "
        f"in {photos_dir} ({time.perf_counter() - started:.0f} s)",
        flush=True,
    )
    farm = os.path.join(data_dir, f"links-{args.images}x{args.links}")
    entries = link_farm(farm, [i["path"] for i in images], args.links)
    for image in images:  # into the page cache: every case reads warm files
        with open(image["path"], "rb") as f:
            while f.read(1 << 22):
                pass

    scratch = tempfile.mkdtemp(prefix="vlmtile-bench-stats-out-")
    cases = [
        ("stats", photos_dir, 1, len(images)),
        ("stats", photos_dir, 2, len(images)),
        ("stats-big", farm, 1, entries),
        ("stats-big", farm, 2, entries),
        ("stats-cli", photos_dir, 1, len(images)),
        ("preprocess", photos_dir, 1, len(images)),
        ("preprocess", photos_dir, 2, len(images)),
    ]

    def spec(case: str, folder: str, workers: int, rep: int) -> dict[str, Any]:
        return {
            "case": {"preprocess": "preprocess", "stats-cli": "stats-cli"}.get(case, "stats"),
            "scratch": scratch,
            "input": folder,
            "workers": workers,
            "shard_size": args.shard_size,
            "output": os.path.join(scratch, f"{case}-{workers}-{rep}"),
        }

    print("warm-up run of every case (not counted)", flush=True)
    for case, folder, workers, _ in cases:
        run_child(spec(case, folder, workers, -1))
    load = wait_for_quiet(args.wait_load, args.wait_timeout)
    settled = f"settled: {load['settled']}, waited {load['waited_s']:.0f} s"
    print(f"load before measuring: {load['load']:.2f} ({settled})", flush=True)
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for rep in range(args.repeats):
        for case, folder, workers, _ in cases:
            result = run_child(spec(case, folder, workers, rep))
            runs.setdefault((case, workers), []).append(result)
            print(f"  rep {rep}: {case:<10} workers={workers}: {result['seconds']:.3f} s", flush=True)
    load_after = os.getloadavg()[0]
    shutil.rmtree(scratch, ignore_errors=True)

    rows = []
    for case, _, workers, n in cases:
        results = runs[(case, workers)]
        assert all(r["images"] == n for r in results), (case, results)
        seconds = statistics.median(r["seconds"] for r in results)
        rows.append(
            {
                "case": case,
                "workers": workers,
                "images": n,
                "seconds": seconds,
                "all_seconds": [r["seconds"] for r in results],
                "images_per_s": n / seconds,
                "ms_per_image": 1000 * seconds / n,
                "tokens": results[0]["tokens"],
            }
        )
    by = {(r["case"], r["workers"]): r for r in rows}
    # Same images, same strategy: the token totals must agree (stats-big has `links` times as many).
    assert by[("stats", 1)]["tokens"] == by[("preprocess", 1)]["tokens"], "stats and preprocess disagree"
    ratios = {
        f"{case}/{w}w vs preprocess/{w}w": by[(case, w)]["images_per_s"]
        / by[("preprocess", w)]["images_per_s"]
        for case in ("stats", "stats-big")
        for w in (1, 2)
    }
    ratios["stats-cli/1w (whole command) vs preprocess/1w"] = (
        by[("stats-cli", 1)]["images_per_s"] / by[("preprocess", 1)]["images_per_s"]
    )
    scaling = {
        case: by[(case, 2)]["images_per_s"] / by[(case, 1)]["images_per_s"]
        for case in ("stats", "stats-big", "preprocess")
    }
    environment = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "pillow": Image.__version__,
        "load_before": load,
        "load_after": load_after,
        "images": len(images),
        "size": f"{width}x{height}",
        "mean_file_mb": sum(i["bytes"] for i in images) / len(images) / 1e6,
        "link_entries": entries,
        "repeats": args.repeats,
        "shard_size": args.shard_size,
    }

    lines = [
        "| case | workers | images | median time | images/s | ms/image |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['workers']} | {r['images']:,} | {r['seconds']:.3f} s | "
            f"{r['images_per_s']:,.1f} | {r['ms_per_image']:.3f} |"
        )
    lines.append("")
    for name, ratio in ratios.items():
        if name.startswith("stats-cli"):  # interpreter start-up dominates 24 images: context, not the check
            verdict = "start-up included; informational"
        else:
            verdict = "ok" if ratio >= REQUIRED_RATIO else f"BELOW the required {REQUIRED_RATIO:.0f}x"
        lines.append(f"- {name}: **{ratio:,.0f}x** faster per image ({verdict})")
    for name, value in scaling.items():
        lines.append(f"- {name}: 2 workers / 1 worker = {value:.2f}x")
    table = "\n".join(lines)
    print()
    print(table)
    print()
    print(json.dumps(environment, indent=2))
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(table + "\n")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(
                {"rows": rows, "ratios": ratios, "scaling": scaling, "environment": environment}, f, indent=2
            )


if __name__ == "__main__":
    main()
