"""The Ray Train loop shared by pre-training, SFT, the DPO family, reward modelling and distillation.

What differs between stages is only the objective (`lm`, `preference` or `reward`, the last with a
sequence-classification model: `job["task"] == "seq_cls"`) and the loss name; the loop does
setup -> distribute (FSDP2, DDP or DeepSpeed ZeRO: `backends.py`) -> steps (gradient accumulation, bf16 autocast,
clipping, the LR schedule, a non-finite check, metric all-reduce, periodic validation, early stopping, periodic
sharded checkpoints) -> export of a full Hugging Face model (and the LoRA adapter) from rank 0 as a Ray Train
checkpoint.

A checkpoint holds every rank's shard of model and optimizer state, each rank's RNG state, and (rank 0's
`progress.json`) the step, the history so far and the batches consumed, so a run restarted by Ray Train
(`resources.max_failures`) or resumed by a new run (`resume_from`) continues the same trajectory: the loss curve
goes on, it does not restart.
"""
from __future__ import annotations

import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from raylm import console
from raylm.harness import continuous
from raylm.models import flops_per_token, load_tokenizer, param_count
from raylm.train import backends
from raylm.train.schedules import lr_at
from raylm.train.steps import OBJECTIVES, make_model


def export(job: dict, state: dict | None, tokenizer, out_dir: str, model=None) -> dict:
    """Rank 0: save `model/` (merged where the method allows) and `adapter/` for PEFT methods
    (`raylm.train.peft_menu`); returns what the export records (merged or not). `model`: the trained model itself
    when this rank holds all of it (`whole_model`), saved as it is; without it the model is rebuilt on CPU and the
    gathered `state` loaded into it."""
    from raylm.config import LoraSpec
    from raylm.train.peft_menu import export_job, export_model, load_trained_state

    if model is None:
        model = make_model(export_job(job), tokenizer)
        load_trained_state(model, state, job)
    with _no_deepspeed_probe():
        _, info = export_model(model, out_dir, LoraSpec(**job["lora"]) if job.get("lora") else None)
    tokenizer.save_pretrained(os.path.join(out_dir, "model"))
    return info


@contextmanager
def _no_deepspeed_probe():
    """transformers' `save_pretrained` unwraps the model with accelerate's `extract_model_from_parallel`, which
    imports deepspeed whenever it is installed only to test `isinstance(model, DeepSpeedEngine)`: ~1 s (import,
    accelerator detection, a test compile) of every export from a process that never used DeepSpeed. Where
    deepspeed is not imported, no model is a DeepSpeedEngine: the test is skipped for the block, same files."""
    try:
        import accelerate.utils.other as acc
    except ImportError:
        acc = None
    if "deepspeed" in sys.modules or acc is None or not hasattr(acc, "is_deepspeed_available"):
        yield
        return
    probe = acc.is_deepspeed_available
    acc.is_deepspeed_available = lambda: False
    try:
        yield
    finally:
        acc.is_deepspeed_available = probe


def whole_model(backend, job: dict, device: torch.device):
    """The trained model, when every rank holds all of it in the dtype the export has: one worker, DDP or ZeRO-1/2,
    on CPU, not QLoRA. Rank 0 then exports it as it is, instead of gathering a full state dict, building a fresh
    random-init model and loading the state into it (on a 97M-parameter model that rebuild cost ~1.5 s of every
    run's end; `benchmarks/train_throughput.py`). None (FSDP2 or ZeRO-3 shards, GPU, QLoRA's 4-bit base): rebuild.
    The same answer on every rank, so the gather stays a collective all of them join."""
    if device.type != "cpu" or (job.get("lora") or {}).get("method") == "qlora":
        return None
    if isinstance(backend, backends.DeepSpeedBackend):
        return backend.unwrapped() if backend.stage < 3 else None
    sharded = backend.strategy == "fsdp2" and (dist.get_world_size() if dist.is_initialized() else 1) > 1
    return None if sharded else backend.unwrapped()


# ---------------------------------------------------------------- helpers
def _all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dev = t.device
        if dist.get_backend() == "nccl":  # NCCL reduces GPU tensors only
            t = t.to(ray.train.torch.get_device())
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        t = t.to(dev)
    return t


def _mean_across_workers(values: dict[str, torch.Tensor]) -> dict[str, float]:
    keys = sorted(values)
    t = torch.stack([values[k].detach().float().reshape(()).cpu() for k in keys])
    t = _all_reduce(t) / (dist.get_world_size() if dist.is_initialized() else 1)
    return {k: float(v) for k, v in zip(keys, t)}


