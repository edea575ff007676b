"""AdamW with 8-bit or 32-bit state: ``AdamW``, ``AdamW8bit``, ``AdamW32bit`` and the paged forms."""

from __future__ import annotations

from typing import Any

from .. import functional as F
from .base import QuantizedOptimizer, check_number

_ARGUMENTS = """
    Args:
        params: parameters to optimize, or dicts defining param groups. A group may
            set ``lr``, ``betas``, ``eps``, ``weight_decay``, ``amsgrad`` and also
            ``optim_bits``, ``min_8bit_size``, ``percentile_clipping`` and
            ``block_wise`` for its own parameters (e.g. embeddings kept in 32-bit).
        lr: learning rate (default 1e-3).
        betas: decay rates ``(beta1, beta2)`` of the first and second moments, each in
            [0, 1) (default (0.9, 0.999)).
        eps: added to the denominator for numerical stability (default 1e-8).
        weight_decay: decoupled weight decay coefficient (default 1e-2).
        amsgrad: use the maximum of past second moments in the denominator (AMSGrad);
            with 8-bit state this keeps a third 8-bit state (default False).
        optim_bits: bits of optimizer state, 8 or 32 (default 32).{bits_note}
        args: an object (or mapping) whose attributes ``optim_bits``,
            ``min_8bit_size``, ``percentile_clipping``, ``block_wise`` and
            ``is_paged`` override the keyword values; missing ones fall back to them.
        min_8bit_size: parameters with fewer elements (whole-parameter count, also
            under sharding) keep 32-bit state (default 4096).
        percentile_clipping: keep the last 100 squared gradient norms of each
            parameter and scale its gradient down to the norm at this percentile when
            the current norm is above it; 100 disables clipping (default 100).
        block_wise: quantize in blocks of 256 elements of one dim-0 row, each with its
            own absmax (default True); False uses one absmax per tensor.
        is_paged: keep state in paged memory (default False): CUDA unified memory
            for CUDA parameters, memory-mapped spill files for CPU ones (see
            ``docs/paging.md``).{paged_note}
        spill_dir: (keyword only, paged state only) directory of the CPU spill files;
            default ``$DISTOPT_SPILL_DIR``, else the system temp dir.
"""

_ALGORITHM = """
    For each parameter ``p`` with gradient ``g`` at step ``t`` (torch.optim.AdamW's
    order; all arithmetic in fp32, the 8-bit state dequantized before and
    requantized after)::

        g = g * gnorm_scale                      # percentile clipping, else 1
        p = p * (1 - lr * weight_decay)
        m = m + (1 - beta1) * (g - m)
        v = v * beta2 + (1 - beta2) * g * g
        v_max = max(v_max, v)                    # amsgrad only; used below instead of v
        p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    8-bit state: ``m`` uses the signed dynamic map, ``v`` (and ``v_max``) the unsigned
    one, in blocks of 256 elements that never cross a dim-0 row, with each block's
    absmax taken from the new state. A parameter keeps 8-bit state when
    ``optim_bits == 8``, it has at least ``min_8bit_size`` elements and rows of at
    least 16 elements (1-D parameters always keep 32-bit state).

    Non-finite gradients: with 8-bit state the element's whole block, with 32-bit
    state the element alone, is left untouched for that step (see
    :meth:`nonfinite_counts`).
"""


