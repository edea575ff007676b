"""SGD with 8-bit or 32-bit momentum: ``SGD``, ``SGD8bit``, ``SGD32bit``."""

from __future__ import annotations

from typing import Any

from .. import functional as F
from .base import QuantizedOptimizer, check_number

_ALGORITHM = """
    torch.optim.SGD's semantics, dampening and Nesterov included. For each parameter
    ``p`` with gradient ``g`` (arithmetic in fp32; an 8-bit momentum buffer is
    dequantized before and requantized after)::

        g = g * gnorm_scale                      # percentile clipping, else 1
        g = g + weight_decay * p
        if momentum != 0:
            buf = g                              on the first step
            buf = momentum * buf + (1 - dampening) * g   afterwards
            g = g + momentum * buf if nesterov else buf
        p = p - lr * g

    With ``momentum == 0`` there is no state. The 8-bit momentum buffer uses the signed
    dynamic map in blocks of 256 elements that never cross a dim-0 row; a parameter
    keeps 8-bit state when ``optim_bits == 8``, it has at least ``min_8bit_size``
    elements and rows of at least 16 elements (1-D parameters keep 32-bit state).
    Non-finite gradients leave the element's block (8-bit) or the element (32-bit)
    untouched for that step.
"""

_ARGUMENTS = """
    Args:
        params: parameters to optimize, or dicts defining param groups. A group may
            set ``lr``, ``momentum``, ``dampening``, ``weight_decay``, ``nesterov`` and
            also ``optim_bits``, ``min_8bit_size``, ``percentile_clipping`` and
            ``block_wise`` for its own parameters.
        lr: learning rate (required).
        momentum: momentum factor, >= 0 (default 0).
        dampening: dampening of the momentum, in [0, 1] (default 0).
        weight_decay: L2 penalty added to the gradient, >= 0 (default 0).
        nesterov: Nesterov momentum; needs momentum > 0 and dampening 0 (default False).{bits}
        args: an object (or mapping) whose attributes ``optim_bits``,
            ``min_8bit_size``, ``percentile_clipping`` and ``block_wise`` override the
            keyword values; missing ones fall back to them.
        min_8bit_size: parameters with fewer elements (whole-parameter count) keep
            32-bit state (default 4096).
        percentile_clipping: keep the last 100 squared gradient norms of each
            parameter and scale its gradient down to the norm at this percentile when
            the current norm is above it; 100 disables clipping (default 100).
        block_wise: quantize in blocks of 256 elements of one dim-0 row, each with its
            own absmax (default True); False uses one absmax per tensor.
"""
_BITS = """
        optim_bits: bits of the momentum buffer, 8 or 32 (default 32)."""


class SGD(QuantizedOptimizer):
    __doc__ = (
        "SGD with an 8-bit or 32-bit momentum buffer (``optim_bits``).\n" + _ALGORITHM + _ARGUMENTS.format(bits=_BITS)
    )

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        optim_bits: int = 32,
        args: Any = None,
        min_8bit_size: int = 4096,
        percentile_clipping: int = 100,
        block_wise: bool = True,
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)
        super().__init__(
            params,
            defaults,
            optim_bits=optim_bits,
            args=args,
            min_8bit_size=min_8bit_size,
            percentile_clipping=percentile_clipping,
            block_wise=block_wise,
            is_paged=False,
        )

    def check_hyperparameters(self, group) -> None:
        check_number("lr", group["lr"], 0.0)
        check_number("momentum", group["momentum"], 0.0)
        check_number("dampening", group["dampening"], 0.0, 1.0)
        check_number("weight_decay", group["weight_decay"], 0.0)
        if not isinstance(group["nesterov"], bool):
            raise ValueError(f"Invalid nesterov: {group['nesterov']!r} (expected True or False)")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("Invalid nesterov: Nesterov momentum requires momentum > 0 and dampening 0")

    def state_slots(self, group):
        return [("momentum_buffer", True)] if group["momentum"] != 0 else []

    family = "SGD"
    all_slots = ("momentum_buffer",)
    update_fn = staticmethod(F.sgd_update)
    new_absmax_fn = staticmethod(F.sgd_new_absmax)
    update_multi_fn = staticmethod(F.sgd32_multi_update)
    update_multi8_fn = staticmethod(F.sgd8bit_multi_update)

    def coefficients(self, s) -> F.SGDCoeffs:
        g = s.group
        # torch.optim.SGD: the buffer is the (decayed) gradient on its first step
        first_step = "momentum_buffer" in s.fresh
        return F.SGDCoeffs.for_step(
            g["lr"], g["momentum"], g["dampening"], g["weight_decay"], g["nesterov"], first_step
        )


class SGD8bit(SGD):
    __doc__ = "SGD with an 8-bit momentum buffer.\n" + _ALGORITHM + _ARGUMENTS.format(bits="")

    def __init__(self, params, lr, momentum=0, dampening=0, weight_decay=0, nesterov=False, args=None,
                 min_8bit_size=4096, percentile_clipping=100, block_wise=True) -> None:  # fmt: skip
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, 8, args,
                         min_8bit_size, percentile_clipping, block_wise)  # fmt: skip


class SGD32bit(SGD):
    __doc__ = "SGD with a 32-bit momentum buffer.\n" + _ALGORITHM + _ARGUMENTS.format(bits="")

    def __init__(self, params, lr, momentum=0, dampening=0, weight_decay=0, nesterov=False, args=None,
                 min_8bit_size=4096, percentile_clipping=100, block_wise=True) -> None:  # fmt: skip
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, 32, args,
                         min_8bit_size, percentile_clipping, block_wise)  # fmt: skip