def _batches(shard, batch_size: int, shuffle_buffer: int, seed: int, skip: int = 0):
    """Endless batches, epoch after epoch, reshuffled within a local buffer each epoch (the stages also shuffle
    globally once: curated data arrives grouped by source or task family, and unshuffled training would learn
    one group after the other and forget the earlier ones). `skip` batches are read and dropped first: a resumed
    run continues at the data position it stopped at (reading is cheap next to training on them)."""
    epoch = 0
    while True:
        for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=True,
                                              local_shuffle_buffer_size=shuffle_buffer or None,
                                              local_shuffle_seed=seed + epoch if shuffle_buffer else None):
            if skip:
                skip -= 1
                continue
            yield batch
        epoch += 1


def autocast(precision: str, device: torch.device):
    """bf16 autocast (CPU or GPU); fp32 runs without one. Weights and optimizer state stay fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def evaluate(model, shard, job: dict, batch_size: int, device) -> dict[str, float]:
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    n = 0
    for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=False):
        with autocast(job["train"].get("precision", "fp32"), device):
            _, metrics = OBJECTIVES[job["objective"]](model, batch, job)
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float()
        n += 1
    model.train()
    if not sums:
        return {}
    means = _mean_across_workers({k: v / max(n, 1) for k, v in sums.items()})
    return {f"val_{k}": v for k, v in means.items()}


def matmul_flops(device: torch.device, precision: str, n: int = 1024, reps: int = 4) -> float:
    """FLOP/s of a square matmul on this worker, as the MFU denominator on CPU (no datasheet peak applies: it
    depends on the cores a worker gets). On GPU the same measurement is a lower bound of the datasheet peak."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def per_worker(value: float) -> list[float]:
    """[value of rank 0, rank 1, ...] on every rank."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    t = torch.zeros(world, dtype=torch.float64)
    t[dist.get_rank() if dist.is_initialized() else 0] = value
    return [float(v) for v in _all_reduce(t)]


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_trainer_state(backend, progress: dict, rank: int, directory: str | None = None) -> str:
    """Collective: every rank writes its shard of model + optimizer state and its RNG state into a local directory
    (Ray Train merges the ranks' directories into one checkpoint); rank 0 adds `progress.json`."""
    directory = directory or tempfile.mkdtemp(prefix="raylm-state-")
    backend.save(directory)
    torch.save(_rng_state(), os.path.join(directory, f"rng_rank{rank}.pt"))
    if rank == 0:
        with open(os.path.join(directory, "progress.json"), "w") as f:
            json.dump(progress, f)
    return directory


def load_trainer_state(backend, checkpoint, rank: int) -> dict | None:
    """Restore what `save_trainer_state` wrote; returns its progress (None when the checkpoint holds no trainer
    state, e.g. a finished run's export without `train.checkpoint_every`)."""
    with checkpoint.as_directory() as d:
        if not os.path.exists(os.path.join(d, "progress.json")) or not backend.has_state(d):
            return None
        backend.load(d)
        rng = os.path.join(d, f"rng_rank{rank}.pt")
        if os.path.exists(rng):  # absent when resuming on more workers than saved: those start fresh streams
            _set_rng_state(torch.load(rng, weights_only=False))
        with open(os.path.join(d, "progress.json")) as f:
            return json.load(f)


def report(row: dict, checkpoint_dir: str | None) -> None:
    """`ray.train.report` (a barrier: every rank calls it), then drop the local copy it persisted."""
    ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
    ray.train.report(row, checkpoint=ckpt)
    if checkpoint_dir:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)


