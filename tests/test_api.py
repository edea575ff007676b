"""The public API: bitsandbytes' signatures and defaults, ``args``, param-group overrides,
validation that names the argument, state layout rules, dtypes and AMP."""

from __future__ import annotations

import inspect
import re
import types

import pytest
import torch

import distopt
from tests.conftest import backend
from tests.registry import make_grads, make_params, run_steps

_SGD_SIG = dict(lr=inspect.Parameter.empty, momentum=0, dampening=0, weight_decay=0, nesterov=False)
_TAIL = dict(args=None, min_8bit_size=4096, percentile_clipping=100, block_wise=True)
_ADAMW_SIG = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, optim_bits=32)
SIGNATURES = {  # ../shared/seeds: bitsandbytes' documented signatures
    "SGD": {**_SGD_SIG, "optim_bits": 32, **_TAIL},
    "SGD8bit": {**_SGD_SIG, **_TAIL},
    "SGD32bit": {**_SGD_SIG, **_TAIL},
    "AdamW": {**_ADAMW_SIG, **_TAIL, "is_paged": False},
    "AdamW8bit": {**_ADAMW_SIG, **_TAIL, "is_paged": False},
    "AdamW32bit": {**_ADAMW_SIG, **_TAIL, "is_paged": False},
    "PagedAdamW": {**_ADAMW_SIG, **_TAIL},
    "PagedAdamW8bit": {**_ADAMW_SIG, **_TAIL},
    "PagedAdamW32bit": {**_ADAMW_SIG, **_TAIL},
}


@pytest.mark.parametrize("name", SIGNATURES)
def test_signature_and_defaults_match_bitsandbytes(name):
    cls = getattr(distopt, name)
    assert cls is getattr(distopt.optim, name) and name in distopt.__all__
    every = list(inspect.signature(cls).parameters.values())
    params = [p for p in every if p.kind != inspect.Parameter.KEYWORD_ONLY]
    assert params[0].name == "params"
    assert {p.name: p.default for p in params[1:]} == SIGNATURES[name]
    assert [p.name for p in params[1:]] == list(SIGNATURES[name])
    extra = {p.name: p.default for p in every if p.kind == inspect.Parameter.KEYWORD_ONLY}
    assert extra == ({} if name.startswith("SGD") else {"spill_dir": None})  # distopt's own, keyword only
    doc = cls.__doc__
    for arg in SIGNATURES[name]:
        assert f"{arg}:" in doc, f"{name}'s docstring does not describe {arg}"


def kinds(opt, p) -> dict[str, torch.dtype]:
    return {k: v.dtype for k, v in opt.state[p].items()}


def stepped(opt, params):
    run_steps(opt, params, 1)
    return opt


def test_width_classes_use_their_own_width():
    (p,) = make_params([(64, 256)])
    assert kinds(stepped(distopt.AdamW8bit([p], optim_bits=32), [p]), p)["exp_avg"] == torch.uint8
    (p,) = make_params([(64, 256)])
    assert kinds(stepped(distopt.AdamW32bit([p], optim_bits=8), [p]), p)["exp_avg"] == torch.float32


@pytest.mark.parametrize("as_mapping", [False, True])
def test_args_override_keywords_and_missing_attributes_fall_back(as_mapping):
    values = dict(optim_bits=8, percentile_clipping=5, block_wise=False)
    args = values if as_mapping else types.SimpleNamespace(**values)
    (p,) = make_params([(64, 256)])
    opt = distopt.AdamW([p], args=args, min_8bit_size=10**9)  # min_8bit_size not in args: the keyword
    group = opt.param_groups[0]
    assert (group["optim_bits"], group["percentile_clipping"], group["block_wise"]) == (8, 5, False)
    assert group["min_8bit_size"] == 10**9
    stepped(opt, [p])
    assert opt.state[p]["exp_avg"].dtype == torch.float32  # 8-bit requested but below min_8bit_size


