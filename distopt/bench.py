"""``python -m distopt.bench``: optimizer step throughput and state memory, side by side.

Every figure in one report comes from the same run, on the same fp32 parameters and
gradients (fresh copies from one seed per optimizer; gradients set once and reused):

- distopt's ``AdamW8bit``, ``AdamW32bit``, ``SGD8bit`` and ``SGD32bit`` (momentum 0.9);
- the torch baselines the ratios are taken against: ``torch.optim.AdamW(fused=True)`` for
  AdamW, and the fastest of ``torch.optim.SGD`` with ``foreach=False`` / ``foreach=True`` /
  ``fused=True`` (momentum 0.9) for SGD;
- when importable, bitsandbytes' ``AdamW8bit`` / ``SGD8bit`` and torchao's ``AdamW8bit``.
  A peer that is not installed is a row with a "not installed" note; one that fails to
  run is a row with the error. Nothing is ever installed from here.

Throughput is elements per second: parameter elements over the median of ``--steps``
timed ``opt.step()`` calls, after ``--warmup`` untimed ones (the first step allocates state
and may build distopt's C++ kernels; torchao compiles on its first step). State bytes per
parameter element count each per-parameter state tensor once; the scalars ``step`` and
``nonfinite_count`` and bitsandbytes' shared quantization maps (``qmap*``) are excluded.

Workloads: ``single`` (one parameter of ``--numel`` elements, shaped ``[numel/1024, 1024]``)
and ``gpt2`` (GPT-2 small's 148 tensors, 124,439,808 elements; ``--scale`` shrinks every
dimension for quick runs). ``main()`` returns what it prints, for tests.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from types import ModuleType

import torch

import distopt
from distopt import functional

Shape = tuple[int, ...]
Optimizer = torch.optim.Optimizer
Factory = Callable[[list[torch.Tensor]], Optimizer]

ADAMW_BASELINE = "torch AdamW fused"
SGD_BASELINES = ("torch SGD", "torch SGD foreach", "torch SGD fused")
SGD_KWARGS = {"lr": 1e-2, "momentum": 0.9}
_SCALAR_STATE = ("step", "nonfinite_count")


@dataclass
class Candidate:
    """One optimizer to measure: ``factory`` is None when its package is not importable."""

    name: str
    family: str  # "adamw" or "sgd": which baseline its ratio is against
    factory: Factory | None
    notes: str = ""


@dataclass
class Row:
    """One measured (or skipped) optimizer on one workload; the JSON record."""

    name: str
    workload: str
    numel: int
    ms_per_step: float | None
    elements_per_s: float | None
    state_bytes_per_param: float | None
    baseline: str
    ratio_vs_baseline: float | None = None
    notes: str = ""


# --- workloads -------------------------------------------------------------------------


def gpt2_shapes(scale: float = 1.0) -> list[Shape]:
    """GPT-2 small's parameters (HF ``Conv1D`` layout, weights ``[in, out]``), dims times ``scale``."""
    d, vocab, ctx = (max(16, int(n * scale)) for n in (768, 50257, 1024))
    block: list[Shape] = [
        (d,), (d,),  # ln_1 weight, bias
        (d, 3 * d), (3 * d,),  # attn.c_attn
        (d, d), (d,),  # attn.c_proj
        (d,), (d,),  # ln_2
        (d, 4 * d), (4 * d,),  # mlp.c_fc
        (4 * d, d), (d,),  # mlp.c_proj
    ]  # fmt: skip
    return [(vocab, d), (ctx, d)] + block * 12 + [(d,), (d,)]


