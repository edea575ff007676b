"""Stateless update functions: the pure-PyTorch reference (the test oracle) and the fused path.

Every update is written twice: once here with torch operations on fp32 tensors (the
reference), once in ``csrc/common/optim_math.h`` for the kernels. Both follow the same
formulas in the same order, and both take their coefficients from :class:`AdamWCoeffs` /
:class:`SGDCoeffs`, computed here in double precision and used in fp32.

A state dict ``state`` of one parameter holds fp32 tensors (32-bit state) or uint8 codes
plus fp32 ``<name>_absmax`` (8-bit state, see :mod:`distopt.quant`); which one is read
from the keys, and block-wise vs per-tensor from the absmax's rank (2-D vs 1-D).

[Note: non-finite gradients] (DESIGN §3.5) An element whose gradient is not finite
never changes what it does not own, and needs no collective: with 32-bit state the
element (parameter and state) is left untouched; with 8-bit block-wise state its whole
block of 256 is; with one absmax per tensor the block's parameters are untouched and its
state values carry over, re-encoded with the tensor's new absmax. Skipped elements are
added to ``state["nonfinite_count"]``. Non-finite values never enter gradient norms.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, fields
from functools import cached_property, lru_cache

import torch

from . import _ops
from .quant import (
    BLOCK_SIZE,
    _as_blocks,
    _from_blocks,
    _quantize_blocks,
    qmap,
    row_length,
    tensor_absmax,
)


class _Scalars:
    """What the ops take of a coefficient dataclass, computed once per (cached) object:
    ``scalars``, its fields in declaration order (a single-parameter op's trailing
    arguments; ``dataclasses.astuple`` deep-copies each field, ~45 us a call), and
    ``flat``, the same as floats, bools as 0.0 / 1.0 (a *_multi_ op's ``coeffs``)."""

    @cached_property
    def scalars(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self))

    @cached_property
    def flat(self) -> tuple[float, ...]:
        return tuple(float(x) for x in self.scalars)


@dataclass(frozen=True)
class AdamWCoeffs(_Scalars):
    """AdamW's per-step coefficients (torch.optim.AdamW's single-tensor formulas)."""

    decay: float
    lerp_weight: float
    beta2: float
    sq_weight: float
    eps: float
    step_size: float
    bias_correction2_sqrt: float

    @classmethod
    def for_step(cls, lr: float, betas: tuple[float, float], eps: float, weight_decay: float, step: int):
        """The coefficients of step ``step`` (from 1), computed in double from the
        hyperparameters as Python floats, whatever real type they were given in."""
        beta1, beta2 = betas
        return cls._for_step(float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), int(step))

    @classmethod
    @lru_cache(maxsize=1024)  # the parameters of a group share them
    def _for_step(cls, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int):
        return cls(
            decay=1.0 - lr * weight_decay,
            lerp_weight=1.0 - beta1,
            beta2=beta2,
            sq_weight=1.0 - beta2,
            eps=eps,
            step_size=lr / (1.0 - beta1**step),
            bias_correction2_sqrt=math.sqrt(1.0 - beta2**step),
        )


@dataclass(frozen=True)
class SGDCoeffs(_Scalars):
    """SGD's per-step coefficients (torch.optim.SGD semantics)."""

    lr: float
    weight_decay: float
    momentum: float
    dampening_weight: float
    nesterov: bool
    first_step: bool

    @classmethod
    def for_step(cls, lr, momentum, dampening, weight_decay, nesterov, first_step: bool):
        """The coefficients of one step, from the hyperparameters as Python floats (and
        bools), whatever real type they were given in."""
        return cls._for_step(
            float(lr), float(momentum), float(dampening), float(weight_decay), bool(nesterov), bool(first_step)
        )

    @classmethod
    @lru_cache(maxsize=1024)  # the parameters of a group share them
    def _for_step(
        cls, lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool, first_step: bool
    ):
        return cls(lr, weight_decay, momentum, 1.0 - dampening, nesterov, first_step)


# --- the update math on fp32 tensors (mirrors csrc/common/optim_math.h) -----------------


def _adamw_math(p, g, states, c: AdamWCoeffs):
    m, v = states[0], states[1]
    p = p * c.decay
    m = m + c.lerp_weight * (g - m)
    v = v * c.beta2 + (c.sq_weight * g) * g
    new = [m, v]
    second = v
    if len(states) == 3:
        second = torch.maximum(states[2], v)
        new.append(second)
    denom = torch.sqrt(second) / c.bias_correction2_sqrt + c.eps
    return p - c.step_size * (m / denom), new


