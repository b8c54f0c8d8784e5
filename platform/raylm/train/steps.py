"""What a training step computes, for each objective: pure model -> (loss, metrics) functions, no Ray.

`lm` (pre-training, SFT), `preference` (the DPO family) and `reward` (a Bradley-Terry reward model: a
sequence-classification head, `job["task"] == "seq_cls"`). The Ray Train loop in `loop.py` calls these; the GPU
tests call them directly on CUDA.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from raylm.config import LoraSpec, ModelSpec
from raylm.losses import LM_LOSSES, PREFERENCE_LOSSES, REWARD_LOSSES, token_logps
from raylm.models import build_model, build_reward_model
from raylm.train.peft_menu import apply_peft, load_4bit_base


# ---------------------------------------------------------------- model setup
def make_model(job: dict, tokenizer):
    """The model a stage trains: the base (4-bit for QLoRA) prepared for `job["lora"]`'s method (PEFT adapters,
    BitFit or full: `raylm.train.peft_menu`); `job["init_adapter"]` continues a saved adapter."""
    spec = ModelSpec(**job["model"])
    seq_cls = job.get("task") == "seq_cls"
    method = LoraSpec(**job["lora"]) if job.get("lora") else None
    if seq_cls:
        if not spec.path:
            raise ValueError("a reward model (task seq_cls) starts from a checkpoint: set model.path")
        torch.manual_seed(job["train"]["seed"])  # the new score head: the same init on every worker and on export
    if method is not None and method.method == "qlora":
        model = load_4bit_base(spec, seq_cls, tokenizer)  # a clear ValueError without CUDA + bitsandbytes
    elif seq_cls:
        model = build_reward_model(spec.path, spec.dtype, tokenizer)
    else:
        model = build_model(spec, tokenizer, seed=job["train"]["seed"])
    # SEQ_CLS: PEFT adds the new `score` head to modules_to_save itself, so it is trained in full (it starts
    # random; a low-rank update of it would make no sense) and merged into the exported model.
    return apply_peft(model, method, seq_cls, adapter=job.get("init_adapter"))


def unwrap(model):
    """The model inside a DDP or DeepSpeed wrapper (FSDP2 shards in place: nothing to unwrap)."""
    wrapped = isinstance(model, torch.nn.parallel.DistributedDataParallel) or type(model).__name__ == "DeepSpeedEngine"
    return model.module if wrapped else model


# ---------------------------------------------------------------- objectives
def lm_step(model, batch: dict, job: dict) -> tuple[torch.Tensor, dict]:
    seg = batch.get("segment_ids")
    if seg is None:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
    else:
        # Packed blocks with document boundaries (pretrain's doc_mask): a token attends only to earlier tokens of
        # its own segment; RoPE positions restart per document (`position_ids`). transformers (5.x,
        # masking_utils._preprocess_mask_arguments / create_causal_mask: "It can also be an already prepared 4D
        # mask, in which case it is returned as-is") hands a (B, 1, T, T) mask straight to the attention function,
        # so it must be in that function's format: sdpa takes a boolean mask, True = attend (what `sdpa_mask`
        # builds; torch SDPA's attn_mask); eager adds it to the scores (`attn_weights + attention_mask` in
        # eager_attention_forward), so it gets an additive float mask, 0 or the dtype's min (`eager_mask`).
        # Kernels that take no dense mask (flash_attention_*, flex_attention): position_ids alone, from which
        # transformers derives the per-document mask itself (masking_utils.find_packed_sequence_indices; flash
        # attention's varlen path) -- untested here (raylm's models run sdpa; on CPU, flex_attention through that
        # path did not mask in transformers 5.19 / torch 2.13). Passed as kwargs, so DDP/FSDP2/DeepSpeed wrappers
        # forward them unchanged.
        config = getattr(unwrap(model), "config", None)
        impl = getattr(config, "_attn_implementation", None) or "sdpa"
        mask = None
        if impl in ("sdpa", "eager"):
            t = seg.shape[-1]
            causal = torch.ones(t, t, dtype=torch.bool, device=seg.device).tril()
            mask = (seg[:, :, None] == seg[:, None, :]) & causal  # (B, T query, T key)
            if batch.get("attention_mask") is not None:  # padding keys stay masked too
                mask = mask & batch["attention_mask"][:, None, :].bool()
            mask = mask[:, None]
            if impl == "eager":
                mask = torch.zeros(mask.shape, device=seg.device).masked_fill(~mask, torch.finfo(torch.float32).min)
        logits = model(input_ids=batch["input_ids"], attention_mask=mask,
                       position_ids=batch.get("position_ids")).logits
    loss = LM_LOSSES[job["loss"]](logits, batch["labels"])
    return loss, {"loss": loss.detach()}


def _pair_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed answer log-probs of chosen (B,) and rejected (B,), and the chosen answers' token counts (B,)."""
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    logps, label_mask = token_logps(model(input_ids=ids, attention_mask=mask).logits, labels)
    n = batch["chosen_input_ids"].shape[0]
    sums = logps.sum(-1)
    return sums[:n], sums[n:], label_mask[:n].sum(-1).clamp(min=1)


