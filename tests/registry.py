"""The one table of optimizer configurations the tests run (in the spirit of OptimizerInfo).

Each :class:`Case` names a distopt class and keyword arguments; tests parametrize over
:data:`CASES` (or a filtered subset) instead of listing configurations themselves.
``SHAPES`` are the parameter shapes every case is run on: tail blocks, exact blocks,
3-D, short rows (32-bit by the row rule), 1-D and empty parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

import distopt


@dataclass(frozen=True)
class Case:
    name: str
    cls: type
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def bits(self) -> int:
        if self.cls in (distopt.AdamW8bit, distopt.SGD8bit, distopt.PagedAdamW8bit):
            return 8
        if self.cls in (distopt.AdamW32bit, distopt.SGD32bit, distopt.PagedAdamW32bit):
            return 32
        return self.kwargs.get("optim_bits", 32)

    @property
    def is_sgd(self) -> bool:
        return issubclass(self.cls, distopt.SGD)

    def make(self, params, **overrides) -> torch.optim.Optimizer:
        kwargs = {"min_8bit_size": 64, **self.kwargs, **overrides}
        return self.cls(params, **kwargs)

    def __str__(self) -> str:
        return self.name


_SGD = {"lr": 0.05}

CASES = [
    Case("AdamW8bit", distopt.AdamW8bit),
    Case("AdamW8bit-amsgrad", distopt.AdamW8bit, {"amsgrad": True}),
    Case("AdamW8bit-tensorwise", distopt.AdamW8bit, {"block_wise": False}),
    Case("AdamW8bit-clip5", distopt.AdamW8bit, {"percentile_clipping": 5}),
    Case(
        "AdamW8bit-amsgrad-tensorwise-clip50",
        distopt.AdamW8bit,
        {"amsgrad": True, "block_wise": False, "percentile_clipping": 50},
    ),
    Case("AdamW-optim_bits8", distopt.AdamW, {"optim_bits": 8, "weight_decay": 0.1}),
    Case("AdamW32bit", distopt.AdamW32bit),
    Case("AdamW32bit-amsgrad-clip5", distopt.AdamW32bit, {"amsgrad": True, "percentile_clipping": 5}),
    Case("PagedAdamW8bit", distopt.PagedAdamW8bit),
    Case("PagedAdamW32bit", distopt.PagedAdamW32bit),
    Case("SGD8bit-momentum", distopt.SGD8bit, {**_SGD, "momentum": 0.9}),
    Case("SGD8bit-nesterov-wd", distopt.SGD8bit, {**_SGD, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    Case("SGD8bit-dampening", distopt.SGD8bit, {**_SGD, "momentum": 0.8, "dampening": 0.3}),
    Case("SGD8bit-no-momentum", distopt.SGD8bit, _SGD),
    Case(
        "SGD8bit-tensorwise-clip5",
        distopt.SGD8bit,
        {**_SGD, "momentum": 0.9, "block_wise": False, "percentile_clipping": 5},
    ),
    Case("SGD32bit-momentum-wd", distopt.SGD32bit, {**_SGD, "momentum": 0.9, "weight_decay": 0.01}),
    Case("SGD-optim_bits8-clip5", distopt.SGD, {**_SGD, "momentum": 0.9, "optim_bits": 8, "percentile_clipping": 5}),
]

CASES_8BIT = [c for c in CASES if c.bits == 8]

SHAPES = [(33, 300), (8, 256), (5, 1000), (7, 3, 40), (20, 16), (20, 15), (300,), (0, 300)]
"""Shapes run by every case (8-bit where the row rule allows it with min_8bit_size=64)."""

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_params(shapes=SHAPES, dtype=torch.float32, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]


def make_grads(params, seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(p.shape, generator=gen) * scale).to(p.dtype) for p in params]


def clone_params(params) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_() for p in params]


def run_steps(opt, params, steps: int, first_seed: int = 100, scale: float = 1.0) -> None:
    """``steps`` steps with seeded gradients (the same for any run with the same seeds)."""
    for k in range(steps):
        for p, g in zip(params, make_grads(params, first_seed + k, scale)):
            p.grad = g
        opt.step()


def state_tensors(opt, params) -> list[dict[str, torch.Tensor]]:
    return [{k: v for k, v in opt.state[p].items()} for p in params]


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    """Same dtype, shape and bits (NaN payloads and signed zeros included)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.detach().reshape(-1).view(torch.uint8), b.detach().reshape(-1).view(torch.uint8))