def _sgd_math(p, g, states, c: SGDCoeffs):
    if c.weight_decay != 0.0:
        g = g + c.weight_decay * p
    if not states:
        return p - c.lr * g, []
    buf = g if c.first_step else states[0] * c.momentum + c.dampening_weight * g
    direction = g + c.momentum * buf if c.nesterov else buf
    return p - c.lr * direction, [buf]


# --- reference drivers ----------------------------------------------------------------


def _reference_32bit(param, grad, states, gnorm_scale, count, math_fn, c):
    g = grad.float()
    finite = torch.isfinite(g)
    g = torch.where(finite, g, 0.0) * gnorm_scale
    p_new, new = math_fn(param.float(), g, [s for s in states], c)
    for n in new:  # a finite gradient so large that a new state overflows is skipped too
        finite = finite & torch.isfinite(n)
    for s, n in zip(states, new):
        s.copy_(torch.where(finite, n, s))
    param.copy_(torch.where(finite, p_new, param.float()).to(param.dtype))
    count += (~finite).sum()


def _reference_8bit_states(param, grad, qstates, gnorm_scale, math_fn, c):
    """The new fp32 states (non-finite blocks keep their old values), as blocks."""
    gb = _as_blocks(grad)
    finite = torch.isfinite(gb).all(dim=-1, keepdim=True)
    old = [_as_blocks(q[codes.long()]) * _absmax_view(absmax) for codes, absmax, q in qstates]
    pb = _as_blocks(param)
    p_new, new = math_fn(pb, torch.where(finite, gb, 0.0) * gnorm_scale, old, c)
    for n in new:  # a finite gradient so large that a new state overflows is skipped too
        finite = finite & torch.isfinite(n).all(dim=-1, keepdim=True)
    new = [torch.where(finite, n, o) for n, o in zip(new, old)]
    return finite, pb, torch.where(finite, p_new, pb), new


def _reference_8bit(param, grad, qstates, gnorm_scale, count, math_fn, c, new_absmax):
    """qstates: list of (codes, absmax, qmap); block-wise when absmax is 2-D, else
    quantized with ``new_absmax`` (one value per state; computed here when None)."""
    block_wise = qstates[0][1].dim() == 2
    finite, pb, p_out, new = _reference_8bit_states(param, grad, qstates, gnorm_scale, math_fn, c)
    if block_wise:
        absmaxes = [n.abs().amax(dim=-1) for n in new]
    else:
        if new_absmax is None:
            new_absmax = torch.cat([tensor_absmax(n) for n in new])
        absmaxes = list(new_absmax.view(-1, 1))
    for (codes, absmax, q), n, a in zip(qstates, new, absmaxes):
        fresh = _quantize_blocks(n, q, a.unsqueeze(-1) if block_wise else a)
        if block_wise:
            fresh = torch.where(finite, fresh, _as_blocks(codes).to(torch.uint8))
            a = torch.where(finite.squeeze(-1), a, absmax)
        codes.copy_(_from_blocks(fresh, codes))
        absmax.copy_(a.view(absmax.shape))
    param.copy_(_from_blocks(p_out, param).to(param.dtype))
    valid = torch.arange(pb.shape[1] * BLOCK_SIZE, device=pb.device) < row_length(grad.shape)
    valid = valid.view(1, -1, BLOCK_SIZE)
    count += (valid & ~finite).sum()


def _reference_new_absmax(param, grad, qstates, gnorm_scale, math_fn, c) -> torch.Tensor:
    new = _reference_8bit_states(param, grad, qstates, gnorm_scale, math_fn, c)[3]
    return torch.cat([tensor_absmax(n) for n in new])


def _absmax_view(absmax: torch.Tensor) -> torch.Tensor:
    return absmax.unsqueeze(-1) if absmax.dim() == 2 else absmax.view(1, 1, 1)


# --- state layout ------------------------------------------------------------------------

_ADAMW_STATES = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_SIGNED = {"exp_avg": True, "exp_avg_sq": False, "max_exp_avg_sq": False, "momentum_buffer": True}


def is_8bit(state: dict, name: str) -> bool:
    return f"{name}_absmax" in state


def _qstates(state: dict, names, device):
    return [(state[n], state[f"{n}_absmax"], qmap(_SIGNED[n], device)) for n in names]


def _adamw_names(state: dict) -> tuple[str, ...]:
    return _ADAMW_STATES if "max_exp_avg_sq" in state else _ADAMW_STATES[:2]


