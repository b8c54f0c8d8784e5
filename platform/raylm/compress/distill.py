"""Knowledge distillation: divergence losses (pure functions, registered by name), hidden-state matching, the mixed
loss, the frozen teacher, on-policy sampling, the tokenizer check and a held-out KL measurement.

Conventions follow TRL's GKD (`trl.experimental.gkd.GKDTrainer.generalized_jsd_loss`, Agarwal et al., 2024,
arXiv 2306.13649): both distributions softened by the same temperature, summed over the vocabulary, averaged over
label tokens; `jsd` with `beta` is the generalised Jensen-Shannon divergence of GKD's eq. (1), and beta = 0 / 1 are
forward / reverse KL exactly as TRL defines them (the unit tests check equality with TRL's function). We keep our own
copy instead of importing it: TRL's lives in `trl.experimental` (an unstable path that imports the whole Trainer
stack into every Ray Train worker) and returns no per-token values, which on-policy mode and the metrics need.
Unlike TRL, the KD term is multiplied by T^2 (Hinton et al., 2015): soft-target gradients scale as 1/T^2, so
without it changing the temperature would silently change the KD/CE balance set by `alpha`.

Position convention (as `raylm.losses.causal_lm`): logits[:, t] predict labels[:, t + 1]; a position takes part when
its next label is not IGNORE (-100), so SFT-style rows distil only the answer tokens and packed text every token.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from raylm.losses import IGNORE, register

DIVERGENCES: dict[str, Callable] = {}


# ---------------------------------------------------------------- per-token divergences (full vocabulary)
@register(DIVERGENCES, "forward_kl")
def forward_kl(s_logp: torch.Tensor, t_logp: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """KL(teacher || student) per position: mean-seeking (the student covers every teacher mode; classic KD).

    s_logp, t_logp: (..., V) log-probabilities. Returns (...)."""
    return (t_logp.exp() * (t_logp - s_logp)).sum(-1)


@register(DIVERGENCES, "reverse_kl")
def reverse_kl(s_logp: torch.Tensor, t_logp: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """KL(student || teacher) per position: mode-seeking (the student puts its mass where the teacher is confident;
    GKD's on-policy choice, MiniLLM). Shapes as `forward_kl`."""
    return (s_logp.exp() * (s_logp - t_logp)).sum(-1)


@register(DIVERGENCES, "jsd")
def jsd(s_logp: torch.Tensor, t_logp: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Generalised JSD (GKD eq. 1, TRL's convention): M = beta * teacher + (1 - beta) * student,
    beta * KL(teacher || M) + (1 - beta) * KL(student || M); beta = 0 is forward KL and beta = 1 reverse KL (TRL's
    endpoints, not the limits of the formula, which vanish). Shapes as `forward_kl`."""
    if beta == 0:
        return forward_kl(s_logp, t_logp)
    if beta == 1:
        return reverse_kl(s_logp, t_logp)
    b = torch.tensor(beta, dtype=s_logp.dtype, device=s_logp.device)
    m = torch.logsumexp(torch.stack([s_logp + torch.log1p(-b), t_logp + torch.log(b)]), dim=0)
    return b * (t_logp.exp() * (t_logp - m)).sum(-1) + (1 - b) * (s_logp.exp() * (s_logp - m)).sum(-1)


def label_mask(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels -> (B, T-1) float mask of the positions whose next token is learned."""
    return (labels[:, 1:] != IGNORE).float()


def token_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "forward_kl",
                     temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """Per-position divergence of the temperature-softened distributions, shifted to next-token positions.

    student_logits, teacher_logits: (B, T, V) (the same vocabulary). Returns (B, T-1), not scaled by T^2."""
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown distillation loss {kind!r}; choose one of {sorted(DIVERGENCES)}")
    s = (student_logits[:, :-1].float() / temperature).log_softmax(-1)
    t = (teacher_logits[:, :-1].float() / temperature).log_softmax(-1)
    return DIVERGENCES[kind](s, t, beta)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            kind: str = "forward_kl", temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """T^2 * mean divergence over label positions. (B, T, V), (B, T, V), (B, T) -> scalar (0 without labels)."""
    mask = label_mask(labels)
    div = token_divergence(student_logits, teacher_logits, kind, temperature, beta)
    return temperature ** 2 * (div * mask).sum() / mask.sum().clamp(min=1)


def hidden_loss(student_hidden: tuple[torch.Tensor, ...], teacher_hidden: tuple[torch.Tensor, ...],
                layers: list[tuple[int, int]], mask: torch.Tensor | None = None) -> torch.Tensor:
    """MSE between paired hidden states, averaged over pairs, hidden units and (masked) tokens.

    student_hidden / teacher_hidden: HF `output_hidden_states` tuples, entry i (B, T, H) = after layer i (0: the
    embeddings); layers: [(student index, teacher index), ...] (negative = from the end); mask: (B, T) 1 where a
    token counts (None: all). Same width only (H equal): no learned projection (see the distill stage's check)."""
    total = torch.zeros((), device=student_hidden[0].device)
    for s_i, t_i in layers:
        s, t = student_hidden[s_i].float(), teacher_hidden[t_i].float()
        err = ((s - t) ** 2).mean(-1)  # (B, T)
        m = torch.ones_like(err) if mask is None else mask.float()
        total = total + (err * m).sum() / m.sum().clamp(min=1)
    return total / max(len(layers), 1)


def distill_objective(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      cfg: dict, student_hidden=None, teacher_hidden=None,
                      token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """loss = alpha * KD + (1 - alpha) * CE (+ hidden_weight * hidden), and what to log.

    cfg: {loss, temperature, alpha, beta, hidden_weight, hidden_layers}. Logs `kd_loss`, `ce_loss`, `hidden_loss`
    and, at T = 1 whatever the training loss, `kl_to_teacher` (forward KL) and `reverse_kl_to_teacher` on the label
    positions: one yardstick across runs with different losses, alpha = 0 included."""
    from raylm.losses import causal_lm

    alpha = cfg["alpha"]
    kd = kd_loss(student_logits, teacher_logits, labels, cfg["loss"], cfg["temperature"], cfg.get("beta", 0.5))
    ce = causal_lm(student_logits, labels)
    loss = alpha * kd + (1 - alpha) * ce
    metrics = {"kd_loss": kd.detach(), "ce_loss": ce.detach()}
    if cfg.get("hidden_weight"):
        h = hidden_loss(student_hidden, teacher_hidden, cfg["hidden_layers"], token_mask)
        loss = loss + cfg["hidden_weight"] * h
        metrics["hidden_loss"] = h.detach()
    with torch.no_grad():
        mask = label_mask(labels)
        s = student_logits[:, :-1].float().log_softmax(-1)
        t = teacher_logits[:, :-1].float().log_softmax(-1)
        n = mask.sum().clamp(min=1)
        metrics["kl_to_teacher"] = (forward_kl(s, t) * mask).sum() / n
        metrics["reverse_kl_to_teacher"] = (reverse_kl(s, t) * mask).sum() / n
    return loss, {"loss": loss.detach(), **metrics}


# ---------------------------------------------------------------- on-policy samples (GKD with lambda > 0)
def prompt_lengths(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) SFT labels -> (B,) prompt length = index of the first learned token (T when none is learned)."""
    learned = labels != IGNORE
    first = learned.float().argmax(-1)
    return torch.where(learned.any(-1), first, torch.full_like(first, labels.shape[1]))


@torch.no_grad()
def sample_completions(model, input_ids: torch.Tensor, labels: torch.Tensor, pad_id: int, stop_ids: list[int],
                       max_new_tokens: int, temperature: float, greedy: bool = False,
                       synced: bool = False) -> dict[str, torch.Tensor]:
    """The student answers the rows' prompts itself: HF `generate` on left-padded prompts.

    input_ids, labels: (B, T) right-padded SFT rows (labels IGNORE on the prompt). Returns a batch of
    input_ids / attention_mask / labels, (B, P + max_new_tokens), whose labels are the sampled tokens up to and
    including the first stop token (IGNORE on prompt, padding and after the stop). `synced`: every rank keeps
    stepping until all are done (HF's `synced_gpus`; FSDP2 / ZeRO-3 forwards are collectives)."""
    plen = prompt_lengths(labels)
    width = int(plen.max())
    b = input_ids.shape[0]
    prompts = torch.full((b, width), pad_id, dtype=input_ids.dtype, device=input_ids.device)
    attn = torch.zeros((b, width), dtype=torch.long, device=input_ids.device)
    for i in range(b):  # left padding: generation continues right after each prompt
        n = int(plen[i])
        prompts[i, width - n:], attn[i, width - n:] = input_ids[i, :n], 1
    kwargs = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    out = model.generate(input_ids=prompts, attention_mask=attn, max_new_tokens=max_new_tokens,
                         eos_token_id=stop_ids, pad_token_id=pad_id, synced_gpus=synced, **kwargs)
    gen = out[:, width:]
    if gen.shape[1] < max_new_tokens:  # every row stopped early: fixed width for the metrics all-reduce
        gen = F.pad(gen, (0, max_new_tokens - gen.shape[1]), value=pad_id)
    is_stop = torch.isin(gen, torch.tensor(stop_ids, device=gen.device))
    after_stop = (is_stop.long().cumsum(-1) - is_stop.long()) > 0  # positions after the first stop token
    gen_labels = gen.masked_fill(after_stop, IGNORE)
    ids = torch.cat([prompts, gen], 1)
    mask = torch.cat([attn, (~after_stop).long()], 1)
    lab = torch.cat([torch.full_like(prompts, IGNORE), gen_labels], 1)
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


# ---------------------------------------------------------------- the teacher and the tokenizer check
def load_teacher(path: str, dtype: str, device) -> torch.nn.Module:
    """The frozen teacher on this worker: eval mode, no gradients (bf16 halves its memory when asked)."""
    from raylm.models import load_model

    return load_model(path, dtype).to(device).eval().requires_grad_(False)


def tokenizer_difference(teacher_tok, student_tok) -> str | None:
    """None when both tokenize identically (same vocabulary and special tokens); otherwise what differs."""
    specials = ("bos_token", "eos_token", "pad_token", "unk_token")
    for name in specials:
        a, b = getattr(teacher_tok, name, None), getattr(student_tok, name, None)
        if a != b:
            return f"{name}: teacher {a!r}, student {b!r}"
    a, b = sorted(teacher_tok.all_special_tokens), sorted(student_tok.all_special_tokens)
    if a != b:
        return f"special tokens: teacher has {sorted(set(a) - set(b))} the student lacks, the student has " \
               f"{sorted(set(b) - set(a))} the teacher lacks"
    va, vb = teacher_tok.get_vocab(), student_tok.get_vocab()
    if len(va) != len(vb):
        return f"vocabulary size: teacher {len(va)}, student {len(vb)}"
    diff = sorted(set(va.items()) ^ set(vb.items()), key=lambda kv: kv[1])
    if diff:
        tid = diff[0][1]
        inv_a, inv_b = {i: t for t, i in va.items()}, {i: t for t, i in vb.items()}
        return f"vocabulary: token id {tid} is {inv_a.get(tid)!r} for the teacher, {inv_b.get(tid)!r} for the student"
    return None


# ---------------------------------------------------------------- held-out measurement (driver side, Ray task)
@torch.no_grad()
def heldout_kl(student, teacher, batches: list[dict], on_policy: dict | None = None, pad_id: int = 0,
               stop_ids: list[int] | None = None) -> dict:
    """Mean per-token forward and reverse KL (T = 1) of student vs teacher on held-out batches.

    batches: dicts of (B, T) tensors (input_ids, labels, optional attention_mask). With `on_policy`
    ({max_new_tokens}), each prompt is answered greedily by the student first and the KL is taken on those answers
    (what on-policy distillation optimises); otherwise on the batches' own label tokens."""
    fwd = rev = n = 0.0
    for b in batches:
        if on_policy:
            b = sample_completions(student, b["input_ids"], b["labels"], pad_id, stop_ids or [pad_id],
                                   on_policy["max_new_tokens"], 1.0, greedy=True)
        kw = {"input_ids": b["input_ids"], "attention_mask": b.get("attention_mask")}
        s = student(**kw).logits[:, :-1].float().log_softmax(-1)
        t = teacher(**kw).logits[:, :-1].float().log_softmax(-1)
        mask = label_mask(b["labels"])
        fwd += float((forward_kl(s, t) * mask).sum())
        rev += float((reverse_kl(s, t) * mask).sum())
        n += float(mask.sum())
    return {"forward_kl": round(fwd / max(n, 1), 5), "reverse_kl": round(rev / max(n, 1), 5), "tokens": int(n)}


def worker_setup(job: dict, tokenizer, device) -> dict:
    """What a Ray Train worker adds to a distill job (the loop's one hook): the frozen teacher, and the pad and
    stop ids on-policy sampling needs."""
    d = job["distill"]
    return {"_teacher": load_teacher(d["teacher_path"], d.get("teacher_dtype", "float32"), device),
            "_pad_id": tokenizer.pad_token_id, "_stop_ids": stop_ids(tokenizer)}


def stop_ids(tok) -> list[int]:
    """End-of-turn and end-of-text ids: where a sampled answer ends (as `raylm.eval.generate` stops)."""
    from raylm.models import IM_END

    return [i for i in (tok.convert_tokens_to_ids(IM_END), tok.eos_token_id) if i is not None and i >= 0]
