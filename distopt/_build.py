"""Just-in-time build of distopt's C++ kernels (``csrc/``) with torch.utils.cpp_extension.

The library is built on first use with ninja and cached by torch in
``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``); later imports load the
cached build. The cache is keyed by the CPU capability the build targets (AVX512VBMI,
AVX512, AVX2 or DEFAULT), so a cache shared between machines never runs instructions a
CPU lacks. AVX512VBMI is torch's AVX512 on a CPU that also has the AVX512-VBMI byte
permutes (Ice Lake and later, Zen 4 and later; read from ``/proc/cpuinfo``), which
distopt's 8-bit decode uses.
``DISTOPT_CPU_CAPABILITY`` forces a lower capability (for tests and old CPUs).

If no compiler (or ninja) is available, :func:`load` returns False after saying so
once, and distopt runs on its pure-PyTorch reference path.

CUDA (docs/cuda.md): when torch has CUDA (``torch.version.cuda``) and a CUDA toolkit is
found (``CUDA_HOME``, else ``/usr/local/cuda``; never the ``nvcc`` wrapper on PATH), the
one library also holds ``csrc/cuda/`` and is cached as ``distopt_C_<capability>_cuda``
(``registration.cpp``'s single ``TORCH_LIBRARY`` must be loaded once). It is built for
``TORCH_CUDA_ARCH_LIST`` (default ``8.0;9.0+PTX``) with ``--fmad=false``. Without a
toolkit, or when the CUDA build fails, the CPU-only library is built, with a warning.

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
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DDISTOPT_CPU_AVX2"],  # selects csrc/cpu/simd_avx2.h
    "DEFAULT": [],
}
_CAPABILITY_FLAGS["AVX512VBMI"] = [*_CAPABILITY_FLAGS["AVX512"], "-mavx512vbmi", "-DDISTOPT_CPU_VBMI"]
_ORDER = ["DEFAULT", "AVX2", "AVX512", "AVX512VBMI"]

_state: dict[str, object] = {}


def csrc_dir() -> Path:
    """Where the C++ sources are: ``csrc/`` beside the package, or ``distopt/_csrc`` installed."""
    spec = importlib.util.find_spec("distopt._csrc")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parent.parent / "csrc"


def _has_cpu_flag(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and flag in line.split() for line in f)
    except OSError:  # not Linux: the capability torch reports is the one used
        return False


def host_capability() -> str:
    """The highest capability this CPU runs: torch's, refined to AVX512VBMI where it applies."""
    host = torch.backends.cpu.get_cpu_capability()
    if host == "AVX512" and _has_cpu_flag("avx512vbmi"):
        return "AVX512VBMI"
    return host if host in _CAPABILITY_FLAGS else "DEFAULT"


def cpu_capability() -> str:
    """The capability to build for: the host's, capped by ``DISTOPT_CPU_CAPABILITY``."""
    host = host_capability()
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


DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def cuda_home() -> str | None:
    """The CUDA toolkit to build with when torch has CUDA: ``CUDA_HOME``/``CUDA_PATH``, else
    ``/usr/local/cuda``; None when torch is a CPU build or no ``bin/nvcc`` is there."""
    if not torch.version.cuda:
        return None
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return home
    return None


def cuda_arch_flags(arch_list: str | None = None) -> list[str]:
    """nvcc ``-gencode`` flags for ``TORCH_CUDA_ARCH_LIST`` (``8.0;9.0``, ``+PTX`` adds PTX)."""
    arch_list = arch_list or os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCHS
    flags = []
    for arch in arch_list.replace(" ", ";").split(";"):
        if not arch:
            continue
        num = arch.removesuffix("+PTX").replace(".", "")
        if not num.isalnum():
            raise ValueError(f"TORCH_CUDA_ARCH_LIST: cannot read {arch!r}")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if arch.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def cuda_runs_on(capability: tuple[int, int], arch_list: str | None = None) -> bool:
    """Whether a build for ``arch_list`` (as :func:`cuda_arch_flags` reads it) has code a GPU of
    compute ``capability`` runs: machine code for the same major version and a minor one
    not above it, or PTX for an architecture not above it (the driver compiles it)."""
    arch_list = arch_list or os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCHS
    for arch in arch_list.replace(" ", ";").split(";"):
        if not arch:
            continue
        major, _, minor = arch.removesuffix("+PTX").partition(".")
        built = (int(major), int(minor or 0))
        if built <= capability and (built[0] == capability[0] or arch.endswith("+PTX")):
            return True
    return False


