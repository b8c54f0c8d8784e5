"""Online-RL algorithms as pure functions with tensor-shape docstrings, registered by name (verl `core_algos.py` style).

An algorithm is a recipe (`ALGORITHMS`) over three registries: an advantage estimator (`ADVANTAGES`), a policy loss
(`POLICY_LOSSES`) and a loss aggregation mode (`aggregate`). Conventions: N sampled responses, the k = group_size
responses of one prompt contiguous (group g = rows [g*k, (g+1)*k)); T token positions; mask (N, T) is 1 on response
tokens. Advantages are constants for the policy loss, so estimators run without autograd.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from raylm.losses import register

ADVANTAGES: dict[str, Callable] = {}
POLICY_LOSSES: dict[str, Callable] = {}
KL_ESTIMATORS: dict[str, Callable] = {}
AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
MAX_LOG_RATIO = 20.0  # exp(20) ~ 5e8: large enough to never bind on sane ratios, small enough to stay finite


# ----------------------------------------------------------------------------------------------------------- helpers
def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over positions where `mask` is 1 (all of them, or along `dim`); 0 where nothing is masked in."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked positions, 0 elsewhere. (N, T), (N, T) -> (N, T).

    Variance is unbiased (Bessel-corrected), as verl's `masked_whiten`.
    """
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = ((x - mean) ** 2 * mask).sum() / (n - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) -> (N / k, k), checking that the batch is made of whole groups."""
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return rewards.float().view(-1, group_size)


def _last_token_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Outcome reward (N,) placed on each row's last response token -> (N, T)."""
    T = mask.shape[1]
    last = T - 1 - mask.flip(-1).argmax(-1)  # index of the last 1 (rows without any 1 are zeroed by the mask below)
    out = torch.zeros_like(mask, dtype=torch.float32)
    out[torch.arange(len(rewards)), last] = rewards.float()
    return out * mask


# -------------------------------------------------------------------------------------------- advantage estimators
@register(ADVANTAGES, "grpo")
@torch.no_grad()
def grpo(rewards, mask, group_size, *, token_rewards=None, values=None, gamma=1.0, lam=1.0, eps=1e-6):
    """Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath): (r - group mean) / (group std + eps).

    rewards (N,), mask (N, T) -> advantages (N, T) (the sequence's score on every response token), returns None.
    The std is torch's default unbiased one, as DeepSeekMath and verl's GRPO; a group of one gets mean 0 and std 1
    (verl's convention: its raw reward) instead of a NaN.
    """
    g = _groups(rewards, group_size)
    if group_size == 1:
        mean, std = torch.zeros_like(g), torch.ones_like(g)
    else:
        mean, std = g.mean(1, keepdim=True), g.std(1, keepdim=True)
    return ((g - mean) / (std + eps)).view(-1, 1) * mask, None


@register(ADVANTAGES, "drgrpo")
@torch.no_grad()
def drgrpo(rewards, mask, group_size, *, token_rewards=None, values=None, gamma=1.0, lam=1.0, eps=1e-6):
    """Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): r - group mean, no std normalisation.

    Dividing by the std up-weights prompts that are nearly always (or never) solved; Dr.GRPO drops it.
    Shapes as `grpo`.
    """
    g = _groups(rewards, group_size)
    return (g - g.mean(1, keepdim=True)).view(-1, 1) * mask, None


@register(ADVANTAGES, "rloo")
@torch.no_grad()
def rloo(rewards, mask, group_size, *, token_rewards=None, values=None, gamma=1.0, lam=1.0, eps=1e-6):
    """REINFORCE Leave-One-Out (Ahmadian et al. 2024, "Back to Basics"): r_i - mean of the other k-1 group rewards.

    The baseline excludes r_i so it is independent of the sample it scores (unbiased). Needs group_size >= 2.
    Shapes as `grpo`.
    """
    if group_size < 2:
        raise ValueError(f"rloo needs group_size >= 2, got {group_size}")
    g = _groups(rewards, group_size)
    baseline = (g.sum(1, keepdim=True) - g) / (group_size - 1)
    return (g - baseline).view(-1, 1) * mask, None


