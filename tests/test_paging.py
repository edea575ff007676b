"""Paged state (distopt.paging): spill files on CPU, the CUDA choice and prefetch logic with
mocked ops, bitwise equality with unpaged runs, release of pages, checkpoints, bad input."""

from __future__ import annotations

import copy
import errno
import gc
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import distopt
from distopt import checkpoint, paging
from distopt.distributed.sharding import local
from tests.registry import CASES, SHAPES, make_grads, make_params, run_steps

ADAMW_CASES = [c for c in CASES if not c.is_sgd]


def paged_like(case, params, spill_dir, **kw):
    if case.cls.__name__.startswith("Paged"):
        return case.make(params, spill_dir=spill_dir, **kw)
    return case.make(params, is_paged=True, spill_dir=spill_dir, **kw)


def unpaged_like(case, params):
    cls = {distopt.PagedAdamW8bit: distopt.AdamW8bit, distopt.PagedAdamW32bit: distopt.AdamW32bit}.get(case.cls)
    if cls is None:
        return case.make(params)
    return cls(params, **{"min_8bit_size": 64, **case.kwargs})


def snapshot(opt, params) -> list[torch.Tensor]:
    out = [p.detach().clone() for p in params]
    return out + [s[k].clone() for p in params for s in [opt.state[p]] for k in sorted(s)]


def bitwise_equal(a, b) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b))


def spill_mappings(spill_dir) -> list[str]:
    """This process's mappings of (deleted) distopt spill files in ``spill_dir``."""
    prefix = os.path.join(os.path.realpath(spill_dir), paging.FILE_PREFIX)
    with open("/proc/self/maps") as maps:
        return [line for line in maps if prefix in line and line.rstrip().endswith("(deleted)")]


def slot_tensors(opt):
    return [local(v) for s in opt.state.values() for k, v in s.items() if opt._is_slot(k) and v.numel()]


@pytest.mark.parametrize("case", ADAMW_CASES, ids=str)
def test_paged_state_is_spilled_and_bitwise_equal_to_unpaged(case, tmp_path):
    ref_params, params = make_params(SHAPES), make_params(SHAPES)
    ref, opt = unpaged_like(case, ref_params), paged_like(case, params, tmp_path)
    run_steps(ref, ref_params, 4)
    run_steps(opt, params, 4)
    assert bitwise_equal(snapshot(opt, params), snapshot(ref, ref_params))
    assert slot_tensors(opt) and all(opt.pager.is_spilled(t) for t in slot_tensors(opt))
    assert not any(opt.pager.is_spilled(s["step"]) for s in opt.state.values())
    assert os.listdir(tmp_path) == []  # unlinked once mapped: nothing is left behind


def test_spill_files_are_named_per_process_and_rank_and_unmapped_on_close(tmp_path):
    params = make_params([(64, 256), (32, 300)])
    opt = distopt.PagedAdamW8bit(params, spill_dir=tmp_path, min_8bit_size=64)
    run_steps(opt, params, 1)
    maps = spill_mappings(tmp_path)
    assert len(maps) == len(slot_tensors(opt)) == 8  # one file per tensor: 2 parameters x 2 slots x (codes, absmax)
    assert all(f"{paging.FILE_PREFIX}{os.getpid()}-rank0-" in line for line in maps)
    with opt:
        pass
    gc.collect()
    assert spill_mappings(tmp_path) == [] and not opt.state
    with pytest.raises(RuntimeError, match="closed PagedAdamW8bit"):
        opt.step()
    with pytest.raises(RuntimeError, match="closed"):
        opt.load_state_dict({"state": {}, "param_groups": []})


def mapped_file_kib() -> int:
    """Resident pages of file mappings (spill files count here; gradients, anonymous, do not)."""
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return sum(int(fields[k].split()[0]) for k in ("RssFile", "RssShmem"))


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps, d: distopt.PagedAdamW32bit(ps, spill_dir=d),  # 2 x 8 MiB per parameter
        lambda ps, d: distopt.PagedAdamW8bit(ps, spill_dir=d, block_wise=False),  # + the new-absmax pass
    ],
    ids=["32bit", "8bit-tensorwise-absmax"],
)
def test_pages_are_released_after_each_update(tmp_path, monkeypatch, make_opt):
    params = make_params([(2048, 1024)] * 4)
    opt = make_opt(params, tmp_path)
    run_steps(opt, params, 1)
    state_kib = sum(t.numel() * t.element_size() for t in slot_tensors(opt)) // 1024
    before = mapped_file_kib()
    run_steps(opt, params, 2)
    assert mapped_file_kib() - before < state_kib // 8  # the state is not resident after step()
    monkeypatch.setattr(opt.pager, "release", lambda tensors: None)
    run_steps(opt, params, 1)
    assert mapped_file_kib() - before > state_kib * 3 // 4  # without the release, it would be


