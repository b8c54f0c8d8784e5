"""Turn sampled responses into training tensors (no Ray, no model): prompt + response ids, right-padded, with the
response positions marked in next-token coordinates (what `losses.token_logps` returns).

Position convention: for a sequence `ids` of length L, logits[:, t] predict ids[t + 1], so the log-prob of
response token j (at position P + j, P = prompt length) sits at column P + j - 1 of the (N, L - 1) arrays.
"""
from __future__ import annotations

import torch

from raylm.losses import IGNORE


def build_batch(prompt_ids: list[list[int]], samples: list[list[dict]], pad_id: int) -> dict[str, torch.Tensor]:
    """`samples[i]` holds the k responses to `prompt_ids[i]` ({"ids", "logps", ...}); rows are grouped per prompt.

    Returns input_ids / attention_mask / labels (N, L), mask and behaviour_logp (N, L-1), response_len (N,).
    """
    rows = [(p, s) for p, group in zip(prompt_ids, samples) for s in group]
    width = max(len(p) + len(s["ids"]) for p, s in rows)
    n = len(rows)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    attn = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    behaviour = torch.zeros((n, width - 1))
    lengths = torch.zeros(n)
    for i, (p, s) in enumerate(rows):
        r = s["ids"]
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        attn[i, : len(p) + len(r)] = 1
        labels[i, len(p): len(p) + len(r)] = torch.tensor(r, dtype=torch.long)
        behaviour[i, len(p) - 1: len(p) - 1 + len(r)] = torch.tensor(s["logps"])
        lengths[i] = len(r)
    mask = (labels[:, 1:] != IGNORE).float()
    return {"input_ids": ids, "attention_mask": attn, "labels": labels, "mask": mask,
            "behaviour_logp": behaviour, "response_len": lengths}


def outcome_on_last_token(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N,) outcome rewards placed on each row's last response token -> (N, T)."""
    out = torch.zeros_like(mask)
    last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(-1)
    out[torch.arange(mask.shape[0]), last] = rewards * (mask.sum(-1) > 0)
    return out
