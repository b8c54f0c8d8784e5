"""Benchmark: fuzzy (MinHash-LSH) deduplication, raylm's curate stage on Ray Data vs single-process datasketch / rensa.

One run, one generated corpus (`raylm.data.synth.planted_corpus`: planted near-duplicates plus hard negatives),
one set of parameters (word 5-gram shingles, 128 permutations, Jaccard threshold 0.8), three methods:

1. raylm: the real curate stage (`pipelines.curate`) on the corpus written as JSONL, on a local Ray cluster
   (`num_cpus=os.cpu_count()`), with every operator off but the dedup (and the cheap length/alpha filters set so
   that they keep everything). The exact-hash dedup stays on, paragraphs off: with it off the stage fails on any
   corpus holding identical copies (see run_raylm; `--fuzzy-only` tries anyway). Timings come from the run's
   manifest; the Ray cluster start is not counted. Removed = excluded rows (fuzzy_duplicate or exact_duplicate).
2. datasketch, one process: per document `text.split()` 5-gram shingles, `MinHash(num_perm=128).update_batch`,
   `MinHashLSH(threshold=0.8, num_perm=128).query`; a document with any hit is removed, else inserted.
3. rensa, one process, two ways: (a) the same query-then-insert loop with `RMinHash.update` + `RMinHashLSH`;
   (b) `RMinHashDeduplicator(threshold=0.8, num_perm=128, use_lsh=True).add_pairs` (rensa's README recipe: sketching,
   LSH and the estimated-Jaccard check of each candidate all in Rust), fed in chunks of 4096 documents.
   Each anchor's time includes reading the JSONL (`json.loads` per line) and shingling, as raylm's includes reading.

Ground truth: a document is a true duplicate when an earlier document (smaller id) has an exact shingle Jaccard
>= 0.8 (`synth.true_duplicates`). Candidate pairs checked: the planted pairs, every pair any method flagged, and every
pair of documents sharing >= 3 of their 1-in-4 sampled 5-gram hashes (a true pair shares >= 116 5-grams, so it is
found with certainty; this also recovers the hard negatives and copies of copies, which `planted_corpus` does not
return). Precision = |removed & true| / |removed|, recall = |removed & true| / |true|, per document.

    .venv/bin/python benchmarks/fuzzy_dedup.py [--docs 100000] [--out results.json] [--fuzzy-only] [--keep]
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

NGRAM, NUM_PERM, THRESHOLD, SEED = 5, 128, 0.8, 42
DUP_REASONS = ("fuzzy_duplicate", "exact_duplicate")  # an identical copy in a fuzzy component is labelled exact


# ---------------------------------------------------------------- helpers
def machine() -> dict:
    model = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    import datasketch
    import ray
    import rensa  # noqa: F401
    from importlib.metadata import version

    return {"cores": os.cpu_count(), "cpu_model": model, "memory": mem, "python": platform.python_version(),
            "ray": ray.__version__, "datasketch": datasketch.__version__, "rensa": version("rensa"),
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def cpu_seconds() -> float:
    """User + system CPU time of this process, all its threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def shingle_list(text: str) -> list[str]:
    """Word 5-grams joined with spaces; a text under 5 words is one shingle (synth.shingles, as a list)."""
    w = text.split()
    return [" ".join(w[i:i + NGRAM]) for i in range(max(1, len(w) - NGRAM + 1))]


