"""The Ray Train loop shared by pre-training, SFT, the DPO family and reward modelling.

What differs between stages is only the objective (`lm`, `preference` or `reward`, the last with a
sequence-classification model: `job["task"] == "seq_cls"`) and the loss name; the loop does
setup -> (wrap with FSDP2 or DDP) -> steps with warmup/decay LR, grad clipping, metric all-reduce and periodic
validation -> export of a full Hugging Face model (and the LoRA adapter) from rank 0 as a Ray Train checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from raylm.models import load_tokenizer, param_count
from raylm.train.schedules import lr_multiplier
from raylm.train.steps import OBJECTIVES, make_model, unwrap



def wrap(model, strategy: str):
    """FSDP2 (`fully_shard` per decoder layer, then the root) or DDP. Gloo on CPU, NCCL on GPU (set by Ray Train)."""
    if dist.get_world_size() == 1:
        return model
    if strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for module in model.modules():
            if type(module).__name__.endswith("DecoderLayer"):
                fully_shard(module)
        return fully_shard(model)
    return torch.nn.parallel.DistributedDataParallel(model)


def full_state_dict(model, strategy: str) -> dict:
    """A full, CPU state dict on rank 0 (collective under FSDP2: every rank must call it)."""
    if strategy == "fsdp2" and dist.get_world_size() > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def export(job: dict, state: dict, tokenizer, out_dir: str) -> dict:
    """Rank 0: rebuild the model on CPU, load the trained state, save `model/` (merged where the method allows) and
    `adapter/` for PEFT methods (`raylm.train.peft_menu`); returns what the export records (merged or not)."""
    from raylm.config import LoraSpec
    from raylm.train.peft_menu import export_job, export_model, load_trained_state

    model = make_model(export_job(job), tokenizer)
    load_trained_state(model, state, job)
    _, info = export_model(model, out_dir, LoraSpec(**job["lora"]) if job.get("lora") else None)
    tokenizer.save_pretrained(os.path.join(out_dir, "model"))
    return info


# ---------------------------------------------------------------- helpers
def _mean_across_workers(values: dict[str, torch.Tensor]) -> dict[str, float]:
    keys = sorted(values)
    t = torch.stack([values[k].detach().float().reshape(()).cpu() for k in keys])
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":  # NCCL reduces GPU tensors only
            t = t.to(ray.train.torch.get_device())
        dist.all_reduce(t)
        t = t.cpu()
        t /= dist.get_world_size()
    return {k: float(v) for k, v in zip(keys, t)}


def _batches(shard, batch_size: int, shuffle_buffer: int, seed: int):
    """Endless batches, epoch after epoch, reshuffled within a local buffer each epoch (the stages also shuffle
    globally once: curated data arrives grouped by source or task family, and unshuffled training would learn
    one group after the other and forget the earlier ones)."""
    epoch = 0
    while True:
        for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=True,
                                              local_shuffle_buffer_size=shuffle_buffer or None,
                                              local_shuffle_seed=seed + epoch if shuffle_buffer else None):
            yield batch
        epoch += 1


@torch.no_grad()
def evaluate(model, shard, job: dict, batch_size: int) -> dict[str, float]:
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    n = 0
    for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=False):
        _, metrics = OBJECTIVES[job["objective"]](model, batch, job)
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float()
        n += 1
    model.train()
    if not sums:
        return {}
    means = _mean_across_workers({k: v / max(n, 1) for k, v in sums.items()})
    return {f"val_{k}": v for k, v in means.items()}


def save_trainer_state(model, opt, step: int, rank: int):
    """A resumable checkpoint (full model and optimizer state, the step, the RNG) as a Ray Train checkpoint on rank 0
    (collective: every rank calls it). `torch.distributed.checkpoint.state_dict` gathers FSDP2 shards and strips
    DDP's wrapper, so one format serves every strategy."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return None
    tmp = tempfile.mkdtemp(prefix="raylm-state-")
    torch.save({"model": msd, "optim": osd, "step": step, "rng": torch.get_rng_state()},
               os.path.join(tmp, "trainer_state.pt"))
    return ray.train.Checkpoint.from_directory(tmp)


