"""Online-RL algorithms (raylm.rl.algos) against hand-computed values."""
import math

import pytest
import torch
from torch.testing import assert_close

from raylm.rl import algos as A


def t(x):
    return torch.tensor(x, dtype=torch.float32)


RAGGED = t([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])


# ------------------------------------------------------------------------------------------------------- helpers
def test_masked_mean():
    x, mask = t([[1, 2, 3], [4, 5, 6]]), t([[1, 1, 0], [0, 0, 1]])
    assert A.masked_mean(x, mask).item() == pytest.approx(3.0)  # (1 + 2 + 6) / 3
    assert_close(A.masked_mean(x, mask, dim=-1), t([1.5, 6.0]))


def test_masked_whiten_uses_unbiased_variance_and_zeroes_padding():
    # masked values 1, 2, 3: mean 2, unbiased var 1 -> -1, 0, 1; the 100 is padding
    assert_close(A.masked_whiten(t([[1, 2, 3, 100]]), t([[1, 1, 1, 0]]), eps=0.0), t([[-1, 0, 1, 0]]))


# ------------------------------------------------------------------------------------------ advantage estimators
def test_grpo_unbiased_group_std():
    # group [1, 0]: mean 0.5, unbiased std sqrt(0.5) -> +-0.5 / 0.70711 = +-0.70711
    adv, ret = A.ADVANTAGES["grpo"](t([1, 0, 0, 1]), RAGGED, 2)
    s = 0.5 / math.sqrt(0.5)
    assert ret is None
    assert_close(adv, t([[s, s, s], [-s, -s, 0], [-s, 0, 0], [s, s, s]]), rtol=1e-5, atol=1e-5)


def test_grpo_equal_rewards_give_zero_advantage():
    adv, _ = A.grpo(t([1, 1]), torch.ones(2, 3), 2)
    assert_close(adv, torch.zeros(2, 3))


def test_drgrpo_no_std():
    # mean of [1, 0, 0] is 1/3
    adv, _ = A.ADVANTAGES["drgrpo"](t([1, 0, 0]), torch.ones(3, 2), 3)
    assert_close(adv, t([[2 / 3] * 2, [-1 / 3] * 2, [-1 / 3] * 2]))


def test_rloo_leave_one_out():
    # 1 - mean(0, 0) = 1; 0 - mean(1, 0) = -0.5
    adv, _ = A.ADVANTAGES["rloo"](t([1, 0, 0]), t([[1, 1], [1, 0], [1, 1]]), 3)
    assert_close(adv, t([[1, 1], [-0.5, 0], [-0.5, -0.5]]))
    with pytest.raises(ValueError):
        A.rloo(t([1, 0]), torch.ones(2, 2), 1)


def test_reinforce_pp_outcome_on_last_token_then_batch_whitening():
    # returns-to-go with gamma 1: row 0 [1, 1, 1], row 1 [0, 0, pad]; masked 1,1,1,0,0: mean 0.6, unbiased var 0.3
    adv, ret = A.ADVANTAGES["reinforce_pp"](t([1, 0]), t([[1, 1, 1], [1, 1, 0]]), 2, eps=0.0)
    hi, lo = 0.4 / math.sqrt(0.3), -0.6 / math.sqrt(0.3)
    assert ret is None
    assert_close(adv, t([[hi, hi, hi], [lo, lo, 0]]))


def test_reinforce_pp_discounted_token_rewards():
    # gamma 0.5: row 0 rewards [0, 0, 1] -> returns [0.25, 0.5, 1]; row 1 [0, 1, pad] -> [0.5, 1, pad]
    # masked returns 0.25, 0.5, 1, 0.5, 1: mean 0.65, unbiased var 0.45 / 4 = 0.1125 -> (x - 0.65) / 0.33541
    adv, _ = A.reinforce_pp(t([9, 9]), t([[1, 1, 1], [1, 1, 0]]), 2, token_rewards=t([[0, 0, 1], [0, 1, 7]]),
                            gamma=0.5, eps=0.0)
    assert_close(adv, t([[-1.1925696, -0.4472136, 1.0434984], [-0.4472136, 1.0434984, 0]]))