def workload_shapes(workload: str, numel: int, scale: float) -> list[Shape]:
    if workload == "single":
        return [(max(1, numel // 1024), 1024)]
    if workload == "gpt2":
        return gpt2_shapes(scale)
    raise ValueError(f"unknown workload {workload!r}")


# --- the optimizers --------------------------------------------------------------------


def _peer(
    name: str, family: str, module: str, make: Callable[[ModuleType, list[torch.Tensor]], Optimizer]
) -> Candidate:
    """A peer's optimizer, or a row with a note when ``module`` cannot be imported."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as err:
        return Candidate(name, family, None, f"not installed ({err})")
    except Exception as err:  # a broken install that fails while importing
        return Candidate(name, family, None, f"import failed: {type(err).__name__}: {err}")
    return Candidate(name, family, lambda ps: make(mod, ps))


def candidates() -> list[Candidate]:
    """Every optimizer the benchmark knows, torch baselines first."""
    rows = [Candidate(ADAMW_BASELINE, "adamw", lambda ps: torch.optim.AdamW(ps, fused=True))]
    for name, kwargs in zip(SGD_BASELINES, ({"foreach": False}, {"foreach": True}, {"fused": True})):
        rows.append(Candidate(name, "sgd", lambda ps, kw=kwargs: torch.optim.SGD(ps, **SGD_KWARGS, **kw)))
    rows += [
        Candidate("distopt AdamW8bit", "adamw", lambda ps: distopt.AdamW8bit(ps)),
        Candidate("distopt AdamW32bit", "adamw", lambda ps: distopt.AdamW32bit(ps)),
        Candidate("distopt SGD8bit", "sgd", lambda ps: distopt.SGD8bit(ps, **SGD_KWARGS)),
        Candidate("distopt SGD32bit", "sgd", lambda ps: distopt.SGD32bit(ps, **SGD_KWARGS)),
    ]
    rows += [
        _peer("bitsandbytes AdamW8bit", "adamw", "bitsandbytes.optim", lambda m, ps: m.AdamW8bit(ps)),
        _peer("bitsandbytes SGD8bit", "sgd", "bitsandbytes.optim", lambda m, ps: m.SGD8bit(ps, **SGD_KWARGS)),
        _peer("torchao AdamW8bit", "adamw", "torchao.optim", lambda m, ps: m.AdamW8bit(ps)),
    ]
    return rows


def select(all_candidates: list[Candidate], wanted: str) -> list[Candidate]:
    """Restrict to a comma list of names; a token matches a full name (``distopt AdamW8bit``), its
    first word (``distopt``, ``bitsandbytes``) or its last word (``AdamW8bit`` picks every AdamW8bit),
    case-insensitively. The torch baselines always run: the ratios need them."""
    tokens = {t.strip().lower() for t in wanted.split(",") if t.strip()}
    if not tokens:
        return all_candidates
    keys = {c.name: {c.name.lower(), *(c.name.lower().split()[i] for i in (0, -1))} for c in all_candidates}
    unknown = tokens - set().union(*keys.values())
    if unknown:
        raise ValueError(f"unknown optimizers {sorted(unknown)}; known: {[c.name for c in all_candidates]}")
    baselines = {ADAMW_BASELINE, *SGD_BASELINES}
    return [c for c in all_candidates if c.name in baselines or keys[c.name] & tokens]


# --- measuring -------------------------------------------------------------------------


def _nbytes(t: torch.Tensor) -> int:
    if hasattr(t, "codes") and hasattr(t, "scale"):  # torchao's quantized state subclass
        return _nbytes(t.codes) + _nbytes(t.scale)
    return t.numel() * t.element_size()


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of per-parameter state tensors, each counted once (scalars and shared maps excluded)."""
    seen: dict[int, torch.Tensor] = {}
    for state in opt.state.values():
        for key, value in state.items():
            name = str(key)
            if torch.is_tensor(value) and value.dim() > 0 and name not in _SCALAR_STATE and not name.startswith("qmap"):
                seen[id(value)] = value
    return sum(_nbytes(t) for t in seen.values())


def measure(factory: Factory, shapes: Sequence[Shape], steps: int, warmup: int, seed: int = 0) -> tuple[float, int]:
    """Median seconds per ``opt.step()`` and state bytes, on fresh fp32 parameters of ``shapes``."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-2
    opt = factory(params)
    try:
        for _ in range(warmup):
            opt.step()
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - start)
        return statistics.median(times), state_bytes(opt)
    finally:  # free params, gradients and state before the next optimizer (gpt2: ~2 GB)
        opt.state.clear()
        del opt, params
        gc.collect()


def measure_row(cand: Candidate, workload: str, shapes: Sequence[Shape], args: argparse.Namespace) -> Row:
    numel = sum(math.prod(s) for s in shapes)
    row = Row(cand.name, workload, numel, None, None, None, baseline="", notes=cand.notes)
    if cand.factory is None:
        return row
    try:
        seconds, nbytes = measure(cand.factory, shapes, args.steps, args.warmup)
    except Exception as err:
        if cand.name.startswith("distopt"):
            raise  # distopt's own optimizers must run; a failure here is a bug to see
        row.notes = f"failed: {type(err).__name__}: {err}"
        return row
    row.ms_per_step, row.elements_per_s, row.state_bytes_per_param = seconds * 1e3, numel / seconds, nbytes / numel
    return row


def attach_ratios(rows: list[Row], family_of: dict[str, str]) -> dict[str, str]:
    """Fill ``baseline`` and ``ratio_vs_baseline``; return family -> baseline name."""
    measured = {r.name: r for r in rows if r.elements_per_s}
    sgd = [measured[n] for n in SGD_BASELINES if n in measured]
    baselines = {"adamw": ADAMW_BASELINE if ADAMW_BASELINE in measured else "none"}
    baselines["sgd"] = max(sgd, key=lambda r: r.elements_per_s).name if sgd else "none"
    for r in rows:
        r.baseline = baselines[family_of[r.name]]
        if r.name == r.baseline:
            r.notes = "baseline"
        if r.elements_per_s and r.baseline in measured:
            r.ratio_vs_baseline = r.elements_per_s / measured[r.baseline].elements_per_s
    return baselines


def run_workload(workload: str, chosen: list[Candidate], args: argparse.Namespace) -> list[Row]:
    shapes = workload_shapes(workload, args.numel, args.scale)
    rows = [measure_row(c, workload, shapes, args) for c in chosen]
    baselines = attach_ratios(rows, {c.name: c.family for c in chosen})
    print_table(workload, shapes, rows, baselines, args)
    return rows


# --- reporting -------------------------------------------------------------------------


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def print_table(
    workload: str, shapes: Sequence[Shape], rows: list[Row], baselines: dict[str, str], args: argparse.Namespace
) -> None:
    numel = sum(math.prod(s) for s in shapes)
    print(f"\n== workload {workload}: {len(shapes)} fp32 tensor(s), {numel:,} elements; "
          f"median of {args.steps} timed steps after {args.warmup} warm-up ==")  # fmt: skip
    print(f"ratio = throughput / baseline throughput, both measured in this run (> 1: faster). "
          f"AdamW rows vs {baselines['adamw']}; SGD rows vs {baselines['sgd']} "
          f"(fastest of {', '.join(SGD_BASELINES)}; momentum 0.9)")  # fmt: skip
    width = max(len("optimizer"), *(len(r.name) for r in rows))
    print(f"{'optimizer':<{width}}  {'ms/step':>9}  {'G elem/s':>8}  {'state B/elem':>12}  {'vs baseline':>11}  notes")
    for r in rows:
        gelems = None if r.elements_per_s is None else r.elements_per_s / 1e9
        print(f"{r.name:<{width}}  {_fmt(r.ms_per_step, '9.2f'):>9}  {_fmt(gelems, '8.3f'):>8}  "
              f"{_fmt(r.state_bytes_per_param, '12.3f'):>12}  {_fmt(r.ratio_vs_baseline, '.3f', 'x'):>11}  "
              f"{r.notes}".rstrip())  # fmt: skip


def environment() -> dict:
    """What the figures depend on; the distopt backend is the one actually used on CPU."""
    fused = functional.use_fused(torch.device("cpu"))  # builds the C++ kernels if needed
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "distopt_backend_setting": distopt.get_backend(),
        "distopt_backend": "fused" if fused else "reference",
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,  # other work skews figures
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m distopt.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workload", choices=["single", "gpt2", "all"], default="single")
    parser.add_argument("--numel", type=int, default=16_777_216, help="elements of the single workload's parameter")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the gpt2 workload's dimensions")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (state, kernel build, compile)")
    parser.add_argument("--optimizers", default="", help="comma list of names to run (torch baselines always run)")
    parser.add_argument("--json", default="", metavar="PATH", help="also write the results to PATH")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.threads < 1 or args.numel < 1 or args.scale <= 0:
        parser.error("--steps, --threads, --numel and --scale must be positive, --warmup non-negative")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print one table per workload, return ``{"environment", "rows"}``."""
    args = parse_args(argv)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        env = environment()
        print(f"torch {env['torch']}, {env['threads']} threads, CPU capability {env['cpu_capability']}, "
              f"distopt backend {env['distopt_backend']} (setting {env['distopt_backend_setting']!r}), "
              f"1-min load average {_fmt(env['load_average_1min'], '.2f')} at start")  # fmt: skip
        try:
            chosen = select(candidates(), args.optimizers)
        except ValueError as err:
            raise SystemExit(f"python -m distopt.bench: {err}") from None
        for c in chosen:
            if c.factory is None:
                print(f"{c.name}: {c.notes}")
        rows: list[Row] = []
        for workload in ("single", "gpt2") if args.workload == "all" else (args.workload,):
            rows += run_workload(workload, chosen, args)
    finally:
        torch.set_num_threads(old_threads)
    result = {"environment": env, "rows": [asdict(r) for r in rows]}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, allow_nan=False)
    return result


if __name__ == "__main__":
    main()
