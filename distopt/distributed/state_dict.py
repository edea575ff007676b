"""The optimizer's state dict in one process, under DDP and under FSDP2: what it holds,
how it is checked, and how a saved state finds its way back into the right tensors.

:meth:`QuantizedOptimizer.state_dict` is torch's, finished by :func:`state_dict_post_hook`:

- 8-bit state stays 8-bit: uint8 ``codes`` plus fp32 ``<slot>_absmax``, never expanded;
  32-bit state is fp32. Under FSDP2 they are the live DTensors, with the parameter's mesh
  and placements (block-wise absmax ``[d0, blocks per row]`` is split by rows like the
  parameter; a per-tensor absmax is replicated), so torch's checkpoint APIs gather or
  reshard them exactly. Declared row shards (:func:`~distopt.distributed.shard_rows`)
  are plain tensors, so they are gathered here into whole tensors.
- ``step`` (0-d fp32) and ``gnorm_history`` (float64, 100) are the same on every rank.
- ``nonfinite_count`` becomes the whole parameter's count (one all-reduce per process
  group: under FSDP2 every rank calls ``state_dict()`` together, as torch's APIs do).
- each param group is tagged ``"distopt": <family>`` (``"AdamW"`` or ``"SGD"``).

Loading (:func:`load_pre_hook`, then torch's bookkeeping, then :func:`load_post_hook`)
checks the whole state dict first: parameter and group counts, hyperparameters, the
optimizer family, every key, shape and dtype. Only when all of it fits does anything
change, and then every value keeps its saved dtype (torch's own ``load_state_dict``
would cast uint8 codes and fp32 state to the parameter's dtype). A saved tensor may be
a DTensor (sharded load: its local part is taken) or a whole tensor (full state dict:
this rank's rows are cut from it); either way the result is laid out like the
parameter, and a paged optimizer's state is paged again (allocated before anything is
installed). A saved ``nonfinite_count`` total goes to the shard group's first rank.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ..quant import absmax_shape, uses_8bit_state
from .sharding import RowShard, local, row_shard, wrap_like_param, wrap_replicated

if TYPE_CHECKING:
    from ..optim.base import QuantizedOptimizer

FAMILY_KEY = "distopt"
"""Param-group key naming the optimizer family in a saved state dict."""

_SCALARS = ("step", "nonfinite_count")


def _params(opt: QuantizedOptimizer) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def _names(opt: QuantizedOptimizer) -> list[str]:
    from ..optim.base import param_name

    return [param_name(gi, pi, p) for gi, g in enumerate(opt.param_groups) for pi, p in enumerate(g["params"])]


# --- saving ------------------------------------------------------------------------------------


def state_dict_post_hook(opt: QuantizedOptimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Whole-parameter ``nonfinite_count`` totals, gathered row shards, family tags."""
    params = _params(opt)
    totals = opt.nonfinite_counts()
    state = {}
    for index, saved in state_dict["state"].items():
        p = params[index]
        saved = dict(saved)  # torch hands out the live per-parameter dict: never change it
        if "nonfinite_count" in saved:
            saved["nonfinite_count"] = torch.tensor(totals[p], dtype=torch.int64)
        shard = opt.row_shards.get(p)
        if shard is not None:
            saved = {k: _gather_rows(v, shard) if _is_row_tensor(k, v) else v for k, v in saved.items()}
        state[index] = saved
    groups = [{**g, FAMILY_KEY: opt.family} for g in state_dict["param_groups"]]
    return {**state_dict, "state": state, "param_groups": groups}


def _is_row_tensor(key: str, value: Any) -> bool:
    """Whether a state value is laid out by the parameter's dim-0 rows."""
    return (
        torch.is_tensor(value)
        and key not in (*_SCALARS, "gnorm_history")
        and value.dim() >= 1
        and not (key.endswith("_absmax") and value.dim() == 1)
    )


