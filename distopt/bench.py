"""``python -m distopt.bench``: optimizer step throughput and state memory, side by side.

Every figure is measured in the same run, on the same parameters and gradients:
distopt's optimizers, their torch.optim baselines (``AdamW(fused=True)`` for AdamW, the
fastest of torch's SGD implementations for SGD) and, when installed, bitsandbytes' and
torchao's 8-bit optimizers. Ratios are throughput against the baseline (> 1: faster).

Workloads: ``single`` (one fp32 parameter of ``--numel`` elements) and ``gpt2`` (a
GPT-2-small-like set of ~150 tensors, ~124M elements, shrunk by ``--scale``).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

import distopt
from distopt import functional

Factory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


@dataclass
class Row:
    name: str
    workload: str
    numel: int
    ms_per_step: float
    elements_per_s: float
    state_bytes_per_param: float
    baseline: str
    ratio_vs_baseline: float | None = None
    note: str = ""


def workload_shapes(name: str, numel: int, scale: float) -> list[tuple[int, ...]]:
    if name == "single":
        return [(max(1, numel // 1024), 1024)]
    d, v, ctx = max(16, int(768 * scale)), max(16, int(50257 * scale)), max(16, int(1024 * scale))
    shapes: list[tuple[int, ...]] = [(v, d), (ctx, d)]
    for _ in range(12):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


_TORCH_SGD = {
    "torch SGD": {"foreach": False},
    "torch SGD foreach": {"foreach": True},
    "torch SGD fused": {"fused": True},
}


def candidates() -> dict[str, tuple[Factory, str]]:
    """name -> (factory, baseline family)."""
    rows: dict[str, tuple[Factory, str]] = {
        "torch AdamW fused": (lambda ps: torch.optim.AdamW(ps, fused=True), "adamw"),
        "distopt AdamW8bit": (lambda ps: distopt.AdamW8bit(ps), "adamw"),
        "distopt AdamW32bit": (lambda ps: distopt.AdamW32bit(ps), "adamw"),
        "distopt SGD8bit": (lambda ps: distopt.SGD8bit(ps, lr=1e-2, momentum=0.9), "sgd"),
        "distopt SGD32bit": (lambda ps: distopt.SGD32bit(ps, lr=1e-2, momentum=0.9), "sgd"),
    }
    for name, kwargs in _TORCH_SGD.items():
        rows[name] = (lambda ps, kw=kwargs: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, **kw), "sgd")
    if importlib.util.find_spec("bitsandbytes"):
        rows["bitsandbytes AdamW8bit"] = (lambda ps: _bnb().AdamW8bit(ps), "adamw")
        rows["bitsandbytes SGD8bit"] = (lambda ps: _bnb().SGD8bit(ps, lr=1e-2, momentum=0.9), "sgd")
    if importlib.util.find_spec("torchao"):
        rows["torchao AdamW8bit"] = (lambda ps: _torchao().AdamW8bit(ps), "adamw")
    return rows


def _bnb():
    import bitsandbytes

    return bitsandbytes.optim


def _torchao():
    import torchao.optim

    return torchao.optim


def _nbytes(t: torch.Tensor) -> int:
    if hasattr(t, "codes") and hasattr(t, "scale"):  # torchao's quantized state subclass
        return _nbytes(t.codes) + _nbytes(t.scale)
    return t.numel() * t.element_size()


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of per-parameter state tensors (shared quantization maps and scalars excluded)."""
    return sum(
        _nbytes(value)
        for state in opt.state.values()
        for key, value in state.items()
        if torch.is_tensor(value) and value.dim() > 0 and not str(key).startswith("qmap")
    )


def measure(factory: Factory, shapes, steps: int, warmup: int, seed: int = 0) -> tuple[float, int]:
    """Median seconds per step and state bytes, for fresh fp32 parameters of ``shapes``."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-2
    opt = factory(params)
    for _ in range(warmup):
        opt.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    nbytes = state_bytes(opt)
    del opt, params
    gc.collect()
    return statistics.median(times), nbytes


def run_workload(workload: str, args) -> list[Row]:
    shapes = workload_shapes(workload, args.numel, args.scale)
    numel = sum(torch.Size(s).numel() for s in shapes)
    chosen = candidates()
    if args.optimizers:
        wanted = {w.strip() for w in args.optimizers.split(",")}
        chosen = {k: v for k, v in chosen.items() if k in wanted or k.startswith("torch")}
    rows = []
    for name, (factory, family) in chosen.items():
        try:
            seconds, nbytes = measure(factory, shapes, args.steps, args.warmup)
        except Exception as err:  # a peer that cannot run here is reported, not fatal
            rows.append(
                Row(name, workload, numel, float("nan"), float("nan"), float("nan"), family, None, f"failed: {err}")
            )
            continue
        rows.append(Row(name, workload, numel, seconds * 1e3, numel / seconds, nbytes / numel, family))
    baselines = {
        "adamw": max((r for r in rows if r.name == "torch AdamW fused"), key=lambda r: r.elements_per_s, default=None),
        "sgd": max((r for r in rows if r.name.startswith("torch SGD")), key=lambda r: r.elements_per_s, default=None),
    }
    for r in rows:
        base = baselines[r.baseline]
        r.baseline = base.name if base else "none"
        if base and r.elements_per_s == r.elements_per_s:
            r.ratio_vs_baseline = r.elements_per_s / base.elements_per_s
    return rows


def print_table(rows: list[Row]) -> None:
    header = f"{'optimizer':<24} {'workload':<8} {'ms/step':>9} {'G elem/s':>9} {'state B/param':>13}"
    print(f"{header} {'vs baseline':>12}  baseline")
    for r in rows:
        ratio = f"{r.ratio_vs_baseline:.3f}x" if r.ratio_vs_baseline is not None else "-"
        print(f"{r.name:<24} {r.workload:<8} {r.ms_per_step:9.2f} {r.elements_per_s / 1e9:9.3f} "
              f"{r.state_bytes_per_param:13.3f} {ratio:>12}  {r.baseline} {r.note}")  # fmt: skip


def environment() -> dict:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "distopt_fused": functional.use_fused(torch.device("cpu")),
        "bitsandbytes": importlib.util.find_spec("bitsandbytes") is not None,
        "torchao": importlib.util.find_spec("torchao") is not None,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m distopt.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--workload", choices=["single", "gpt2", "all"], default="single")
    parser.add_argument("--numel", type=int, default=1 << 24, help="elements of the single parameter")
    parser.add_argument("--scale", type=float, default=1.0, help="shrink the gpt2 workload's dimensions")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (state allocation, builds)")
    parser.add_argument("--optimizers", default="", help="comma list of names to run (torch baselines always run)")
    parser.add_argument("--json", default="", help="also write the results to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = environment()
    print(f"torch {env['torch']}, {env['threads']} threads, CPU {env['cpu_capability']}, "
          f"distopt fused kernels: {env['distopt_fused']}")  # fmt: skip
    print("ratios: throughput against the baseline measured in this same run (> 1: faster)")
    if not env["bitsandbytes"]:
        print("bitsandbytes: not installed")
    if not env["torchao"]:
        print("torchao: not installed")
    rows = []
    for workload in ["single", "gpt2"] if args.workload == "all" else [args.workload]:
        rows += run_workload(workload, args)
    print_table(rows)
    result = {"environment": env, "rows": [asdict(r) for r in rows]}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
