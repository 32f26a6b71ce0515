#!/usr/bin/env python
"""Throughput benchmark: `--executor local` against `--executor ray` on 1 and 2 CPUs, and Ray's start-up.

Standalone script, not part of the test suite (needs `pip install ".[ray]"`). It generates its own images
(deterministic, no downloads): by default 32 photo-like 2000x1500 JPEGs, tiled for InternVL (up to 12
tiles, float16 Parquet) in tasks of 2 images (16 tasks, so that 2 CPUs have work to share). Cases:

  local-N   `preprocess(RunConfig(..., executor="local", workers=N))`: the process pool
  ray-N     `ray.init(address="local", num_cpus=N)` first (timed apart: "ray start"), then
            `preprocess(RunConfig(..., executor="ray"))` on it (the run; Ray's worker processes start
            inside it, as they would in a real run), then `ray.shutdown()` (timed apart too)

Every measured run happens in a fresh child process; times are taken inside the child around the calls
only (interpreter start-up and imports are not counted). The images are read once before the first
measurement, so every case reads them from the page cache. Cases are interleaved across repeats and
medians reported. Before each repeat the script waits, up to --wait-timeout seconds, for the 1-minute
load average to drop below --wait-load: the machine is shared with other work, and numbers from a busy
machine say more about the neighbours than about vlmtile.

    python benchmarks/bench_distributed.py                  # 32 images, 3 repeats, ~5 min
    python benchmarks/bench_distributed.py --quick          # 8 images, 1 repeat, smoke run
    python benchmarks/bench_distributed.py --json out.json --markdown section.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from typing import Any

import numpy as np
from bench_stats import wait_for_quiet
from PIL import Image, ImageFilter

CHILD = r"""
import json, sys, time
case, folder, out, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
import vlmtile
config = dict(inputs=(folder,), output=out, strategy=vlmtile.get_strategy("internvl"), shard_size=2,
              progress=False, dtype="float16")
result = {}
if case == "local":
    start = time.perf_counter()
    summary = vlmtile.preprocess(vlmtile.RunConfig(workers=workers, **config))
    result["run"] = time.perf_counter() - start
else:
    import logging
    import ray
    start = time.perf_counter()
    ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR)
    result["start"] = time.perf_counter() - start
    start = time.perf_counter()
    summary = vlmtile.preprocess(vlmtile.RunConfig(executor="ray", **config))
    result["run"] = time.perf_counter() - start
    start = time.perf_counter()
    ray.shutdown()
    result["stop"] = time.perf_counter() - start
result["records"] = summary.records
print(json.dumps(result))
"""


def make_photo(width: int, height: int, seed: int) -> Image.Image:
    """Smooth gradients, edges and noise: what a JPEG decoder and a BICUBIC resampler meet in photos."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.empty((height, width, 3), np.float32)
    for c in range(3):
        fx, fy = rng.uniform(0.5, 4, size=2)
        img[..., c] = 128 + 80 * np.sin(2 * np.pi * (fx * x / width + fy * y / height) + rng.uniform(0, 6))
    img += rng.normal(0, 8, size=img.shape).astype(np.float32)
    image = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    return image.filter(ImageFilter.GaussianBlur(0.6))


def run_case(case: str, folder: str, workers: int, scratch: str) -> dict[str, Any]:
    out = tempfile.mkdtemp(dir=scratch)
    try:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, case, folder, out, str(workers)],
            capture_output=True,
            text=True,
            check=False,
            timeout=1800,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{case}-{workers} failed: {done.stderr[-2000:]}")
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return result
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", default="2000x1500")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="8 images, 1 repeat")
    parser.add_argument("--wait-load", type=float, default=1.0)
    parser.add_argument("--wait-timeout", type=float, default=120.0)
    parser.add_argument("--json", help="write the raw results here")
    parser.add_argument("--markdown", help="write the results table here")
    args = parser.parse_args()
    if args.quick:
        args.images, args.repeats = 8, 1
    width, height = map(int, args.size.split("x"))

    scratch = tempfile.mkdtemp(prefix="vlmtile-bench-distributed-")
    try:
        folder = os.path.join(scratch, "images")
        os.makedirs(folder)
        for i in range(args.images):
            make_photo(width, height, i).save(os.path.join(folder, f"photo{i:03d}.jpg"), quality=90)
        for name in os.listdir(folder):  # into the page cache
            with open(os.path.join(folder, name), "rb") as f:
                f.read()
        cases = [("local", 1), ("ray", 1), ("local", 2), ("ray", 2)]
        results: dict[str, list[dict[str, Any]]] = {f"{c}-{w}": [] for c, w in cases}
        loads = []
        for repeat in range(args.repeats):
            loads.append(wait_for_quiet(args.wait_load, args.wait_timeout)["load"])
            for case, workers in cases:
                result = run_case(case, folder, workers, scratch)
                assert result["records"] == args.images, result
                results[f"{case}-{workers}"].append(result)
                print(f"repeat {repeat + 1}: {case}-{workers}: {json.dumps(result)}", file=sys.stderr)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    rate = {name: args.images / median(name, "run") for name in results}
    lines = [
        f"{args.images} JPEGs of {width}x{height}, InternVL (max 12 tiles), float16 Parquet, "
        f"tasks of 2 images; {args.repeats} repeats, medians; load average before the repeats: "
        f"{', '.join(f'{x:.2f}' for x in loads)}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}",
        "",
        "| case | run (s) | images/s | vs local, same CPUs | vs itself on 1 CPU |",
        "|---|---|---|---|---|",
    ]
    for case, workers in cases:
        name = f"{case}-{workers}"
        same = rate[name] / rate[f"local-{workers}"]
        scale = rate[name] / rate[f"{case}-1"]
        lines.append(
            f"| `{name}` | {median(name, 'run'):.2f} | {rate[name]:.2f} | {same:.2f}x | {scale:.2f}x |"
        )
    starts = [r["start"] for name in ("ray-1", "ray-2") for r in results[name]]
    stops = [r["stop"] for name in ("ray-1", "ray-2") for r in results[name]]
    lines += [
        "",
        f"Ray start-up (`ray.init` of a local instance): median {statistics.median(starts):.1f} s "
        f"(min {min(starts):.1f}, max {max(starts):.1f}); shutdown: median {statistics.median(stops):.1f} s.",
    ]
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(table + "\n")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "results": results, "loads": loads}, f, indent=2)


if __name__ == "__main__":
    main()
