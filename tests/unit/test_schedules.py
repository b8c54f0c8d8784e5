"""LR schedules: exact values at chosen steps (computed by hand), warmup ratio, the annealing `decay`, config errors."""
import pytest

from raylm.config import ConfigError, load_config
from raylm.train.schedules import lr_at, lr_multiplier, schedule_facts
from pipelines import pretrain


def opt(**kw):
    return {"lr": 1.0, "min_lr_ratio": 0.0, "warmup_steps": 0, "schedule": "cosine", **kw}


def lrs(total, o, steps):
    return [lr_at(s, total, o) for s in steps]


def test_constant_with_warmup():
    o = opt(lr=1e-3, warmup_steps=4, schedule="constant", min_lr_ratio=0.1)
    assert lrs(20, o, [0, 1, 3, 4, 19]) == pytest.approx([2.5e-4, 5e-4, 1e-3, 1e-3, 1e-3])


def test_linear():
    # no warmup, 10 steps: p = (s+1)/10, LR = 1 - p; the last step trains at the final LR
    assert lrs(10, opt(schedule="linear"), [0, 4, 9]) == pytest.approx([0.9, 0.5, 0.0])
    # lr 2, final 0.2, warmup 2, decay over the other 10 steps
    o = opt(lr=2.0, min_lr_ratio=0.1, warmup_steps=2, schedule="linear")
    assert lrs(12, o, [0, 1, 2, 6, 11, 20]) == pytest.approx([1.0, 2.0, 1.82, 1.1, 0.2, 0.2])


def test_cosine():
    # 4 steps: p = .25 .5 .75 1 -> (1 + cos(pi p)) / 2
    assert lrs(4, opt(), range(4)) == pytest.approx([0.8535533906, 0.5, 0.1464466094, 0.0])
    o = opt(lr=1e-3, min_lr_ratio=0.1, warmup_steps=10)
    assert lrs(110, o, [9, 59, 109]) == pytest.approx([1e-3, 5.5e-4, 1e-4])  # p = 0.5 at step 59


def test_step_every_n_and_milestones():
    o = opt(schedule="step", step_size=10, step_gamma=0.5)
    assert lrs(40, o, [0, 9, 10, 25, 39]) == pytest.approx([1.0, 1.0, 0.5, 0.25, 0.125])
    o = opt(schedule="step", step_milestones=[5, 8], step_gamma=0.1)
    assert lrs(12, o, [4, 5, 7, 8, 11]) == pytest.approx([1.0, 0.1, 0.1, 0.01, 0.01])
    # never below lr * min_lr_ratio; warmup still ramps first
    o = opt(schedule="step", step_milestones=[5, 8], step_gamma=0.1, min_lr_ratio=0.05, warmup_steps=2)
    assert lrs(12, o, [0, 1, 5, 8]) == pytest.approx([0.5, 1.0, 0.1, 0.05])


def test_wsd_shapes():
    # warmup 2, stable to step 7, linear decay over the last 4 steps (8..11) to 0
    o = opt(schedule="wsd", warmup_steps=2, decay_steps=4, decay_shape="linear")
    assert lrs(12, o, range(12)) == pytest.approx([0.5, 1, 1, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25, 0.0])
    # 1-sqrt (Hägele et al. 2024) to 0.1: 0.1 + 0.9 (1 - sqrt(p)), p = .25 .5 1
    o = opt(schedule="wsd", warmup_steps=2, decay_steps=4, decay_shape="sqrt", min_lr_ratio=0.1)
    assert lrs(12, o, [7, 8, 9, 11]) == pytest.approx([1.0, 0.55, 0.3636038969, 0.1])
    o = opt(schedule="wsd", warmup_steps=2, decay_steps=4, decay_shape="cosine", min_lr_ratio=0.1)
    assert lrs(12, o, [9]) == pytest.approx([0.55])
    # decay_ratio 0.25 of 12 steps = 3 steps (9..11): 1 - 1/3, 1 - 2/3, 0
    o = opt(schedule="wsd", decay_ratio=0.25)
    assert lrs(12, o, [8, 9, 10, 11]) == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])
    # a decay longer than what follows the warmup is cut to fit: 6 steps (4..9)
    o = opt(schedule="wsd", warmup_steps=4, decay_steps=8)
    assert lrs(10, o, [3, 4, 9]) == pytest.approx([1.0, 5 / 6, 0.0])


def test_warmup_ratio():
    # 0.07 x 100 = 7 warmup steps (not 8: float noise does not round up)
    o = opt(lr=0.7, schedule="constant", warmup_ratio=0.07)
    assert lrs(100, o, [0, 5, 6, 7]) == pytest.approx([0.1, 0.6, 0.7, 0.7])
    o = opt(schedule="linear", warmup_ratio=0.2)  # 2 warmup steps of 10, decay over 8
    assert lrs(10, o, [0, 1, 2, 9]) == pytest.approx([0.5, 1.0, 0.875, 0.0])


