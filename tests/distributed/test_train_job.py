"""The main job runs under torchrun (FSDP2 on 2 gloo ranks) and on one plain process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--steps", "6", "--log-every", "3", "--data-mb", "0.5", "--width", "64", "--layers", "2"]
SUMMARY = re.compile(r"done: adamw8bit, 6 steps, (\d) rank\(s\), train loss ([\d.]+), eval loss ([\d.]+), .*8-bit\)")


def run(command: list[str]) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_train_job_under_torchrun_with_two_ranks(kernels_built):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    out = run([*torchrun, "launch/train.py", *ARGS])
    match = SUMMARY.search(out)
    assert match and match.group(1) == "2", out
    assert "[" in out and "tok/s" in out and "MB/rank" in out


def test_train_job_on_one_process_gives_the_same_losses_as_two_ranks(kernels_built):
    one = SUMMARY.search(run([sys.executable, "launch/train.py", *ARGS, "--batch-size", "16"]))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    two = SUMMARY.search(run([*torchrun, "launch/train.py", *ARGS]))
    assert one and two
    # the same global batches; FSDP2's gradient reduction sums in another order, so the
    # losses agree closely, not bitwise
    assert abs(float(one.group(2)) - float(two.group(2))) < 0.02
    assert abs(float(one.group(3)) - float(two.group(3))) < 0.02
