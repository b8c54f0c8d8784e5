"""Give back the placement groups of the train workers of trials Tune stopped (ray-project/ray#54305).

A trial's Ray Train controller creates its worker group's placement group, and a placement group belongs to the
job, not to the actor that made it: when Tune stops a trial (ASHA, the median rule, a PBT exploit) the controller
dies and the group's CPUs stay reserved until the sweep's driver exits, so a long sweep on a small cluster starves.
Ray 2.60's `PlacementGroupCleaner` watches the controller through the State API, which needs the dashboard; a
local cluster started without it leaked one group per stopped trial here (a test reproduces it). So each trial's
controller records its group in a ledger actor the sweep owns, and a Tune callback removes a trial's groups when
the trial ends, fails or is restarted. The callback uses Ray Train's internal `WorkerGroupCallback` hook (the
public `UserCallback` does not see the worker group); `RunConfig.callbacks` passes such callbacks through.
"""
from __future__ import annotations

import ray
from ray.train.v2._internal.execution.callback import WorkerGroupCallback
from ray.tune import Callback
from ray.util.placement_group import remove_placement_group

NAMESPACE = "raylm"


@ray.remote(num_cpus=0)
class Ledger:
    def __init__(self):
        self.groups: dict[str, list] = {}

    def add(self, trial_id: str, pg) -> None:
        self.groups.setdefault(trial_id, []).append(pg)

    def take(self, trial_id: str | None = None) -> list:
        if trial_id is None:
            out = [pg for pgs in self.groups.values() for pg in pgs]
            self.groups.clear()
            return out
        return self.groups.pop(trial_id, [])


class RecordWorkerGroup(WorkerGroupCallback):
    """Runs in a trial's Train controller: each worker group's placement group goes to the sweep's ledger."""

    def __init__(self, ledger_name: str, trial_id: str):
        self.ledger_name, self.trial_id = ledger_name, trial_id

    def after_worker_group_start(self, worker_group):
        pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
        ledger = ray.get_actor(self.ledger_name, namespace=NAMESPACE)
        ray.get(ledger.add.remote(self.trial_id, pg))


def remove_groups(groups: list) -> int:
    """Remove those still alive; returns how many were."""
    table = ray.util.placement_group_table()
    removed = 0
    for pg in groups:
        if table.get(pg.id.hex(), {}).get("state") not in (None, "REMOVED"):
            remove_placement_group(pg)
            removed += 1
    return removed


class ReleaseStoppedTrials(Callback):
    """In the sweep's driver: a trial that ends, fails or starts again gives back its earlier worker groups."""

    def __init__(self, ledger_name: str):
        self.ledger_name, self.removed = ledger_name, 0  # by name: Tune pickles callbacks with the experiment

    def _release(self, trial) -> None:
        ledger = ray.get_actor(self.ledger_name, namespace=NAMESPACE)
        self.removed += remove_groups(ray.get(ledger.take.remote(trial.trial_id)))

    def on_trial_start(self, iteration, trials, trial, **info):
        self._release(trial)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._release(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._release(trial)
