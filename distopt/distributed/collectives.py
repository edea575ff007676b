"""The optimizer's own collectives, batched: at most one per kind, per process group, per step.

- :func:`sum_rows`: percentile-clipping statistics. Each rank writes the per-row sums
  of squares of its local rows into a zero vector indexed by *global* row, all
  parameters' vectors are concatenated, and one all-reduce(SUM) completes them. Each
  slot has exactly one non-zero contributor, so the sum is exact and every rank (and a
  single process) ends up with the same bits.
- :func:`max_values`: per-tensor absmax for ``block_wise=False``, one all-reduce(MAX).

Parameters whose RowShard has no group (a single process, DDP) need no collective.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .sharding import RowShard


def _by_group(shards: list[RowShard]) -> dict[object, list[int]]:
    groups: dict[object, list[int]] = {}
    for i, shard in enumerate(shards):
        if shard.sharded:
            groups.setdefault(shard.group, []).append(i)
    return groups


def sum_rows(local_rows: list[torch.Tensor], shards: list[RowShard]) -> list[torch.Tensor]:
    """Global per-row vectors from each parameter's local per-row sums (one all-reduce per group)."""
    out = list(local_rows)
    for group, members in _by_group(shards).items():
        sizes = [shards[i].global_rows for i in members]
        flat = torch.zeros(sum(sizes), dtype=local_rows[members[0]].dtype, device=local_rows[members[0]].device)
        start = 0
        for i, size in zip(members, sizes):
            offset = start + shards[i].row_offset
            flat[offset : offset + local_rows[i].numel()] = local_rows[i]
            start += size
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        for i, part in zip(members, flat.split(sizes)):
            out[i] = part
    return out


def max_values(values: list[torch.Tensor], shards: list[RowShard]) -> list[torch.Tensor]:
    """Element-wise maxima of each parameter's small vector over its group (one all-reduce per group)."""
    out = list(values)
    for group, members in _by_group(shards).items():
        flat = torch.cat([values[i] for i in members])
        dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=group)
        for i, part in zip(members, flat.split([values[i].numel() for i in members])):
            out[i] = part
    return out