def test_param_groups_override_quantization_per_group():
    emb, w, v = make_params([(1000, 64), (64, 256), (64, 256)])
    opt = distopt.AdamW8bit(
        [{"params": [emb], "optim_bits": 32}, {"params": [w], "block_wise": False, "percentile_clipping": 50}],
        min_8bit_size=0,
    )
    opt.add_param_group({"params": [v], "min_8bit_size": 10**6, "lr": 0.5})
    run_steps(opt, [emb, w, v], 2)
    assert opt.state[emb]["exp_avg"].dtype == torch.float32
    assert opt.state[w]["exp_avg"].dtype == torch.uint8 and opt.state[w]["exp_avg_absmax"].shape == (1,)
    assert "gnorm_history" in opt.state[w] and "gnorm_history" not in opt.state[emb]
    assert opt.state[v]["exp_avg"].dtype == torch.float32 and opt.param_groups[2]["lr"] == 0.5


BAD_ADAMW = [
    ("lr", dict(lr=-1.0)),
    ("betas[0]", dict(betas=(1.0, 0.999))),
    ("betas[1]", dict(betas=(0.9, -0.1))),
    ("betas", dict(betas=(0.9,))),
    ("eps", dict(eps=-1e-8)),
    ("weight_decay", dict(weight_decay=-0.1)),
    ("amsgrad", dict(amsgrad="yes")),
    ("optim_bits", dict(optim_bits=16)),
    ("percentile_clipping", dict(percentile_clipping=0)),
    ("percentile_clipping", dict(percentile_clipping=101)),
    ("min_8bit_size", dict(min_8bit_size=-1)),
    ("block_wise", dict(block_wise=None)),
    ("lr", dict(lr=float("nan"))),
]
BAD_SGD = [
    ("lr", dict(lr=-0.1)),
    ("momentum", dict(lr=0.1, momentum=-0.5)),
    ("dampening", dict(lr=0.1, momentum=0.9, dampening=1.5)),
    ("weight_decay", dict(lr=0.1, weight_decay=-1)),
    ("nesterov", dict(lr=0.1, nesterov=True)),
    ("nesterov", dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True)),
    ("optim_bits", dict(lr=0.1, optim_bits=4)),
]


@pytest.mark.parametrize("arg,kwargs", BAD_ADAMW, ids=lambda x: str(x))
def test_invalid_adamw_arguments_raise_naming_the_argument(arg, kwargs):
    with pytest.raises(ValueError, match="Invalid " + re.escape(arg)):
        distopt.AdamW(make_params([(4, 4)]), **kwargs)


@pytest.mark.parametrize("arg,kwargs", BAD_SGD, ids=lambda x: str(x))
def test_invalid_sgd_arguments_raise_naming_the_argument(arg, kwargs):
    with pytest.raises(ValueError, match=f"Invalid {arg}"):
        distopt.SGD(make_params([(4, 4)]), **kwargs)


def test_invalid_group_is_rejected_before_anything_changes():
    a, b = make_params([(4, 4), (4, 4)])
    opt = distopt.AdamW8bit([a])
    with pytest.raises(ValueError, match="Invalid percentile_clipping"):
        opt.add_param_group({"params": [b], "percentile_clipping": 0})
    with pytest.raises(ValueError, match="Invalid optim_bits"):
        distopt.AdamW([{"params": [a], "optim_bits": 7}])
    assert len(opt.param_groups) == 1


def test_unsupported_param_dtype_is_rejected_naming_it():
    with pytest.raises(TypeError, match="float64"):
        distopt.AdamW8bit([torch.zeros(4, 4, dtype=torch.float64, requires_grad=True)])


def test_sparse_and_complex_gradients_raise_clear_errors():
    (p,) = make_params([(8, 8)])
    opt = distopt.AdamW8bit([p])
    p.grad = torch.randn(8, 8).to_sparse()
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['params'\]\[0\].*sparse gradient"):
        opt.step()
    assert not opt.state[p]
    with pytest.raises(TypeError, match="complex64"):  # a complex gradient needs a complex parameter
        distopt.AdamW8bit([torch.zeros(4, 4, dtype=torch.complex64, requires_grad=True)])


