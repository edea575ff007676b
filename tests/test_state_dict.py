"""One-process checkpoints: K steps, save, load into a fresh optimizer, N-K more steps == N steps, bitwise."""

from __future__ import annotations

import io

import pytest
import torch

from tests.registry import CASES, DTYPES, SHAPES, assert_bitwise_equal, clone_params, make_params, run_steps

K, N = 3, 6


def through_bytes(sd):
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_resume_is_bitwise_identical_and_keeps_dtypes(kernels_built, case, dtype):
    straight = make_params(SHAPES, dtype)
    opt = case.make(straight)
    run_steps(opt, straight, K)
    saved = through_bytes(opt.state_dict())
    resumed = clone_params(straight)
    fresh = case.make(resumed)
    fresh.load_state_dict(saved)
    for p, q in zip(straight, resumed):
        for key, value in opt.state[p].items():
            assert fresh.state[q][key].dtype == value.dtype, key
            assert torch.equal(fresh.state[q][key], value), key
        assert torch.is_tensor(fresh.state[q]["step"])
    run_steps(opt, straight, N - K, first_seed=100 + K)
    run_steps(fresh, resumed, N - K, first_seed=100 + K)
    for p, q in zip(straight, resumed):
        assert_bitwise_equal(p, q)
        for key, value in opt.state[p].items():
            assert_bitwise_equal(fresh.state[q][key], value)


def test_loading_does_not_alias_the_state_dict(kernels_built):
    params = make_params([(64, 256)])
    opt = CASES[0].make(params)
    run_steps(opt, params, 2)
    sd = opt.state_dict()
    fresh = CASES[0].make(clone_params(params))
    fresh.load_state_dict(sd)
    before = {k: v.clone() for k, v in sd["state"][0].items()}
    run_steps(fresh, fresh.param_groups[0]["params"], 1)
    assert all(torch.equal(sd["state"][0][k], v) for k, v in before.items())


def test_mismatched_parameter_count_is_rejected_and_nothing_changes(kernels_built):
    params = make_params([(64, 256), (8, 8)])
    opt = CASES[0].make(params)
    run_steps(opt, params, 1)
    other = CASES[0].make(make_params([(64, 256)]))
    with pytest.raises(ValueError, match="param_groups\\[0\\] has 2 parameters, the optimizer's 1"):
        other.load_state_dict(opt.state_dict())
    assert not other.state


def trained(case=CASES[0], shapes=((64, 256), (300,)), steps=2):
    params = make_params(list(shapes))
    opt = case.make(params)
    run_steps(opt, params, steps)
    return opt, params


def everything(opt) -> dict:
    """Every state tensor and group setting, copied: to check that nothing changed."""
    state = {(gi, pi): {k: v.clone() for k, v in opt.state[p].items()}
             for gi, g in enumerate(opt.param_groups) for pi, p in enumerate(g["params"])}  # fmt: skip
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return {"state": state, "groups": groups}


def assert_unchanged(before: dict, opt) -> None:
    after = everything(opt)
    assert after["groups"] == before["groups"]
    assert after["state"].keys() == before["state"].keys()
    for key, state in before["state"].items():
        assert state.keys() == after["state"][key].keys()
        for k, v in state.items():
            assert_bitwise_equal(after["state"][key][k], v)


def _shape(sd):
    sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"][:32]


def _dtype(sd):
    sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"].float()


def _missing(sd):
    del sd["state"][0]["exp_avg_sq"]


def _absmax_missing(sd):
    del sd["state"][0]["exp_avg_absmax"]


def _unknown(sd):
    sd["state"][0]["exp_avg_ema"] = sd["state"][0]["exp_avg"]


def _absmax_shape(sd):
    sd["state"][0]["exp_avg_absmax"] = sd["state"][0]["exp_avg_absmax"][:, :0]


def _history_dtype(sd):
    sd["state"][0]["step"] = torch.tensor(float("nan"))


def _hyperparameter(sd):
    sd["param_groups"][0]["betas"] = (0.9, 1.5)