def read_jsonl(path: str):
    with open(path, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            yield rec["id"], rec["text"]


def rensa_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """rensa's RMinHashLSH needs num_bands | num_perm: the divisor with the least weighted FP+FN area (the criterion
    raylm's `dedup.lsh_params` and datasketch use, restricted to divisors)."""
    xs_fp, xs_fn = np.linspace(0, threshold, 201), np.linspace(threshold, 1, 201)
    best, best_err = (1, num_perm), math.inf
    for b in (d for d in range(1, num_perm + 1) if num_perm % d == 0):
        r = num_perm // b
        err = 0.5 * np.trapezoid(1 - (1 - xs_fp ** r) ** b, xs_fp) + 0.5 * np.trapezoid((1 - xs_fn ** r) ** b, xs_fn)
        if err < best_err:
            best, best_err = (b, r), err
    return best


# ---------------------------------------------------------------- anchors (one process each, in this process)
def run_datasketch(jsonl: str) -> dict:
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM)
    removed, pairs = [], []
    c0, t0 = cpu_seconds(), time.perf_counter()
    for doc_id, text in read_jsonl(jsonl):
        m = MinHash(num_perm=NUM_PERM)
        m.update_batch([s.encode() for s in shingle_list(text)])
        hits = lsh.query(m)
        if hits:
            removed.append(doc_id)
            pairs += [(doc_id, h) for h in hits]
        else:
            lsh.insert(doc_id, m)
    secs = time.perf_counter() - t0
    return {"seconds": secs, "cpu_seconds": cpu_seconds() - c0, "removed": removed, "pairs": pairs,
            "detail": f"datasketch MinHashLSH b={lsh.b} r={lsh.r}, MinHash.update_batch, query then insert"}


def run_rensa_loop(jsonl: str) -> dict:
    import rensa

    bands, rows = rensa_bands(THRESHOLD, NUM_PERM)
    lsh = rensa.RMinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM, num_bands=bands)
    ids: list[str] = []
    removed, pairs = [], []
    c0, t0 = cpu_seconds(), time.perf_counter()
    for i, (doc_id, text) in enumerate(read_jsonl(jsonl)):
        ids.append(doc_id)
        m = rensa.RMinHash(num_perm=NUM_PERM, seed=SEED)
        m.update(shingle_list(text))
        hits = lsh.query(m)
        if hits:
            removed.append(doc_id)
            pairs.append((i, hits))
        else:
            lsh.insert(i, m)
    secs = time.perf_counter() - t0
    pairs = [(ids[i], ids[h]) for i, hits in pairs for h in hits]
    return {"seconds": secs, "cpu_seconds": cpu_seconds() - c0, "removed": removed, "pairs": pairs,
            "detail": f"rensa RMinHash.update + RMinHashLSH(num_bands={bands}, rows {rows}), query then insert"}


def run_rensa_dedup(jsonl: str, chunk: int = 4096) -> dict:
    import rensa

    dd = rensa.RMinHashDeduplicator(threshold=THRESHOLD, num_perm=NUM_PERM, use_lsh=True, seed=SEED)
    removed: list[str] = []
    c0, t0 = cpu_seconds(), time.perf_counter()
    batch: list[tuple[str, list[str]]] = []

    def flush():
        keep = dd.add_pairs(batch)
        removed.extend(k for (k, _), ok in zip(batch, keep) if not ok)
        batch.clear()

    for doc_id, text in read_jsonl(jsonl):
        batch.append((doc_id, shingle_list(text)))
        if len(batch) >= chunk:
            flush()
    if batch:
        flush()
    secs, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    # untimed: what each removed document matched (the kept documents' candidates that passed the check)
    gone = set(removed)
    texts = {i: t for i, t in read_jsonl(jsonl) if i in gone}
    sets = dd.get_duplicate_sets([shingle_list(texts[i]) for i in removed]) if removed else []
    pairs = [(i, h) for i, hits in zip(removed, sets) for h in hits]
    return {"seconds": secs, "cpu_seconds": cpu, "removed": removed, "pairs": pairs,
            "detail": f"rensa RMinHashDeduplicator(use_lsh=True, default bands).add_pairs, {chunk} docs a call"}


