"""Train a small GPT-style byte-level language model with distopt: the project's main job.

    torchrun --standalone --nproc-per-node 2 launch/train.py     # FSDP2 on 2 ranks
    python launch/train.py                                      # one process, no FSDP

The text is the Python standard library's own source code (available offline),
read byte by byte. Under torchrun every block and the model are wrapped with FSDP2's
``fully_shard`` on a 1-D mesh (gloo on CPU, nccl on CUDA); each rank reads its own part
of every global batch. The optimizer is distopt's AdamW8bit by default. Multi-node:
see docs/distributed.md (torchrun rendezvous).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
import distopt  # noqa: E402


@dataclass(frozen=True, kw_only=True)
class Config:
    """Everything a run depends on; each field is a command-line option."""

    optimizer: str = field(
        default="adamw8bit", metadata={"help": "adamw8bit | adamw32bit | torch-adamw | sgd8bit | sgd32bit"}
    )
    steps: int = field(default=300, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=8, metadata={"help": "sequences per rank per step"})
    context: int = field(default=128, metadata={"help": "bytes per sequence"})
    layers: int = field(default=4, metadata={"help": "transformer blocks"})
    width: int = field(default=192, metadata={"help": "model width"})
    heads: int = field(default=4, metadata={"help": "attention heads"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate (cosine decay, 20-step warm-up)"})
    min_8bit_size: int = field(default=4096, metadata={"help": "smaller parameters keep 32-bit state"})
    percentile_clipping: int = field(default=100, metadata={"help": "distopt percentile clipping (100: off)"})
    data_mb: float = field(default=4.0, metadata={"help": "megabytes of standard-library source to read"})
    eval_batches: int = field(default=8, metadata={"help": "held-out batches for the final eval loss"})
    log_every: int = field(default=20, metadata={"help": "steps between progress lines"})
    seed: int = field(default=0, metadata={"help": "seed of the model and the batches"})
    device: str = field(default="auto", metadata={"help": "cpu | cuda | auto"})


def parse_config(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        parser.add_argument(
            f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default, help=f.metadata["help"]
        )
    return Config(**vars(parser.parse_args(argv)))


# --- data: the standard library's source, as bytes --------------------------------------


def load_text(megabytes: float) -> torch.Tensor:
    """Bytes of the standard library's .py files (sorted paths), up to ``megabytes``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    limit, chunks, size = int(megabytes * 2**20), [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or size >= limit:
            continue
        data = path.read_bytes()
        chunks.append(data)
        size += len(data)
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8).long()


