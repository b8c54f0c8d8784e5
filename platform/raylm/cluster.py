"""Connect to a Ray cluster or start a local one, shipping the project's code to every worker."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import ray

PACKAGE_DIR = Path(__file__).resolve().parent  # platform/raylm
REPO_DIR = PACKAGE_DIR.parents[1]
# RAY_DATA_USE_DATASOURCE_V2=0: Ray 2.60's new Parquet path (ListFiles -> ReadFiles) cost 4-6 s per
# `read_parquet` execution here, the V1 reader 0.12 s (measured on a 1-file, 3k-row split); every stage reads
# Parquet, curate a dozen times. Set for the driver and for workers (Tune trials build their own DataContext).
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
              "RAY_DATA_USE_DATASOURCE_V2": "0"}
LOCAL_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_METRICS_ENABLED": "0"}


def code_runtime_env() -> dict:
    """py_modules that make `raylm`, `pipelines`, `serve` and `tuning` importable on workers of a remote cluster.

    On a cluster built from cluster.yaml the project is installed on every node anyway; shipping the driver's
    copy keeps workers on exactly the code the job was submitted with.
    """
    mods = [str(PACKAGE_DIR)]
    for name in ("pipelines", "serve", "tuning"):
        if (REPO_DIR / name / "__init__.py").is_file():
            mods.append(str(REPO_DIR / name))
    return {"py_modules": mods}


def local_num_cpus() -> int:
    """Logical CPUs for a local cluster. Serve's ingress and LLM replicas each need a CPU slot on top of the
    engine, so a 2-core machine gets more logical CPUs than cores (see FACTS: Ray Serve LLM on CPU)."""
    return int(os.environ.get("RAYLM_NUM_CPUS", max(8, os.cpu_count() or 1)))


def init_ray(address: str | None = None) -> None:
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    logging.getLogger("ray").setLevel(logging.WARNING)
    if address:
        # Inside `ray job submit` the job's runtime_env (working_dir) already applies; add the package modules.
        ray.init(address=address, runtime_env={**code_runtime_env(), "env_vars": WORKER_ENV}, log_to_driver=True)
    else:
        # A local one-node cluster has no node to drain and no Prometheus to scrape: Ray Train's preemption
        # watcher (an actor polling drain state) and its metrics callbacks (controller and every worker) only take
        # CPU from the training workers (benchmarks/train_throughput.py). A value the user set wins.
        for name in LOCAL_TRAIN_ENV:
            os.environ.setdefault(name, LOCAL_TRAIN_ENV[name])
        ray.init(num_cpus=local_num_cpus(), include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": WORKER_ENV})
    ctx = ray.data.DataContext.get_current()
    ctx.use_datasource_v2 = False  # see WORKER_ENV
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
