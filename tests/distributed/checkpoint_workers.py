"""Checkpoint workloads run on every rank by tests/distributed/test_checkpoint.py.

Each builds the module of :mod:`tests.distributed.workloads` (uneven, empty and 1-D
shards), sharded with FSDP2 when ``fsdp`` is true, trains it on the seeded gradient
sequence, and goes through one of torch's checkpoint paths.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from tests.distributed.workloads import Params, case, rows_of_rank, snapshot, train


def model_and_optimizer(name: str, clip: int, fsdp: bool = True):
    module = Params()
    if fsdp:
        fully_shard(module, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    params = list(module.parameters())
    return module, params, case(name).make(params, percentile_clipping=clip)


def _plain(sd):
    """A state dict with every tensor as a whole CPU tensor (DTensors gathered)."""
    if isinstance(sd, dict):
        return {k: _plain(v) for k, v in sd.items()}
    if isinstance(sd, list):
        return [_plain(v) for v in sd]
    if hasattr(sd, "full_tensor"):
        return sd.full_tensor().cpu()
    return sd.detach().clone().cpu() if torch.is_tensor(sd) else sd


def full_state_dicts(rank, world_size, runs, steps, fsdp=True):
    """For each (name, clip) of ``runs``, after ``steps`` steps: the state dict that
    get_optimizer_state_dict gives with each set of options (rank 0's, gathered)."""
    out = {}
    for name, clip in runs:
        module, params, opt = model_and_optimizer(name, clip, fsdp)
        train(opt, params, steps)
        for label, options in [
            ("full", StateDictOptions(full_state_dict=True)),
            ("full+cpu_offload", StateDictOptions(full_state_dict=True, cpu_offload=True)),
            ("sharded-gathered", StateDictOptions()),
            ("full+flatten", StateDictOptions(full_state_dict=True, flatten_optimizer_state_dict=True)),
        ]:
            out[(name, clip, label)] = _plain(get_optimizer_state_dict(module, opt, options=options))
    return out if rank == 0 else None


def set_and_continue(rank, world_size, name, clip, steps, more, options):
    """Train, take the optimizer state dict with ``options`` (full or sharded, flattened
    or not), load it into a fresh optimizer (beside a copy of the trained parameters)
    and train ``more`` steps."""
    module, params, opt = model_and_optimizer(name, clip)
    train(opt, params, steps)
    saving = {k: v for k, v in options.items() if k in ("full_state_dict", "flatten_optimizer_state_dict")}
    saved = get_optimizer_state_dict(module, opt, options=StateDictOptions(**saving))
    trained = {k: v.full_tensor() for k, v in module.state_dict().items()}
    fresh_module, fresh_params, fresh = model_and_optimizer(name, clip)
    fresh_module.load_state_dict(_reshard_like(fresh_module, trained))
    if options.get("broadcast_from_rank0") and rank != 0:
        saved = {}
    set_optimizer_state_dict(fresh_module, fresh, saved, options=StateDictOptions(**options))
    train(fresh, fresh_params, more, first=steps)
    return snapshot(fresh, fresh_params), [fresh.nonfinite_counts()[p] for p in fresh_params]


def _reshard_like(module, full: dict) -> dict:
    from torch.distributed.tensor import distribute_tensor

    live = module.state_dict()
    return {k: distribute_tensor(v, live[k].device_mesh, live[k].placements) for k, v in full.items()}


def dcp_save(rank, world_size, runs, steps, root, fsdp=True):
    """For each (name, clip) of ``runs``: train ``steps`` steps, save model and optimizer
    with DCP (sharded) under ``root/name-clip``."""
    for name, clip in runs:
        module, params, opt = model_and_optimizer(name, clip, fsdp)
        train(opt, params, steps)
        state = {"model": module.state_dict(), "optim": get_optimizer_state_dict(module, opt)}
        dcp.save(state, checkpoint_id=f"{root}/{name}-{clip}")


def dcp_load_and_continue(rank, world_size, runs, steps, more, root, fsdp=True):
    """For each (name, clip) of ``runs``: a fresh model and optimizer, DCP load (the usual
    resume: torch's state dict of the fresh optimizer is the load target), ``more`` steps."""
    out = {}
    for name, clip in runs:
        module, params, opt = model_and_optimizer(name, clip, fsdp)
        state = {"model": module.state_dict(), "optim": get_optimizer_state_dict(module, opt)}
        dcp.load(state, checkpoint_id=f"{root}/{name}-{clip}")
        module.load_state_dict(state["model"])
        set_optimizer_state_dict(module, opt, state["optim"])
        train(opt, params, more, first=steps)
        out[(name, clip)] = snapshot(opt, params), [opt.nonfinite_counts()[p] for p in params]
    return out


def declared_shards_round_trip(rank, world_size, steps, more):
    """Declared row shards (shard_rows): the state dict holds whole tensors; loaded into
    fresh declared shards, training continues. Returns the state dict and the local rows."""
    from distopt.distributed import shard_rows
    from tests.distributed.workloads import full_grads

    shapes = [(33, 300), (6, 280), (40, 15)]
    whole = list(Params(shapes).parameters())

    def declared():
        params, offsets = rows_of_rank(whole, rank, world_size)
        opt = case("AdamW8bit").make(params, percentile_clipping=5)
        for p, w, start in zip(params, whole, offsets):
            shard_rows(opt, p, global_shape=tuple(w.shape), row_offset=start)
        return params, offsets, opt

    def run(params, offsets, opt, first, count):
        for k in range(first, first + count):
            for p, g, start in zip(params, full_grads(shapes, k), offsets):
                p.grad = g[start : start + p.shape[0]].clone()
            opt.step()

    params, offsets, opt = declared()
    run(params, offsets, opt, 0, steps)
    saved = opt.state_dict()
    fresh_params, _, fresh = declared()
    with torch.no_grad():
        for a, b in zip(fresh_params, params):
            a.copy_(b)
    fresh.load_state_dict(saved)
    run(fresh_params, offsets, fresh, steps, more)
    return saved, offsets, [p.detach().clone() for p in fresh_params]
