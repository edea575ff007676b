"""``python -m distopt.bench --device cuda``: distopt's CUDA kernels against bitsandbytes'
CUDA kernels and ``torch.optim.AdamW(fused=True)``, on one GPU.

Each optimizer takes ``--steps`` timed steps (after ``--warmup``) on the same parameters
and gradients; the time per step is the median of CUDA-event timings of whole
``step()`` calls, so host overhead (bitsandbytes' per-parameter device synchronize,
distopt's per-parameter launches) counts. Reported: ms/step, G elements/s and the ratio
to bitsandbytes' 8-bit AdamW (the target is >= 1.0x) and to torch's fused AdamW.
Workloads: ``single`` (one parameter of ``--numel`` elements) and ``gpt2`` (GPT-2 small's
148 parameter shapes).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch

import distopt


def gpt2_shapes() -> list[tuple[int, ...]]:
    d, layers, vocab, ctx = 768, 12, 50257, 1024
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return shapes + [(d,), (d,)]


def candidates() -> dict[str, Callable]:
    out: dict[str, Callable] = {
        "distopt.AdamW8bit": lambda ps: distopt.AdamW8bit(ps, lr=1e-3),
        "distopt.AdamW32bit": lambda ps: distopt.AdamW32bit(ps, lr=1e-3),
        "torch.AdamW(fused)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
    }
    try:
        import bitsandbytes as bnb

        out["bnb.AdamW8bit"] = lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3)
        out["bnb.AdamW32bit"] = lambda ps: bnb.optim.AdamW32bit(ps, lr=1e-3)
    except ImportError:
        print("bitsandbytes is not installed: no bitsandbytes rows")
    return out


def time_steps(factory: Callable, shapes, dtype: torch.dtype, steps: int, warmup: int) -> float:
    """Median seconds per step()."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    params = [torch.randn(s, device="cuda", dtype=dtype, generator=gen).requires_grad_() for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, device="cuda", dtype=dtype, generator=gen)
    opt = factory(params)
    times = []
    for k in range(warmup + steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        opt.step()
        end.record()
        torch.cuda.synchronize()
        if k >= warmup:
            times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m distopt.bench --device cuda", description=__doc__)
    parser.add_argument("--workload", choices=["single", "gpt2", "all"], default="all")
    parser.add_argument("--numel", type=int, default=64 * 2**20)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("python -m distopt.bench --device cuda: no CUDA device")
    if not distopt.functional.use_fused(torch.device("cuda")):
        raise SystemExit("python -m distopt.bench --device cuda: distopt's CUDA kernels are not built (docs/cuda.md)")
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, {args.dtype} parameters")
    workloads = {"single": [(args.numel,)], "gpt2": gpt2_shapes()}
    chosen = workloads if args.workload == "all" else {args.workload: workloads[args.workload]}
    rows = []
    for workload, shapes in chosen.items():
        numel = sum(torch.Size(s).numel() for s in shapes)
        got = {name: time_steps(f, shapes, dtype, args.steps, args.warmup) for name, f in candidates().items()}
        print(f"\n{workload}: {len(shapes)} parameters, {numel / 1e6:.1f} M elements")
        for name, seconds in got.items():
            ratios = [f"{got[b] / seconds:.2f}x vs {b}" for b in ("bnb.AdamW8bit", "torch.AdamW(fused)") if b in got]
            print(f"  {name:22s} {seconds * 1e3:8.3f} ms  {numel / seconds / 1e9:7.2f} G elem/s  {', '.join(ratios)}")
            rows.append({"workload": workload, "optimizer": name, "seconds": seconds, "numel": numel})
    return {"rows": rows}