def preference_step(model, batch: dict, job: dict) -> tuple[torch.Tensor, dict]:
    """Policy vs reference log-probs. With LoRA the reference is the same weights with adapters disabled
    (TRL's trick for PEFT models: no second model in memory)."""
    with torch.no_grad():
        ctx = unwrap(model).disable_adapter() if job.get("lora") else nullcontext()
        with ctx:
            ref_c, ref_r, _ = _pair_logps(model if job.get("lora") else job["_ref_model"], batch)
    pi_c, pi_r, n_c = _pair_logps(model, batch)
    losses, r_c, r_r = PREFERENCE_LOSSES[job["loss"]](pi_c, pi_r, ref_c, ref_r, beta=job["beta"],
                                                      label_smoothing=job.get("label_smoothing", 0.0))
    # RPO (Pang et al., 2024; TRL's `rpo_alpha`): + alpha * per-token NLL of the chosen answer. Without it the
    # preference loss can lower both answers' likelihood and greedy decoding degenerates (seen on the demo).
    nll_chosen = -(pi_c / n_c).mean()
    loss = losses.mean() + job.get("rpo_alpha", 0.0) * nll_chosen
    return loss, {"loss": loss.detach(), "preference_loss": losses.mean().detach(), "nll_chosen": nll_chosen.detach(),
                  "reward_chosen": r_c.mean(), "reward_rejected": r_r.mean(),
                  "reward_margin": (r_c - r_r).mean(), "reward_accuracy": (r_c > r_r).float().mean(),
                  "logp_chosen": pi_c.detach().mean()}


def reward_step(model, batch: dict, job: dict) -> tuple[torch.Tensor, dict]:
    """Bradley-Terry reward modelling: chosen and rejected sequences scored in one forward (one pass through the
    body, as TRL's RewardTrainer does); the head reads the last non-pad token of each."""
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    rewards = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1).float()  # (2B,)
    n = batch["chosen_input_ids"].shape[0]
    r_c, r_r = rewards[:n], rewards[n:]
    loss = REWARD_LOSSES[job["loss"]](r_c, r_r, margin=job.get("margin", 0.0),
                                      center_coef=job.get("center_coef", 0.0)).mean()
    r_c, r_r = r_c.detach(), r_r.detach()
    return loss, {"loss": loss.detach(), "accuracy": (r_c > r_r).float().mean(), "margin": (r_c - r_r).mean(),
                  "reward_chosen": r_c.mean(), "reward_rejected": r_r.mean()}


# ---------------------------------------------------------------- distillation (the `distill` stage)
def distill_step(model, batch: dict, job: dict) -> tuple[torch.Tensor, dict]:
    """Student vs the frozen teacher (`job["_teacher"]`, loaded by the loop): `raylm.compress.distill`'s
    alpha * KD + (1 - alpha) * CE (+ hidden-state MSE). On-policy mode (`job["distill"]["on_policy"]`): a
    `fraction` of training batches (GKD's lambda; one shared RNG stream, so every rank decides alike) are the
    student's own samples for the rows' prompts; validation uses its greedy answers."""
    from raylm.compress import distill as D

    cfg = job["distill"]
    op = cfg.get("on_policy")
    if op:
        calls = job["_distill_calls"] = job.get("_distill_calls", 0) + 1
        greedy = not unwrap(model).training
        coin = torch.rand((), generator=torch.Generator().manual_seed(job["train"]["seed"] * 100003 + calls))
        if greedy or coin < op["fraction"]:
            import torch.distributed as dist

            synced = dist.is_initialized() and dist.get_world_size() > 1
            batch = D.sample_completions(unwrap(model), batch["input_ids"], batch["labels"], job["_pad_id"],
                                         job["_stop_ids"], op["max_new_tokens"], op["temperature"], greedy, synced)
    hidden = bool(cfg.get("hidden_weight"))
    kw = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}
    with torch.no_grad():
        t_out = job["_teacher"](**kw, output_hidden_states=hidden)
    s_out = model(**kw, output_hidden_states=hidden)
    return D.distill_objective(s_out.logits, t_out.logits, batch["labels"], cfg,
                               s_out.hidden_states if hidden else None, t_out.hidden_states if hidden else None,
                               batch.get("attention_mask"))


OBJECTIVES = {"lm": lm_step, "preference": preference_step, "reward": reward_step, "distill": distill_step}
# What each objective's step returns: with `val_` in front, what validation logs too (sweeps check against these).
OBJECTIVE_METRICS = {
    "lm": ("loss",),
    "preference": ("loss", "preference_loss", "nll_chosen", "reward_chosen", "reward_rejected", "reward_margin",
                   "reward_accuracy", "logp_chosen"),
    "reward": ("loss", "accuracy", "margin", "reward_chosen", "reward_rejected"),
    "distill": ("loss", "kd_loss", "ce_loss", "kl_to_teacher", "reverse_kl_to_teacher"),  # + hidden_loss when on
}


def logged_metrics(objective: str) -> tuple[str, ...]:
    """Every name a training stage of this objective logs per step (the loop's rows)."""
    base = OBJECTIVE_METRICS[objective]
    return (*base, *(f"val_{m}" for m in base), "lr", "grad_norm", "tokens_seen", "tokens_per_s")
