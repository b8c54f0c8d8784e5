"""Cluster use: `ray start --head` on 127.0.0.1, submit a stage with the Ray job SDK, check its manifest, stop.

Runs before the in-process session cluster exists (conftest orders `own_cluster` tests first), because
`ray stop` ends every Ray process on the machine.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.own_cluster]
REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")
DASHBOARD = 8275


@pytest.fixture
def head_node():
    # Token auth is on by default for `ray start` (FACTS.md): the SDK reads ~/.ray/auth_token with this mode.
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    subprocess.run([RAY, "start", "--head", "--node-ip-address=127.0.0.1", "--port=6390", "--num-cpus=4",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={DASHBOARD}", "--include-dashboard=true",
                    "--disable-usage-stats"], check=True, env=env, capture_output=True, timeout=180)
    os.environ["RAY_AUTH_MODE"] = "token"
    try:
        yield f"http://127.0.0.1:{DASHBOARD}"
    finally:
        os.environ.pop("RAY_AUTH_MODE", None)
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_stage_submitted_as_a_ray_job_writes_its_manifest(head_node, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(head_node)
    root = tmp_path / "runs"
    entry = (f"python -m pipelines.curate --config pipelines/configs/curate/tiny.yaml root={root} "
             "'sources=[pydoc_topics]' tasks.enabled=false")
    job = client.submit_job(entrypoint=entry, runtime_env={
        "working_dir": str(REPO), "excludes": [".venv", "runs", ".git", "**/__pycache__", "*.egg-info"]})
    deadline = time.time() + 600
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.time() < deadline, "job did not finish in 10 minutes"
        time.sleep(2)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    (run_dir,) = [p for p in root.iterdir() if (p / "manifest.json").exists()]
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["stage"] == "curate" and m["status"] == "succeeded"
    assert m["metrics"]["docs_kept"] > 100 and set(m["metrics"]["per_source"]) == {"pydoc_topics"}
    assert f"curate run {m['run_id']} succeeded" in logs