def test_step_maps_the_current_reads_ahead_the_next_and_releases_each_after_its_update(tmp_path, monkeypatch):
    params = make_params([(64, 256), (32, 300), (16, 256)])
    opt = distopt.PagedAdamW8bit(params, spill_dir=tmp_path, min_8bit_size=64)
    run_steps(opt, params, 1)
    events = []
    sizes = {p: {t.data_ptr() for t in slot_tensors_of(opt, p)} for p in params}
    owner = {ptr: i for i, p in enumerate(params) for ptr in sizes[p]}
    monkeypatch.setattr(
        opt.pager,
        "prefetch",
        lambda now, ahead, device: events.append(("fetch", owners(now, owner), owners(ahead, owner))),
    )
    monkeypatch.setattr(opt.pager, "release", lambda ts: events.append(("release", owners(ts, owner))))
    run_steps(opt, params, 1)
    assert events == [
        ("fetch", [0], [1]),
        ("release", [0]),
        ("fetch", [1], [2]),
        ("release", [1]),
        ("fetch", [2], []),
        ("release", [2]),
    ]


def slot_tensors_of(opt, p):
    return [local(v) for k, v in opt.state[p].items() if opt._is_slot(k)]


def owners(tensors, owner) -> list[int]:
    return sorted({owner[t.data_ptr()] for t in tensors})


def test_load_state_dict_pages_the_state_again_bitwise(tmp_path):
    params = make_params(SHAPES)
    opt = distopt.PagedAdamW8bit(params, spill_dir=tmp_path, min_8bit_size=64, percentile_clipping=5)
    run_steps(opt, params, 3)
    saved = copy.deepcopy(opt.state_dict())  # plain tensors: nothing of it is paged
    assert not any(opt.pager.is_spilled(v) for s in saved["state"].values() for v in s.values())
    fresh_params = [p.detach().clone().requires_grad_() for p in params]
    fresh = distopt.PagedAdamW8bit(fresh_params, spill_dir=tmp_path, min_8bit_size=64, percentile_clipping=5)
    fresh.load_state_dict(saved)
    assert slot_tensors(fresh) and all(fresh.pager.is_spilled(t) for t in slot_tensors(fresh))
    assert bitwise_equal(snapshot(fresh, fresh_params), snapshot(opt, params))
    run_steps(opt, params, 2, first_seed=200)
    run_steps(fresh, fresh_params, 2, first_seed=200)
    assert bitwise_equal(snapshot(fresh, fresh_params), snapshot(opt, params))


def test_checkpoint_round_trip_keeps_paged_state_bitwise(tmp_path):
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def make(seed):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 8))
        return model, distopt.PagedAdamW8bit(model.parameters(), spill_dir=tmp_path / "spill", min_8bit_size=64)

    def train(model, opt, steps):
        for step in steps:
            x = torch.randn(16, 64, generator=torch.Generator().manual_seed(step))
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()

    (tmp_path / "spill").mkdir()
    model, opt = make(0)
    train(model, opt, range(3))
    model_state, optim_state = get_state_dict(model, opt)
    checkpoint.save(tmp_path / "ckpt", 3, {"model": model_state, "optimizer": optim_state})
    other, other_opt = make(1)
    train(other, other_opt, range(1))  # live paged state that dcp.load overwrites in place
    model_state, optim_state = get_state_dict(other, other_opt)
    state = {"model": model_state, "optimizer": optim_state}
    checkpoint.load(checkpoint.latest(tmp_path / "ckpt"), state)
    set_state_dict(other, other_opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    assert all(other_opt.pager.is_spilled(t) for t in slot_tensors(other_opt))
    train(model, opt, range(3, 5))
    train(other, other_opt, range(3, 5))
    assert bitwise_equal(snapshot(other_opt, list(other.parameters())), snapshot(opt, list(model.parameters())))


def test_benchmark_paged_resident_growth_is_under_a_quarter_of_the_state_and_bits_equal(tmp_path):
    script = Path(__file__).resolve().parents[1] / "launch" / "paging_bench.py"
    argv = [sys.executable, str(script), "--state-mib", "256", "--steps", "3", "--spill-dir", str(tmp_path), "--json"]
    result = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True, timeout=600).stdout)
    assert result["bitwise_equal"]
    assert result["paged"]["state_bytes"] == result["unpaged"]["state_bytes"] >= 255 << 20
    assert result["unpaged"]["growth_over_state"] > 0.9  # the measurement sees unpaged state
    assert result["paged"]["growth_over_state"] < 0.25
    assert result["slowdown"] > 0 and os.listdir(tmp_path) == []


