"""Loss-curve diagnosis: synthetic curves of each kind get their label and seed 003's advice; `raylm diagnose`."""
import math
import random
import subprocess
import sys

import pytest

from raylm.train.diagnose import ADVICE, diagnose

N = 40  # logged rows, one every 5 steps; validation every 5th row and on the last


def rows(train, val=None):
    out = []
    for i, loss in enumerate(train):
        r = {"step": 5 * i + 1, "loss": loss, "lr": 1e-3, "grad_norm": 1.0}
        if val is not None and (i % 5 == 0 or i == len(train) - 1):
            r["val_loss"] = val[i]
        out.append(r)
    return out


def noisy(f, seed=0, amp=0.02):
    rng = random.Random(seed)
    return [f(i) * (1 + rng.uniform(-amp, amp)) for i in range(N)]


# train falls and flattens (an exponential with time constant N/6), validation follows it closely
HEALTHY = noisy(lambda i: 2 + 3 * math.exp(-6 * i / N))


def label(train, val=None):
    return diagnose(rows(train, val))["label"]


def test_healthy():
    assert label(HEALTHY, [x * 1.05 for x in HEALTHY]) == "healthy"
    assert label(HEALTHY) == "healthy"
    assert diagnose(rows(HEALTHY))["advice"] == ADVICE["healthy"]


def test_underfitting_still_falling_steeply_at_the_end():
    train = noisy(lambda i: 2 + 3 * math.exp(-0.8 * i / N))
    d = diagnose(rows(train, [x * 1.02 for x in train]))
    assert d["label"] == "underfitting" and d["evidence"]["tail_improvement"] > 0.05
    assert "Raise the learning rate" in d["advice"][0]


def test_plateaued_stops_improving_early():
    train = noisy(lambda i: 4 + math.exp(-30 * i / N))
    d = diagnose(rows(train, [x * 1.02 for x in train]))
    assert d["label"] == "plateaued" and d["evidence"]["improvement_after_first_third"] < 0.03


def test_overfitting_val_rises_while_train_falls():
    train = noisy(lambda i: 0.5 + 3 * math.exp(-5 * i / N))
    val = [1.5 + 2 * math.exp(-8 * i / N) + 0.03 * max(0, i - 12) for i in range(N)]
    d = diagnose(rows(train, val))
    assert d["label"] == "overfitting"
    assert d["evidence"]["val_min_step"] == d["evidence"]["early_stop_step"] == 76  # row 15: the lowest val point
    assert any("Stop early" in a for a in d["advice"]) and "Lower the learning rate" in d["advice"][0]


def test_unstable_spike_and_nonfinite():
    spiky = list(HEALTHY)
    spiky[25] *= 2.2
    d = diagnose(rows(spiky))
    assert d["label"] == "unstable" and d["evidence"]["spikes"] == 1 and d["evidence"]["first_spike_step"] == 126
    assert d["advice"][0].startswith("Lower the learning rate")
    early = list(HEALTHY)
    early[6] *= 1.8  # spikes only in the first third: the warmup advice comes first
    d = diagnose(rows(early))
    assert d["label"] == "unstable" and d["evidence"]["spikes_only_early"] and "warmup" in d["advice"][0]
    for key in ("loss", "grad_norm"):
        r = rows(HEALTHY)
        r[30][key] = float("nan") if key == "loss" else float("inf")
        d = diagnose(r)
        ev = d["evidence"]
        assert d["label"] == "unstable" and (ev["nonfinite_step"], ev["nonfinite"]) == (151, [key])


def test_diverging_rising_loss():
    # falls, then climbs steadily back above where it started
    assert label([2 + 3 * math.exp(-6 * i / N) + 0.15 * max(0, i - 20) for i in range(N)]) == "diverging"
    # gives back more than half of its gain (below its start, still diverging)
    d = diagnose(rows([2 + 3 * math.exp(-6 * i / N) + 0.1 * max(0, i - 20) for i in range(N)]))
    assert d["label"] == "diverging" and d["evidence"]["final_loss"] < d["evidence"]["initial_loss"]
    assert d["evidence"]["rebound"] > 0.5


def test_noise_on_a_near_zero_loss_is_not_a_spike():
    train = noisy(lambda i: 0.02 + 3 * math.exp(-6 * i / N), amp=0.0)
    train[30:] = [0.03, 0.06, 0.03, 0.05, 0.03, 0.06, 0.03, 0.05, 0.03, 0.04]  # 2x jumps, but under 0.1 nats
    assert diagnose(rows(train))["evidence"].get("spikes") is None


def test_too_short_history():
    with pytest.raises(ValueError, match="at least 3"):
        diagnose([{"step": 1, "loss": 2.0}, {"step": 2, "val_loss": 2.0}])


def raylm(*args, root):
    return subprocess.run([sys.executable, "-m", "raylm.cli", "--root", str(root), *args], capture_output=True,
                          text=True, timeout=120)


def test_cli_diagnose(tmp_path):
    from raylm.runs import RunStore

    store = RunStore(str(tmp_path))
    with store.start_run("pretrain", {}, []) as run:
        spiky = list(HEALTHY)
        spiky[25] *= 2.2
        run.log_history(rows(spiky))
    proc = raylm("diagnose", "latest/pretrain", root=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"pretrain run {run.id}: unstable" in proc.stdout and "spikes: 1" in proc.stdout
    assert "- Lower the learning rate (optim.lr) x0.5 or x0.3" in proc.stdout
    proc = raylm("diagnose", run.id, "--json", root=tmp_path)
    assert proc.returncode == 0 and '"label": "unstable"' in proc.stdout
    with store.start_run("sft", {}, []) as bare:
        pass
    proc = raylm("diagnose", bare.id, root=tmp_path)
    assert proc.returncode == 2 and "has no loss history" in proc.stderr
    proc = raylm("diagnose", "latest/dpo", root=tmp_path)
    assert proc.returncode == 2 and "no succeeded dpo run" in proc.stderr
