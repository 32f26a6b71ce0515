"""Regenerate docs/img/inspect-*.png: one `vlmtile inspect` picture per registered strategy.

Run from the repository root after `pip install .`:  python docs/make_pictures.py
Each picture is made by the `vlmtile inspect` command itself, on a sample image that shows the strategy's
geometry well (a wide photo, so tiling, padding and thumbnails are all visible).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import vlmtile

ROOT = Path(__file__).resolve().parent.parent
IMAGE = ROOT / "sample_data" / "coffee_600x400.jpg"
EXTRA_OPTIONS = {
    # Keep the picture readable: Qwen's default budget gives a dense patch grid.
    "qwen2-vl": ["--max-pixels", "200704"],
    "qwen2.5-vl": ["--max-pixels", "200704"],
    "qwen3-vl": ["--max-pixels", "262144"],
    # Show token dropping: the dropped patches are drawn grey.
    "navit": ["--drop-rate", "0.25"],
}


def main() -> None:
    out = ROOT / "docs" / "img"
    out.mkdir(parents=True, exist_ok=True)
    for name in vlmtile.list_strategies():
        target = out / f"inspect-{name}.png"
        command = [
            "vlmtile",
            "inspect",
            str(IMAGE),
            "-s",
            name,
            "-o",
            str(target),
            *EXTRA_OPTIONS.get(name, []),
        ]
        subprocess.run(command, check=True)
    print(f"{len(vlmtile.list_strategies())} pictures in {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
