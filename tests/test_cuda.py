"""distopt's CUDA kernels on a GPU (marked gpu: skipped with that reason where no CUDA
device is present; their logic runs on every CPU run in test_cuda_host.py).

Tolerance: the CUDA build uses --fmad=false and IEEE division and square root, so the
kernels take the CPU kernels' operations and are expected to agree bitwise; the tests
allow what test_fused.py allows between the fused and reference paths: parameters within
max|Δp| / max|p| <= 1e-6 (one ulp for bf16/fp16), >= 99.9% of codes identical and the
rest off by one, fp32 states within 1e-5 relative.
"""

from __future__ import annotations

import pytest
import torch

from distopt import _ops, functional, quant
from tests.conftest import backend
from tests.registry import CASES, DTYPES, SHAPES, make_grads, make_params, state_tensors

pytestmark = pytest.mark.gpu


def to_cuda(params):
    return [p.detach().cuda().requires_grad_() for p in params]


def assert_close_step(p, q, dtype):
    if p.numel() == 0:
        return
    q = q.to(p.device)
    if dtype == torch.float32:
        assert ((p - q).abs().max() / q.abs().max()).item() <= 1e-6
    else:
        ulp = torch.finfo(dtype).eps * q.float().abs().clamp_min(torch.finfo(dtype).tiny)
        assert ((p.float() - q.float()).abs() <= ulp).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_cuda_steps_match_the_cpu_reference(case, dtype):
    cpu = make_params(SHAPES, dtype)
    gpu = to_cuda(cpu)
    with backend("reference"):
        cpu_opt = case.make(cpu)
    with backend("fused"):
        gpu_opt = case.make(gpu)
    assert functional.use_fused(torch.device("cuda"))
    for k in range(3):
        grads = make_grads(cpu, 100 + k)
        for p, q, g in zip(cpu, gpu, grads):
            p.grad, q.grad = g, g.cuda()
        with backend("reference"):
            cpu_opt.step()
        with backend("fused"):
            gpu_opt.step()
    torch.cuda.synchronize()
    for p, q in zip(gpu, cpu):
        assert_close_step(p.detach(), q.detach(), dtype)
    for fused, ref in zip(state_tensors(gpu_opt, gpu), state_tensors(cpu_opt, cpu)):
        assert fused.keys() == ref.keys()
        for key, a in fused.items():
            a, b = a.cpu(), ref[key].cpu()
            if a.dtype == torch.uint8 and a.numel():
                diff = (a.int() - b.int()).abs()
                assert diff.max() <= 1 and (diff == 0).float().mean() >= 0.999, key
            elif a.is_floating_point() and a.numel():
                assert (a - b).abs().max() <= 1e-5 * b.abs().max(), key
            else:
                assert torch.equal(a, b), key


def test_ops_run_on_the_current_stream():
    assert _ops.available(torch.device("cuda"))
    g = torch.randn(64, 1000, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        rows = functional.row_sumsq(g, fused=True)
        codes, absmax = _ops.ops().quantize_blockwise(g, quant.qmap(True, g.device), True)
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(rows, functional.row_sumsq(g, fused=False), rtol=1e-12, atol=0)
    ref_codes, ref_absmax = quant.quantize_blockwise(g.cpu(), quant.qmap(True), True)
    assert torch.equal(codes.cpu(), ref_codes) and torch.equal(absmax.cpu(), ref_absmax)


def test_managed_memory_is_a_cuda_tensor_that_prefetches_both_ways():
    t = _ops.managed_empty((1000, 3), torch.float32, torch.device("cuda"))
    assert t.device.type == "cuda" and t.shape == (1000, 3)
    t.fill_(2.0)
    _ops.managed_prefetch(t, torch.device("cpu"))
    _ops.managed_prefetch(t, torch.device("cuda", 0))
    torch.cuda.synchronize()
    assert t.sum().item() == 6000.0
    del t  # its storage frees the managed memory


def test_cuda_benchmark_runs():
    from distopt import bench_cuda

    result = bench_cuda.main(["--workload", "single", "--numel", "1048576", "--steps", "2", "--warmup", "1"])
    assert any(r["optimizer"] == "distopt.AdamW8bit" for r in result["rows"])
