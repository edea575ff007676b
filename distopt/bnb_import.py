"""Import of bitsandbytes 0.50 optimizer state dicts into distopt's own one-process format.

Role: :func:`from_bitsandbytes` turns the state dict of a bitsandbytes ``AdamW8bit``,
``AdamW32bit``, ``Adam8bit``/``Adam32bit`` (and their ``optim_bits`` / paged forms) or
``SGD8bit``/``SGD32bit`` into the state dict that the matching distopt optimizer itself
would save; :func:`is_bitsandbytes_state_dict` recognises one, so that loading can call
the conversion first. See ``docs/migrating-from-bitsandbytes.md``.

bitsandbytes' layout (0.50): per parameter ``step`` (a Python int) and, nested under
``"__bnb_optimizer_quant_state__"``, ``state1`` (and ``state2`` for Adam-style
optimizers): fp32 tensors shaped like the parameter, or uint8 codes shaped like it plus
``absmax1``/``absmax2`` (fp32, one per block of 256 elements of the *flattened* tensor)
and ``qmap1``/``qmap2`` (the signed / unsigned dynamic maps). SGD's param groups hold
``betas = (momentum, dampening)``, not ``momentum``. The older flat layout (the same
keys without the nesting) is read as well.

Invariants:

- The conversion is pure: it builds a new state dict (no tensor shared with the input)
  and changes neither ``optimizer`` nor ``state_dict``. Whatever does not map (group or
  parameter counts, optimizer kind, shapes, dtypes, hyperparameters) raises ValueError
  naming ``param_groups[g]['params'][i]`` (or the group), so a load that converts first
  fails before it changes anything.
- The result is laid out by distopt's rule, decided per parameter from its global
  shape (:func:`distopt.quant.uses_8bit_state`), whatever bitsandbytes chose.
- Exact where the layouts agree: 8-bit state with distopt's map whose row length ``R``
  is a multiple of 256 (or which has one row) has the same blocks in both layouts, so
  codes and absmax are carried over bit for bit. 8-bit state that distopt keeps in
  32-bit is dequantized exactly (``qmap[code] * absmax``, as bitsandbytes computes it).
- Elsewhere 8-bit state is re-blocked: dequantized and re-quantized in distopt's rows,
  with an error of at most :func:`reblock_error_bound` times the new block's absmax.
- Hyperparameters that bitsandbytes applied (``lr``, ``weight_decay``; AdamW's
  ``betas`` and ``eps``; SGD's ``momentum``) come from the state dict; the ones it does
  not have or ignores (``optim_bits``, ``min_8bit_size``, ``percentile_clipping``,
  ``block_wise``, ``amsgrad``, ``dampening``, ``nesterov``) from ``optimizer``'s groups.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch

from . import quant
from .optim.adamw import AdamW
from .optim.base import check_quantization_args, param_name
from .optim.sgd import SGD

QUANT_STATE_KEY = "__bnb_optimizer_quant_state__"
"""Where bitsandbytes nests a parameter's state tensors in its state dict."""

_BNB_GROUP_KEYS = ("params", "lr", "betas", "eps", "weight_decay", "alpha", "t_alpha", "t_beta3")
"""Group keys that bitsandbytes' optimizers define (all others are the user's own)."""

_NOT_BNB_GROUP_KEYS = ("optim_bits", "amsgrad", "momentum", "maximize", "foreach", "differentiable", "fused")
"""Keys that distopt's or torch's groups have and a bitsandbytes group never does."""

_TRUST_RATIO_KEY = "unorm_vec"
"""State of bitsandbytes' LAMB/LARS (``max_unorm > 0``), which distopt does not implement."""

_SLOTS = {"AdamW": (("exp_avg", "1", True), ("exp_avg_sq", "2", False)), "SGD": (("momentum_buffer", "1", True),)}
"""Per distopt family: (distopt slot, bitsandbytes state index, signed map)."""


def reblock_error_bound(signed: bool) -> float:
    """Largest ``|re-quantized - original| / new block absmax`` of a re-blocked state.

    Half the largest gap between neighbouring map values: 0.0070313 for the signed map,
    0.0035157 for the unsigned one. The fp32 rounding of ``x * (1 / absmax)`` and of the
    decoded ``qmap[code] * absmax`` can add up to about ``2**-22`` (in units of absmax).
    """
    return float(quant.qmap(signed).diff().max()) / 2


# --- recognising -------------------------------------------------------------------------------


