"""One sweep trial: a whole stage run (Ray Train workers, or the RL stage's Serve replicas too) inside a Tune trial.

Ray's pattern for Train V2 under Tune is a trial function that builds the `TorchTrainer` itself; here that
function is the stage (`raylm.stage.execute`), run in a thread of the trial's process. A Ray Train callback puts
each logged row (and, under PBT, its resumable checkpoint) on a queue; the trial's main thread hands them to
`tune.report`, so schedulers see every log step and PBT has checkpoints to exploit. (Ray's own
`TuneReportCallback` forwards metrics only, so PBT would find no checkpoint.) When Tune stops the trial, its
process ends; the Train controller and its workers' placement group are owned by it and go with it.
"""
from __future__ import annotations

import importlib
import numbers
import queue
import threading

from ray import tune
from ray.train.v2.api.callback import UserCallback
from ray.util.queue import Empty, Queue

from raylm.config import deep_merge, load_config
from raylm.runs import RunStore, new_run_id
from raylm.train import hooks
from tuning.cleanup import RecordWorkerGroup
from tuning.space import scale_lr, unflatten


class ForwardRows(UserCallback):
    """Runs in the Train controller: rank 0's row (and checkpoint) of each `ray.train.report` to the trial."""

    def __init__(self, q: Queue):
        self.q = q

    def after_report(self, run_context, metrics, checkpoint):
        # The run's final report is not forwarded: a scheduler seeing the last step (ASHA at max_t) stops the
        # trial at once, before the stage has recorded its outputs. The trial reports it after the stage ends.
        if not metrics[0].get("final_report"):
            self.q.put({"metrics": metrics[0], "checkpoint": checkpoint})  # blocks while the trial is behind


def trial_config(params: dict, setup: dict) -> tuple[dict, dict]:
    """(stage config dict, the effective swept values after the LR rule) for this trial's sampled `params`."""
    ls = setup["lr_scaling"]
    effective = scale_lr(params, ls["rule"], ls["base_batch_size"], ls["lr_key"], ls["batch_key"], setup["base_lr"])
    return deep_merge(setup["base"], unflatten(effective)), effective


def run_trial(params: dict, setup: dict) -> None:
    """The Tune trainable (a function): `setup` is fixed for the sweep, `params` sampled for this trial."""
    from raylm.stage import execute

    recipe = importlib.import_module(f"pipelines.{setup['stage']}")
    cfg_dict, effective = trial_config(params, setup)
    cfg = load_config(recipe.Config, {**cfg_dict, "root": setup["root"], "name": f"{setup['sweep_id']} trial"})
    run_id = new_run_id(setup["stage"])
    q = Queue(maxsize=1, actor_options={"num_cpus": 0})
    ledger = RecordWorkerGroup(setup["ledger"], tune.get_context().get_trial_id())
    hooks.ACTIVE = hooks.TrialHooks([ForwardRows(q), ledger], setup["checkpoint_every"], tune.get_checkpoint(),
                                    data_cache=setup["data_cache"])
    outcome: dict = {}

    def stage():
        try:
            execute(recipe, cfg, run_id=run_id, sweep=setup["sweep_id"])
        except BaseException as exc:  # noqa: BLE001 - re-raised in the trial's main thread
            outcome["error"] = exc

    tags = {"run_id": run_id, **{f"effective/{k}": v for k, v in effective.items()}}
    worker = threading.Thread(target=stage, name="stage", daemon=True)
    worker.start()
    metric, last = setup["metric"], None
    while worker.is_alive() or not _empty(q):
        try:
            item = q.get(timeout=0.5)
        except (Empty, queue.Empty):
            continue
        row = {k: v for k, v in item["metrics"].items() if isinstance(v, numbers.Number)}
        # Rows between evaluations lack a validation metric, and schedulers need it in every result: they are
        # skipped, except one carrying a PBT checkpoint, which gets the last evaluated value.
        if metric not in row and item["checkpoint"] is not None and last is not None:
            row[metric] = last
        if metric in row:
            last = row[metric]
            tune.report({**row, **tags}, checkpoint=item["checkpoint"])
    worker.join()
    if "error" in outcome:
        raise outcome["error"]
    final = final_row(RunStore(setup["root"]), run_id, metric)
    if final is None:
        raise RuntimeError(f"trial run {run_id} finished without logging {metric!r}")
    tune.report({**final, **tags})
    hooks.ACTIVE = None


def _empty(q: Queue) -> bool:
    try:
        return q.empty()
    except Exception:  # noqa: BLE001 - the queue actor is gone with a dying trial
        return True


def final_row(store: RunStore, run_id: str, metric: str) -> dict | None:
    """The run's last history row that has `metric` (validation and held-out metrics come every eval_every steps)."""
    rows = [r for r in store.history(run_id) if metric in r]
    if not rows:
        return None
    return {k: v for k, v in rows[-1].items() if isinstance(v, numbers.Number)}

