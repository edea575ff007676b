"""32-bit distopt optimizers match torch.optim: max|Δp| / max|p| <= 1e-6 after 100 steps."""

from __future__ import annotations

import itertools

import pytest
import torch

import distopt
from tests.conftest import backend
from tests.registry import clone_params, make_params, run_steps

SHAPES = [(33, 300), (64, 64), (300,), (7, 3, 40)]
STEPS = 100


def relative_error(ours, theirs) -> float:
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(ours, theirs))


def compare(make_ours, make_theirs, path: str) -> float:
    ours = make_params(SHAPES)
    theirs = clone_params(ours)
    with backend(path):
        run_steps(make_ours(ours), ours, STEPS, scale=0.1)
    run_steps(make_theirs(theirs), theirs, STEPS, scale=0.1)
    return relative_error(ours, theirs)


@pytest.mark.parametrize("path", ["fused", "reference"])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("cls", [distopt.AdamW32bit, distopt.AdamW, distopt.PagedAdamW32bit])
def test_adamw32_matches_torch_adamw(cls, weight_decay, amsgrad, path):
    hyper = dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-7, weight_decay=weight_decay, amsgrad=amsgrad)
    err = compare(lambda ps: cls(ps, **hyper), lambda ps: torch.optim.AdamW(ps, foreach=False, **hyper), path)
    assert err <= 1e-6


SGD_COMBOS = [
    dict(momentum=m, dampening=d, nesterov=n, weight_decay=w)
    for m, d, n, w in itertools.product([0.0, 0.9], [0.0, 0.3], [False, True], [0.0, 0.05])
    if not (n and (m == 0 or d != 0))
]


@pytest.mark.parametrize("path", ["fused", "reference"])
@pytest.mark.parametrize("combo", SGD_COMBOS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("cls", [distopt.SGD32bit, distopt.SGD])
def test_sgd32_matches_torch_sgd(cls, combo, path):
    err = compare(
        lambda ps: cls(ps, lr=0.01, **combo), lambda ps: torch.optim.SGD(ps, lr=0.01, foreach=False, **combo), path
    )
    assert err <= 1e-6


def test_lr_scheduler_changes_take_effect():
    ours = make_params(SHAPES)
    theirs = clone_params(ours)
    opt_a = distopt.AdamW32bit(ours, lr=0.1)
    opt_b = torch.optim.AdamW(theirs, lr=0.1, foreach=False)
    sched_a = torch.optim.lr_scheduler.StepLR(opt_a, step_size=3, gamma=0.5)
    sched_b = torch.optim.lr_scheduler.StepLR(opt_b, step_size=3, gamma=0.5)
    for k in range(12):
        run_steps(opt_a, ours, 1, first_seed=k)
        run_steps(opt_b, theirs, 1, first_seed=k)
        sched_a.step()
        sched_b.step()
    assert opt_a.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**4)
    assert relative_error(ours, theirs) <= 1e-6