def load_trainer_state(model, opt, checkpoint) -> int:
    """Restore what `save_trainer_state` wrote; returns the step to continue from (0 when the checkpoint holds no
    trainer state, e.g. a finished run's export)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    with checkpoint.as_directory() as d:
        path = os.path.join(d, "trainer_state.pt")
        if not os.path.exists(path):
            return 0
        state = torch.load(path, weights_only=False)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(full_state_dict=True))
    torch.set_rng_state(state["rng"])
    return int(state["step"])


def report_row(row: dict, model, opt, step: int, job: dict, rank: int) -> None:
    """Inside a sweep trial: every logged row goes to Ray Train (and from there to Tune), every `checkpoint_every`
    steps with a resumable checkpoint."""
    every = job.get("checkpoint_every") or 0
    ckpt = save_trainer_state(model, opt, step, rank) if every and step % every == 0 else None
    ray.train.report(row, checkpoint=ckpt)
    if ckpt is not None:
        shutil.rmtree(ckpt.path, ignore_errors=True)  # report persisted a copy


# ---------------------------------------------------------------- the loop
def train_loop_per_worker(job: dict) -> None:
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    tc, oc = job["train"], job["optim"]
    torch.manual_seed(tc["seed"])
    tokenizer = load_tokenizer(job["tokenizer_path"])
    device = ray.train.torch.get_device()  # batches arrive there too (iter_torch_batches' device="auto")
    model = make_model(job, tokenizer).to(device)
    n_params, n_trainable = param_count(model), param_count(model, trainable_only=True)
    if job["objective"] == "preference" and not job.get("lora"):
        job["_ref_model"] = make_model(job, tokenizer).to(device).eval().requires_grad_(False)
    model = wrap(model, job["strategy"])
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=oc["lr"], betas=tuple(oc["betas"]), weight_decay=oc["weight_decay"])
    step_fn = OBJECTIVES[job["objective"]]
    train_it = _batches(ray.train.get_dataset_shard("train"), tc["batch_size"], tc["shuffle_buffer"],
                        tc["seed"] + 1000 * rank)
    val_shard = ray.train.get_dataset_shard("val") if job.get("has_val") else None
    world = ctx.get_world_size()
    tokens_per_step = tc["batch_size"] * world * tc["seq_len"]

    # a PBT-exploited or retried sweep trial, or Ray Train restarting the group after a failure (`max_failures`)
    resume = job.get("resume_from") or ray.train.get_checkpoint()
    start = load_trainer_state(model, opt, resume) if resume is not None else 0

    history: list[dict] = []
    window: dict[str, torch.Tensor] = {}  # metric sums since the last logged step (logged values are means)
    t_start = t_last = time.time()
    last_logged = start - 1
    for step in range(start, tc["max_steps"]):
        lr = oc["lr"] * lr_multiplier(step, tc["max_steps"], oc["warmup_steps"], oc["schedule"], oc["min_lr_ratio"])
        for g in opt.param_groups:
            g["lr"] = lr
        loss, metrics = step_fn(model, next(train_it), job)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, oc["grad_clip"])
        if hasattr(grad_norm, "full_tensor"):  # DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for k, v in {**metrics, "grad_norm": grad_norm}.items():
            window[k] = window.get(k, 0.0) + v.detach().float().reshape(())  # stays on device: no per-step sync
        last = step == tc["max_steps"] - 1
        do_eval = val_shard is not None and ((step + 1) % tc["eval_every"] == 0 or last or step == 0)
        if step % tc["log_every"] == 0 or last or do_eval:
            n = step - last_logged
            row = {"step": step + 1, "lr": lr, **_mean_across_workers({k: v / n for k, v in window.items()})}
            now = time.time()
            row["tokens_seen"] = (step + 1) * tokens_per_step
            row["tokens_per_s"] = round(tokens_per_step * n / max(now - t_last, 1e-9))
            if do_eval:
                row.update(evaluate(model, val_shard, job, tc["batch_size"]))
            history.append(row)
            window, last_logged, t_last = {}, step, time.time()
            if rank == 0:
                print(json.dumps(row), flush=True)
            if job.get("report_rows") and not last:
                report_row(row, model, opt, step + 1, job, rank)
    train_s = time.time() - t_start

    state = full_state_dict(model, job["strategy"])
    final = {**history[-1], "train_s": round(train_s, 2), "params": n_params, "trainable_params": n_trainable,
             "world_size": world, "final_report": True}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            final.update(export(job, state, tokenizer, tmp))
            with open(os.path.join(tmp, "history.json"), "w") as f:
                json.dump(history, f)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(final, checkpoint=checkpoint)