def _optim_bits(sd):
    sd["param_groups"][0]["optim_bits"] = 32  # the saved codes are 8-bit: they no longer fit


def _absmax_nan(sd):
    sd["state"][0]["exp_avg_absmax"][3, 0] = float("nan")


def _absmax_negative(sd):
    sd["state"][0]["exp_avg_sq_absmax"][0, 0] = -1.0


def _history_nan(sd):
    sd["param_groups"][0]["percentile_clipping"] = 5
    sd["state"][0]["gnorm_history"] = torch.full((100,), float("nan"), dtype=torch.float64)


def _step_fraction(sd):
    sd["state"][0]["step"] = torch.tensor(2.5)


def _amsgrad_slot_missing(sd):
    sd["param_groups"][0]["amsgrad"] = True  # saved with amsgrad, but no max_exp_avg_sq


def _maximize(sd):
    del sd["param_groups"][0]["distopt"]  # as from torch.optim.AdamW(maximize=True)
    sd["param_groups"][0]["maximize"] = True


BAD = {
    "'exp_avg' has shape (32, 256), expected (64, 256)": _shape,
    "'exp_avg' is torch.float32, expected torch.uint8": _dtype,
    "has no ['exp_avg_sq']": _missing,
    "8-bit 'exp_avg' has no 'exp_avg_absmax'": _absmax_missing,
    "unknown state ['exp_avg_ema']": _unknown,
    "'exp_avg_absmax' has shape (64, 0), expected (64, 1)": _absmax_shape,
    "'step' is nan": _history_dtype,
    "Invalid betas[1]": _hyperparameter,
    "saved with optim_bits=32 (here 8)": _optim_bits,
    "'exp_avg_absmax' holds values that are negative or not finite": _absmax_nan,
    "'exp_avg_sq_absmax' holds values that are negative or not finite": _absmax_negative,
    "'gnorm_history' holds values that are negative or not finite": _history_nan,
    "'step' is 2.5, expected a whole number": _step_fraction,
    "has no ['max_exp_avg_sq'] in its state": _amsgrad_slot_missing,
    "has maximize=True": _maximize,
}


@pytest.mark.parametrize("message", list(BAD), ids=[f.__name__.strip("_") for f in BAD.values()])
def test_a_bad_state_dict_is_refused_naming_the_parameter_and_nothing_changes(kernels_built, message):
    source, _ = trained()
    sd = source.state_dict()
    BAD[message](sd)
    target, target_params = trained(steps=1)
    before = everything(target)
    with pytest.raises(ValueError) as err:
        target.load_state_dict(sd)
    assert message in str(err.value)
    if not any(group_level in message for group_level in ("Invalid", "saved with", "maximize")):
        assert "param_groups[0]['params'][0] (shape (64, 256), torch.float32)" in str(err.value)
    assert_unchanged(before, target)
    run_steps(target, target_params, 1)  # still usable


def test_a_state_dict_of_another_optimizer_family_is_refused(kernels_built):
    sgd, _ = trained(next(c for c in CASES if c.name == "SGD8bit-momentum"))
    adamw, _ = trained()
    before = everything(adamw)
    with pytest.raises(ValueError, match="from a distopt SGD optimizer; this is AdamW8bit"):
        adamw.load_state_dict(sgd.state_dict())
    assert_unchanged(before, adamw)


def test_mismatched_group_count_is_refused(kernels_built):
    opt, params = trained()
    sd = opt.state_dict()
    two = CASES[0].make([{"params": [params[0]]}, {"params": [params[1]]}])
    with pytest.raises(ValueError, match="1 param groups, the optimizer 2"):
        two.load_state_dict(sd)