_ones: dict[torch.device, torch.Tensor] = {}


def _scale_or_one(gnorm_scale: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    if gnorm_scale is not None:
        return gnorm_scale
    if device not in _ones:
        _ones[device] = torch.ones((), dtype=torch.float32, device=device)
    return _ones[device]


# --- backend choice ------------------------------------------------------------------

_BACKENDS = ("auto", "fused", "reference")
_backend = os.environ.get("DISTOPT_BACKEND", "auto")
if _backend not in _BACKENDS:
    raise ValueError(f"DISTOPT_BACKEND must be one of {_BACKENDS}, got {_backend!r}")
_warned_devices: set[str] = set()


def set_backend(name: str) -> None:
    """Choose the update path: ``"auto"`` (fused kernels where built, else the reference),
    ``"fused"`` (kernels or an error) or ``"reference"`` (pure PyTorch). The environment
    variable ``DISTOPT_BACKEND`` sets the initial choice."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    return _backend


def use_fused(device: torch.device) -> bool:
    """Whether updates of tensors on ``device`` take the fused kernels."""
    if _backend not in _BACKENDS:
        raise ValueError(f"DISTOPT_BACKEND must be one of {_BACKENDS}, got {_backend!r}")
    if _backend == "reference":
        return False
    fused = _ops.available(device)
    if not fused and _backend == "fused":
        raise RuntimeError(f"distopt: no fused kernels for device {device} (backend 'fused' was requested)")
    if not fused and device.type != "cpu" and device.type not in _warned_devices:  # CPU: _build warns
        _warned_devices.add(device.type)
        warnings.warn(
            f"distopt: no fused kernels for {device.type} tensors here; using the pure-PyTorch reference path.",
            RuntimeWarning,
            stacklevel=3,
        )
    return fused


def add_one(counters: list[torch.Tensor]) -> None:
    """``t += 1`` for each of ``counters`` (one-element tensors: the parameters' ``step``):
    in one op call when the kernels are in use and every counter is a CPU tensor of a
    dtype the op takes (as ``step()`` makes them), else one in-place add each (an op call
    of its own, about 3 us, per parameter and step)."""
    on_cpu = [t for t in counters if t.device.type == "cpu" and t.dtype in _COUNTER_DTYPES]
    if on_cpu and len(on_cpu) == len(counters) and use_fused(torch.device("cpu")):
        _ops.ops().add_one_(on_cpu)
        return
    for t in counters:
        t += 1


_COUNTER_DTYPES = (torch.float32, torch.float64, torch.int64, torch.int32)


# --- public update functions ---------------------------------------------------------
#
# [Note: per-tensor absmax] With block_wise=False a state's new absmax is the maximum
# over the whole (possibly sharded) tensor, known only after the update is computed.
# The update therefore takes two passes: ``*_new_absmax`` computes each state's new
# local maximum without writing anything; the caller combines the maxima (a MAX
# all-reduce over the shards, batched for all parameters) and passes them to
# ``*_update`` as ``new_absmax``. Without it, the update uses the local maxima.


def _adamw_qstates(state: dict, device: torch.device):
    return _qstates(state, _adamw_names(state), device)


def _flat_adamw(qstates):
    flat = [t for codes, absmax, _ in qstates for t in (codes, absmax)]
    return flat + [None, None] if len(flat) == 4 else flat


def adamw_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict,
    c: AdamWCoeffs,
    gnorm_scale: torch.Tensor | None = None,
    *,
    fused: bool,
    new_absmax: torch.Tensor | None = None,
) -> None:
    """One AdamW step of one parameter, in place on ``param`` and ``state``."""
    scale = _scale_or_one(gnorm_scale, param.device)
    count = state["nonfinite_count"]
    if not is_8bit(state, "exp_avg"):
        states = [state[n] for n in _adamw_names(state)]
        if not fused:
            return _reference_32bit(param, grad, states, scale, count, _adamw_math, c)
        vmax = states[2] if len(states) == 3 else None
        return _ops.ops().adamw32_(param, grad, states[0], states[1], vmax, scale, count, *c.scalars)
    qstates = _adamw_qstates(state, param.device)
    if not fused:
        return _reference_8bit(param, grad, qstates, scale, count, _adamw_math, c, new_absmax)
    flat = _flat_adamw(qstates)
    if flat[1].dim() == 1 and new_absmax is None:
        new_absmax = adamw_new_absmax(param, grad, state, c, gnorm_scale, fused=True)
    maps = (qmap(True, param.device), qmap(False, param.device))
    _ops.ops().adamw8bit_(param, grad, *flat, *maps, new_absmax, scale, count, *c.scalars)


def adamw_new_absmax(param, grad, state: dict, c: AdamWCoeffs, gnorm_scale=None, *, fused: bool) -> torch.Tensor:
    """Each 8-bit state's new local max |value| (block_wise=False), writing nothing."""
    scale = _scale_or_one(gnorm_scale, param.device)
    qstates = _adamw_qstates(state, param.device)
    if not fused:
        return _reference_new_absmax(param, grad, qstates, scale, _adamw_math, c)
    maps = (qmap(True, param.device), qmap(False, param.device))
    return _ops.ops().adamw8bit_new_absmax(param, grad, *_flat_adamw(qstates), *maps, scale, *c.scalars)


def sgd_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict,
    c: SGDCoeffs,
    gnorm_scale: torch.Tensor | None = None,
    *,
    fused: bool,
    new_absmax: torch.Tensor | None = None,
) -> None:
    """One SGD step of one parameter, in place on ``param`` and ``state``."""
    scale = _scale_or_one(gnorm_scale, param.device)
    count = state["nonfinite_count"]
    if not is_8bit(state, "momentum_buffer"):
        states = [state["momentum_buffer"]] if "momentum_buffer" in state else []
        if not fused:
            return _reference_32bit(param, grad, states, scale, count, _sgd_math, c)
        buf = states[0] if states else None
        return _ops.ops().sgd32_(param, grad, buf, scale, count, *c.scalars)
    qstates = _qstates(state, ("momentum_buffer",), param.device)
    if not fused:
        return _reference_8bit(param, grad, qstates, scale, count, _sgd_math, c, new_absmax)
    codes, absmax, signed = qstates[0]
    if absmax.dim() == 1 and new_absmax is None:
        new_absmax = sgd_new_absmax(param, grad, state, c, gnorm_scale, fused=True)
    _ops.ops().sgd8bit_(param, grad, codes, absmax, signed, new_absmax, scale, count, *c.scalars)


def sgd_new_absmax(param, grad, state: dict, c: SGDCoeffs, gnorm_scale=None, *, fused: bool) -> torch.Tensor:
    """The momentum buffer's new local max |value| (block_wise=False), writing nothing."""
    scale = _scale_or_one(gnorm_scale, param.device)
    qstates = _qstates(state, ("momentum_buffer",), param.device)
    if not fused:
        return _reference_new_absmax(param, grad, qstates, scale, _sgd_math, c)
    codes, absmax, signed = qstates[0]
    return _ops.ops().sgd8bit_new_absmax(param, grad, codes, absmax, signed, scale, *c.scalars)


# [Note: many parameters per call] The fused 32-bit updates of a group of parameters (one
# device, dtype and set of state slots) take the *_multi_ ops: one op call for all of
# them (on CUDA a few launches), each parameter with its own coefficients, gnorm scale
# and skip counter. The per-element math is that of adamw32_/sgd32_, so the results are
# the same; what it saves is the cost of an op call from Python per parameter (several
# microseconds, as much as a small parameter's whole update on CPU).


def adamw32_multi_update(params, grads, states, coeffs, gnorm_scales) -> None:
    """One fused AdamW step of many parameters with 32-bit state, in place."""
    names = _adamw_names(states[0])
    exp_avg, exp_avg_sq = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
    vmax = [s["max_exp_avg_sq"] for s in states] if len(names) == 3 else []
    rest = _scales_counts_coeffs(params, states, coeffs, gnorm_scales)
    _ops.ops().adamw32_multi_(params, grads, exp_avg, exp_avg_sq, vmax, *rest)


def sgd32_multi_update(params, grads, states, coeffs, gnorm_scales) -> None:
    """One fused SGD step of many parameters with 32-bit (or no) state, in place."""
    bufs = [s["momentum_buffer"] for s in states] if "momentum_buffer" in states[0] else []
    _ops.ops().sgd32_multi_(params, grads, bufs, *_scales_counts_coeffs(params, states, coeffs, gnorm_scales))


def adamw8bit_multi_update(params, grads, states, coeffs, gnorm_scales) -> None:
    """One fused AdamW step of many CPU parameters with block-wise 8-bit state, in place."""
    names = _adamw_names(states[0])
    slots = [[s[n] for s in states] for n in names] + [[] for _ in range(3 - len(names))]
    absmax = [[s[f"{n}_absmax"] for s in states] for n in names] + [[] for _ in range(3 - len(names))]
    device = params[0].device
    _ops.ops().adamw8bit_multi_(
        params,
        grads,
        *(t for pair in zip(slots, absmax) for t in pair),
        qmap(True, device),
        qmap(False, device),
        *_scales_counts_coeffs(params, states, coeffs, gnorm_scales),
    )


def sgd8bit_multi_update(params, grads, states, coeffs, gnorm_scales) -> None:
    """One fused SGD step of many CPU parameters with a block-wise 8-bit momentum buffer, in place."""
    bufs = [s["momentum_buffer"] for s in states]
    absmax = [s["momentum_buffer_absmax"] for s in states]
    _ops.ops().sgd8bit_multi_(
        params,
        grads,
        bufs,
        absmax,
        qmap(True, params[0].device),
        *_scales_counts_coeffs(params, states, coeffs, gnorm_scales),
    )


def _scales_counts_coeffs(params, states, coeffs, gnorm_scales) -> tuple[list, list, list[float]]:
    """The *_multi_ ops' trailing arguments: gnorm scales, skip counters, flat coefficients."""
    scales = [_scale_or_one(g, p.device) for p, g in zip(params, gnorm_scales)]
    counts = [s["nonfinite_count"] for s in states]
    return scales, counts, [x for c in coeffs for x in c.flat]


# --- percentile clipping -------------------------------------------------------------

HISTORY = 100
"""Squared gradient norms kept per parameter for percentile clipping."""


def row_sumsq(grad: torch.Tensor, *, fused: bool) -> torch.Tensor:
    """float64 sum of squares of the finite elements of each dim-0 row of ``grad``."""
    if fused:
        return _ops.ops().row_sumsq(grad)
    rows = grad.shape[0] if grad.dim() >= 1 else 1
    g = grad.reshape(rows, row_length(grad.shape)).double()
    g = torch.where(torch.isfinite(g), g, 0.0)
    return (g * g).sum(dim=1)


def total_sumsq(rows: torch.Tensor) -> torch.Tensor:
    """Sum of per-row sums (float64) in a fixed (sequential) order, identical on every rank."""
    if rows.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=rows.device)
    return rows.double().cumsum(0)[-1]


