"""Optimizer checkpoints of a GPT-2-small-sized model: bytes on disk and save/load time, AdamW8bit vs torch AdamW.

    python launch/checkpoint_size.py                                     # one process
    torchrun --standalone --nproc-per-node 2 launch/checkpoint_size.py   # FSDP2 on 2 ranks (gloo on CPU)

The model has GPT-2 small's parameters (124,439,808: a 50257 x 768 token embedding, tied
to the output, 1024 x 768 positions, 12 pre-norm blocks of width 768 with a 4x MLP, the
LayerNorms); ``launch/train.py``'s ``Block``. No forward pass: each optimizer takes one
step on seeded random gradients, which creates its state. Then, ``--repeats`` times:

- save: ``get_optimizer_state_dict`` + ``distopt.checkpoint.save`` of the optimizer
  state dict alone (DCP, sharded under FSDP2, files fsync'd);
- size: the sum of every file of that checkpoint (DCP metadata and manifest included),
  per parameter;
- load: ``distopt.checkpoint.load`` (verification + ``dcp.load`` into the live state) +
  ``set_optimizer_state_dict``.

Times are medians over the repeats, wall clock on rank 0 between barriers. The target
(issue 4): AdamW8bit's optimizer files at most 2.1 bytes per parameter. The machine's
load average is printed with the table: other work on it slows every figure.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.tensor import DTensor, distribute_tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from train import Block  # noqa: E402

import distopt  # noqa: E402
from distopt import checkpoint  # noqa: E402

TARGET_BYTES_PER_PARAM = 2.1
OPTIMIZERS = {
    "AdamW8bit": lambda params: distopt.AdamW8bit(params, lr=1e-3),
    "torch AdamW": lambda params: torch.optim.AdamW(params, lr=1e-3),
}


class GPT2Small(torch.nn.Module):
    """GPT-2 small's parameters (the output layer is tied to the token embedding, so it adds none)."""

    def __init__(self, vocab: int = 50257, context: int = 1024, width: int = 768, layers: int = 12):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.position = torch.nn.Embedding(context, width)
        self.blocks = torch.nn.ModuleList(Block(width, heads=12) for _ in range(layers))
        self.ln = torch.nn.LayerNorm(width)


def build(scale: float) -> torch.nn.Module:
    """The model (seeded), sharded with FSDP2 per block when a process group is up; ``scale`` shrinks it."""
    torch.manual_seed(0)
    width = max(12, int(768 * scale)) // 12 * 12
    model = GPT2Small(max(16, int(50257 * scale)), max(16, int(1024 * scale)), width)
    if dist.is_initialized():
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def seeded_gradients(model: torch.nn.Module) -> None:
    """Every parameter's gradient: standard normal, seeded by its index (each rank keeps its shard)."""
    for i, p in enumerate(model.parameters()):
        grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(i))
        if isinstance(p, DTensor):  # every rank made the same full gradient: no communication
            grad = distribute_tensor(grad, p.device_mesh, p.placements, src_data_rank=None)
        p.grad = grad


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every optimizer state tensor, over all ranks."""
    local = sum(
        (v.to_local() if isinstance(v, DTensor) else v).nbytes
        for state in opt.state.values()
        for v in state.values()
        if torch.is_tensor(v)
    )
    return int(all_ranks_sum(local))


def all_ranks_sum(value: float) -> float:
    if not dist.is_initialized():
        return value
    total = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(total)
    return total.item()


def timed(fn, *args) -> float:
    """Seconds ``fn(*args)`` takes on every rank (between barriers)."""
    if dist.is_initialized():
        dist.barrier()
    start = time.perf_counter()
    fn(*args)
    if dist.is_initialized():
        dist.barrier()
    return time.perf_counter() - start


def save(root: Path, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    checkpoint.save(root, step, {"optimizer": get_optimizer_state_dict(model, opt)})


def load(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    state = {"optimizer": get_optimizer_state_dict(model, opt)}
    checkpoint.load(path, state)
    set_optimizer_state_dict(model, opt, state["optimizer"])


def measure(name: str, root: Path, args: argparse.Namespace) -> dict:
    model = build(args.scale)
    n_params = sum(p.numel() for p in model.parameters())
    opt = OPTIMIZERS[name](model.parameters())
    seeded_gradients(model)
    opt.step()
    saves, loads, disk = [], [], 0
    for repeat in range(args.repeats):
        path = root / checkpoint.checkpoint_name(repeat)
        saves.append(timed(save, root, repeat, model, opt))
        disk = sum(f.stat().st_size for f in path.iterdir())
        loads.append(timed(load, path, model, opt))
        if not dist.is_initialized() or dist.get_rank() == 0:
            shutil.rmtree(path)
    row = dict(name=name, params=n_params, memory=state_bytes(opt), disk=disk)
    return {**row, "save": statistics.median(saves), "load": statistics.median(loads)}


def table(rows: list[dict], world: int) -> str:
    lines = [
        f"optimizer state checkpoints: {rows[0]['params']:,} parameters, {world} rank(s), "
        f"{torch.get_num_threads()} thread(s) per rank; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"{'optimizer':<12} {'state in memory':>16} {'files on disk':>14} {'bytes/param':>12} "
        f"{'save s':>8} {'load s':>8}",
    ]
    for r in rows:
        lines.append(
            f"{r['name']:<12} {r['memory'] / 1e6:>13.1f} MB {r['disk'] / 1e6:>11.1f} MB "
            f"{r['disk'] / r['params']:>12.3f} {r['save']:>8.2f} {r['load']:>8.2f}"
        )
    eight = next(r for r in rows if r["name"] == "AdamW8bit")
    per_param = eight["disk"] / eight["params"]
    verdict = "meets" if per_param <= TARGET_BYTES_PER_PARAM else "MISSES"
    lines.append(f"AdamW8bit: {per_param:.3f} bytes/param on disk, {verdict} the target <= {TARGET_BYTES_PER_PARAM}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="saves and loads per optimizer (default: 3)")
    parser.add_argument("--dir", default=None, help="where to write the checkpoints (default: a new temporary dir)")
    parser.add_argument("--scale", type=float, default=1.0, help="shrink every dimension, for quick runs")
    args = parser.parse_args(argv)
    if "WORLD_SIZE" in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    root = [args.dir or (tempfile.mkdtemp(prefix="distopt-checkpoint-size-") if rank == 0 else None)]
    if dist.is_initialized():
        dist.broadcast_object_list(root)
    root = Path(root[0])
    try:
        rows = [measure(name, root, args) for name in OPTIMIZERS]
    finally:
        if rank == 0 and args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    report = table(rows, dist.get_world_size() if dist.is_initialized() else 1)
    if rank == 0:
        print(report)
    if dist.is_initialized():
        dist.barrier()  # see launch/train.py's leave_process_group
        dist.destroy_process_group()
    return report


if __name__ == "__main__":
    main()