def batch(data: torch.Tensor, cfg: Config, step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the global batch of ``step`` (the same on any launch)."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    starts = torch.randint(len(data) - cfg.context - 1, (cfg.batch_size * world,), generator=gen)
    starts = starts[rank * cfg.batch_size : (rank + 1) * cfg.batch_size]
    x = torch.stack([data[s : s + cfg.context] for s in starts])
    y = torch.stack([data[s + 1 : s + cfg.context + 1] for s in starts])
    return x, y


# --- the model ---------------------------------------------------------------------


class Block(torch.nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.proj = torch.nn.Linear(width, width)
        self.up = torch.nn.Linear(width, 4 * width)
        self.down = torch.nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, c))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class GPT(torch.nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.embed = torch.nn.Embedding(256, cfg.width)
        self.position = torch.nn.Embedding(cfg.context, cfg.width)
        self.blocks = torch.nn.ModuleList(Block(cfg.width, cfg.heads) for _ in range(cfg.layers))
        self.ln = torch.nn.LayerNorm(cfg.width)
        self.head = torch.nn.Linear(cfg.width, 256, bias=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx) + self.position(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln(x))
        return F.cross_entropy(logits.view(-1, 256), targets.reshape(-1))


# --- setup ------------------------------------------------------------------------


def setup(cfg: Config) -> tuple[torch.device, int, int]:
    """Device, rank and world size; joins the process group under torchrun."""
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("nccl" if cuda else "gloo")
    return device, int(os.environ.get("RANK", "0")), world


def build(cfg: Config, device: torch.device, world: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(cfg.seed)
    model = GPT(cfg).to(device)
    if dist.is_initialized():
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model, make_optimizer(cfg, model.parameters())


def make_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    quant = dict(min_8bit_size=cfg.min_8bit_size, percentile_clipping=cfg.percentile_clipping)
    choices = {
        "adamw8bit": lambda: distopt.AdamW8bit(params, lr=cfg.lr, **quant),
        "adamw32bit": lambda: distopt.AdamW32bit(params, lr=cfg.lr, **quant),
        "torch-adamw": lambda: torch.optim.AdamW(params, lr=cfg.lr),
        "sgd8bit": lambda: distopt.SGD8bit(params, lr=cfg.lr * 30, momentum=0.9, **quant),
        "sgd32bit": lambda: distopt.SGD32bit(params, lr=cfg.lr * 30, momentum=0.9, **quant),
    }
    if cfg.optimizer not in choices:
        raise SystemExit(f"--optimizer must be one of {sorted(choices)}, not {cfg.optimizer!r}")
    return choices[cfg.optimizer]()


def state_report(opt: torch.optim.Optimizer) -> tuple[float, float]:
    """(optimizer-state MB on this rank, fraction of parameter elements with 8-bit state)."""
    nbytes, eight, total = 0, 0, 0
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state.get(p, {})
            for value in state.values():
                if torch.is_tensor(value) and value.dim() > 0:
                    t = value.to_local() if hasattr(value, "to_local") else value
                    nbytes += t.numel() * t.element_size()
            total += p.numel()
            eight += p.numel() if any(torch.is_tensor(v) and v.dtype == torch.uint8 for v in state.values()) else 0
    return nbytes / 2**20, eight / max(total, 1)


def lr_at(cfg: Config, step: int) -> float:
    warmup = min(20, cfg.steps // 10)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, cfg.steps - warmup)))


# --- the loop -----------------------------------------------------------------------


def progress(step: int, total: int, width: int = 24) -> str:
    done = int(width * step / total)
    return f"[{'#' * done}{'.' * (width - done)}] {step:>5}/{total}"


def mean_over_ranks(value: torch.Tensor, world: int) -> torch.Tensor:
    """The mean of a per-rank loss over all ranks (each rank holds an equal share of the batch)."""
    if dist.is_initialized():
        dist.all_reduce(value)
        value = value / world
    return value


def evaluate(model, data, cfg, device, rank, world) -> float:
    """Held-out loss over ``eval_batches`` batches (from the last 5% of the text)."""
    model.eval()
    with torch.no_grad():
        losses = [
            model(*(t.to(device) for t in batch(data, cfg, 10**9 + i, rank, world))) for i in range(cfg.eval_batches)
        ]
    model.train()
    return mean_over_ranks(torch.stack(losses).mean(), world).item()


def train(cfg: Config) -> dict[str, float]:
    device, rank, world = setup(cfg)
    text = load_text(cfg.data_mb)
    split = int(0.95 * len(text))
    train_data, eval_data = text[:split], text[split:]
    model, opt = build(cfg, device, world)
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"distopt {cfg.optimizer}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{len(text) / 2**20:.1f} MB of text, {world} rank(s) on {device.type}")  # fmt: skip
    start, tokens, loss = time.perf_counter(), 0, torch.tensor(float("nan"))
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step) * (30 if cfg.optimizer.startswith("sgd") else 1)
        x, y = (t.to(device) for t in batch(train_data, cfg, step, rank, world))
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        tokens += x.numel() * world
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            loss = mean_over_ranks(loss.detach(), world)
            mb, _ = state_report(opt)
            rate = tokens / (time.perf_counter() - start)
            bar = progress(step + 1, cfg.steps)
            say(f"{bar}  loss {loss.item():.4f}  {rate / 1e3:6.1f}k tok/s  state {mb:.2f} MB/rank")
    elapsed = time.perf_counter() - start
    mb, eight = state_report(opt)
    result = dict(train_loss=loss.item(), eval_loss=evaluate(model, eval_data, cfg, device, rank, world),
                  tokens_per_s=tokens / elapsed, state_mb=mb, eight_bit=eight, seconds=elapsed)  # fmt: skip
    say(f"done: {cfg.optimizer}, {cfg.steps} steps, {world} rank(s), train loss {result['train_loss']:.4f}, "
        f"eval loss {result['eval_loss']:.4f}, {result['tokens_per_s'] / 1e3:.1f}k tok/s, "
        f"state {mb:.2f} MB/rank ({eight:.0%} of parameters 8-bit), {elapsed:.0f} s")  # fmt: skip
    if dist.is_initialized():
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    train(parse_config())
