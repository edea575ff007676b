"""Train a small GPT-style byte-level language model with distopt: the project's main job.

    python launch/train.py                                       # one process, AdamW8bit
    python launch/train.py --optimizer adamw32bit                # or torch-adamw, sgd8bit, sgd32bit
    torchrun --standalone --nproc-per-node 2 launch/train.py     # FSDP2 on 2 ranks
    torchrun ... launch/train.py --save-every 50 --resume        # checkpoint; continue after a crash

The text is the Python standard library's own top-level modules (read from the local
installation, so nothing is downloaded), byte by byte: sorted by name, every 10th file
held out for the eval loss. The model is a stack of pre-norm causal self-attention
blocks. Under torchrun every block and the model are wrapped with FSDP2's
``fully_shard`` on a 1-D mesh (gloo on CPU, nccl on CUDA) and each rank reads its own
share of every global batch, so the batches of a step do not depend on the world size.
A run is deterministic given ``--seed`` (on CPU). Multi-node: see docs/distributed.md.

With ``--save-every N`` the job writes a checkpoint every N steps and after the last
one (``distopt.checkpoint``: DCP, sharded, no full gather; a directory appears under
its final name only once every rank has written). A checkpoint holds the model, the
optimizer, the next step, the last reported loss and, per rank, the RNG state and the
current window of the loss average. ``--resume`` continues from the newest complete
checkpoint exactly as an uninterrupted run would (the same losses, the same final
parameters: compare ``--checksum``). It refuses other settings (all but those in
``RESUMABLE_CHANGES``; the global batch, ``--batch-size`` times the ranks, must stay).
On another number of ranks the state is resharded and the losses agree closely, not
bitwise (FSDP2 sums gradients in another order), and a fresh run refuses a directory
that holds another run's checkpoints.

The job reports the optimizer state (bytes of every state tensor) and the fraction of
parameter elements whose state is 8-bit: parameters with at least ``--min-8bit-size``
elements and rows of at least 16 elements; biases and LayerNorm weights stay 32-bit.
"""

import argparse
import ast
import dataclasses
import hashlib
import inspect
import json
import math
import os
import sys
import sysconfig
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
import distopt  # noqa: E402
from distopt import checkpoint  # noqa: E402

OPTIMIZERS = ("adamw8bit", "adamw32bit", "torch-adamw", "sgd8bit", "sgd32bit")
DEVICES = ("cpu", "cuda", "auto")
RESUMABLE_CHANGES = "resume save_every checkpoint_dir keep_checkpoints checksum log_every eval_batches".split()
"""Options a resumed run may set differently from the run that wrote the checkpoint."""


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
    save_every: int = 0
    """steps between checkpoints, also written after the last step (0: none)"""
    checkpoint_dir: str = "checkpoints"
    """where checkpoints go: one step_<8 digits>/ directory each (.partial while being written)"""
    keep_checkpoints: int = 3
    """how many of the newest checkpoints to keep (0: all)"""
    resume: bool = False
    """continue from the newest complete checkpoint in --checkpoint-dir (start fresh, saying so, if none)"""
    checksum: bool = False
    """print a SHA-256 of the final parameters (gathers one parameter at a time)"""

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {self.optimizer!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {self.device!r}")
        if self.steps < 1 or self.log_every < 1:
            raise ValueError("steps and log_every must be positive")
        if self.save_every < 0 or self.keep_checkpoints < 0:
            raise ValueError("save_every and keep_checkpoints must be >= 0")
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
        flag = f"--{f.name.replace('_', '-')}"
        if arg_type is bool:  # --resume / --no-resume
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=text)
        else:
            parser.add_argument(flag, type=arg_type, default=f.default, help=text)
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


# --- checkpoints ---------------------------------------------------------------------------------------------------


@dataclass
class Progress:
    """Where the loop stands: what a checkpoint holds besides the model and the optimizer."""

    step: int = 0
    """the next step to run (the data position: a step's batches depend only on its number)"""
    train_loss: float = math.nan
    """the last progress line's loss (the mean over ranks)"""
    window_loss: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    """this rank's sum of losses since the last progress line"""
    window_steps: int = 0


def checkpoint_state(cfg: Config, model, opt, progress: Progress) -> dict:
    """What DCP saves and loads: the model and optimizer (sharded under FSDP2) and the loop's global position."""
    model_state, optim_state = get_state_dict(model, opt)
    loop = {"next_step": progress.step, "train_loss": progress.train_loss, "settings": json.dumps(run_settings(cfg))}
    return {"model": model_state, "optimizer": optim_state, "loop": loop}


def rank_state(progress: Progress, device: torch.device) -> dict:
    """This rank's own part of a checkpoint: its random number generators and its share of the loss window."""
    state = {"cpu_rng": torch.get_rng_state(), "loss_sum": progress.window_loss.cpu(), "steps": progress.window_steps}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def save_checkpoint(cfg: Config, model, opt, progress: Progress, device: torch.device) -> None:
    state = checkpoint_state(cfg, model, opt, progress)
    mine, keep = rank_state(progress, device), cfg.keep_checkpoints or None
    path = checkpoint.save(cfg.checkpoint_dir, progress.step, state, rank_state=mine, keep_last=keep)
    say(f"checkpoint {path}")


