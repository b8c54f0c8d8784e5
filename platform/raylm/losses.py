"""Losses as pure functions with tensor-shape docstrings, registered by name (verl `core_algos.py` style).

Adding an algorithm = one registered function + one test. Language-model losses take logits/labels;
preference losses take per-sequence log-probabilities of the policy and the reference; reward-model losses take the
scalar rewards a sequence-classification head gives the chosen and the rejected answer.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

IGNORE = -100
LM_LOSSES: dict[str, Callable] = {}
PREFERENCE_LOSSES: dict[str, Callable] = {}
REWARD_LOSSES: dict[str, Callable] = {}


def register(table: dict, name: str):
    def deco(fn):
        table[name] = fn
        return fn
    return deco


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token log-probs of `labels`.

    logits: (B, T, V); labels: (B, T) with IGNORE where no loss is taken.
    Returns logps (B, T-1) (0 where masked) and mask (B, T-1) float.
    """
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != IGNORE
    safe = labels.masked_fill(~mask, 0)
    logps = torch.gather(logits.log_softmax(-1), 2, safe.unsqueeze(-1)).squeeze(-1)
    return logps * mask, mask.float()


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Sum (or mean, `average=True`) of label log-probs per sequence. (B, T, V), (B, T) -> (B,)."""
    logps, mask = token_logps(logits, labels)
    total = logps.sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


@register(LM_LOSSES, "causal_lm")
def causal_lm(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over unmasked tokens. (B, T, V), (B, T) -> scalar.

    Used for pre-training (labels = input ids) and SFT (prompt tokens masked with IGNORE, so only the
    assistant's answer is learned).
    """
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)


LM_LOSSES["sft"] = causal_lm


@register(PREFERENCE_LOSSES, "dpo")
def dpo(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
        beta: float = 0.1, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimization (Rafailov et al., 2023); `label_smoothing` > 0 gives cDPO.

    All inputs (B,) sequence log-probs. Returns per-pair losses (B,), chosen rewards (B,), rejected rewards (B,),
    where reward = beta * (log pi - log pi_ref).
    """
    logits = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)
    losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    return losses, beta * (pi_chosen - ref_chosen).detach(), beta * (pi_rejected - ref_rejected).detach()


@register(PREFERENCE_LOSSES, "ipo")
def ipo(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta: float = 0.1, label_smoothing: float = 0.0):
    """Identity Preference Optimization (Azar et al., 2023): squared distance of the log-ratio margin to 1/(2 beta).

    Shapes as `dpo`.
    """
    logits = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)
    losses = (logits - 1 / (2 * beta)) ** 2
    return losses, beta * (pi_chosen - ref_chosen).detach(), beta * (pi_rejected - ref_rejected).detach()


@register(PREFERENCE_LOSSES, "hinge")
def hinge(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta: float = 0.1, label_smoothing: float = 0.0):
    """SLiC-style hinge on the log-ratio margin (Zhao et al., 2023). Shapes as `dpo`."""
    logits = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)
    losses = torch.relu(1 - beta * logits)
    return losses, beta * (pi_chosen - ref_chosen).detach(), beta * (pi_rejected - ref_rejected).detach()


@register(REWARD_LOSSES, "bradley_terry")
def bradley_terry(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: float = 0.0,
                  center_coef: float = 0.0) -> torch.Tensor:
    """Pairwise Bradley-Terry loss of a reward model (Ouyang et al., 2022): -log sigma(r_c - r_r - margin).

    r_chosen, r_rejected: (B,) scalar rewards. Returns per-pair losses (B,).
    `margin` asks for a minimum gap (Llama 2's margin term, Touvron et al., 2023; TRL's `margin` column).
    `center_coef` adds center_coef * (r_c + r_r)^2, which pulls rewards towards mean zero: the BT loss only sees
    differences, so the offset is otherwise free to drift (Eisenstein et al., 2023, eq. 2; TRL's
    `center_rewards_coefficient`, where the mean of these per-pair terms is the same loss).
    """
    r_chosen, r_rejected = r_chosen.float(), r_rejected.float()
    losses = -F.logsigmoid(r_chosen - r_rejected - margin)
    if center_coef:
        losses = losses + center_coef * (r_chosen + r_rejected) ** 2
    return losses
