"""The explicit entry points for what auto-detection cannot see.

FSDP2 (DTensor) parameters need nothing: distopt reads their mesh and placements.
Two things it cannot see are declared here:

- :func:`shard_rows`: a plain tensor that holds some dim-0 rows of a larger parameter
  whose other rows live on other ranks of a process group (custom or ZeRO-style
  sharding without DTensor);
- :func:`check_replicated`: parameters that every rank of a group holds in full (DDP),
  checked to be bitwise identical across the group.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from .sharding import RowShard

if TYPE_CHECKING:
    from ..optim.base import QuantizedOptimizer


def shard_rows(
    optimizer: QuantizedOptimizer,
    param: torch.Tensor,
    *,
    global_shape: tuple[int, ...],
    row_offset: int,
    group: dist.ProcessGroup | DeviceMesh | None = None,
) -> None:
    """Declare ``param`` as rows ``[row_offset, row_offset + param.shape[0])`` of a parameter
    of ``global_shape`` whose other rows are held, each by exactly one rank, by ``group``:
    a process group, a 1-D device mesh (for a dimension of a larger mesh, ``mesh["name"]``),
    or ``None`` for the world.

    Guarantees: given the same gradients, the declared shards evolve bitwise as the same
    rows of one process holding the whole parameter would; 8-bit vs 32-bit state is
    decided from ``global_shape``; percentile clipping uses the whole parameter's norm
    (one all-reduce per step for all parameters); ``block_wise=False`` uses the whole
    parameter's absmax (one MAX all-reduce). Every rank of ``group`` must call
    ``step()`` together. Declare before the parameter's first step.
    """
    name = "the declared parameter"
    if not any(param is p for g in optimizer.param_groups for p in g["params"]):
        raise ValueError(f"shard_rows: {name} (shape {tuple(param.shape)}) is not in this optimizer")
    if optimizer.state.get(param):
        raise RuntimeError(f"shard_rows: {name} already has state; declare its sharding before its first step")
    if param.dim() == 0:
        raise ValueError("shard_rows: a 0-d parameter has no rows to shard")
    if group is None and not dist.is_initialized():
        raise RuntimeError("shard_rows: no process group is initialized; pass group= or call init_process_group")
    global_shape = tuple(int(d) for d in global_shape)
    if len(global_shape) != param.dim() or global_shape[1:] != tuple(param.shape[1:]):
        raise ValueError(f"shard_rows: global_shape {global_shape} does not extend local shape {tuple(param.shape)}")
    rows = param.shape[0] if param.dim() else 1
    if not 0 <= row_offset <= global_shape[0] - rows:
        raise ValueError(f"shard_rows: row_offset {row_offset} puts {rows} rows outside {global_shape[0]}")
    group = process_group(group, "shard_rows")
    optimizer.row_shards[param] = RowShard(global_shape, row_offset, group)


def check_replicated(optimizer: QuantizedOptimizer, group: dist.ProcessGroup | DeviceMesh | None = None) -> None:
    """Raise if any plain-tensor parameter or state differs across the ranks of ``group``
    (a process group, a 1-D device mesh, or ``None`` for the world).

    For replicated training (DDP): one all-gather of a checksum per tensor, bitwise.
    """
    group = process_group(group, "check_replicated")
    sums = []
    for g in optimizer.param_groups:
        for p in g["params"]:
            if p in optimizer.row_shards:
                continue
            tensors = [p.detach(), *(v for v in optimizer.state.get(p, {}).values() if torch.is_tensor(v))]
            sums.extend(_checksum(t) for t in tensors)
    mine = torch.tensor(sums, dtype=torch.int64)
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    for rank, theirs in enumerate(gathered):
        if not torch.equal(theirs, mine):
            raise RuntimeError(f"check_replicated: parameters or optimizer state differ from rank {rank}'s")


def process_group(group: dist.ProcessGroup | DeviceMesh | None, caller: str) -> dist.ProcessGroup:
    """The process group that ``group`` names: itself, a 1-D mesh's, or the world's."""
    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(
                f"{caller}: a {group.ndim}-D device mesh holds several process groups; pass one dimension, "
                f"e.g. mesh[{group.mesh_dim_names[-1] if group.mesh_dim_names else 'name'!r}]"
            )
        return group.get_group()
    return group if group is not None else dist.group.WORLD


def _checksum(t: torch.Tensor) -> int:
    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).to(torch.int64)
    weights = torch.arange(1, raw.numel() + 1, dtype=torch.int64) % 65521
    return int((raw * weights).sum()) if raw.numel() else 0