def test_gae_three_tokens():
    # gamma 0.9, lam 0.8, values [0.5, 0.6, 0.7], outcome 1 on the last token, value after it 0:
    #   delta2 = 1 - 0.7 = 0.3;  delta1 = 0.9*0.7 - 0.6 = 0.03;  delta0 = 0.9*0.6 - 0.5 = 0.04
    #   A2 = 0.3;  A1 = 0.03 + 0.72*0.3 = 0.246;  A0 = 0.04 + 0.72*0.246 = 0.21712
    #   returns = A + V = [0.71712, 0.846, 1.0]; whitened A (mean 0.254373, unbiased std 0.042070):
    adv, ret = A.ADVANTAGES["gae"](t([1]), t([[1, 1, 1]]), 1, values=t([[0.5, 0.6, 0.7]]), gamma=0.9, lam=0.8,
                                   eps=0.0)
    assert_close(ret, t([[0.71712, 0.846, 1.0]]))
    assert_close(adv, t([[-0.8855150, -0.1990349, 1.0845498]]), rtol=1e-4, atol=1e-4)


def test_gae_value_after_last_response_token_is_zero():
    # gamma = lam = 1: A_t = R - V_t; the padded position's value 9 must not be bootstrapped from
    adv, ret = A.gae(t([1]), t([[1, 1, 0]]), 1, values=t([[0.5, 0.6, 9.0]]))
    assert_close(ret, t([[1.0, 1.0, 0.0]]))
    assert adv[0, 2] == 0
    with pytest.raises(ValueError):
        A.gae(t([1]), t([[1, 1]]), 1)


@pytest.mark.parametrize("name", sorted(A.ADVANTAGES))
def test_advantages_shape_and_zero_outside_mask(name):
    torch.manual_seed(0)
    adv, ret = A.ADVANTAGES[name](torch.rand(4), RAGGED, 2, values=torch.rand(4, 3))
    assert adv.shape == (4, 3) and (adv[RAGGED == 0] == 0).all() and torch.isfinite(adv).all()
    assert (ret is not None) == (name == "gae")


def test_groups_must_divide_batch():
    with pytest.raises(ValueError):
        A.grpo(t([1, 0, 1]), torch.ones(3, 2), 2)


# --------------------------------------------------------------------------------------------------- aggregation
LOSS = t([[1, 2, 3], [4, 100, 100]])
AGG_MASK = t([[1, 1, 1], [1, 0, 0]])


@pytest.mark.parametrize("mode,max_len,expected", [
    ("token_mean", None, 2.5),                     # (1 + 2 + 3 + 4) / 4
    ("seq_mean_token_mean", None, 3.0),            # (mean(1, 2, 3) + 4) / 2
    ("seq_mean_token_sum_norm", None, 10 / 6),     # (6 / 3 + 4 / 3) / 2
    ("seq_mean_token_sum_norm", 4, 1.25),          # (6 / 4 + 4 / 4) / 2
])
def test_aggregate_modes(mode, max_len, expected):
    assert A.aggregate(LOSS, AGG_MASK, mode, max_len).item() == pytest.approx(expected)


def test_aggregate_unknown_mode_names_valid_ones():
    with pytest.raises(ValueError, match="token_mean.*seq_mean_token_mean.*seq_mean_token_sum_norm"):
        A.aggregate(LOSS, AGG_MASK, "sum")


# ------------------------------------------------------------------------------------------------- policy losses
def test_ppo_clip_one_token_clipped():
    # ratios 1.5 and 0.9, A = 1, clip 0.2: min(1.5, 1.2) = 1.2 (clipped), min(0.9, 0.9) = 0.9 -> loss -(1.2+0.9)/2
    logp = t([[math.log(1.5), math.log(0.9)]]).requires_grad_()
    loss, m = A.POLICY_LOSSES["ppo_clip"](logp, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2))
    assert loss.item() == pytest.approx(-1.05)
    assert m["clip_frac"].item() == pytest.approx(0.5)
    assert m["ratio_mean"].item() == pytest.approx(1.2)
    # k3: (0.5 - ln 1.5 + -0.1 - ln 0.9) / 2
    assert m["approx_kl"].item() == pytest.approx(0.0499477, rel=1e-4)
    loss.backward()
    # clipped token: no gradient; the other: d(-0.9 * exp(logp) / 2) = -0.45
    assert_close(logp.grad, t([[0.0, -0.45]]))


