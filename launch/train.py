"""Train a small GPT-style byte-level language model with distopt: the project's main job.

    python launch/train.py                                       # one process, AdamW8bit
    python launch/train.py --optimizer adamw32bit                # or torch-adamw, sgd8bit, sgd32bit
    torchrun --standalone --nproc-per-node 2 launch/train.py     # FSDP2 on 2 ranks

The text is the Python standard library's own top-level modules (read from the local
installation, so nothing is downloaded), byte by byte: sorted by name, every 10th file
held out for the eval loss. The model is a stack of pre-norm causal self-attention
blocks. Under torchrun every block and the model are wrapped with FSDP2's
``fully_shard`` on a 1-D mesh (gloo on CPU, nccl on CUDA) and each rank reads its own
share of every global batch, so the batches of a step do not depend on the world size.
A run is deterministic given ``--seed`` (on CPU). Multi-node: see docs/distributed.md.

The job reports the optimizer state (bytes of every state tensor) and the fraction of
parameter elements whose state is 8-bit: parameters with at least ``--min-8bit-size``
elements and rows of at least 16 elements; biases and LayerNorm weights stay 32-bit.
"""

import argparse
import ast
import dataclasses
import inspect
import math
import os
import sys
import sysconfig
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
import distopt  # noqa: E402

OPTIMIZERS = ("adamw8bit", "adamw32bit", "torch-adamw", "sgd8bit", "sgd32bit")
DEVICES = ("cpu", "cuda", "auto")


@dataclass(frozen=True, kw_only=True)
class Config:
    """Everything a run depends on. Each field is a command-line option (``--batch-size``)."""

    optimizer: str = "adamw8bit"
    """adamw8bit | adamw32bit | torch-adamw | sgd8bit | sgd32bit (SGD with momentum 0.9)"""
    lr: float | None = None
    """peak learning rate (20-step warm-up, cosine decay to 0); default 3e-3 for AdamW, 0.1 for SGD"""
    steps: int = 500
    """optimizer steps"""
    batch_size: int = 8
    """sequences per rank per step"""
    context: int = 128
    """bytes per sequence"""
    layers: int = 4
    """transformer blocks"""
    width: int = 128
    """model width (embedding size)"""
    heads: int = 4
    """attention heads (must divide width)"""
    min_8bit_size: int = 4096
    """distopt: parameters with fewer elements keep 32-bit state (the default puts ~99% in 8-bit)"""
    percentile_clipping: int = 100
    """distopt: clip gradients at this percentile of their last 100 norms (100: off)"""
    data_mb: float = 4.0
    """megabytes of standard-library source to read"""
    eval_batches: int = 16
    """held-out batches for the final eval loss"""
    log_every: int = 20
    """steps between progress lines"""
    seed: int = 0
    """seed of the model's initialization and of the batches"""
    device: str = "cpu"
    """cpu | cuda | auto (cuda if available)"""

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {self.optimizer!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {self.device!r}")
        if self.steps < 1 or self.log_every < 1:
            raise ValueError("steps and log_every must be positive")
        if self.width % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide width ({self.width})")

    @property
    def peak_lr(self) -> float:
        """``lr``, or the default for the optimizer's family."""
        if self.lr is not None:
            return self.lr
        return 0.1 if self.optimizer.startswith("sgd") else 3e-3


def field_docs(cls: type) -> dict[str, str]:
    """Each dataclass field's docstring: the string literal under it in the class body."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {
        node.target.id: after.value.value
        for node, after in zip(body, body[1:])
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
    }


def parse_config(argv: list[str] | None = None) -> Config:
    """A Config from the command line: one option per field, its docstring as the help."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    docs = field_docs(Config)
    for f in dataclasses.fields(Config):
        arg_type = next((t for t in typing.get_args(f.type) if t is not type(None)), f.type)  # X | None -> X
        text = docs[f.name].replace("%", "%%") + ("" if f.default is None else " (default: %(default)s)")
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=arg_type, default=f.default, help=text)
    try:
        return Config(**vars(parser.parse_args(argv)))
    except ValueError as e:
        parser.error(str(e))


