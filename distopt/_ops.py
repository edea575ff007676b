"""The only module that touches ``torch.ops.distopt``: loading, availability, fake impls.

Each op's schema is in ``csrc/registration.cpp``; fake (meta) implementations here let
the ops run under ``torch.compile``/FakeTensor and pass ``torch.library.opcheck``.
The dispatcher picks each op's CPU or CUDA kernel from its tensors' device; CUDA kernels
exist when the library was built with them (``_build.cuda_loaded``, docs/cuda.md).
"""

from __future__ import annotations

import torch

from . import _build

_fakes_registered = False


def available(device: torch.device) -> bool:
    """Whether fused kernels exist for tensors on ``device`` (built on first call)."""
    if device.type not in ("cpu", "cuda"):
        return False
    if not _build.load():
        return False
    if device.type == "cuda":
        if not (_build.cuda_loaded() and torch.cuda.is_available()):
            return False
        if not _build.cuda_runs_on(torch.cuda.get_device_capability(device)):
            return False  # e.g. a V100 (7.0) and the default 8.0;9.0+PTX: the reference path runs
    _register_fakes()
    return True


def _need_cuda(op: str) -> None:
    if not (_build.load() and _build.cuda_loaded()):
        raise RuntimeError(f"distopt: {op} needs distopt's CUDA kernels, which are not built here (docs/cuda.md)")


def managed_empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialized tensor in CUDA unified memory (``cudaMallocManaged``) on ``device``
    (a CUDA device); its memory is freed (``cudaFree``) when its storage dies."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"distopt: managed memory is for CUDA devices, not {device}")
    _need_cuda("managed_empty")
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.ops.distopt.managed_empty(list(shape), dtype, index)


def managed_prefetch(t: torch.Tensor, device: torch.device) -> None:
    """Prefetch managed tensor ``t``'s bytes to ``device`` (a CUDA device, or ``cpu`` for
    the host), asynchronously on the current stream (``cudaMemPrefetchAsync``)."""
    device = torch.device(device)
    if device.type == "cpu":
        index = -1
    elif device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
    else:
        raise ValueError(f"distopt: managed memory prefetches to a CUDA device or the CPU, not {device}")
    _need_cuda("managed_prefetch")
    torch.ops.distopt.managed_prefetch_(t, index)


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

    for name in (
        "adamw32_",
        "adamw8bit_",
        "sgd32_",
        "sgd8bit_",
        "adamw32_multi_",
        "sgd32_multi_",
        "adamw8bit_multi_",
        "sgd8bit_multi_",
        "add_one_",
        "managed_prefetch_",
    ):
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

    @torch.library.register_fake("distopt::managed_empty")
    def _(size, dtype, device):
        return torch.empty(size, dtype=dtype, device=torch.device("cuda", device))

    @torch.library.register_fake("distopt::dequantize_blockwise")
    def _(codes, absmax, qmap):
        return codes.new_empty(codes.shape, dtype=torch.float32)
