"""The resumable checkpoint that `resume_from`, Ray Train restarts and a sweep's PBT trials continue from: sharded
model and optimizer state (torch.distributed.checkpoint), RNG state, and the progress (step, history)."""
from __future__ import annotations

import random

import numpy as np
import ray.train
import torch

from raylm.train.backends import TorchBackend
from raylm.train.loop import load_trainer_state, save_trainer_state

OPTIM = {"lr": 1e-2, "betas": (0.9, 0.95), "weight_decay": 0.0}


def _backend(seed: int) -> TorchBackend:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    return TorchBackend(model, "ddp", OPTIM, accum=1)  # one process: no wrapper, plain AdamW


def _step(b: TorchBackend):
    loss = b.model(torch.randn(4, 8)).pow(2).mean()  # the batch comes from the RNG: restored state, same batch
    b.backward(loss, last_micro=True)
    b.grad_norm(1.0)
    b.step(1e-2)


def test_trainer_state_round_trip_continues_the_same_trajectory(tmp_path):
    a = _backend(0)
    for _ in range(3):
        _step(a)
    np.random.seed(5)
    random.seed(5)
    d = save_trainer_state(a, {"step": 3, "history": [{"step": 3, "loss": 1.0}]}, rank=0, directory=str(tmp_path))
    expect_np, expect_py = np.random.rand(), random.random()
    b = _backend(1)  # different init: everything must come from the checkpoint
    progress = load_trainer_state(b, ray.train.Checkpoint.from_directory(d), rank=0)
    assert progress == {"step": 3, "history": [{"step": 3, "loss": 1.0}]}
    assert (np.random.rand(), random.random()) == (expect_np, expect_py)  # numpy and python RNG restored too
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)
    load_trainer_state(a, ray.train.Checkpoint.from_directory(d), rank=0)  # both from the same RNG state
    _step(a)
    load_trainer_state(b, ray.train.Checkpoint.from_directory(d), rank=0)
    _step(b)  # same batch, same Adam moments: same update
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)
    fresh = _backend(1)
    _step(fresh)
    assert not all(torch.equal(p, q) for p, q in zip(fresh.model.parameters(), b.model.parameters()))


def test_a_checkpoint_without_trainer_state_starts_from_zero(tmp_path):
    (tmp_path / "history.json").write_text("[]")  # a finished run's export without train.checkpoint_every
    assert load_trainer_state(_backend(0), ray.train.Checkpoint.from_directory(str(tmp_path)), rank=0) is None