def test_annealing_decay_is_wsd_over_the_whole_run():
    o = opt(lr=1e-3, min_lr_ratio=0.1, schedule="decay", decay_shape="linear")
    assert lrs(4, o, range(4)) == pytest.approx([7.75e-4, 5.5e-4, 3.25e-4, 1e-4])
    for shape in ("linear", "cosine", "sqrt"):
        a = opt(lr=3e-4, min_lr_ratio=0.05, schedule="decay", decay_shape=shape)
        b = opt(lr=3e-4, min_lr_ratio=0.05, schedule="wsd", decay_steps=50, decay_shape=shape)
        assert lrs(50, a, range(50)) == pytest.approx(lrs(50, b, range(50)))


def test_lr_multiplier_is_lr_at_over_the_peak():
    for kind in ("cosine", "linear", "constant"):
        o = opt(lr=3e-3, min_lr_ratio=0.1, warmup_steps=5, schedule=kind)
        assert [lr_multiplier(s, 50, 5, kind, 0.1) for s in range(50)] == pytest.approx(
            [lr_at(s, 50, o) / 3e-3 for s in range(50)])


def test_schedule_facts_per_schedule():
    f = schedule_facts(12, opt(schedule="wsd", warmup_steps=2, decay_steps=4, min_lr_ratio=0.1, decay_shape="sqrt"))
    assert f == {"schedule": "wsd", "peak_lr": 1.0, "final_lr": pytest.approx(0.1), "warmup_steps": 2,
                 "warmup_ratio": 0.167, "decay_steps": 4, "decay_shape": "sqrt"}
    f = schedule_facts(100, opt(schedule="cosine", warmup_ratio=0.1, min_lr_ratio=0.1))
    assert (f["warmup_steps"], f["warmup_ratio"], f["decay_steps"], f["final_lr"]) == (10, 0.1, 90, pytest.approx(0.1))
    f = schedule_facts(40, opt(schedule="step", step_size=10, step_gamma=0.5))
    assert f["milestones"] == [10, 20, 30] and f["final_lr"] == pytest.approx(0.125) and "decay_steps" not in f
    f = schedule_facts(20, opt(schedule="constant", warmup_steps=4, min_lr_ratio=0.1))
    assert (f["final_lr"], f["decay_steps"]) == (1.0, 0)
    f = schedule_facts(30, opt(schedule="decay", min_lr_ratio=0.1))
    assert (f["warmup_steps"], f["decay_steps"], f["final_lr"]) == (0, 30, pytest.approx(0.1))


def load(*overrides):
    return load_config(pretrain.Config, None, list(overrides))


def test_valid_schedule_configs_load():
    assert load("optim.schedule=wsd", "optim.decay_ratio=0.2", "optim.decay_shape=sqrt").optim.decay_ratio == 0.2
    assert load("optim.schedule=step", "optim.step_milestones=[10, 20]").optim.step_milestones == [10, 20]
    assert load("optim.schedule=decay", "optim.warmup_steps=0").optim.schedule == "decay"
    assert load("optim.warmup_steps=0", "optim.warmup_ratio=0.05").optim.warmup_ratio == 0.05


@pytest.mark.parametrize("overrides, named", [
    (["optim.schedule=wsd", "optim.decay_ratio=1.5"], "optim.decay_ratio must be in (0, 1]"),
    (["optim.schedule=wsd"], "needs exactly one of optim.decay_steps and optim.decay_ratio"),
    (["optim.schedule=wsd", "optim.decay_steps=5", "optim.decay_ratio=0.2"], "optim.decay_steps"),
    (["optim.schedule=step"], "optim.step_size and optim.step_milestones"),
    (["optim.schedule=step", "optim.step_milestones=[20, 10]"], "optim.step_milestones must be increasing"),
    (["optim.schedule=step", "optim.step_size=5", "optim.step_gamma=2"], "optim.step_gamma"),
    (["optim.warmup_ratio=0.1"], "optim.warmup_ratio=0.1 and optim.warmup_steps=20 are both set"),  # stage default
    (["optim.warmup_steps=0", "optim.warmup_ratio=1.0"], "optim.warmup_ratio must be in [0, 1)"),
    (["optim.schedule=decay"], "set optim.warmup_steps=0"),  # the annealing run must not re-warm
    (["optim.decay_steps=5"], "only apply to schedule=wsd"),
    (["optim.step_size=5"], "only apply to schedule=step"),
    (["optim.min_lr_ratio=2"], "optim.min_lr_ratio"),
    (["optim.schedule=exponential"], "'optim.schedule'"),
])
def test_bad_schedule_configs_name_the_key(overrides, named):
    with pytest.raises(ConfigError) as err:
        load(*overrides)
    assert named in str(err.value)
