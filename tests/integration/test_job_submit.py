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


@pytest.fixture
def head_node():
    subprocess.run([RAY, "start", "--head", "--node-ip-address=127.0.0.1", "--port=6390", "--num-cpus=4",
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
         "python", "-m", "pipelines.curate", "--config", "pipelines/configs/curate/tiny.yaml", f"root={root}",
         "sources=[pydoc_topics]", "tasks.enabled=false"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "succeeded" in out, out[-3000:]
    (run_dir,) = [p for p in root.iterdir() if (p / "manifest.json").exists()]
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["stage"] == "curate" and m["status"] == "succeeded"
    assert m["metrics"]["docs_kept"] > 100 and set(m["metrics"]["per_source"]) == {"pydoc_topics"}
    assert f"curate run {m['run_id']} succeeded" in out  # the job's own output came back through the CLI
