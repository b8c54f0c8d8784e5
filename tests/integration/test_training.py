"""Training depth on real Ray Train workers: every backend (DDP, FSDP2, DeepSpeed ZeRO-1/2/3) trains the tiny model
to the same loss; a stopped run resumes exactly; a killed worker is replaced and the run finishes without a gap;
a NaN loss stops the run with its last good state; bf16 + accumulation + activation checkpointing + early stopping;
what every run records (MFU, memory, FLOPs, device-hours)."""
import importlib
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from raylm.config import load_config
from raylm.runs import RunError, RunStore
from raylm.stage import execute

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
PRETRAIN = importlib.import_module("pipelines.pretrain")
# small and short: what costs is each Ray Train start-up (~15-30 s here), not these steps
BASE = {"train.max_steps": 16, "train.batch_size": 8, "train.seq_len": 64, "train.eval_every": 8,
        "train.log_every": 1, "optim.warmup_steps": 4, "resources.num_workers": 2}


@pytest.fixture(scope="module")
def store(lifecycle, tmp_path_factory):
    """A fresh run store holding the lifecycle's curate and tokenizer runs (manifests copied; their artifacts
    stay where they are), so these runs do not become `latest/pretrain` of the lifecycle's store."""
    root = tmp_path_factory.mktemp("train-runs")
    runs = lifecycle["runs"]
    for stage in ("curate", "tokenizer"):
        (root / runs[stage]).mkdir(parents=True)
        (root / runs[stage] / "manifest.json").write_text(lifecycle["store"].load(runs[stage]).to_json())
    return {"root": str(root), "store": RunStore(str(root)), "data": runs["curate"], "tok": runs["tokenizer"]}


def pretrain(store, **overrides):
    over = {"root": store["root"], "inputs.dataset": store["data"], "inputs.tokenizer": store["tok"],
            "use_packed": "false", **BASE, **overrides}
    cfg = load_config(PRETRAIN.Config, REPO / "pipelines/configs/pretrain/tiny.yaml",
                      [f"{k}={v}" for k, v in over.items()])
    return execute(PRETRAIN, cfg)


def losses(store, rid) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in store["store"].history(rid)}


@pytest.fixture(scope="module")
def backends(store):
    """The same 16 steps on 2 workers with each strategy (fsdp2 also writes a checkpoint at step 8; zero2 keeps its
    optimizer state in CPU memory through DeepSpeed's offload)."""
    out = {s: pretrain(store, **{"resources.strategy": s}) for s in ("ddp", "zero1", "zero3")}
    out["zero2"] = pretrain(store, **{"resources.strategy": "zero2", "resources.offload": "optimizer"})
    out["fsdp2"] = pretrain(store, **{"resources.strategy": "fsdp2", "train.checkpoint_every": 8})
    return out


def test_every_backend_trains_to_the_same_loss(store, backends):
    curves = {s: losses(store, rid) for s, rid in backends.items()}
    ref = curves["ddp"]
    assert ref[16] < ref[1] - 0.5, ref  # it learns
    for strategy, curve in curves.items():
        # same init, same data per rank, same AdamW: only reduction order differs between the backends
        assert curve[16] == pytest.approx(ref[16], abs=0.02), (strategy, curve[16], ref[16])
        assert curve[1] == pytest.approx(ref[1], abs=1e-3), strategy
        m = store["store"].load(backends[strategy])
        assert m.metrics["strategy"] == strategy and m.metrics["stop_reason"] == "max_steps"


def test_runs_record_efficiency_memory_and_flops(store, backends):
    x = store["store"].load(backends["zero3"]).metrics
    assert 0 < x["mfu"] < 1.5, x["mfu"]  # CPU: against a matmul measured on the same worker in the same run
    assert len(x["peak_memory_bytes"]) == 2 and min(x["peak_memory_bytes"]) > 100e6  # one figure per worker
    assert x["device_hours"] > 0 and x["total_flops"] == x["flops_per_token"] * x["tokens_seen"]
    hist = store["store"].history(backends["zero3"])
    assert all(r["grad_norm"] > 0 and r["grad_norm_max"] >= r["grad_norm"] - 1e-6 for r in hist)


def test_a_stopped_run_resumes_exactly(store, backends):
    stopped = pretrain(store, **{"resources.strategy": "fsdp2", "train.checkpoint_every": 8, "train.stop_at": 8})
    first = store["store"].load(stopped).metrics
    assert first["stop_reason"] == "stop_at" and first["steps_run"] == 8
    resumed = pretrain(store, **{"resources.strategy": "fsdp2", "train.checkpoint_every": 8,
                                 "resume_from": stopped})
    m = store["store"].load(resumed)
    assert m.metrics["resumed_from"]["run"] == stopped and m.metrics["resumed_from"]["step"] == 8
    assert m.metrics["start_step"] == 8 and m.metrics["steps_run"] == 8
    whole, cont = losses(store, backends["fsdp2"]), losses(store, resumed)
    assert sorted(cont) == list(range(1, 17))  # the old rows, then its own: the curve continues
    for step in range(1, 17):  # model, optimizer, LR position, data position and RNG all came back
        assert cont[step] == pytest.approx(whole[step], abs=1e-4), (step, cont[step], whole[step])