def test_paged_classes_and_is_paged_give_paged_state(tmp_path):
    for make in (distopt.PagedAdamW, distopt.PagedAdamW8bit, distopt.PagedAdamW32bit):
        assert make(make_params([(4, 4)]), spill_dir=tmp_path).is_paged
    assert distopt.AdamW(make_params([(4, 4)]), is_paged=True).pager is not None
    assert distopt.AdamW8bit(make_params([(4, 4)])).pager is None
    with pytest.raises(ValueError, match="spill_dir"):
        distopt.AdamW8bit(make_params([(4, 4)]), spill_dir=tmp_path)


def test_state_layout_rules():
    shapes = [(300,), (1000, 15), (64, 64), (63, 64), (8, 256)]
    params = make_params(shapes)
    opt = distopt.AdamW8bit(params, amsgrad=True)  # min_8bit_size=4096 on the whole numel
    run_steps(opt, params, 1)
    eight = [opt.state[p]["exp_avg"].dtype == torch.uint8 for p in params]
    assert eight == [False, False, True, False, False]
    s = opt.state[params[2]]
    assert {k: v.dtype for k, v in s.items() if k.startswith(("exp", "max"))} == {
        "exp_avg": torch.uint8, "exp_avg_absmax": torch.float32,
        "exp_avg_sq": torch.uint8, "exp_avg_sq_absmax": torch.float32,
        "max_exp_avg_sq": torch.uint8, "max_exp_avg_sq_absmax": torch.float32,
    }  # fmt: skip
    assert s["exp_avg"].shape == (64, 64) and s["exp_avg_absmax"].shape == (64, 1)
    assert s["step"].dtype == torch.float32 and s["step"].dim() == 0


