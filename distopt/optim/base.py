"""The optimizer base: argument resolution and validation, lazy state, the step loop.

Subclasses (:mod:`.adamw`, :mod:`.sgd`) say which state slots a parameter needs and
how one parameter is updated; everything else is here:

- bitsandbytes' arguments: ``optim_bits``, ``min_8bit_size``, ``percentile_clipping``,
  ``block_wise`` and ``is_paged``, overridable by an ``args`` object (or mapping) and,
  except ``is_paged``, per param group;
- paged state (``is_paged``, :mod:`distopt.paging`): every state slot is allocated by the
  optimizer's :class:`~distopt.paging.Pager` (spill files under ``spill_dir`` on CPU,
  unified memory on CUDA), all of a step's missing slots before anything changes, read
  ahead before and released after each parameter's update, and paged again after
  ``load_state_dict``; :meth:`QuantizedOptimizer.close` (or ``with optimizer:``) drops
  the state early;
- state layout decided once per parameter from its *global* shape
  (:func:`distopt.quant.uses_8bit_state`): 8-bit state is uint8 ``codes`` shaped like
  the parameter plus fp32 ``<name>_absmax``; 32-bit state is fp32;
- ``step`` is a 0-d fp32 CPU tensor per parameter (as in torch.optim);
  ``nonfinite_count`` (0-d int64) counts elements skipped for non-finite gradients;
  ``gnorm_history`` (100 float64) exists when percentile clipping is on;
- ``state_dict()`` / ``load_state_dict()`` go through the hooks of
  :mod:`distopt.distributed.state_dict`: quantized state stays quantized, DTensors stay
  laid out like their parameters, everything is checked before anything changes, and
  every state tensor keeps its dtype (torch.optim would cast uint8 codes and fp32
  absmax to the parameter's dtype).
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from .. import paging
from ..distributed import state_dict as checkpoint_hooks
from ..distributed.sharding import RowShard, row_shard
from . import stepping

GROUP_OVERRIDES = ("optim_bits", "min_8bit_size", "percentile_clipping", "block_wise")
"""Arguments a param group may set for its own parameters."""


def resolve_args(args: Any, **keywords: Any) -> dict[str, Any]:
    """Keyword values overridden by ``args``' attributes (or keys) where it has them."""
    if args is None:
        return dict(keywords)
    if isinstance(args, Mapping):
        return {k: args.get(k, v) for k, v in keywords.items()}
    return {k: getattr(args, k, v) for k, v in keywords.items()}


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_number(name: str, value: Any, low: float, high: float | None = None, *, open_high: bool = False) -> None:
    """Raise ValueError naming ``name`` unless ``low <= value <= high`` (``< high`` if open)."""
    if not _is_real(value) or value != value:
        raise ValueError(f"Invalid {name}: {value!r} (expected a real number)")
    too_high = high is not None and (value >= high if open_high else value > high)
    if value < low or too_high:
        bound = "" if high is None else (f" and < {high}" if open_high else f" and <= {high}")
        raise ValueError(f"Invalid {name}: {value!r} (expected >= {low}{bound})")


def check_quantization_args(group: Mapping[str, Any]) -> None:
    bits = group["optim_bits"]
    if isinstance(bits, bool) or bits not in (8, 32):
        raise ValueError(f"Invalid optim_bits: {bits!r} (expected 8 or 32)")
    pc = group["percentile_clipping"]
    if isinstance(pc, bool) or not isinstance(pc, numbers.Integral) or not 1 <= pc <= 100:
        raise ValueError(f"Invalid percentile_clipping: {pc!r} (expected an integer in 1..100; 100 disables it)")
    size = group["min_8bit_size"]
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 0:
        raise ValueError(f"Invalid min_8bit_size: {size!r} (expected an integer >= 0)")
    if not isinstance(group["block_wise"], bool):
        raise ValueError(f"Invalid block_wise: {group['block_wise']!r} (expected True or False)")


def param_name(group_index: int, param_index: int, p: torch.Tensor) -> str:
    return f"param_groups[{group_index}]['params'][{param_index}] (shape {tuple(p.shape)}, {p.dtype})"


