"""The resumable checkpoint a sweep's PBT trials (and Ray Train restarts) continue from: weights, optimizer, step."""
from __future__ import annotations

import torch

from raylm.train.loop import load_trainer_state, save_trainer_state


def _model_and_opt(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _step(model, opt):
    loss = model(torch.randn(4, 8)).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()


def test_trainer_state_round_trip_continues_the_same_trajectory():
    model, opt = _model_and_opt(0)
    for _ in range(3):
        _step(model, opt)
    ckpt = save_trainer_state(model, opt, step=3, rank=0)
    other, other_opt = _model_and_opt(1)  # different init: everything must come from the checkpoint
    assert load_trainer_state(other, other_opt, ckpt) == 3
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)
    torch.manual_seed(7)
    _step(model, opt)
    torch.manual_seed(7)
    _step(other, other_opt)  # same batch, same Adam moments: same update
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.allclose(a, b, atol=1e-7)
    assert save_trainer_state(model, opt, step=4, rank=1) is None  # only rank 0 writes


def test_a_checkpoint_without_trainer_state_starts_from_zero(tmp_path):
    import ray.train

    model, opt = _model_and_opt(0)
    (tmp_path / "history.json").write_text("[]")  # a finished run's export has no trainer_state.pt
    assert load_trainer_state(model, opt, ray.train.Checkpoint.from_directory(str(tmp_path))) == 0
