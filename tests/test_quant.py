"""The quantization map and the block layout: bit-exact map, nearest-code encoding, row-local blocks."""

from __future__ import annotations

import pytest
import torch

from distopt import _ops, quant


def dynamic_map_fp32(signed: bool) -> torch.Tensor:
    """The dynamic tree map built as bitsandbytes builds it (fp32 linspace and products)."""
    data: list[float] = []
    for i in range(7):
        k = 2**i if signed else 2 ** (i + 1)
        bounds = torch.linspace(0.1, 1, k + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


@pytest.mark.parametrize("signed", [True, False])
def test_shipped_map_equals_fp32_construction_bit_for_bit(signed):
    shipped = quant.qmap(signed)
    assert shipped.shape == (256,) and torch.all(shipped[1:] > shipped[:-1])
    assert torch.equal(shipped.view(torch.int32), dynamic_map_fp32(signed).view(torch.int32))
    assert shipped[quant.zero_code(signed)] == 0 and shipped[-1] == 1.0


@pytest.mark.peer
@pytest.mark.parametrize("signed", [True, False])
def test_shipped_map_equals_bitsandbytes_bit_for_bit(signed):
    import bitsandbytes.functional as bnbF

    assert torch.equal(quant.qmap(signed).view(torch.int32), bnbF.create_dynamic_map(signed=signed).view(torch.int32))


def test_qmap_is_one_shared_copy_per_device():
    assert quant.qmap(True, "cpu") is quant.qmap(True, torch.device("cpu"))


@pytest.mark.parametrize("signed", [True, False])
def test_encode_is_nearest_code_by_brute_force(signed):
    q = quant.qmap(signed)
    gen = torch.Generator().manual_seed(0)
    low = -1.0 if signed else 0.0
    t = quant.thresholds(q)
    edges = torch.cat([t, torch.nextafter(t, -torch.ones_like(t)), ((q[:-1] + q[1:]) / 2)])
    x = torch.cat([torch.rand(200_000, generator=gen) * (1 - low) + low, q, edges, torch.tensor([-1.0, 1.5])])
    codes = quant.encode(x, q).long()
    dist = (x.double()[:, None] - q.double()[None, :]).abs()  # exact for fp32 inputs
    nearest = dist.argmin(dim=1)  # argmin: the lowest index on ties
    if not signed:  # positive values take at least code 1 in the unsigned map
        nearest = torch.where((x > 0) & (nearest == 0), 1, nearest)
    assert torch.equal(codes, nearest)


@pytest.mark.parametrize("shape", [(33, 300), (4, 256), (3, 5, 70), (2, 1), (0, 300)])
@pytest.mark.parametrize("block_wise", [True, False])
def test_absmax_layout_follows_rows(shape, block_wise):
    x = torch.randn(shape)
    codes, absmax = quant.quantize_blockwise(x, quant.qmap(True), block_wise)
    assert codes.shape == x.shape and codes.dtype == torch.uint8
    assert absmax.shape == quant.absmax_shape(shape, block_wise) and absmax.dtype == torch.float32
    if block_wise and x.numel():
        rows = x.reshape(shape[0], -1)
        for j in range(absmax.shape[1]):
            block = rows[:, j * 256 : (j + 1) * 256]
            assert torch.equal(absmax[:, j], block.abs().amax(dim=1))


def test_blocks_never_cross_rows():
    """Changing one row changes no other row's codes or absmax."""
    x = torch.randn(6, 300)
    y = x.clone()
    y[2] *= 1000
    cx, ax = quant.quantize_blockwise(x, quant.qmap(True))
    cy, ay = quant.quantize_blockwise(y, quant.qmap(True))
    keep = torch.tensor([0, 1, 3, 4, 5])
    assert torch.equal(cx[keep], cy[keep]) and torch.equal(ax[keep], ay[keep])


@pytest.mark.parametrize("signed", [True, False])
def test_zero_block_stores_code_of_zero(signed):
    x = torch.zeros(3, 512)
    x[1, 300] = 0.5
    codes, absmax = quant.quantize_blockwise(x, quant.qmap(signed))
    assert absmax[0].eq(0).all() and absmax[1, 0] == 0 and absmax[1, 1] == 0.5
    assert codes[0].eq(quant.zero_code(signed)).all() and codes[1, :256].eq(quant.zero_code(signed)).all()


def test_roundtrip_error_is_bounded_by_map_spacing():
    x = torch.randn(64, 1024)
    q = quant.qmap(True)
    codes, absmax = quant.quantize_blockwise(x, q)
    y = quant.dequantize_blockwise(codes, absmax, q)
    # the largest gap between adjacent map values is 0.0140625 (near +-1; -1 itself is
    # 0.00703 from the lowest value): half of it, times absmax, up to fp32 rounding
    bound = 0.5 * (q[1:] - q[:-1]).max() * absmax.repeat_interleave(256, dim=1)
    assert ((x - y).abs() <= bound * (1 + 1e-5)).all()


@pytest.mark.parametrize("shape", [(33, 300), (4, 256), (3, 5, 70), (1000,), (0, 300)])
@pytest.mark.parametrize("block_wise", [True, False])
@pytest.mark.parametrize("signed", [True, False])
def test_fused_quantize_and_dequantize_equal_reference(kernels_built, shape, block_wise, signed):
    x = torch.randn(shape) if signed else torch.rand(shape)
    q = quant.qmap(signed)
    codes, absmax = _ops.ops().quantize_blockwise(x, q, block_wise)
    ref_codes, ref_absmax = quant.quantize_blockwise(x, q, block_wise)
    assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_absmax)
    assert torch.equal(_ops.ops().dequantize_blockwise(codes, absmax, q), quant.dequantize_blockwise(codes, absmax, q))


