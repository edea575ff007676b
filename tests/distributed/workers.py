"""Functions run on every rank by tests/distributed (importable by spawned processes)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from tests.distributed.workloads import Params, case, snapshot, train


def fsdp_runs(rank, world_size, names, clips, thread_counts, steps, mesh_shape=None):
    """FSDP2 (or HSDP for a 2-D mesh) runs of every (case, clip, threads); rank 0's snapshots."""
    shape = tuple(mesh_shape or (world_size,))
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard")[-len(shape) :])
    out = {}
    for name in names:
        for clip in clips:
            for threads in thread_counts:
                torch.set_num_threads(threads)
                module = Params()
                fully_shard(module, mesh=mesh)
                params = list(module.parameters())
                opt = case(name).make(params, percentile_clipping=clip)
                train(opt, params, steps)
                out[(name, clip, threads)] = snapshot(opt, params)
    return out if rank == 0 else None


def count_collectives(rank, world_size):
    """all_reduce calls made by one step, for several configurations."""
    mesh = init_device_mesh("cpu", (world_size,))
    calls = []
    original = dist.all_reduce

    def counting(*args, **kwargs):
        calls.append(kwargs.get("op", args[1] if len(args) > 1 else None))
        return original(*args, **kwargs)

    counts = {}
    for name, clip in [("AdamW8bit", 100), ("AdamW8bit", 5), ("AdamW8bit-tensorwise", 100), ("AdamW8bit-tensorwise", 5)]:
        module = Params()
        fully_shard(module, mesh=mesh)
        params = list(module.parameters())
        opt = case(name).make(params, percentile_clipping=clip)
        train(opt, params, 1)  # the first step allocates state
        dist.all_reduce = counting
        try:
            train(opt, params, 1)
        finally:
            dist.all_reduce = original
        counts[(name, clip)] = [str(op) for op in calls]
        calls.clear()
    return counts
