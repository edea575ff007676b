"""The CPU ops read and write nothing past their tensors' ends.

Every tensor of the ops below is placed so that it ends right before a page that may
not be read or written (``mprotect(PROT_NONE)``), for rows whose length leaves every
tail of a 256-element block and of an 8- or 16-lane chunk, in each parameter dtype: a
read or a write past the end is a segmentation fault. The ops run in a child process,
so that a fault fails this test instead of the test run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent(
    """
    import ctypes, mmap
    import numpy as np, torch
    from distopt import _ops, quant
    from distopt.functional import AdamWCoeffs, SGDCoeffs

    assert _ops.available(torch.device("cpu"))
    ops = _ops.ops()
    libc = ctypes.CDLL(None)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    PAGE = mmap.PAGESIZE
    mappings = []

    def before_guard(t):
        # a copy of t that ends where an inaccessible page begins
        nbytes = t.numel() * t.element_size()
        pages = (nbytes + PAGE - 1) // PAGE + 1
        m = mmap.mmap(-1, pages * PAGE)
        start = ctypes.addressof(ctypes.c_char.from_buffer(m))
        assert libc.mprotect(start + (pages - 1) * PAGE, PAGE, 0) == 0
        mappings.append(m)
        raw = np.frombuffer(m, dtype=np.uint8, count=nbytes, offset=(pages - 1) * PAGE - nbytes)
        out = torch.from_numpy(raw).view(t.dtype).view(t.shape)
        out.copy_(t)
        return out

    S, U = quant.qmap(True), quant.qmap(False)
    adamw = AdamWCoeffs.for_step(1e-3, (0.9, 0.99), 1e-8, 0.1, 3)
    sgd = SGDCoeffs.for_step(0.05, 0.9, 0.0, 0.01, False, False)
    lengths = [*range(1, 40), *range(240, 260), 511, 513, 1000]
    for n in lengths:
        for rows in (1, 3):
            x = before_guard(torch.randn(rows, n))
            codes, absmax = ops.quantize_blockwise(x, S, True)
            ops.dequantize_blockwise(before_guard(codes), before_guard(absmax), S)
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                p, g = (before_guard(torch.randn(rows, n).to(dtype)) for _ in range(2))
                m = [before_guard(t) for t in quant.quantize_blockwise(torch.randn(rows, n), S, True)]
                v = [before_guard(t) for t in quant.quantize_blockwise(torch.rand(rows, n), U, True)]
                mt = [before_guard(t) for t in quant.quantize_blockwise(torch.randn(rows, n), S, False)]
                vt = [before_guard(t) for t in quant.quantize_blockwise(torch.rand(rows, n), U, False)]
                f32 = [before_guard(torch.rand(rows, n)) for _ in range(2)]
                count, half = before_guard(torch.zeros((), dtype=torch.int64)), torch.tensor(0.5)
                ops.adamw8bit_(p, g, *m, *v, None, None, S, U, None, half, count, *adamw.scalars)
                new = ops.adamw8bit_new_absmax(p, g, *mt, *vt, None, None, S, U, half, *adamw.scalars)
                ops.adamw8bit_(p, g, *mt, *vt, None, None, S, U, new, half, count, *adamw.scalars)
                states = [[m[0]], [m[1]], [v[0]], [v[1]], [], []]
                ops.adamw8bit_multi_([p], [g], *states, S, U, [half], [count], adamw.flat)
                ops.sgd8bit_multi_([p], [g], [m[0]], [m[1]], S, [half], [count], sgd.flat)
                ops.adamw32_multi_([p], [g], [f32[0]], [f32[1]], [], [half], [count], adamw.flat)
                ops.sgd32_multi_([p], [g], [f32[0]], [half], [count], sgd.flat)
                ops.row_sumsq(g)
            mappings.clear()
    print("no access past the ends")
    """
)


def test_no_op_reads_or_writes_past_its_tensors(kernels_built):
    if not hasattr(os, "sysconf") or sys.platform != "linux":
        pytest.fail("this test needs Linux (mmap and mprotect through ctypes)")
    result = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"the child died with {result.returncode}:\n{result.stderr[-3000:]}"
    assert "no access past the ends" in result.stdout
