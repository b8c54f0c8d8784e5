"""Evaluation tasks for one checkpoint: held-out perplexity, task exact-match, preference accuracy; and the
pairwise accuracy of a reward model.

Plain PyTorch/transformers on one Ray task per checkpoint (tiny models; batched greedy decoding). Scores are
pure functions of (model, tokenizer, data) so the same code scores a real checkpoint.
"""
from __future__ import annotations

import math

import torch

from raylm import tasks as T
from raylm.data.tokenize import chat_tokens
from raylm.losses import IGNORE, sequence_logps


@torch.no_grad()
def perplexity(model, tok, texts: list[str], seq_len: int = 128, max_blocks: int = 256, batch_size: int = 16) -> dict:
    """Token-level perplexity of held-out text packed into `seq_len` blocks (as in pre-training)."""
    ids: list[int] = []
    for enc in tok(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(enc + [tok.eos_token_id])
    n = min(len(ids) // seq_len, max_blocks)
    blocks = torch.tensor(ids[: n * seq_len]).view(n, seq_len)
    nll, count = 0.0, 0
    for i in range(0, n, batch_size):
        b = blocks[i: i + batch_size].to(model.device)
        logits = model(input_ids=b).logits[:, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), b[:, 1:].flatten(), reduction="sum").item()
        count += b[:, 1:].numel()
    loss = nll / max(count, 1)
    return {"loss": round(loss, 4), "perplexity": round(math.exp(loss), 3), "tokens": count}


@torch.no_grad()
def generate(model, tok, prompts: list[str], max_new_tokens: int = 8, batch_size: int = 32) -> list[str]:
    """Greedy answers to one-turn chat prompts (left padding, stop at end-of-turn)."""
    stop = [tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id]
    stop = [s for s in stop if s is not None and s >= 0]
    tok.padding_side = "left"
    outs: list[str] = []
    for i in range(0, len(prompts), batch_size):
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                         tokenize=False) for p in prompts[i: i + batch_size]]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                             pad_token_id=tok.pad_token_id)
        outs.extend(tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return [o.strip() for o in outs]


def _family_means(values: list[float], task_rows: list[dict]) -> dict[str, float]:
    """Mean of `values` per task family (values[i] belongs to task_rows[i])."""
    per_family: dict[str, list[float]] = {}
    for v, t in zip(values, task_rows):
        per_family.setdefault(t["family"], []).append(float(v))
    return {f: round(sum(v) / len(v), 4) for f, v in sorted(per_family.items())}


def exact_match(model, tok, task_rows: list[dict], max_new_tokens: int = 8) -> dict:
    preds = generate(model, tok, [t["prompt"] for t in task_rows], max_new_tokens)
    hits = [T.exact_match(p, t["answer"]) for p, t in zip(preds, task_rows)]
    return {"exact_match": round(sum(hits) / max(1, len(hits)), 4), "per_family": _family_means(hits, task_rows),
            "predictions": preds}


@torch.no_grad()
def preference_accuracy(model, tok, task_rows: list[dict], max_len: int = 48) -> dict:
    """Fraction of held-out pairs where the model gives the correct answer a higher log-prob than the wrong one."""
    def logps(answers: list[str]) -> torch.Tensor:
        seqs = [chat_tokens(tok, t["prompt"], a, max_len) for t, a in zip(task_rows, answers)]
        width = max(len(s[0]) for s in seqs)
        ids = torch.full((len(seqs), width), tok.pad_token_id)
        labels = torch.full((len(seqs), width), IGNORE)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (s, lab) in enumerate(seqs):
            ids[i, : len(s)], labels[i, : len(lab)], mask[i, : len(s)] = torch.tensor(s), torch.tensor(lab), 1
        ids, labels, mask = ids.to(model.device), labels.to(model.device), mask.to(model.device)
        return sequence_logps(model(input_ids=ids, attention_mask=mask).logits, labels).cpu()

    margin = logps([t["answer"] for t in task_rows]) - logps([t["wrong"] for t in task_rows])
    return {"preference_accuracy": round((margin > 0).float().mean().item(), 4),
            "mean_logp_margin": round(margin.mean().item(), 4),
            "preference_accuracy_per_family": _family_means((margin > 0).tolist(), task_rows),
            "mean_logp_margin_per_family": _family_means(margin.tolist(), task_rows)}


@torch.no_grad()
def rewards(model, tok, prompts: list[str], answers: list[str], max_len: int = 48,
            batch_size: int = 64) -> torch.Tensor:
    """Scalar rewards (N,) of one-turn exchanges from a sequence-classification reward model, tokenized as in
    training (ChatML, right-padded with the pad id, so the head reads each sequence's last real token)."""
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = zip(prompts[i: i + batch_size], answers[i: i + batch_size])
        seqs = [chat_tokens(tok, p, a, max_len)[0] for p, a in chunk]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), tok.pad_token_id)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for j, s in enumerate(seqs):
            ids[j, : len(s)], mask[j, : len(s)] = torch.tensor(s), 1
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
        out.append(logits[:, 0].float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def reward_pair_scores(model, tok, task_rows: list[dict], max_len: int = 48) -> dict:
    """Pairwise accuracy of a reward model (fraction of pairs with r(chosen) > r(rejected)), overall and per task
    family, the mean margin, and both reward distributions (per pair too, for the scores artifact)."""
    if not task_rows:
        return {"heldout_pairs": 0, "reward_chosen": [], "reward_rejected": [], "pairs": []}
    prompts = [t["prompt"] for t in task_rows]
    r_c = rewards(model, tok, prompts, [t["answer"] for t in task_rows], max_len)
    r_r = rewards(model, tok, prompts, [t["wrong"] for t in task_rows], max_len)
    wins = (r_c > r_r).float()

    def stats(r: torch.Tensor) -> dict:
        return {"mean": round(r.mean().item(), 4), "std": round(r.std(unbiased=False).item(), 4)}

    c, r = stats(r_c), stats(r_r)
    has_family = all("family" in t for t in task_rows)
    return {"heldout_pairs": len(task_rows), "heldout_accuracy": round(wins.mean().item(), 4),
            "heldout_margin_mean": round((r_c - r_r).mean().item(), 4),
            "heldout_accuracy_per_family": _family_means(wins.tolist(), task_rows) if has_family else {},
            "reward_chosen_mean": c["mean"], "reward_chosen_std": c["std"],
            "reward_rejected_mean": r["mean"], "reward_rejected_std": r["std"],
            "reward_chosen": r_c.tolist(), "reward_rejected": r_r.tolist(),
            "pairs": [{"id": t.get("id"), "family": t.get("family"), "r_chosen": round(a, 4),
                       "r_rejected": round(b, 4)} for t, a, b in zip(task_rows, r_c.tolist(), r_r.tolist())]}
