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
    results = harness.run(workers.fsdp_runs, world_size, INVARIANCE_CASES, CLIPS, (1, 2), STEPS)[0]
    for (name, clip, threads), snap in results.items():
        try:
            assert_same_snapshots(snap, references[(name, clip)])
        except AssertionError as err:
            raise AssertionError(f"{name}, percentile_clipping={clip}, {threads} threads: {err}") from err


def test_hsdp_matches_one_process_bitwise(kernels_built, references):
    names = ["AdamW8bit", "AdamW8bit-tensorwise"]
    results = harness.run(workers.fsdp_runs, 4, names, CLIPS, (1,), STEPS, (2, 2))[0]
    for (name, clip, _), snap in results.items():
        assert_same_snapshots(snap, references[(name, clip)])


def test_one_all_reduce_for_statistics_and_one_max_for_tensorwise_absmax(kernels_built):
    counts = harness.run(workers.count_collectives, 2)[0]
    assert counts[("AdamW8bit", 100)] == []
    assert counts[("AdamW8bit", 5)] == ["ReduceOp.SUM"] or len(counts[("AdamW8bit", 5)]) == 1
    assert len(counts[("AdamW8bit-tensorwise", 100)]) == 1
    assert len(counts[("AdamW8bit-tensorwise", 5)]) == 2
