"""Test configuration: the backend switch and the rule that only GPU and peer tests may skip."""

from __future__ import annotations

import contextlib
import importlib.util

import pytest
import torch

import distopt
from distopt import _ops

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device; none is present"))
        if "peer" in item.keywords and not HAS_BNB:
            item.add_marker(pytest.mark.skip(reason="bitsandbytes (test extra 'peers') is not installed"))


_ALLOWED_SKIPS = ("needs a CUDA device", "bitsandbytes (test extra 'peers') is not installed")
_unexpected_skips: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped:
        reason = str(report.longrepr[2]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not any(allowed in reason for allowed in _ALLOWED_SKIPS):
            _unexpected_skips.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session, exitstatus):
    if _unexpected_skips:
        print("\nSkips other than GPU and peer tests count as failures:\n" + "\n".join(_unexpected_skips))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@contextlib.contextmanager
def backend(name: str):
    old = distopt.get_backend()
    distopt.set_backend(name)
    try:
        yield
    finally:
        distopt.set_backend(old)


@pytest.fixture(scope="session")
def kernels_built() -> bool:
    built = _ops.available(torch.device("cpu"))
    assert built, "the C++ kernels failed to build; the fused tests cannot run"
    return built


@contextlib.contextmanager
def threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