def test_sgd8bit_without_momentum_keeps_no_state_tensor():
    (p,) = make_params([(64, 256)])
    opt = stepped(distopt.SGD8bit([p], lr=0.1), [p])
    assert set(opt.state[p]) == {"step", "nonfinite_count"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("path", ["fused", "reference"])
def test_low_precision_params_update_in_fp32_and_round_once(kernels_built, dtype, path):
    """A bf16/fp16 step equals the fp32 step on the same values, rounded to the dtype."""
    (low,) = make_params([(33, 300)], dtype)
    high = low.detach().float().requires_grad_()
    with backend(path):
        opt_low, opt_high = distopt.AdamW8bit([low], min_8bit_size=0), distopt.AdamW8bit([high], min_8bit_size=0)
        low.grad = torch.randn(low.shape).to(dtype)
        high.grad = low.grad.float()
        opt_low.step()
        opt_high.step()
    assert low.dtype == dtype and torch.equal(low.detach(), high.detach().to(dtype))
    assert torch.equal(opt_low.state[low]["exp_avg"], opt_high.state[high]["exp_avg"])


def test_grad_scaler_with_fp16_autocast_skips_inf_steps_and_trains():
    """The standard AMP recipe: fp32 params, fp16 autocast, GradScaler (which refuses fp16 grads)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64))
    opt = distopt.AdamW8bit(model.parameters(), lr=1e-3, min_8bit_size=0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = torch.randn(64, 256), torch.randn(64, 64)
    weight = model[0].weight
    losses = []
    for k in range(40):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = torch.nn.functional.mse_loss(model(x).float(), y)
        scaler.scale(loss).backward()
        if k == 5:
            weight.grad[0, 0] = float("inf")
            before, step_before = weight.detach().clone(), opt.state[weight]["step"].item()
        scaler.step(opt)
        scaler.update()
        if k == 5:  # the scaler saw the inf and skipped the step
            assert torch.equal(weight.detach(), before) and opt.state[weight]["step"].item() == step_before
        losses.append(loss.item())
    assert opt.state[weight]["exp_avg"].dtype == torch.uint8
    assert scaler.get_scale() < 2.0**10
    assert losses[-1] < 0.8 * losses[0]


def test_a_bad_gradient_anywhere_leaves_every_parameter_and_state_untouched():
    a, b = make_params([(64, 256), (8, 8)])
    opt = distopt.AdamW8bit([a, b], min_8bit_size=0)
    run_steps(opt, [a, b], 2)
    before = {k: v.clone() for k, v in opt.state[a].items()}
    a_before = a.detach().clone()
    a.grad = torch.randn(a.shape)
    b.grad = torch.randn(8, 8).to_sparse()  # the second parameter's gradient is refused
    with pytest.raises(RuntimeError, match=r"\['params'\]\[1\].*sparse"):
        opt.step()
    assert torch.equal(a.detach(), a_before)
    assert all(torch.equal(opt.state[a][k], v) for k, v in before.items())


@pytest.mark.parametrize(
    "change",
    [{"min_8bit_size": 10**9}, {"optim_bits": 32}, {"block_wise": False}],
    ids=["min_8bit_size", "optim_bits", "block_wise"],
)
def test_a_new_slot_in_another_layout_is_refused_before_anything_changes(change):
    """Turning amsgrad on after the group's layout settings changed would put a state of
    another layout (32-bit, or per-tensor absmax) beside the 8-bit block-wise ones: the
    step is refused, naming the parameter, with nothing changed (its step counter too)."""
    a, b = make_params([(64, 256), (32, 256)])
    opt = distopt.AdamW8bit([{"params": [a]}, {"params": [b]}], min_8bit_size=0)
    run_steps(opt, [a, b], 2)
    before = [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}) for p in (a, b)]
    opt.param_groups[1].update(change, amsgrad=True)
    for p, g in zip((a, b), make_grads([a, b], 7)):
        p.grad = g
    with pytest.raises(ValueError, match=r"param_groups\[1\].*keeps 8-bit block-wise state.*'max_exp_avg_sq'"):
        opt.step()
    for p, (value, state) in zip((a, b), before):
        assert torch.equal(p.detach(), value)
        assert state.keys() == opt.state[p].keys()
        assert all(torch.equal(opt.state[p][k], v) for k, v in state.items())


@pytest.mark.parametrize("cls", [distopt.AdamW8bit, distopt.AdamW32bit])
def test_turning_amsgrad_off_later_follows_torch(cls):
    ours = make_params([(64, 256)])
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt, ref = cls(ours, amsgrad=True, min_8bit_size=0), torch.optim.AdamW(theirs, amsgrad=True, foreach=False)
    run_steps(opt, ours, 3, scale=0.1)
    run_steps(ref, theirs, 3, scale=0.1)
    opt.param_groups[0]["amsgrad"] = ref.param_groups[0]["amsgrad"] = False
    run_steps(opt, ours, 5, first_seed=50, scale=0.1)
    run_steps(ref, theirs, 5, first_seed=50, scale=0.1)
    err = ((ours[0] - theirs[0]).abs().max() / theirs[0].abs().max()).item()
    assert err <= (1e-6 if cls is distopt.AdamW32bit else 2e-3)


def test_turning_momentum_off_later_follows_torch():
    ours = make_params([(64, 256)])
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt = distopt.SGD32bit(ours, lr=0.1, momentum=0.9, dampening=0.5)
    ref = torch.optim.SGD(theirs, lr=0.1, momentum=0.9, dampening=0.5, foreach=False)
    run_steps(opt, ours, 3)
    run_steps(ref, theirs, 3)
    opt.param_groups[0]["momentum"] = ref.param_groups[0]["momentum"] = 0.0
    run_steps(opt, ours, 3, first_seed=50)
    run_steps(ref, theirs, 3, first_seed=50)
    assert ((ours[0] - theirs[0]).abs().max() / theirs[0].abs().max()).item() <= 1e-6


@pytest.mark.parametrize("path", ["fused", "reference"])
def test_8bit_adamw_stays_bounded_when_a_rows_gradients_stop(kernels_built, path):
    """A second moment that rounded to 0 next to a non-zero first moment would divide by
    eps: an embedding row used once, then never, would jump by ~1e5 * lr."""
    p = torch.zeros(4, 256, requires_grad=True)
    with backend(path):
        opt = distopt.AdamW8bit([p], lr=1e-3, weight_decay=0.0, min_8bit_size=0)
        g = torch.full((4, 256), 1e-2)
        g[:, 0] = 1e3
        p.grad = g
        opt.step()
        for _ in range(10):
            before = p.detach().clone()
            p.grad = torch.zeros(4, 256)
            opt.step()
            assert (p.detach() - before).abs().max() <= 10 * 1e-3


@pytest.mark.parametrize("path", ["fused", "reference"])
def test_a_zero_first_gradient_does_not_clip_later_ones_to_zero(kernels_built, path):
    (p,) = make_params([(64, 256)])
    with backend(path):
        opt = distopt.AdamW8bit([p], lr=1e-2, min_8bit_size=0, percentile_clipping=5)
        p.grad = torch.zeros(p.shape)
        opt.step()
        before = p.detach().clone()
        run_steps(opt, [p], 5)
    assert opt.state[p]["gnorm_history"].min() > 0
    assert (p.detach() - before).abs().mean() > 1e-3  # it trains (about lr per step)


def _percentile_scale_one_at_a_time(history, gnorm_sq, step, percentile):
    """The per-parameter rule written out, as before it was batched (the oracle)."""
    if step == 1:
        history.copy_(gnorm_sq.expand_as(history))
    else:
        recorded = history.clone()
        recorded[step % 100] = gnorm_sq
        history.copy_(torch.where(history.amax() > 0, recorded, gnorm_sq.expand_as(history)))
    current = torch.sqrt(history[step % 100])
    clip = torch.sqrt(torch.sort(history).values[percentile])
    return torch.where(current > clip, clip / current, torch.ones_like(current)).float()


def test_batched_percentile_scales_equal_one_parameter_at_a_time():
    from distopt import functional as F

    gen = torch.Generator().manual_seed(0)
    cases = []  # (history, squared norm, step, percentile): fresh, zero, full, wrapped, mixed
    for i, (step, percentile) in enumerate([(1, 95), (2, 5), (3, 50), (99, 1), (100, 99), (101, 95), (257, 5)]):
        history = torch.rand(100, generator=gen, dtype=torch.float64) * 10 ** (i - 3)
        if i in (1, 4):
            history.zero_()  # zero gradients so far: seeded by this norm
        norm = torch.rand((), generator=gen, dtype=torch.float64) * 10 ** (i - 2) * (0 if i == 5 else 1)
        cases.append((history, norm, step, percentile))
    ours = [h.clone() for h, *_ in cases]
    scales = F.percentile_scales(ours, [n for _, n, *_ in cases], [c[2] for c in cases], [c[3] for c in cases])
    for (history, norm, step, percentile), got_history, got in zip(cases, ours, scales):
        want = _percentile_scale_one_at_a_time(history, norm, step, percentile)
        assert torch.equal(got_history, history) and got.dtype == torch.float32
        assert torch.equal(got, want), (step, percentile, got, want)
    assert any(s < 1 for s in scales) and any(s == 1 for s in scales)  # both branches taken


@pytest.mark.parametrize("path", ["fused", "reference"])
def test_clipping_many_parameters_in_one_step_equals_one_optimizer_each(kernels_built, path):
    """Groups of other percentiles, and a group added later (other step counts), clip each
    parameter exactly as an optimizer of its own would."""
    shapes = [(64, 256), (32, 128), (48, 256)]
    together = make_params(shapes)
    alone = [[p.detach().clone().requires_grad_()] for p in together]
    settings = [{"percentile_clipping": 5}, {"percentile_clipping": 50}, {"percentile_clipping": 95}]
    with backend(path):
        opt = distopt.AdamW8bit([{"params": [together[0]], **settings[0]}, {"params": [together[1]], **settings[1]}],
                                lr=1e-2, min_8bit_size=0)  # fmt: skip
        opts = [distopt.AdamW8bit(ps, lr=1e-2, min_8bit_size=0, **kw) for ps, kw in zip(alone, settings)]
        for step in range(8):
            if step == 3:  # the third parameter joins later: its step count lags the others'
                opt.add_param_group({"params": [together[2]], **settings[2]})
            live = 3 if step >= 3 else 2
            grads = make_grads(together, seed=100 + step)
            for i in range(live):
                together[i].grad = grads[i] * (1 + 10 * (step % 3 == 2))  # spikes to clip
                alone[i][0].grad = together[i].grad.clone()
            opt.step()
            for o in opts[:live]:
                o.step()
    for i, p in enumerate(together):
        assert torch.equal(p, alone[i][0]), i
        assert torch.equal(opt.state[p]["gnorm_history"], opts[i].state[alone[i][0]]["gnorm_history"])