# ---------------------------------------------------------------- the loop
def train_loop_per_worker(job: dict) -> None:
    t_enter = time.time()  # fixed-cost breakdown (final metrics): set-up, export and the final report's time
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tc, oc = job["train"], job["optim"]
    precision, accum = tc.get("precision", "fp32"), tc.get("grad_accum", 1)
    torch.manual_seed(tc["seed"])
    tokenizer = load_tokenizer(job["tokenizer_path"])
    device = ray.train.torch.get_device()  # batches arrive there too (iter_torch_batches' device="auto")
    model = make_model(job, tokenizer).to(device)
    t_model = time.time()
    if tc.get("activation_checkpointing"):
        # recompute each decoder layer's activations in backward: memory for compute (non-reentrant, as FSDP2
        # and DeepSpeed require); a PEFT model needs its inputs to require grad for it
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    n_params, n_trainable = param_count(model), param_count(model, trainable_only=True)
    model_cfg = getattr(model, "config", None)
    if job["objective"] == "preference" and not job.get("lora"):
        job["_ref_model"] = make_model(job, tokenizer).to(device).eval().requires_grad_(False)
    if job["objective"] == "distill":  # the frozen teacher (eval, no grad) beside the student: raylm.compress.distill
        from raylm.compress.distill import worker_setup
        job.update(worker_setup(job, tokenizer, device))
    backend = backends.create(model, job)
    t_backend = time.time()
    model = backend.model
    model.train()
    keep_zeros = None
    if job.get("keep_zeros"):  # prune's recovery run: pruned weights stay zero (re-applied after every step)
        from raylm.compress.prune import zero_keeper
        keep_zeros = zero_keeper(backend.unwrapped(), job["keep_zeros"])
    step_fn = OBJECTIVES[job["objective"]]
    val_shard = ray.train.get_dataset_shard("val") if job.get("has_val") else None
    tokens_per_step = tc["batch_size"] * accum * world * tc["seq_len"]
    every = job.get("checkpoint_every") or tc.get("checkpoint_every") or 0
    stop_at = min(tc.get("stop_at") or tc["max_steps"], tc["max_steps"])
    es = tc.get("early_stopping") or None

    # resume: a new run from another's checkpoint (`resume_from`, or a PBT-exploited / retried sweep trial), or
    # Ray Train restarting the worker group after a failure (`resources.max_failures`)
    restored = ray.train.get_checkpoint()
    source = restored or job.get("resume_from")
    progress = load_trainer_state(backend, source, rank) if source is not None else None
    progress = progress or {"step": 0, "history": [], "restarts": 0, "best_val": None, "bad_evals": 0}
    if restored is not None and progress["step"]:
        progress["restarts"] = progress.get("restarts", 0) + 1
    start, history = progress["step"], progress["history"]
    train_it = _batches(ray.train.get_dataset_shard("train"), tc["batch_size"], tc["shuffle_buffer"],
                        tc["seed"] + 1000 * rank, skip=start * accum)
    fpt = flops_per_token(model_cfg, tc["seq_len"]) if model_cfg is not None and job.get("task") != "seq_cls" \
        else 6 * n_params
    t_probe = time.time()
    peak_flops = matmul_flops(device, precision)
    probe_s = time.time() - t_probe

    window: dict[str, torch.Tensor] = {}  # metric sums since the last logged step (logged values are means)
    t_start = t_last = time.time()
    last_logged, stop_reason, step = start - 1, None, start
    for step in range(start, stop_at):
        lr = lr_at(step, tc["max_steps"], oc)
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            with autocast(precision, device):
                loss, metrics = step_fn(model, next(train_it), job)
            backend.backward(loss, last_micro=micro == accum - 1)
            loss_sum += loss.detach().float()
            for k, v in metrics.items():
                window[k] = window.get(k, 0.0) + v.detach().float().reshape(()) / accum
        grad_norm = backend.grad_norm(oc["grad_clip"])
        # every rank must agree to stop, or the next collective hangs: one scalar all-reduce per step
        finite = torch.isfinite(loss_sum)
        if not isinstance(backend, backends.DeepSpeedBackend):  # DeepSpeed's norm is known only after its step
            finite = finite & torch.isfinite(grad_norm)
        if _all_reduce((~finite).float().reshape(1).cpu(), dist.ReduceOp.MAX).item() > 0:
            backend.skip_step()  # the weights stay those of the last good step
            stop_reason = "nonfinite"
            break
        backend.step(lr)
        if keep_zeros is not None:
            keep_zeros()
        if isinstance(backend, backends.DeepSpeedBackend):
            grad_norm = backend.last_grad_norm()
        window["grad_norm"] = window.get("grad_norm", 0.0) + grad_norm.detach().float().reshape(()).cpu()
        gmax = window.get("grad_norm_max", torch.zeros(()))
        window["grad_norm_max"] = torch.maximum(gmax, grad_norm.detach().float().reshape(()).cpu())
        last = step == stop_at - 1
        want_ckpt = bool(every) and (step + 1) % every == 0 and not last
        do_eval = val_shard is not None and ((step + 1) % tc["eval_every"] == 0 or last or step == 0)
        if job.get("task_eval") and continuous.due(job["task_eval"], step, last):
            continuous.snapshot(job, backend, tokenizer, rank, step + 1)
        if not (step % tc["log_every"] == 0 or last or do_eval or want_ckpt):
            continue
        n = step - last_logged
        gmax = window.pop("grad_norm_max")
        row = {"step": step + 1, "lr": lr, **_mean_across_workers({k: v / n for k, v in window.items()})}
        row["grad_norm_max"] = float(_all_reduce(gmax.reshape(1), dist.ReduceOp.MAX))
        now = time.time()
        row["tokens_seen"] = (step + 1) * tokens_per_step
        row["tokens_per_s"] = round(tokens_per_step * n / max(now - t_last, 1e-9))
        if do_eval:
            row.update(evaluate(model, val_shard, job, tc["batch_size"], device))
            if es and "val_loss" in row:
                if progress["best_val"] is None or row["val_loss"] < progress["best_val"] - es["min_delta"]:
                    progress["best_val"], progress["bad_evals"] = row["val_loss"], 0
                else:
                    progress["bad_evals"] += 1
                if progress["bad_evals"] >= es["patience"] and not last:
                    stop_reason = "early_stopping"
        history.append(row)
        window, last_logged, t_last = {}, step, time.time()
        if rank == 0:
            print(json.dumps(row), flush=True)
            console.publish({"step": row["step"], "total": stop_at, "loss": row.get("loss"),
                             "val_loss": row.get("val_loss"), "tokens_per_s": row.get("tokens_per_s")})
        if stop_reason:
            step += 1
            break
        if want_ckpt or (job.get("report_rows") and not last):
            progress.update(step=step + 1, history=history, batches_consumed=(step + 1) * accum)
            report(row, save_trainer_state(backend, progress, rank) if want_ckpt else None)
    else:
        step = stop_at
    t_end = time.time()
    train_s = t_end - t_start

    progress.update(step=step, history=history, batches_consumed=step * accum)
    steps_run = step - start
    mem = per_worker(peak_memory_bytes(device))
    flops_s = per_worker(peak_flops)
    achieved = fpt * tokens_per_step * steps_run / max(train_s, 1e-9) / world  # per worker
    final = {**(history[-1] if history else {"step": step}), "train_s": round(train_s, 2), "params": n_params,
             "trainable_params": n_trainable, "world_size": world, "final_report": True, "steps_run": steps_run,
             "start_step": start, "last_good_step": step, "restarts": progress.get("restarts", 0),
             "stop_reason": stop_reason or ("stop_at" if stop_at < tc["max_steps"] else "max_steps"),
             "flops_per_token": fpt, "total_flops": fpt * tokens_per_step * step,
             "matmul_flops_per_s": flops_s, "mfu": round(achieved / (sum(flops_s) / world), 4),
             "peak_memory_bytes": mem, "device_hours": round(world * train_s / 3600, 6),
             # where a run's time outside the steps goes (rank 0): from entering the loop to the first step,
             # split into model build, distribution and the matmul probe; then the end (state, export)
             "loop_entered_at": t_enter, "setup_s": round(t_start - t_enter, 3),
             "model_build_s": round(t_model - t_enter, 3), "distribute_s": round(t_backend - t_model, 3),
             "matmul_probe_s": round(probe_s, 3)}
    # the state rides along when the run may be continued: periodic checkpoints on, stopped early, or non-finite
    keep_state = bool(every) or stop_reason is not None or stop_at < tc["max_steps"]
    state_dir = save_trainer_state(backend, progress, rank) if keep_state else None
    t_state = time.time()
    trained = whole_model(backend, job, device)
    state = backend.full_state_dict() if trained is None else None
    out_dir = state_dir or tempfile.mkdtemp(prefix="raylm-export-")
    t_export = time.time()
    if rank == 0:
        if stop_reason != "nonfinite":  # no model export from a run that went non-finite: only its last good state
            final.update(export(job, state, tokenizer, out_dir, model=trained))
        final.update(export_model_s=round(time.time() - t_export, 3))
        with open(os.path.join(out_dir, "history.json"), "w") as f:
            json.dump(history, f)
    final.update(export_s=round(time.time() - t_end, 3), state_dict_s=round(t_export - t_state, 3),
                 final_report_at=time.time())
    report(final, out_dir if (rank == 0 or state_dir) else None)
    if rank != 0 and not state_dir:
        shutil.rmtree(out_dir, ignore_errors=True)
