"""Every CPU capability this machine can run gives the same bits (DESIGN §3.1).

Each capability (DEFAULT: scalar; AVX2: the vector loops on csrc/cpu/simd_avx2.h; AVX512:
the same on csrc/cpu/simd_avx512.h; AVX512VBMI: with the byte-permute decode) is built and
run in its own subprocess (``DISTOPT_CPU_CAPABILITY`` forces a lower one) on the same
steps; the parameters, states and skip counts must be
bitwise identical. The gradients probe the edges of the kernels: short last blocks,
bf16/fp16 parameters, non-finite gradients, gradients large enough to overflow a state,
subnormal and zero blocks (the division fallback and the zero absmax), SGD with
dampening 1, whose buffer can turn NaN (0 * inf) while its block's absmax stays finite,
NaN parameters with payloads (fp16's is made canonical in every build), rows of 21
elements (8-lane chunks and a tail of 5), and steps taken while the calling thread
flushes subnormals (torch.set_flush_denormal: the kernels compute without it). The
percentile-clipping row sums are compared on their own too, for rows of 1 to 25 elements.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from distopt import _build

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import hashlib, torch, distopt
assert distopt.functional.use_fused(torch.device("cpu"))
from distopt import _build
print("capability:", _build._state["capability"])
torch.set_num_threads(2)
SHAPES = [(33, 300), (8, 256), (5, 1000), (7, 3, 40), (4, 17 * 16 + 5), (6, 21)]
NAN_BITS = {
    torch.float32: [0x7FC01234, -0x3FEDCC],
    torch.bfloat16: [0x7FC1, -0x3F],
    torch.float16: [0x7E01, 0x7C01, -0x1FF],
}
CONFIGS = [
    (distopt.AdamW8bit, {}),
    (distopt.AdamW8bit, {"amsgrad": True, "weight_decay": 0.1}),
    (distopt.AdamW8bit, {"block_wise": False}),
    (distopt.AdamW8bit, {"percentile_clipping": 5}),
    (distopt.SGD8bit, {"lr": 0.05, "momentum": 0.9}),
    (distopt.SGD8bit, {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    (distopt.SGD8bit, {"lr": 0.05, "momentum": 0.8, "dampening": 1.0, "weight_decay": 3e38}),
    (distopt.AdamW32bit, {"amsgrad": True}),
    (distopt.AdamW32bit, {"weight_decay": 0.1}),
    (distopt.SGD32bit, {"lr": 0.05}),
    (distopt.SGD32bit, {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    (distopt.SGD32bit, {"lr": 0.05, "momentum": 0.8, "dampening": 0.5}),
    # the 32-bit loops' scaled path (gnorm_scale != 1)
    (distopt.AdamW32bit, {"amsgrad": True, "percentile_clipping": 5}),
    (distopt.SGD32bit, {"lr": 0.05, "momentum": 0.9, "percentile_clipping": 5}),
]

def grad(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(shape, generator=gen).reshape(-1)
    n = g.numel()
    if n >= 1110:  # every shape but the short rows
        g[0:256] *= 1e-41          # a subnormal block: the division fallback
        g[256:512] = 0.0           # a zero block: absmax 0
        g[700] = float("inf") if seed % 2 else float("nan")
        g[1100:1110] *= 3e38 if dtype == torch.float32 else 1.0  # v overflows
    g[n - 3] = -float("inf") if seed % 3 == 0 else g[n - 3]  # in the short last block
    g[n - 2] *= 3e38 if dtype == torch.float32 else 1.0  # a state overflows in a masked tail
    return g.reshape(shape).to(dtype)

def nan_params(params, dtype):
    # NaNs with payloads (a signalling one for fp16) in the first row of each parameter
    bits_dtype = torch.int32 if dtype == torch.float32 else torch.int16
    for p in params:
        flat = p.detach().view(-1).view(bits_dtype)
        for k, bits in enumerate(NAN_BITS[dtype]):
            flat[3 + 4 * k] = bits

digest = hashlib.sha256()
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for c, (cls, kwargs) in enumerate(CONFIGS):
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in SHAPES]
        if c % 3 == 0:
            nan_params(params, dtype)
        opt = cls(params, min_8bit_size=64, **kwargs)
        for step in range(4):
            for i, p in enumerate(params):
                p.grad = grad(p.shape, dtype, 10 * step + i)
            if step == 3:  # the gradients are made in the default mode; the step flushes
                params[0].grad.view(-1)[256:300] = 3e-39  # subnormal in fp32
                torch.set_flush_denormal(True)
            opt.step()
            torch.set_flush_denormal(False)
        for p in params:
            digest.update(p.detach().reshape(-1).view(torch.uint8).numpy().tobytes())
            for key in sorted(opt.state[p]):
                value = opt.state[p][key]
                if torch.is_tensor(value):
                    digest.update(value.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
# the clipping norm's row sums on their own: every tail length, non-finite lanes in it
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for n in range(1, 26):
        g = torch.randn(3, n, generator=torch.Generator().manual_seed(n)) * 1e3
        g[1, n - 1], g[2, n // 2] = float("inf"), float("nan")
        sums = distopt.functional.row_sumsq(g.to(dtype), fused=True)
        digest.update(sums.numpy().tobytes())
print("digest:", digest.hexdigest())
"""


def runnable_capabilities() -> list[str]:
    return _build._ORDER[: _build._ORDER.index(_build.host_capability()) + 1]


def run_capability(capability: str) -> str:
    env = {**os.environ, "DISTOPT_CPU_CAPABILITY": capability}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"capability: {capability}" in done.stdout, done.stdout
    return next(line for line in done.stdout.splitlines() if line.startswith("digest:"))


@pytest.mark.skipif(len(runnable_capabilities()) < 2, reason="this CPU runs only the scalar path")
def test_every_capability_gives_the_same_bits():
    digests = {cap: run_capability(cap) for cap in runnable_capabilities()}
    assert len(set(digests.values())) == 1, digests
