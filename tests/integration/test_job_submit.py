"""Cluster use: `ray start --head` on 127.0.0.1, `ray job submit` a stage, check its run manifest, `ray stop`.

Runs before the in-process session cluster exists (conftest orders `own_cluster` tests first), because
`ray stop` ends every Ray process on the machine.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.own_cluster]
REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")
DASHBOARD = 8275
# `ray start` turns token authentication on (FACTS.md); CLI clients then need this mode to send the token.
# The job's `python` is the one on the head node's PATH: this environment's, as for a user with the venv active.
ENV = {**os.environ, "RAY_AUTH_MODE": "token",
       "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


@pytest.fixture(scope="module")
def head_node():  # one `ray start` for both jobs (each start/stop pair costs ~20 s)
    subprocess.run([RAY, "start", "--head", "--node-ip-address=127.0.0.1", "--port=6390", "--num-cpus=6",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={DASHBOARD}", "--include-dashboard=true",
                    "--disable-usage-stats"], check=True, env=ENV, capture_output=True, timeout=180)
    try:
        yield f"http://127.0.0.1:{DASHBOARD}"
    finally:
        subprocess.run([RAY, "stop", "--force"], env=ENV, capture_output=True, timeout=120)


def test_stage_submitted_as_a_ray_job_writes_its_manifest(head_node, tmp_path):
    root = tmp_path / "runs"
    runtime_env = {"excludes": [".venv", "runs", ".git", "**/__pycache__", "*.egg-info"]}
    proc = subprocess.run(
        [RAY, "job", "submit", "--address", head_node, "--working-dir", ".",
         "--runtime-env-json", json.dumps(runtime_env), "--",
         "raylm", "run", "curate", "--config", "pipelines/configs/curate/tiny.yaml", "--root", str(root),
         "sources=[pydoc_topics]", "tasks.enabled=false"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "succeeded" in out, out[-3000:]
    (run_dir,) = [p for p in root.iterdir() if (p / "manifest.json").exists()]
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["stage"] == "curate" and m["status"] == "succeeded"
    assert m["metrics"]["docs_kept"] > 100 and set(m["metrics"]["per_source"]) == {"pydoc_topics"}
    assert f"curate run {m['run_id']} succeeded" in out  # the job's own output came back through the CLI
    # a quiet console: the summary, not Ray Data's INFO lines, which are in the run's own log
    assert "streaming_executor" not in out and "Dataset dataset_" not in out, out[-3000:]
    assert "execution finished" in (run_dir / "logs" / "driver.log").read_text()


def test_rl_stage_submitted_as_a_ray_job_trains_on_serve_replicas(head_node, tmp_path):
    """The rl stage under `ray job submit`: its Serve rollout application, Ray Train learner and weight pushes all
    run inside the job on the head node. A hand-made 1-layer model and task set keep it to two short steps."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raylm import tasks
    from raylm.config import ModelSpec
    from raylm.models import build_model, train_tokenizer
    from raylm.runs import RunStore

    root = tmp_path / "runs"
    store = RunStore(root)
    rows = tasks.make_tasks(["Is nine even or odd? Repeat the word: window. " * 20], per_family=20)
    with store.start_run("sft", {"note": "hand-made tiny model"}) as model_run:
        tok = train_tokenizer([f"{t['prompt']} {t['answer']}" for t in rows] * 5, 400)
        model = build_model(ModelSpec(overrides={"num_hidden_layers": 1}), tok)  # head_dim 32: vLLM CPU supports it
        model.save_pretrained(root / model_run.id / "model")
        tok.save_pretrained(root / model_run.id / "model")
        model_run.add_artifact("model", "model", model_run.uri("model"))
    with store.start_run("curate", {"note": "hand-made task splits"}) as data_run:
        for split, part in (("tasks_train", rows[:40]), ("tasks_test", rows[40:60])):
            (root / data_run.id / "data" / split).mkdir(parents=True)
            pq.write_table(pa.Table.from_pylist(part), root / data_run.id / "data" / split / "part-0.parquet")
        data_run.add_artifact("dataset", "dataset", data_run.uri("data"))
    runtime_env = {"excludes": [".venv", "runs", ".git", "**/__pycache__", "*.egg-info"]}
    proc = subprocess.run(
        [RAY, "job", "submit", "--address", head_node, "--working-dir", ".",
         "--runtime-env-json", json.dumps(runtime_env), "--",
         "python", "-m", "pipelines.rl", "--config", "pipelines/configs/rl/tiny.yaml", f"root={root}",
         f"inputs.model={model_run.id}", f"inputs.dataset={data_run.id}", "max_steps=2", "eval_every=1",
         "prompts_per_step=4", "group_size=2", "max_heldout=8", "heldout_samples=2", "resources.num_workers=1"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "rl run" in out and "succeeded" in out, out[-3000:]
    (m,) = store.list("rl")
    assert m.status == "succeeded" and m.metrics["rollout_engine"] == "serve"
    assert m.metrics["weight_version"] == 2 and m.metrics["replica_versions"] == [2]
