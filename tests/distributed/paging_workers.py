"""Functions run on every rank by tests/distributed/test_paged_fsdp.py (importable by spawned processes)."""

from __future__ import annotations

import os

import torch
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from distopt import paging
from tests.distributed.workloads import Params, case, snapshot, train

PAGE = os.sysconf("SC_PAGE_SIZE")


def spill_mappings(spill_dir: str) -> list[tuple[str, int]]:
    """(file, bytes) of this process's mappings of (deleted) distopt spill files in ``spill_dir``."""
    prefix = os.path.join(os.path.realpath(spill_dir), paging.FILE_PREFIX)
    out = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith(prefix) and fields[5].rstrip().endswith("(deleted)"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                out.append((fields[5].removesuffix(" (deleted)\n"), end - start))
    return out


def local_slots(opt) -> list[torch.Tensor]:
    tensors = [v for s in opt.state.values() for k, v in s.items() if opt._is_slot(k)]
    return [t.to_local() if hasattr(t, "to_local") else t for t in tensors]


def paged_fsdp(rank, world_size, spill_dir: str, steps: int):
    """FSDP2 training with PagedAdamW8bit spilling to ``spill_dir``: this rank's mappings,
    the sizes its own shards need, full snapshots, and the same after a state-dict reload."""
    mesh = init_device_mesh("cpu", (world_size,))
    module = Params()
    fully_shard(module, mesh=mesh)
    params = list(module.parameters())
    opt = case("PagedAdamW8bit").make(params, spill_dir=spill_dir)
    train(opt, params, steps)
    mine = [t for t in local_slots(opt) if t.numel()]
    result = {
        "pid": os.getpid(),
        "maps": spill_mappings(spill_dir),
        "needed": sorted(-(-t.numel() * t.element_size() // PAGE) * PAGE for t in mine),
        "spilled": bool(mine) and all(opt.pager.is_spilled(t) for t in mine),
        "snapshot": snapshot(opt, params),
    }
    saved = get_optimizer_state_dict(module, opt)
    fresh = case("PagedAdamW8bit").make(params, spill_dir=spill_dir)
    set_optimizer_state_dict(module, fresh, saved)
    reloaded = [t for t in local_slots(fresh) if t.numel()]
    result["reloaded_spilled"] = bool(reloaded) and all(fresh.pager.is_spilled(t) for t in reloaded)
    result["reloaded"] = snapshot(fresh, params)
    opt.close()
    fresh.close()
    return result
