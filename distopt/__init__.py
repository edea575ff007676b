"""distopt: memory-light optimizers (8-bit state) for distributed PyTorch training.

The bitsandbytes optimizer API (``SGD``, ``SGD8bit``, ``SGD32bit``, ``AdamW``,
``AdamW8bit``, ``AdamW32bit``, ``PagedAdamW``, ``PagedAdamW8bit``, ``PagedAdamW32bit``)
with fused C++ kernels, a pure-PyTorch reference, and results that do not depend on
the thread count or on where an element sits.
"""

from .functional import get_backend, set_backend
from .optim import (
    SGD,
    AdamW,
    AdamW8bit,
    AdamW32bit,
    PagedAdamW,
    PagedAdamW8bit,
    PagedAdamW32bit,
    SGD8bit,
    SGD32bit,
)

__version__ = "0.1.0"

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
    "get_backend",
    "set_backend",
]
