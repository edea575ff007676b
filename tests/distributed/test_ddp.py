"""DDP and declared row shards: replicated state needs no collective; declared shards match one process."""

from __future__ import annotations

import torch

from tests.distributed import harness, workers
from tests.distributed.workloads import Params, case, full_grads
from tests.registry import assert_bitwise_equal


def test_ddp_ranks_stay_bitwise_identical_without_collectives_of_ours(kernels_built):
    results = harness.run(workers.ddp_training, 2)
    for own_calls, eight_bit, _ in results:
        assert own_calls == 0 and eight_bit
    for a, b in zip(results[0][2], results[1][2]):
        assert_bitwise_equal(a, b)


def test_declared_row_shards_match_one_process(kernels_built):
    shapes = [(33, 300), (6, 280)]
    params = list(Params(shapes).parameters())
    opt = case("AdamW8bit").make(params, percentile_clipping=5)
    for k in range(10):
        for p, g in zip(params, full_grads(shapes, k)):
            p.grad = g
        opt.step()
    for offsets, shards in harness.run(workers.declared_row_shards, 3):
        for p, start, shard in zip(params, offsets, shards):
            assert_bitwise_equal(shard, p.detach()[start : start + shard.shape[0]])


def test_shard_rows_validates_its_arguments():
    import pytest

    import distopt
    from distopt.distributed import shard_rows

    p = torch.nn.Parameter(torch.randn(4, 8))
    opt = distopt.AdamW8bit([p])
    with pytest.raises(ValueError, match="does not extend"):
        shard_rows(opt, p, global_shape=(10, 9), row_offset=0, group=object())
    with pytest.raises(ValueError, match="row_offset"):
        shard_rows(opt, p, global_shape=(10, 8), row_offset=7, group=object())
    with pytest.raises(ValueError, match="not in this optimizer"):
        shard_rows(opt, torch.randn(4, 8), global_shape=(10, 8), row_offset=0, group=object())