def is_bitsandbytes_state_dict(state_dict: Any) -> bool:
    """Whether ``state_dict`` is a bitsandbytes (0.50, or older flat) optimizer state dict.

    A parameter state with the nested ``__bnb_optimizer_quant_state__`` entry or a
    ``state1`` tensor says so; without any parameter state, the param groups decide
    (bitsandbytes' keys, none of distopt's or torch's).
    """
    if not isinstance(state_dict, Mapping):
        return False
    state, groups = state_dict.get("state"), state_dict.get("param_groups")
    if not isinstance(state, Mapping) or not isinstance(groups, (list, tuple)):
        return False
    per_param = [s for s in state.values() if isinstance(s, Mapping) and s]
    if per_param:
        return any(QUANT_STATE_KEY in s or "state1" in s for s in per_param)
    return bool(groups) and all(_looks_like_bnb_group(g) for g in groups)


def _looks_like_bnb_group(group: Any) -> bool:
    return (
        isinstance(group, Mapping)
        and all(k in group for k in ("params", "lr", "betas", "eps", "weight_decay"))
        and not any(k in group for k in _NOT_BNB_GROUP_KEYS)
    )


# --- converting --------------------------------------------------------------------------------


def from_bitsandbytes(optimizer: torch.optim.Optimizer, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The distopt state dict equivalent to bitsandbytes' ``state_dict`` for ``optimizer``.

    ``optimizer`` is a distopt ``AdamW``-family (for bitsandbytes' Adam/AdamW state) or
    ``SGD``-family optimizer with the same param groups, parameters and shapes as the
    bitsandbytes one. The result uses parameter ids ``0..N-1`` in group order and loads
    with ``optimizer.load_state_dict``. Raises ValueError (naming the group or the
    parameter) for anything that does not map; neither argument is changed.
    """
    family = _family(optimizer)
    saved_groups = _saved_groups(optimizer, state_dict)
    entries = _param_entries(family, saved_groups, optimizer.param_groups, state_dict.get("state", {}))
    groups, state, index = [], {}, 0
    for gi, (saved, live) in enumerate(zip(saved_groups, optimizer.param_groups)):
        group = _converted_group(optimizer, family, gi, saved, live)
        for pi, p in enumerate(live["params"]):
            entry = entries[index + pi]
            if entry:
                shape = _global_shape(optimizer, p)
                state[index + pi] = _converted_param(family, entry, shape, group, param_name(gi, pi, p))
        groups.append({**group, "params": list(range(index, index + len(live["params"])))})
        index += len(live["params"])
    return {"state": state, "param_groups": groups}


def _param_entries(family: str, saved_groups, live_groups, saved_state: Mapping) -> list[dict[str, Any]]:
    """Each parameter's unwrapped bitsandbytes state, in order, checked for the optimizer kind."""
    listed = {pid for g in saved_groups for pid in g["params"]}
    unlisted = [pid for pid in saved_state if pid not in listed]
    if unlisted:
        raise ValueError(f"bitsandbytes import: state for parameter ids {unlisted} that no param group lists")
    entries = []
    for gi, (saved, live) in enumerate(zip(saved_groups, live_groups)):
        for pi, (pid, p) in enumerate(zip(saved["params"], live["params"])):
            name = param_name(gi, pi, p)
            entry = _unwrapped(saved_state.get(pid), name)
            if entry:
                _check_kind(family, entry, name)
            entries.append(entry)
    return entries


def _family(optimizer: torch.optim.Optimizer) -> str:
    if isinstance(optimizer, AdamW):
        return "AdamW"
    if isinstance(optimizer, SGD):
        return "SGD"
    raise ValueError(
        f"bitsandbytes import: {type(optimizer).__name__} is not a distopt AdamW or SGD optimizer; "
        "bitsandbytes state converts into distopt.AdamW* (from Adam/AdamW) or distopt.SGD* (from SGD)"
    )


def _saved_groups(optimizer: torch.optim.Optimizer, state_dict: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    saved_groups = state_dict.get("param_groups") if isinstance(state_dict, Mapping) else None
    if not isinstance(saved_groups, (list, tuple)):
        raise ValueError("bitsandbytes import: the state dict has no 'param_groups' list")
    live = optimizer.param_groups
    if len(saved_groups) != len(live):
        raise ValueError(
            f"bitsandbytes import: the state dict has {len(saved_groups)} param groups, the optimizer {len(live)}"
        )
    for gi, (saved, group) in enumerate(zip(saved_groups, live)):
        n, m = len(saved["params"]), len(group["params"])
        if n != m:
            raise ValueError(f"bitsandbytes import: param_groups[{gi}] has {n} parameters in the state dict, {m} here")
    return list(saved_groups)


def _global_shape(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> tuple[int, ...]:
    """The whole parameter's shape (a DTensor's ``shape`` is global; row shards are declared)."""
    shard = getattr(optimizer, "row_shards", {}).get(p)
    return tuple(shard.global_shape) if shard is not None else tuple(p.shape)


# --- param groups ------------------------------------------------------------------------------


def _converted_group(optimizer, family: str, gi: int, saved: Mapping[str, Any], live: Mapping[str, Any]) -> dict:
    """distopt's group: its own keys from ``live``, bitsandbytes' applied values from ``saved``."""
    where = f"bitsandbytes import: param_groups[{gi}]"
    missing = [k for k in ("lr", "betas", "weight_decay") if k not in saved]
    if missing:
        raise ValueError(f"{where} has no {missing}: not a bitsandbytes optimizer's param group")
    is_two_state = any(k in saved for k in ("alpha", "t_alpha", "t_beta3"))
    if is_two_state != (family == "AdamW"):
        kind = "an Adam-style (2-state)" if is_two_state else "a 1-state (SGD-style)"
        raise ValueError(f"{where} is from {kind} bitsandbytes optimizer; this is {type(optimizer).__name__}")
    mapped = _adamw_values(saved, where) if family == "AdamW" else _sgd_values(saved, where)
    own = {k: v for k, v in live.items() if k != "params"}
    extra = {k: v for k, v in saved.items() if k not in _BNB_GROUP_KEYS and k not in optimizer.defaults}
    group = {**own, **extra, "lr": saved["lr"], "weight_decay": saved["weight_decay"], **mapped}
    try:
        optimizer.check_hyperparameters(group)
        check_quantization_args(group)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    return group


def _adamw_values(saved: Mapping[str, Any], where: str) -> dict[str, Any]:
    betas = saved["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{where} has betas {betas!r}: AdamW takes two (a third is AdEMAMix's)")
    if saved.get("alpha", 0.0) or saved.get("t_alpha") is not None or saved.get("t_beta3") is not None:
        raise ValueError(f"{where} has AdEMAMix's alpha/t_alpha/t_beta3 set: it is not Adam/AdamW state")
    if "eps" not in saved:
        raise ValueError(f"{where} has no 'eps'")
    return {"betas": (betas[0], betas[1]), "eps": saved["eps"]}


def _sgd_values(saved: Mapping[str, Any], where: str) -> dict[str, Any]:
    betas = saved["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{where} has betas {betas!r}; bitsandbytes' SGD saves (momentum, dampening)")
    if saved.get("eps", 0.0) != 0.0:  # bitsandbytes' SGD saves eps = 0; RMSprop and Adagrad do not
        raise ValueError(f"{where} has eps {saved['eps']!r}: RMSprop or Adagrad state, not SGD's")
    return {"momentum": betas[0]}


# --- per-parameter state -----------------------------------------------------------------------


def _unwrapped(entry: Any, name: str) -> dict[str, Any]:
    """A bitsandbytes parameter state with its nested tensors moved up (a new dict)."""
    if entry is None:
        return {}
    if not isinstance(entry, Mapping):
        raise ValueError(f"bitsandbytes import: {name}'s state is {type(entry).__name__}, not a dict")
    flat = {k: v for k, v in entry.items() if k != QUANT_STATE_KEY}
    nested = entry.get(QUANT_STATE_KEY, {})
    if not isinstance(nested, Mapping):
        raise ValueError(f"bitsandbytes import: {name}'s {QUANT_STATE_KEY!r} is not a dict")
    return {**flat, **nested}


def _converted_param(family: str, entry: Mapping[str, Any], shape: tuple, group: Mapping, name: str) -> dict:
    """distopt's state of one parameter from its (unwrapped) bitsandbytes state."""
    eight = quant.uses_8bit_state(shape, group["optim_bits"], group["min_8bit_size"])
    sources = {slot: _bnb_slot(entry, idx, signed, shape, name) for slot, idx, signed in _SLOTS[family]}
    out = {"step": _step(entry, name), "nonfinite_count": torch.zeros((), dtype=torch.int64)}
    for slot, _, signed in _SLOTS[family]:
        out.update(_converted_slot(slot, signed, sources[slot], shape, eight, group["block_wise"]))
    if family == "AdamW" and group["amsgrad"]:  # bitsandbytes keeps no max_v: start it at v
        out["max_exp_avg_sq"] = out["exp_avg_sq"].clone()
        if "exp_avg_sq_absmax" in out:
            out["max_exp_avg_sq_absmax"] = out["exp_avg_sq_absmax"].clone()
    return out


def _check_kind(family: str, entry: Mapping[str, Any], name: str) -> None:
    if _TRUST_RATIO_KEY in entry:
        raise ValueError(f"bitsandbytes import: {name} has LAMB/LARS trust-ratio state ({_TRUST_RATIO_KEY!r})")
    if "state1" not in entry:
        raise ValueError(f"bitsandbytes import: {name} has no 'state1' in its bitsandbytes state")
    if ("state2" in entry) != (family == "AdamW"):
        has = "two states (Adam-style)" if "state2" in entry else "one state (SGD-style)"
        raise ValueError(f"bitsandbytes import: {name} has {has} in the state dict; this is a distopt {family}")


def _step(entry: Mapping[str, Any], name: str) -> torch.Tensor:
    value = entry.get("step")
    if torch.is_tensor(value) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"bitsandbytes import: {name}'s step is {value!r}, expected a number >= 0")
    return torch.tensor(float(value), dtype=torch.float32)


def _bnb_slot(entry: Mapping[str, Any], idx: str, signed: bool, shape: tuple, name: str) -> dict[str, torch.Tensor]:
    """``{"values": fp32}`` or ``{"codes", "absmax", "qmap"}`` of bitsandbytes' state ``idx``, checked."""
    values = _bnb_tensor(entry, f"state{idx}", name)
    if tuple(values.shape) != shape:
        raise ValueError(
            f"bitsandbytes import: {name}'s state{idx} has shape {tuple(values.shape)}, the parameter {shape}"
        )
    if values.dtype != torch.uint8:
        if not values.is_floating_point():
            raise ValueError(f"bitsandbytes import: {name}'s state{idx} is {values.dtype}")
        return {"values": values.float()}
    absmax, qmap_ = _bnb_tensor(entry, f"absmax{idx}", name), _bnb_tensor(entry, f"qmap{idx}", name)
    blocks = -(-math.prod(shape) // quant.BLOCK_SIZE)
    if absmax.dtype != torch.float32 or tuple(absmax.shape) != (blocks,):
        raise ValueError(
            f"bitsandbytes import: {name}'s absmax{idx} is {absmax.dtype} {tuple(absmax.shape)}, "
            f"expected torch.float32 ({blocks},)"
        )
    if qmap_.dtype != torch.float32 or tuple(qmap_.shape) != (256,):
        raise ValueError(f"bitsandbytes import: {name}'s qmap{idx} is {qmap_.dtype} {tuple(qmap_.shape)}")
    return {"codes": values, "absmax": absmax, "qmap": qmap_}


def _bnb_tensor(entry: Mapping[str, Any], key: str, name: str) -> torch.Tensor:
    value = entry.get(key)
    if not torch.is_tensor(value):
        raise ValueError(f"bitsandbytes import: {name}'s {key!r} is missing or not a tensor")
    return value.detach()


def _converted_slot(slot: str, signed: bool, src: dict, shape: tuple, eight: bool, block_wise: bool) -> dict:
    """One distopt state slot (fp32, or codes + absmax) from one bitsandbytes state."""
    if eight and block_wise and "codes" in src and _same_blocks(src, signed, shape):
        d0 = shape[0]
        absmax = src["absmax"].reshape(d0, quant.blocks_per_row(shape))
        return {slot: src["codes"].clone().contiguous(), f"{slot}_absmax": absmax.clone().contiguous()}
    values = src["values"] if "values" in src else dequantize_bnb(src["codes"], src["absmax"], src["qmap"])
    if not eight:
        return {slot: values.clone().contiguous()}
    codes, absmax = quant.quantize_blockwise(values, quant.qmap(signed, values.device), block_wise)
    return {slot: codes, f"{slot}_absmax": absmax}


def _same_blocks(src: dict, signed: bool, shape: tuple) -> bool:
    """Whether bitsandbytes' flat blocks are distopt's row blocks, with the same map."""
    rows_agree = shape[0] <= 1 or quant.row_length(shape) % quant.BLOCK_SIZE == 0 or math.prod(shape) == 0
    return rows_agree and torch.equal(src["qmap"], quant.qmap(signed, src["qmap"].device))


def dequantize_bnb(codes: torch.Tensor, absmax: torch.Tensor, qmap_: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' block-wise dequantization (blocks of 256 of the flattened tensor), in fp32."""
    flat = qmap_[codes.reshape(-1).long()]
    n, blocks = flat.numel(), absmax.numel()
    padded = torch.nn.functional.pad(flat, (0, blocks * quant.BLOCK_SIZE - n))
    scaled = padded.view(blocks, quant.BLOCK_SIZE) * absmax.view(blocks, 1)
    return scaled.reshape(-1)[:n].reshape(codes.shape)
