"""Sweep configs: bad search spaces are refused before any trial starts, naming the key; LR scaling; resources."""
from __future__ import annotations

import math

import pytest

from raylm.config import ConfigError, load_config
from tuning import sweep
from tuning.space import flatten, scale_lr, unflatten

SFT = {"stage": "sft", "base": "pipelines/configs/sft/tiny.yaml", "metric": "val_loss", "mode": "min",
       "inputs": {"model": "latest/pretrain", "dataset": "latest/curate"},
       "space": {"optim": {"lr": {"loguniform": [1e-4, 1e-2]}}}}


def checked(data: dict):
    cfg = load_config(sweep.Config, data)
    recipe = sweep.stage_recipe(cfg.stage)
    return sweep.check(cfg, recipe, sweep.base_config(cfg, None))


def test_the_shipped_sweeps_pass_the_checks():
    for name in ("sft_lr", "dpo_beta", "rl_kl", "sft_pbt"):
        cfg, origin = sweep.load(f"tuning/configs/{name}.yaml", [], None, None)
        recipe = sweep.stage_recipe(cfg.stage)
        assert sweep.check(cfg, recipe, sweep.base_config(cfg, origin))


@pytest.mark.parametrize("space, metric, extra, expect", [
    ({"optim": {"lrr": {"loguniform": [1e-4, 1e-2]}}}, "val_loss", {}, r"space\.optim\.lrr.*unknown key 'optim\.lrr'"),
    ({"optim": {"lr": {"loguniform": [-1e-4, 1e-2]}}}, "val_loss", {}, r"space\.optim\.lr: .*must be positive"),
    ({"optim": {"lr": {"uniform": [-0.1, 1e-2]}}}, "val_loss", {}, r"space\.optim\.lr: a learning rate bound"),
    ({"train": {"batch_size": {"choice": []}}}, "val_loss", {}, r"space\.train\.batch_size: choice needs a non-empty"),
    ({"optim": {"lr": {"loguniform": [1e-2, 1e-4]}}}, "val_loss", {}, r"space\.optim\.lr: loguniform needs low < high"),
    ({"optim": {"lr": {"normal": [0, 1]}}}, "val_loss", {}, r"space\.optim: expected a distribution|unknown distri"),
    ({"train": {"batch_size": {"uniform": [8, 16.5]}}}, "val_loss", {}, r"space\.train\.batch_size=.*train\.batch_size"),
    ({"optim": {"lr": {"loguniform": [1e-4, 1e-2]}}}, "val_accuracy", {}, r"metric='val_accuracy': stage sft does not"),
    ({"optim": {"lr": {"grid": [1e-4, 1e-3]}}}, "val_loss", {"search": {"algorithm": "optuna"}},
     r"space\.optim\.lr: grid values need"),
    ({"optim": {"lr": {"grid": [1e-4, 1e-3]}}}, "val_loss", {"scheduler": {"kind": "pbt"}}, r"space\.optim\.lr: PBT"),
    ({}, "val_loss", {}, r"space: empty"),
])
def test_bad_search_spaces_are_rejected_naming_the_key(space, metric, extra, expect):
    with pytest.raises(ConfigError, match="(?s)" + expect):
        checked({**SFT, "space": space, "metric": metric, **extra})


def test_bad_stage_or_sweep_keys_are_rejected():
    with pytest.raises(ConfigError, match="stage='serve' cannot be swept"):
        checked({**SFT, "stage": "serve"})
    with pytest.raises(ConfigError, match="unknown key 'num_sample'"):
        load_config(sweep.Config, {**SFT, "num_sample": 3})
    with pytest.raises(ConfigError, match="scheduler.kind"):
        load_config(sweep.Config, {**SFT, "scheduler": {"kind": "hyperband"}})
    with pytest.raises(ConfigError, match="rl stage writes no resumable checkpoints"):
        checked({**SFT, "stage": "rl", "base": "pipelines/configs/rl/tiny.yaml", "metric": "heldout_reward",
                 "mode": "max", "scheduler": {"kind": "pbt"}, "space": {"kl": {"coef": {"uniform": [0, 0.04]}}}})


def test_flatten_and_lr_scaling():
    flat = flatten({"optim": {"lr": {"grid": [1, 2]}}, "beta": {"choice": [0.1]}})
    assert flat == {"optim.lr": {"grid": [1, 2]}, "beta": {"choice": [0.1]}}
    assert unflatten({"optim.lr": 1, "optim.warmup_steps": 2, "beta": 3}) == \
        {"optim": {"lr": 1, "warmup_steps": 2}, "beta": 3}
    p = {"optim.lr": 1e-3, "train.batch_size": 64}
    assert scale_lr(p, "linear", 16, "optim.lr", "train.batch_size", 0)["optim.lr"] == pytest.approx(4e-3)
    assert scale_lr(p, "sqrt", 16, "optim.lr", "train.batch_size", 0)["optim.lr"] == pytest.approx(2e-3)
    # a batch-size-only sweep scales the stage's own LR
    assert scale_lr({"train.batch_size": 4}, "linear", 16, "optim.lr", "train.batch_size", 2e-3)["optim.lr"] == \
        pytest.approx(5e-4)
    assert scale_lr(p, "none", 16, "optim.lr", "train.batch_size", 0) == p


def test_trial_resources_and_concurrency_fit_the_cluster():
    from pipelines import rl, sft

    s = load_config(sft.Config, {"resources": {"num_workers": 2, "cpus_per_worker": 1}})
    need = sweep.trial_resources("sft", s)
    assert need["CPU"] == pytest.approx(2 + sweep.TRIAL_CPU) and need["GPU"] == 0
    assert sweep.concurrency(need, {"CPU": 8.0}, None, 10) == 3
    assert sweep.concurrency(need, {"CPU": 8.0}, 2, 10) == 2
    assert sweep.concurrency(need, {"CPU": 8.0}, None, 1) == 1
    r = load_config(rl.Config, {"resources": {"num_workers": 1}, "rollout": {"replicas": 2}})
    assert sweep.trial_resources("rl", r)["CPU"] == pytest.approx(1 + 2 * 2 + sweep.TRIAL_CPU)
    with pytest.raises(ConfigError, match=r"a trial needs 16\.01 CPU but the cluster has 8"):
        sweep.concurrency({"CPU": 16.01, "GPU": 0}, {"CPU": 8.0}, None, 4)
    g = load_config(sft.Config, {"resources": {"num_workers": 4, "use_gpu": True}})
    with pytest.raises(ConfigError, match="needs 4 GPU but the cluster has 0"):
        sweep.concurrency(sweep.trial_resources("sft", g), {"CPU": 64.0}, None, 4)
    assert math.isfinite(sweep.count_trials(load_config(sweep.Config, {**SFT, "num_samples": 2, "space": {
        "beta": {"grid": [1, 2, 3]}}}), {"beta": {"grid": [1, 2, 3]}}))
