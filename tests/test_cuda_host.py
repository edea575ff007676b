"""The CUDA kernel bodies, built for the host, against the reference (DESIGN §7).

csrc/cuda/host_harness.cpp runs the very bodies the GPU runs (blockwise8bit.h,
multi_tensor.h, rowwise.h) with every CUDA block of a grid in turn and every thread
phase by phase. Checked here on every CPU run: block indexing (tails, rows of 1 element,
rows not a multiple of 256, empty tensors), grid-stride loops (grids smaller than the
work), the tree reductions, the non-finite rule, the multi-tensor launch packing, and the
exact encode. The host build uses no contraction, like the CPU kernels, so it must agree
with them bitwise; with the reference it agrees as test_fused.py requires.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils import cpp_extension

from distopt import _build, _ops, functional, quant
from distopt.functional import AdamWCoeffs, SGDCoeffs
from tests.conftest import backend

SHAPES = [(0,), (3, 0), (1,), (7,), (5, 300), (2, 256), (3, 1), (4, 513), (2, 3, 100), (1, 1000)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
GRIDS = [1, 3]


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    cpp_extension.load(
        name="distopt_cuda_host",
        sources=[str(_build.csrc_dir() / "cuda" / "host_harness.cpp")],
        extra_cflags=["-O2", "-ffp-contract=off", "-fno-fast-math"],
        is_python_module=False,
        verbose=False,
    )
    return torch.ops.distopt_host


def coeff_list(c) -> list[float]:
    return [float(v) for v in dataclasses.astuple(c)]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def eight_bit_state(shape, names, block_wise, seed=0) -> dict:
    state = {"nonfinite_count": torch.zeros((), dtype=torch.int64)}
    for k, name in enumerate(names):
        signed = functional._SIGNED[name]
        x = torch.randn(shape, generator=gen(seed + k))
        x = x if signed else x.abs() * 1e-3
        state[name], absmax = quant.quantize_blockwise(x, quant.qmap(signed), block_wise)
        state[f"{name}_absmax"] = absmax if block_wise else absmax.reshape(1)
    return state


def clone_state(state: dict) -> dict:
    return {k: v.clone() for k, v in state.items()}


def param_and_grad(shape, dtype, seed=1, nonfinite=False):
    p = torch.randn(shape, generator=gen(seed)).to(dtype)
    g = torch.randn(shape, generator=gen(seed + 1)).to(dtype)
    if nonfinite and g.numel() > 300:
        g.view(-1)[260] = float("inf")  # the block of element 260 (row 0's second block, or row 1's)
        g.view(-1)[5] = float("nan")
    return p, g


def run_host_8bit(host, p, g, state, names, rule, c, grid, scale):
    codes = [state[n] for n in names]
    absmax = [state[f"{n}_absmax"] for n in names]
    qmaps = [quant.qmap(functional._SIGNED[n]) for n in names]
    count, ks = state["nonfinite_count"], coeff_list(c)
    new_absmax = None
    if absmax[0].dim() == 1:  # block_wise=False: the first pass, then the update (as functional.py)
        new_absmax = host.blockwise8bit(p, g, codes, absmax, qmaps, None, scale, count, rule, ks, True, grid)
    host.blockwise8bit(p, g, codes, absmax, qmaps, new_absmax, scale, count, rule, ks, False, grid)


def assert_same_step(p, state, p_ref, state_ref):
    assert torch.equal(p, p_ref) or (p.numel() == 0)
    for key, a in state.items():
        assert torch.equal(a, state_ref[key]), key


ADAMW = AdamWCoeffs.for_step(1e-2, (0.9, 0.999), 1e-8, 0.01, 3)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("block_wise", [True, False], ids=["blockwise", "tensorwise"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_adamw8bit_body_matches_cpu_kernel_bitwise_and_reference(
    kernels_built, host, shape, dtype, amsgrad, block_wise, grid
):
    names = functional._ADAMW_STATES if amsgrad else functional._ADAMW_STATES[:2]
    p, g = param_and_grad(shape, dtype, nonfinite=True)
    state = eight_bit_state(shape, names, block_wise)
    scale = torch.tensor(0.75)
    p_cpu, s_cpu, p_ref, s_ref = p.clone(), clone_state(state), p.clone(), clone_state(state)
    run_host_8bit(host, p, g, state, names, "adamw", ADAMW, grid, scale)
    functional.adamw_update(p_cpu, g, s_cpu, ADAMW, scale, fused=True)
    assert_same_step(p, state, p_cpu, s_cpu)
    functional.adamw_update(p_ref, g, s_ref, ADAMW, scale, fused=False)
    assert state["nonfinite_count"] == s_ref["nonfinite_count"]
    if p.numel():
        assert ((p.float() - p_ref.float()).abs().max() <= 1e-6 * p_ref.float().abs().max()) or dtype != torch.float32
        for n in names:
            assert (state[n].int() - s_ref[n].int()).abs().max() <= 1, n


SGD_SETTINGS = {
    "momentum": SGDCoeffs.for_step(0.1, 0.9, 0.0, 0.0, False, False),
    "first_step": SGDCoeffs.for_step(0.1, 0.9, 0.0, 0.01, False, True),
    "dampening_decay": SGDCoeffs.for_step(0.1, 0.9, 0.3, 0.01, False, False),
    "nesterov": SGDCoeffs.for_step(0.05, 0.8, 0.0, 0.001, True, False),
}


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("block_wise", [True, False], ids=["blockwise", "tensorwise"])
@pytest.mark.parametrize("setting", list(SGD_SETTINGS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(0,), (3, 1), (5, 300), (4, 513)], ids=str)
def test_sgd8bit_body_matches_cpu_kernel_bitwise(kernels_built, host, shape, dtype, setting, block_wise, grid):
    c = SGD_SETTINGS[setting]
    p, g = param_and_grad(shape, dtype, nonfinite=True)
    state = eight_bit_state(shape, ["momentum_buffer"], block_wise)
    scale = torch.tensor(1.0)
    p_cpu, s_cpu = p.clone(), clone_state(state)
    run_host_8bit(host, p, g, state, ["momentum_buffer"], "sgd", c, grid, scale)
    functional.sgd_update(p_cpu, g, s_cpu, c, scale, fused=True)
    assert_same_step(p, state, p_cpu, s_cpu)


def test_a_nonfinite_block_is_left_untouched_and_counted(host):
    p, g = param_and_grad((2, 600), torch.float32)
    g[1, 300] = float("inf")  # row 1, block 1 (elements 256..511 of the row)
    state = eight_bit_state((2, 600), ["exp_avg", "exp_avg_sq"], True)
    before_p, before = p.clone(), clone_state(state)
    run_host_8bit(host, p, g, state, ["exp_avg", "exp_avg_sq"], "adamw", ADAMW, 2, torch.tensor(1.0))
    assert torch.equal(p[1, 256:512], before_p[1, 256:512])
    assert not torch.equal(p[1, :256], before_p[1, :256]) and not torch.equal(p[1, 512:], before_p[1, 512:])
    assert torch.equal(state["exp_avg"][1, 256:512], before["exp_avg"][1, 256:512])
    assert state["exp_avg_absmax"][1, 1] == before["exp_avg_absmax"][1, 1]
    assert state["nonfinite_count"].item() == 256


def thirty_two_bit(shapes, dtype, nstates, seed=0):
    params, grads, states = [], [], []
    for k, shape in enumerate(shapes):
        p, g = param_and_grad(shape, dtype, seed=10 * k)
        if g.numel() > 5000:
            g.view(-1)[4099] = float("nan")
        params.append(p)
        grads.append(g)
        states.append([torch.rand(shape, generator=gen(seed + 3 * k + s)) * 1e-2 for s in range(nstates)])
    return params, grads, states


# One parameter of 800,000 elements (196 chunks: more than one launch's 192, it continues in
# the next launch), then more parameters than one launch holds (16), empty and 1-element ones.
MULTI_SHAPES = [(0,), (1,), (300,), (4096,), (4097,), (3, 0), (800_000,), *[(17, 33)] * 20, (70_000,)]


@pytest.mark.parametrize("rule,nstates", [("adamw", 2), ("adamw", 3), ("sgd", 0), ("sgd", 1)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_multi_tensor_body_matches_the_per_parameter_cpu_kernel_bitwise(kernels_built, host, rule, nstates, dtype):
    params, grads, states = thirty_two_bit(MULTI_SHAPES, dtype, nstates)
    scales = [torch.tensor(0.5 + 0.01 * k) for k in range(len(params))]
    counts = [torch.zeros((), dtype=torch.int64) for _ in params]
    if rule == "adamw":
        cs = [AdamWCoeffs.for_step(1e-3 * (k + 1), (0.9, 0.99), 1e-8, 0.1, k + 1) for k in range(len(params))]
    else:
        cs = [SGDCoeffs.for_step(0.01, 0.9, 0.1, 0.01, k % 2 == 0, k % 3 == 0) for k in range(len(params))]
    ref = [(p.clone(), [s.clone() for s in st], torch.zeros((), dtype=torch.int64)) for p, st in zip(params, states)]
    flat = [s for st in states for s in st]
    coeffs = [v for c in cs for v in coeff_list(c)]
    launches = host.multi32(params, grads, flat, nstates, scales, counts, rule, coeffs)
    # launch 1 ends at 192 blocks inside the large parameter; launch 2 at 16 parameters
    assert launches == 3
    for k, (p_ref, st_ref, count_ref) in enumerate(ref):
        ops = _ops.ops()
        if rule == "adamw":
            vmax = st_ref[2] if nstates == 3 else None
            ops.adamw32_(p_ref, grads[k], st_ref[0], st_ref[1], vmax, scales[k], count_ref, *coeff_list(cs[k]))
        else:
            buf = st_ref[0] if nstates else None
            ops.sgd32_(p_ref, grads[k], buf, scales[k], count_ref, *coeff_list(cs[k]))
        assert torch.equal(params[k], p_ref), k
        for a, b in zip(states[k], st_ref):
            assert torch.equal(a, b), k
        assert counts[k] == count_ref, k
    assert counts[6].item() == 1  # the NaN gradient of the large parameter


@pytest.mark.parametrize("grid", [1, 7])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(0,), (3, 0), (1,), (9,), (5, 300), (2, 3, 100), (4, 1000)], ids=str)
def test_row_sumsq_body_matches_reference(host, shape, dtype, grid):
    g = torch.randn(shape, generator=gen(3)).to(dtype)
    if g.numel() > 10:
        g.view(-1)[7] = float("inf")
    out = host.row_sumsq(g, grid)
    with backend("reference"):
        ref = functional.row_sumsq(g, fused=False)
    assert out.dtype == torch.float64 and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-13, atol=0.0)


def test_row_sumsq_body_order_depends_on_the_row_only(host):
    g = torch.randn(6, 1000, generator=gen(4))
    rows = host.row_sumsq(g, 4)
    placed = torch.cat([torch.randn(5, 1000), g])
    assert torch.equal(host.row_sumsq(placed, 3)[5:], rows)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("block_wise", [True, False], ids=["blockwise", "tensorwise"])
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("shape", [(0,), (1,), (3, 1), (5, 300), (4, 513), (2, 3, 100)], ids=str)
def test_quantize_and_dequantize_bodies_match_reference_exactly(host, shape, signed, block_wise, grid):
    x = torch.randn(shape, generator=gen(5))
    x = x if signed else x.abs()
    if x.numel() > 300:
        x.view(-1)[:256] = 0.0  # an all-zero block stores the code of 0
        x.view(-1)[300] = 1e-41  # a subnormal value
    q = quant.qmap(signed)
    codes, absmax = host.quantize_blockwise(x, q, block_wise, grid)
    ref_codes, ref_absmax = quant.quantize_blockwise(x, q, block_wise)
    assert torch.equal(codes, ref_codes)
    assert torch.equal(absmax.view(-1), ref_absmax.view(-1))
    out = host.dequantize_blockwise(codes, absmax, q, grid)
    assert torch.equal(out, quant.dequantize_blockwise(ref_codes, ref_absmax, q))


def test_encode_is_the_exact_nearest_code_for_tiny_blocks(host):
    """A block whose absmax is subnormal (no finite reciprocal) encodes by division."""
    x = torch.tensor([[1e-45, -3e-45, 2e-45]])
    for signed in (True, False):
        y = x if signed else x.abs()
        codes, absmax = host.quantize_blockwise(y, quant.qmap(signed), True, 1)
        ref_codes, ref_absmax = quant.quantize_blockwise(y, quant.qmap(signed), True)
        assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_absmax)