# ---------------------------------------------------------------- raylm
def keys_in_process(jsonl: str, fuzzy_only: bool, batch_rows: int = 1024) -> dict:
    """Diagnostic, not a dedup: raylm's per-document `Keys` operator (MinHash signatures + hashes + counts), and
    `dedup.signatures` alone, called in this one process on `batch_rows`-document batches, no Ray."""
    import pandas as pd

    import pipelines.curate as c
    from raylm.config import load_config
    from raylm.data import dedup

    cfg = load_config(c.Config, None, ["exact_dedup.enabled=false"] if fuzzy_only else ["exact_dedup.paragraphs=false"])
    keys = c.Keys(cfg)
    docs = list(read_jsonl(jsonl))
    t_keys = t_sig = 0.0
    for lo in range(0, len(docs), batch_rows):
        part = docs[lo:lo + batch_rows]
        texts = [t for _, t in part]
        batch = pd.DataFrame({"id": [i for i, _ in part], "uid": np.arange(lo, lo + len(part), dtype=np.int64),
                              "text": texts, "drop_reason": [""] * len(part)})
        t = time.perf_counter()
        keys(batch)
        t_keys += time.perf_counter() - t
        t = time.perf_counter()
        dedup.signatures(texts, cfg.fuzzy_dedup)
        t_sig += time.perf_counter() - t
    return {"batch_rows": batch_rows, "keys_s": t_keys, "signatures_s": t_sig, "docs": len(docs)}


def run_raylm(jsonl: str, root: str, fuzzy_only: bool) -> dict:
    import pandas as pd
    import ray

    import pipelines.curate as c
    from raylm.config import load_config
    from raylm.runs import RunStore
    from raylm.stage import execute

    overrides = [f"root={root}", f"source={jsonl}", "tasks.enabled=false", "language.enabled=false",
                 "gopher.enabled=false", "c4.enabled=false", "repetition.enabled=false", "pii.enabled=false",
                 "min_chars=1", "min_alpha_ratio=0", "max_repeated_line_fraction=1",
                 "val_percent=0", f"fuzzy_dedup.num_perm={NUM_PERM}", f"fuzzy_dedup.threshold={THRESHOLD}",
                 f"fuzzy_dedup.ngram={NGRAM}", "fuzzy_dedup.unit=word"]
    # Fuzzy only (exact_dedup.enabled=false) fails at the end of the stage whenever a fuzzy component holds two
    # identical texts: ApplyDedup labels the copy `exact_duplicate`, an operator not in the funnel (AssertionError
    # "drop reasons of no operator"). So by default the exact-hash dedup runs too (paragraphs off): one more bucket
    # row per document in the same graph groupby; it finds nothing the fuzzy LSH would not.
    overrides += ["exact_dedup.enabled=false"] if fuzzy_only else ["exact_dedup.enabled=true",
                                                                   "exact_dedup.paragraphs=false"]
    cfg = load_config(c.Config, None, overrides)
    op_seconds: dict = {}
    real_funnel = c.funnel

    def funnel_spy(order, reasons, seconds, n_in):  # the per-operator busy seconds, `keys` included
        op_seconds.update({k: v for k, v in seconds.items() if isinstance(v, dict) and "rows" in v})
        return real_funnel(order, reasons, seconds, n_in)

    from raylm.cluster import init_ray

    init_ray()  # the local cluster `raylm run` starts; curate caps Ray Data at the machine's cores
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        c.funnel = funnel_spy
        t0 = time.perf_counter()
        run_id = execute(c, cfg)
        outer = time.perf_counter() - t0
    finally:
        c.funnel = real_funnel
        ray.shutdown()
    m = RunStore(root).load(run_id)
    removed, pairs = [], []
    if "excluded" in m.outputs:
        ex = pd.read_parquet(m.outputs["excluded"].uri, columns=["id", "drop_reason", "duplicate_of"])
        other = sorted(set(ex["drop_reason"]) - set(DUP_REASONS))
        assert not other, f"raylm dropped documents for other reasons: {other}"
        removed = list(ex["id"])
        pairs = list(zip(ex["id"], ex["duplicate_of"]))
    t = m.timings
    return {"run_id": run_id, "timings": dict(t), "execute_s": outer, "funnel": m.metrics["funnel"],
            "dedup_graph": m.metrics.get("dedup_graph"), "op_busy_s": op_seconds,
            "drop_reasons": m.metrics.get("drop_reasons"), "docs_in": m.metrics["docs_in"],
            "removed": removed, "pairs": pairs}


