"""`inspect`: one picture that explains what a strategy does to one image.

The picture is drawn from the strategy's own output (`render`, then `views` to undo the model layout), so
it shows the pixels the model gets: the resized canvas with the tile grid and tile indices, padding
hatched, patch / merge grids for patch strategies, the thumbnail or global view beside it, and a caption
with sizes, grid and tokens.
"""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

from .strategies import Plan, Strategy, describe

MAX_CANVAS = 900
"""Longest side of the drawn canvas in the picture, in pixels."""
GAP = 16
TILE_COLOUR = (255, 214, 0)
PAD_COLOUR = (220, 40, 60)
PATCH_COLOUR = (0, 200, 255)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError):  # Pillow built without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def caption(strategy: Strategy, plan: Plan) -> list[str]:
    cols, rows = plan.grid
    lines = [
        f"{describe(strategy)}: {plan.orig_width}x{plan.orig_height} -> canvas "
        f"{plan.resized_width}x{plan.resized_height}, grid {cols}x{rows}"
        f"{' + thumbnail/global view' if plan.thumbnail else ''}",
        f"{plan.num_tiles} tile{'s' if plan.num_tiles != 1 else ''}, {plan.num_tokens:,} visual tokens, "
        f"pixel_values {tuple(plan.shape)}",
    ]
    extra = ", ".join(f"{k}={_short(v)}" for k, v in plan.extra)
    if extra:
        lines.append(extra)
    return lines


def _short(value: object, limit: int = 6) -> str:
    """A metadata value for a caption line: long lists (navit's kept_patches) cut to their first items."""
    if isinstance(value, tuple | list):
        if len(value) > limit:
            return f"[{', '.join(map(str, value[:limit]))}, ... ({len(value)} items)]"
        return str(list(value))
    return str(value)


def _hatch(draw: ImageDraw.ImageDraw, box: tuple[float, float, float, float], step: int = 10) -> None:
    left, top, right, bottom = box
    if right - left < 1 or bottom - top < 1:
        return
    draw.rectangle(box, outline=PAD_COLOUR, width=1)
    span = int((right - left) + (bottom - top))
    for offset in range(0, span, step):
        # Clip each diagonal to the box by walking its end points.
        x0, y0 = left + offset, top
        x1, y1 = left + offset - (bottom - top), bottom
        if x0 > right:
            y0 += x0 - right
            x0 = right
        if x1 < left:
            y1 -= left - x1
            x1 = left
        draw.line((x0, y0, x1, y1), fill=PAD_COLOUR, width=1)


def _padding_boxes(plan: Plan) -> list[tuple[int, int, int, int]]:
    if plan.content_box is None:
        return []
    left, top, right, bottom = plan.content_box
    w, h = plan.resized_width, plan.resized_height
    boxes = [(0, 0, w, top), (0, bottom, w, h), (0, top, left, bottom), (right, top, w, bottom)]
    return [b for b in boxes if b[2] > b[0] and b[3] > b[1]]


def inspect_image(image: Image.Image, strategy: Strategy) -> Image.Image:
    """The explanatory picture for `image` under `strategy`."""
    rgb = strategy.prepare(image)
    plan = strategy.plan(*rgb.size)
    views = strategy.views(strategy.render(rgb, plan), plan)
    (canvas_label, canvas), others = views[0], views[1:]

    scale = min(1.0, MAX_CANVAS / max(plan.resized_width, plan.resized_height))
    size = (max(1, round(plan.resized_width * scale)), max(1, round(plan.resized_height * scale)))
    shown = Image.fromarray(canvas).resize(
        size, Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BOX
    )
    if scale > 1 or size[0] < 160:  # tiny canvases: enlarge so the grid stays visible
        factor = max(1, 160 // max(1, min(size)))
        scale *= factor
        size = (size[0] * factor, size[1] * factor)
        shown = shown.resize(size, Image.Resampling.NEAREST)

    overlay = shown.convert("RGBA")
    layer = Image.new("RGBA", overlay.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)

    def scaled(box: tuple[int, int, int, int]) -> tuple[float, float, float, float]:
        return (box[0] * scale, box[1] * scale, box[2] * scale - 1, box[3] * scale - 1)

    for box in _padding_boxes(plan):
        _hatch(draw, scaled(box))
    extra = dict(plan.extra)
    grid = extra["image_grid_thw"][1:] if "image_grid_thw" in extra else extra.get("grid_hw")
    if grid is not None:  # patch strategies: patch lines where they are at least 4 px apart, merge lines
        grid_h, grid_w = grid
        step_x, step_y = size[0] / grid_w, size[1] / grid_h
        merge = int(getattr(strategy, "merge_size", 1))
        for every, alpha in ((1, 70), (merge, 200)) if merge > 1 else ((1, 120),):
            if min(step_x, step_y) * every < 4:
                continue
            for i in range(0, grid_w + 1, every):
                draw.line((i * step_x, 0, i * step_x, size[1]), fill=(*PATCH_COLOUR, alpha))
            for j in range(0, grid_h + 1, every):
                draw.line((0, j * step_y, size[0], j * step_y), fill=(*PATCH_COLOUR, alpha))
    font = _font(max(12, min(28, int(min(size) / 12))))
    if len(plan.tile_boxes) > 1 or grid is None:
        for index, box in enumerate(plan.tile_boxes):
            draw.rectangle(scaled(box), outline=(*TILE_COLOUR, 255), width=2)
            cx, cy = (box[0] + box[2]) / 2 * scale, (box[1] + box[3]) / 2 * scale
            draw.text(
                (cx, cy),
                str(index),
                fill=(*TILE_COLOUR, 255),
                font=font,
                anchor="mm",
                stroke_width=2,
                stroke_fill=(0, 0, 0, 255),
            )
    shown = Image.alpha_composite(overlay, layer).convert("RGB")

    label_font = _font(15)
    side = [(label, Image.fromarray(view)) for label, view in others]
    side = [
        (
            label,
            im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))))
            if scale < 1
            else im,
        )
        for label, im in side
    ]
    lines = [canvas_label, *caption(strategy, plan)]
    width = size[0] + sum(GAP + im.width for _, im in side) + 2 * GAP
    text_height = 22 * len(lines) + GAP
    height = max([size[1], *[im.height + 22 for _, im in side]]) + 22 + text_height + 2 * GAP
    longest = max(draw.textlength(line, font=label_font) for line in lines)
    picture = Image.new("RGB", (max(width, int(longest) + 2 * GAP), height), (250, 250, 250))
    pen = ImageDraw.Draw(picture)
    pen.text((GAP, GAP), "model input (resized canvas)", fill=(40, 40, 40), font=label_font)
    picture.paste(shown, (GAP, GAP + 22))
    x = GAP + size[0] + GAP
    for label, im in side:
        pen.text((x, GAP), label, fill=(40, 40, 40), font=label_font)
        picture.paste(im, (x, GAP + 22))
        x += im.width + GAP
    y = GAP + 22 + max([size[1], *[im.height for _, im in side]]) + GAP
    for line in lines:
        pen.text((GAP, y), line, fill=(20, 20, 20), font=label_font)
        y += 22
    return picture