def percentile_scales(
    histories: list[torch.Tensor], gnorm_sqs: list[torch.Tensor], steps: list[int], percentiles: list[int]
) -> list[torch.Tensor]:
    """Record each parameter's ``gnorm_sqs[i]`` for ``steps[i]`` (1-based) and return its
    gradient scale (0-d fp32).

    ``histories[i]`` holds the last 100 squared norms (all slots take the first non-zero one);
    ``current = sqrt(history[step % 100])``, ``clip = sqrt(sorted(history)[percentile])``,
    and the scale is ``clip / current`` when ``current > clip``, else 1.

    All parameters at once, a few tensor ops per device and dtype instead of a dozen per
    parameter (148 GPT-2 tensors: about 11 ms of Python a step one at a time). Each
    parameter's history, scale and bits are what it alone would give: the ops work row by
    row (a sort along the row, elementwise sqrt and division)."""
    scales: list[torch.Tensor | None] = [None] * len(histories)
    batches: dict[tuple[torch.device, torch.dtype], list[int]] = {}  # stacking must not promote
    for i, h in enumerate(histories):
        batches.setdefault((h.device, h.dtype), []).append(i)
    for (device, _), members in batches.items():
        old = torch.stack([histories[i] for i in members])  # [k, HISTORY]
        norm = torch.stack([gnorm_sqs[i] for i in members]).to(old.dtype)[:, None]
        row = torch.arange(len(members), device=device)
        slot = torch.tensor([steps[i] % HISTORY for i in members], device=device)
        rank = torch.tensor([percentiles[i] for i in members], device=device)
        first = torch.tensor([steps[i] == 1 for i in members], device=device)
        recorded = old.clone()
        recorded[row, slot] = norm[:, 0]
        # A history of zeros (zero gradients so far) is seeded by the first non-zero
        # norm, so that a zero first gradient does not clip later ones to zero.
        seed = first | ~(old.amax(dim=1) > 0)
        new = torch.where(seed[:, None], norm.expand_as(old), recorded)
        torch._foreach_copy_([histories[i] for i in members], list(new.unbind(0)))
        current = torch.sqrt(new[row, slot])
        clip = torch.sqrt(torch.sort(new, dim=1).values[row, rank])
        scale = torch.where(current > clip, clip / current, torch.ones_like(current)).float()
        for i, value in zip(members, scale.unbind(0)):
            scales[i] = value
    return scales
