"""vlmtile: offline dynamic-resolution tiling for vision-language-model training data.

The public API is small and stable: `list_strategies`, `get_strategy`, `open_dataset`, `preprocess`
(with `RunConfig`, `SourceOptions` and the per-sample `Budget`), and the errors. Everything else is an
implementation module.
"""

import os

__version__ = "0.1.0"

# pyarrow's allocator (mimalloc) keeps freed pages for later by default: after writing one Qwen image of
# 144 MB float16 a worker held on to ~290 MB it no longer used, and two workers on 4000x3000 photos peaked
# at 1.74 GiB. Returning them at once: 1.33 GiB, same speed (docs/performance.md#memory). Read by mimalloc
# when pyarrow loads, so it is set before any import below; a value the user set wins.
os.environ.setdefault("MIMALLOC_PURGE_DELAY", "0")

from .dataset import Dataset, open_dataset
from .errors import ImageError, RunStopped, VlmtileError
from .runner import RunConfig, RunSummary, preprocess
from .samples import SourceOptions
from .strategies import Plan, Result, Strategy, get_strategy, list_strategies
from .work import Budget

__all__ = [
    "Budget",
    "Dataset",
    "ImageError",
    "Plan",
    "Result",
    "RunConfig",
    "RunStopped",
    "RunSummary",
    "SourceOptions",
    "Strategy",
    "VlmtileError",
    "__version__",
    "get_strategy",
    "list_strategies",
    "open_dataset",
    "preprocess",
]