def cuda_sources() -> list[str]:
    root = csrc_dir() / "cuda"
    return sorted(str(p) for p in [*root.glob("*.cu"), *root.glob("*.cpp")] if p.name != "host_harness.cpp")


def cuda_library_headers() -> list[str]:
    """Where the CUDA library headers torch's CUDA headers include (cusparse.h, cublas_v2.h)
    are when the toolkit lacks them: the ``nvidia-*`` wheels torch was installed with."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    return sorted(str(d) for root in spec.submodule_search_locations for d in Path(root).glob("*/include"))


def cuda_cflags() -> list[str]:
    # --fmad=false: no contracted multiply-adds, so each element takes the CPU's operations
    return ["-O3", "--fmad=false", *cuda_arch_flags()]


def _build(name: str, capability: str, cuda: str | None) -> None:
    from torch.utils import cpp_extension

    build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
    if not (build_dir / f"{name}.so").exists():
        what = f"{capability} and CUDA" if cuda else capability
        print(f"distopt: building the C++ kernels for {what} (first use only)...", file=sys.stderr)
    sources = cpu_sources()
    extra = {}
    if cuda:
        cpp_extension.CUDA_HOME = cuda  # read when torch locates nvcc, headers and libraries
        sources = [*sources, *cuda_sources()]
        extra = {"extra_cuda_cflags": cuda_cflags(), "with_cuda": True}
    # searched after the toolkit's own headers: they only fill in the libraries' headers
    after = [f"-idirafter{d}" for d in cuda_library_headers()] if cuda else []
    cpp_extension.load(
        name=name,
        sources=sources,
        extra_cflags=[*cflags(capability), *after],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
        **extra,
    )


def cuda_loaded() -> bool:
    """Whether the loaded library holds the CUDA kernels (call :func:`load` first)."""
    return bool(_state.get("cuda"))


def load() -> bool:
    """Build (once) and load the C++ kernels; False if they cannot be built here."""
    if "loaded" in _state:
        return bool(_state["loaded"])
    _state["loaded"] = False
    capability = cpu_capability()  # a bad DISTOPT_CPU_CAPABILITY is the user's error: raise it
    name = f"distopt_C_{capability.lower()}"
    cuda = cuda_home()
    if torch.version.cuda and cuda is None:
        warnings.warn(
            "distopt: torch has CUDA but no CUDA toolkit was found (set CUDA_HOME); building the CPU kernels only.",
            RuntimeWarning,
            stacklevel=2,
        )
    try:
        if cuda:
            try:
                _build(f"{name}_cuda", capability, cuda)
                _state["cuda"] = True
            except Exception as err:  # a broken toolkit must not cost the CPU kernels
                warnings.warn(
                    f"distopt: the CUDA kernels could not be built ({type(err).__name__}: {_first_line(err)}); "
                    "building the CPU kernels only.",
                    RuntimeWarning,
                    stacklevel=2,
                )
        if not _state.get("cuda"):
            _build(name, capability, None)
        _state["loaded"] = True
        _state["capability"] = capability
    except Exception as err:  # no compiler, no ninja, a failed build: the reference path still works
        warnings.warn(
            f"distopt: the C++ kernels could not be built ({type(err).__name__}: {_first_line(err)}); "
            "using the pure-PyTorch reference path (slower, same results within rounding).",
            RuntimeWarning,
            stacklevel=2,
        )
    return bool(_state["loaded"])


def _first_line(err: Exception) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[0][:200] if lines else ""