# --- bad input ---------------------------------------------------------------------------------


def test_bad_spill_dirs_are_refused_naming_the_argument(tmp_path, monkeypatch):
    params = make_params([(8, 8)])
    with pytest.raises(ValueError, match="Invalid spill_dir: .* does not exist"):
        distopt.PagedAdamW(params, spill_dir=tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="Invalid spill_dir: .* is not a directory"):
        distopt.PagedAdamW(params, spill_dir=tmp_path / "file")
    with pytest.raises(ValueError, match="Invalid spill_dir: cannot create files in '/proc'"):
        distopt.PagedAdamW(params, spill_dir="/proc")  # a directory no one, root included, can write
    with pytest.raises(TypeError, match="spill_dir"):
        distopt.PagedAdamW(params, spill_dir=3)
    monkeypatch.setenv(paging.ENV_VAR, str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"Invalid \$DISTOPT_SPILL_DIR"):
        distopt.PagedAdamW(params)
    monkeypatch.setenv(paging.ENV_VAR, str(tmp_path))
    assert distopt.PagedAdamW(params).pager.spill_dir == os.path.realpath(tmp_path)


def test_a_full_disk_is_an_error_at_allocation_and_nothing_is_lost(tmp_path, monkeypatch):
    params = make_params([(64, 256), (32, 300), (16, 256)])
    opt = distopt.PagedAdamW8bit(params, spill_dir=tmp_path, min_8bit_size=64)
    before = [p.detach().clone() for p in params]
    real, calls = os.posix_fallocate, []

    def fallocate(fd, offset, length):
        calls.append(length)
        if len(calls) > 8:  # the third parameter's first slot (4 tensors per parameter): two already allocated
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    with pytest.raises(paging.PagingError, match=r"not enough disk space .*\['params'\]\[2\].*'exp_avg'.*spill_dir"):
        run_steps(opt, params, 1)
    assert not any(opt.state.get(p) for p in params)  # no state at all, no step taken
    assert bitwise_equal([p.detach() for p in params], before)
    assert os.listdir(tmp_path) == [] and spill_mappings(tmp_path) == []
    monkeypatch.setattr(os, "posix_fallocate", real)
    run_steps(opt, params, 1)  # space again: the same step runs
    assert all(int(opt.state[p]["step"]) == 1 for p in params)


def test_a_spill_dir_that_disappears_is_an_error_at_allocation(tmp_path):
    spill = tmp_path / "spill"
    spill.mkdir()
    params = make_params([(64, 256)])
    opt = distopt.PagedAdamW8bit(params, spill_dir=spill, min_8bit_size=64)
    spill.rmdir()
    with pytest.raises(paging.PagingError, match=r"cannot create a spill file for .*\['params'\]\[0\].*spill_dir"):
        run_steps(opt, params, 1)
    assert not opt.state.get(params[0])


def test_a_spill_dir_in_ram_is_warned_about_once():
    assert paging.filesystem_type("/dev/shm") == "tmpfs"  # on Linux, always
    paging._warned_dirs.discard("/dev/shm")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        distopt.PagedAdamW(make_params([(8, 8)]), spill_dir="/dev/shm")
        distopt.PagedAdamW(make_params([(8, 8)]), spill_dir="/dev/shm")
    messages = [str(w.message) for w in caught if "tmpfs" in str(w.message)]
    assert len(messages) == 1 and "'/dev/shm'" in messages[0] and "saves no memory" in messages[0]


# --- CUDA: the choice of memory and the prefetch, with the two ops mocked ---------------------------


def test_cuda_state_is_managed_memory_filled_and_prefetched_to_its_device(tmp_path, monkeypatch):
    from distopt import _ops

    calls = []

    def managed_empty(shape, dtype, device):
        calls.append(("empty", shape, dtype, device))
        return torch.empty(shape, dtype=dtype)  # stands for managed memory on ``device``

    monkeypatch.setattr(_ops, "managed_empty", managed_empty, raising=False)
    pager = paging.Pager(tmp_path)
    t = pager.new((4, 256), torch.uint8, 127, torch.device("cuda", 1), "p's 'exp_avg'")
    assert calls == [("empty", (4, 256), torch.uint8, torch.device("cuda", 1))]
    assert bool((t == 127).all()) and not pager.is_spilled(t)

    class FakeCuda:
        device = torch.device("cuda", 1)

        def numel(self):
            return 1

    prefetched = []
    monkeypatch.setattr(_ops, "managed_prefetch", lambda x, d: prefetched.append((x, d)), raising=False)
    fake = FakeCuda()
    ahead = FakeCuda()
    pager.prefetch([fake], [ahead], torch.device("cuda", 1))
    pager.release([t])  # CUDA pages are the driver's: nothing happens, nothing fails
    assert prefetched == [(fake, torch.device("cuda", 1)), (ahead, torch.device("cuda", 1))]


