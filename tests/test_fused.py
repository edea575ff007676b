"""The fused kernels prove themselves against the reference, and do not depend on threads or placement.

- one step from the same state: max|Δp| / max|p| <= 1e-6, >= 99.9% of codes identical
  and the rest off by one (DESIGN §7);
- bitwise independence of the thread count and of where a row sits (DESIGN §3.1).
"""

from __future__ import annotations

import pytest
import torch

import distopt
from tests.conftest import backend, threads
from tests.registry import (
    CASES,
    DTYPES,
    SHAPES,
    assert_bitwise_equal,
    clone_params,
    make_grads,
    make_params,
    run_steps,
    state_tensors,
)


def one_step_both_paths(case, dtype):
    params = make_params(SHAPES, dtype)
    with backend("fused"):
        opt = case.make(params)
        run_steps(opt, params, 3)
    twins = clone_params(params)
    twin_opt = case.make(twins)
    twin_opt.load_state_dict(opt.state_dict())
    with backend("fused"):
        run_steps(opt, params, 1, first_seed=7)
    with backend("reference"):
        run_steps(twin_opt, twins, 1, first_seed=7)
    return params, opt, twins, twin_opt


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_one_step_fused_matches_reference(kernels_built, case, dtype):
    params, opt, twins, twin_opt = one_step_both_paths(case, dtype)
    for p, q in zip(params, twins):
        if p.numel() == 0:
            continue
        if dtype == torch.float32:
            assert ((p - q).abs().max() / q.abs().max()).item() <= 1e-6
        else:  # the same fp32 math rounded once to the parameter dtype: at most one ulp apart
            ulp = torch.finfo(dtype).eps * q.float().abs().clamp_min(torch.finfo(dtype).tiny)
            assert ((p.float() - q.float()).abs() <= ulp).all()
    for fused, ref in zip(state_tensors(opt, params), state_tensors(twin_opt, twins)):
        assert fused.keys() == ref.keys()
        for key, a in fused.items():
            b = ref[key]
            assert a.dtype == b.dtype and a.shape == b.shape, key
            if a.dtype == torch.uint8 and a.numel():
                diff = (a.int() - b.int()).abs()
                assert diff.max() <= 1, key
                assert (diff == 0).float().mean() >= 0.999, key
            elif a.is_floating_point() and a.numel():
                assert (a - b).abs().max() <= 1e-5 * b.abs().max(), key
            else:
                assert torch.equal(a, b), key


def run_with_threads(case, n_threads, shapes):
    params = make_params(shapes)
    with threads(n_threads), backend("fused"):
        opt = case.make(params)
        run_steps(opt, params, 4)
    return params, state_tensors(opt, params)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_results_do_not_depend_on_thread_count(kernels_built, case):
    shapes = [*SHAPES, (64, 1024), (40_000,)]
    p1, s1 = run_with_threads(case, 1, shapes)
    p2, s2 = run_with_threads(case, 2, shapes)
    for a, b in zip(p1, p2):
        assert_bitwise_equal(a.detach(), b.detach())
    for x, y in zip(s1, s2):
        assert x.keys() == y.keys()
        for key in x:
            assert_bitwise_equal(x[key], y[key])


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_results_do_not_depend_on_flush_denormal_mode(kernels_built, case, n_threads):
    """The kernels compute in the default IEEE mode even when the caller's thread flushes
    subnormals (torch.set_flush_denormal(True)): on gradients scaled into the subnormals
    (states, absmax and updates among them) the results are bitwise those without it."""
    shapes = [(33, 300), (20, 16), (300,)]
    runs = []
    for flush in (False, True):
        params = make_params(shapes)
        with threads(n_threads), backend("fused"):
            opt = case.make(params)
            for k in range(3):
                for p, g in zip(params, make_grads(params, 100 + k, scale=1e-39)):
                    p.grad = g
                assert torch.set_flush_denormal(flush)  # the gradients are made without it
                try:
                    opt.step()
                finally:
                    torch.set_flush_denormal(False)
        runs.append((params, state_tensors(opt, params)))
    (p1, s1), (p2, s2) = runs
    for a, b in zip(p1, p2):
        assert_bitwise_equal(a.detach(), b.detach())
    for x, y in zip(s1, s2):
        for key in x:
            assert_bitwise_equal(x[key], y[key])