def resume(cfg: Config, model, opt, device: torch.device) -> Progress:
    """Load the newest complete checkpoint into ``model`` and ``opt``; the loop's progress (fresh if none)."""
    path = checkpoint.latest(cfg.checkpoint_dir)
    if path is None:
        say(f"--resume: no complete checkpoint in {cfg.checkpoint_dir}/, starting fresh")
        return Progress(window_loss=torch.zeros((), device=device))
    state = checkpoint_state(cfg, model, opt, Progress())
    loop = {"loop": dict(state["loop"])}
    checkpoint.load(path, loop)  # the settings alone first: refuse another run's checkpoint before loading it
    check_same_run(cfg, json.loads(loop["loop"]["settings"]), path)
    mine = checkpoint.load(path, state)  # verified first: a bad checkpoint is refused before anything changes
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    progress = Progress(step=state["loop"]["next_step"], train_loss=state["loop"]["train_loss"])
    progress.window_loss = torch.zeros((), device=device)
    if mine is None:
        say(f"{path} was written by another number of ranks: the RNG state and the loss window start afresh")
    else:
        torch.set_rng_state(mine["cpu_rng"])
        if device.type == "cuda" and "cuda_rng" in mine:
            torch.cuda.set_rng_state(mine["cuda_rng"], device)
        progress.window_loss, progress.window_steps = mine["loss_sum"].to(device), mine["steps"]
    say(f"resumed from {path}: next step {progress.step}")
    return progress


def run_settings(cfg: Config) -> dict:
    """The settings that define a run: all but ``RESUMABLE_CHANGES``, with the global batch size."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE_CHANGES and k != "batch_size"}
    settings["global_batch_size"] = cfg.batch_size * (dist.get_world_size() if dist.is_initialized() else 1)
    return settings


def check_same_run(cfg: Config, saved: dict, path: Path) -> None:
    """Refuse to resume with settings that change the run."""
    now = run_settings(cfg)
    changed = [f"{k} {saved.get(k)} (now {v})" for k, v in now.items() if saved.get(k) != v]
    if changed:
        leave_process_group()
        raise SystemExit(f"--resume: {path} was written with other settings: {', '.join(changed)}")


def start(cfg: Config, model, opt, device: torch.device) -> Progress:
    """Resume (``--resume``), or start fresh where no checkpoint of another run would be mixed with this one's."""
    if cfg.resume:
        return resume(cfg, model, opt, device)
    if cfg.save_every and (found := checkpoint.latest(cfg.checkpoint_dir)) is not None:
        leave_process_group()
        raise SystemExit(
            f"{cfg.checkpoint_dir}/ already holds checkpoints (newest: {found.name}): "
            "pass --resume to continue that run, or choose another --checkpoint-dir"
        )
    return Progress(window_loss=torch.zeros((), device=device))


def parameter_checksum(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter's full value, in order (under FSDP2 each is gathered in turn: call on every rank)."""
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        full = p.detach().full_tensor() if isinstance(p, DTensor) else p.detach()
        digest.update(name.encode() + full.cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


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


def train_loop(cfg, model, opt, data, device, rank, world, progress: Progress) -> float:
    """Run the steps from ``progress.step`` on, checkpointing every ``save_every``; returns tokens per second."""
    start, tokens = time.perf_counter(), 0
    for step in range(progress.step, cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        x, y = (t.to(device) for t in get_batch(data, cfg, step, rank, world))
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        tokens += x.numel() * world
        progress.step, progress.window_steps = step + 1, progress.window_steps + 1
        progress.window_loss = progress.window_loss + loss.detach()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            progress.train_loss = mean_over_ranks(progress.window_loss / progress.window_steps, world).item()
            progress.window_loss, progress.window_steps = torch.zeros((), device=device), 0
            rate = tokens / (time.perf_counter() - start)
            mb, _ = state_report(opt)
            say(f"{progress_bar(step + 1, cfg.steps)}  loss {progress.train_loss:.4f}  {rate / 1e3:6.1f}k tok/s  "
                f"state {mb:.2f} MB/rank")  # fmt: skip
        if cfg.save_every and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps):
            save_checkpoint(cfg, model, opt, progress, device)
    return tokens / (time.perf_counter() - start)


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

    progress = start(cfg, model, opt, device)
    rate = train_loop(cfg, model, opt, train_data, device, rank, world, progress)
    train_loss = progress.train_loss
    mb, eight = state_report(opt)
    eval_loss = evaluate(cfg, model, eval_data, device, rank, world)
    seconds = time.perf_counter() - wall
    say(f"done: {cfg.optimizer}, {cfg.steps} steps, {world} rank(s), train loss {train_loss:.4f}, "
        f"eval loss {eval_loss:.4f}, {rate / 1e3:.1f}k tok/s, state {mb:.2f} MB/rank "
        f"({eight:.0%} of parameters 8-bit), {seconds:.0f} s")  # fmt: skip
    if cfg.checksum:
        checksum = parameter_checksum(model)  # on every rank: it gathers the parameters
        say(f"parameters sha256 {checksum}")
    leave_process_group()
    return dict(train_loss=train_loss, eval_loss=eval_loss, tokens_per_s=rate, state_mb=mb, eight_bit=eight)


if __name__ == "__main__":
    main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Every rank is done and its process group destroyed; leave without the interpreter's
        # finalization, during which a gloo worker thread freeing a finished collective's tensor
        # aborts the process (rarely, even after leave_process_group's barrier; pytorch/pytorch#179291).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