def test_ppo_clip_higher_is_asymmetric():
    logp, zeros, ones = t([[math.log(1.25)]]), torch.zeros(1, 1), torch.ones(1, 1)
    _, sym = A.ppo_clip(logp, zeros, ones, ones, clip_low=0.2, clip_high=0.2)
    loss, dapo = A.ppo_clip(logp, zeros, ones, ones, clip_low=0.2, clip_high=0.28)
    assert sym["clip_frac"].item() == 1.0 and dapo["clip_frac"].item() == 0.0
    assert loss.item() == pytest.approx(-1.25)


def test_ppo_clip_negative_advantage_clips_below():
    # A = -1, ratio 0.5: min(-0.5, -0.8) = -0.8 -> loss 0.8
    loss, m = A.ppo_clip(t([[math.log(0.5)]]), torch.zeros(1, 1), -torch.ones(1, 1), torch.ones(1, 1))
    assert loss.item() == pytest.approx(0.8) and m["clip_frac"].item() == 1.0


def test_gspo_sequence_ratio_and_gradient():
    # log-ratios 0.2, -0.1 (the 5.0 is padding): s = exp(0.05) = 1.0512711, on every response token
    logp = t([[0.2, -0.1, 5.0]]).requires_grad_()
    mask = t([[1, 1, 0]])
    loss, m = A.POLICY_LOSSES["gspo"](logp, torch.zeros(1, 3), torch.ones(1, 3), mask, agg="seq_mean_token_mean")
    assert m["ratio_mean"].item() == pytest.approx(math.exp(0.05))
    assert loss.item() == pytest.approx(-math.exp(0.05))
    assert m["clip_frac"].item() == 0.0
    loss.backward()
    # d(-mean_t sg[s] exp(logp_t - sg[logp_t])) / d logp_t = -s / 2 per response token
    assert_close(logp.grad, t([[-math.exp(0.05) / 2, -math.exp(0.05) / 2, 0.0]]))


def test_gspo_paper_clip_range_clips_the_whole_sequence():
    logp = t([[0.2, -0.1]]).requires_grad_()
    loss, m = A.gspo(logp, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), clip_low=3e-4, clip_high=4e-4)
    assert m["clip_frac"].item() == 1.0 and loss.item() == pytest.approx(-(1 + 4e-4))
    loss.backward()
    assert_close(logp.grad, torch.zeros(1, 2))


@pytest.mark.parametrize("name", sorted(A.POLICY_LOSSES))
@pytest.mark.parametrize("agg", A.AGG_MODES)
def test_policy_losses_gradients_flow(name, agg):
    torch.manual_seed(0)
    logp = (torch.randn(4, 3) * 0.01).requires_grad_()
    loss, metrics = A.POLICY_LOSSES[name](logp, torch.zeros(4, 3), torch.randn(4, 3), RAGGED, agg=agg)
    loss.backward()
    assert loss.dim() == 0 and logp.grad is not None and logp.grad.abs().sum() > 0
    assert set(metrics) == {"clip_frac", "ratio_mean", "approx_kl"} and all(v.dim() == 0 for v in metrics.values())


# ------------------------------------------------------------------------------------------------------------ KL
@pytest.mark.parametrize("name,expected", [
    ("k1", 0.5),                         # log p - log q
    ("k2", 0.125),                       # 0.5 * 0.5^2
    ("k3", math.exp(-0.5) + 0.5 - 1),    # e^-0.5 - (-0.5) - 1 = 0.1065307
])
def test_kl_estimators(name, expected):
    out = A.KL_ESTIMATORS[name](t([[0.0, 0.0]]), t([[-0.5, 0.0]]))
    assert_close(out, t([[expected, 0.0]]))


def test_k3_is_finite_for_huge_log_ratio():
    assert torch.isfinite(A.kl_k3(t([[-1000.0]]), t([[0.0]]))).all()


