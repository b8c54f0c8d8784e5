"""Loss-curve diagnosis: label a run's train/validation curves and give seed 003's advice for that label.

`diagnose(history)` reads the rows a training run logs (`step`, `loss`, optionally `val_loss`, `lr`,
`grad_norm`). Train losses L[0..n) in step order are compared through medians of w = max(3, n // 10) points, so
one noisy point moves nothing: `initial` = median of the first w, `final` = median of the last w, L(f) = median of
the w points around fraction f of the run, `best` = the lowest rolling median. The rules, first match wins:

1. **unstable**: a NaN/inf loss, val_loss or grad_norm.
2. **diverging**: final > initial, or the curve gave back more than half of what it had gained
   (final - best > 0.5 (initial - best)) with the best before the last w points.
3. **unstable**: a spike, a loss above 1.5x the median of the 5 points before it and at least 0.1 above it
   (the absolute floor keeps noise on a near-zero loss from counting).
4. **overfitting** (>= 3 validation points): validation loss ended more than 5% above its minimum, with the
   minimum before the last validation point, while train loss fell after that minimum.
5. **underfitting**: still falling steeply at the end, (L(2/3) - final) / L(2/3) > 5%, and the validation loss
   (if any) still falling too: the run stopped before converging (both losses still high).
6. **plateaued**: less than 3% relative improvement over the last two thirds, (L(1/3) - final) / L(1/3) < 3%:
   learning stopped early.
7. **healthy**: otherwise (falling, then flattening; validation following train).

Returns {"label", "evidence": {the numbers the rules used}, "advice": [strings]}. The advice translates seed
003's loss-curve table ("分析 Loss 曲线": which way to move LR, batch size, warmup, data / regularisation).
"""
from __future__ import annotations

import math
from statistics import median

SPIKE_K, SPIKE_MIN, SPIKE_WINDOW = 1.5, 0.1, 5
REBOUND = 0.5
OVERFIT_RISE = 0.05
UNDERFIT_TAIL = 0.05
PLATEAU_REL = 0.03

LABELS = ("healthy", "underfitting", "overfitting", "unstable", "diverging", "plateaued")

ADVICE = {
    "healthy": [
        "The loss falls and flattens, validation (when logged) following it with a small, stable gap: keep these "
        "settings.",
    ],
    "underfitting": [
        "Raise the learning rate (optim.lr, e.g. 1e-5 -> 3e-5 -> 1e-4), or lengthen the warmup and then raise the "
        "peak LR.",
        "Reduce the batch size (train.batch_size, e.g. 1024 -> 256): more gradient noise helps leave flat regions.",
        "Weaken regularisation if it is strong (optim.weight_decay, dropout): it holds learning back.",
        "The loss is still falling at the end: more steps will help. Do not scale the model up first.",
    ],
    "overfitting": [
        "Lower the learning rate (optim.lr), especially when fine-tuning: less fitting of single examples.",
        "Increase the batch size (train.batch_size): less gradient noise, closer to the whole distribution.",
        "Stop early at the validation minimum (train.early_stopping, or keep that step's checkpoint).",
        "More or more varied data, or stronger regularisation (optim.weight_decay, dropout); note that a tiny "
        "batch with a small LR memorises too.",
    ],
    "unstable": [
        "Lower the learning rate (optim.lr) x0.5 or x0.3: train and validation jumping together means the LR is "
        "too large.",
        "Lengthen the warmup (optim.warmup_steps, e.g. 500 -> 2000): spikes early that settle later mean the "
        "warmup is too short.",
        "Increase the batch size or accumulate gradients: validation noisier than train means the batch is too small.",
    ],
    "diverging": [
        "Lower the learning rate (optim.lr) x0.5 or x0.3: a large step on a noisy gradient makes the loss explode.",
        "Lengthen the warmup (optim.warmup_steps).",
        "Increase the batch size or accumulate gradients, so the gradient direction is less noisy.",
    ],
    "plateaued": [
        "The loss stopped improving early: training longer at these settings will not help.",
        "Slow but stable: raise the learning rate (optim.lr) or reduce the batch size (train.batch_size).",
        "If train fell fast but validation does not move, the model lacks capacity: a larger model.",
    ],
}