def test_eight_bit_rule_uses_global_numel_and_row_length():
    assert quant.uses_8bit_state((64, 64), 8, 4096)
    assert not quant.uses_8bit_state((64, 63), 8, 4096)  # fewer elements than min_8bit_size
    assert not quant.uses_8bit_state((64, 64), 32, 0)  # 32-bit requested
    assert not quant.uses_8bit_state((100_000,), 8, 0)  # 1-D: always 32-bit
    assert not quant.uses_8bit_state((1000, 15), 8, 0)  # rows shorter than 16
    assert quant.uses_8bit_state((1000, 16), 8, 0)
    assert quant.uses_8bit_state((10, 2, 8), 8, 0)  # rows are numel / shape[0]


def assert_fused_encodes_exactly(x: torch.Tensor, q: torch.Tensor) -> None:
    """The C++ encoder's codes of `x` (values in [-1, 1], encoded as they are: one row
    with absmax 1) equal the exact reference's."""
    row = torch.cat([x, torch.tensor([1.0])])
    row = torch.nn.functional.pad(row, (0, -row.numel() % 256)).view(1, -1)
    codes, absmax = _ops.ops().quantize_blockwise(row, q, False)
    assert absmax.item() == 1.0
    assert torch.equal(codes, quant.encode(row, q))


@pytest.mark.parametrize("signed", [True, False])
def test_fused_encoder_is_exact_at_every_threshold_and_over_all_magnitudes(kernels_built, signed):
    """The C++ table encoder against the exact reference: values at, just below and just
    above each threshold, each map value, and log-uniform magnitudes down to 1e-12."""
    q = quant.qmap(signed)
    t = quant.thresholds(q)
    gen = torch.Generator().manual_seed(1)
    magnitudes = torch.exp(torch.empty(1 << 20).uniform_(-28, 0, generator=gen))
    signs = torch.where(torch.rand(1 << 20, generator=gen) < 0.5, -1.0, 1.0) if signed else 1.0
    one = torch.ones_like(t)
    x = torch.cat([t, torch.nextafter(t, -one), torch.nextafter(t, one), q, magnitudes * signs])
    assert_fused_encodes_exactly(x[(x >= -1) & (x <= 1)], q)