# --- data: the standard library's source, as bytes -------------------------------------------------------------


def load_text(megabytes: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) bytes of the stdlib's top-level .py files, sorted; every 10th file is held out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, held_out, size = [], [], 0
    for i, path in enumerate(sorted(root.glob("*.py"))):
        if size >= megabytes * 2**20:
            break
        data = path.read_bytes()
        (held_out if i % 10 == 9 else train).append(data)
        size += len(data)
    return tuple(torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8).long() for parts in (train, held_out))


def get_batch(data: torch.Tensor, cfg: Config, step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the global batch of ``step``: the same batches on any number of ranks."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    starts = torch.randint(len(data) - cfg.context - 1, (cfg.batch_size * world,), generator=gen)
    starts = starts[rank * cfg.batch_size : (rank + 1) * cfg.batch_size]
    window = data[starts[:, None] + torch.arange(cfg.context + 1)]
    return window[:, :-1], window[:, 1:]


# --- the model ---------------------------------------------------------------------------------------------------


class Block(torch.nn.Module):
    """Pre-norm transformer block: causal self-attention, then a 4x MLP, each on a residual."""

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
    """Byte and position embeddings, ``layers`` blocks, a final LayerNorm and a 256-way head."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.embed = torch.nn.Embedding(256, cfg.width)
        self.position = torch.nn.Embedding(cfg.context, cfg.width)
        self.blocks = torch.nn.ModuleList(Block(cfg.width, cfg.heads) for _ in range(cfg.layers))
        self.ln = torch.nn.LayerNorm(cfg.width)
        self.head = torch.nn.Linear(cfg.width, 256, bias=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-byte cross-entropy of ``idx`` against ``targets`` (both ``[batch, time]``)."""
        x = self.embed(idx) + self.position(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln(x))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


# --- setup ---------------------------------------------------------------------------------------------------------


def setup(cfg: Config) -> tuple[torch.device, int, int]:
    """(device, rank, world size). Joins the process group under torchrun; splits the CPU cores among local ranks."""
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
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


def make_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` names, at the peak learning rate (the loop sets the schedule)."""
    lr, quant = cfg.peak_lr, dict(min_8bit_size=cfg.min_8bit_size, percentile_clipping=cfg.percentile_clipping)
    make = {
        "adamw8bit": lambda: distopt.AdamW8bit(params, lr=lr, **quant),
        "adamw32bit": lambda: distopt.AdamW32bit(params, lr=lr, **quant),
        "torch-adamw": lambda: torch.optim.AdamW(params, lr=lr),
        "sgd8bit": lambda: distopt.SGD8bit(params, lr=lr, momentum=0.9, **quant),
        "sgd32bit": lambda: distopt.SGD32bit(params, lr=lr, momentum=0.9, **quant),
    }
    return make[cfg.optimizer]()


def build(cfg: Config, device: torch.device, world: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model (seeded; sharded with FSDP2 when a process group is up) and its optimizer."""
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


def state_report(opt: torch.optim.Optimizer) -> tuple[float, float]:
    """(MB of optimizer state on this rank, fraction of parameter elements whose state is 8-bit)."""
    nbytes, eight, total = 0, 0, 0
    for group in opt.param_groups:
        for p in group["params"]:
            state = [v.to_local() if hasattr(v, "to_local") else v for v in opt.state.get(p, {}).values()]
            tensors = [t for t in state if torch.is_tensor(t)]
            nbytes += sum(t.numel() * t.element_size() for t in tensors)
            total += p.numel()  # the global count under FSDP2, so the fraction is the same on every rank
            eight += p.numel() if any(t.dtype == torch.uint8 for t in tensors) else 0
    return nbytes / 2**20, eight / max(total, 1)


# --- the loop --------------------------------------------------------------------------------------------------


def lr_at(cfg: Config, step: int) -> float:
    """Linear warm-up over 20 steps (a tenth of a short run), then cosine decay to 0."""
    warmup = max(1, min(20, cfg.steps // 10))
    if step < warmup:
        return cfg.peak_lr * (step + 1) / warmup
    return cfg.peak_lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, cfg.steps - warmup)))


def progress_bar(step: int, total: int, width: int = 24) -> str:
    done = width * step // total
    return f"[{'#' * done}{'.' * (width - done)}] {step:>5}/{total}"


def say(text: str) -> None:
    """Print on rank 0 only."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(text)


def leave_process_group() -> None:
    """Wait for every rank, then destroy the process group.

    The barrier is not only politeness. A gloo worker thread frees a finished
    collective's tensors a moment after the caller's wait returns, and freeing a tensor
    that Python has seen needs the GIL; if the interpreter is already shutting down by
    then, the thread dies inside a destructor and the process aborts ("terminate called
    without an active exception", about one run in 15 here). While the barrier waits,
    the main thread holds no GIL, so the worker finishes first.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def mean_over_ranks(value: torch.Tensor, world: int) -> torch.Tensor:
    """The mean over ranks of a per-rank mean (every rank holds an equal share of the batch)."""
    if dist.is_initialized():
        dist.all_reduce(value)
        value = value / world
    return value


def train_loop(cfg, model, opt, data, device, rank, world) -> tuple[float, float]:
    """Run ``cfg.steps`` steps; returns (mean train loss over the last logging window, tokens per second)."""
    start, tokens = time.perf_counter(), 0
    window_loss, window_steps = torch.zeros((), device=device), 0
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        x, y = (t.to(device) for t in get_batch(data, cfg, step, rank, world))
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        tokens += x.numel() * world
        window_loss, window_steps = window_loss + loss.detach(), window_steps + 1
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            train_loss = mean_over_ranks(window_loss / window_steps, world).item()
            window_loss, window_steps = torch.zeros((), device=device), 0
            rate = tokens / (time.perf_counter() - start)
            mb, _ = state_report(opt)
            say(f"{progress_bar(step + 1, cfg.steps)}  loss {train_loss:.4f}  {rate / 1e3:6.1f}k tok/s  "
                f"state {mb:.2f} MB/rank")  # fmt: skip
    return train_loss, tokens / (time.perf_counter() - start)


@torch.no_grad()
def evaluate(cfg, model, data, device, rank, world) -> float:
    """Mean loss over ``eval_batches`` held-out batches (seeded apart from the training batches)."""
    model.eval()
    batches = (get_batch(data, cfg, -1 - i, rank, world) for i in range(cfg.eval_batches))
    losses = [model(x.to(device), y.to(device)) for x, y in batches]
    model.train()
    return mean_over_ranks(torch.stack(losses).mean(), world).item()


def main(argv: list[str] | None = None) -> dict[str, float]:
    cfg = parse_config(argv)
    wall = time.perf_counter()
    device, rank, world = setup(cfg)
    train_data, eval_data = load_text(cfg.data_mb)
    model, opt = build(cfg, device, world)
    n_params = sum(p.numel() for p in model.parameters())
    say(f"{cfg.optimizer} (peak lr {cfg.peak_lr:g}): {n_params / 1e6:.2f}M parameters, "
        f"{len(train_data) / 2**20:.1f} + {len(eval_data) / 2**20:.1f} MB of text (train + held out), "
        f"{world} rank(s) on {device.type} with {torch.get_num_threads()} thread(s)")  # fmt: skip

    train_loss, rate = train_loop(cfg, model, opt, train_data, device, rank, world)
    mb, eight = state_report(opt)
    eval_loss = evaluate(cfg, model, eval_data, device, rank, world)
    seconds = time.perf_counter() - wall
    say(f"done: {cfg.optimizer}, {cfg.steps} steps, {world} rank(s), train loss {train_loss:.4f}, "
        f"eval loss {eval_loss:.4f}, {rate / 1e3:.1f}k tok/s, state {mb:.2f} MB/rank "
        f"({eight:.0%} of parameters 8-bit), {seconds:.0f} s")  # fmt: skip
    leave_process_group()
    return dict(train_loss=train_loss, eval_loss=eval_loss, tokens_per_s=rate, state_mb=mb, eight_bit=eight)


if __name__ == "__main__":
    main()
