"""One optimizer step over all parameters (DESIGN §5), for one process or many.

1. ``check`` every gradient and find where each parameter's local tensor sits in the
   global one (:class:`~distopt.distributed.RowShard`) before anything changes;
   ``allocate_state``: every missing state slot (DTensors shaped like the parameter when
   it is one; paged when the optimizer is), all or none; then ``prepare``: advance ``step``.
2. ``set_gradient_scales``: percentile clipping from full-parameter norms: per-row
   sums of squares of the local rows, one all-reduce for all parameters.
3. ``set_tensor_absmax``: for ``block_wise=False`` 8-bit state, each state's new local
   maximum, one MAX all-reduce for all parameters.
4. the subclass's fused (or reference) update of each local shard, in place.

Decisions that must agree across ranks (8-bit or 32-bit state, block layout) use the
parameter's global shape, so the same gradients give the same bits at any world size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from .. import functional as F
from ..distributed import collectives
from ..distributed.sharding import RowShard, local, row_shard, wrap_like_param, wrap_replicated
from ..quant import absmax_shape, uses_8bit_state, zero_code

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Parameter (and gradient) dtypes the updates take; the math is fp32 for all of them."""


@dataclass
class ParamStep:
    """Everything one parameter's update needs this step."""

    p: torch.Tensor  # the parameter as the user holds it (a DTensor under FSDP2)
    name: str
    group: dict[str, Any]
    shard: RowShard
    param: torch.Tensor  # the local tensor, contiguous (a copy if it was not)
    grad: torch.Tensor  # the local gradient, contiguous
    state: dict[str, torch.Tensor]  # the state's local tensors
    step: int
    fused: bool
    fresh: frozenset[str]  # state slots allocated this step
    gnorm_scale: torch.Tensor | None = None
    new_absmax: torch.Tensor | None = None

    def write_back(self) -> None:
        target = local(self.p)
        if target.data_ptr() != self.param.data_ptr() or not target.is_contiguous():
            target.copy_(self.param.view(target.shape))


def checked_grad(p: torch.Tensor, name: str) -> torch.Tensor:
    grad = p.grad
    if p.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"distopt: {name} has dtype {p.dtype}; supported: float32, bfloat16, float16")
    if grad.is_sparse or grad.layout != torch.strided:
        raise RuntimeError(f"distopt: {name} has a sparse gradient; distopt does not support them")
    if grad.is_complex() or p.is_complex():
        raise RuntimeError(f"distopt: {name} is complex; distopt does not support complex tensors")
    if grad.dtype != p.dtype:
        raise TypeError(f"distopt: {name} has a {grad.dtype} gradient; it must be {p.dtype}")
    if grad.shape != p.shape:
        raise RuntimeError(f"distopt: {name} has a gradient of shape {tuple(grad.shape)}")
    if isinstance(p, DTensor) != isinstance(grad, DTensor) or (
        isinstance(p, DTensor) and tuple(grad.placements) != tuple(p.placements)
    ):
        placements = getattr(grad, "placements", "a plain tensor")
        raise RuntimeError(f"distopt: {name}'s gradient has placements {placements}, unlike its parameter")
    return local(grad).contiguous()


def plain_tensor(shape, dtype: torch.dtype, fill: float, device: torch.device, name: str) -> torch.Tensor:
    """Unpaged state: an ordinary tensor (the ``new`` of :func:`allocate_slot` by default)."""
    return torch.full(shape, fill, dtype=dtype, device=device)


def allocate_slot(
    state: dict, p: torch.Tensor, shard: RowShard, name: str, signed: bool, group, new=plain_tensor, where: str = ""
) -> None:
    """Allocate one state slot of ``p`` (8-bit or 32-bit by the global shape) with
    ``new(shape, dtype, fill, device, name)`` (e.g. :meth:`distopt.paging.Pager.new`)."""
    p_local = local(p)
    shape = shard.global_shape
    device = p_local.device
    what = f"{where}'s {name!r}"
    if uses_8bit_state(shape, group["optim_bits"], group["min_8bit_size"]):
        codes = new(p_local.shape, torch.uint8, zero_code(signed), device, what)
        state[name] = wrap_like_param(codes, shard, shape)
        if group["block_wise"]:
            rows = p_local.shape[0] if p_local.dim() else 1
            absmax = new((rows, absmax_shape(shape, True)[1]), torch.float32, 0, device, what)
            state[f"{name}_absmax"] = wrap_like_param(absmax, shard, absmax_shape(shape, True))
        else:
            state[f"{name}_absmax"] = wrap_replicated(new((1,), torch.float32, 0, device, what), shard)
    else:
        state[name] = wrap_like_param(new(p_local.shape, torch.float32, 0, device, what), shard, shape)


def allocate_state(opt, todo: list, checked: list, new=plain_tensor) -> list[frozenset[str]]:
    """Allocate every missing state slot of the parameters about to step, all or none:
    if one allocation fails (e.g. a full spill disk) no state is installed and the error
    propagates before anything changed. Returns each parameter's fresh slots."""
    staged = []
    for (p, name, group), (_, shard) in zip(todo, checked):
        state = opt.state.get(p, {})
        new_slots: dict[str, torch.Tensor] = {}
        for slot, signed in opt.state_slots(group):
            if slot not in state:
                allocate_slot(new_slots, p, shard, slot, signed, group, new, name)
        staged.append(new_slots)
    fresh = []
    for (p, _, group), new_slots in zip(todo, staged):
        opt.state[p].update(new_slots)
        fresh.append(frozenset(k for k, _ in opt.state_slots(group) if k in new_slots))
    return fresh


