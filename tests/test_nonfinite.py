"""Non-finite gradients (DESIGN §3.5): the block (8-bit) or element (32-bit) is left untouched.

They never enter gradient norms or the percentile history, ``step`` still advances, and
the skipped elements are counted per parameter.
"""

from __future__ import annotations

import math

import pytest
import torch

import distopt
from distopt import functional as F
from tests.conftest import backend

PATHS = ["fused", "reference"]
BAD = [float("nan"), float("inf"), -float("inf")]


def stepped(cls, bad, path, **kwargs):
    """Two good steps, then one step with ``bad`` at [3, 260] (row 3, second block)."""
    p = torch.randn(6, 300, generator=torch.Generator().manual_seed(0)).requires_grad_()
    with backend(path):
        opt = cls([p], min_8bit_size=0, **kwargs)
        gen = torch.Generator().manual_seed(1)
        for _ in range(2):
            p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        before = {k: v.clone() for k, v in opt.state[p].items()}
        p_before = p.detach().clone()
        g = torch.randn(p.shape, generator=gen)
        g[3, 260] = bad
        p.grad = g
        opt.step()
    return p, p_before, opt.state[p], before, g


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize(
    "cls,kwargs", [(distopt.AdamW8bit, {"amsgrad": True}), (distopt.SGD8bit, {"lr": 0.1, "momentum": 0.9})]
)
def test_8bit_leaves_the_whole_block_untouched(kernels_built, cls, kwargs, bad, path):
    p, p0, state, before, _ = stepped(cls, bad, path, **kwargs)
    block = (3, slice(256, 300))
    assert torch.equal(p.detach()[block], p0[block])
    assert not torch.equal(p.detach()[2], p0[2]) and not torch.equal(p.detach()[3, :256], p0[3, :256])
    for name in [k for k in state if k.endswith("_absmax")]:
        codes = name.removesuffix("_absmax")
        assert torch.equal(state[codes][block], before[codes][block])
        assert state[name][3, 1] == before[name][3, 1]
        assert not torch.equal(state[name][3, 0], before[name][3, 0])
    assert int(state["nonfinite_count"]) == 300 - 256
    assert state["step"].item() == 3


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bad", BAD)
def test_8bit_tensorwise_keeps_params_and_carries_state_values(kernels_built, bad, path):
    p, p0, state, before, _ = stepped(distopt.AdamW8bit, bad, path, block_wise=False)
    block = (3, slice(256, 300))
    assert torch.equal(p.detach()[block], p0[block])
    q = distopt.quant
    for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        old = q.dequantize_blockwise(before[name], before[f"{name}_absmax"], q.qmap(signed))[block]
        new = q.dequantize_blockwise(state[name], state[f"{name}_absmax"], q.qmap(signed))[block]
        step = 0.5 * 0.0140625 * state[f"{name}_absmax"]  # at most half the largest map gap
        assert ((new - old).abs() <= step * (1 + 1e-5)).all()
    assert int(state["nonfinite_count"]) == 300 - 256


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize(
    "cls,kwargs", [(distopt.AdamW32bit, {"amsgrad": True}), (distopt.SGD32bit, {"lr": 0.1, "momentum": 0.9})]
)
def test_32bit_leaves_only_the_element_untouched(kernels_built, cls, kwargs, bad, path):
    p, p0, state, before, _ = stepped(cls, bad, path, **kwargs)
    changed = p.detach() != p0
    assert not changed[3, 260] and changed.sum() == p.numel() - 1
    for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"):
        if name in state:
            assert state[name][3, 260] == before[name][3, 260]
    assert int(state["nonfinite_count"]) == 1


@pytest.mark.parametrize("path", PATHS)
def test_nonfinite_values_never_enter_the_percentile_history(kernels_built, path):
    p, _, state, _, g = stepped(distopt.AdamW8bit, float("nan"), path, percentile_clipping=5)
    finite = torch.where(torch.isfinite(g), g, 0.0)
    assert math.isfinite(state["gnorm_history"].sum().item())
    expected = (finite.double() ** 2).sum().item()
    assert state["gnorm_history"][3 % F.HISTORY].item() == pytest.approx(expected, rel=1e-5)


def test_nonfinite_counts_are_readable_per_parameter(kernels_built):
    a = torch.randn(4, 300).requires_grad_()
    b = torch.randn(4, 300).requires_grad_()
    opt = distopt.AdamW8bit([a, b], min_8bit_size=0)
    a.grad = torch.full(a.shape, float("nan"))
    b.grad = torch.randn(b.shape)
    opt.step()
    assert opt.nonfinite_counts() == {a: a.numel(), b: 0}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("clip", [100, 5])
@pytest.mark.parametrize("cls", [distopt.AdamW8bit, distopt.AdamW32bit])
def test_a_finite_gradient_that_overflows_the_state_is_skipped_like_a_nonfinite_one(kernels_built, cls, clip, path):
    """g = 1e21 is finite but g * g overflows fp32: without clipping its block (8-bit) or
    element (32-bit) is skipped and counted; with clipping the float64 norm scales it down."""
    p = torch.randn(4, 256, generator=torch.Generator().manual_seed(0)).requires_grad_()
    with backend(path):
        opt = cls([p], min_8bit_size=0, percentile_clipping=clip)
        p.grad = torch.randn(4, 256)
        opt.step()
        before = p.detach().clone()
        g = torch.randn(4, 256)
        g[1, 5] = 1e21
        p.grad = g
        opt.step()
    state = opt.state[p]
    assert torch.isfinite(p).all() and all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    skipped = 0 if clip < 100 else 256 if cls is distopt.AdamW8bit else 1
    assert int(state["nonfinite_count"]) == skipped
    assert not torch.equal(p.detach()[0], before[0])