@register(ADVANTAGES, "reinforce_pp")
@torch.no_grad()
def reinforce_pp(rewards, mask, group_size, *, token_rewards=None, values=None, gamma=1.0, lam=1.0, eps=1e-6):
    """REINFORCE++ (Hu 2025): discounted returns-to-go of per-token rewards, whitened over the whole batch.

    rewards (N,) (used on each row's last response token when token_rewards is None), token_rewards (N, T)
    -> advantages (N, T), returns None. Normalising over all masked tokens of the batch rather than per group is
    the point of the method: no per-prompt baseline, so no bias from small groups.
    """
    r = (_last_token_rewards(rewards, mask) if token_rewards is None else token_rewards.float()) * mask
    returns = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):
        running = (r[:, t] + gamma * running) * mask[:, t]
        returns[:, t] = running
    return masked_whiten(returns, mask, eps), None


@register(ADVANTAGES, "gae")
@torch.no_grad()
def gae(rewards, mask, group_size, *, token_rewards=None, values=None, gamma=1.0, lam=1.0, eps=1e-6):
    """Generalized Advantage Estimation (Schulman et al. 2016) over the response tokens, for PPO with a critic.

    rewards (N,) (on the last response token when token_rewards is None), token_rewards (N, T), values (N, T)
    -> advantages (N, T), returns (N, T) = raw advantages + values (the critic's targets).
    Masked-out tokens are skipped, not treated as steps (verl's multi-turn handling), and the value after the last
    response token is 0. Advantages are then whitened over the masked tokens, as PPO implementations do.
    """
    if values is None:
        raise ValueError("gae needs the critic's values")
    r = (_last_token_rewards(rewards, mask) if token_rewards is None else token_rewards.float()) * mask
    values = values.float()
    adv = torch.zeros_like(r)
    next_value = torch.zeros_like(r[:, 0])
    running = torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):
        m = mask[:, t]
        delta = r[:, t] + gamma * next_value - values[:, t]
        running = m * (delta + gamma * lam * running) + (1 - m) * running
        next_value = m * values[:, t] + (1 - m) * next_value
        adv[:, t] = running
    returns = (adv + values) * mask
    return masked_whiten(adv, mask, eps), returns


# ----------------------------------------------------------------------------------------------------- aggregation
def aggregate(loss_mat: torch.Tensor, mask: torch.Tensor, mode: str, max_len: int | None = None) -> torch.Tensor:
    """Reduce a per-token loss (N, T) to a scalar (verl's `loss_agg_mode` names).

    token_mean: over all masked tokens of the batch (DAPO: long answers weigh by their length).
    seq_mean_token_mean: per-sequence mean, then mean over sequences (original GRPO; rows without tokens ignored).
    seq_mean_token_sum_norm: per-sequence sum / constant max_len (default T), then mean (Dr.GRPO: no length bias).
    """
    if mode == "token_mean":
        return masked_mean(loss_mat, mask)
    if mode == "seq_mean_token_mean":
        has_tokens = (mask.sum(-1) > 0).float()
        return masked_mean(masked_mean(loss_mat, mask, dim=-1), has_tokens)
    if mode == "seq_mean_token_sum_norm":
        return ((loss_mat * mask).sum(-1) / (max_len or mask.shape[1])).mean()
    raise ValueError(f"unknown loss aggregation mode {mode!r}; valid: {', '.join(AGG_MODES)}")