def test_ops_do_not_depend_on_flush_denormal_mode(kernels_built):
    """The codec and the row norms on subnormal values, and steps (single and multi ops)
    whose coefficients eps or lr and gradient scale are subnormal as fp32, flushing or
    not (ieee_mode.h)."""
    from distopt import _ops, quant

    ops = _ops.ops()
    x = torch.randn(6, 300) * 1e-39
    q = quant.qmap(True)
    codes, absmax = ops.quantize_blockwise(x, q, True)

    adamw = [1.0, 0.1, 0.999, 0.001, 1e-40, 0.001, 1.0]  # eps 1e-40
    sgd = [1e-40, 0.0, 0.9, 1.0, 0.0, 1.0]  # lr 1e-40, a first step

    def run(flush):
        ps = [torch.ones(3, 100) for _ in range(3)] + [torch.full((3, 300), 1e-9) for _ in range(2)]
        zeros, big = torch.zeros(3, 100), torch.full((3, 300), 1e30)
        m, v = [torch.zeros(3, 100) for _ in range(2)], [torch.zeros(3, 100) for _ in range(2)]
        m8, v8 = (
            quant.quantize_blockwise(torch.zeros(3, 100), q, True),
            quant.quantize_blockwise(torch.zeros(3, 100), quant.qmap(False), True),
        )
        buf, buf8 = torch.zeros(3, 300), quant.quantize_blockwise(torch.zeros(3, 300), q, True)
        scale, count = torch.tensor(1e-40), lambda: torch.zeros((), dtype=torch.long)
        assert torch.set_flush_denormal(flush)
        try:
            out = [*ops.quantize_blockwise(x, q, True), ops.dequantize_blockwise(codes, absmax, q), ops.row_sumsq(x)]
            # zero gradients, eps 1e-40: 0 / eps is 0 (a flushed eps would give 0 / 0)
            ops.adamw32_(ps[0], zeros, m[0], v[0], None, scale, count(), *adamw)
            ops.adamw32_multi_([ps[1]], [zeros], [m[1]], [v[1]], [], [scale], [count()], adamw)
            ops.adamw8bit_multi_(
                [ps[2]],
                [zeros],
                [m8[0]],
                [m8[1]],
                [v8[0]],
                [v8[1]],
                [],
                [],
                q,
                quant.qmap(False),
                [scale],
                [count()],
                adamw,
            )
            # lr 1e-40 times a gradient of 1e30 moves a parameter of 1e-9 (a flushed lr would not)
            ops.sgd32_multi_([ps[3]], [big], [buf], [torch.tensor(1.0)], [count()], sgd)
            ops.sgd8bit_multi_([ps[4]], [big], [buf8[0]], [buf8[1]], q, [torch.tensor(1.0)], [count()], sgd)
        finally:
            torch.set_flush_denormal(False)
        return [*out, *ps, *m8, *v8, *buf8, buf]

    for a, b in zip(run(False), run(True)):
        assert_bitwise_equal(a, b)


def test_fp16_nan_parameters_match_the_reference(kernels_built):
    """An fp16 parameter's NaNs come out of a fused step with the bits torch's own
    conversion gives them on the reference path (dtype.h's to_param)."""
    bits = torch.tensor([0x7E01, 0x7C01, -0x1FF, 0x7FFF], dtype=torch.int16)
    results = []
    for path in ("fused", "reference"):
        p = torch.ones(4, 64, dtype=torch.float16)
        p.view(-1).view(torch.int16)[:4] = bits
        p.requires_grad_()
        p.grad = torch.full_like(p, 0.5)
        with backend(path):
            distopt.AdamW32bit([p], lr=0.1).step()
        results.append(p.detach().clone())
    assert_bitwise_equal(results[0], results[1])


OFFSET_ROWS = 7


@pytest.mark.parametrize("path", ["fused", "reference"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_rows_update_the_same_wherever_they_sit(kernels_built, case, path):
    """Rows of a parameter placed after 7 zero rows of a larger one evolve bitwise alike."""
    small = make_params([(33, 300), (9, 40)])
    large = [torch.cat([torch.zeros((OFFSET_ROWS, *p.shape[1:])), p.detach()]).requires_grad_() for p in small]
    with backend(path):
        opt_small, opt_large = case.make(small), case.make(large)
        for k in range(4):
            grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(k)) for p in small]
            for p, q, g in zip(small, large, grads):
                p.grad = g
                q.grad = torch.cat([torch.zeros((OFFSET_ROWS, *g.shape[1:])), g])
            opt_small.step()
            opt_large.step()
    for p, q in zip(small, large):
        assert_bitwise_equal(p.detach(), q.detach()[OFFSET_ROWS:])
        for key, a in opt_small.state[p].items():
            b = opt_large.state[q][key]
            if a.dim() >= 1 and a.shape[0] == p.shape[0] and a.shape[0] != b.shape[0]:
                b = b[OFFSET_ROWS:]
            if key != "nonfinite_count":
                assert_bitwise_equal(a, b)