def check(p: torch.Tensor, name: str, declared: dict) -> tuple[torch.Tensor, RowShard]:
    """The local gradient and the RowShard of ``p``, or an error naming it (nothing changed)."""
    return checked_grad(p, name), row_shard(p, declared, name)


def prepare(
    opt, p: torch.Tensor, name: str, group: dict, grad: torch.Tensor, shard: RowShard, fresh: frozenset[str]
) -> ParamStep:
    """Complete the state of one checked parameter (its slots are allocated, ``fresh``
    this step: :func:`allocate_state`) and advance its step."""
    state = opt.state[p]
    device = local(p).device
    if "step" not in state:
        state["step"] = torch.zeros((), dtype=torch.float32)
    if "nonfinite_count" not in state:  # also for state loaded from torch.optim
        state["nonfinite_count"] = torch.zeros((), dtype=torch.int64, device=device)
    if group["percentile_clipping"] < 100 and "gnorm_history" not in state:
        state["gnorm_history"] = torch.zeros(F.HISTORY, dtype=torch.float64, device=device)
        fresh |= {"gnorm_history"}
    state["step"] += 1
    param = local(p)
    return ParamStep(
        p=p,
        name=name,
        group=group,
        shard=shard,
        param=param if param.is_contiguous() else param.contiguous(),
        grad=grad,
        state=active_state(opt, state, group),
        step=int(state["step"].item()),
        fused=F.use_fused(device),
        fresh=fresh,
    )


def active_state(opt, state: dict, group) -> dict[str, torch.Tensor]:
    """The local tensors of the state the group's settings use now: a slot kept from
    earlier settings (``max_exp_avg_sq`` after amsgrad was turned off, a momentum buffer
    after momentum was set to 0) stays in the state but takes no part in the update."""
    inactive = set(opt.all_slots) - {name for name, _ in opt.state_slots(group)}
    return {k: local(v) for k, v in state.items() if k.removesuffix("_absmax") not in inactive}


def set_gradient_scales(steps: list[ParamStep]) -> None:
    """Percentile-clipping scales from full-parameter gradient norms (one all-reduce)."""
    clipped = [s for s in steps if s.group["percentile_clipping"] < 100]
    if not clipped:
        return
    local_rows = [F.row_sumsq(s.grad, fused=s.fused) for s in clipped]
    rows = collectives.sum_rows(local_rows, [s.shard for s in clipped])
    for s, r in zip(clipped, rows):
        first = "gnorm_history" in s.fresh
        s.gnorm_scale = F.percentile_scale(
            s.state["gnorm_history"], F.total_sumsq(r), 1 if first else s.step, s.group["percentile_clipping"]
        )


def set_tensor_absmax(steps: list[ParamStep], new_absmax_fn, coefficients, pager=None, paged_tensors=None) -> None:
    """New per-tensor absmax of block_wise=False 8-bit states (one MAX all-reduce). With a
    ``pager`` (paged state), each parameter's state is paged in around its own pass and the
    next one's read ahead, as around the update, so this pass keeps one parameter's state
    resident too."""
    tensorwise = [s for s in steps if any(k.endswith("_absmax") and v.dim() == 1 for k, v in s.state.items())]
    if not tensorwise:
        return
    values = []
    for i, s in enumerate(tensorwise):
        if pager is not None:
            ahead = paged_tensors(tensorwise[i + 1].state) if i + 1 < len(tensorwise) else []
            pager.prefetch(paged_tensors(s.state), ahead, s.param.device)
        values.append(new_absmax_fn(s.param, s.grad, s.state, coefficients(s), s.gnorm_scale, fused=s.fused))
        if pager is not None:
            pager.release(paged_tensors(s.state))
    for s, v in zip(tensorwise, collectives.max_values(values, [s.shard for s in tensorwise])):
        s.new_absmax = v


_NOT_SLOTS = ("step", "nonfinite_count", "gnorm_history")


def update_in_few_launches(steps: list[ParamStep], multi_fn, coefficients) -> list[ParamStep]:
    """Update the fused CUDA parameters with 32-bit state through ``multi_fn`` (a
    ``functional.*_multi_update``), grouped by device, dtype and state slots, and write
    them back; returns the steps left for the per-parameter update."""
    groups: dict[tuple, list[ParamStep]] = {}
    rest = []
    for s in steps:
        slots = tuple(sorted(k for k in s.state if k not in _NOT_SLOTS))
        if multi_fn is None or not s.fused or s.param.device.type != "cuda" or any("_absmax" in k for k in slots):
            rest.append(s)
            continue
        groups.setdefault((s.param.device, s.param.dtype, slots), []).append(s)
    for group in groups.values():
        multi_fn(
            [s.param for s in group],
            [s.grad for s in group],
            [s.state for s in group],
            [coefficients(s) for s in group],
            [s.gnorm_scale for s in group],
        )
        for s in group:
            s.write_back()
    return rest