# ---------------------------------------------------------------------------------------------------- policy losses
def _clipped_surrogate(ratio, log_ratio, advantages, mask, clip_low, clip_high, agg, max_len):
    """PPO's pessimistic objective on given ratios; loss and detached metrics. `log_ratio` only feeds approx_kl."""
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = aggregate(torch.maximum(unclipped, clipped), mask, agg, max_len)
    with torch.no_grad():
        # k3 estimate of KL(old || new) from samples of the old policy: non-negative and low-variance.
        lr = log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
        metrics = {"clip_frac": masked_mean((clipped > unclipped).float(), mask),
                   "ratio_mean": masked_mean(ratio, mask),
                   "approx_kl": masked_mean(lr.exp() - 1 - lr, mask)}
    return loss, metrics


@register(POLICY_LOSSES, "ppo_clip")
def ppo_clip(logp, old_logp, advantages, mask, *, clip_low=0.2, clip_high=0.2, agg="token_mean", max_len=None):
    """PPO clipped surrogate (Schulman et al. 2017) with DAPO's asymmetric "clip-higher" (Yu et al. 2025).

    logp (N, T) current policy (with grad), old_logp (N, T) behaviour policy, advantages (N, T), mask (N, T)
    -> (scalar loss, {clip_frac, ratio_mean, approx_kl}). Token-level ratio clipped to [1-clip_low, 1+clip_high];
    clip_high > clip_low leaves room for low-probability tokens to grow, against entropy collapse.
    """
    log_ratio = logp - old_logp
    ratio = log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO).exp()
    return _clipped_surrogate(ratio, log_ratio, advantages, mask, clip_low, clip_high, agg, max_len)


@register(POLICY_LOSSES, "gspo")
def gspo(logp, old_logp, advantages, mask, *, clip_low=0.2, clip_high=0.2, agg="token_mean", max_len=None):
    """Group Sequence Policy Optimization (Zheng et al. 2025): clip a length-normalised sequence-level ratio.

    s_i = exp(mean over response tokens of (logp - old_logp)), used per token as sg[s_i] * exp(logp_t - sg[logp_t])
    (equal to s_i in value, gradient s_i * grad logp_t). Shapes and outputs as `ppo_clip`. Sequence ratios are much
    closer to 1 than token ratios, so the paper clips far tighter (3e-4 / 4e-4, see ALGORITHMS["gspo"]); the 0.2
    defaults only keep the signature uniform.
    """
    log_ratio = logp - old_logp
    seq_log_ratio = masked_mean(log_ratio, mask, dim=-1).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    ratio = (seq_log_ratio.detach().unsqueeze(-1) + logp - logp.detach()).exp()
    return _clipped_surrogate(ratio, log_ratio, advantages, mask, clip_low, clip_high, agg, max_len)


# -------------------------------------------------------------------------------------------------------------- KL
@register(KL_ESTIMATORS, "k1")
def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """log(p/q): unbiased, high variance, can be negative (Schulman, "Approximating KL divergence"). (N, T) -> same."""
    return logp - ref_logp


@register(KL_ESTIMATORS, "k2")
def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """0.5 * log(p/q)^2: biased, low variance, non-negative (Schulman's blog). (N, T) -> (N, T)."""
    return 0.5 * (logp - ref_logp) ** 2


@register(KL_ESTIMATORS, "k3")
def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """q/p - 1 - log(q/p): unbiased, low variance, non-negative (Schulman's blog; GRPO's KL term). (N, T) -> (N, T)."""
    lr = (ref_logp - logp).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    return lr.exp() - lr - 1


