"""The JIT build: flags the invariants need, capability selection, and the no-compiler fallback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import distopt
from distopt import _build
from tests.conftest import backend

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
import torch, distopt
torch.manual_seed(0)
p = torch.randn(64, 256, requires_grad=True)
q = torch.randn(300, requires_grad=True)
opt = distopt.AdamW8bit([p, q], min_8bit_size=0)
for k in range(3):
    p.grad, q.grad = torch.randn(64, 256), torch.randn(300)
    opt.step()
print("fused:", distopt.functional.use_fused(torch.device("cpu")))
print("result:", (p.double().sum() + q.double().sum()).item().hex())
"""


def test_flags_keep_every_element_on_the_same_ieee_operations():
    for capability in _build._ORDER:
        flags = _build.cflags(capability)
        assert "-ffp-contract=off" in flags and "-fopenmp" in flags
        assert not any("fast-math" in f and not f.startswith("-fno-") for f in flags)
        assert "-march=native" not in flags


def test_capability_can_be_forced_lower_but_not_higher(monkeypatch):
    monkeypatch.setenv("DISTOPT_CPU_CAPABILITY", "default")
    assert _build.cpu_capability() == "DEFAULT"
    monkeypatch.setenv("DISTOPT_CPU_CAPABILITY", "SSE9")
    with pytest.raises(ValueError, match="DISTOPT_CPU_CAPABILITY"):
        _build.cpu_capability()
    monkeypatch.setattr(_build, "host_capability", lambda: "AVX2")
    monkeypatch.setenv("DISTOPT_CPU_CAPABILITY", "AVX512")
    with pytest.raises(ValueError, match="exceeds"):
        _build.cpu_capability()


def test_vbmi_is_a_level_above_avx512_only_where_the_cpu_has_it(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(_build, "_has_cpu_flag", lambda flag: flag == "avx512vbmi")
    assert _build.host_capability() == "AVX512VBMI"
    monkeypatch.setattr(_build, "_has_cpu_flag", lambda flag: False)  # e.g. Skylake-X
    assert _build.host_capability() == "AVX512"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(_build, "_has_cpu_flag", lambda flag: True)
    assert _build.host_capability() == "AVX2"  # VBMI only refines AVX512
    assert "-mavx512vbmi" in _build.cflags("AVX512VBMI") and "-mavx512vbmi" not in _build.cflags("AVX512")


def test_without_a_compiler_distopt_runs_on_the_reference_path_and_says_so_once(tmp_path):
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-W", "always", "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("could not be built") == 1
    assert "fused: False" in done.stdout
    torch.manual_seed(0)
    p = torch.randn(64, 256, requires_grad=True)
    q = torch.randn(300, requires_grad=True)
    with backend("reference"):
        opt = distopt.AdamW8bit([p, q], min_8bit_size=0)
        for _ in range(3):
            p.grad, q.grad = torch.randn(64, 256), torch.randn(300)
            opt.step()
    assert f"result: {(p.double().sum() + q.double().sum()).item().hex()}" in done.stdout


def test_every_package_and_source_directory_is_installed_by_pyproject():
    """A wheel must carry every distopt package and the C++ sources (as distopt._csrc)."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "distopt").rglob("__init__.py")}
    assert found <= listed, f"not in pyproject's packages: {sorted(found - listed)}"
    source_dirs = {"distopt._csrc" + "".join(f".{part}" for part in d.relative_to(ROOT / "csrc").parts)
                   for d in [ROOT / "csrc", *(p for p in (ROOT / "csrc").iterdir() if p.is_dir())]}  # fmt: skip
    assert source_dirs <= listed and all(config["package-dir"][name] for name in source_dirs)


def test_a_bad_capability_request_is_an_error_not_a_silent_fallback(monkeypatch):
    monkeypatch.setenv("DISTOPT_CPU_CAPABILITY", "AVX9000")
    monkeypatch.setattr(_build, "_state", {})
    with pytest.raises(ValueError, match="DISTOPT_CPU_CAPABILITY"):
        _build.load()


def test_cuda_arch_list_becomes_explicit_gencode_flags(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert _build.cuda_arch_flags() == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
    ]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0 9.0")
    assert _build.cuda_arch_flags() == ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
    assert "--fmad=false" in _build.cuda_cflags()
    with pytest.raises(ValueError, match="TORCH_CUDA_ARCH_LIST"):
        _build.cuda_arch_flags("8.0;sm-90")


def test_cuda_sources_are_built_only_with_a_cuda_torch_and_a_toolkit(monkeypatch, tmp_path):
    names = {Path(p).name for p in _build.cuda_sources()}
    assert "cuda_kernels.cu" in names and "host_harness.cpp" not in names
    assert not names & {Path(p).name for p in _build.cpu_sources()}  # ninja names objects by file name
    monkeypatch.setattr(torch.version, "cuda", None)
    assert _build.cuda_home() is None
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))  # no bin/nvcc there
    monkeypatch.delenv("CUDA_PATH", raising=False)
    expected = "/usr/local/cuda" if Path("/usr/local/cuda/bin/nvcc").exists() else None
    assert _build.cuda_home() == expected
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").touch()
    assert _build.cuda_home() == str(tmp_path)


def test_a_cuda_torch_without_a_toolkit_builds_the_cpu_kernels_and_says_so(monkeypatch, kernels_built):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(_build, "cuda_home", lambda: None)
    monkeypatch.setattr(_build, "_state", {})
    with pytest.warns(RuntimeWarning, match="no CUDA toolkit was found"):
        assert _build.load()
    assert not _build.cuda_loaded()
    assert not distopt._ops.available(torch.device("cuda"))


def test_cuda_kernels_are_used_only_on_gpus_the_arch_list_has_code_for():
    arch = "8.0;9.0+PTX"  # the default
    assert _build.cuda_runs_on((8, 0), arch) and _build.cuda_runs_on((8, 6), arch)  # sm_80 code runs on 8.6
    assert _build.cuda_runs_on((9, 0), arch) and _build.cuda_runs_on((10, 0), arch)  # 9.0 PTX is compiled for 10.0
    assert not _build.cuda_runs_on((7, 0), arch) and not _build.cuda_runs_on((7, 5), arch)  # V100, T4
    assert not _build.cuda_runs_on((10, 0), "8.0;9.0")  # no PTX: nothing for a newer major version
