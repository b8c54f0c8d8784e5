"""Is model B better than baseline A on a task, beyond noise? A paired bootstrap over the task's documents.

Both models answered the same documents, so the per-document score differences carry the comparison; resampling
documents (not the two means independently) keeps that pairing and gives a much tighter interval than two stderrs.
This is the standard paired bootstrap of the NLP evaluation literature (Koehn 2004; Dror et al. 2018).
"""
from __future__ import annotations

import numpy as np

# Corpus-level metrics of lm-eval's loglikelihood_rolling tasks: each document's score is (log-likelihood, count of
# words, bytes or tokens) and the task's value is a function of the two sums, not a mean over documents.
CORPUS_METRICS = {"word_perplexity": lambda ll, n: np.exp(-ll / n), "byte_perplexity": lambda ll, n: np.exp(-ll / n),
                  "token_perplexity": lambda ll, n: np.exp(-ll / n),
                  "bits_per_byte": lambda ll, n: -ll / n / np.log(2)}


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


def paired_bootstrap_corpus(metric: str, a: list, b: list, resamples: int = 2000, seed: int = 0,
                            level: float = 0.95) -> dict:
    """As `paired_bootstrap`, for a corpus-level metric (`CORPUS_METRICS`; lower is better): a[i], b[i] are the
    baseline's and the model's (log-likelihood, count) on document i; each resample recomputes both corpus values
    on the same documents. `p_not_better`: the share of resamples where the model's value is not lower."""
    if len(a) != len(b):
        raise ValueError(f"paired scores differ in length: {len(a)} vs {len(b)}")
    if not a:
        return {"delta": None, "ci_low": None, "ci_high": None, "n": 0, "p_not_better": None}
    fn = CORPUS_METRICS[metric]
    A, B = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(A), size=(resamples, len(A)))
    corpus = lambda x, i: fn(x[i, 0].sum(axis=-1), x[i, 1].sum(axis=-1))
    diffs = corpus(B, idx) - corpus(A, idx)
    lo, hi = np.quantile(diffs, [(1 - level) / 2, 1 - (1 - level) / 2])
    every = np.arange(len(A))
    return {"delta": round(float(corpus(B, every) - corpus(A, every)), 6), "ci_low": round(float(lo), 6),
            "ci_high": round(float(hi), 6), "n": len(A), "p_not_better": round(float((diffs >= 0).mean()), 4)}


def task_deltas(model: dict[str, list[dict]], baseline: dict[str, list[dict]], resamples: int = 2000,
                seed: int = 0) -> list[dict]:
    """{task: samples} of a model and a baseline -> one row per task and per-document metric they share.

    Documents are paired by (doc_id, filter); a document only one of them has (another --limit) is left out and
    the row says how many were paired. Corpus-level metrics (perplexities, bits per byte) are compared as corpus
    values (`paired_bootstrap_corpus`), the others as means.
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
                if metric in CORPUS_METRICS and all(isinstance(v, (list, tuple)) for v in a + b):
                    rows.append({"task": task, "metric": label,
                                 **paired_bootstrap_corpus(metric, a, b, resamples, seed)})
                elif not any(isinstance(v, (list, tuple)) for v in a + b):
                    rows.append({"task": task, "metric": label, **paired_bootstrap(a, b, resamples, seed)})
    return rows