class FixedKL:
    """Constant KL coefficient."""

    def __init__(self, coef: float):
        self.value = coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKL:
    """Proportional controller steering the measured KL toward `target` (Ziegler et al. 2019, section 2.2)."""

    def __init__(self, init_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        err = min(max(current_kl / self.target - 1, -0.2), 0.2)  # clipped so one noisy batch cannot swing the coef
        self.value *= 1 + err * n_steps / self.horizon


def make_kl_controller(kind: str, coef: float, target: float | None = None, horizon: int = 10000):
    """"fixed" -> FixedKL(coef); "adaptive" -> AdaptiveKL(coef, target, horizon) (target required)."""
    if kind == "fixed":
        return FixedKL(coef)
    if kind == "adaptive":
        if target is None:
            raise ValueError("adaptive KL controller needs a target KL")
        return AdaptiveKL(coef, target, horizon)
    raise ValueError(f"unknown KL controller {kind!r}; valid: fixed, adaptive")


# ------------------------------------------------------------------------------------------------------------- DAPO
def dynamic_sampling_keep(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """DAPO dynamic sampling (Yu et al. 2025): (N,) -> (N,) bool, False for every row of a group with equal rewards.

    Such groups have zero group-relative advantage, so they only dilute the batch.
    """
    g = _groups(rewards, group_size)
    return (g.amax(1) != g.amin(1)).repeat_interleave(group_size)


def overlong_penalty(lengths: torch.Tensor, max_len: int, cache_len: int) -> torch.Tensor:
    """DAPO soft overlong punishment (Yu et al. 2025): (N,) lengths -> (N,) reward added to the outcome reward.

    0 up to max_len - cache_len, then linear down to -1 at max_len, -1 beyond: truncated answers are penalised
    without the noise of a hard cliff.
    """
    L = lengths.float()
    soft = max_len - cache_len
    ramp = (soft - L) / max(cache_len, 1)
    return torch.where(L <= soft, torch.zeros_like(L), torch.where(L <= max_len, ramp, -torch.ones_like(L)))


# ----------------------------------------------------------------------------------------------------------- critic
def value_loss(values, old_values, returns, mask, clip: float = 0.2) -> torch.Tensor:
    """PPO clipped value loss: 0.5 * max((v - R)^2, (old_v + clip(v - old_v, ±clip) - R)^2), token mean.

    values (N, T) (with grad), old_values (N, T) at rollout time, returns (N, T), mask (N, T) -> scalar.
    """
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    loss = 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return masked_mean(loss, mask)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax over the last dim, (N, T, V) -> (N, T), as logsumexp(z) - sum softmax(z) * z.

    Shifting by the max first keeps both terms small, so their difference does not cancel in float32.
    """
    logits = logits.float()
    logits = logits - logits.amax(-1, keepdim=True).detach()
    return torch.logsumexp(logits, -1) - (logits.softmax(-1) * logits).sum(-1)


# ------------------------------------------------------------------------------------------------------- algorithms
@dataclass(frozen=True)
class AlgoSpec:
    advantage: str
    policy_loss: str
    agg: str
    clip_low: float
    clip_high: float
    dynamic_sampling: bool = False
    overlong: bool = False
    critic: bool = False


ALGORITHMS: dict[str, AlgoSpec] = {
    "grpo": AlgoSpec("grpo", "ppo_clip", "seq_mean_token_mean", 0.2, 0.2),  # Shao et al. 2024 (DeepSeekMath)
    "drgrpo": AlgoSpec("drgrpo", "ppo_clip", "seq_mean_token_sum_norm", 0.2, 0.2),  # Liu et al. 2025 (Dr.GRPO)
    "dapo": AlgoSpec("grpo", "ppo_clip", "token_mean", 0.2, 0.28,  # Yu et al. 2025 (DAPO)
                     dynamic_sampling=True, overlong=True),
    "gspo": AlgoSpec("grpo", "gspo", "seq_mean_token_mean", 3e-4, 4e-4),  # Zheng et al. 2025 (GSPO)
    "rloo": AlgoSpec("rloo", "ppo_clip", "token_mean", 0.2, 0.2),  # Ahmadian et al. 2024 (Back to Basics)
    "reinforce_pp": AlgoSpec("reinforce_pp", "ppo_clip", "token_mean", 0.2, 0.2),  # Hu 2025 (REINFORCE++)
    "ppo": AlgoSpec("gae", "ppo_clip", "token_mean", 0.2, 0.2, critic=True),  # Schulman et al. 2017 (PPO + GAE)
}
