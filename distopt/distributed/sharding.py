"""Where a parameter's local tensor sits in its global tensor, and who holds the rest.

distopt's state layout is cut by dim-0 rows (DESIGN §3.2), so a shard that holds whole
rows holds whole quantization blocks. Every parameter is described by a
:class:`RowShard`: its global shape, the global index of its first local row, and the
process group over which the other rows are spread (``None`` when this process holds
the whole parameter, as in a single process or under DDP).

DTensor parameters (FSDP2's ``fully_shard``) are described automatically from their
mesh and placements: ``Shard(0)`` on at most one mesh dimension, ``Replicate`` on the
others (HSDP). Any other placement (``Shard(1)``, ``_StridedShard`` from TP + FSDP,
``Partial``) is refused with an error naming the parameter. Plain tensors that are
shards of something larger are declared with :func:`distopt.distributed.shard_rows`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset


@dataclass(frozen=True)
class RowShard:
    """A parameter's place in its global tensor.

    Attributes:
        global_shape: shape of the whole parameter (decides 8-bit vs 32-bit state and
            the block layout).
        row_offset: global dim-0 index of the local tensor's first row.
        group: process group holding the other rows, each row on exactly one rank of
            it; ``None`` when the local tensor is the whole parameter.
        mesh, placements: the DTensor layout that state tensors take (DTensor
            parameters only).
    """

    global_shape: tuple[int, ...]
    row_offset: int = 0
    group: dist.ProcessGroup | None = None
    mesh: object | None = None
    placements: tuple | None = None

    @property
    def sharded(self) -> bool:
        return self.group is not None

    @property
    def global_rows(self) -> int:
        return self.global_shape[0] if self.global_shape else 1


def describe_dtensor(p: DTensor, name: object) -> RowShard:
    """The RowShard of a DTensor parameter; refuses placements other than Shard(0)/Replicate."""
    mesh, placements = p.device_mesh, tuple(p.placements)
    shard_dims = []
    for mesh_dim, placement in enumerate(placements):
        if type(placement) is Shard and placement.dim == 0:
            shard_dims.append(mesh_dim)
        elif not isinstance(placement, Replicate):
            raise NotImplementedError(
                f"distopt: {name} has placement {placement} on mesh dim {mesh_dim}; supported are Shard(0) "
                "(FSDP2) and Replicate (HSDP), with Shard(0) on at most one mesh dimension"
            )
    if len(shard_dims) > 1:
        raise NotImplementedError(f"distopt: {name} is sharded on dim 0 over several mesh dims {shard_dims}")
    _, offset = compute_local_shape_and_global_offset(p.shape, mesh, placements)
    group = mesh.get_group(shard_dims[0]) if shard_dims and mesh.size(shard_dims[0]) > 1 else None
    return RowShard(tuple(p.shape), offset[0] if offset else 0, group, mesh, placements)


def row_shard(p: torch.Tensor, declared: dict, name: object) -> RowShard:
    """The RowShard of ``p``: from its DTensor layout, its :func:`shard_rows` declaration
    (``declared``), or the whole tensor."""
    if isinstance(p, DTensor):
        return describe_dtensor(p, name)
    return declared.get(p) or whole(tuple(p.shape))


@lru_cache(maxsize=4096)
def whole(shape: tuple[int, ...]) -> RowShard:
    """The RowShard of a tensor held whole, one per shape (every step asks for each
    parameter's, and a frozen dataclass takes over a microsecond to build)."""
    return RowShard(shape)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local tensor of a DTensor (the same storage), or ``t`` itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def wrap_like_param(local_state: torch.Tensor, shard: RowShard, global_shape: tuple[int, ...]) -> torch.Tensor:
    """Make a state tensor a DTensor with the parameter's mesh and placements.

    ``global_shape`` is the state's whole shape: the parameter's for codes and 32-bit
    state, ``[d0, blocks per row]`` for block-wise absmax (split by rows alike).
    """
    if shard.mesh is None:
        return local_state
    stride = torch.empty(global_shape, device="meta").stride()
    return DTensor.from_local(local_state, shard.mesh, shard.placements, shape=torch.Size(global_shape), stride=stride)


def wrap_replicated(value: torch.Tensor, shard: RowShard) -> torch.Tensor:
    """A value that is the same on every rank (a per-tensor absmax), replicated over the mesh."""
    if shard.mesh is None:
        return value
    return DTensor.from_local(value, shard.mesh, [Replicate()] * len(shard.placements))
