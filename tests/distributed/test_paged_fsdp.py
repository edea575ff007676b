"""Paged state under FSDP2 (gloo, CPU): each rank spills its own shards to its own files,
and training is bitwise the same as unpaged in one process."""

from __future__ import annotations

import os

from tests.distributed import harness, paging_workers
from tests.distributed.test_fsdp import assert_same_snapshots
from tests.distributed.workloads import single_process

STEPS = 6


def test_each_rank_spills_its_own_shards_and_results_equal_unpaged_bitwise(kernels_built, tmp_path):
    reference = single_process("AdamW8bit", 100, STEPS)
    results = harness.run(paging_workers.paged_fsdp, 2, str(tmp_path), STEPS)
    files = [{path for path, _ in r["maps"]} for r in results]
    assert results[0]["pid"] != results[1]["pid"]
    assert files[0] and files[1] and not files[0] & files[1]  # no file is mapped by both ranks
    for rank, r in enumerate(results):
        assert all(f"-{r['pid']}-rank{rank}-" in os.path.basename(path) for path in files[rank])
        assert sorted(size for _, size in r["maps"]) == r["needed"]  # sized for this rank's shards, one file each
        assert r["spilled"] and r["reloaded_spilled"]
        assert_same_snapshots(r["snapshot"], reference)
        assert_same_snapshots(r["reloaded"], reference)
    assert os.listdir(tmp_path) == []  # every file unlinked; nothing left behind
