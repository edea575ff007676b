"""The only module that touches ``torch.ops.distopt``: loading, availability, fake impls.

Each op's schema is in ``csrc/registration.cpp``; fake (meta) implementations here let
the ops run under ``torch.compile``/FakeTensor and pass ``torch.library.opcheck``.
"""

from __future__ import annotations

import torch

from . import _build

_fakes_registered = False


def available(device: torch.device) -> bool:
    """Whether fused kernels exist for tensors on ``device`` (built on first call)."""
    if device.type != "cpu":
        return False
    if not _build.load():
        return False
    _register_fakes()
    return True


def ops():
    """``torch.ops.distopt`` (call :func:`available` first)."""
    return torch.ops.distopt


def _register_fakes() -> None:
    global _fakes_registered
    if _fakes_registered:
        return
    _fakes_registered = True

    def nothing(*args, **kwargs) -> None:
        return None

    for name in ("adamw32_", "adamw8bit_", "sgd32_", "sgd8bit_"):
        torch.library.register_fake(f"distopt::{name}")(nothing)

    @torch.library.register_fake("distopt::adamw8bit_new_absmax")
    def _(param, grad, exp_avg, exp_avg_absmax, exp_avg_sq, exp_avg_sq_absmax, max_exp_avg_sq, *rest):
        return param.new_empty((3 if max_exp_avg_sq is not None else 2,), dtype=torch.float32)

    @torch.library.register_fake("distopt::sgd8bit_new_absmax")
    def _(param, *rest):
        return param.new_empty((1,), dtype=torch.float32)

    @torch.library.register_fake("distopt::row_sumsq")
    def _(grad):
        rows = grad.shape[0] if grad.dim() >= 1 else 1
        return grad.new_empty((rows,), dtype=torch.float64)

    @torch.library.register_fake("distopt::quantize_blockwise")
    def _(x, qmap, block_wise):
        from .quant import absmax_shape

        return x.new_empty(x.shape, dtype=torch.uint8), x.new_empty(absmax_shape(x.shape, block_wise))

    @torch.library.register_fake("distopt::dequantize_blockwise")
    def _(codes, absmax, qmap):
        return codes.new_empty(codes.shape, dtype=torch.float32)
