"""8-bit tracks 32-bit on a small real learning task.

A byte-level language model (embeddings of the previous 8 bytes -> MLP -> next byte)
trained for 500 steps on the Python standard library's source. With most parameters
in 8-bit state, AdamW8bit's final held-out loss is within 2% of AdamW32bit's, and
SGD8bit's (momentum 0.9) within 2% of SGD32bit's; every run must also have learned.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch

import distopt

STEPS, BATCH, CONTEXT, EMBED, HIDDEN = 500, 256, 8, 32, 512


def stdlib_bytes(limit: int = 2**20) -> torch.Tensor:
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, size = [], 0
    for path in sorted(root.glob("*.py")):
        if size >= limit:
            break
        chunks.append(path.read_bytes())
        size += len(chunks[-1])
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8).long()


class ByteMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(256, EMBED)
        self.hidden = torch.nn.Linear(CONTEXT * EMBED, HIDDEN)
        self.out = torch.nn.Linear(HIDDEN, 256)

    def forward(self, x):
        return self.out(torch.nn.functional.gelu(self.hidden(self.embed(x).flatten(1))))


def windows(data: torch.Tensor, starts: torch.Tensor):
    idx = starts[:, None] + torch.arange(CONTEXT + 1)
    chunk = data[idx]
    return chunk[:, :CONTEXT], chunk[:, CONTEXT]


@pytest.fixture(scope="module")
def data():
    text = stdlib_bytes()
    split = int(0.9 * len(text))
    gen = torch.Generator().manual_seed(0)
    held_out = windows(text[split:], torch.randint(len(text) - split - CONTEXT - 1, (4096,), generator=gen))
    return text[:split], held_out


def train(make_opt, data):
    train_text, (x_eval, y_eval) = data
    torch.manual_seed(0)
    model = ByteMLP()
    opt = make_opt(model.parameters())
    gen = torch.Generator().manual_seed(1)
    loss_fn = torch.nn.functional.cross_entropy
    with torch.no_grad():
        initial = loss_fn(model(x_eval), y_eval).item()
    for _ in range(STEPS):
        x, y = windows(train_text, torch.randint(len(train_text) - CONTEXT - 1, (BATCH,), generator=gen))
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        final = loss_fn(model(x_eval), y_eval).item()
    params = list(model.parameters())
    eight = sum(
        p.numel()
        for p in params
        if opt.state[p].get("exp_avg", opt.state[p].get("momentum_buffer")).dtype == torch.uint8
    )
    return initial, final, eight / sum(p.numel() for p in params)


PAIRS = {
    "AdamW": (
        lambda ps: distopt.AdamW8bit(ps, lr=3e-3),
        lambda ps: distopt.AdamW32bit(ps, lr=3e-3),
    ),
    "SGD momentum 0.9": (
        lambda ps: distopt.SGD8bit(ps, lr=0.1, momentum=0.9),
        lambda ps: distopt.SGD32bit(ps, lr=0.1, momentum=0.9),
    ),
}


@pytest.mark.parametrize("name", PAIRS)
def test_8bit_final_loss_within_2_percent_of_32bit(kernels_built, data, name):
    make8, make32 = PAIRS[name]
    start8, loss8, fraction = train(make8, data)
    start32, loss32, fraction32 = train(make32, data)
    gap = abs(loss8 - loss32) / loss32
    print(f"\n{name}: 8-bit state on {fraction:.1%} of parameters; held-out loss 8-bit {loss8:.4f}, "
          f"32-bit {loss32:.4f} (from {start32:.4f}); gap {gap:.2%}")  # fmt: skip
    assert fraction > 0.9 and fraction32 == 0  # really 8-bit against really 32-bit
    assert loss32 < 0.6 * start32 and loss8 < 0.6 * start8  # both learned
    assert gap <= 0.02
