"""vlmtile: offline dynamic-resolution tiling for vision-language-model training data.

The public API is small and stable: `list_strategies`, `get_strategy`, `open_dataset`, `preprocess`
(with `RunConfig`), and the errors. Everything else is an implementation module.
"""

__version__ = "0.1.0"

from .dataset import Dataset, open_dataset
from .errors import ImageError, VlmtileError
from .runner import RunConfig, RunSummary, preprocess
from .strategies import Plan, Result, Strategy, get_strategy, list_strategies

__all__ = [
    "Dataset",
    "ImageError",
    "Plan",
    "Result",
    "RunConfig",
    "RunSummary",
    "Strategy",
    "VlmtileError",
    "__version__",
    "get_strategy",
    "list_strategies",
    "open_dataset",
    "preprocess",
]
