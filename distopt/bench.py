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
timed ``opt.step()`` calls, after ``--warmup`` untimed ones. The torch baselines run alone
first; every other optimizer then runs with its family's baseline beside it (each on its
own copy of the parameters), the two stepping in turns, and its ratio is the baseline's
median over its own from that pair: drift in the machine's speed falls on both (the first step allocates state
and may build distopt's C++ kernels; torchao compiles on its first step). State bytes per
parameter element count each per-parameter state tensor once; the scalars ``step`` and
``nonfinite_count`` and bitsandbytes' shared quantization maps (``qmap*``) are excluded.

Workloads: ``single`` (one parameter of ``--numel`` elements, shaped ``[numel/1024, 1024]``),
``gpt2`` (GPT-2 small's 148 tensors, 124,439,808 elements; ``--scale`` shrinks every
dimension for quick runs), ``big`` (one ``[65536, 1024]`` parameter, 67,108,864 elements;
``--big-numel`` shrinks it) and ``bf16`` (the single workload's parameter in bfloat16, every
optimizer on the same bf16 parameters; torch keeps its AdamW state in bf16 then). ``all``
runs the four. ``--plot PATH`` draws the throughput and state-memory figure of
``docs/benchmarks.md`` from the same run (matplotlib, :mod:`distopt.bench_plot`).

Extra tables, after the throughput tables, all from the same run:

- bandwidth (always): bytes a distopt step moves per element, over its time. An fp32 step
  reads p and g and writes p (12 B/element) and reads and writes every state tensor once
  (2 x state bytes: AdamW8bit 16 B/element plus absmax, AdamW32bit 28, SGD8bit 14 plus
  absmax, SGD32bit 20). Against an in-place fp32 ``a.add_(b, alpha=s)`` probe (12 B/element:
  read a, b; write a) on the same number of elements, measured in this run: GB/s and the
  percentage of the probe's GB/s;
- with ``--extras``: the cost of ``percentile_clipping=95`` (AdamW8bit with over without, a
  time ratio, each workload); thread scaling of distopt AdamW8bit and torch AdamW fused at 1
  and 2 threads (single workload, speed-up = time at 1 / time at 2). These two time their
  pair's steps in turns (``interleaved_median_seconds``), as their ratios are the result and
  this kind of VM's speed drifts by up to 2x within a run; extra memory during
  ``step()`` after the first, in a fresh ``python -c`` process per optimizer (single
  workload): the ``ru_maxrss`` growth over ``--steps`` steps that follow the first step
  (which allocates the state; on Linux the peak is reset after it through
  ``/proc/self/clear_refs`` so its transients do not hide later ones), in MiB per thread.

``main()`` returns what it prints, for tests; ``--json`` writes the same.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from types import ModuleType

import torch

import distopt
from distopt import _build, functional

Shape = tuple[int, ...]
Optimizer = torch.optim.Optimizer
Factory = Callable[[list[torch.Tensor]], Optimizer]

ADAMW_BASELINE = "torch AdamW fused"
SGD_BASELINES = ("torch SGD", "torch SGD foreach", "torch SGD fused")
SGD_KWARGS = {"lr": 1e-2, "momentum": 0.9}
_SCALAR_STATE = ("step", "nonfinite_count")
WORKLOADS = ("single", "gpt2", "big", "bf16")
WORKLOAD_DTYPES = {"bf16": torch.bfloat16}  # every other workload is fp32
BIG_NUMEL = 65536 * 1024
PROBE_BYTES_PER_ELEMENT = 12  # a.add_(b, alpha=s) on fp32: read a, b; write a
CLIP_PERCENTILE = 95
SCALING_THREADS = (1, 2)
SCALING_OPTIMIZERS = ("distopt AdamW8bit", ADAMW_BASELINE)


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
    baseline_ms_paired: float | None = None  # the baseline's ms/step, timed in turns with this row's
    notes: str = ""


@dataclass
class Bandwidth:
    """A distopt row's bytes moved per second, against the probe on the same element count."""

    name: str
    workload: str
    numel: int
    bytes_per_element: float
    gb_per_s: float
    probe_gb_per_s: float
    percent_of_probe: float


