"""CI's CUDA build check (no GPU needed): build and link csrc/ with the CUDA kernels, load
the library, and check that every op has its CUDA kernel registered (or, for the ops that
only CPU tensors take, its CPU kernel).

Run with a CUDA build of torch (``.ci/run`` makes that environment); exits non-zero on
any failure, including a silent fallback to the CPU-only build.
"""

from __future__ import annotations

import re
import sys
import time
import warnings
from pathlib import Path

import torch

from distopt import _build

ROOT = Path(__file__).resolve().parent.parent


def schema_names() -> list[str]:
    text = (ROOT / "csrc" / "registration.cpp").read_text()
    return re.findall(r'"([a-z0-9_]+)\(', text)


# Ops with no tensor argument dispatch to CompositeExplicitAutograd (csrc/cuda/managed.cpp).
NO_TENSOR_INPUT = {"managed_empty"}
# Ops distopt calls with CPU tensors only: the step counters (which live on the CPU), and
# the 8-bit updates of many parameters per call (on CUDA, each parameter's 8-bit update
# is a launch of its own: distopt.optim.stepping.update_in_few_calls).
CPU_ONLY = {"add_one_", "adamw8bit_multi_", "sgd8bit_multi_"}


def has_kernel(name: str) -> bool:
    key = "CompositeExplicitAutograd" if name in NO_TENSOR_INPUT else "CPU" if name in CPU_ONLY else "CUDA"
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"distopt::{name}", key)


def main() -> int:
    assert torch.version.cuda, f"torch {torch.__version__} is not a CUDA build"
    start = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to the CPU-only build is a failure here
        assert _build.load(), "the kernels did not build"
    assert _build.cuda_loaded(), "the CUDA kernels did not build"
    print(
        f"CUDA extension (torch {torch.__version__}, CUDA {torch.version.cuda}, {_build.cuda_arch_flags()}) "
        f"built and loaded in {time.monotonic() - start:.0f} s"
    )
    names = schema_names()
    assert len(names) >= 13, names
    missing = [n for n in names if not has_kernel(n)]
    assert not missing, f"ops without their kernel (CUDA; CPU for {sorted(CPU_ONLY)}): {missing}"
    no_cpu = [n for n in names if not torch._C._dispatch_has_kernel_for_dispatch_key(f"distopt::{n}", "CPU")]
    print(f"{len(names)} ops registered ({sorted(CPU_ONLY)} for CPU only); without a CPU kernel (CUDA-only): {no_cpu}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
