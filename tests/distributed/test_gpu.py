"""The main job on GPUs: FSDP2 over nccl (skipped, with that reason, where no CUDA device is present).

CUDA tensors take distopt's CUDA kernels where the library was built with them (docs/cuda.md).
"""

from __future__ import annotations

import sys

import pytest
import torch

from tests.distributed.test_train_job import ARGS, SUMMARY, run


@pytest.mark.gpu
def test_train_job_under_torchrun_with_nccl_on_cuda():
    ranks = min(2, torch.cuda.device_count())
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
    out = run([*torchrun, "launch/train.py", *ARGS, "--device", "cuda"])
    match = SUMMARY.search(out)
    assert match and match.group(1) == str(ranks), out
    assert "on cuda" in out
