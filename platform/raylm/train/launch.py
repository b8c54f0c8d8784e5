"""Driver side of a training stage: launch `TorchTrainer` and bring back metrics, curves and the checkpoint."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager

import fsspec
from ray.train import DataConfig, ScalingConfig
from ray.train.torch import TorchTrainer

import ray

from raylm.config import ResourcesSpec
from raylm.harness import continuous
from raylm.runs import RunError
from raylm.train import hooks
from raylm.train.loop import train_loop_per_worker


class FixedShards(DataConfig):
    """Each worker gets a fixed, equal share of a materialized dataset (`Dataset.split`), so one config and seed
    give one run. Ray Train's default `streaming_split` hands blocks to whichever worker asks first: right for
    streaming data at scale, but then two runs of the same config train on different batches (seen: the demo's
    pre-training loss at step 1 and its end differed between runs, and SFT parity EM ranged 0.68-1.0)."""

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        out = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            for rank, shard in enumerate(ds.split(world_size, equal=True)):
                out[rank][name] = shard.iterator()
        return out


# Ray Train's controller learns what its workers did only when it polls them, every
# RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (Ray's default 2 s): a run's last report and its end are seen up to a poll each
# later, ~3.5 s of every run's end on the benchmark (`benchmarks/train_throughput.py`). A poll is a small actor call
# per worker; a slow one only counts as missed (a worker is declared dead after 10 minutes of them). A value the
# user set wins.
POLL_INTERVAL_S = "0.5"


@contextmanager
def _env_default(name: str, value: str):
    """`name=value` in this process's environment while the block runs, unless it is set already."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


def fit(job: dict, datasets: dict, resources: ResourcesSpec, storage_uri: str, name: str,
        resume_from=None) -> dict:
    """Run the shared loop on `resources.num_workers` Ray Train workers.

    Returns {"metrics": final metrics, "history": per-log-step rows, "checkpoint": URI of the exported checkpoint
    (holding `model/` and, for LoRA, `adapter/`)}. `resume_from`: a checkpoint from `resume_point`.
    """
    job = {**job, "strategy": resources.strategy, "offload": resources.offload, "has_val": "val" in datasets,
           **hooks.job_flags()}
    if resume_from is not None and job.get("resume_from") is None:
        job["resume_from"] = resume_from
    evaluator = None
    if continuous.due(job["train"].get("task_eval"), 0, True):  # scores snapshots on lm-eval tasks as it trains
        actor_name, evaluator = continuous.start(job["train"]["task_eval"])
        job["task_eval"] = {**job["train"]["task_eval"], "actor": actor_name}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=job,
        scaling_config=ScalingConfig(num_workers=resources.num_workers, use_gpu=resources.use_gpu,
                                     resources_per_worker={"CPU": resources.cpus_per_worker}),
        run_config=hooks.run_config(name, storage_uri, resources.max_failures),
        datasets=datasets,
        dataset_config=FixedShards(),
    )
    try:
        with _env_default("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", POLL_INTERVAL_S):  # read when fit starts the controller
            result = trainer.fit()
        out = read_result(result)
    except BaseException:
        if evaluator is not None:
            ray.kill(evaluator)
        raise
    if evaluator is not None:
        out["task_curve"] = continuous.finish(evaluator)
    return out


def read_result(result) -> dict:
    """Metrics, the history rows and the checkpoint URI of a finished Ray Train run (rank 0 reported them)."""
    if result.error:
        raise result.error
    ckpt = result.checkpoint
    fs, path = ckpt.filesystem, ckpt.path
    with fs.open_input_file(f"{path}/history.json") as f:
        history = json.loads(f.read())
    proto = "" if fs.type_name == "local" else f"{fs.type_name}://"
    uri = proto + path
    fsspec.core.url_to_fs(uri)  # fail early if the URI is not readable by fsspec
    metrics = dict(result.metrics or {})
    if metrics.get("stop_reason") == "nonfinite":
        raise RunError(f"the loss or gradient norm became NaN/inf at step {metrics['last_good_step'] + 1}: training "
                       f"stopped before applying that step. The last good state (step {metrics['last_good_step']}, "
                       f"resumable with "
                       f"resume_from) is {uri}. Lower optim.lr, raise warmup, or check the data of that step.")
    return {"metrics": metrics, "history": history, "checkpoint": uri}


FACTS = ("strategy", "precision", "grad_accum", "activation_checkpointing", "stop_reason", "steps_run",
         "start_step", "restarts", "mfu", "matmul_flops_per_s", "peak_memory_bytes", "device_hours",
         "flops_per_token", "total_flops", "tokens_seen", "train_s")


def train_facts(out: dict, cfg) -> dict:
    """What every training run records (seed 000): how it ran, where it stopped, efficiency and cost."""
    x = out["metrics"]
    facts = {k: x.get(k) for k in FACTS if k in x}
    facts.update(strategy=cfg.resources.strategy, precision=cfg.train.precision, grad_accum=cfg.train.grad_accum,
                 activation_checkpointing=cfg.train.activation_checkpointing,
                 tokens_per_step=cfg.train.batch_size * cfg.train.grad_accum * cfg.resources.num_workers
                 * cfg.train.seq_len)
    if out.get("task_curve"):
        facts["task_curve"] = out["task_curve"]
    return facts


def resume_point(run, ref: str | None):
    """The checkpoint a training stage's `resume_from=RUN_ID` continues from (None without one); recorded in the
    run's metrics."""
    if not ref:
        return None
    ckpt, step, rid = resume_checkpoint(run.store, ref)
    run.log_metrics({"resumed_from": {"run": rid, "step": step, "checkpoint": ckpt.path}})
    return ckpt


def resume_checkpoint(store, ref: str):
    """The newest resumable checkpoint (one with `progress.json`) of run `ref` (a run id or `latest/STAGE`), as a
    `ray.train.Checkpoint`, and its step. Ray Train keeps a run's checkpoints under `<run>/train/<run id>/`."""
    import fsspec as _fsspec
    from ray.train import Checkpoint

    rid = store.resolve_id(ref)
    fs, base = _fsspec.core.url_to_fs(store.uri(rid, "train", rid))
    found = sorted(p for p in (fs.glob(f"{base}/checkpoint_*/progress.json") if fs.exists(base) else []))
    if not found:
        raise RunError(f"resume_from={ref}: run {rid} has no resumable checkpoint (train with "
                       f"train.checkpoint_every > 0, or a run stopped by train.stop_at / early stopping)")
    path = found[-1].rsplit("/", 1)[0]  # checkpoint_<timestamp>: the newest sorts last
    step = json.loads(fs.cat(f"{path}/progress.json"))["step"]
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    uri = path if proto in ("file", "local") else f"{proto}://{path}"
    return Checkpoint(uri) if proto in ("file", "local") else Checkpoint(path, filesystem=_arrow_fs(uri)), step, rid


def _arrow_fs(uri: str):
    import pyarrow.fs

    fs, _ = pyarrow.fs.FileSystem.from_uri(uri)
    return fs
