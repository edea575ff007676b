"""Just-in-time build of distopt's C++ kernels (``csrc/``) with torch.utils.cpp_extension.

The library is built on first use with ninja and cached by torch in
``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``); later imports load the
cached build. The cache is keyed by the CPU capability the build targets (AVX512, AVX2
or DEFAULT), so a cache shared between machines never runs instructions a CPU lacks.
``DISTOPT_CPU_CAPABILITY`` forces a lower capability (for tests and old CPUs).

If no compiler (or ninja) is available, :func:`load` returns False after saying so
once, and distopt runs on its pure-PyTorch reference path.

Flags that the invariants need (DESIGN §3.1, §6): ``-ffp-contract=off`` and no
``-ffast-math`` (every element takes the same IEEE operations in vector and scalar
code), ``-fopenmp`` at compile and link time (``at::parallel_for`` is serial without it).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from pathlib import Path

import torch

_CAPABILITY_FLAGS = {
    "AVX512": [
        "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
        "-DDISTOPT_CPU_AVX512",  # selects csrc/cpu/simd_avx512.h
    ],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "DEFAULT": [],
}
_ORDER = ["DEFAULT", "AVX2", "AVX512"]

_state: dict[str, object] = {}


def csrc_dir() -> Path:
    """Where the C++ sources are: ``csrc/`` beside the package, or ``distopt/_csrc`` installed."""
    spec = importlib.util.find_spec("distopt._csrc")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parent.parent / "csrc"


def cpu_capability() -> str:
    """The capability to build for: the host's, capped by ``DISTOPT_CPU_CAPABILITY``."""
    host = torch.backends.cpu.get_cpu_capability()
    host = host if host in _CAPABILITY_FLAGS else "DEFAULT"
    forced = os.environ.get("DISTOPT_CPU_CAPABILITY", "").upper()
    if forced:
        if forced not in _CAPABILITY_FLAGS:
            raise ValueError(f"DISTOPT_CPU_CAPABILITY={forced!r}: expected one of {sorted(_CAPABILITY_FLAGS)}")
        if _ORDER.index(forced) > _ORDER.index(host):
            raise ValueError(f"DISTOPT_CPU_CAPABILITY={forced} exceeds this CPU's {host}")
        return forced
    return host


def cpu_sources() -> list[str]:
    root = csrc_dir()
    return [str(root / "registration.cpp"), *sorted(str(p) for p in (root / "cpu").glob("*.cpp"))]


def cflags(capability: str) -> list[str]:
    # no -std: torch's own flags name the C++ standard its headers need (C++20 from 2.14)
    return ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-fast-math", *_CAPABILITY_FLAGS[capability]]


def load() -> bool:
    """Build (once) and load the C++ kernels; False if they cannot be built here."""
    if "loaded" in _state:
        return bool(_state["loaded"])
    _state["loaded"] = False
    capability = cpu_capability()  # a bad DISTOPT_CPU_CAPABILITY is the user's error: raise it
    try:
        from torch.utils import cpp_extension

        name = f"distopt_C_{capability.lower()}"
        build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
        if not (build_dir / f"{name}.so").exists():
            print(f"distopt: building the C++ kernels for {capability} (first use only)...", file=sys.stderr)
        cpp_extension.load(
            name=name,
            sources=cpu_sources(),
            extra_cflags=cflags(capability),
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
        _state["loaded"] = True
        _state["capability"] = capability
    except Exception as err:  # no compiler, no ninja, a failed build: the reference path still works
        lines = [line for line in str(err).splitlines() if line.strip()]
        reason = lines[0][:200] if lines else ""
        warnings.warn(
            f"distopt: the C++ kernels could not be built ({type(err).__name__}: {reason}); "
            "using the pure-PyTorch reference path (slower, same results within rounding).",
            RuntimeWarning,
            stacklevel=2,
        )
    return bool(_state["loaded"])
