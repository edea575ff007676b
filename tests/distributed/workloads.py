"""Shared by the distributed tests and their single-process references: parameters,
seeded full gradients, sharding them like a parameter, and full snapshots."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from tests.registry import CASES

# uneven (33 rows), 6 rows (2/2/2/0 over 4 ranks), fewer rows than ranks, 1-D,
# short rows (32-bit by the row rule), exact blocks
SHAPES = [(33, 300), (6, 280), (3, 512), (300,), (40, 15), (8, 256)]
NAN_AT = (4, 0, (10, 17))  # step, parameter, element of a non-finite gradient value

INVARIANCE_CASES = [
    "AdamW8bit",
    "AdamW8bit-amsgrad",
    "AdamW8bit-tensorwise",
    "SGD8bit-momentum",
    "SGD8bit-nesterov-wd",
    "AdamW32bit",
]


def case(name: str):
    return next(c for c in CASES if c.name == name)


class Params(torch.nn.Module):
    """A module holding parameters of the given shapes, identical on every rank."""

    def __init__(self, shapes=SHAPES, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.weights = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes)


def full_grads(shapes, step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    grads = [torch.randn(s, generator=gen) for s in shapes]
    if step == NAN_AT[0]:
        grads[NAN_AT[1]][NAN_AT[2]] = float("nan")
    return grads


def shard_like(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """``full`` cut the way DTensor ``p`` is (its local rows), as a DTensor; or ``full``."""
    if not isinstance(p, DTensor):
        return full
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    local = full.narrow(0, offset[0], shape[0]) if full.dim() else full
    return DTensor.from_local(local.contiguous(), p.device_mesh, p.placements, shape=p.shape, stride=p.stride())


def rows_of_rank(whole, rank: int, world_size: int) -> tuple[list[torch.nn.Parameter], list[int]]:
    """This rank's rows of each whole parameter (``torch.tensor_split`` on dim 0), and their offsets."""
    params, offsets = [], []
    for p in whole:
        rows = torch.tensor_split(torch.arange(p.shape[0]), world_size)[rank]
        start = int(rows[0]) if len(rows) else p.shape[0]
        offsets.append(start)
        params.append(torch.nn.Parameter(p.detach()[start : start + len(rows)].clone()))
    return params, offsets


def train(opt, params, steps: int, first: int = 0) -> None:
    """Steps ``first .. first + steps - 1`` of the seeded gradient sequence."""
    shapes = [tuple(p.shape) for p in params]
    for k in range(first, first + steps):
        for p, g in zip(params, full_grads(shapes, k)):
            p.grad = shard_like(p, g)
        opt.step()


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t.detach().clone()


def snapshot(opt, params) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Full parameters and full states (per-rank counters left out)."""
    return [(full(p), {k: full(v) for k, v in opt.state[p].items() if k != "nonfinite_count"}) for p in params]


def single_process(name: str, clip: int, steps: int):
    module = Params()
    params = list(module.parameters())
    opt = case(name).make(params, percentile_clipping=clip)
    train(opt, params, steps)
    return snapshot(opt, params)
