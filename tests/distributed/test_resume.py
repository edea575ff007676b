"""Crash-safe checkpoints: ``distopt.checkpoint`` in one process, and the main job killed and resumed.

The properties: a checkpoint directory is complete or invisible (``.partial``); an
incomplete or truncated checkpoint is refused before anything is loaded, with an error
that names the checkpoint to fall back to; every rank resumes from the same one; and a
resumed run prints the same losses and ends with the same parameters, bit for bit, as
an uninterrupted run.

Run as a script, this file is the torchrun entry point of the crash test: it runs
``launch/train.py`` with rank 1 held (asleep, until killed) right after its DCP files of
one checkpoint are written, so the test kills it at a known point, mid-run and mid-save,
with no race against the run's end.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from distopt import checkpoint  # noqa: E402
from tests.conftest import threads  # noqa: E402

TRAIN = str(ROOT / "launch" / "train.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
ARGS = ["--steps", "12", "--log-every", "3", "--width", "64", "--layers", "2", "--data-mb", "0.5", "--checksum"]
CLIPPED = [*ARGS, "--percentile-clipping", "95"]  # the gradient-norm histories are in the checkpoint too
HOLD_ENV = "DISTOPT_TEST_HOLD"  # "<checkpoint directory name>:<marker file>"


# --- one process: the checkpoint module ----------------------------------------------------------------------


def make(seed: int = 0):
    import distopt

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.LayerNorm(128), torch.nn.Linear(128, 64))
    return model, distopt.AdamW8bit(model.parameters(), lr=1e-2, min_8bit_size=1024, percentile_clipping=90)


def train(model, opt, steps: range) -> None:
    for step in steps:
        x = torch.randn(8, 64, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def state_of(model, opt) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, opt)
    return {"model": model_state, "optimizer": optim_state, "loop": {"next_step": -1}}


def snapshot(model, opt) -> list[torch.Tensor]:
    tensors = [p.detach().clone() for p in model.parameters()]
    return tensors + [s[k].clone() for s in opt.state.values() for k in sorted(s) if torch.is_tensor(s[k])]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b))


def saved_run(root: Path, steps=(2, 4)) -> tuple:
    """A model trained for max(steps) steps with a checkpoint after each of ``steps``."""
    model, opt = make()
    done = 0
    for step in steps:
        train(model, opt, range(done, step))
        done = step
        state = state_of(model, opt)
        state["loop"]["next_step"] = step
        checkpoint.save(root, step, state, rank_state={"rng": torch.get_rng_state(), "step": step})
    return model, opt


def test_save_makes_a_complete_directory_only_at_the_end(tmp_path):
    saved_run(tmp_path, steps=(3,))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003"]
    files = sorted(p.name for p in (tmp_path / "step_00000003").iterdir())
    assert files == [".metadata", "__0_0.distcp", "manifest.json", "rank_00000.pt"]
    checkpoint.verify(tmp_path / "step_00000003")
    assert checkpoint.latest(tmp_path) == tmp_path / "step_00000003"


def test_load_restores_model_optimizer_and_rank_state_bitwise(tmp_path):
    from torch.distributed.checkpoint.state_dict import set_state_dict

    model, opt = saved_run(tmp_path, steps=(3,))
    train(model, opt, range(3, 6))
    fresh, fresh_opt = make(seed=1)
    state = state_of(fresh, fresh_opt)
    mine = checkpoint.load(checkpoint.latest(tmp_path), state)
    set_state_dict(fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    assert state["loop"]["next_step"] == 3 and mine["step"] == 3 and mine["rng"].dtype == torch.uint8
    assert {v.dtype for s in fresh_opt.state.values() for v in s.values()} >= {torch.uint8, torch.float32}
    train(fresh, fresh_opt, range(3, 6))
    assert same(snapshot(fresh, fresh_opt), snapshot(model, opt))


def test_latest_never_picks_a_partial_directory(tmp_path):
    saved_run(tmp_path)
    shutil.copytree(tmp_path / "step_00000004", tmp_path / "step_00000009.partial")  # complete to DCP's eye
    assert checkpoint.latest(tmp_path) == tmp_path / "step_00000004"
    with pytest.raises(checkpoint.CheckpointError, match=r"never completed.*fall back to \S*step_00000004") as e:
        checkpoint.verify(tmp_path / "step_00000009.partial")
    assert e.value.fallback == tmp_path / "step_00000004"


def truncate(path: Path, keep: float = 0.5) -> None:
    with open(path, "r+b") as f:
        f.truncate(int(path.stat().st_size * keep))


def test_a_truncated_data_file_is_refused_before_loading_and_the_error_names_the_fallback(tmp_path):
    saved_run(tmp_path)
    bad = tmp_path / "step_00000004"
    truncate(bad / "__0_0.distcp")
    with pytest.warns(RuntimeWarning, match=r"skipping \S*step_00000004: its data file __0_0.distcp is truncated"):
        assert checkpoint.latest(tmp_path) == tmp_path / "step_00000002"
    model, opt = make(seed=1)
    state = state_of(model, opt)  # references to the live tensors: dcp.load would write into them
    before = snapshot(model, opt)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load(bad, state)
    message = str(e.value)
    assert str(bad) in message and "truncated" in message and f"fall back to {tmp_path / 'step_00000002'}" in message
    assert e.value.path == bad and e.value.fallback == tmp_path / "step_00000002"
    assert same(snapshot(model, opt), before), "a refused checkpoint changed the live state"


def test_damage_that_only_dcp_can_find_is_a_checkpoint_error_naming_the_fallback(tmp_path):
    saved_run(tmp_path)
    data = tmp_path / "step_00000004" / "__0_0.distcp"
    with open(data, "r+b") as f:  # the right length, wrong bytes: verify cannot tell
        f.write(b"\xff" * 64)
    checkpoint.verify(tmp_path / "step_00000004")
    model, opt = make(seed=1)
    with pytest.raises(checkpoint.CheckpointError, match=r"failed half-way.*load \S*step_00000002") as e:
        checkpoint.load(tmp_path / "step_00000004", state_of(model, opt))
    assert e.value.fallback == tmp_path / "step_00000002"


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda d: (d / "__0_0.distcp").unlink(), "data file __0_0.distcp is missing"),
        (lambda d: (d / ".metadata").unlink(), "metadata file .metadata is missing"),
        (lambda d: truncate(d / ".metadata"), "metadata file .metadata is unreadable"),
        (lambda d: (d / "manifest.json").unlink(), "has no manifest.json"),
        (lambda d: (d / "rank_00000.pt").unlink(), "rank file rank_00000.pt is missing"),
        (lambda d: truncate(d / "rank_00000.pt", 0.9), "rank file rank_00000.pt differs from the manifest"),
    ],
    ids=["data-missing", "metadata-missing", "metadata-truncated", "manifest-missing", "rank-missing", "rank-short"],
)
def test_every_kind_of_damage_is_refused_with_what_is_wrong(tmp_path, damage, problem):
    saved_run(tmp_path)
    damage(tmp_path / "step_00000004")
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(problem)):
        checkpoint.verify(tmp_path / "step_00000004")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert checkpoint.latest(tmp_path) == tmp_path / "step_00000002"


def test_the_error_says_when_there_is_no_checkpoint_to_fall_back_to(tmp_path):
    saved_run(tmp_path, steps=(2,))
    truncate(tmp_path / "step_00000002" / "__0_0.distcp")
    with pytest.raises(checkpoint.CheckpointError, match="no complete older checkpoint") as e:
        checkpoint.verify(tmp_path / "step_00000002")
    assert e.value.fallback is None
    with pytest.warns(RuntimeWarning):
        assert checkpoint.latest(tmp_path) is None
    assert checkpoint.latest(tmp_path / "missing") is None


def test_save_replaces_the_same_step_removes_stale_partials_and_keeps_the_last_n(tmp_path):
    saved_run(tmp_path, steps=(2,))
    (tmp_path / "step_00000007.partial").mkdir()  # left by a crash
    model, opt = make(seed=3)
    checkpoint.save(tmp_path, 2, state_of(model, opt))  # no rank state this time
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002"]
    assert not (tmp_path / "step_00000002" / "rank_00000.pt").exists()
    for step in (4, 6):
        checkpoint.save(tmp_path, step, state_of(model, opt), keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004", "step_00000006"]
    with pytest.raises(ValueError, match="keep_last"):
        checkpoint.save(tmp_path, 8, state_of(model, opt), keep_last=0)


def test_pruning_keeps_the_new_checkpoint_and_counts_only_good_older_ones(tmp_path):
    model, opt = make()
    for step in (2, 4, 12):
        checkpoint.save(tmp_path, step, state_of(model, opt))
    truncate(tmp_path / "step_00000012" / "__0_0.distcp")  # damaged, and newer than what comes next
    checkpoint.save(tmp_path, 8, state_of(model, opt), keep_last=2)  # as after a resume from step 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004", "step_00000008", "step_00000012"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert checkpoint.latest(tmp_path).name == "step_00000008"


def test_rank_state_that_could_not_be_read_back_is_refused_at_save(tmp_path):
    import numpy as np

    model, opt = make()
    with pytest.raises(checkpoint.CheckpointError, match="rank_state must hold only"):
        checkpoint.save(tmp_path, 1, state_of(model, opt), rank_state={"numpy_rng": np.random.get_state()})
    assert checkpoint.latest(tmp_path) is None


def test_a_checkpoint_that_does_not_fit_the_live_state_is_refused_before_anything_is_loaded(tmp_path):
    import distopt

    saved_run(tmp_path, steps=(2,))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.LayerNorm(128), torch.nn.Linear(128, 64))
    opt = distopt.AdamW32bit(model.parameters(), lr=1e-2, percentile_clipping=90)  # 32-bit: fp32 where uint8 was saved
    train(model, opt, range(1))
    before = snapshot(model, opt)
    with pytest.raises(checkpoint.CheckpointError, match="does not fit the state.*torch.uint8.*torch.float32"):
        checkpoint.load(tmp_path / "step_00000002", state_of(model, opt))
    assert same(snapshot(model, opt), before)


def two_ranks_save_load_and_fail(rank: int, world: int, root: str) -> dict:
    import torch.distributed as dist

    root, result = Path(root), {}
    path = checkpoint.save(root, 1, {"w": torch.arange(4.0)}, rank_state={"rank": rank})
    result["rank_state"] = checkpoint.load(path, {"w": torch.zeros(4)})
    try:  # rank 1's state cannot be pickled: no rank may commit, none may wait for the other
        checkpoint.save(root, 2, {"w": torch.arange(4.0)}, rank_state={"f": lambda: 0} if rank == 1 else {})
    except checkpoint.CheckpointError as e:
        result["save_error"] = str(e)
    if rank == 0:
        truncate(path / "__0_0.distcp")
    dist.barrier()
    try:  # only rank 0 verifies; rank 1 must refuse too rather than enter dcp.load alone
        checkpoint.load(path, {"w": torch.zeros(4)})
    except checkpoint.CheckpointError as e:
        result["load_error"] = str(e)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result["latest"] = checkpoint.latest(root)
    return result


def test_two_ranks_get_their_own_rank_state_and_agree_on_every_failure(tmp_path):
    from tests.distributed import harness

    results = harness.run(two_ranks_save_load_and_fail, 2, str(tmp_path))
    assert [r["rank_state"] for r in results] == [{"rank": 0}, {"rank": 1}]
    assert all("rank 1 could not write its rank state" in r["save_error"] for r in results), results
    assert all("__0_0.distcp is truncated" in r["load_error"] for r in results), results
    assert results[0]["load_error"] == results[1]["load_error"]
    assert [r["latest"] for r in results] == [None, None]
    assert not (tmp_path / "step_00000002").exists() and (tmp_path / "step_00000002.partial").is_dir()


# --- the main job ----------------------------------------------------------------------------------------------


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def succeeded(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def losses(out: str) -> dict[int, str]:
    """The printed train loss of each progress line, by step."""
    return {int(step): loss for step, loss in re.findall(r"\] +(\d+)/\d+  loss ([\d.]+)", out)}


def outcome(out: str) -> tuple[str, str, str]:
    """(train loss, eval loss, parameter checksum) as printed."""
    summary = re.search(r"done: .*train loss ([\d.]+), eval loss ([\d.]+),", out)
    checksum = re.search(r"parameters sha256 ([0-9a-f]{64})", out)
    assert summary and checksum, out
    return summary.group(1), summary.group(2), checksum.group(1)


def train_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train", TRAIN)
    module = sys.modules["train"] = importlib.util.module_from_spec(spec)  # inspect finds its source there
    spec.loader.exec_module(module)
    return module


def test_one_process_resume_skips_a_truncated_checkpoint_and_continues_exactly(kernels_built, tmp_path):
    ckpt = ["--save-every", "4", "--checkpoint-dir", str(tmp_path / "ckpt")]
    full = succeeded(run([sys.executable, TRAIN, *ARGS, *ckpt, "--resume"], tmp_path))
    assert "no complete checkpoint" in full and "starting fresh" in full
    with threads(torch.get_num_threads()), pytest.raises(SystemExit, match="pass --resume"):
        train_module().main([*ARGS, *ckpt])  # a fresh run would mix its checkpoints with that run's
    other = run([sys.executable, TRAIN, *ARGS, *ckpt, "--resume", "--width", "32"], tmp_path)
    assert other.returncode != 0 and "was written with other settings: width 64 (now 32)" in other.stderr, other.stderr
    shutil.rmtree(tmp_path / "ckpt" / "step_00000012")
    truncate(tmp_path / "ckpt" / "step_00000008" / "__0_0.distcp")
    done = run([sys.executable, TRAIN, *ARGS, *ckpt, "--resume"], tmp_path)
    resumed = succeeded(done)
    assert "skipping" in done.stderr and "step_00000008: its data file __0_0.distcp is truncated" in done.stderr
    assert "resumed from" in resumed and "step_00000004: next step 4" in resumed
    assert losses(resumed) == {k: v for k, v in losses(full).items() if k > 4}
    assert outcome(resumed) == outcome(full)


def test_killed_rank_resumes_from_the_last_complete_checkpoint_exactly(kernels_built, tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    ckpt = ["--save-every", "4", "--checkpoint-dir", str(ckpt_dir)]
    full = succeeded(run([*TORCHRUN, TRAIN, *CLIPPED], tmp_path))  # no checkpoints: saving must not change a run

    kill_rank_one_during_save(tmp_path, [*CLIPPED, *ckpt], "step_00000008.partial")
    assert checkpoint.latest(ckpt_dir) == ckpt_dir / "step_00000004"
    partial = ckpt_dir / "step_00000008.partial"
    assert (partial / ".metadata").is_file() and not (partial / "manifest.json").exists(), "killed before the commit"

    resumed = succeeded(run([*TORCHRUN, TRAIN, *CLIPPED, *ckpt, "--resume"], tmp_path))
    assert f"resumed from {ckpt_dir / 'step_00000004'}: next step 4" in resumed
    assert losses(resumed) == {k: v for k, v in losses(full).items() if k > 4}
    assert outcome(resumed) == outcome(full)
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["step_00000004", "step_00000008", "step_00000012"]


def kill_rank_one_during_save(tmp_path: Path, args: list[str], held: str) -> None:
    """Run the job under torchrun with rank 1 held inside the save of ``held``, SIGKILL that worker, wait."""
    marker = tmp_path / "held"
    log_path = tmp_path / "crashed-run.log"
    log = open(log_path, "w")
    env = {**os.environ, "PYTHONPATH": str(ROOT), HOLD_ENV: f"{held}:{marker}"}
    command = [*TORCHRUN, __file__, *args]
    job = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert job.poll() is None, "the job ended before rank 1 was held:\n" + log_path.read_text()
            assert time.monotonic() < deadline, "rank 1 was never held"
            time.sleep(0.05)
        worker = torch_worker(job.pid, rank=1)
        assert worker.pid == int(marker.read_text())
        worker.send_signal(signal.SIGKILL)
        assert job.wait(timeout=120) != 0, "the job survived the loss of a rank"
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
        log.close()


def torch_worker(launcher_pid: int, rank: int):
    """The worker process of ``rank`` among torchrun's children."""
    import psutil

    workers = [p for p in psutil.Process(launcher_pid).children(recursive=True) if "python" in p.name().lower()]
    matches = [p for p in workers if p.environ().get("RANK") == str(rank)]
    assert len(matches) == 1, [(p.pid, p.cmdline()) for p in workers]
    return matches[0]


def hold_one_rank_in_dcp_save(held: str, marker: str) -> None:
    """Make rank 1 sleep, until killed, once its DCP files of the checkpoint directory named ``held`` are written."""
    import torch.distributed.checkpoint as dcp

    real_save = dcp.save

    def save(state_dict, *, checkpoint_id, **kwargs):
        result = real_save(state_dict, checkpoint_id=checkpoint_id, **kwargs)
        if Path(checkpoint_id).name == held and os.environ.get("RANK") == "1":
            Path(f"{marker}.tmp").write_text(str(os.getpid()))
            os.rename(f"{marker}.tmp", marker)
            time.sleep(600)
        return result

    dcp.save = save


if __name__ == "__main__":
    import runpy

    held_name, marker_path = os.environ[HOLD_ENV].split(":", 1)
    hold_one_rank_in_dcp_save(held_name, marker_path)
    sys.argv = [TRAIN, *sys.argv[1:]]
    runpy.run_path(TRAIN, run_name="__main__")
