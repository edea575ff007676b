"""FSDP2 and HSDP: bitwise world-size invariance, collectives, placements, state per rank."""

from __future__ import annotations

import pytest

from tests.distributed import harness, workers
from tests.distributed.workloads import INVARIANCE_CASES, single_process
from tests.registry import assert_bitwise_equal

STEPS = 20
CLIPS = (100, 5)


def assert_same_snapshots(got, expected):
    for (p, state), (q, ref_state) in zip(got, expected):
        assert_bitwise_equal(p, q)
        assert state.keys() == ref_state.keys()
        for key in state:
            assert_bitwise_equal(state[key], ref_state[key])


@pytest.fixture(scope="module")
def references():
    return {(n, c): single_process(n, c, STEPS) for n in INVARIANCE_CASES for c in CLIPS}


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_fsdp2_matches_one_process_bitwise(kernels_built, references, world_size):
    for rank, results in enumerate(harness.run(workers.fsdp_runs, world_size, INVARIANCE_CASES, CLIPS, (1, 2), STEPS)):
        for (name, clip, threads), snap in results.items():
            try:
                assert_same_snapshots(snap, references[(name, clip)])
            except AssertionError as err:
                raise AssertionError(f"rank {rank}: {name}, percentile_clipping={clip}, {threads} threads") from err


def test_hsdp_matches_one_process_bitwise(kernels_built, references):
    names = ["AdamW8bit", "AdamW8bit-tensorwise"]
    for results in harness.run(workers.fsdp_runs, 4, names, CLIPS, (1,), STEPS, (2, 2)):  # both replicas
        for (name, clip, _), snap in results.items():
            assert_same_snapshots(snap, references[(name, clip)])


def test_one_all_reduce_for_statistics_and_one_max_for_tensorwise_absmax(kernels_built):
    counts = harness.run(workers.count_collectives, 2)[0]
    ops = {key: [op.rsplit(".", 1)[-1] for op in calls] for key, calls in counts.items()}
    assert ops[("AdamW8bit", 100)] == []  # no clipping: no collective of distopt's own
    assert ops[("AdamW8bit", 5)] == ["SUM"]  # all parameters' statistics in one all-reduce
    assert ops[("AdamW8bit-tensorwise", 100)] == ["MAX"]
    assert ops[("AdamW8bit-tensorwise", 5)] == ["SUM", "MAX"]


def test_unsupported_placements_are_refused_naming_the_parameter(kernels_built):
    messages = harness.run(workers.refused_placements, 2)[0]
    for label, message in messages.items():
        assert message is not None, f"{label} was accepted"
        assert "param_groups[0]['params'][0]" in message and "Shard(0)" in message


def test_each_rank_keeps_state_for_its_shard_only(kernels_built):
    one = harness.run(workers.state_bytes, 1)[0]
    four = harness.run(workers.state_bytes, 4)
    print(f"\nstate bytes: 1 rank {one}; 4 ranks {four} (max/one = {max(four) / one:.3f})")
    assert sum(four) == one
    assert max(four) <= one / 4 * 1.05


def test_nonfinite_counts_cover_every_shard(kernels_built):
    for counts in harness.run(workers.nonfinite_totals, 3):
        assert counts == [256, 0, 0, 0, 0, 0]  # the NaN's block of 256, wherever it sits
