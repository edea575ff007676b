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


@dataclass(slots=True)
class ParamStep:
    """Everything one parameter's update needs this step."""

    p: torch.Tensor  # the parameter as the user holds it (a DTensor under FSDP2)
    name: object  # str() of it names the parameter (base.ParamName)
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


def checked_grad(p: torch.Tensor, name: object) -> torch.Tensor:
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
    state: dict, p: torch.Tensor, shard: RowShard, name: str, signed: bool, group, new=plain_tensor, where: object = ""
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
    slots_of: dict[int, list[tuple[str, bool]]] = {}  # by group (asked once a step)
    staged = []
    for (p, name, group), (_, shard) in zip(todo, checked):
        if id(group) not in slots_of:
            slots_of[id(group)] = opt.state_slots(group)
        state = opt.state.get(p, {})
        new_slots: dict[str, torch.Tensor] = {}
        for slot, signed in slots_of[id(group)]:
            if slot not in state:
                check_layout(opt, state, shard, slot, group, name)
                allocate_slot(new_slots, p, shard, slot, signed, group, new, name)
        staged.append(new_slots)
    fresh = []
    for (p, _, group), new_slots in zip(todo, staged):
        state = opt.state[p]  # (created here for a parameter's first step)
        if not new_slots:
            fresh.append(_NONE)
            continue
        state.update(new_slots)
        fresh.append(frozenset(k for k, _ in slots_of[id(group)] if k in new_slots))
    return fresh


_NONE: frozenset[str] = frozenset()


def layout_of(eight_bit: bool, block_wise: bool) -> str:
    return "32-bit" if not eight_bit else "8-bit block-wise" if block_wise else "8-bit per-tensor"


def check_layout(opt, state: dict, shard: RowShard, slot: str, group, name: object) -> None:
    """A slot allocated next to existing ones must take their layout (8-bit or 32-bit,
    block-wise or per-tensor absmax): the updates take all of a parameter's states in one
    layout. The group's layout settings may have changed since (``optim_bits``,
    ``min_8bit_size``, ``block_wise``, then ``amsgrad`` or ``momentum`` turned on): that
    is refused here, before anything changed."""
    existing = [k for k in opt.all_slots if k in state]
    if not existing:
        return
    absmax = state.get(f"{existing[0]}_absmax")
    has = layout_of(absmax is not None, absmax is not None and absmax.dim() == 2)
    wants = layout_of(
        uses_8bit_state(shard.global_shape, group["optim_bits"], group["min_8bit_size"]), group["block_wise"]
    )
    if has != wants:
        raise ValueError(
            f"distopt: {name} keeps {has} state ({existing[0]!r}), but its group's settings now give its new "
            f"{slot!r} {wants} state; a parameter's state layout (optim_bits, min_8bit_size, block_wise) cannot "
            "change once it has state"
        )


def check(p: torch.Tensor, name: object, declared: dict) -> tuple[torch.Tensor, RowShard]:
    """The local gradient and the RowShard of ``p``, or an error naming it (nothing changed)."""
    return checked_grad(p, name), row_shard(p, declared, name)


def complete_state(opt, p: torch.Tensor, group: dict, fresh: frozenset[str]) -> frozenset[str]:
    """Add what a checked parameter's state lacks besides its slots (allocated by
    :func:`allocate_state`, ``fresh`` this step): ``step``, ``nonfinite_count`` and, with
    percentile clipping, ``gnorm_history``; returns the fresh slots, the history included."""
    state = opt.state[p]
    device = local(p).device
    if "step" not in state:
        state["step"] = torch.zeros((), dtype=torch.float32)
    if "nonfinite_count" not in state:  # also for state loaded from torch.optim
        state["nonfinite_count"] = torch.zeros((), dtype=torch.int64, device=device)
    if group["percentile_clipping"] < 100 and "gnorm_history" not in state:
        state["gnorm_history"] = torch.zeros(F.HISTORY, dtype=torch.float64, device=device)
        fresh |= {"gnorm_history"}
    return fresh