@pytest.mark.parametrize("signed", [True, False])
def test_fused_encoder_is_exact_over_a_sweep_of_every_binade(kernels_built, signed):
    """The SIMD segment encoder (csrc/cpu/codebook.h's SegmentEncoder: one fma a lane,
    lanes next to a threshold referred to the table) against the exact reference: every
    65th float from -1 to 1 (every binade, each 2^-17 of a binade's range apart on
    average), and the floats up to 8 ulps on either side of each threshold."""
    q = quant.qmap(signed)
    t = quant.thresholds(q)
    bits = torch.arange(0, 0x3F800001, 65, dtype=torch.int64).to(torch.int32)
    magnitudes = torch.cat([bits.view(torch.float32), torch.tensor([1.0])])
    sweep = torch.cat([magnitudes, -magnitudes]) if signed else magnitudes
    near = [t]
    for direction in (-1.0, 1.0):
        x = t
        for _ in range(8):
            x = torch.nextafter(x, torch.full_like(x, direction))
            near.append(x)
    x = torch.cat([sweep, *near])
    assert_fused_encodes_exactly(x[(x >= -1) & (x <= 1)], q)


@pytest.mark.parametrize("kind", ["uniform", "random", "subnormal"])
def test_fused_encoder_is_exact_for_other_maps(kernels_built, kind):
    """Maps other than the dynamic ones: a uniform map (k / 128: one segment a side for
    the segment encoder), one of random gaps (too many segments: the table path; gaps of
    at least 1/191, so that no table bucket holds two thresholds), and the signed dynamic
    map times 2^-112 (its smallest segments start among the subnormals: the table path)."""
    gen = torch.Generator().manual_seed(3)
    if kind == "uniform":
        q = torch.arange(-127, 129, dtype=torch.float32) / 128
    elif kind == "subnormal":
        q = quant.qmap(True) * 2.0**-112
    else:
        q = torch.cumsum(torch.rand(256, generator=gen, dtype=torch.float64) + 1, 0)
        q = ((q - q[0]) / (q[-1] - q[0]) * 2 - 1).float()
    t = quant.thresholds(q)
    one = torch.ones_like(t)
    spread = torch.rand(1 << 18, generator=gen) * 2 - 1
    x = torch.cat([t, torch.nextafter(t, -one), torch.nextafter(t, one), q, spread * q.abs().max()])
    assert_fused_encodes_exactly(x.clamp(-1, 1), q)


@pytest.mark.parametrize("signed", [True, False])
def test_fused_encoder_gives_every_nan_the_same_code(kernels_built, signed):
    """A NaN state (SGD with weight decay and a NaN parameter makes one) is encoded the
    same whatever its sign and payload, in every capability's path: the SIMD encoder
    refers every NaN to the table encoder. Here the NaN comes first in its block, so the
    block's absmax is 0.5 (the scalar max-abs fold drops a NaN that is not last)."""
    q = quant.qmap(signed)
    payloads = [0x7FC00000, 0x7FC01234, 0xFFC01234, 0x7F800003, 0xFFD5A123, 0x7FFFFFFF, 0xFF800001]
    nan = torch.tensor([b - (1 << 32) if b >= 1 << 31 else b for b in payloads], dtype=torch.int32).view(torch.float32)
    rows = torch.zeros(len(payloads), 256)
    rows[:, 0] = nan
    rows[:, 1] = 0.5
    codes, absmax = _ops.ops().quantize_blockwise(rows, q, True)
    assert torch.equal(absmax, torch.full_like(absmax, 0.5))
    assert torch.equal(codes[:, 0], codes[:1, 0].expand(len(payloads)))


@pytest.mark.parametrize("signed", [True, False])
def test_subnormal_absmax_encodes_like_a_normal_one(kernels_built, signed):
    """1/absmax overflows for absmax < 2.9e-39: values are divided instead, in both paths."""
    q = quant.qmap(signed)
    base = torch.randn(4, 256) if signed else torch.rand(4, 256)
    ref_codes, _ = quant.quantize_blockwise(base, q)
    tiny = base * 1e-39  # subnormal values
    codes, absmax = quant.quantize_blockwise(tiny, q)
    fused_codes, fused_absmax = _ops.ops().quantize_blockwise(tiny, q, True)
    assert torch.equal(codes, fused_codes) and torch.equal(absmax, fused_absmax)
    decoded = quant.dequantize_blockwise(codes, absmax, q)
    assert ((decoded - tiny).abs() <= 0.0071 * absmax.repeat_interleave(256, dim=1) + 1e-45).all()
    assert (torch.sign(decoded) == torch.sign(tiny)).float().mean() > 0.99
