"""Many parameters per op call (functional's [Note: many parameters per call]) changes nothing but speed.

- each ``*_multi_`` op updates every parameter bitwise as its single-parameter op does,
  with each parameter's own coefficients, gradient scale and skip counter;
- a refused call (one bad entry anywhere) changes nothing;
- ``step()``, which groups the parameters into these calls, gives bitwise the results of
  updating them one by one, for every registry case and dtype;
- ``add_one_``, which advances every parameter's ``step`` in one call, does what ``+= 1`` does.
"""

from __future__ import annotations

import pytest
import torch

import distopt
from distopt import _ops, quant
from distopt.functional import AdamWCoeffs, SGDCoeffs
from distopt.optim import stepping
from tests.conftest import backend, threads
from tests.registry import CASES, DTYPES, SHAPES, assert_bitwise_equal, clone_params, make_params, run_steps

# The ops share the blocks (elements) of all of a call's parameters among the threads,
# so a task may span several. "mixed": tail blocks, an empty parameter, exact blocks,
# 3-D, one block; "boundary": 2 x 16 blocks (2 x 4096 elements) around an empty one, so
# that with 2 threads the second task starts exactly at a parameter.
LAYOUTS = {
    "mixed": [(33, 300), (0, 300), (8, 256), (7, 3, 40), (1, 64)],
    "boundary": [(16, 256), (0, 300), (16, 256)],
}
ADAMW = [AdamWCoeffs.for_step(1e-3 * (k + 1), (0.9, 0.99), 1e-8, 0.1 * k, k + 1) for k in range(5)]
SGD = [SGDCoeffs.for_step(0.05 * (k + 1), 0.9, 0.1 * (k % 2), 0.01 * k, False, k == 0) for k in range(5)]
# non-finite and overflowing gradients in several parameters: (element, value) by position
BAD = {0: (300, float("nan")), 2: (5, float("inf")), 3: (7, float("-inf")), 4: (10, 3e38)}


