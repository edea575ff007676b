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
    with pytest.raises(ValueError, match="2 parameters"):
        other.load_state_dict(opt.state_dict())
    assert not other.state


def test_state_of_the_wrong_shape_is_refused_before_anything_changes(kernels_built):
    params = make_params([(64, 256)])
    opt = CASES[0].make(params)
    run_steps(opt, params, 1)
    other = CASES[0].make(make_params([(32, 256)]))
    with pytest.raises(ValueError, match="parameter 0's 'exp_avg' has shape"):
        other.load_state_dict(opt.state_dict())
    assert not other.state


def test_a_torch_adamw_state_dict_loads_and_training_continues():
    import distopt

    params = make_params([(64, 256)])
    ref = torch.optim.AdamW(params, lr=1e-3)
    run_steps(ref, params, 2)
    opt = distopt.AdamW32bit(clone_params(params), lr=1e-3)
    opt.load_state_dict(ref.state_dict())
    assert opt.param_groups[0]["percentile_clipping"] == 100
    run_steps(opt, opt.param_groups[0]["params"], 1)
