"""The `raylm` entry point: overrides anywhere after the stage, clear errors with exit code 2, nothing started."""
import subprocess
import sys


def raylm(*args, root):
    return subprocess.run([sys.executable, "-m", "raylm.cli", "--root", str(root), *args], capture_output=True,
                          text=True, timeout=120)


def test_overrides_after_config_are_applied(tmp_path):
    proc = raylm("run", "sft", "--config", "pipelines/configs/sft/tiny.yaml", "inputs.model=nope",
                 "inputs.dataset=nope", root=tmp_path)
    assert proc.returncode == 2 and "no run 'nope'" in proc.stderr  # the overrides reached input resolution


def test_bad_key_and_bad_flag(tmp_path):
    proc = raylm("run", "pretrain", "optim.lrr=1", root=tmp_path)
    assert proc.returncode == 2 and "invalid pretrain config" in proc.stderr and "did you mean 'optim.lr'" in proc.stderr
    proc = raylm("run", "pretrain", "--bogus", root=tmp_path)
    assert proc.returncode == 2 and "unrecognized arguments: --bogus" in proc.stderr
    assert not list(tmp_path.iterdir())  # no run directory was written


def test_runs_on_empty_store(tmp_path):
    proc = raylm("runs", root=tmp_path)
    assert proc.returncode == 0 and "no runs" in proc.stdout


def test_root_is_one_convention_for_every_command(tmp_path):
    """`--root DIR` or `root=DIR`, before or after the command's own arguments, for every command."""
    from raylm.runs import RunStore

    store = RunStore(str(tmp_path))
    with store.start_run("pretrain", {}) as run:
        run.log_history([{"step": s, "loss": 5.0 / s} for s in range(1, 40)])
    cli = [sys.executable, "-m", "raylm.cli"]
    for args in (["runs", f"root={tmp_path}"], [f"root={tmp_path}", "runs"], ["runs", "--root", str(tmp_path)],
                 ["show", f"root={tmp_path}", "latest/pretrain"], ["show", run.id, f"root={tmp_path}"],
                 ["diagnose", run.id, f"root={tmp_path}"], ["diagnose", "--root", str(tmp_path), run.id]):
        proc = subprocess.run(cli + args, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and (run.id in proc.stdout or "pretrain run" in proc.stdout), (args, proc.stderr)
    proc = subprocess.run(cli + ["runs", f"root={tmp_path}", "--root", "/elsewhere"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "once" in proc.stderr


def test_root_after_the_subcommand_and_latest_stage_in_show(tmp_path):
    from raylm.runs import RunStore

    store = RunStore(str(tmp_path))
    with store.start_run("dpo", {"k": 1}, []) as run:
        run.log_metrics({"x": 1})
    proc = subprocess.run([sys.executable, "-m", "raylm.cli", "runs", "--root", str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and run.id in proc.stdout
    proc = raylm("show", "latest/dpo", root=tmp_path)
    assert proc.returncode == 0 and f'"run_id": "{run.id}"' in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "raylm.cli", "show", "latest/sft", "--root", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no succeeded sft run" in proc.stderr


def test_serve_refuses_bad_models_before_starting_anything(tmp_path):
    proc = raylm("serve", "latest/sft", root=tmp_path)
    assert proc.returncode == 2 and "neither a local directory nor a run" in proc.stderr
    proc = raylm("serve", "--config", "serve/configs/tiny.yaml", "port=9001", root=tmp_path)  # overrides, no MODEL
    assert proc.returncode == 2 and "give MODEL" in proc.stderr
    proc = raylm("serve", str(tmp_path), "autoscaling.max_replica=3", root=tmp_path)
    assert proc.returncode == 2 and "autoscaling.max_replica" in proc.stderr
    proc = raylm("loadtest", "http://10.1.2.3:8000", "--requests", "1", root=tmp_path)
    assert proc.returncode == 2 and "non-loopback" in proc.stderr


def test_sweep_refuses_bad_spaces_and_missing_inputs_before_starting(tmp_path):
    proc = raylm("sweep", "tuning/configs/sft_lr.yaml", "metric=val_acc", root=tmp_path)
    assert proc.returncode == 2 and "metric='val_acc': stage sft does not log it" in proc.stderr
    proc = raylm("sweep", "tuning/configs/dpo_beta.yaml", "space.beta.grid=[]", root=tmp_path)
    assert proc.returncode == 2 and "space.beta: grid needs a non-empty list" in proc.stderr
    proc = raylm("sweep", "tuning/configs/sft_lr.yaml", root=tmp_path)  # an empty store: no latest/pretrain
    assert proc.returncode == 2 and "no succeeded pretrain run" in proc.stderr
    proc = raylm("sweep", "--resume", "nope", root=tmp_path)
    assert proc.returncode == 2 and "no run 'nope'" in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing was written
