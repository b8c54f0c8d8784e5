"""Per-operator statistics for a streaming curation pipeline: counts, drop reasons, seconds, docs/s.

Counts come from the data itself (every row carries the reason it was dropped or quarantined, and each reason
belongs to one operator), so they add up exactly: an operator's `in` is the previous operator's `kept`.
Seconds come from the operators: each `Timed` batch call sends (operator, live rows, seconds) to a small actor,
fire-and-forget, which the driver polls to print progress while the pipeline streams.
"""
from __future__ import annotations

import threading
import time

import pandas as pd
import ray

from raylm import console

KEEP = ""


@ray.remote(num_cpus=0)
class FunnelStats:
    def __init__(self):
        self.ops: dict[str, dict] = {}

    def add(self, op: str, rows: int, seconds: float) -> None:
        s = self.ops.setdefault(op, {"rows": 0, "seconds": 0.0, "batches": 0})
        s["rows"] += rows
        s["seconds"] += seconds
        s["batches"] += 1

    def get(self) -> dict:
        return self.ops


class Timed:
    """Wraps a map_batches operator; its time and its live input rows go to the stats actor."""

    def __init__(self, op: str, fn, stats):
        self.op, self.fn, self.stats = op, fn, stats

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        live = int((batch["drop_reason"] == KEEP).sum()) if "drop_reason" in batch else len(batch)
        t = time.perf_counter()
        out = self.fn(batch)
        self.stats.add.remote(self.op, live, time.perf_counter() - t)
        return out


def op_of(reason: str) -> str:
    """The operator a drop reason belongs to ("gopher.word_count" -> gopher, "malformed:x" -> read)."""
    if reason.startswith("malformed:"):
        return "read"
    return {"exact_duplicate": "exact_dedup", "fuzzy_duplicate": "fuzzy_dedup"}.get(reason, reason.split(".")[0])


def funnel(order: list[str], reasons: dict[str, int], seconds: dict[str, dict], n_in: int) -> list[dict]:
    """One row per operator in pipeline order: in, kept, dropped (or quarantined), reasons, seconds, docs/s."""
    rows, live = [], n_in
    for op in order:
        mine = {r: c for r, c in reasons.items() if r != KEEP and op_of(r) == op}
        out = sum(mine.values())
        t = seconds.get(op, {}).get("seconds")
        rows.append({"op": op, "in": live, "kept": live - out, "removed": out, "reasons": mine,
                     "seconds": round(t, 3) if t is not None else None,
                     "docs_per_s": round(live / t, 1) if t else None})
        assert rows[-1]["in"] == rows[-1]["kept"] + rows[-1]["removed"]
        live -= out
    unknown = {r for r in reasons if r != KEEP and op_of(r) not in order}
    assert not unknown, f"drop reasons of no operator: {unknown}"
    return rows


SUMMED = ("chars", "pretokens", "tokens", "paragraphs_removed")


def summarize(ds, hist_edges: list[int]) -> dict:
    """One pass over an annotated dataset: rows per drop reason (originals only, not up-sampled copies) and, for
    kept rows, per-source sums of docs/chars/tokens/PII counts plus a token-length histogram.

    Each batch is reduced to one small row and the driver adds them up: one Ray Data execution instead of a
    groupby or a `sum()` per figure.
    """
    import json

    import numpy as np

    def part(b: pd.DataFrame) -> pd.DataFrame:
        original = b[b["copy"] == 0] if "copy" in b else b
        kept = b[b["drop_reason"] == KEEP]
        cols = [c for c in kept.columns if c in SUMMED or c.startswith("pii_")]
        sources = {}
        for src, g in kept.groupby("source"):
            sources[src] = {"docs": len(g), **{c: int(g[c].sum()) for c in cols}}
        hist = np.histogram(kept["tokens"], bins=hist_edges)[0].tolist() if "tokens" in kept else []
        return pd.DataFrame({"s": [json.dumps({"reasons": original["drop_reason"].value_counts().to_dict(),
                                                "sources": sources, "hist": hist})]})

    out: dict = {"reasons": {}, "sources": {}, "hist": [0] * (len(hist_edges) - 1)}
    for row in ds.map_batches(part, batch_format="pandas").take_all():
        p = json.loads(row["s"])
        for r, c in p["reasons"].items():
            out["reasons"][r] = out["reasons"].get(r, 0) + c
        for src, vals in p["sources"].items():
            acc = out["sources"].setdefault(src, {})
            for k, v in vals.items():
                acc[k] = acc.get(k, 0) + v
        out["hist"] = [a + b for a, b in zip(out["hist"], p["hist"] or [0] * len(out["hist"]))]
    return out


class Progress:
    """Prints the live per-operator row counts every `every` seconds while the pipeline runs."""

    def __init__(self, stats, every: float = 15.0, prefix: str = "curate"):
        self.stats, self.prefix = stats, prefix
        self.every = 2.0 if console.log_path() else every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.time()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self):
        while not self._stop.wait(self.every):
            try:
                ops = ray.get(self.stats.get.remote(), timeout=5)
            except Exception:  # noqa: BLE001 - progress is best effort
                continue
            parts = [f"{op} {s['rows']:,}" for op, s in ops.items()]
            text = "rows seen: " + " | ".join(parts)
            if console.log_path():  # a console session draws it on the stage's progress line
                console.publish({"text": text})
            else:
                print(f"[{self.prefix} {time.time() - self._t0:5.0f}s] {text}", flush=True)
