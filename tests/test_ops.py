"""Every op in csrc/registration.cpp passes torch.library.opcheck (schema, fake impl, dispatch)."""

from __future__ import annotations

import pytest
import torch

from distopt import _ops, quant
from distopt.functional import AdamWCoeffs, SGDCoeffs

ADAMW = list(AdamWCoeffs.for_step(1e-3, (0.9, 0.999), 1e-8, 0.01, 3).scalars)
SGD = list(SGDCoeffs.for_step(0.1, 0.9, 0.1, 0.01, False, False).scalars)


def eight_bit(shape, signed, block_wise=True):
    codes, absmax = quant.quantize_blockwise(
        torch.randn(shape) if signed else torch.rand(shape), quant.qmap(signed), block_wise
    )
    return [codes, absmax]


def samples(dtype):
    p = torch.randn(5, 300, dtype=dtype)
    g = torch.randn(5, 300, dtype=dtype)
    s, u = quant.qmap(True), quant.qmap(False)
    scale, count = torch.tensor(0.5), torch.zeros((), dtype=torch.int64)
    m, v, vm = eight_bit(p.shape, True), eight_bit(p.shape, False), eight_bit(p.shape, False)
    mt, vt = eight_bit(p.shape, True, False), eight_bit(p.shape, False, False)
    new_absmax = torch.tensor([2.0, 3.0])
    f32 = [torch.randn(5, 300), torch.rand(5, 300), torch.rand(5, 300)]
    return {
        "adamw8bit_": [p, g, *m, *v, *vm, s, u, None, scale, count, *ADAMW],
        "adamw8bit_ tensorwise": [p, g, *mt, *vt, None, None, s, u, new_absmax, scale, count, *ADAMW],
        "adamw8bit_new_absmax": [p, g, *mt, *vt, None, None, s, u, scale, *ADAMW],
        "adamw32_": [p, g, *f32, scale, count, *ADAMW],
        "sgd8bit_": [p, g, *m, s, None, scale, count, *SGD],
        "sgd8bit_new_absmax": [p, g, *mt, s, scale, *SGD],
        "sgd32_": [p, g, f32[0], scale, count, *SGD],
        "adamw32_multi_": [
            [p, p.clone()],
            [g, g],
            [f32[0], f32[0].clone()],
            [f32[1], f32[1].clone()],
            [],
            [scale, scale],
            [count, count.clone()],
            ADAMW * 2,
        ],
        "sgd32_multi_": [
            [p, p.clone()],
            [g, g],
            [f32[0], f32[0].clone()],
            [scale, scale],
            [count, count.clone()],
            SGD * 2,
        ],
        "adamw8bit_multi_": [[p], [g], [m[0]], [m[1]], [v[0]], [v[1]], [vm[0]], [vm[1]], s, u, [scale], [count], ADAMW],
        "sgd8bit_multi_": [[p], [g], [m[0]], [m[1]], s, [scale], [count], SGD],
        "add_one_": [[torch.zeros(()), torch.zeros((), dtype=torch.int64)]],
        "row_sumsq": [g],
        "quantize_blockwise": [torch.randn(5, 300), s, True],
        "dequantize_blockwise": [*m, s],
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(samples(torch.float32)))
def test_opcheck(kernels_built, name, dtype):
    args = samples(dtype)[name]
    op = getattr(_ops.ops(), name.split()[0])
    torch.library.opcheck(op, args)


def test_ops_reject_mismatched_inputs_with_clear_errors(kernels_built):
    p, g = torch.randn(5, 300), torch.randn(5, 301)
    m, v = eight_bit(p.shape, True), eight_bit(p.shape, False)
    s, u = quant.qmap(True), quant.qmap(False)
    with pytest.raises(RuntimeError, match="grad shape"):
        _ops.ops().adamw8bit_(
            p, g, *m, *v, None, None, s, u, None, torch.tensor(1.0), torch.zeros((), dtype=torch.int64), *ADAMW
        )
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        _ops.ops().row_sumsq(torch.randn(3, 3, dtype=torch.float64))
    strided = torch.stack([s, s], dim=1)[:, 0]  # the signed map's values, every other float
    assert torch.equal(strided, s) and not strided.is_contiguous()
    with pytest.raises(RuntimeError, match="256 contiguous fp32 values"):
        _ops.ops().dequantize_blockwise(*m, strided)
    with pytest.raises(RuntimeError, match="256 contiguous fp32 values"):
        _ops.ops().sgd8bit_(p, p, *m, strided, None, torch.tensor(1.0), torch.zeros((), dtype=torch.int64), *SGD)
