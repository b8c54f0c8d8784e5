"""Learning-rate schedules as pure functions: (0-based step, total steps, optim config) -> LR.

Phases, in order, over the `total` steps of a run:

- **warmup** (`warmup_steps`, or `warmup_ratio` x total rounded up): step s < W trains at lr * (s + 1) / W, so
  the first step is already above 0 and step W - 1 is at the peak `lr`.
- **decay** of D steps to the final LR lr * `min_lr_ratio`: step s in the decay phase [total - D, total) has
  progress p = (s - (total - D) + 1) / D, so the first decay step is just below the peak and the last step of the
  run (total - 1) trains at exactly the final LR. The LR is `final + (lr - final) * f(p)` with
  f = 1 - p (linear), (1 + cos(pi p)) / 2 (cosine) or 1 - sqrt(p) (the "1-sqrt" cooldown of Hägele et al. 2024).

Per schedule (`optim.schedule`):

- constant: lr after the warmup.
- linear / cosine: decay over all steps after the warmup (D = total - W), shaped as the name says.
- step: lr * step_gamma^k, k = the boundaries <= s (multiples of `step_size`, or the absolute `step_milestones`),
  never below the final LR.
- wsd: warmup, stable at lr, then decay over the last `decay_steps` (or `decay_ratio` x total, rounded up) steps,
  shaped by `decay_shape`.
- decay: only the decay, D = total from step 0: an annealing run resuming a checkpoint (no warmup allowed).

Steps past the end keep the final value. A `decay_steps` longer than what follows the warmup is cut to fit.
"""
from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine", "step", "wsd", "decay")
DECAY_SHAPES = ("linear", "cosine", "sqrt")


def _ceil(x: float) -> int:
    return math.ceil(x - 1e-9)  # 0.07 * 100 is 7.000000000000001 in floats: still 7 steps


def warmup_of(total: int, optim: dict) -> int:
    """Warmup steps: `warmup_steps`, or `warmup_ratio` of `total` rounded up."""
    if optim.get("warmup_ratio"):
        return _ceil(optim["warmup_ratio"] * total)
    return int(optim.get("warmup_steps") or 0)


def decay_of(total: int, optim: dict) -> int:
    """Steps in the decay phase (0 for constant and step)."""
    kind, warm = optim.get("schedule", "cosine"), warmup_of(total, optim)
    if kind in ("linear", "cosine"):
        return max(0, total - warm)
    if kind == "decay":
        return total
    if kind == "wsd":
        d = int(optim.get("decay_steps") or 0) or _ceil((optim.get("decay_ratio") or 0) * total)
        return max(0, min(d, total - warm))
    return 0


def _shape(p: float, shape: str) -> float:
    if shape == "linear":
        return 1.0 - p
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    if shape == "sqrt":
        return 1.0 - math.sqrt(p)
    raise ValueError(f"unknown decay shape {shape!r}; choose one of {DECAY_SHAPES}")


def lr_at(step: int, total: int, optim: dict) -> float:
    """Absolute LR of 0-based `step` of a `total`-step run, from a dumped `OptimSpec` (rules: module docstring)."""
    kind, peak = optim.get("schedule", "cosine"), optim["lr"]
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; choose one of {SCHEDULES}")
    final = peak * optim.get("min_lr_ratio", 0.1)
    warm = 0 if kind == "decay" else warmup_of(total, optim)
    if step < warm:
        return peak * (step + 1) / warm
    if kind == "constant":
        return peak
    if kind == "step":
        size, milestones = optim.get("step_size") or 0, optim.get("step_milestones") or []
        k = step // size if size else sum(1 for m in milestones if m <= step)
        return max(final, peak * optim.get("step_gamma", 0.1) ** k)
    decay = decay_of(total, optim)
    start = total - decay
    if decay <= 0 or step < start:  # wsd's stable phase
        return peak
    p = min(1.0, (step - start + 1) / decay)
    shape = kind if kind in ("linear", "cosine") else optim.get("decay_shape", "linear")
    return final + (peak - final) * _shape(p, shape)


def lr_multiplier(step: int, total: int, warmup: int, kind: str = "cosine", min_ratio: float = 0.1) -> float:
    """`lr_at` / peak for the original three schedules (cosine|linear|constant) with warmup in steps."""
    if kind not in ("cosine", "linear", "constant"):
        raise ValueError(f"unknown schedule {kind!r} for lr_multiplier; choose cosine, linear or constant "
                         f"(lr_at has the others)")
    return lr_at(step, total, {"lr": 1.0, "schedule": kind, "warmup_steps": warmup, "min_lr_ratio": min_ratio})


def schedule_facts(total: int, optim: dict) -> dict:
    """What a report states about a run's schedule, computed from `lr_at` so it holds for every schedule.

    `final_lr` is the LR of the run's last step; `decay_steps` the steps of the decay phase (None for step);
    `milestones` the steps where a step schedule multiplies the LR by `step_gamma`.
    """
    kind, warm = optim.get("schedule", "cosine"), warmup_of(total, optim)
    if kind == "decay":
        warm = 0
    facts = {"schedule": kind, "peak_lr": optim.get("lr"),
             "final_lr": lr_at(total - 1, total, optim) if total > 0 else optim.get("lr"),
             "warmup_steps": warm, "warmup_ratio": round(warm / max(1, total), 3)}
    if kind == "step":
        size = optim.get("step_size") or 0
        facts["milestones"] = (list(range(size, total, size)) if size
                               else [m for m in optim.get("step_milestones") or [] if m < total])
        facts["step_gamma"] = optim.get("step_gamma", 0.1)
    else:
        facts["decay_steps"] = decay_of(total, optim)
    if kind in ("wsd", "decay"):
        facts["decay_shape"] = optim.get("decay_shape", "linear")
    return facts
