"""Shared fixtures: one real local Ray cluster and one real lifecycle run for the integration tests."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


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
def ray_cluster():
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

    root = tmp_path_factory.mktemp("runs")
    cfg_path = REPO / "pipelines/configs/lifecycle/tiny.yaml"
    cfg = load_config(lc.Config, cfg_path, [f"root={root}", "serve.port=8011"])
    done = lc.run(cfg, cfg_path.parent)
    return {"runs": done, "store": RunStore(str(root))}