@dataclass
class Probe:
    """The in-place fp32 ``a.add_(b, alpha=s)`` probe: the memory speed a step is held against."""

    workload: str
    numel: int
    ms: float
    gb_per_s: float


@dataclass
class Clipping:
    """AdamW8bit with ``percentile_clipping`` over without, same parameters, same run."""

    workload: str
    numel: int
    percentile: int
    ms_without: float
    ms_with: float
    time_ratio: float


@dataclass
class Scaling:
    """One optimizer's step time at 1 and 2 threads."""

    name: str
    workload: str
    numel: int
    ms_per_thread_count: dict[str, float]
    speedup: float


@dataclass
class StepMemory:
    """Peak RSS growth over the steps after the first, in a fresh process."""

    name: str
    workload: str
    numel: int
    threads: int
    steps: int
    peak_rss_delta_mib: float
    mib_per_thread: float
    rss_delta_mib: float  # current RSS after minus before (psutil when importable)
    peak_reset: bool  # whether the first step's peak was cleared before measuring


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


def workload_shapes(workload: str, numel: int, scale: float, big_numel: int = BIG_NUMEL) -> list[Shape]:
    if workload in ("single", "bf16"):
        return [(max(1, numel // 1024), 1024)]
    if workload == "gpt2":
        return gpt2_shapes(scale)
    if workload == "big":
        return [(max(1, big_numel // 1024), 1024)]
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


def make_params(shapes: Sequence[Shape], seed: int = 0, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Fresh parameters of ``shapes`` and ``dtype`` with gradients set, from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-2).to(dtype)
    return params


def median_seconds(fn: Callable[[], object], steps: int, warmup: int) -> float:
    """Median seconds of ``fn`` after ``warmup`` untimed calls."""
    return interleaved_median_seconds([fn], steps, warmup)[0]


def interleaved_median_seconds(
    fns: Sequence[Callable[[], object]],
    steps: int,
    warmup: int,
    before: Sequence[Callable[[], object]] | None = None,
) -> list[float]:
    """Median seconds of each of ``fns``, timed in turns: one call of each per round, the order
    reversed every other round, so that a drift in the machine's speed (a busy neighbour on a
    VM) falls on all of them alike and their ratio keeps. ``before[i]``, when given, runs
    untimed ahead of each call of ``fns[i]`` (setting a thread count, say)."""
    before = before or [lambda: None] * len(fns)
    for fn, prepare in zip(fns, before, strict=True):
        for _ in range(warmup):
            prepare()
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for step in range(steps):
        order = range(len(fns)) if step % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            before[i]()
            start = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def measure(
    factory: Factory,
    shapes: Sequence[Shape],
    steps: int,
    warmup: int,
    dtype: torch.dtype = torch.float32,
    paired: Factory | None = None,
) -> tuple[float, int, float | None]:
    """Median seconds per ``opt.step()``, state bytes, and, with ``paired``, the median seconds
    of a second optimizer on its own copy of the same parameters, the two timed in turns."""
    opts = [factory(make_params(shapes, dtype=dtype))]
    if paired is not None:
        opts.append(paired(make_params(shapes, dtype=dtype)))
    try:
        seconds = interleaved_median_seconds([o.step for o in opts], steps, warmup)
        return seconds[0], state_bytes(opts[0]), seconds[1] if paired else None
    finally:  # free params, gradients and state before the next optimizer (gpt2: ~2 GB)
        for o in opts:
            o.state.clear()
        del opts
        gc.collect()


def measure_row(
    cand: Candidate, workload: str, shapes: Sequence[Shape], args: argparse.Namespace, baseline: Candidate | None
) -> Row:
    """``cand`` on ``workload``; with ``baseline``, its ratio from steps of the two timed in turns."""
    numel = sum(math.prod(s) for s in shapes)
    row = Row(cand.name, workload, numel, None, None, None, baseline="", notes=cand.notes)
    if cand.factory is None:
        return row
    try:
        dtype = WORKLOAD_DTYPES.get(workload, torch.float32)
        paired = None if baseline is None else baseline.factory
        seconds, nbytes, base_seconds = measure(cand.factory, shapes, args.steps, args.warmup, dtype, paired)
    except Exception as err:
        if cand.name.startswith("distopt"):
            raise  # distopt's own optimizers must run; a failure here is a bug to see
        row.notes = f"failed: {type(err).__name__}: {err}"
        return row
    row.ms_per_step, row.elements_per_s, row.state_bytes_per_param = seconds * 1e3, numel / seconds, nbytes / numel
    if base_seconds is not None:
        row.baseline, row.baseline_ms_paired, row.ratio_vs_baseline = (
            baseline.name,
            base_seconds * 1e3,
            base_seconds / seconds,
        )
    return row


def pick_baselines(rows: list[Row]) -> dict[str, str]:
    """Family -> baseline name: torch's fused AdamW, the fastest torch SGD; "none" where unmeasured."""
    measured = {r.name: r for r in rows if r.elements_per_s}
    sgd = [measured[n] for n in SGD_BASELINES if n in measured]
    baselines = {"adamw": ADAMW_BASELINE if ADAMW_BASELINE in measured else "none"}
    baselines["sgd"] = max(sgd, key=lambda r: r.elements_per_s).name if sgd else "none"
    return baselines


def run_workload(workload: str, chosen: list[Candidate], args: argparse.Namespace) -> list[Row]:
    """The torch baselines alone first, to find the fastest SGD; then every other optimizer with
    its family's baseline timed in turns beside it, so that each ratio comes from one stretch of
    time (this kind of VM's speed drifts by up to 2x within a run)."""
    shapes = workload_shapes(workload, args.numel, args.scale, args.big_numel)
    by_name = {c.name: c for c in chosen}
    torch_names = {ADAMW_BASELINE, *SGD_BASELINES}
    rows = [measure_row(c, workload, shapes, args, None) for c in chosen if c.name in torch_names]
    baselines = pick_baselines(rows)
    measured = {r.name: r for r in rows if r.elements_per_s}
    for r in rows:
        r.baseline = baselines[by_name[r.name].family]
        if r.name == r.baseline:
            r.notes, r.ratio_vs_baseline, r.baseline_ms_paired = "baseline", 1.0, r.ms_per_step
        elif r.name in measured and r.baseline in measured:  # a slower torch SGD: against the baseline's row
            r.ratio_vs_baseline = r.elements_per_s / measured[r.baseline].elements_per_s
    for c in chosen:
        if c.name not in torch_names:
            rows.append(measure_row(c, workload, shapes, args, by_name.get(baselines[c.family])))
            rows[-1].baseline = baselines[c.family]
    print_table(workload, shapes, rows, baselines, args)
    return rows


# --- extra measurements ----------------------------------------------------------------


def measure_probe(workload: str, numel: int, steps: int, warmup: int) -> Probe:
    """Median time of an in-place fp32 ``a.add_(b, alpha=s)`` on ``numel`` elements."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(numel, generator=gen), torch.randn(numel, generator=gen)
    seconds = median_seconds(lambda: x.add_(y, alpha=1e-3), steps, warmup)
    return Probe(workload, numel, seconds * 1e3, PROBE_BYTES_PER_ELEMENT * numel / seconds / 1e9)


def bandwidth(rows: list[Row], probe: Probe) -> list[Bandwidth]:
    """Bytes moved per second by each measured distopt row: read p and g, write p (3 x the
    parameter's element size), read and write every state byte once."""
    out = []
    for r in rows:
        if r.name.startswith("distopt") and r.elements_per_s and r.state_bytes_per_param is not None:
            param_bytes = WORKLOAD_DTYPES.get(r.workload, torch.float32).itemsize
            per_elem = 3 * param_bytes + 2 * r.state_bytes_per_param
            gbps = per_elem * r.elements_per_s / 1e9
            out.append(Bandwidth(r.name, r.workload, r.numel, per_elem, gbps, probe.gb_per_s,
                                 100 * gbps / probe.gb_per_s))  # fmt: skip
    return out


def measure_clipping(workload: str, shapes: Sequence[Shape], args: argparse.Namespace) -> Clipping:
    """AdamW8bit with ``percentile_clipping=95`` against without, each on its own copy of the
    same parameters, their steps timed in turns."""
    dtype = WORKLOAD_DTYPES.get(workload, torch.float32)
    without = distopt.AdamW8bit(make_params(shapes, dtype=dtype))
    with_ = distopt.AdamW8bit(make_params(shapes, dtype=dtype), percentile_clipping=CLIP_PERCENTILE)
    try:
        ms_without, ms_with = (
            s * 1e3 for s in interleaved_median_seconds([without.step, with_.step], args.steps, args.warmup)
        )
    finally:
        del without, with_
        gc.collect()
    numel = sum(math.prod(s) for s in shapes)
    return Clipping(workload, numel, CLIP_PERCENTILE, ms_without, ms_with, ms_with / ms_without)


def measure_scaling(shapes: Sequence[Shape], args: argparse.Namespace) -> list[Scaling]:
    """distopt AdamW8bit and torch AdamW fused at 1 and 2 threads, each optimizer's steps at
    the two thread counts timed in turns; speed-up = t(1) / t(2)."""
    factories = {c.name: c.factory for c in candidates() if c.name in SCALING_OPTIMIZERS}
    numel = sum(math.prod(s) for s in shapes)
    out = []
    try:
        for name in SCALING_OPTIMIZERS:
            opt = factories[name](make_params(shapes))
            set_threads = [lambda n=n: torch.set_num_threads(n) for n in SCALING_THREADS]
            seconds = interleaved_median_seconds([opt.step] * len(SCALING_THREADS), args.steps, args.warmup,
                                                 before=set_threads)  # fmt: skip
            del opt
            gc.collect()
            ms = {str(n): s * 1e3 for n, s in zip(SCALING_THREADS, seconds, strict=True)}
            first, last = (ms[str(n)] for n in (SCALING_THREADS[0], SCALING_THREADS[-1]))
            out.append(Scaling(name, "single", numel, ms, first / last))
    finally:
        torch.set_num_threads(args.threads)
    return out


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _current_rss() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(name: str, shapes: Sequence[Shape], steps: int, threads: int) -> dict:
    """In a fresh process: first step, then the peak RSS growth over ``steps`` more (bytes)."""
    import resource

    torch.set_num_threads(threads)
    factory = next(c.factory for c in candidates() if c.name == name)
    params = make_params(shapes)
    opt = factory(params)
    opt.step()  # allocates the state (and builds nothing: the parent process built the kernels)
    gc.collect()
    reset = _reset_peak_rss()
    rss0, peak0 = _current_rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(steps):
        opt.step()
    peak1, rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, _current_rss()
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB elsewhere
    return {"peak_delta": max(0, (peak1 - peak0) * scale), "rss_delta": rss1 - rss0, "peak_reset": reset}


def measure_step_memory(name: str, shapes: Sequence[Shape], args: argparse.Namespace) -> StepMemory:
    """Run ``memory_child`` in a fresh ``python -c`` process and report MiB (per thread)."""
    code = (
        "import json, sys; from distopt import bench; a = sys.argv; "
        "print(json.dumps(bench.memory_child(a[1], json.loads(a[2]), int(a[3]), int(a[4]))))"
    )
    argv = [sys.executable, "-c", code, name, json.dumps([list(s) for s in shapes]), str(args.steps), str(args.threads)]
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    got = json.loads(done.stdout.strip().splitlines()[-1])
    mib = got["peak_delta"] / 2**20
    numel = sum(math.prod(s) for s in shapes)
    return StepMemory(name, "single", numel, args.threads, args.steps, mib, mib / args.threads,
                      got["rss_delta"] / 2**20, got["peak_reset"])  # fmt: skip


def run_extras(chosen: list[Candidate], workloads: Sequence[str], args: argparse.Namespace) -> dict:
    """Clipping cost per workload; thread scaling and step memory on the single workload."""
    clipping = [
        measure_clipping(w, workload_shapes(w, args.numel, args.scale, args.big_numel), args) for w in workloads
    ]
    single = workload_shapes("single", args.numel, args.scale)
    scaling = measure_scaling(single, args)
    names = [c.name for c in chosen if c.name.startswith("distopt") or c.name == ADAMW_BASELINE]
    memory = [measure_step_memory(n, single, args) for n in names]
    print_extras(clipping, scaling, memory)
    return {"clipping": clipping, "thread_scaling": scaling, "step_memory": memory}


# --- reporting -------------------------------------------------------------------------


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def print_table(
    workload: str, shapes: Sequence[Shape], rows: list[Row], baselines: dict[str, str], args: argparse.Namespace
) -> None:
    numel = sum(math.prod(s) for s in shapes)
    dtype = str(WORKLOAD_DTYPES.get(workload, torch.float32)).removeprefix("torch.")
    print(f"\n== workload {workload}: {len(shapes)} {dtype} tensor(s), {numel:,} elements; "
          f"median of {args.steps} timed steps after {args.warmup} warm-up ==")  # fmt: skip
    print(f"ratio = baseline's ms/step / the row's (> 1: faster), the two optimizers' steps timed in turns "
          f"('base ms': the baseline's in that pair). AdamW rows vs {baselines['adamw']}; SGD rows vs "
          f"{baselines['sgd']} (fastest of {', '.join(SGD_BASELINES)}, each alone; momentum 0.9)")  # fmt: skip
    width = max(len("optimizer"), *(len(r.name) for r in rows))
    print(f"{'optimizer':<{width}}  {'ms/step':>9}  {'G elem/s':>8}  {'state B/elem':>12}  {'base ms':>9}  "
          f"{'vs baseline':>11}  notes")  # fmt: skip
    for r in rows:
        gelems = None if r.elements_per_s is None else r.elements_per_s / 1e9
        print(f"{r.name:<{width}}  {_fmt(r.ms_per_step, '9.2f'):>9}  {_fmt(gelems, '8.3f'):>8}  "
              f"{_fmt(r.state_bytes_per_param, '12.3f'):>12}  {_fmt(r.baseline_ms_paired, '9.2f'):>9}  "
              f"{_fmt(r.ratio_vs_baseline, '.3f', 'x'):>11}  {r.notes}".rstrip())  # fmt: skip


def print_bandwidth(probes: list[Probe], bw: list[Bandwidth]) -> None:
    print("\n== bandwidth: bytes a step moves / its time, vs an in-place fp32 a.add_(b, alpha=s) probe "
          f"({PROBE_BYTES_PER_ELEMENT} B/element) on the same element count, same run ==")  # fmt: skip
    for p in probes:
        print(f"probe {p.workload}: {p.numel:,} elements, {p.ms:.2f} ms, {p.gb_per_s:.1f} GB/s")
    width = max([len("optimizer"), *(len(b.name) for b in bw)])
    print(f"{'optimizer':<{width}}  {'workload':<8}  {'B/elem':>7}  {'GB/s':>7}  {'% of probe':>10}")
    for b in bw:
        print(f"{b.name:<{width}}  {b.workload:<8}  {b.bytes_per_element:7.3f}  {b.gb_per_s:7.1f}  "
              f"{b.percent_of_probe:9.1f}%")  # fmt: skip


def print_extras(clipping: list[Clipping], scaling: list[Scaling], memory: list[StepMemory]) -> None:
    print(f"\n== percentile_clipping={CLIP_PERCENTILE} cost: distopt AdamW8bit with / without, same run ==")
    for c in clipping:
        print(f"{c.workload:<8}  without {c.ms_without:8.2f} ms  with {c.ms_with:8.2f} ms  "
              f"ratio {c.time_ratio:.3f}x")  # fmt: skip
    counts = " and ".join(map(str, SCALING_THREADS))
    print(f"\n== thread scaling (single workload): ms/step at {counts} threads, speed-up = t(1) / t(2) ==")
    width = max([len("optimizer"), *(len(s.name) for s in scaling)])
    for s in scaling:
        cols = "  ".join(f"{n} thr {s.ms_per_thread_count[str(n)]:8.2f} ms" for n in SCALING_THREADS)
        print(f"{s.name:<{width}}  {cols}  speed-up {s.speedup:.2f}x")
    print("\n== extra memory during step() after the first (fresh process each; peak RSS growth) ==")
    width = max([len("optimizer"), *(len(m.name) for m in memory)])
    print(f"{'optimizer':<{width}}  {'threads':>7}  {'steps':>5}  {'peak MiB':>8}  {'MiB/thread':>10}  "
          f"{'RSS MiB':>8}  peak reset")  # fmt: skip
    for m in memory:
        print(f"{m.name:<{width}}  {m.threads:>7}  {m.steps:>5}  {m.peak_rss_delta_mib:8.2f}  "
              f"{m.mib_per_thread:10.2f}  {m.rss_delta_mib:8.2f}  {'yes' if m.peak_reset else 'no'}")  # fmt: skip


def environment() -> dict:
    """What the figures depend on; the distopt backend is the one actually used on CPU."""
    fused = functional.use_fused(torch.device("cpu"))  # builds the C++ kernels if needed
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": _build.cpu_capability(),  # the kernels' build target (torch's, refined)
        "distopt_backend_setting": distopt.get_backend(),
        "distopt_backend": "fused" if fused else "reference",
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,  # other work skews figures
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m distopt.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workload", choices=[*WORKLOADS, "all"], default="single")
    parser.add_argument("--numel", type=int, default=16_777_216, help="elements of the single workload's parameter")
    parser.add_argument("--big-numel", type=int, default=BIG_NUMEL, help="elements of the big workload's parameter")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the gpt2 workload's dimensions")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (state, kernel build, compile)")
    parser.add_argument("--optimizers", default="", help="comma list of names to run (torch baselines always run)")
    parser.add_argument("--json", default="", metavar="PATH", help="also write the results to PATH")
    parser.add_argument("--plot", default="", metavar="PATH", help="also draw the results (PNG) to PATH")
    parser.add_argument(
        "--extras", action="store_true", help="also clipping cost, thread scaling and step memory (slower)"
    )
    args = parser.parse_args(argv)
    if min(args.steps, args.threads, args.numel, args.big_numel) < 1 or args.warmup < 0 or args.scale <= 0:
        parser.error("--steps, --threads, --numel, --big-numel and --scale must be positive, --warmup non-negative")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the tables; return ``{"environment", "rows", "probes", "bandwidth",
    "clipping", "thread_scaling", "step_memory"}`` (the last three None without ``--extras``).
    ``--device cuda`` first: the GPU benchmark instead (distopt.bench_cuda)."""
    if (sys.argv[1:] if argv is None else argv)[:2] == ["--device", "cuda"]:
        from . import bench_cuda

        return bench_cuda.main((sys.argv[1:] if argv is None else argv)[2:])
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
        probes: list[Probe] = []
        bw: list[Bandwidth] = []
        workloads = WORKLOADS if args.workload == "all" else (args.workload,)
        for workload in workloads:
            got = run_workload(workload, chosen, args)
            probes.append(measure_probe(workload, got[0].numel, args.steps, args.warmup))
            rows, bw = rows + got, bw + bandwidth(got, probes[-1])
        print_bandwidth(probes, bw)
        extras = run_extras(chosen, workloads, args) if args.extras else {}
    finally:
        torch.set_num_threads(old_threads)
    result = {"environment": env, "rows": [asdict(r) for r in rows]}
    result["probes"], result["bandwidth"] = [asdict(p) for p in probes], [asdict(b) for b in bw]
    for key in ("clipping", "thread_scaling", "step_memory"):
        result[key] = [asdict(x) for x in extras[key]] if key in extras else None
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, allow_nan=False)
    if args.plot:
        from . import bench_plot

        bench_plot.plot(result, args.plot)
    return result


if __name__ == "__main__":
    main()