def _gather_rows(local: torch.Tensor, shard: RowShard) -> torch.Tensor:
    """The whole tensor from each rank's rows of it (a declared row shard)."""
    group = shard.group
    world = dist.get_world_size(group)
    mine = torch.tensor([shard.row_offset, local.shape[0]], dtype=torch.int64)
    spans = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(spans, mine, group=group)
    most = max(int(s[1]) for s in spans)
    padded = local.new_zeros((most, *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    whole = local.new_empty((shard.global_rows, *local.shape[1:]))
    for (offset, rows), part in zip((s.tolist() for s in spans), parts):
        whole[offset : offset + rows] = part[:rows]
    return whole


# --- loading -----------------------------------------------------------------------------------


def check_state_dict(opt: QuantizedOptimizer, state_dict: dict[str, Any]) -> None:
    """Raise ValueError naming the parameter or argument if ``opt.load_state_dict(state_dict)``
    would refuse ``state_dict``; change nothing.

    ``set_optimizer_state_dict(..., broadcast_from_rank0=True)`` copies rank 0's tensors
    into the live state (cast to its dtypes) before distopt sees them, so dtype mistakes
    can only be caught on rank 0, before that call: check the full state dict there first.
    """
    _prepared(opt, state_dict)


def load_pre_hook(opt: QuantizedOptimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Check everything and prepare the new state; torch then sees no state tensors at all."""
    groups, new_state = _prepared(opt, state_dict)
    opt._loading = opt.page_loaded_state(new_state)  # paged optimizers: allocated (or refused) here
    return {"state": {}, "param_groups": [_untagged(g) for g in groups]}


def _prepared(opt: QuantizedOptimizer, state_dict: dict[str, Any]) -> tuple[list[dict], dict]:
    """The checked param groups and each parameter's new local state (nothing installed)."""
    from .. import bnb_import

    if bnb_import.is_bitsandbytes_state_dict(state_dict):
        state_dict = bnb_import.from_bitsandbytes(opt, state_dict)
    for key in ("state", "param_groups"):
        if key not in state_dict:
            raise ValueError(f"state dict: no {key!r} entry (is this an optimizer state dict?)")
    groups = _checked_groups(opt, state_dict["param_groups"])
    params, names = _params(opt), _names(opt)
    ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    saved = state_dict["state"]
    unknown = set(saved) - set(ids)
    if unknown:
        raise ValueError(f"state dict: state for parameter ids {sorted(unknown, key=str)} that no param group lists")
    owner = [gi for gi, g in enumerate(groups) for _ in g["params"]]
    new_state = {}
    for i, p, name, gi in zip(ids, params, names, owner):
        if saved.get(i):
            new_state[p] = _load_param_state(opt, p, name, groups[gi], saved[i])
    return groups, new_state


def load_post_hook(opt: QuantizedOptimizer) -> None:
    """Install the state prepared by :func:`load_pre_hook`; fill distopt's group keys."""
    from ..optim.base import GROUP_OVERRIDES

    for p, state in opt.__dict__.pop("_loading", {}).items():
        opt.state[p] = state
    for group in opt.param_groups:  # e.g. a torch.optim state dict: fill distopt's own keys
        for key in GROUP_OVERRIDES:
            group.setdefault(key, opt.defaults[key])


def _untagged(group: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k != FAMILY_KEY}


def _checked_groups(opt: QuantizedOptimizer, saved_groups: list) -> list[dict[str, Any]]:
    """The saved groups merged with this optimizer's defaults, each one validated."""
    from ..optim.base import check_quantization_args

    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(f"state dict has {len(saved_groups)} param groups, the optimizer {len(opt.param_groups)}")
    merged = []
    for gi, (saved, live) in enumerate(zip(saved_groups, opt.param_groups)):
        family = saved.get(FAMILY_KEY, opt.family)
        if family != opt.family:
            raise ValueError(
                f"state dict: param_groups[{gi}] is from a distopt {family} optimizer; this is {type(opt).__name__}"
            )
        if len(saved["params"]) != len(live["params"]):
            raise ValueError(
                f"state dict: param_groups[{gi}] has {len(saved['params'])} parameters, the optimizer's "
                f"{len(live['params'])}"
            )
        where = f"state dict: param_groups[{gi}]"
        _refuse_foreign_semantics(saved, where)
        if FAMILY_KEY in saved:
            changed = [
                f"{k}={saved[k]!r} (here {live[k]!r})" for k in LAYOUT_KEYS if k in saved and saved[k] != live[k]
            ]
            if changed:
                raise ValueError(
                    f"{where} was saved with {', '.join(changed)}: these decide the state's layout; "
                    "build the optimizer with the settings it was saved with"
                )
        group = {k: v for k, v in {**opt.defaults, **saved}.items() if k not in _TORCH_ONLY_KEYS}
        try:
            opt.check_hyperparameters(group)
            check_quantization_args(group)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        merged.append(group)
    return merged


LAYOUT_KEYS = ("optim_bits", "min_8bit_size", "block_wise")
"""Group settings that decide the state's layout: a distopt state dict must match them."""

_TORCH_ONLY_KEYS = ("foreach", "fused", "capturable", "differentiable", "maximize", "decoupled_weight_decay")
"""torch.optim group keys distopt has no use for (dropped once checked)."""


def _refuse_foreign_semantics(saved: Mapping[str, Any], where: str) -> None:
    """Refuse torch.optim groups whose update distopt does not compute."""
    if saved.get("maximize"):
        raise ValueError(f"{where} has maximize=True (torch.optim); distopt minimizes only")
    if saved.get("decoupled_weight_decay") is False and saved.get("weight_decay", 0) != 0:
        raise ValueError(
            f"{where} is torch.optim.Adam's with L2 weight decay (decoupled_weight_decay=False); "
            "distopt's AdamW decays the weights directly"
        )


def _load_param_state(opt, p: torch.Tensor, name: str, group: dict, saved: Mapping[str, Any]) -> dict:
    """This rank's state of ``p`` from its saved state, or an error naming ``p``."""
    shard = row_shard(p, opt.row_shards, name)
    slots = set(opt.all_slots)
    known = {*_SCALARS, "gnorm_history", *slots, *(f"{s}_absmax" for s in slots)}
    extra = sorted(set(saved) - known)
    if extra:
        raise ValueError(f"state dict: {name} has unknown state {extra} for {type(opt).__name__}")
    missing = [k for k in _required(opt, group, saved) if k not in saved]
    if missing:
        raise ValueError(f"state dict: {name} has no {missing} in its state (saved with its group's settings)")
    step = saved.get("step", 0)  # torch.optim.SGD keeps no step
    state = {"step": _scalar(step, torch.float32, name, "step", integral=True)}
    if "nonfinite_count" in saved:
        total = _scalar(saved["nonfinite_count"], torch.int64, name, "nonfinite_count", integral=True)
        state["nonfinite_count"] = total if _first_of_group(shard) else torch.zeros_like(total)
        state["nonfinite_count"] = state["nonfinite_count"].to(_local_device(p))
    for slot in opt.all_slots:  # a fixed key order: ranks walk the state in step (collectives)
        if slot in saved:
            state.update(_load_slot(p, name, shard, group, slot, saved, opt.state.get(p, {})))
    if "gnorm_history" in saved:
        history = _tensor(saved["gnorm_history"], name, "gnorm_history", (torch.float64,), (100,))
        _check_values(history, name, "gnorm_history")
        state["gnorm_history"] = history.to(device=_local_device(p), copy=True)
    absmax_alone = [k for k in saved if k.endswith("_absmax") and k.removesuffix("_absmax") not in saved]
    if absmax_alone:
        raise ValueError(f"state dict: {name} has {absmax_alone} without the codes they scale")
    return state


def _load_slot(p, name, shard: RowShard, group, slot: str, saved: Mapping[str, Any], live: Mapping) -> dict:
    shape = shard.global_shape
    eight = uses_8bit_state(shape, group["optim_bits"], group["min_8bit_size"])
    dtype = torch.uint8 if eight else torch.float32
    value = _tensor(saved[slot], name, slot, (dtype,), shape, hint=_width_hint(eight, group))
    out = {slot: _localize(value, p, shard, shape, live.get(slot))}
    if eight:
        key = f"{slot}_absmax"
        if key not in saved:
            raise ValueError(f"state dict: {name}'s 8-bit {slot!r} has no {key!r}")
        ashape = absmax_shape(shape, group["block_wise"])
        absmax = _tensor(saved[key], name, key, (torch.float32,), ashape, hint="(block_wise as saved)")
        _check_values(absmax, name, key)
        if group["block_wise"]:
            out[key] = _localize(absmax, p, shard, ashape, live.get(key))
        else:
            out[key] = _replicated(absmax, p, shard)
    elif f"{slot}_absmax" in saved:
        raise ValueError(f"state dict: {name}'s {slot!r} is 32-bit but the state dict has {slot}_absmax")
    return out


def _required(opt, group: Mapping[str, Any], saved: Mapping[str, Any]) -> list[str]:
    """The keys a saved parameter state must hold. A state saved by distopt (its group is
    tagged) after a step holds every slot its group's settings use, and the history when
    clipping is on; foreign ones (torch.optim, converted bitsandbytes) may start those afresh."""
    if FAMILY_KEY not in group:  # torch.optim.SGD keeps no step, AdamW does
        return ["step", *opt.required_slots] if opt.required_slots else []
    required = ["step", *opt.required_slots]
    if _number(saved.get("step", 0)) > 0:
        required += [slot for slot, _ in opt.state_slots(group)]
        required += ["gnorm_history"] if group["percentile_clipping"] < 100 else []
    return list(dict.fromkeys(required))


def _number(value: Any) -> float:
    if torch.is_tensor(value) and value.numel() == 1:
        return float(value.full_tensor() if isinstance(value, DTensor) else value)
    return float(value) if isinstance(value, numbers.Real) else 0.0


def _check_values(value: torch.Tensor, name: str, key: str) -> None:
    """Scales and squared norms are finite and >= 0 (a NaN absmax would freeze its block)."""
    whole = value.full_tensor() if isinstance(value, DTensor) else value  # the same verdict on every rank
    if whole.numel() and not bool((torch.isfinite(whole) & (whole >= 0)).all()):
        raise ValueError(f"state dict: {name}'s {key!r} holds values that are negative or not finite")


def _width_hint(eight: bool, group) -> str:
    rule = f"optim_bits={group['optim_bits']}, min_8bit_size={group['min_8bit_size']}"
    return f"({'8-bit' if eight else '32-bit'} state for this parameter under {rule})"


def _tensor(value: Any, name: str, key: str, dtypes: tuple, shape: tuple, hint: str = "") -> torch.Tensor:
    if not torch.is_tensor(value):
        raise ValueError(f"state dict: {name}'s {key!r} is {type(value).__name__}, not a tensor")
    if value.dtype not in dtypes:
        want = " or ".join(str(d) for d in dtypes)
        raise ValueError(f"state dict: {name}'s {key!r} is {value.dtype}, expected {want} {hint}".rstrip())
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"state dict: {name}'s {key!r} has shape {tuple(value.shape)}, expected {tuple(shape)}")
    return value


def _scalar(value: Any, dtype: torch.dtype, name: str, key: str, integral: bool = False) -> torch.Tensor:
    if torch.is_tensor(value):
        if value.numel() != 1 or value.is_complex():
            raise ValueError(f"state dict: {name}'s {key!r} must be one number, not shape {tuple(value.shape)}")
        value = value.full_tensor() if isinstance(value, DTensor) else value
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"state dict: {name}'s {key!r} is {value!r}, expected a finite number >= 0")
    if integral and (value != int(value) or value > 2**53):
        raise ValueError(f"state dict: {name}'s {key!r} is {value!r}, expected a whole number (a count)")
    return torch.tensor(value, dtype=dtype)


def _local_device(p: torch.Tensor) -> torch.device:
    return p.to_local().device if isinstance(p, DTensor) else p.device


def _first_of_group(shard: RowShard) -> bool:
    return shard.group is None or dist.get_rank(shard.group) == 0


def _local_rows(value: torch.Tensor, p: torch.Tensor, shard: RowShard) -> torch.Tensor:
    """This rank's rows of a saved tensor laid out like the parameter (global shape)."""
    if isinstance(value, DTensor):
        if isinstance(p, DTensor) and value.device_mesh == p.device_mesh and value.placements == p.placements:
            return value.to_local()
        value = value.full_tensor()
    if shard.group is None and shard.mesh is None:
        return value
    rows = (p.to_local() if isinstance(p, DTensor) else p).shape[0]
    return value.narrow(0, shard.row_offset, rows)


def _localize(value: torch.Tensor, p: torch.Tensor, shard: RowShard, shape: tuple, live) -> torch.Tensor:
    """``value`` laid out like ``p``'s state: a copy, unless it is the live state tensor
    itself (``dcp.load`` into the optimizer's own state dict), which is kept as it is."""
    rows = _local_rows(value, p, shard)
    if live is not None and _same_tensor(rows, local(live)):
        return live
    return wrap_like_param(rows.to(device=_local_device(p), copy=True).contiguous(), shard, shape)


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    same_layout = a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
    return same_layout and a.device == b.device and a.data_ptr() == b.data_ptr()


def _replicated(value: torch.Tensor, p: torch.Tensor, shard: RowShard) -> torch.Tensor:
    whole = value.full_tensor() if isinstance(value, DTensor) else value
    return wrap_replicated(whole.to(device=_local_device(p), copy=True), shard)