def prepare(opt, todo: list, checked: list, fresh: list) -> list[ParamStep]:
    """The ParamStep of every checked parameter about to step (:func:`check`,
    :func:`allocate_state`): its state completed and its ``step`` advanced. What a group
    or a device shares is worked out once, and the steps advance in one call: a step's
    bookkeeping is paid per parameter, and models have hundreds."""
    fresh = [complete_state(opt, p, group, f) for (p, _, group), f in zip(todo, fresh)]
    F.add_one([opt.state[p]["step"] for p, _, _ in todo])
    inactive: dict[int, frozenset[str]] = {}
    fused: dict[torch.device, bool] = {}
    steps = []
    for (p, name, group), (grad, shard), f in zip(todo, checked, fresh):
        if id(group) not in inactive:
            inactive[id(group)] = inactive_slots(opt, group)
        param = local(p)
        if param.device not in fused:
            fused[param.device] = F.use_fused(param.device)
        state, skip = opt.state[p], inactive[id(group)]
        steps.append(
            ParamStep(
                p=p,
                name=name,
                group=group,
                shard=shard,
                param=param if param.is_contiguous() else param.contiguous(),
                grad=grad,
                # the state's local tensors that take part: all of them, as a rule
                state=state
                if not skip and p is param
                else {k: local(v) for k, v in state.items() if k.removesuffix("_absmax") not in skip},
                step=int(state["step"].item()),
                fused=fused[param.device],
                fresh=f,
            )
        )
    return steps


def inactive_slots(opt, group) -> frozenset[str]:
    """The slots a parameter of ``group`` may keep from earlier settings but that take no
    part in its update now (``max_exp_avg_sq`` after amsgrad was turned off, a momentum
    buffer after momentum was set to 0): they stay in the state, left alone."""
    return frozenset(opt.all_slots) - {name for name, _ in opt.state_slots(group)}


def set_gradient_scales(steps: list[ParamStep]) -> None:
    """Percentile-clipping scales from full-parameter gradient norms (one all-reduce)."""
    clipped = [s for s in steps if s.group["percentile_clipping"] < 100]
    if not clipped:
        return
    local_rows = [F.row_sumsq(s.grad, fused=s.fused) for s in clipped]
    rows = collectives.sum_rows(local_rows, [s.shard for s in clipped])
    scales = F.percentile_scales(
        [s.state["gnorm_history"] for s in clipped],
        [F.total_sumsq(r) for r in rows],
        [1 if "gnorm_history" in s.fresh else s.step for s in clipped],
        [s.group["percentile_clipping"] for s in clipped],
    )
    for s, scale in zip(clipped, scales):
        s.gnorm_scale = scale


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


def update_in_few_calls(steps: list[ParamStep], multi32, multi8, coefficients) -> list[ParamStep]:
    """Update many fused parameters per op call (functional's [Note: many parameters per
    call]): those with 32-bit state through ``multi32``, those on CPU with block-wise
    8-bit state through ``multi8`` (``functional.*_multi_update``; None: not this way),
    grouped by device, dtype and state keys, and write them back. Returns the steps left
    for the per-parameter update (the reference path, per-tensor absmax, 8-bit state on
    CUDA)."""
    groups: dict[tuple, list[ParamStep]] = {}
    rest = []
    for s in steps:
        keys = tuple(k for k in s.state if k not in _NOT_SLOTS)  # (in the state's order: a key, not a set)
        fn = _multi_update_for(s, keys, multi32, multi8)
        if fn is None:
            rest.append(s)
            continue
        groups.setdefault((fn, s.param.device, s.param.dtype, keys), []).append(s)
    for (fn, *_), group in groups.items():
        fn(
            [s.param for s in group],
            [s.grad for s in group],
            [s.state for s in group],
            [coefficients(s) for s in group],
            [s.gnorm_scale for s in group],
        )
        for s in group:
            s.write_back()
    return rest


def _multi_update_for(s: ParamStep, keys: tuple[str, ...], multi32, multi8):
    """Which of ``multi32`` / ``multi8`` serves this parameter, or None."""
    if not s.fused:
        return None
    absmax = [k for k in keys if k.endswith("_absmax")]
    if not absmax:
        return multi32
    block_wise = s.state[absmax[0]].dim() == 2
    return multi8 if block_wise and s.param.device.type == "cpu" else None