# ---------------------------------------------------------------- ground truth
def related_pairs(texts: list[str], sample_mod: int = 4, min_shared: int = 3, max_group: int = 64,
                  chunk: int = 5000) -> set[tuple[int, int]]:
    """(i, j), i < j: documents sharing >= `min_shared` of their sampled (hash % sample_mod == 0) 5-gram hashes."""
    from raylm.data.dedup import shingle_hashes

    hs, ds = [], []
    for lo in range(0, len(texts), chunk):
        h, off = shingle_hashes(texts[lo:lo + chunk], "word", NGRAM)
        doc = np.repeat(np.arange(lo, lo + len(off) - 1, dtype=np.int64), np.diff(off.astype(np.int64)))
        keep = h % np.uint64(sample_mod) == 0
        hs.append(h[keep])
        ds.append(doc[keep])
    h, d = np.concatenate(hs), np.concatenate(ds)
    order = np.lexsort((d, h))
    h, d = h[order], d[order]
    first = np.ones(len(h), bool)
    first[1:] = (h[1:] != h[:-1]) | (d[1:] != d[:-1])  # one entry per (hash, doc)
    h, d = h[first], d[first]
    starts = np.flatnonzero(np.r_[True, h[1:] != h[:-1]])
    sizes = np.diff(np.r_[starts, len(h)])
    codes = []
    n = np.int64(len(texts))
    for s in range(2, max_group + 1):
        g = starts[sizes == s]
        if not len(g):
            continue
        members = d[g[:, None] + np.arange(s)]  # [groups, s], ascending doc within a group
        for a in range(s - 1):
            for b in range(a + 1, s):
                codes.append(members[:, a] * n + members[:, b])
    if not codes:
        return set()
    u, cnt = np.unique(np.concatenate(codes), return_counts=True)
    u = u[cnt >= min_shared]
    return set(zip((u // n).tolist(), (u % n).tolist()))


def recovered_hard_negatives(recs: list[dict], related: set[tuple[int, int]], planted_ids: set[str],
                             floor: float = 0.1) -> set[str]:
    """planted_corpus makes three kinds of document: fresh, planted copy (returned) and hard negative (a heavier edit
    of an earlier document, not returned). A hard negative is a non-planted document whose most similar earlier
    relative has an exact Jaccard in [floor, threshold); `floor` keeps out chance 5-gram overlaps of fresh documents."""
    from raylm.data.synth import shingles

    best: dict[int, float] = {}
    cache: dict[int, set] = {}
    for a, b in related:
        if recs[b]["id"] in planted_ids:
            continue
        sa = cache.setdefault(a, shingles(recs[a]["text"], NGRAM))
        sb = cache.setdefault(b, shingles(recs[b]["text"], NGRAM))
        best[b] = max(best.get(b, 0.0), len(sa & sb) / max(1, len(sa | sb)))
    return {recs[b]["id"] for b, j in best.items() if floor <= j < THRESHOLD}


def score(removed: list[str], truth: set[str]) -> dict:
    rem = set(removed)
    tp = len(rem & truth)
    return {"removed": len(rem), "true_positives": tp, "precision": tp / len(rem) if rem else float("nan"),
            "recall": tp / len(truth) if truth else float("nan")}


# ---------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--fuzzy-only", action="store_true",
                    help="stage with exact_dedup.enabled=false (fails today on a corpus with identical copies)")
    ap.add_argument("--keep", action="store_true", help="keep the corpus and the raylm run store (printed)")
    args = ap.parse_args()

    from raylm.data.synth import planted_corpus, true_duplicates

    info = machine()
    tmp = tempfile.mkdtemp(prefix="fuzzy_dedup_")
    jsonl, root = os.path.join(tmp, "corpus.jsonl"), os.path.join(tmp, "runs")
    try:
        t = time.perf_counter()
        recs, planted = planted_corpus(args.docs, dup_fraction=0.3, hard_negative_fraction=0.05, seed=0)
        with open(jsonl, "w", encoding="utf-8") as f:
            for r in recs:
                f.write(json.dumps(r) + "\n")
        words = sum(len(r["text"].split()) for r in recs)
        print(f"corpus: {len(recs):,} docs, {words:,} words, {os.path.getsize(jsonl) / 2**20:.1f} MiB JSONL, "
              f"{len(planted):,} planted pairs ({time.perf_counter() - t:.1f} s to generate)", flush=True)

        t = time.perf_counter()
        n_read = sum(1 for _ in read_jsonl(jsonl))
        read_s = time.perf_counter() - t
        results: dict[str, dict] = {}
        # anchors first, before any Ray process exists on the machine
        for name, fn in (("datasketch", run_datasketch), ("rensa loop", run_rensa_loop),
                         ("rensa deduplicator", run_rensa_dedup)):
            results[name] = fn(jsonl)
            r = results[name]
            print(f"{name}: {r['seconds']:.2f} s, {len(r['removed']):,} removed  [{r['detail']}]", flush=True)
        kernel = keys_in_process(jsonl, args.fuzzy_only)
        results["raylm"] = ray_res = run_raylm(jsonl, root, args.fuzzy_only)
        tm = ray_res["timings"]
        print(f"raylm: stage wall {tm.get('wall_s')} s, {len(ray_res['removed']):,} removed (run {ray_res['run_id']})",
              flush=True)

        # ground truth
        t = time.perf_counter()
        index = {r["id"]: i for i, r in enumerate(recs)}
        related = related_pairs([r["text"] for r in recs])
        rel_ids = {(recs[a]["id"], recs[b]["id"]) for a, b in related}
        hard_negatives = recovered_hard_negatives(recs, related, {c for c, _ in planted})
        flagged = {p for r in results.values() for p in r["pairs"] if p[0] in index and p[1] in index}
        candidates = set(planted) | rel_ids | flagged
        truth = true_duplicates(recs, THRESHOLD, NGRAM, candidates=candidates)
        truth_s = time.perf_counter() - t
        missed_by_index = {p for p in set(planted) | flagged if tuple(sorted(p)) not in rel_ids}
        print(f"ground truth: {len(truth):,} true duplicates from {len(candidates):,} candidate pairs "
              f"({len(rel_ids):,} sharing 5-grams; {len(hard_negatives):,} hard negatives recovered, expected "
              f"~{0.05 * args.docs:,.0f}; {truth_s:.1f} s)", flush=True)

        n = len(recs)
        assert n_read == n and ray_res["docs_in"] == n, (n_read, ray_res["docs_in"], n)
        ops = ray_res["op_busy_s"]
        dedup_path_s = tm["operators_s"] + tm["dedup_graph_s"] + tm["apply_s"]
        rows = [
            ("raylm, dedup path", dedup_path_s, None, ray_res["removed"],
             "operators_s + dedup_graph_s + apply_s: read JSONL, parse, normalise, keep-all filters, keys (MinHash) "
             "-> Parquet; LSH buckets + connected components; join + apply -> Parquet"),
            ("raylm, stage wall", tm["wall_s"], None, ray_res["removed"],
             "manifest wall_s: the above + splits/sort/writes, metrics, artifact hashing (Ray start excluded)"),
        ]
        for name in ("datasketch", "rensa loop", "rensa deduplicator"):
            r = results[name]
            rows.append((name, r["seconds"], r["cpu_seconds"] / r["seconds"], r["removed"],
                         r["detail"] + "; read JSONL + shingling included"))
        table = []
        for name, secs, cores_used, removed, definition in rows:
            s = score(removed, truth)
            table.append({"method": name, "seconds": secs, "docs_per_s": n / secs, "cores_used": cores_used,
                          **s, "hard_negatives_removed": len(set(removed) & hard_negatives),
                          "definition": definition})
        anchors = [row for row in table if not row["method"].startswith("raylm")]
        fastest = max(anchors, key=lambda r: r["docs_per_s"])
        cores = os.cpu_count()
        head = table[0]

        print()
        print(f"machine: {cores} cores, {info['cpu_model']}, {info['memory']}; python {info['python']}, "
              f"ray {info['ray']}, datasketch {info['datasketch']}, rensa {info['rensa']}; {info['date']}")
        print(f"N = {n:,} docs ({words:,} words); word {NGRAM}-gram shingles, num_perm {NUM_PERM}, threshold "
              f"{THRESHOLD}\nraylm graph facts: {ray_res['dedup_graph']}")
        print(f"truth: {len(truth):,} true duplicates (exact Jaccard >= {THRESHOLD} with an earlier doc); "
              f"{len(hard_negatives):,} hard negatives")
        print()
        hdr = (f"{'method':<22} {'seconds':>9} {'docs/s':>10} {'cores':>5} {'removed':>8} {'precision':>9} "
               f"{'recall':>7} {'hard neg':>8}")
        print(hdr)
        print("-" * len(hdr))
        for r in table:
            cu = f"{r['cores_used']:.2f}" if r["cores_used"] is not None else f"{cores}*"
            print(f"{r['method']:<22} {r['seconds']:>9.2f} {r['docs_per_s']:>10,.0f} {cu:>5} {r['removed']:>8,} "
                  f"{r['precision']:>9.4f} {r['recall']:>7.4f} {r['hard_negatives_removed']:>8,}")
        print(f"(cores: process CPU time / wall time for the anchors; * raylm: a {cores}-CPU Ray cluster)")
        print()
        ratio = head["docs_per_s"] / (cores * fastest["docs_per_s"])
        ratios = {"raylm_over_cores_x_fastest_anchor": ratio, "fastest_anchor": fastest["method"]}
        print(f"raylm docs/s / ({cores} cores x fastest anchor, {fastest['method']}): {ratio:.3f}  (target >= 0.8)")
        for r in anchors:
            ratios[f"raylm_over_{r['method'].replace(' ', '_')}"] = head["docs_per_s"] / r["docs_per_s"]
            print(f"raylm / {r['method']}: {head['docs_per_s'] / r['docs_per_s']:.3f}x")
        wall = table[1]
        print(f"(with the stage wall time instead: {wall['docs_per_s'] / (cores * fastest['docs_per_s']):.3f} "
              f"of {cores} x fastest anchor)")
        print()
        print("definitions:")
        for r in table:
            print(f"  {r['method']}: {r['definition']}")
        print("raylm breakdown (manifest timings, s): " + ", ".join(f"{k} {v}" for k, v in tm.items()))
        busy = ", ".join(f"{k} {v['seconds']:.2f} s ({v['rows'] / v['seconds']:,.0f} docs/s/core)"
                         for k, v in ops.items() if v.get("seconds"))
        print(f"raylm operator busy time, summed over worker processes (Timed): {busy}")
        print(f"raylm Keys operator in this one process, no Ray ({kernel['batch_rows']}-doc batches): "
              f"{n / kernel['keys_s']:,.0f} docs/s; its dedup.signatures alone (shingle hashing + rensa "
              f"digest_matrix_from_flat_token_hashes): {n / kernel['signatures_s']:,.0f} docs/s")
        print(f"anchors' JSONL read alone: {read_s:.2f} s (included in each anchor's seconds)")
        if missed_by_index:
            print(f"note: {len(missed_by_index)} planted/flagged pairs share < 3 sampled 5-grams (checked anyway)")

        out = {"machine": info, "docs": n, "words": words, "params": {"ngram": NGRAM, "num_perm": NUM_PERM,
               "threshold": THRESHOLD, "seed": SEED}, "truth": len(truth), "hard_negatives": len(hard_negatives),
               "candidates": len(candidates), "table": table, "ratios": ratios, "raylm_keys_in_process": kernel,
               "raylm": {k: v for k, v in ray_res.items() if k not in ("removed", "pairs")}}
        if args.out:
            Path(args.out).write_text(json.dumps(out, indent=2, default=str))
            print(f"results written to {args.out}")
    finally:
        if args.keep:
            print(f"kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
