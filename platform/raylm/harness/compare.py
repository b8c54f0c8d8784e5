"""Is model B better than baseline A on a task, beyond noise? A paired bootstrap over the task's documents.

Both models answered the same documents, so the per-document score differences carry the comparison; resampling
documents (not the two means independently) keeps that pairing and gives a much tighter interval than two stderrs.
This is the standard paired bootstrap of the NLP evaluation literature (Koehn 2004; Dror et al. 2018).
"""
from __future__ import annotations

import numpy as np


def paired_bootstrap(a: list[float], b: list[float], resamples: int = 2000, seed: int = 0,
                     level: float = 0.95) -> dict:
    """a[i], b[i]: the baseline's and the model's score on document i.

    Returns {"delta": mean(b - a), "ci_low", "ci_high", "n", "p_not_better"}: the percentile interval of the
    resampled mean difference, and the share of resamples where b does not beat a (a one-sided bootstrap p-value).
    """
    if len(a) != len(b):
        raise ValueError(f"paired scores differ in length: {len(a)} vs {len(b)}")
    d = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    n = len(d)
    if n == 0:
        return {"delta": None, "ci_low": None, "ci_high": None, "n": 0, "p_not_better": None}
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"delta": round(float(d.mean()), 6), "ci_low": round(float(lo), 6), "ci_high": round(float(hi), 6),
            "n": n, "p_not_better": round(float((means <= 0).mean()), 4)}


def task_deltas(model: dict[str, list[dict]], baseline: dict[str, list[dict]], resamples: int = 2000,
                seed: int = 0) -> list[dict]:
    """{task: samples} of a model and a baseline -> one row per task and per-document metric they share.

    Documents are paired by (doc_id, filter); a document only one of them has (another --limit) is left out and
    the row says how many were paired.
    """
    rows = []
    for task in sorted(set(model) & set(baseline)):
        mine = {(s["doc_id"], s.get("filter")): s["scores"] for s in model[task]}
        theirs = {(s["doc_id"], s.get("filter")): s["scores"] for s in baseline[task]}
        keys = sorted(set(mine) & set(theirs), key=str)
        metrics = sorted({m for k in keys for m in mine[k] if m in theirs[k]})
        for metric in metrics:
            for filt in sorted({k[1] for k in keys}, key=str):
                ks = [k for k in keys if k[1] == filt and metric in mine[k] and metric in theirs[k]]
                a = [theirs[k][metric] for k in ks]
                b = [mine[k][metric] for k in ks]
                if any(v is None for v in a + b):
                    continue
                label = metric if filt in (None, "none") else f"{metric},{filt}"
                rows.append({"task": task, "metric": label, **paired_bootstrap(a, b, resamples, seed)})
    return rows
