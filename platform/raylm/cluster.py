"""Connect to a Ray cluster or start a local one, shipping the project's code to every worker."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import ray

from raylm import reaper

PACKAGE_DIR = Path(__file__).resolve().parent  # platform/raylm
REPO_DIR = PACKAGE_DIR.parents[1]
# RAY_DATA_USE_DATASOURCE_V2=0: Ray 2.60's new Parquet path (ListFiles -> ReadFiles) cost 4-6 s per
# `read_parquet` execution here, the V1 reader 0.12 s (measured on a 1-file, 3k-row split); every stage reads
# Parquet, curate a dozen times. Set for the driver and for workers (Tune trials build their own DataContext).
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
              "RAY_DATA_USE_DATASOURCE_V2": "0"}
LOCAL_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_METRICS_ENABLED": "0"}


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


def _free_loopback_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_ray(address: str | None = None, setup_hook: str | None = None) -> None:
    """Connect to `address` (or $RAY_ADDRESS), else start a local cluster. `setup_hook`: a `module.function` every
    worker of the job runs at start (`raylm serve` binds HAProxy's pages with one)."""
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
        for name in LOCAL_ENV:
            os.environ.setdefault(name, LOCAL_ENV[name])
        # everything the local cluster starts dies with this process, even when a supervisor SIGKILLs it
        reaper.start()
        # With the dashboard: Ray Train's PlacementGroupCleaner (an actor every fit starts) asks the State API
        # whether the controller lives, once a second. Without a dashboard that API is missing and it logged
        # "Failed to query Ray Train Controller actor state" at every check (124 times in one demo); with two
        # local clusters on a machine (tests beside a demo) its address lookup failed with "Found multiple active
        # Ray instances". So the local cluster has its dashboard on loopback, and workers are told its address.
        port = _free_loopback_port()
        env = {"env_vars": {**WORKER_ENV, "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"},
               **({"worker_process_setup_hook": setup_hook} if setup_hook else {})}
        ray.init(num_cpus=local_num_cpus(), include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
                 log_to_driver=True, runtime_env=env)
    ctx = ray.data.DataContext.get_current()
    ctx.use_datasource_v2 = False  # see WORKER_ENV
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
