"""What a sweep trial adds to the training run it starts in its own process.

A Tune trial runs a whole stage (`raylm.stage.execute`), and the stage's `fit` builds the `TorchTrainer`; the trial
has no other way to reach it. So the trial sets `ACTIVE` before running the stage, and `fit` (and the RL stage)
read it: extra Ray Train callbacks (the one that forwards every logged row to Tune), how often to write a
resumable checkpoint (PBT exploits from them), and a checkpoint to resume from (a PBT-exploited or retried trial).
Outside a sweep `ACTIVE` is None and a training run reports only at its end, as before.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrialHooks:
    callbacks: list = field(default_factory=list)
    checkpoint_every: int = 0  # steps between resumable checkpoints (0: none)
    resume_from: Any = None  # a ray.train.Checkpoint holding `trainer_state.pt`
    data_cache: str | None = None  # where the sweep's trials share tokenized datasets (raylm.data.cache)


ACTIVE: TrialHooks | None = None


def job_flags() -> dict:
    """Entries a training job gets from the active trial (none outside a sweep)."""
    if ACTIVE is None:
        return {}
    return {"report_rows": True, "checkpoint_every": ACTIVE.checkpoint_every, "resume_from": ACTIVE.resume_from}


def run_config(name: str, storage_uri: str, max_failures: int):
    """The stages' Ray Train RunConfig, with the trial's callbacks; a checkpointing trial keeps a few checkpoints
    so that Tune can copy one before the next replaces it."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    keep = 3 if ACTIVE is not None and ACTIVE.checkpoint_every else 1
    return RunConfig(name=name, storage_path=storage_uri, failure_config=FailureConfig(max_failures=max_failures),
                     checkpoint_config=CheckpointConfig(num_to_keep=keep),
                     callbacks=list(ACTIVE.callbacks) if ACTIVE is not None else None)