def _r(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(f"{x:.4g}")


def diagnose(history: list[dict]) -> dict:
    """Label a loss history (rules in the module docstring). Raises ValueError with fewer than 3 train losses."""
    rows = sorted((r for r in history if r.get("loss") is not None), key=lambda r: r["step"])
    if len(rows) < 3:
        raise ValueError(f"need at least 3 logged train losses to diagnose, got {len(rows)}")
    steps, L = [r["step"] for r in rows], [float(r["loss"]) for r in rows]
    val = [(r["step"], float(r["val_loss"])) for r in rows if r.get("val_loss") is not None]
    ev: dict = {"points": len(L), "val_points": len(val)}
    if any("lr" in r for r in rows):
        ev["peak_lr"] = max(r.get("lr", 0.0) for r in rows)
    grads = [float(r["grad_norm"]) for r in rows if r.get("grad_norm") is not None]

    def result(label: str, *first: str) -> dict:
        advice = list(ADVICE[label])
        for a in reversed(first):  # the advice the evidence points to first
            advice.insert(0, advice.pop(advice.index(a)))
        return {"label": label, "evidence": ev, "advice": advice}

    # 1. non-finite values: nothing else about the curve means anything after them
    for r in rows:
        bad = [k for k in ("loss", "val_loss", "grad_norm") if r.get(k) is not None and not math.isfinite(r[k])]
        if bad:
            ev.update(nonfinite_step=r["step"], nonfinite=bad)
            return result("unstable")

    n = len(L)
    w = min(n, max(3, n // 10))

    def at(frac: float) -> float:
        i = round(frac * (n - 1))
        lo = max(0, min(i - w // 2, n - w))
        return median(L[lo:lo + w])

    rolling = [median(L[i:i + w]) for i in range(n - w + 1)]
    initial, final = median(L[:w]), median(L[-w:])
    i_best = min(range(len(rolling)), key=rolling.__getitem__)
    best = rolling[i_best]
    ev.update(initial_loss=_r(initial), final_loss=_r(final), best_loss=_r(best), best_loss_step=steps[i_best + w // 2])
    if grads:
        ev["max_grad_norm"] = _r(max(grads))

    # 2. diverging: the train loss ends above where it started, or gave back most of its gain
    gained = initial - best
    ev["rebound"] = _r((final - best) / gained) if gained > 0 else None
    if final > initial or (gained > 0 and final - best > REBOUND * gained and i_best < len(rolling) - 1):
        return result("diverging")

    # 3. spikes against the median of the points just before
    spikes = []
    for i in range(2, n):
        ref = median(L[max(0, i - SPIKE_WINDOW):i])
        if L[i] > SPIKE_K * ref and L[i] - ref > SPIKE_MIN:
            spikes.append((steps[i], L[i] / ref))
    if spikes:
        ev.update(spikes=len(spikes), first_spike_step=spikes[0][0], max_spike_ratio=_r(max(s for _, s in spikes)))
        early = all(s <= steps[0] + (steps[-1] - steps[0]) / 3 for s, _ in spikes)
        ev["spikes_only_early"] = early
        return result("unstable", ADVICE["unstable"][1]) if early else result("unstable")

    # 4. overfitting: validation rises from its minimum while train keeps falling
    if len(val) >= 3:
        j = min(range(len(val)), key=lambda k: val[k][1])
        vmin_step, vmin = val[j]
        vfinal = val[-1][1]
        train_at_vmin = L[min(range(n), key=lambda i: abs(steps[i] - vmin_step))]  # the logged row nearest it
        ev.update(val_min=_r(vmin), val_min_step=vmin_step, val_final=_r(vfinal),
                  val_rise=_r(vfinal / vmin - 1 if vmin > 0 else 0.0), train_at_val_min=_r(train_at_vmin),
                  train_val_gap=_r(vfinal - L[-1]))
        if j < len(val) - 1 and vfinal > vmin * (1 + OVERFIT_RISE) and final < train_at_vmin:
            ev["early_stop_step"] = vmin_step
            return result("overfitting")

    # 5./6. how much the end of the run still bought
    tail = (at(2 / 3) - final) / at(2 / 3) if at(2 / 3) > 0 else 0.0
    after_third = (at(1 / 3) - final) / at(1 / 3) if at(1 / 3) > 0 else 0.0
    ev.update(tail_improvement=_r(tail), improvement_after_first_third=_r(after_third))
    val_falling = True
    if len(val) >= 2:
        cut = steps[0] + (steps[-1] - steps[0]) * 2 / 3
        before = [v for s, v in val if s <= cut]
        val_falling = val[-1][1] < (before[-1] if before else val[0][1])
        ev["val_still_falling"] = val_falling
    if tail > UNDERFIT_TAIL and val_falling:
        return result("underfitting")
    if after_third < PLATEAU_REL:
        return result("plateaued")
    return result("healthy")
