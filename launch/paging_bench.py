"""Paged against unpaged optimizer state on CPU: resident memory, step time, bitwise equality.

Each run is a fresh ``python`` process (so one run's memory never shows in another's):
it builds ``--params`` fp32 parameters whose optimizer state totals ``--state-mib``,
sets seeded gradients once, takes its baseline resident memory (RssAnon + RssFile +
RssShmem of /proc/self/status) and resets the kernel's peak (``/proc/self/clear_refs``),
then runs ``--steps`` steps of AdamW (the first one allocates the state). It reports the
peak resident growth over the baseline (VmHWM counts anonymous, file and shared pages
alike), the median time of the steps after the first, and a hash of the parameters and
the state. The parent runs unpaged, then paged (spill files in ``--spill-dir``), and
prints a table (``--json``: one JSON object)::

    python launch/paging_bench.py                        # 512 MiB of 32-bit state
    python launch/paging_bench.py --bits 8 --json        # AdamW8bit / PagedAdamW8bit

The claim it checks (docs/paging.md): paged, resident memory grows by well under a
quarter of the state's size; unpaged, by about all of it; and both give the same bits.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time

MIB = 1 << 20
COLUMNS = 1024


def resident_kib() -> dict[str, int]:
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return {k: int(fields[k].split()[0]) for k in ("RssAnon", "RssFile", "RssShmem", "VmHWM")}


def state_bytes_per_element(bits: int) -> float:
    return 2 + 2 * 4 / 256 if bits == 8 else 8  # two slots: codes + per-block absmax, or fp32


def child(args: argparse.Namespace) -> dict:
    """One run in this process (see the module docstring)."""
    import gc

    import torch

    import distopt

    torch.set_num_threads(args.threads)
    elements = int(args.state_mib * MIB / state_bytes_per_element(args.bits))
    rows = max(1, elements // (args.params * COLUMNS))
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(rows, COLUMNS, generator=gen).requires_grad_() for _ in range(args.params)]
    for p in params:
        p.grad = torch.randn(rows, COLUMNS, generator=gen)
    cls = {8: distopt.AdamW8bit, 32: distopt.AdamW32bit}[args.bits]
    kwargs = {"is_paged": True, "spill_dir": args.spill_dir} if args.paged else {}
    opt = cls(params, **kwargs)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    before = resident_kib()
    baseline = before["RssAnon"] + before["RssFile"] + before["RssShmem"]
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    after = resident_kib()
    state = [v for s in opt.state.values() for k, v in s.items() if opt._is_slot(k)]
    digest = hashlib.blake2b(digest_size=16)
    for t in [p.detach() for p in params] + state:
        digest.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return {
        "paged": args.paged,
        "state_bytes": sum(t.numel() * t.element_size() for t in state),
        "peak_growth_bytes": (after["VmHWM"] - baseline) * 1024,
        "end_rss_kib": {k: after[k] - before[k] for k in ("RssAnon", "RssFile", "RssShmem")},
        "first_step_s": times[0],
        "median_step_s": statistics.median(times[1:]) if len(times) > 1 else times[0],
        "hash": digest.hexdigest(),
    }


def run_child(args: argparse.Namespace, paged: bool) -> dict:
    argv = [sys.executable, __file__, "--child", "--state-mib", str(args.state_mib), "--params", str(args.params)]
    argv += ["--steps", str(args.steps), "--bits", str(args.bits), "--threads", str(args.threads)]
    argv += ["--spill-dir", args.spill_dir] + (["--paged"] if paged else [])
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"paging_bench child (paged={paged}) failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(args: argparse.Namespace) -> dict:
    unpaged, paged = run_child(args, False), run_child(args, True)
    for r in (unpaged, paged):
        r["growth_over_state"] = r["peak_growth_bytes"] / r["state_bytes"]
    return {
        "optimizer": f"AdamW{args.bits}bit",
        "threads": args.threads,
        "steps": args.steps,
        "params": args.params,
        "spill_dir": args.spill_dir,
        "unpaged": unpaged,
        "paged": paged,
        "slowdown": paged["median_step_s"] / unpaged["median_step_s"],
        "bitwise_equal": paged["hash"] == unpaged["hash"],
    }


def print_table(result: dict) -> None:
    print(
        f"{result['optimizer']}, {result['params']} parameters, {result['steps']} steps, "
        f"{result['threads']} threads, spill dir {result['spill_dir']}"
    )
    print(f"{'state':>8} {'state MiB':>10} {'peak RSS growth MiB':>20} {'growth/state':>13} {'step s':>8}")
    for name in ("unpaged", "paged"):
        r = result[name]
        print(
            f"{name:>8} {r['state_bytes'] / MIB:10.1f} {r['peak_growth_bytes'] / MIB:20.1f} "
            f"{r['growth_over_state']:13.1%} {r['median_step_s']:8.3f}"
        )
    print(f"slowdown (paged / unpaged median step time): {result['slowdown']:.2f}x")
    print(f"parameters and state bitwise equal: {result['bitwise_equal']}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-mib", type=float, default=512, help="optimizer state in all (default 512)")
    parser.add_argument("--params", type=int, default=16, help="number of equal parameters (default 16)")
    parser.add_argument("--steps", type=int, default=5, help="steps per run, the first allocates (default 5)")
    parser.add_argument("--bits", type=int, choices=(8, 32), default=32, help="state bits (default 32)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--spill-dir", default=tempfile.gettempdir(), help="spill directory (default: temp dir)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--paged", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return
    result = compare(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)


if __name__ == "__main__":
    main()
