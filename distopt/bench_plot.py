"""The figure of ``docs/benchmarks.md``: throughput and state memory against the peers.

``python -m distopt.bench --workload all --plot docs/benchmarks.png`` measures and draws in
one run; ``python -m distopt.bench_plot RESULTS.json OUT.png`` redraws a ``--json`` file.
Two panels, both from one run's rows: throughput of distopt's and the peers' optimizers on
each workload as a multiple of its torch baseline (AdamW rows against ``torch AdamW fused``,
SGD rows against the fastest torch SGD; log scale, 1.0 marked), and state bytes per
parameter element on the ``single`` workload. Rows without a measurement (a peer not
installed or failing) are left out and named in the caption.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping

FAMILY_COLORS = {"torch": "#7f7f7f", "distopt": "#1f77b4", "bitsandbytes": "#d62728", "torchao": "#2ca02c"}


def _color(name: str, rank: int) -> tuple[float, float, float, float]:
    from matplotlib import colors

    r, g, b = colors.to_rgb(FAMILY_COLORS.get(name.split()[0], "#9467bd"))
    shade = 1.0 - 0.18 * rank  # lighter for each further optimizer of the same package
    return (r * shade + (1 - shade), g * shade + (1 - shade), b * shade + (1 - shade), 1.0)


def plot(result: Mapping, path: str) -> None:
    """Draw ``result`` (what :func:`distopt.bench.main` returns) to the PNG ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = [r for r in result["rows"] if r["ratio_vs_baseline"] is not None]
    missing = sorted({r["name"] for r in result["rows"] if r["ratio_vs_baseline"] is None})
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    names = list(dict.fromkeys(r["name"] for r in rows if not r["name"].startswith("torch ")))  # 1.0: torch
    per_package: dict[str, int] = {}
    ranks = {}
    for n in names:
        ranks[n] = per_package.get(n.split()[0], 0)
        per_package[n.split()[0]] = ranks[n] + 1

    fig, (ax, mem) = plt.subplots(1, 2, figsize=(13, 5.6), gridspec_kw={"width_ratios": [2.2, 1]})
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        got = {r["workload"]: r["ratio_vs_baseline"] for r in rows if r["name"] == name}
        xs = [w + (i - (len(names) - 1) / 2) * width for w in range(len(workloads)) if workloads[w] in got]
        ax.bar(xs, [got[w] for w in workloads if w in got], width, label=name, color=_color(name, ranks[name]))
    ax.axhline(1.0, color="black", linewidth=0.8, label="torch baseline (1.0)")
    ax.set_yscale("log")
    ax.set_xticks(range(len(workloads)), workloads)
    ax.set_ylabel("throughput / torch baseline (timed in turns)")
    ax.set_title("Step throughput vs torch fused AdamW / fastest torch SGD")
    ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.07))

    single = [r for r in rows if r["workload"] == "single" and r["state_bytes_per_param"] is not None]
    labels = [r["name"] for r in single]
    mem.barh(labels, [r["state_bytes_per_param"] for r in single],
             color=[_color(n, ranks.get(n, 0)) for n in labels])  # fmt: skip
    mem.invert_yaxis()
    mem.set_xlabel("optimizer state, bytes per parameter element")
    mem.set_title("State memory (single workload)")
    env = result.get("environment", {})
    load = env.get("load_average_1min")
    note = (f"torch {env.get('torch')}, {env.get('threads')} threads, CPU {env.get('cpu_capability')}, "
            f"1-min load average {'-' if load is None else f'{load:.2f}'} at start")  # fmt: skip
    if missing:
        note += "; not measured: " + ", ".join(missing)
    fig.text(0.01, 0.01, note, fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m distopt.bench_plot RESULTS.json OUT.png")
    with open(sys.argv[1]) as f:
        plot(json.load(f), sys.argv[2])
