"""Checkpoints under FSDP2: torch's state-dict APIs and DCP keep the quantized state
exact, full state dicts equal one process's, and a checkpoint saved at one world size
resumes bitwise at another (uneven and empty shards included)."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import checkpoint_workers as cw
from tests.distributed import harness
from tests.distributed.test_fsdp import assert_same_snapshots
from tests.distributed.workloads import case, single_process
from tests.registry import assert_bitwise_equal

STEPS, MORE = 6, 4  # the seeded gradients put a NaN in parameter 0 at step 4
CASES = ["AdamW8bit", "AdamW8bit-amsgrad", "AdamW8bit-tensorwise", "SGD8bit-momentum", "AdamW32bit"]
NONFINITE = [256, 0, 0, 0, 0, 0]  # the NaN's block, or the element with 32-bit state
_references: dict = {}


def reference(name: str, clip: int, steps: int):
    if (name, clip, steps) not in _references:
        _references[(name, clip, steps)] = single_process(name, clip, steps)
    return _references[(name, clip, steps)]


def assert_same_tree(got, expected, where="state dict"):
    if isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), (where, got.keys(), expected.keys())
        for k in expected:
            assert_same_tree(got[k], expected[k], f"{where}[{k!r}]")
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), where
        for i, (a, b) in enumerate(zip(got, expected)):
            assert_same_tree(a, b, f"{where}[{i}]")
    elif torch.is_tensor(expected):
        try:
            assert_bitwise_equal(got, expected)
        except AssertionError as err:
            raise AssertionError(f"{where}: {got} != {expected}") from err
    else:
        assert got == expected, (where, got, expected)


FULL_RUNS = [("AdamW8bit", 5), ("AdamW8bit-tensorwise", 100), ("SGD8bit-momentum", 5)]


@pytest.fixture(scope="module")
def one_process_state_dicts():
    return harness.run(cw.full_state_dicts, 1, FULL_RUNS, STEPS, False)[0]


@pytest.mark.parametrize("world_size", [2, 4])  # uneven shards; empty ones
def test_full_state_dicts_equal_one_process_bitwise(kernels_built, one_process_state_dicts, world_size):
    sharded = harness.run(cw.full_state_dicts, world_size, FULL_RUNS, STEPS)[0]
    assert sharded.keys() == one_process_state_dicts.keys()
    for key, expected in one_process_state_dicts.items():
        assert_same_tree(sharded[key], expected, "/".join(map(str, key)))
    for name, clip in FULL_RUNS:
        state = one_process_state_dicts[(name, clip, "full")]["state"]["weights.0"]
        assert state["exp_avg" if "AdamW" in name else "momentum_buffer"].dtype == torch.uint8
        assert int(state["nonfinite_count"]) == 256  # the whole parameter's count, not a rank's


# torch 2.13's set_optimizer_state_dict fails on a state dict that is both full and
# flattened for every optimizer (torch.optim.AdamW too: KeyError 'param_groups.0.params.0');
# flattened state dicts are loaded sharded here, and gathered full ones compared above.
SET_OPTIONS = {
    "full": {"full_state_dict": True},
    "broadcast": {"full_state_dict": True, "broadcast_from_rank0": True},
    "cpu_offload": {"full_state_dict": True, "cpu_offload": True},
    "sharded": {},
    "sharded+flatten": {"flatten_optimizer_state_dict": True},
}


@pytest.mark.parametrize("options", list(SET_OPTIONS))
def test_set_optimizer_state_dict_into_a_fresh_optimizer_resumes_bitwise(kernels_built, options):
    for name in ["AdamW8bit", "SGD8bit-momentum"]:
        for snap, counts in harness.run(cw.set_and_continue, 3, name, 5, STEPS, MORE, SET_OPTIONS[options]):
            assert_same_snapshots(snap, reference(name, 5, STEPS + MORE))
            assert counts == NONFINITE


def assert_resumed(results, runs, where):
    for rank, out in enumerate(results):
        for name, clip in runs:
            snap, counts = out[(name, clip)]
            try:
                assert_same_snapshots(snap, reference(name, clip, STEPS + MORE))
                assert counts == (NONFINITE if "8bit" in name else [1, 0, 0, 0, 0, 0])
            except AssertionError as err:
                raise AssertionError(f"{name}, percentile_clipping={clip}: {where}, rank {rank}") from err


def test_dcp_checkpoint_from_4_ranks_resumes_bitwise_at_1_2_and_3(kernels_built, tmp_path):
    runs = [(name, clip) for name in CASES for clip in (100, 5)]
    harness.run(cw.dcp_save, 4, runs, STEPS, str(tmp_path))
    for world_size, fsdp in [(1, False), (1, True), (2, True), (3, True)]:
        results = harness.run(cw.dcp_load_and_continue, world_size, runs, STEPS, MORE, str(tmp_path), fsdp)
        assert_resumed(results, runs, f"saved at 4 ranks, loaded at {world_size} ({'FSDP2' if fsdp else 'plain'})")


def test_dcp_checkpoint_from_one_plain_process_resumes_bitwise_at_3_ranks(kernels_built, tmp_path):
    runs = [("AdamW8bit-amsgrad", 5), ("SGD8bit-nesterov-wd", 100)]
    harness.run(cw.dcp_save, 1, runs, STEPS, str(tmp_path), False)
    assert_resumed(harness.run(cw.dcp_load_and_continue, 3, runs, STEPS, MORE, str(tmp_path)), runs, "1 to 3")


def test_declared_row_shards_save_whole_tensors_and_resume_bitwise(kernels_built):
    from tests.distributed.workloads import Params, full_grads

    shapes = [(33, 300), (6, 280), (40, 15)]
    whole = list(Params(shapes).parameters())
    opt = case("AdamW8bit").make(whole, percentile_clipping=5)
    for k in range(STEPS + MORE):
        if k == STEPS:
            expected_sd = opt.state_dict()
            expected_sd = {"state": {i: {n: v.clone() for n, v in s.items()} for i, s in expected_sd["state"].items()},
                           "param_groups": expected_sd["param_groups"]}  # fmt: skip
        for p, g in zip(whole, full_grads(shapes, k)):
            p.grad = g
        opt.step()
    for saved, offsets, params in harness.run(cw.declared_shards_round_trip, 3, STEPS, MORE):
        assert_same_tree(saved, expected_sd)
        for p, w, start in zip(params, whole, offsets):
            assert_bitwise_equal(p, w.detach()[start : start + p.shape[0]])