def test_the_state_dict_holds_totals_and_a_family_tag_and_leaves_the_live_state_alone(kernels_built):
    opt, params = trained()
    params[0].grad = torch.full_like(params[0], float("nan"))
    opt.step()
    sd = opt.state_dict()
    assert all(g["distopt"] == "AdamW" for g in sd["param_groups"])
    assert "distopt" not in opt.param_groups[0]
    assert int(sd["state"][0]["nonfinite_count"]) == 64 * 256
    sd["state"][0]["nonfinite_count"] += 1
    assert int(opt.state[params[0]]["nonfinite_count"]) == 64 * 256
    fresh = CASES[0].make(clone_params(params))
    fresh.load_state_dict(sd)
    assert "distopt" not in fresh.param_groups[0]
    assert int(fresh.state[fresh.param_groups[0]["params"][0]]["nonfinite_count"]) == 64 * 256 + 1


def test_parameters_without_saved_state_have_none_after_loading(kernels_built):
    params = make_params([(64, 256), (64, 256)])
    opt = CASES[0].make(params)
    params[0].grad = torch.randn_like(params[0])
    opt.step()  # only parameter 0 has state
    fresh_params = clone_params(params)
    fresh = CASES[0].make(fresh_params)
    run_steps(fresh, fresh_params, 1)  # both have state
    fresh.load_state_dict(opt.state_dict())
    assert fresh.state[fresh_params[0]] and not fresh.state.get(fresh_params[1])


def test_a_torch_adamw_state_dict_loads_and_training_continues():
    import distopt

    params = make_params([(64, 256)])
    ref = torch.optim.AdamW(params, lr=1e-3)
    run_steps(ref, params, 2)
    opt = distopt.AdamW32bit(clone_params(params), lr=1e-3)
    opt.load_state_dict(ref.state_dict())
    assert opt.param_groups[0]["percentile_clipping"] == 100
    run_steps(opt, opt.param_groups[0]["params"], 1)


def test_a_dcp_checkpoint_loads_twice_into_the_same_optimizer_without_copying_its_state(kernels_built, tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    model = torch.nn.Linear(64, 64)
    opt = CASES[0].make(model.parameters())
    model(torch.randn(2, 64)).sum().backward()
    opt.step()
    saved = {k: v.clone() for k, v in opt.state[model.weight].items()}
    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(tmp_path), no_dist=True)
    for _ in range(2):  # the first load must not add keys (torch's own defaults) that the second then misses
        opt.step()
        state = {"optim": get_optimizer_state_dict(model, opt)}
        dcp.load(state, checkpoint_id=str(tmp_path), no_dist=True)
        live = opt.state[model.weight]["exp_avg"]
        set_optimizer_state_dict(model, opt, state["optim"])
        assert opt.state[model.weight]["exp_avg"] is live  # dcp.load filled the live tensor: no second copy
        for k, v in saved.items():
            assert_bitwise_equal(opt.state[model.weight][k], v)


def test_a_torch_sgd_state_dict_loads_and_l2_adam_is_refused():
    import distopt

    params = make_params([(64, 256)])
    ref = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    run_steps(ref, params, 2)
    opt = distopt.SGD32bit(clone_params(params), lr=0.1, momentum=0.9)
    opt.load_state_dict(ref.state_dict())  # torch's SGD keeps no step
    assert torch.equal(
        opt.state[opt.param_groups[0]["params"][0]]["momentum_buffer"], ref.state[params[0]]["momentum_buffer"]
    )
    adam = torch.optim.Adam(params, lr=1e-3, weight_decay=0.1)
    run_steps(adam, params, 1)
    with pytest.raises(ValueError, match="L2 weight decay"):
        distopt.AdamW32bit(clone_params(params)).load_state_dict(adam.state_dict())


def test_check_state_dict_refuses_what_loading_would_and_changes_nothing(kernels_built):
    from distopt.distributed import check_state_dict

    source, _ = trained()
    sd = source.state_dict()
    check_state_dict(source, sd)
    _dtype(sd)
    target, _ = trained(steps=1)
    before = everything(target)
    with pytest.raises(ValueError, match="expected torch.uint8"):
        check_state_dict(target, sd)
    assert_unchanged(before, target)
    assert not hasattr(target, "_loading")
