"""`--fast`: shrink the source cheaply before the strategy's own resizes. Explicitly NOT bit-exact.

Strict mode decodes every pixel of a 12 MP photo and resamples all of them, although a model that wants
1792x1344 (InternVL, 12 tiles) or ~1 MP (Qwen at max_pixels 1003520) throws most of that detail away.
Fast mode spends less on the way there, in the two ways Pillow's own `Image.thumbnail` does:

- JPEG DCT-domain scaling on decode (`Image.draft`): libjpeg-turbo decodes at 1/2, 1/4 or 1/8 scale,
  skipping most of the inverse DCT; the largest reduction that keeps the image at least
  `DRAFT_MARGIN` times what the strategy's resizes produce (`Strategy.source_size`) is taken;
- box reduction (`Image.reduce(k)`) by the integer factor that keeps it at least `REDUCE_MARGIN` times
  that size, for other formats and whatever draft left over.

The strategy then resizes from the smaller source exactly as in strict mode: same filter, same plan,
same shapes, same token counts; only the pixel values differ slightly. The margins were chosen by
measurement (`benchmarks/bench_preprocess.py` reports the PSNR against strict output per strategy;
docs/performance.md): with them every strategy stays above 40 dB on the benchmark's photographs and
document scans. Where the model's target is about as large as the image (Qwen at its default 12.8 MP
budget, XComposer-2.5 on a 12 MP photo) there is nothing to skip, and fast mode is as fast as strict.
"""

from __future__ import annotations

import math

from PIL import Image

from .strategies import Plan, Strategy

DRAFT_MARGIN = 1.0
"""JPEG DCT scaling keeps the image at least this many times the strategy's largest resize target. The
decoder's scaled IDCT is itself a good low-pass filter: 1.0 measured >= 40.5 dB on every strategy (the
worst: InternVL on a 20 MP photo), 1.25 cost InternVL a quarter of its fast-mode speed-up."""
REDUCE_MARGIN = 3.0
"""Box reduction keeps the image at least this many times the target. Pillow's `reducing_gap` documentation
calls 2.0 indistinguishable from a direct resize, but on a 300-dpi text scan squashed to 224 px (xcomposer2)
or 256 patches (navit) 2.0 measured 39.7-40.2 dB, 3.0 40.5 dB."""

_TRANSPOSING = frozenset({5, 6, 7, 8})
"""EXIF orientations that swap width and height (`ImageOps.exif_transpose`)."""


class SourceReducer:
    """Fast mode for one image: plans from the header, drafts the JPEG decode, reduces what is left.

    `decode_image(data, draft=reducer.draft)` calls `draft` with the opened, not yet decoded image; the
    plan is made then, from the full size in the header, so it is the plan strict mode would make.
    """

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy
        self.plan: Plan | None = None
        """The plan made from the header (None when the image was not a JPEG: plan after decoding)."""

    def draft(self, image: Image.Image) -> tuple[int, int] | None:
        """The size to ask `Image.draft` for, or None to decode at full size."""
        if image.format != "JPEG":
            return None
        width, height = image.size
        turned = self.strategy.exif_transpose and _orientation(image) in _TRANSPOSING
        try:
            self.plan = self.strategy.plan(*((height, width) if turned else (width, height)))
        except ValueError:  # refused by the strategy: decode as usual, the refusal is reported later
            return None
        need_w, need_h = self.strategy.source_size(self.plan)
        if turned:
            need_w, need_h = need_h, need_w
        return math.ceil(need_w * DRAFT_MARGIN), math.ceil(need_h * DRAFT_MARGIN)

    def reduce(self, image: Image.Image, plan: Plan) -> Image.Image:
        """Box-reduce an RGB image by the largest integer factor that keeps `REDUCE_MARGIN` x the target."""
        need_w, need_h = self.strategy.source_size(plan)
        factor = min(
            image.width // max(1, math.ceil(need_w * REDUCE_MARGIN)),
            image.height // max(1, math.ceil(need_h * REDUCE_MARGIN)),
        )
        return image.reduce(factor) if factor >= 2 else image


def _orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a damaged EXIF block: strict mode reports it when it transposes
        return 1
    return value if isinstance(value, int) else 1
