"""``python -m distopt.bench`` on tiny workloads: the report's structure and state-memory figures.

Timing values are not checked (only that they exist and are positive); peers that are not
installed appear as rows with a note, so these tests neither fail nor skip without them.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from distopt import bench

DISTOPT = ("distopt AdamW8bit", "distopt AdamW32bit", "distopt SGD8bit", "distopt SGD32bit")
ROW_KEYS = {
    "name",
    "workload",
    "numel",
    "ms_per_step",
    "elements_per_s",
    "state_bytes_per_param",
    "baseline",
    "ratio_vs_baseline",
    "baseline_ms_paired",
    "notes",
}
TINY = ["--steps", "1", "--warmup", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[dict, dict]:
    """The returned results of one run of every workload with the extras, and the JSON file it wrote."""
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    sizes = ["--numel", "262144", "--scale", "0.05", "--big-numel", "65536"]
    out = bench.main(["--workload", "all", *sizes, "--extras", "--json", str(path), *TINY])
    return out, json.loads(path.read_text())


def rows_of(report, workload: str) -> dict[str, dict]:
    return {r["name"]: r for r in report[0]["rows"] if r["workload"] == workload}


def test_json_file_holds_the_returned_results_with_every_key(report):
    out, written = report
    assert written == json.loads(json.dumps(out))
    assert {"torch", "threads", "cpu_capability", "distopt_backend"} <= set(written["environment"])
    assert written["environment"]["distopt_backend"] in ("fused", "reference")
    assert written["rows"] and all(set(r) == ROW_KEYS for r in written["rows"])


@pytest.mark.parametrize("workload", ["single", "gpt2"])
def test_every_distopt_row_has_throughput_and_a_ratio_against_a_torch_baseline(report, workload):
    rows = rows_of(report, workload)
    for name in DISTOPT:
        r = rows[name]
        assert r["elements_per_s"] > 0 and r["ms_per_step"] > 0 and r["ratio_vs_baseline"] > 0
        # the ratio comes from the baseline timed in turns beside this row, not from the baseline's row
        assert r["baseline_ms_paired"] > 0
        assert r["ratio_vs_baseline"] == pytest.approx(r["baseline_ms_paired"] / r["ms_per_step"])
        assert r["baseline"] in ("torch AdamW fused", *bench.SGD_BASELINES)
        assert r["baseline"].startswith("torch AdamW" if "AdamW" in name else "torch SGD")
        assert r["numel"] == (262144 if workload == "single" else sum(map(math.prod, bench.gpt2_shapes(0.05))))


@pytest.mark.parametrize("workload", ["single", "gpt2"])
def test_sgd_baseline_is_the_fastest_torch_sgd(report, workload):
    rows = rows_of(report, workload)
    fastest = max(bench.SGD_BASELINES, key=lambda n: rows[n]["elements_per_s"])
    assert rows["distopt SGD8bit"]["baseline"] == fastest
    assert rows[fastest]["ratio_vs_baseline"] == 1.0


def test_state_bytes_per_parameter_element(report):
    rows = rows_of(report, "single")  # one [256, 1024] parameter: absmax per 256-element block
    assert 2.0 < rows["distopt AdamW8bit"]["state_bytes_per_param"] < 2.2
    assert rows["distopt AdamW8bit"]["state_bytes_per_param"] == pytest.approx(2 + 2 * 4 / 256)
    assert rows["distopt AdamW32bit"]["state_bytes_per_param"] == pytest.approx(8.0)
    assert rows["distopt SGD8bit"]["state_bytes_per_param"] == pytest.approx(1 + 4 / 256)
    assert rows["distopt SGD32bit"]["state_bytes_per_param"] == pytest.approx(4.0)
    assert rows["torch AdamW fused"]["state_bytes_per_param"] == pytest.approx(8.0)


def test_peers_are_measured_or_carry_a_note(report):
    for workload in ("single", "gpt2"):
        for name in ("bitsandbytes AdamW8bit", "bitsandbytes SGD8bit", "torchao AdamW8bit"):
            r = rows_of(report, workload)[name]
            assert (r["elements_per_s"] or 0) > 0 or r["notes"].startswith(("not installed", "import failed", "failed"))


def test_gpt2_workload_has_gpt2_small_parameter_count():
    shapes = bench.gpt2_shapes(1.0)
    assert len(shapes) == 148
    assert sum(map(math.prod, shapes)) == 124_439_808


def test_optimizers_option_restricts_rows_but_keeps_the_baselines(capsys):
    out = bench.main(["--numel", "65536", "--optimizers", "distopt SGD8bit", *TINY])
    assert {r["name"] for r in out["rows"]} == {"distopt SGD8bit", "torch AdamW fused", *bench.SGD_BASELINES}
    assert "distopt SGD8bit" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(["--optimizers", "NoSuchOptimizer", *TINY])


def finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_big_workload_is_one_64m_element_parameter(report):
    assert bench.workload_shapes("big", 1, 1.0) == [(65536, 1024)]
    assert rows_of(report, "big")["distopt AdamW8bit"]["numel"] == 65536  # --big-numel shrinks it


def test_bandwidth_against_a_probe_of_the_same_element_count(report):
    out = report[1]
    probes = {p["workload"]: p for p in out["probes"]}
    assert set(probes) == set(bench.WORKLOADS)
    assert all(finite_positive(p["ms"]) and finite_positive(p["gb_per_s"]) for p in probes.values())
    got = {(b["name"], b["workload"]): b for b in out["bandwidth"]}
    assert set(got) == {(n, w) for n in DISTOPT for w in bench.WORKLOADS}
    for (name, workload), b in got.items():
        assert b["numel"] == probes[workload]["numel"] == rows_of(report, workload)[name]["numel"]
        assert b["probe_gb_per_s"] == probes[workload]["gb_per_s"]
        assert finite_positive(b["gb_per_s"]) and finite_positive(b["percent_of_probe"])
        assert b["percent_of_probe"] == pytest.approx(100 * b["gb_per_s"] / b["probe_gb_per_s"])
    single = {n: got[(n, "single")]["bytes_per_element"] for n in DISTOPT}
    assert single["distopt AdamW8bit"] == pytest.approx(16 + 2 * 2 * 4 / 256)
    assert single["distopt AdamW32bit"] == pytest.approx(28)
    assert single["distopt SGD8bit"] == pytest.approx(14 + 2 * 4 / 256)
    assert single["distopt SGD32bit"] == pytest.approx(20)


def test_clipping_cost_is_a_same_run_time_ratio(report):
    clipping = {c["workload"]: c for c in report[1]["clipping"]}
    assert set(clipping) == set(bench.WORKLOADS)
    for c in clipping.values():
        assert c["percentile"] == 95
        assert all(finite_positive(c[k]) for k in ("ms_without", "ms_with", "time_ratio"))
        assert c["time_ratio"] == pytest.approx(c["ms_with"] / c["ms_without"])


def test_interleaved_timing_alternates_the_order_and_prepares_each_call(monkeypatch):
    calls: list[str] = []
    fns = [lambda: calls.append("a"), lambda: calls.append("b")]
    before = [lambda: calls.append("set a"), lambda: calls.append("set b")]
    clock = iter(range(100))  # each perf_counter() call one second later: every call takes 1 s
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))
    medians = bench.interleaved_median_seconds(fns, steps=3, warmup=1, before=before)
    assert medians == [1, 1]
    warm, timed = calls[:4], calls[4:]
    assert warm == ["set a", "a", "set b", "b"]
    assert timed == ["set a", "a", "set b", "b", "set b", "b", "set a", "a", "set a", "a", "set b", "b"]


def test_a_row_and_its_baseline_step_in_turns_on_their_own_parameters():
    log: list[tuple[str, int]] = []

    class Logging(torch.optim.SGD):
        def __init__(self, params, name):
            super().__init__(params, lr=0.1)
            self.name = name

        def step(self):
            log.append((self.name, id(self.param_groups[0]["params"][0])))

    seconds, _, base_seconds = bench.measure(
        lambda ps: Logging(ps, "row"), [(4, 4)], steps=2, warmup=1, paired=lambda ps: Logging(ps, "base")
    )
    assert [name for name, _ in log] == ["row", "base", "row", "base", "base", "row"]
    assert len({pid for _, pid in log}) == 2  # each on its own parameters
    assert seconds > 0 and base_seconds > 0


def test_thread_scaling_at_one_and_two_threads(report):
    scaling = {s["name"]: s for s in report[1]["thread_scaling"]}
    assert set(scaling) == {"distopt AdamW8bit", "torch AdamW fused"}
    for s in scaling.values():
        assert set(s["ms_per_thread_count"]) == {"1", "2"} and s["workload"] == "single"
        assert all(finite_positive(v) for v in s["ms_per_thread_count"].values())
        assert s["speedup"] == pytest.approx(s["ms_per_thread_count"]["1"] / s["ms_per_thread_count"]["2"])


def test_step_memory_measured_in_a_fresh_process_per_optimizer(report):
    memory = {m["name"]: m for m in report[1]["step_memory"]}
    assert set(memory) == {*DISTOPT, "torch AdamW fused"}
    for m in memory.values():
        assert m["threads"] == 1 and m["steps"] == 1 and m["numel"] == 262144
        assert math.isfinite(m["peak_rss_delta_mib"]) and m["peak_rss_delta_mib"] >= 0
        assert m["mib_per_thread"] == pytest.approx(m["peak_rss_delta_mib"] / m["threads"])
        assert math.isfinite(m["rss_delta_mib"]) and isinstance(m["peak_reset"], bool)


def test_extras_are_none_without_the_flag(capsys):
    out = bench.main(["--numel", "65536", "--optimizers", "distopt SGD8bit", *TINY])
    assert out["clipping"] is None and out["thread_scaling"] is None and out["step_memory"] is None
    assert [b["name"] for b in out["bandwidth"]] == ["distopt SGD8bit"]
    assert "bandwidth" in capsys.readouterr().out


def test_bf16_workload_steps_bf16_parameters_against_torch_on_the_same_dtype(report):
    rows = rows_of(report, "bf16")
    assert rows["torch AdamW fused"]["state_bytes_per_param"] == pytest.approx(4.0)  # torch: state in bf16
    assert rows["distopt AdamW8bit"]["state_bytes_per_param"] == pytest.approx(2 + 2 * 4 / 256)
    assert rows["distopt AdamW32bit"]["state_bytes_per_param"] == pytest.approx(8.0)  # fp32 state kept
    assert rows["distopt AdamW8bit"]["ratio_vs_baseline"] > 0
    bw = {b["name"]: b for b in report[0]["bandwidth"] if b["workload"] == "bf16"}
    assert bw["distopt AdamW8bit"]["bytes_per_element"] == pytest.approx(3 * 2 + 2 * (2 + 2 * 4 / 256))


def test_plot_draws_a_png_from_the_json_results(report, tmp_path):
    from distopt import bench_plot

    path = tmp_path / "bench.png"
    bench_plot.plot(report[1], str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