class ParamName:
    """A parameter's :func:`param_name`, formatted when a message uses it (``str``, an
    f-string): a step names every parameter it checks, and formatting a name costs
    more than most of the checks."""

    __slots__ = ("group_index", "param_index", "p")

    def __init__(self, group_index: int, param_index: int, p: torch.Tensor) -> None:
        self.group_index, self.param_index, self.p = group_index, param_index, p

    def __str__(self) -> str:
        return param_name(self.group_index, self.param_index, self.p)


class QuantizedOptimizer(torch.optim.Optimizer):
    """Base class of distopt's optimizers (see the module docstring)."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        defaults: dict[str, Any],
        *,
        optim_bits: int,
        args: Any,
        min_8bit_size: int,
        percentile_clipping: int,
        block_wise: bool,
        is_paged: bool,
        spill_dir: str | os.PathLike | None = None,
    ) -> None:
        resolved = resolve_args(
            args,
            optim_bits=optim_bits,
            min_8bit_size=min_8bit_size,
            percentile_clipping=percentile_clipping,
            block_wise=block_wise,
            is_paged=is_paged,
        )
        self.is_paged = bool(resolved.pop("is_paged"))
        if spill_dir is not None and not self.is_paged:
            raise ValueError(f"Invalid spill_dir: {spill_dir!r} is given but the state is not paged (is_paged=False)")
        self.pager: paging.Pager | None = paging.Pager(spill_dir) if self.is_paged else None
        """Allocates and pages the state (None unless ``is_paged``)."""
        self.closed = False
        defaults = {**defaults, **resolved}
        self.check_hyperparameters(defaults)
        check_quantization_args(defaults)
        self.row_shards: dict[torch.Tensor, RowShard] = {}
        """Plain-tensor parameters declared as row shards (:func:`distopt.distributed.shard_rows`)."""
        super().__init__(params, defaults)
        self.register_state_dict_post_hook(checkpoint_hooks.state_dict_post_hook)
        self.register_load_state_dict_pre_hook(checkpoint_hooks.load_pre_hook)
        self.register_load_state_dict_post_hook(checkpoint_hooks.load_post_hook, prepend=True)

    # --- what subclasses provide ------------------------------------------------------

    update_fn = None
    """``distopt.functional`` update of one parameter (e.g. ``adamw_update``)."""
    new_absmax_fn = None
    """The matching first pass for per-tensor absmax (e.g. ``adamw_new_absmax``)."""
    update_multi_fn = None
    """``distopt.functional`` update of many parameters with 32-bit state, or None."""
    update_multi8_fn = None
    """``distopt.functional`` update of many CPU parameters with block-wise 8-bit state, or None."""

    def check_hyperparameters(self, group: Mapping[str, Any]) -> None:
        """Raise ValueError naming any invalid hyperparameter of ``group``."""
        raise NotImplementedError

    family: str = ""
    """The optimizer family a saved state dict must come from (``"AdamW"``, ``"SGD"``)."""

    all_slots: tuple[str, ...] = ()
    """Every state slot this optimizer can keep (those not in use are left alone)."""

    required_slots: tuple[str, ...] = ()
    """Slots that a saved parameter state must hold (others may start afresh)."""

    def state_slots(self, group: Mapping[str, Any]) -> list[tuple[str, bool]]:
        """(name, signed) of each state tensor a parameter of ``group`` keeps."""
        raise NotImplementedError

    def coefficients(self, s: stepping.ParamStep):
        """The update's coefficients for this parameter and step."""
        raise NotImplementedError

    # --- param groups -----------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; it may override hyperparameters and :data:`GROUP_OVERRIDES`.

        Everything is checked before the group is added.
        """
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        self.check_hyperparameters(merged)
        check_quantization_args(merged)
        params = param_group["params"]
        if isinstance(params, set):
            raise TypeError("distopt: a param group's params must be an ordered sequence, not a set")
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for i, p in enumerate(params):
            if isinstance(p, torch.Tensor) and p.dtype not in stepping.SUPPORTED_DTYPES:
                raise TypeError(
                    f"distopt: parameter {i} of the new param group has dtype {p.dtype}; "
                    "supported: float32, bfloat16, float16"
                )
        super().add_param_group({**param_group, "params": params})

    # --- the step -----------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        todo = [
            (p, ParamName(gi, pi, p), group)
            for gi, group in enumerate(self.param_groups)
            for pi, p in enumerate(group["params"])
            if p.grad is not None
        ]
        self._check_open("step()")
        checked = [stepping.check(p, name, self.row_shards) for p, name, _ in todo]  # may raise: nothing changed yet
        new = self.pager.new if self.pager is not None else stepping.plain_tensor
        fresh = stepping.allocate_state(self, todo, checked, new)  # may raise: nothing changed yet
        steps = stepping.prepare(self, todo, checked, fresh)
        stepping.set_gradient_scales(steps)
        stepping.set_tensor_absmax(steps, type(self).new_absmax_fn, self.coefficients, self.pager, self._paged_tensors)
        update = type(self).update_fn
        # many parameters per op call (functional's [Note: many parameters per call]); paged
        # state is paged in and out around each parameter's own update instead
        if not self.is_paged:
            multi32, multi8 = type(self).update_multi_fn, type(self).update_multi8_fn
            steps = stepping.update_in_few_calls(steps, multi32, multi8, self.coefficients)
        paged = [self._paged_tensors(s.state) for s in steps] if self.pager is not None else []
        for i, s in enumerate(steps):
            if self.pager is not None:  # this parameter's state and the next one's
                self.pager.prefetch(paged[i], paged[i + 1] if i + 1 < len(steps) else [], s.param.device)
            update(
                s.param, s.grad, s.state, self.coefficients(s), s.gnorm_scale, fused=s.fused, new_absmax=s.new_absmax
            )
            s.write_back()
            if self.pager is not None:
                self.pager.release(paged[i])
        return loss

    # --- paged state and its release ------------------------------------------------------

    def _paged_tensors(self, state: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """The local tensors of ``state`` that a paged optimizer pages: the slots and absmax."""
        return [v for k, v in state.items() if self._is_slot(k)]

    def _is_slot(self, key: str) -> bool:
        return key.removesuffix("_absmax") in self.all_slots

    def page_loaded_state(self, new_state: dict) -> dict:
        """``new_state`` (parameter -> state about to be installed by ``load_state_dict``)
        with every slot tensor paged: a live tensor loaded in place (``dcp.load``) is kept,
        any other is copied into freshly allocated paged memory. Unchanged if not paged."""
        if self.pager is None:
            return new_state
        names = {p: param_name(gi, pi, p) for gi, g in enumerate(self.param_groups) for pi, p in enumerate(g["params"])}
        paged = {}
        for p, state in new_state.items():
            live = self.state.get(p, {})
            paged[p] = {
                k: self.pager.copy(v, f"{names[p]}'s {k!r}") if self._is_slot(k) and v is not live.get(k) else v
                for k, v in state.items()
            }
        return paged

    def close(self) -> None:
        """Drop all optimizer state now (spill mappings are unmapped, managed memory freed,
        as soon as no other tensor refers to it); ``step()`` and ``load_state_dict()``
        raise afterwards. ``with optimizer:`` closes on exit. Idempotent."""
        self.state.clear()
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self, what: str) -> None:
        if self.closed:
            raise RuntimeError(f"distopt: {what} on a closed {type(self).__name__} (its state was released)")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._check_open("load_state_dict()")
        super().load_state_dict(state_dict)

    def nonfinite_counts(self) -> dict[torch.Tensor, int]:
        """Per parameter, how many elements' updates were skipped for non-finite gradients.

        Counts of sharded parameters cover every shard: this takes one all-reduce per
        process group, so every rank must call it.
        """
        params = [p for g in self.param_groups for p in g["params"] if "nonfinite_count" in self.state.get(p, {})]
        counts = {p: int(self.state[p]["nonfinite_count"]) for p in params}
        by_group: dict[object, list[torch.Tensor]] = {}
        for p in params:
            group = row_shard(p, self.row_shards, "").group
            if group is not None:
                by_group.setdefault(group, []).append(p)
        for group, members in by_group.items():
            total = torch.tensor([counts[p] for p in members], dtype=torch.int64)
            dist.all_reduce(total, group=group)
            counts.update(zip(members, total.tolist()))
        return counts