def train_worker_pids() -> list[int]:
    """PIDs of live Ray Train worker processes (Ray titles them `ray::RayTrainWorker...`)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                pids.append(int(proc.name))
        except OSError:  # gone meanwhile
            pass
    return sorted(pids)


def registered_checkpoints(run_dir: Path) -> int:
    """Checkpoints Ray Train has registered (all ranks uploaded; what a restart resumes from): its controller's
    snapshot file lists them. A checkpoint directory alone is not enough: a kill during the ranks' upload leaves
    one that was never registered, and the restarted group then starts from step 0."""
    import json

    for snap in run_dir.glob("train/*/checkpoint_manager_snapshot.json"):
        try:
            return len(json.loads(snap.read_text())["checkpoint_results"])
        except (OSError, ValueError, KeyError):  # being written
            return 0
    return 0


def test_a_killed_worker_is_replaced_and_the_run_finishes_without_a_gap(store):
    result: dict = {}

    def run():
        try:
            result["rid"] = pretrain(store, **{"resources.strategy": "ddp", "train.max_steps": 40,
                                               "train.checkpoint_every": 10, "resources.max_failures": 1})
        except Exception as exc:  # noqa: BLE001 - surfaced below
            result["error"] = exc

    before = set(Path(store["root"]).glob("pretrain-*"))
    t = threading.Thread(target=run)
    t.start()
    deadline, victim = time.time() + 300, None
    while time.time() < deadline and victim is None and t.is_alive():
        new = set(Path(store["root"]).glob("pretrain-*")) - before
        if new and registered_checkpoints(next(iter(new))):  # Ray Train has registered the first checkpoint
            pids = train_worker_pids()
            if len(pids) == 2:
                victim = pids[-1]
                break
        time.sleep(0.2)
    assert victim is not None, "no checkpoint written / no train worker found"
    os.kill(victim, signal.SIGKILL)  # a real process death, as an OOM kill or a lost node would be
    t.join(timeout=600)
    assert "error" not in result, result.get("error")
    m = store["store"].load(result["rid"])
    assert m.metrics["restarts"] == 1 and m.metrics["stop_reason"] == "max_steps"
    steps = [r["step"] for r in store["store"].history(result["rid"])]
    assert steps == list(range(1, 41))  # no gap, no reset, no step twice
    curve = losses(store, result["rid"])
    assert curve[40] < curve[1] - 0.5


def test_a_nan_loss_stops_the_run_with_its_last_good_state(store):
    before = {m.run_id for m in store["store"].list("pretrain")}
    # an absurd LR: Adam's first step moves every weight by ~1e30, and the second forward overflows to inf/NaN
    with pytest.raises(RunError, match=r"NaN/inf at step 2: .*last good state \(step 1"):
        pretrain(store, **{"optim.lr": 1e30, "optim.warmup_steps": 0, "optim.schedule": "constant",
                           "resources.strategy": "ddp"})
    (rid,) = {m.run_id for m in store["store"].list("pretrain")} - before
    assert store["store"].load(rid).status == "failed"
    saved = list(Path(store["root"]).glob(f"{rid}/train/*/checkpoint_*/progress.json"))
    assert len(saved) == 1 and '"step": 1' in saved[0].read_text()


def test_bf16_accumulation_checkpointing_and_early_stopping(store):
    rid = pretrain(store, **{"resources.strategy": "fsdp2", "train.precision": "bf16", "train.grad_accum": 2,
                             "train.activation_checkpointing": "true", "train.max_steps": 40,
                             "train.eval_every": 4, "train.early_stopping": "{patience: 2, min_delta: 0.5}"})
    m = store["store"].load(rid)
    x, hist = m.metrics, store["store"].history(rid)
    assert x["stop_reason"] == "early_stopping" and x["steps_run"] < 40  # val loss cannot fall 0.5 nats per eval
    assert x["tokens_per_step"] == 8 * 2 * 2 * 64  # batch x accumulation x workers x seq_len
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert m.output(kind="model")  # an early-stopped run still exports its model


def test_bad_training_configs_fail_before_any_worker_starts(store):
    from raylm.config import ConfigError

    before = len(store["store"].list())
    with pytest.raises(ConfigError, match="resources.strategy"):
        pretrain(store, **{"resources.strategy": "zero4"})
    with pytest.raises(ConfigError, match="model.overrides: .*attention heads"):
        pretrain(store, **{"model.overrides": "{hidden_size: 128, num_attention_heads: 3}"})
    with pytest.raises(ConfigError, match="resources.offload"):
        pretrain(store, **{"resources.strategy": "ddp", "resources.offload": "optimizer"})
    with pytest.raises(RunError, match="no resumable checkpoint"):
        pretrain(store, **{"resume_from": store["data"]})
    assert len(store["store"].list()) == before  # nothing started


def test_an_annealing_run_continues_a_model_and_runs_only_the_decay(store, backends):
    parent = store["store"].load(backends["ddp"])
    cfg = load_config(PRETRAIN.Config, REPO / "pipelines/configs/pretrain/anneal.yaml", [
        f"root={store['root']}", f"inputs.dataset={store['data']}", f"inputs.tokenizer={store['tok']}",
        f"inputs.model={parent.run_id}", "use_packed=false", "train.max_steps=10", "train.batch_size=8",
        "train.seq_len=64", "train.eval_every=5"])
    rid = execute(PRETRAIN, cfg)
    m = store["store"].load(rid)
    assert parent.run_id in [r.run_id for r in store["store"].lineage(rid)]  # in the lineage, by run id
    hist = store["store"].history(rid)
    lrs = [r["lr"] for r in hist]
    # decay only, 1 - sqrt shape from the parent's peak 1e-3 to 0 over 10 steps: step 1 is the first decay step
    # (1e-3 x (1 - sqrt(1/10))), the last one trains at 0
    assert lrs[0] == pytest.approx(6.8377e-4, rel=1e-4) and lrs == sorted(lrs, reverse=True) and lrs[-1] == 0
    # it continues the parent's weights: it starts near the parent's final loss, far below a fresh model's
    assert hist[0]["loss"] < losses(store, parent.run_id)[1] - 0.5
