"""Ray Tune sweeps over real stage runs: ASHA stops bad SFT trials, a DPO beta sweep survives a failing trial,
an interrupted sweep resumes without redoing finished trials, and stopped trials leave no placement group behind."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from raylm.config import load_config
from raylm.runs import RunStore

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sweep_root(lifecycle, tmp_path_factory):
    """A run store holding the lifecycle's curate/tokenizer/pretrain/sft manifests (their artifacts stay where they
    are): sweep trials become `latest/sft` here, not in the store the other tests read."""
    root = tmp_path_factory.mktemp("sweeps")
    for stage in ("curate", "tokenizer", "pretrain", "sft"):
        rid = lifecycle["runs"][stage]
        (root / rid).mkdir()
        for name in ("manifest.json", "history.jsonl"):
            src = Path(lifecycle["store"].root) / rid / name
            if src.exists():
                shutil.copy(src, root / rid / name)
    return root


def sweep_config(name: str, root: Path, **changes):
    from tuning import sweep

    data = yaml.safe_load((REPO / "tuning/configs" / f"{name}.yaml").read_text())
    for key, value in changes.items():
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return load_config(sweep.Config, {**data, "root": str(root)})


def live_placement_groups() -> set[str]:
    import ray

    return {pg_id for pg_id, info in ray.util.placement_group_table().items() if info["state"] != "REMOVED"}


def test_asha_stops_bad_lr_trials_early_and_the_best_beats_the_worst(sweep_root):
    from tuning import sweep

    pgs_before = live_placement_groups()
    # good LRs first: with two trials side by side they reach ASHA's rungs before the bad ones
    cfg = sweep_config("sft_lr", sweep_root, **{
        "space": {"optim": {"lr": {"grid": [3e-3, 1e-3, 3e-6, 1e-6]}}, "train": {"batch_size": {"grid": [8]}}},
        "search.algorithm": "grid", "num_samples": 1, "overrides.train.max_steps": 40})
    sweep_id = sweep.run(cfg, REPO / "tuning/configs")
    store = RunStore(str(sweep_root))
    m = store.load(sweep_id)
    trials = m.metrics["trials"]
    assert len(trials) == 4 and m.status == "succeeded"
    stopped = [t for t in trials if t["stopped_early"]]
    assert stopped, trials  # ASHA ended at least one trial before max_steps
    assert all(t["step"] < 40 for t in stopped)
    metrics = [t["metric"] for t in trials]
    best, worst = m.metrics["best"], max(metrics)
    assert best["metric"] < worst - 0.3, trials  # a clear margin, in nats of validation loss
    assert best["effective"]["optim.lr"] in (pytest.approx(3e-3 * 0.5 ** 0.5), pytest.approx(1e-3 * 0.5 ** 0.5))
    # every trial is a normal run pointing at the sweep; a stopped one says so and keeps its curve
    for t in trials:
        run = store.load(t["run_id"])
        assert run.sweep == sweep_id and run.stage == "sft"
        assert run.status == ("stopped" if t["stopped_early"] else "succeeded")
        assert store.history(t["run_id"]), t
    # the best config runs as it is: same LR as the best trial's (after the square-root batch rule)
    from pipelines import sft

    best_cfg = load_config(sft.Config, m.output(name="best_config").uri)
    assert best_cfg.optim.lr == pytest.approx(best["effective"]["optim.lr"]) and best_cfg.train.batch_size == 8
    assert m.output(kind="model").meta["trial"] == best["run_id"]
    assert [r.stage for r in store.lineage(sweep_id)][-1] == "sweep" and "pretrain" in \
        [r.stage for r in store.lineage(sweep_id)]
    curves = store.history(sweep_id)
    assert {c["trial"] for c in curves} == {t["run_id"] for t in trials}
    # stopped trials' train workers gave their placement groups back (ray-project/ray#54305)
    deadline = time.time() + 60
    while live_placement_groups() - pgs_before and time.time() < deadline:
        time.sleep(1)
    assert not live_placement_groups() - pgs_before
    # the report shows the sweep: trial table, metric vs key, all curves
    from pipelines import report
    from raylm.stage import execute

    rid = execute(report, load_config(report.Config, {"root": str(sweep_root), "inputs": {"run": sweep_id}}))
    page = Path(store.load(rid).metrics["index"]).read_text()
    assert "Sweep (sft)" in page and stopped[0]["run_id"] in page and page.count("data:image/png") >= 1


def test_dpo_beta_sweep_survives_a_failing_trial_and_resumes_after_an_interrupt(sweep_root, tmp_path):
    """One sweep, run as a user would (`python -m tuning.sweep` in its own process), Ctrl-C'd after its first
    trial finished, then resumed: finished trials are kept, a trial that raises is retried and reported."""
    import ray

    from tuning import sweep

    store = RunStore(str(sweep_root))
    conf = tmp_path / "sweep.yaml"
    data = yaml.safe_load((REPO / "tuning/configs/dpo_beta.yaml").read_text())
    # a typo in a swept split name passes the config checks and fails inside the trial, when the stage runs
    data.update(base=str(REPO / "pipelines/configs/dpo/tiny.yaml"), root=str(sweep_root), max_concurrent_trials=1,
                trial_retries=1, space={"beta": {"grid": [0.1, 0.5]},
                                        "train_split": {"grid": ["tasks_train", "tasks_trian"]}})
    data["overrides"]["train"].update(max_steps=20, eval_every=10)
    conf.write_text(yaml.safe_dump(data))
    before = {m.run_id for m in store.list("sweep")}
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "PYTHONPATH": os.pathsep.join([str(REPO / "platform"), str(REPO)])}
    proc = subprocess.Popen([sys.executable, "-m", "tuning.sweep", str(conf)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    # interrupt once Tune has the first trial finished (its run's manifest says so a moment earlier, while the
    # trial is still reporting: interrupted then, Tune rightly runs it again on resume)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not any(" completed after " in x for x in lines):
        time.sleep(0.5)
    assert proc.poll() is None, "".join(lines)[-3000:]
    proc.send_signal(signal.SIGINT)  # Ray Tune saves the experiment and returns
    proc.wait(timeout=300)
    reader.join(timeout=10)
    out = "".join(lines)
    assert proc.returncode == 2 and "sweep interrupted" in out, out[-3000:]
    sweep_id = next(m.run_id for m in store.list("sweep") if m.run_id not in before)
    first = [r.run_id for r in store.list("dpo") if r.sweep == sweep_id and r.status == "succeeded"]
    assert len(first) == 1 and store.load(sweep_id).status == "failed"

    cfg, _ = sweep.load(None, [], sweep_id, str(sweep_root))
    assert sweep.run(cfg, resume=sweep_id) == sweep_id
    m = store.load(sweep_id)
    trials = m.metrics["trials"]
    assert m.status == "succeeded" and len(trials) == 4, trials
    done = [t for t in trials if t["status"] == "succeeded"]
    assert sorted(t["effective"]["beta"] for t in done) == [0.1, 0.5]
    assert first[0] in {t["run_id"] for t in done}  # the finished trial was kept, not run again
    assert len([r for r in store.list("dpo") if r.sweep == sweep_id and r.status == "succeeded"]) == 2
    assert m.metrics["best"]["run_id"] in {t["run_id"] for t in done}
    assert all(0.0 <= t["metric"] <= 1.0 for t in done)  # held-out preference accuracy
    failed = [t for t in trials if t["status"] == "failed"]
    assert len(failed) == 2 and m.metrics["trials_failed"] == 2
    assert all("train_split='tasks_trian' not found" in (t["error"] or "") for t in failed), failed
    assert all(t["failures"] == 2 for t in failed)  # retried once (trial_retries=1), then reported
    # the stage refused the missing split before starting, so the failed trials left no half-written run
    assert {r.run_id for r in store.list("dpo") if r.sweep == sweep_id} == {t["run_id"] for t in done}
