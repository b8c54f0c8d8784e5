"""Driver side of a training stage: launch `TorchTrainer` and bring back metrics, curves and the checkpoint."""
from __future__ import annotations

import json

import fsspec
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from raylm.config import ResourcesSpec
from raylm.train.loop import train_loop_per_worker


def fit(job: dict, datasets: dict, resources: ResourcesSpec, storage_uri: str, name: str) -> dict:
    """Run the shared loop on `resources.num_workers` Ray Train workers.

    Returns {"metrics": final metrics, "history": per-log-step rows, "checkpoint": URI of the exported checkpoint
    (holding `model/` and, for LoRA, `adapter/`)}.
    """
    job = {**job, "strategy": resources.strategy, "has_val": "val" in datasets}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=job,
        scaling_config=ScalingConfig(num_workers=resources.num_workers, use_gpu=resources.use_gpu,
                                     resources_per_worker={"CPU": resources.cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=storage_uri,
                             failure_config=FailureConfig(max_failures=resources.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
        datasets=datasets,
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    ckpt = result.checkpoint
    fs, path = ckpt.filesystem, ckpt.path
    with fs.open_input_file(f"{path}/history.json") as f:
        history = json.loads(f.read())
    proto = "" if fs.type_name == "local" else f"{fs.type_name}://"
    uri = proto + path
    fsspec.core.url_to_fs(uri)  # fail early if the URI is not readable by fsspec
    return {"metrics": dict(result.metrics or {}), "history": history, "checkpoint": uri}
