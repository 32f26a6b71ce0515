"""`vlmtile inspect`: one explanatory PNG per image and strategy, for every registered strategy."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from conftest import SAMPLE_DIR
from e2e_helpers import MakeImage, save_image
from PIL import Image

import vlmtile
from vlmtile import visualize
from vlmtile.cli import cli
from vlmtile.decode import load_image
from vlmtile.strategies import get_strategy

PHOTO = SAMPLE_DIR / "coffee_600x400.jpg"
CAPTION_LINES = 2  # at least: sizes and grid, then tiles and tokens


def run(*args: str | Path, catch: bool = False) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=catch)


def displayed_canvas(plan: vlmtile.Plan) -> tuple[int, int]:
    """The size the canvas is drawn at: the resized canvas, its longest side capped at MAX_CANVAS."""
    scale = min(1.0, visualize.MAX_CANVAS / max(plan.resized_width, plan.resized_height))
    return round(plan.resized_width * scale), round(plan.resized_height * scale)


def colours(image: Image.Image) -> set[tuple[int, int, int]]:
    return {c for _, c in image.getcolors(image.width * image.height) or []}


@pytest.mark.parametrize("name", vlmtile.list_strategies())
def test_inspect_writes_png_for_every_strategy(name: str, tmp_path: Path) -> None:
    out = tmp_path / "picture.png"
    result = run("inspect", PHOTO, "-s", name, "-o", out, catch=True)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 0, result.output

    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as picture:
        picture.load()
    assert picture.mode == "RGB"
    assert result.stdout.strip() == f"{out}: {picture.width}x{picture.height}"

    strategy = get_strategy(name)
    image = strategy.prepare(load_image(PHOTO))
    plan = strategy.plan(*image.size)
    views = strategy.views(strategy.render(image, plan), plan)
    width, height = displayed_canvas(plan)
    assert picture.width >= width + 2 * visualize.GAP
    assert picture.height >= height + CAPTION_LINES * 22 + 2 * visualize.GAP
    seen = colours(picture)
    assert len(seen) > 1000  # the photo is there, not a blank canvas
    if len(plan.tile_boxes) > 1:
        assert visualize.TILE_COLOUR in seen  # tile grid and indices are drawn opaque
    if plan.content_box is not None:
        assert visualize.PAD_COLOUR in seen  # padding is hatched
    if len(views) > 1:  # the thumbnail / global view is drawn beside the canvas
        assert picture.width > width + 3 * visualize.GAP


PATCH_STRATEGIES = [
    name
    for name in vlmtile.list_strategies()
    if "image_grid_thw" in dict(get_strategy(name).plan(448, 448).extra)
]


@pytest.mark.parametrize("name", PATCH_STRATEGIES)
def test_patch_strategies_show_the_patch_grid(name: str) -> None:
    """On a flat grey image, the drawn canvas is grey except for patch lines at every patch boundary."""
    strategy = get_strategy(name)
    grey = (128, 128, 128)
    picture = visualize.inspect_image(Image.new("RGB", (448, 448), grey), strategy)
    plan = strategy.plan(448, 448)
    _, _, grid_w = dict(plan.extra)["image_grid_thw"]
    assert (plan.resized_width, plan.resized_height) == (448, 448)  # drawn at scale 1
    step = 448 // grid_w
    assert step * grid_w == 448 and step >= 4
    left, top = visualize.GAP, visualize.GAP + 22  # where the canvas is pasted
    row = top + step // 2 + step  # inside the second row of patches: no horizontal line
    for i in range(1, grid_w):
        assert picture.getpixel((left + i * step, row)) != grey, f"no patch line at patch column {i}"
        assert picture.getpixel((left + i * step + step // 2, row)) == grey, "overlay inside a patch"


def test_default_output_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = run("inspect", PHOTO, "-s", "internvl2")  # an alias: the file is named after the canonical name
    assert result.exit_code == 0, result.output
    expected = tmp_path / "inspect-coffee_600x400-internvl.png"
    assert expected.is_file()
    assert result.stdout.startswith("inspect-coffee_600x400-internvl.png: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == [expected.name]


def test_strategy_options_change_the_picture(tmp_path: Path) -> None:
    one, six = tmp_path / "one.png", tmp_path / "six.png"
    assert run("inspect", PHOTO, "-s", "internvl", "--max-tiles", "1", "-o", one).exit_code == 0
    assert run("inspect", PHOTO, "-s", "internvl", "--max-tiles", "6", "-o", six).exit_code == 0
    with Image.open(one) as a, Image.open(six) as b:
        assert a.size != b.size
        assert visualize.TILE_COLOUR in colours(b.convert("RGB"))


def test_caption_names_sizes_grid_and_tokens() -> None:
    strategy = get_strategy("internvl", max_tiles=6)
    plan = strategy.plan(600, 400)
    text = "\n".join(visualize.caption(strategy, plan))
    cols, rows = plan.grid
    assert "internvl[max_tiles=6]" in text
    assert f"600x400 -> canvas {plan.resized_width}x{plan.resized_height}, grid {cols}x{rows}" in text
    assert "thumbnail" in text
    assert f"{plan.num_tiles} tiles, {plan.num_tokens:,} visual tokens" in text
    qwen = get_strategy("qwen2-vl")
    assert "image_grid_thw=[1, " in "\n".join(visualize.caption(qwen, qwen.plan(600, 400)))


def test_small_image_is_enlarged_and_exif_is_honoured(tmp_path: Path) -> None:
    tiny = SAMPLE_DIR / "tiny_16x12.png"
    out = tmp_path / "tiny.png"
    assert run("inspect", tiny, "-s", "qwen2-vl", "-o", out).exit_code == 0
    with Image.open(out) as picture:
        assert min(picture.size) >= 160  # a 28x28 canvas is drawn big enough to see its patches

    photo = SAMPLE_DIR / "grace_hopper_exif_orientation6.jpg"  # stored 600x512
    pictures = {}
    for flag in ("--no-exif-transpose", "--exif-transpose"):
        path = tmp_path / f"{flag}.png"
        assert run("inspect", photo, "-s", "qwen2-vl", flag, "-o", path).exit_code == 0
        with Image.open(path) as picture:
            pictures[flag] = picture.size
    strategy = get_strategy("qwen2-vl", exif_transpose=True)
    image = strategy.prepare(load_image(photo))
    assert image.size == (512, 600)
    assert pictures["--no-exif-transpose"] != pictures["--exif-transpose"]


def test_inspect_errors(tmp_path: Path, make_image: MakeImage) -> None:
    assert run("inspect", PHOTO, "-s", "no-such-model").exit_code == 2
    assert run("inspect", tmp_path / "missing.jpg", "-s", "internvl").exit_code == 2
    assert run("inspect", tmp_path, "-s", "internvl").exit_code == 2  # a directory
    assert run("inspect", PHOTO, "-s", "qwen2-vl", "--max-tiles", "3").exit_code == 2

    text = tmp_path / "not_an_image.jpg"
    text.write_text("hello\n")
    result = run("inspect", text, "-s", "internvl", "-o", tmp_path / "x.png")
    assert result.exit_code == 1 and "not an image" in result.stderr

    thin = tmp_path / "thin.png"
    save_image(make_image(402, 2, "RGB", 0), thin, "PNG")
    result = run("inspect", thin, "-s", "qwen2-vl", "-o", tmp_path / "y.png")
    assert result.exit_code == 1 and "refused by qwen2-vl" in result.stderr
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()