class AdamW(QuantizedOptimizer):
    __doc__ = (
        "AdamW with 8-bit or 32-bit optimizer state (``optim_bits``).\n"
        + _ALGORITHM
        + _ARGUMENTS.format(bits_note="", paged_note="")
    )

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        optim_bits: int = 32,
        args: Any = None,
        min_8bit_size: int = 4096,
        percentile_clipping: int = 100,
        block_wise: bool = True,
        is_paged: bool = False,
        *,
        spill_dir=None,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)
        super().__init__(
            params,
            defaults,
            optim_bits=optim_bits,
            args=args,
            min_8bit_size=min_8bit_size,
            percentile_clipping=percentile_clipping,
            block_wise=block_wise,
            is_paged=is_paged,
            spill_dir=spill_dir,
        )

    def check_hyperparameters(self, group) -> None:
        check_number("lr", group["lr"], 0.0)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas!r} (expected a pair (beta1, beta2))")
        check_number("betas[0]", betas[0], 0.0, 1.0, open_high=True)
        check_number("betas[1]", betas[1], 0.0, 1.0, open_high=True)
        check_number("eps", group["eps"], 0.0)
        check_number("weight_decay", group["weight_decay"], 0.0)
        if not isinstance(group["amsgrad"], bool):
            raise ValueError(f"Invalid amsgrad: {group['amsgrad']!r} (expected True or False)")

    def state_slots(self, group):
        slots = [("exp_avg", True), ("exp_avg_sq", False)]
        if group["amsgrad"]:
            slots.append(("max_exp_avg_sq", False))
        return slots

    family = "AdamW"
    all_slots = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    required_slots = ("exp_avg", "exp_avg_sq")
    update_fn = staticmethod(F.adamw_update)
    new_absmax_fn = staticmethod(F.adamw_new_absmax)
    update_multi_fn = staticmethod(F.adamw32_multi_update)
    update_multi8_fn = staticmethod(F.adamw8bit_multi_update)

    def coefficients(self, s) -> F.AdamWCoeffs:
        g = s.group
        return F.AdamWCoeffs.for_step(g["lr"], g["betas"], g["eps"], g["weight_decay"], s.step)


def _doc(title: str, bits_note: str = "", paged_note: str = "") -> str:
    return title + "\n" + _ALGORITHM + _ARGUMENTS.format(bits_note=bits_note, paged_note=paged_note)


def _width_note(name: str, bits: int) -> str:
    return (
        f" {name} keeps this keyword for compatibility and uses {bits}-bit state"
        " (an ``args`` object still overrides it)."
    )


_PAGED_NOTE = " (Paged classes have no such keyword: they are always paged.)"


class AdamW8bit(AdamW):
    __doc__ = _doc("AdamW with 8-bit optimizer state.", _width_note("AdamW8bit", 8))

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                 optim_bits=32, args=None, min_8bit_size=4096, percentile_clipping=100, block_wise=True,
                 is_paged=False, *, spill_dir=None) -> None:  # fmt: skip
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, 8, args,
                         min_8bit_size, percentile_clipping, block_wise, is_paged, spill_dir=spill_dir)  # fmt: skip


class AdamW32bit(AdamW):
    __doc__ = _doc("AdamW with 32-bit optimizer state.", _width_note("AdamW32bit", 32))

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                 optim_bits=32, args=None, min_8bit_size=4096, percentile_clipping=100, block_wise=True,
                 is_paged=False, *, spill_dir=None) -> None:  # fmt: skip
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, 32, args,
                         min_8bit_size, percentile_clipping, block_wise, is_paged, spill_dir=spill_dir)  # fmt: skip


class PagedAdamW(AdamW):
    __doc__ = _doc("Paged AdamW with 8-bit or 32-bit optimizer state (``optim_bits``).", "", _PAGED_NOTE)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                 optim_bits=32, args=None, min_8bit_size=4096, percentile_clipping=100,
                 block_wise=True, *, spill_dir=None) -> None:  # fmt: skip
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, optim_bits, args,
                         min_8bit_size, percentile_clipping, block_wise, is_paged=True,
                         spill_dir=spill_dir)  # fmt: skip


class PagedAdamW8bit(AdamW):
    __doc__ = _doc("Paged AdamW with 8-bit optimizer state.", _width_note("PagedAdamW8bit", 8), _PAGED_NOTE)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                 optim_bits=32, args=None, min_8bit_size=4096, percentile_clipping=100,
                 block_wise=True, *, spill_dir=None) -> None:  # fmt: skip
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, 8, args,
                         min_8bit_size, percentile_clipping, block_wise, is_paged=True,
                         spill_dir=spill_dir)  # fmt: skip


class PagedAdamW32bit(AdamW):
    __doc__ = _doc("Paged AdamW with 32-bit optimizer state.", _width_note("PagedAdamW32bit", 32), _PAGED_NOTE)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                 optim_bits=32, args=None, min_8bit_size=4096, percentile_clipping=100,
                 block_wise=True, *, spill_dir=None) -> None:  # fmt: skip
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, 32, args,
                         min_8bit_size, percentile_clipping, block_wise, is_paged=True,
                         spill_dir=spill_dir)  # fmt: skip