def test_fixed_kl_controller():
    c = A.make_kl_controller("fixed", 0.05)
    c.update(100.0, 1000)
    assert isinstance(c, A.FixedKL) and c.value == 0.05


@pytest.mark.parametrize("current,expected", [
    (9.0, 0.1 * (1 + 0.2 * 256 / 10000)),    # err 0.5 clipped to 0.2 -> 0.100512
    (3.0, 0.1 * (1 - 0.2 * 256 / 10000)),    # err -0.5 clipped to -0.2 -> 0.099488
    (6.6, 0.1 * (1 + 0.1 * 256 / 10000)),    # err 0.1 -> 0.100256
])
def test_adaptive_kl_one_update(current, expected):
    c = A.make_kl_controller("adaptive", 0.1, target=6.0, horizon=10000)
    c.update(current, 256)
    assert isinstance(c, A.AdaptiveKL) and c.value == pytest.approx(expected)


def test_make_kl_controller_errors():
    with pytest.raises(ValueError):
        A.make_kl_controller("adaptive", 0.1)
    with pytest.raises(ValueError):
        A.make_kl_controller("pid", 0.1)


# ----------------------------------------------------------------------------------------------------------- DAPO
def test_dynamic_sampling_drops_constant_groups():
    keep = A.dynamic_sampling_keep(t([1, 1, 0, 1, 0, 0]), 2)
    assert keep.dtype == torch.bool and keep.tolist() == [False, False, True, True, False, False]


def test_overlong_penalty():
    # max_len 20, cache 4: soft limit 16; 18 -> (16 - 18) / 4; 20 -> (16 - 20) / 4 = -1; beyond -> -1
    out = A.overlong_penalty(torch.tensor([10, 16, 18, 20, 25]), max_len=20, cache_len=4)
    assert_close(out, t([0.0, 0.0, -0.5, -1.0, -1.0]))


# --------------------------------------------------------------------------------------------------------- critic
def test_value_loss_clipped():
    # token 0: v 0.5, old 0, R 1: unclipped 0.25, clipped v 0.2 -> 0.64 -> 0.5 * 0.64 = 0.32 (no grad: clamp saturated)
    # token 1: v 0.9, old 1, R 0: both 0.81 -> 0.405;  mean 0.3625; grad on token 1 = (0.9 - 0) / 2
    values = t([[0.5, 0.9]]).requires_grad_()
    loss = A.value_loss(values, t([[0.0, 1.0]]), t([[1.0, 0.0]]), torch.ones(1, 2), clip=0.2)
    assert loss.item() == pytest.approx(0.3625)
    loss.backward()
    assert_close(values.grad, t([[0.0, 0.45]]))


def test_entropy_from_logits():
    logits = torch.stack([torch.zeros(2), t([0.0, math.log(3)]), t([1000.0, 1000.0])]).view(1, 3, 2)
    # uniform over 2: ln 2; probs (0.25, 0.75): 0.5623351; huge equal logits: ln 2 without overflow
    assert_close(A.entropy_from_logits(logits), t([[math.log(2), 0.5623351, math.log(2)]]))


# ----------------------------------------------------------------------------------------------------- algorithms
@pytest.mark.parametrize("name", sorted(A.ALGORITHMS))
def test_algorithms_reference_registered_pieces(name):
    spec = A.ALGORITHMS[name]
    assert spec.advantage in A.ADVANTAGES and spec.policy_loss in A.POLICY_LOSSES and spec.agg in A.AGG_MODES
    assert 0 < spec.clip_low <= spec.clip_high and spec.critic == (spec.advantage == "gae")


def test_algorithm_specs():
    assert A.ALGORITHMS["dapo"] == A.AlgoSpec("grpo", "ppo_clip", "token_mean", 0.2, 0.28,
                                              dynamic_sampling=True, overlong=True)
    assert A.ALGORITHMS["gspo"].clip_low == 3e-4 and A.ALGORITHMS["gspo"].clip_high == 4e-4
    with pytest.raises(Exception):
        A.ALGORITHMS["grpo"].clip_low = 0.3  # frozen
