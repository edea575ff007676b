"""distopt's optimizers: the bitsandbytes optimizer API on distopt's kernels."""

from .adamw import AdamW, AdamW8bit, AdamW32bit, PagedAdamW, PagedAdamW8bit, PagedAdamW32bit
from .base import QuantizedOptimizer
from .sgd import SGD, SGD8bit, SGD32bit

__all__ = [
    "SGD",
    "SGD8bit",
    "SGD32bit",
    "AdamW",
    "AdamW8bit",
    "AdamW32bit",
    "PagedAdamW",
    "PagedAdamW8bit",
    "PagedAdamW32bit",
    "QuantizedOptimizer",
]
