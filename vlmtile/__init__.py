"""vlmtile: offline dynamic-resolution tiling for vision-language-model training data.

The public API is small and stable: `list_strategies`, `get_strategy`, `open_dataset`, `preprocess`
(with `RunConfig`, `SourceOptions` and the per-sample `Budget`), and the errors. Everything else is an
implementation module.
"""

__version__ = "0.1.0"

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
