"""python -m distopt.bench runs both workloads and reports sane figures."""

from __future__ import annotations

import json

import pytest

from distopt import bench


@pytest.fixture(scope="module")
def results(tmp_path_factory, kernels_built):
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    out = bench.main(["--workload", "all", "--numel", "262144", "--scale", "0.05", "--steps", "1", "--warmup", "1",
                      "--threads", "1", "--json", str(path)])  # fmt: skip
    assert json.loads(path.read_text()) == json.loads(json.dumps(out))
    return {(r["name"], r["workload"]): r for r in out["rows"]}


@pytest.mark.parametrize("workload", ["single", "gpt2"])
def test_every_distopt_row_has_throughput_and_a_ratio(results, workload):
    rows = [r for (name, w), r in results.items() if w == workload and name.startswith("distopt")]
    assert len(rows) == 4
    for r in rows:
        assert r["elements_per_s"] > 0 and r["ratio_vs_baseline"] > 0 and r["baseline"].startswith("torch")


def test_state_bytes_per_parameter(results):
    expected = {"AdamW8bit": 2 + 2 * 4 / 256, "AdamW32bit": 8.0, "SGD8bit": 1 + 4 / 256, "SGD32bit": 4.0}
    for name, value in expected.items():
        assert results[(f"distopt {name}", "single")]["state_bytes_per_param"] == pytest.approx(value)
    assert results[("torch AdamW fused", "single")]["state_bytes_per_param"] == pytest.approx(8.0)