def test_cuda_state_without_the_managed_ops_is_a_clear_error(tmp_path, monkeypatch):
    from distopt import _ops

    monkeypatch.delattr(_ops, "managed_empty", raising=False)
    with pytest.raises(paging.PagingError, match=r"p's 'exp_avg'.*distopt._ops.managed_empty"):
        paging.Pager(tmp_path).new((4, 256), torch.uint8, 127, torch.device("cuda"), "p's 'exp_avg'")


@pytest.mark.gpu
def test_paged_state_on_cuda_is_managed_and_bitwise_equal_to_unpaged():
    shapes = [(64, 256), (33, 300), (300,)]
    ref_params = [p.detach().cuda().requires_grad_() for p in make_params(shapes)]
    params = [p.detach().cuda().requires_grad_() for p in make_params(shapes)]
    ref = distopt.AdamW8bit(ref_params, min_8bit_size=64)
    opt = distopt.PagedAdamW8bit(params, min_8bit_size=64)
    for step in range(3):
        for ps, o in ((ref_params, ref), (params, opt)):
            for p, g in zip(ps, make_grads(ps, 100 + step)):
                p.grad = g.cuda()
            o.step()
    assert bitwise_equal(snapshot(opt, params), snapshot(ref, ref_params))
    assert all(t.is_cuda for t in slot_tensors(opt))
    saved = copy.deepcopy(opt.state_dict())
    fresh = distopt.PagedAdamW8bit(params, min_8bit_size=64)
    fresh.load_state_dict(saved)
    assert bitwise_equal(snapshot(fresh, params), snapshot(opt, params))


def test_populate_falls_back_to_read_ahead_on_kernels_without_it(tmp_path, monkeypatch):
    pager = paging.Pager(tmp_path)
    t = pager.new((256, 1024), torch.float32, 0, torch.device("cpu"), "p")
    advised = []

    def madvise(tensor, advice):
        advised.append(advice)
        if advice == paging.MADV_POPULATE_WRITE:
            raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(paging, "_can_populate", True)
    monkeypatch.setattr(paging, "_madvise", madvise)
    pager.prefetch([t], [t], torch.device("cpu"))
    pager.prefetch([t], [], torch.device("cpu"))
    assert advised == [paging.MADV_POPULATE_WRITE, paging.MADV_WILLNEED, paging.MADV_WILLNEED, paging.MADV_WILLNEED]


def test_a_failed_page_hint_warns_and_the_step_completes_bitwise(tmp_path, monkeypatch):
    """madvise failing mid-step (read-ahead or release) must not leave a half-applied step."""
    params, ref = make_params([(64, 256), (32, 300)]), make_params([(64, 256), (32, 300)])
    opt = distopt.PagedAdamW8bit(params, spill_dir=tmp_path, min_8bit_size=64)
    plain = distopt.AdamW8bit(ref, min_8bit_size=64)
    run_steps(opt, params, 1)
    run_steps(plain, ref, 1)

    def failing(t, advice):
        raise OSError(errno.EIO, "simulated EIO from madvise")

    monkeypatch.setattr(paging, "_madvise", failing)
    monkeypatch.setattr(paging, "_warned_hints", set())
    with pytest.warns(RuntimeWarning, match="paged on demand"):
        run_steps(opt, params, 1)
    run_steps(plain, ref, 1)
    for p, q in zip(params, ref):
        assert torch.equal(p, q)
        assert opt.state[p]["step"].item() == plain.state[q]["step"].item() == 2


@pytest.mark.parametrize("block_wise", [True, False])
def test_one_parameters_state_is_resident_during_the_step(tmp_path, block_wise):
    """Measured at every prefetch inside step(): with block_wise=False the new-absmax pass
    reads every state before the updates, and must page each one in and out as well."""
    params = make_params([(1024, 1024)] * 6)
    opt = distopt.PagedAdamW8bit(params, spill_dir=tmp_path, block_wise=block_wise)
    run_steps(opt, params, 1)
    state_kib = sum(t.numel() * t.element_size() for t in slot_tensors(opt)) // 1024
    before, seen = mapped_file_kib(), []
    prefetch = opt.pager.prefetch

    def recording(now, ahead, device):
        seen.append(mapped_file_kib() - before)
        prefetch(now, ahead, device)

    opt.pager.prefetch = recording
    run_steps(opt, params, 1)
    assert max(seen) < state_kib // 3  # about one of six parameters' state, never all of it
    assert len(seen) == (12 if not block_wise else 6)