def parameters(dtype, *, bits: int, states: int, layout: str = "mixed", signed=(True, False, False)):
    """Per parameter: param, grad (some with a non-finite or overflowing value), states
    (codes + absmax, or fp32), scale, count."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for k, shape in enumerate(LAYOUTS[layout]):
        p = torch.randn(shape, generator=gen).to(dtype)
        g = (torch.randn(shape, generator=gen) * 0.1).to(dtype)
        if k in BAD and g.numel() > BAD[k][0]:
            g.view(-1)[BAD[k][0]] = BAD[k][1]  # its block (8-bit) or element (32-bit) skipped
        slots = []
        for s in range(states):
            x = torch.randn(shape, generator=gen) if signed[s] else torch.rand(shape, generator=gen)
            slots.append(list(quant.quantize_blockwise(x, quant.qmap(signed[s]), True)) if bits == 8 else [x])
        scale = torch.tensor(0.5 + 0.25 * k)
        out.append((p, g, slots, scale, torch.zeros((), dtype=torch.int64)))
    return out


def cloned(params):
    return [
        (p.clone(), g, [[t.clone() for t in slot] for slot in slots], sc, c.clone()) for p, g, slots, sc, c in params
    ]


def flat(coeffs):
    return [x for c in coeffs for x in c.flat]


def assert_same(a, b):
    for (p, _, slots, _, count), (q, _, twin_slots, _, twin_count) in zip(a, b):
        assert_bitwise_equal(p, q)
        assert_bitwise_equal(count, twin_count)
        for slot, twin in zip(slots, twin_slots):
            for t, u in zip(slot, twin):
                assert_bitwise_equal(t, u)


THREADS = pytest.mark.parametrize("nthreads", [2, 1, 3], ids=lambda n: f"{n}threads")
LAYOUT = pytest.mark.parametrize("layout", list(LAYOUTS))


@LAYOUT
@THREADS
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adamw", "amsgrad"])
def test_adamw8bit_multi_matches_one_call_per_parameter(kernels_built, dtype, amsgrad, nthreads, layout):
    with threads(nthreads):
        adamw8bit_both_ways(dtype, amsgrad, layout)


def adamw8bit_both_ways(dtype, amsgrad, layout):
    ops, s, u = _ops.ops(), quant.qmap(True), quant.qmap(False)
    nstates = 3 if amsgrad else 2
    many = parameters(dtype, bits=8, states=nstates, layout=layout)
    one = cloned(many)
    for (p, g, slots, scale, count), c in zip(one, ADAMW):
        vmax = slots[2] if amsgrad else [None, None]
        ops.adamw8bit_(p, g, *slots[0], *slots[1], *vmax, s, u, None, scale, count, *c.scalars)
    lists = [[x[2][k][i] for x in many] if k < nstates else [] for k in range(3) for i in range(2)]
    ops.adamw8bit_multi_(
        [x[0] for x in many],
        [x[1] for x in many],
        *lists,
        s,
        u,
        [x[3] for x in many],
        [x[4] for x in many],
        flat(ADAMW[: len(many)]),
    )
    assert_same(many, one)
    assert many[0][4].item() == 256  # the NaN's block, counted once
    assert [x[4].item() > 0 for x in many][2:] == [True] * (len(many) - 2)  # and the later ones


@LAYOUT
@THREADS
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sgd8bit_multi_matches_one_call_per_parameter(kernels_built, dtype, nthreads, layout):
    with threads(nthreads):
        sgd8bit_both_ways(dtype, layout)


def sgd8bit_both_ways(dtype, layout):
    ops, s = _ops.ops(), quant.qmap(True)
    many = parameters(dtype, bits=8, states=1, layout=layout)
    one = cloned(many)
    for (p, g, slots, scale, count), c in zip(one, SGD):
        ops.sgd8bit_(p, g, *slots[0], s, None, scale, count, *c.scalars)
    ops.sgd8bit_multi_(
        [x[0] for x in many],
        [x[1] for x in many],
        [x[2][0][0] for x in many],
        [x[2][0][1] for x in many],
        s,
        [x[3] for x in many],
        [x[4] for x in many],
        flat(SGD[: len(many)]),
    )
    assert_same(many, one)


@LAYOUT
@THREADS
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adamw", "amsgrad"])
def test_adamw32_multi_matches_one_call_per_parameter(kernels_built, dtype, amsgrad, nthreads, layout):
    with threads(nthreads):
        adamw32_both_ways(dtype, amsgrad, layout)


def adamw32_both_ways(dtype, amsgrad, layout):
    ops, nstates = _ops.ops(), 3 if amsgrad else 2
    many = parameters(dtype, bits=32, states=nstates, layout=layout)
    one = cloned(many)
    for (p, g, slots, scale, count), c in zip(one, ADAMW):
        vmax = slots[2][0] if amsgrad else None
        ops.adamw32_(p, g, slots[0][0], slots[1][0], vmax, scale, count, *c.scalars)
    lists = [[x[2][k][0] for x in many] if k < nstates else [] for k in range(3)]
    ops.adamw32_multi_(
        [x[0] for x in many],
        [x[1] for x in many],
        *lists,
        [x[3] for x in many],
        [x[4] for x in many],
        flat(ADAMW[: len(many)]),
    )
    assert_same(many, one)
    assert many[0][4].item() == 1
    assert [x[4].item() for x in many][2:] == [1] * (len(many) - 2)


@LAYOUT
@THREADS
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("momentum", [True, False], ids=["momentum", "none"])
def test_sgd32_multi_matches_one_call_per_parameter(kernels_built, dtype, momentum, nthreads, layout):
    with threads(nthreads):
        sgd32_both_ways(dtype, momentum, layout)


def sgd32_both_ways(dtype, momentum, layout):
    ops = _ops.ops()
    many = parameters(dtype, bits=32, states=1 if momentum else 0, layout=layout)
    one = cloned(many)
    for (p, g, slots, scale, count), c in zip(one, SGD):
        ops.sgd32_(p, g, slots[0][0] if momentum else None, scale, count, *c.scalars)
    bufs = [x[2][0][0] for x in many] if momentum else []
    ops.sgd32_multi_(
        [x[0] for x in many],
        [x[1] for x in many],
        bufs,
        [x[3] for x in many],
        [x[4] for x in many],
        flat(SGD[: len(many)]),
    )
    assert_same(many, one)


def test_a_refused_multi_call_changes_nothing(kernels_built):
    ops, s, u = _ops.ops(), quant.qmap(True), quant.qmap(False)
    many = parameters(torch.float32, bits=8, states=2)
    before = cloned(many)
    grads = [x[1] for x in many]
    grads[-2] = grads[-2][:, :-1].contiguous()  # the next-to-last parameter's gradient has the wrong shape
    lists = [[x[2][k][i] for x in many] for k in range(2) for i in range(2)]
    with pytest.raises(RuntimeError, match=r"grad shape(.|\n)*in parameter 3 of the 5 in this call"):
        ops.adamw8bit_multi_(
            [x[0] for x in many],
            grads,
            *lists,
            [],
            [],
            s,
            u,
            [x[3] for x in many],
            [x[4] for x in many],
            flat(ADAMW[: len(many)]),
        )
    assert_same(many, before)
    # and the lists must agree in length, and the coefficients with them
    with pytest.raises(RuntimeError, match="one entry per parameter"):
        ops.sgd32_multi_(
            [x[0] for x in many],
            [x[1] for x in many][:-1],
            [],
            [x[3] for x in many],
            [x[4] for x in many],
            flat(SGD[: len(many)]),
        )
    with pytest.raises(RuntimeError, match="6 values per parameter"):
        ops.sgd32_multi_(
            [x[0] for x in many],
            [x[1] for x in many],
            [],
            [x[3] for x in many],
            [x[4] for x in many],
            flat(SGD[: len(many)])[:-1],
        )
    with pytest.raises(RuntimeError, match="one entry per parameter"):  # no parameters, but a gradient
        ops.sgd32_multi_([], [many[0][1]], [], [], [], [])
    assert_same(many, before)


@pytest.mark.parametrize("multi", [False, True], ids=["adamw8bit_", "adamw8bit_multi_"])
def test_a_state_whose_absmax_is_smaller_than_the_others_is_refused(kernels_built, multi):
    """A max_exp_avg_sq with one absmax where exp_avg has one per block would be read and
    written past its end."""
    ops, s, u = _ops.ops(), quant.qmap(True), quant.qmap(False)
    p, g = torch.randn(4, 300), torch.randn(4, 300)
    m, v, vmax = (list(quant.quantize_blockwise(torch.rand(4, 300), quant.qmap(k == 0), True)) for k in range(3))
    backing = torch.zeros(64)
    vmax[1] = backing[:1]  # one value, not 4 x 2
    scale, count = torch.tensor(1.0), torch.zeros((), dtype=torch.int64)
    with pytest.raises(RuntimeError, match="share one block layout"):
        if multi:
            ops.adamw8bit_multi_(
                [p], [g], [m[0]], [m[1]], [v[0]], [v[1]], [vmax[0]], [vmax[1]], s, u, [scale], [count], ADAMW[0].flat
            )
        else:
            ops.adamw8bit_(p, g, *m, *v, *vmax, s, u, None, scale, count, *ADAMW[0].scalars)
    assert not backing.any()


def test_the_8bit_multi_ops_refuse_per_tensor_absmax(kernels_built):
    p, g = torch.randn(4, 300), torch.randn(4, 300)
    codes, absmax = quant.quantize_blockwise(torch.randn(4, 300), quant.qmap(True), False)
    with pytest.raises(RuntimeError, match="block-wise states"):
        _ops.ops().sgd8bit_multi_(
            [p],
            [g],
            [codes],
            [absmax],
            quant.qmap(True),
            [torch.tensor(1.0)],
            [torch.zeros((), dtype=torch.int64)],
            SGD[1].flat,
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_step_in_few_calls_matches_one_update_per_parameter(kernels_built, case, dtype, monkeypatch):
    """The registry's shapes mix 8-bit, 32-bit (1-D, short rows) and empty parameters, and
    the cases block-wise and per-tensor absmax, clipping and paging."""
    params = make_params(SHAPES, dtype)
    twins = clone_params(params)
    with backend("fused"):
        opt = case.make(params)
        run_steps(opt, params, 3)
        one_by_one = case.make(twins)
        monkeypatch.setattr(stepping, "update_in_few_calls", lambda steps, *rest: steps)
        run_steps(one_by_one, twins, 3)
    for p, q in zip(params, twins):
        assert_bitwise_equal(p, q)
        for key, value in opt.state[p].items():
            assert_bitwise_equal(value, one_by_one.state[q][key])


def test_add_one_advances_every_counter_and_refuses_without_changing_any(kernels_built):
    counters = [
        torch.zeros((), dtype=torch.float32),
        torch.tensor([41], dtype=torch.int64),
        torch.tensor(2.5, dtype=torch.float64),
    ]
    _ops.ops().add_one_(counters)
    assert [c.item() for c in counters] == [1.0, 42, 3.5]
    with pytest.raises(RuntimeError, match="one-element CPU tensors"):
        _ops.ops().add_one_([counters[0], torch.zeros(2)])
    for dtype in (torch.bfloat16, torch.uint16, torch.uint32, torch.bool):
        with pytest.raises(RuntimeError, match="one-element CPU tensors"):
            _ops.ops().add_one_([counters[0], torch.zeros((), dtype=dtype)])
    assert [c.item() for c in counters] == [1.0, 42, 3.5]


MIXED = [
    ("AdamW8bit", distopt.AdamW8bit, {}, {"amsgrad": True}),
    ("AdamW32bit", distopt.AdamW32bit, {}, {"amsgrad": True}),
    ("SGD8bit", distopt.SGD8bit, {"lr": 0.05, "momentum": 0.9}, {"momentum": 0.0}),
    ("SGD32bit", distopt.SGD32bit, {"lr": 0.05, "momentum": 0.9}, {"momentum": 0.0, "nesterov": False}),
]


@pytest.mark.parametrize(("name", "cls", "kwargs", "second"), MIXED, ids=[m[0] for m in MIXED])
def test_step_in_few_calls_on_mixed_groups(kernels_built, name, cls, kwargs, second, monkeypatch):
    """Groups that differ in their states (amsgrad, momentum), three dtypes in one group,
    and a non-contiguous parameter (updated through a contiguous copy, written back)."""

    def model():
        gen = torch.Generator().manual_seed(0)
        first = [
            torch.randn(33, 300, generator=gen),
            torch.randn(8, 256, generator=gen).bfloat16(),
            torch.randn(7, 3, 40, generator=gen).half(),
            torch.randn(300, 40, generator=gen).t(),  # non-contiguous
        ]
        other = [torch.randn(12, 300, generator=gen), torch.randn(5, 512, generator=gen).bfloat16()]
        first, other = [torch.nn.Parameter(t) for t in first], [torch.nn.Parameter(t) for t in other]
        return first + other, cls([{"params": first}, {"params": other, **second}], min_8bit_size=64, **kwargs)

    runs = []
    for grouped in (True, False):
        params, opt = model()
        if not grouped:
            monkeypatch.setattr(stepping, "update_in_few_calls", lambda steps, *rest: steps)
        with backend("fused"):
            for k in range(3):
                gen = torch.Generator().manual_seed(100 + k)
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
                opt.step()
        runs.append((params, opt))
    (params, opt), (twins, one_by_one) = runs
    assert not params[3].is_contiguous() and not torch.equal(params[3], model()[0][3])
    for p, q in zip(params, twins):
        assert_bitwise_equal(p, q)
        for key, value in opt.state[p].items():
            assert_bitwise_equal(value, one_by_one.state[q][key])


@pytest.mark.parametrize("cls", [distopt.AdamW8bit, distopt.AdamW32bit, distopt.SGD8bit, distopt.SGD32bit], ids=str)
def test_a_parameter_listed_twice_is_updated_twice_in_order(kernels_built, cls, monkeypatch):
    """torch only warns about a group that holds a parameter twice. The two updates of
    one call would write the same memory from different threads; the op runs such
    parameters one after another instead, as one call each would: the results do not
    depend on the thread count and equal the one-by-one path's."""
    kwargs = {"lr": 0.05, "momentum": 0.9} if issubclass(cls, distopt.SGD) else {}
    runs = []
    for nthreads, grouped in ((1, True), (2, True), (3, True), (2, False)):
        gen = torch.Generator().manual_seed(0)
        p, other = (torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in ((64, 256), (32, 256)))
        with pytest.warns(UserWarning, match="duplicate parameters"):
            opt = cls([p, other, p], min_8bit_size=64, **kwargs)
        if not grouped:
            monkeypatch.setattr(stepping, "update_in_few_calls", lambda steps, *rest: steps)
        with threads(nthreads), backend("fused"):
            for k in range(3):
                gen = torch.Generator().manual_seed(100 + k)
                p.grad, other.grad = (torch.randn(t.shape, generator=gen) for t in (p, other))
                opt.step()
        runs.append([p, other, *opt.state[p].values(), *opt.state[other].values()])
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert_bitwise_equal(a, b)
