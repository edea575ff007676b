"""Functions run on every rank by tests/distributed (importable by spawned processes)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from tests.distributed.workloads import Params, case, rows_of_rank, snapshot, train


def fsdp_runs(rank, world_size, names, clips, thread_counts, steps, mesh_shape=None):
    """FSDP2 (or HSDP for a 2-D mesh) runs of every (case, clip, threads); each rank's full snapshots."""
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
    return out


def count_collectives(rank, world_size):
    """all_reduce calls made by one step, for several configurations."""
    mesh = init_device_mesh("cpu", (world_size,))
    calls = []
    original = dist.all_reduce

    def counting(*args, **kwargs):
        calls.append(kwargs.get("op", args[1] if len(args) > 1 else None))
        return original(*args, **kwargs)

    counts = {}
    for name, clip in [
        ("AdamW8bit", 100),
        ("AdamW8bit", 5),
        ("AdamW8bit-tensorwise", 100),
        ("AdamW8bit-tensorwise", 5),
    ]:
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


def refused_placements(rank, world_size):
    """The error each unsupported placement gives at the first step."""
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    import distopt

    mesh = init_device_mesh("cpu", (world_size,))
    messages = {}
    for label, placements in [("Shard(1)", [Shard(1)]), ("_StridedShard", [_StridedShard(0, split_factor=2)])]:
        p = torch.nn.Parameter(distribute_tensor(torch.randn(8, 512), mesh, placements))
        opt = distopt.AdamW8bit([p], min_8bit_size=0)
        p.grad = distribute_tensor(torch.randn(8, 512), mesh, placements)
        try:
            opt.step()
            messages[label] = None
        except NotImplementedError as err:
            messages[label] = str(err)
    return messages


def state_bytes(rank, world_size):
    """Bytes of optimizer state this rank holds for a sharded model (after one step)."""
    mesh = init_device_mesh("cpu", (world_size,))
    module = Params([(1024, 512), (512, 1024), (4096,)])
    fully_shard(module, mesh=mesh)
    params = list(module.parameters())
    opt = case("AdamW8bit").make(params, min_8bit_size=4096)
    train(opt, params, 1)
    local = [v.to_local() if hasattr(v, "to_local") else v for s in opt.state.values() for v in s.values()]
    return sum(t.numel() * t.element_size() for t in local if t.dim() > 0)


def ddp_training(rank, world_size):
    """DDP with distopt: ranks see different data, stay bitwise identical, and distopt itself
    makes no collective (DDP's gradient all-reduce runs in its C++ reducer)."""
    import distopt
    from distopt.distributed import check_replicated

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = distopt.AdamW8bit(ddp.parameters(), lr=1e-3, min_8bit_size=0, percentile_clipping=5)
    own_calls = []
    original = dist.all_reduce

    def counting(*args, **kwargs):
        own_calls.append(1)
        return original(*args, **kwargs)

    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    for _ in range(10):
        x = torch.randn(32, 64, generator=gen)
        opt.zero_grad()
        ddp(x).square().mean().backward()
        dist.all_reduce = counting
        try:
            opt.step()
        finally:
            dist.all_reduce = original
    check_replicated(opt)
    check_replicated(opt, init_device_mesh("cpu", (world_size,)))
    eight_bit = opt.state[model[0].weight]["exp_avg"].dtype == torch.uint8
    return len(own_calls), eight_bit, [p.detach().clone() for p in model.parameters()]


def declared_row_shards(rank, world_size):
    """Plain tensors declared with shard_rows evolve like the same rows of one process."""
    from distopt.distributed import shard_rows
    from tests.distributed.workloads import full_grads

    shapes = [(33, 300), (6, 280)]
    full_params = list(Params(shapes).parameters())
    locals_, offsets = rows_of_rank(full_params, rank, world_size)
    opt = case("AdamW8bit").make(locals_, percentile_clipping=5)
    mesh = init_device_mesh("cpu", (world_size,))
    for p, full, start, group in zip(locals_, full_params, offsets, [mesh, None]):  # a device mesh; the world
        shard_rows(opt, p, global_shape=tuple(full.shape), row_offset=start, group=group)
    for k in range(10):
        for p, g, start in zip(locals_, full_grads(shapes, k), offsets):
            p.grad = g[start : start + p.shape[0]].clone()
        opt.step()
    return offsets, [p.detach().clone() for p in locals_]


def nonfinite_totals(rank, world_size):
    """nonfinite_counts() of a sharded model: the whole parameter's count on every rank."""
    mesh = init_device_mesh("cpu", (world_size,))
    module = Params()
    fully_shard(module, mesh=mesh)
    params = list(module.parameters())
    opt = case("AdamW8bit").make(params)
    train(opt, params, 6)  # a NaN at element (10, 17) of parameter 0 on step 4
    counts = opt.nonfinite_counts()
    return [counts[p] for p in params]
