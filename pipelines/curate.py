"""curate: raw text -> parsed -> normalised -> filtered -> PII-redacted -> deduplicated -> mixed dataset (Ray Data).

Every step is a Ray Data transform that streams; nothing holds the corpus in one process:
1. read + operators  JSONL/Parquet/text (gz/zst) -> quarantine of malformed records -> normalise -> quality and
                     language filters -> PII redaction -> hashes and MinHash signatures; written to `work/docs`.
2. dedup graph       exact-hash groups + MinHash-LSH buckets -> edges -> distributed connected components;
                     repeated paragraphs across documents (groupby paragraph hash). Key columns only.
3. apply             docs joined with the duplicate map and the paragraph removals; token accounting.
4. mix + write       per-source down/up-sampling to target ratios; train/val split; optional chunk + pack with
                     document boundaries; dropped and quarantined rows written with their reason.
Counts add up per operator and for the stage: in = kept + dropped + quarantined (checked, recorded as a funnel).

A small input is an ordinary run: an empty file, one of only malformed lines, one document or ten copies of one
succeed with their counts (0 in, 0 kept is a valid funnel). Every split is written, an empty one as a Parquet file
with its columns and no rows, so a later stage reads zero rows instead of a missing path and can say what it
needs; the manifest's `warnings` list what the corpus was too small for (an empty val split, a task family).
"""
from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import ray

from raylm import console, corpus, tasks
from raylm.config import ConfigError, Section, StageConfig
from raylm.data import dedup, frames
from raylm.data.filters import KEEP, ApplyFilters, build_filters, count_pretokens, split_of
from raylm.data.funnel import FunnelStats, Progress, Timed, funnel, summarize
from raylm.data.mix import HIST_EDGES, MixSpec, TokenSpec, apply_mix, count_tokens, mix_rates, pack_splits
from raylm.data.pii import PiiSpec, RedactPii
from raylm.data.quality import (C4Quality, C4Spec, GopherQuality, GopherSpec, LanguageFilter, LanguageSpec,
                                RepetitionFilter, RepetitionSpec)
from raylm.data.read import InputSpec, Normalize, NormalizeSpec, read_input, rows_frame

STAGE = "curate"
INPUTS: dict = {}
OPTIONAL_INPUTS = {"tokenizer": ("tokenizer",)}  # token accounting and packing with a trained tokenizer


class TasksSpec(Section):
    enabled: bool = True
    per_family: int = 150
    test_percent: int = 15
    seed: int = 0
    in_pretrain_mix: bool = True  # add the train split as plain text to the pre-training data
    max_source_docs: int = 20000  # tasks are built from at most this many kept documents


class PackSpec(Section):
    enabled: bool = False  # needs a tokenizer (inputs.tokenizer or tokens.tokenizer_path)
    chunk_tokens: int = 512  # documents longer than this are split on paragraph/sentence boundaries
    seq_len: int = 1024  # packed block length; each block records where its documents start


class Config(StageConfig):
    source: str = "builtin"  # "builtin", or a JSONL/Parquet/text file, directory or glob (shorthand for `read`)
    read: list[InputSpec] = []  # several inputs, each with its own format/source tag/text key
    sources: list[str] = ["pydoc_topics", "stdlib_docstrings", "licenses"]  # builtin corpus parts
    max_chars_per_doc: int = 1500
    max_stdlib_files: int = 400
    max_line_bytes: int = 1_000_000  # a longer JSONL line (or text file) is quarantined as oversized
    normalize: NormalizeSpec = NormalizeSpec()
    min_chars: int = 120
    max_chars: int = 20000
    min_alpha_ratio: float = 0.55
    max_repeated_line_fraction: float = 0.3
    language: LanguageSpec = LanguageSpec()
    gopher: GopherSpec = GopherSpec()
    c4: C4Spec = C4Spec()
    repetition: RepetitionSpec = RepetitionSpec()
    pii: PiiSpec = PiiSpec()
    exact_dedup: dedup.ExactSpec = dedup.ExactSpec()
    fuzzy_dedup: dedup.FuzzySpec = dedup.FuzzySpec()
    tokens: TokenSpec = TokenSpec()
    mix: MixSpec = MixSpec()
    pack: PackSpec = PackSpec()
    shuffle_partitions: int | None = None  # groupby/join partitions; None: from the input size
    val_percent: float = 5.0
    tasks: TasksSpec = TasksSpec()


def check(inputs, cfg: Config) -> None:
    f = cfg.fuzzy_dedup
    if f.unit not in ("word", "char"):
        raise ConfigError(f"fuzzy_dedup.unit must be word or char, got {f.unit!r}")
    if not 0 < f.threshold < 1:
        raise ConfigError(f"fuzzy_dedup.threshold must be in (0, 1), got {f.threshold}")
    if (f.bands is None) != (f.rows is None):
        raise ConfigError("fuzzy_dedup.bands and fuzzy_dedup.rows are set together (or both left to the threshold)")
    if f.bands and f.bands * f.rows > f.num_perm:
        raise ConfigError(f"fuzzy_dedup.bands x rows = {f.bands * f.rows} > num_perm = {f.num_perm}")
    if any(r <= 0 for r in cfg.mix.ratios.values()):
        raise ConfigError(f"mix.ratios must be positive, got {cfg.mix.ratios}")
    if cfg.mix.by not in ("docs", "chars", "tokens"):
        raise ConfigError(f"mix.by must be docs, chars or tokens, got {cfg.mix.by!r}")
    has_tok = "tokenizer" in inputs or cfg.tokens.tokenizer_path
    if (cfg.pack.enabled or cfg.mix.by == "tokens") and not has_tok:
        raise ConfigError("pack.enabled and mix.by=tokens need a tokenizer: inputs.tokenizer=RUN or "
                          "tokens.tokenizer_path=DIR")


def _inputs(run, cfg: Config) -> list[InputSpec]:
    specs = list(cfg.read)
    if cfg.source == "builtin" and not specs:
        # the builtin corpus is materialised as JSONL inside the run, so the run is reproducible
        tmp = tempfile.mkdtemp()
        with open(os.path.join(tmp, "builtin.jsonl"), "w") as f:
            for rec in corpus.builtin_records(cfg):
                f.write(json.dumps(rec) + "\n")
        specs.append(InputSpec(path=run.upload(os.path.join(tmp, "builtin.jsonl"), "raw/builtin.jsonl")))
    elif cfg.source != "builtin":
        specs.append(InputSpec(path=cfg.source))
    return specs


def _operators(cfg: Config) -> list[tuple[str, object]]:
    """(funnel name, map_batches callable) in pipeline order; a filter's drop reasons start with its name."""
    ops: list[tuple[str, object]] = [("normalize", Normalize(cfg.normalize))]
    ops += [(f.name, ApplyFilters([f])) for f in build_filters(cfg)]
    for spec, make in ((cfg.language, LanguageFilter), (cfg.gopher, GopherQuality), (cfg.c4, C4Quality),
                       (cfg.repetition, RepetitionFilter)):
        if spec.enabled:
            f = make(spec)
            ops.append((f.name, ApplyFilters([f])))
    if cfg.pii.enabled:
        ops.append(("pii", RedactPii(cfg.pii)))
    return ops


class Keys:
    """Last per-document operator: graph node name, exact hash, paragraph hashes, MinHash signature, sizes."""

    def __init__(self, cfg: Config):
        self.fuzzy, self.exact = cfg.fuzzy_dedup, cfg.exact_dedup

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        batch = count_pretokens(batch)
        batch["hash"] = frames.strings(dedup.text_hash(batch["text"]), batch.index)
        batch["node"] = frames.strings(dedup.node_of(batch["id"], batch["uid"], batch["hash"]), batch.index)
        alive = (batch["drop_reason"] == KEEP).to_numpy()
        paras: list[list[int]] = [[] for _ in range(len(batch))]
        if self.exact.enabled and self.exact.paragraphs and alive.any():
            idx = np.flatnonzero(alive)
            for i, h in zip(idx, dedup.batch_paragraph_hashes(batch["text"].to_numpy()[idx],
                                                               self.exact.min_paragraph_chars)):
                paras[i] = h
        batch["para_hashes"] = pd.Series(paras, index=batch.index, dtype=object)
        sig = [b""] * len(batch)
        if self.fuzzy.enabled and alive.any():
            rows = dedup.signatures(list(batch["text"][alive]), self.fuzzy)
            for i, s in zip(np.flatnonzero(alive), rows):
                sig[i] = s.tobytes()
        batch["sig"] = pd.Series(sig, index=batch.index, dtype=object)
        return batch


def _partitions(cfg: Config, n_rows: int) -> int:
    return cfg.shuffle_partitions or int(min(200, max(2, n_rows // 200_000)))


def dedup_graph(docs_uri: str, cfg: Config, parts: int, timings: dict) -> tuple:
    """One groupby over (exact hash | LSH band | paragraph) buckets of the live documents, then connected components.

    Returns (annotation: node -> rep, drop_paras | None, graph facts). Reads key columns only, never the text.
    """
    from ray.data.expressions import col

    f, ex = cfg.fuzzy_dedup, cfg.exact_dedup
    facts: dict = {}
    if not (f.enabled or ex.enabled):
        return None, facts
    bands, rows = 0, 0
    if f.enabled:
        cand = f.candidate_threshold or (max(0.05, f.threshold - 0.15) if f.verify else f.threshold)
        bands, rows = (f.bands, f.rows) if f.bands else dedup.lsh_params(cand, f.num_perm)
        facts.update(lsh_bands=bands, lsh_rows=rows, candidate_threshold=cand)
    t = time.time()
    rows_ds = (ray.data.read_parquet(docs_uri, columns=["node", "hash", "sig", "para_hashes", "drop_reason"])
               .filter(expr=col("drop_reason") == KEEP)
               .map_batches(dedup.bucket_rows, batch_format="pandas", fn_kwargs={
                   "exact": ex.enabled, "paragraphs": ex.enabled and ex.paragraphs, "num_perm": f.num_perm,
                   "bands": bands, "rows": rows})
               .materialize())
    # Almost every bucket holds one document. Whole hash partitions of the bucket rows go to pyarrow, which finds
    # each shared bucket's smallest node and links every other member to it: an edge (exact, LSH) or a
    # paragraph removal. (Ray Data's own groupby/aggregate run Python per bucket: 648 s on the 1 GB run.)
    n_bucket_rows = rows_ds.count()
    facts["bucket_rows"] = n_bucket_rows
    links = dedup.grouped(rows_ds, lambda t: t["bucket"].to_numpy(), max(parts, -(-n_bucket_rows // 1_000_000)),
                          dedup.shared_bucket_links).materialize()
    facts["links"] = links.count()
    facts["links_s"] = round(time.time() - t, 2)
    edges = links.filter(expr=col("kind") == dedup.EXACT).select_columns(["a", "b"])
    lsh = links.filter(expr=col("kind") == dedup.LSH).select_columns(["a", "b"])
    t1 = time.time()
    if f.enabled and f.verify:
        lsh, more = verified(lsh, docs_uri, f, parts)
        facts.update(more)
    edges = edges.union(lsh).materialize()
    facts["edges"] = edges.count()
    facts["verify_s"] = round(time.time() - t1, 2)
    t1 = time.time()
    dup_map, rounds, local = dedup.connected_components(edges, f.max_rounds, parts, f.local_max_edges)
    dup_map = dup_map.materialize()
    facts.update(cc_rounds=rounds, cc_finished_locally=local, duplicates=dup_map.count(),
                 components_s=round(time.time() - t1, 2))
    timings["dedup_graph_s"] = round(time.time() - t, 2)
    para = links.filter(expr=col("kind") == dedup.PARAGRAPH)
    facts["paragraph_removals"] = para.count()
    if not facts["duplicates"] and not facts["paragraph_removals"]:
        return None, facts

    def as_rows(kind):
        def fn(b: pd.DataFrame) -> pd.DataFrame:
            if kind == "dup":
                return pd.DataFrame({"node": b["node"], "rep": b["rep"], "para": np.zeros(len(b), np.int64),
                                     "is_para": np.zeros(len(b), bool)})
            return pd.DataFrame({"node": b["b"], "rep": pd.Series([""] * len(b), dtype=object),
                                 "para": b["bucket"].astype(np.int64), "is_para": np.ones(len(b), bool)})
        return fn

    def collect(t: pa.Table) -> pa.Table:
        """One row per node: its component's representative (or "") and the paragraph buckets to remove."""
        reps = t.filter(pc.invert(t["is_para"])).group_by("node").aggregate([("rep", "max")])
        paras = t.filter(t["is_para"]).group_by("node").aggregate([("para", "distinct")])
        out = reps.to_pandas().merge(paras.to_pandas(), on="node", how="outer")  # arrow joins take no lists
        return pa.table({"node": pa.array(out["node"], pa.string()),
                         "rep": pa.array(out["rep_max"].fillna(""), pa.string()),
                         "drop_paras": pa.array([p if isinstance(p, (list, np.ndarray)) else None
                                                 for p in out["para_distinct"]], pa.list_(pa.int64()))})

    both = (dup_map.map_batches(as_rows("dup"), batch_format="pandas")
            .union(para.map_batches(as_rows("para"), batch_format="pandas")))
    annotation = dedup.grouped(both, lambda t: dedup.node_key(t["node"]), parts, collect).materialize()
    return annotation, facts


def verified(pairs, docs_uri: str, f: dedup.FuzzySpec, parts: int):
    """Distinct candidate pairs whose signatures' Jaccard estimate reaches the threshold.

    Up to `local_max_edges` pairs, the signatures of their documents are fetched with one streaming scan that
    keeps only those nodes (a broadcast join: no shuffle); beyond that, two shuffle joins on the signatures.
    """
    from ray.data.expressions import col

    sigs = (ray.data.read_parquet(docs_uri, columns=["node", "sig", "drop_reason"])
            .filter(expr=col("drop_reason") == KEEP).select_columns(["node", "sig"]))
    facts = {"candidate_links": pairs.count()}  # a pair sharing several bands is listed once per band
    if not facts["candidate_links"]:  # no two documents share a band (few or all distinct): nothing to verify
        facts["candidate_pairs"] = 0
        return pairs, facts
    if facts["candidate_links"] <= f.local_max_edges:
        df = frames.to_pandas(pairs, ["a", "b"]).drop_duplicates()
        facts["candidate_pairs"] = len(df)
        wanted = [ray.put(pd.Index(sorted(set(df["a"]) | set(df["b"]))))]  # a list: Ray Data keeps the ref as is

        def only_wanted(b: pd.DataFrame) -> pd.DataFrame:
            return b[ray.get(wanted[0]).get_indexer(b["node"]) >= 0]

        found = frames.to_pandas(sigs.map_batches(only_wanted, batch_format="pandas"), ["node", "sig"])
        sig = dict(zip(found["node"], found["sig"]))
        df["sig_a"], df["sig_b"] = df["a"].map(sig), df["b"].map(sig)
        return ray.data.from_pandas(df[dedup.estimated_jaccard(df, f.num_perm) >= f.threshold][["a", "b"]]), facts
    pairs = dedup.grouped(pairs, dedup.pair_key, max(parts, -(-facts["candidate_links"] // 1_000_000)),
                          dedup.distinct_pairs).materialize()
    facts["candidate_pairs"] = pairs.count()
    both = (pairs.join(sigs.rename_columns({"node": "a", "sig": "sig_a"}), "inner", parts, on=("a",))
            .join(sigs.rename_columns({"node": "b", "sig": "sig_b"}), "inner", parts, on=("b",)))
    return both.map_batches(lambda b: b[dedup.estimated_jaccard(b, f.num_perm) >= f.threshold][["a", "b"]],
                            batch_format="pandas"), facts


class ApplyDedup:
    """Marks duplicates (exact when the texts' hashes are equal, else fuzzy) and removes repeated paragraphs."""

    def __init__(self, min_paragraph_chars: int, exact: bool):
        self.min_chars, self.exact = min_paragraph_chars, exact

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        batch = batch.copy()
        reasons, details = batch["drop_reason"].to_numpy(dtype=object), batch["drop_detail"].to_numpy(dtype=object)
        texts = batch["text"].to_numpy(dtype=object)
        dup_of = [""] * len(batch)
        reps = batch["rep"] if "rep" in batch else [None] * len(batch)
        paras = batch["drop_paras"] if "drop_paras" in batch else [None] * len(batch)
        removed = np.zeros(len(batch), dtype=np.int64)
        for i, (rep, dp) in enumerate(zip(reps, paras)):
            if reasons[i] != KEEP:
                continue
            if isinstance(rep, str) and rep:  # a left-join miss is None or NaN
                dup_of[i] = dedup.id_of(rep)
                exact = self.exact and dedup.hash_of(rep) == batch["hash"].iat[i]
                reasons[i] = "exact_duplicate" if exact else "fuzzy_duplicate"
                details[i] = f"{'same text as' if exact else 'near-duplicate of'} {dup_of[i]}"
            elif isinstance(dp, (list, np.ndarray)) and len(dp):
                drop = {int(h) for h in dp}
                kept_paras, n = [], 0
                for p in dedup.paragraphs(texts[i]):
                    h = dedup.paragraph_hashes(p, self.min_chars)
                    if len(h) and dedup.paragraph_bucket(int(h[0])) in drop:
                        n += 1
                        continue
                    kept_paras.append(p)
                removed[i] = n
                texts[i] = "\n\n".join(kept_paras)
                if not texts[i].strip():
                    reasons[i], details[i] = "paragraph_dedup.emptied", f"all {n} paragraphs seen in earlier documents"
        for name, values in (("drop_reason", reasons), ("drop_detail", details), ("text", texts),
                             ("duplicate_of", dup_of)):
            batch[name] = frames.strings(values, batch.index)
        batch["paragraphs_removed"] = frames.ints(removed, batch.index)
        batch["chars"] = frames.ints([len(t) for t in texts], batch.index)
        return batch.drop(columns=[c for c in ("rep", "drop_paras", "sig", "para_hashes") if c in batch])


def body(run, inputs, cfg: Config) -> None:
    from ray.data.context import ShuffleStrategy
    from ray.data.expressions import col

    # Pull-based sort shuffle: ~3x less fixed cost per groupby than the hash shuffle's aggregator actors here
    # (measured on the components rounds); it also scales to the terabyte case with spilling.
    ctx = ray.data.DataContext.get_current()
    ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) == 1 and ray.cluster_resources().get("CPU", 0) > (os.cpu_count() or 1):
        # A local cluster advertises more CPUs than cores (Serve needs the slots); Ray Data would run that many
        # tasks at once on 2 cores: each 4x slower, more memory, nothing gained.
        # (+1: readers ask for half a CPU, and Ray Data's budget keeps a reserve per operator; with +0.5 the
        # operators ran one task at a time behind a reading file, measured on the 1 GB run.)
        ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
            cpu=(os.cpu_count() or 1) + 1)
    tok_path = inputs["tokenizer"].uri if "tokenizer" in inputs else cfg.tokens.tokenizer_path
    stats = FunnelStats.remote()
    ops = _operators(cfg)
    docs_uri, annotated_uri = run.uri("work", "docs"), run.uri("work", "annotated")

    # 1. read -> per-document operators -> keys, streamed to Parquet
    with Progress(stats), run.time("operators_s"):
        parts = [read_input(spec, cfg.max_line_bytes, lambda fn: Timed("read", fn, stats)) for spec in _inputs(run, cfg)]
        ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
        for name, fn in ops:
            ds = ds.map_batches(Timed(name, fn, stats), batch_format="pandas")
        # an input without a single record writes no file; the passes below then read a schema and zero rows
        frames.write_parquet(ds.map_batches(Timed("keys", Keys(cfg), stats), batch_format="pandas"), docs_uri,
                             empty=lambda: _empty_schemas(ops, cfg, tok_path)[0])
    op_seconds = ray.get(stats.get.remote())
    n_rows = ray.data.read_parquet(docs_uri, columns=["uid"]).count()
    n_parts = _partitions(cfg, n_rows)

    # 2. duplicate graph and repeated paragraphs (key columns only)
    annotation, graph = dedup_graph(docs_uri, cfg, n_parts, run.manifest.timings)

    # 3. apply them (one join on the node); count tokens
    with run.time("apply_s"):
        ds = ray.data.read_parquet(docs_uri)
        if annotation is not None:
            ds = ds.join(annotation, "left_outer", n_parts, on=("node",))
        ds = ds.map_batches(ApplyDedup(cfg.exact_dedup.min_paragraph_chars, cfg.exact_dedup.enabled), batch_format="pandas")
        if tok_path:
            ds = ds.map_batches(count_tokens, fn_kwargs={"tokenizer_path": tok_path}, batch_format="pandas")
        frames.write_parquet(ds, annotated_uri, empty=lambda: _empty_schemas(ops, cfg, tok_path)[1])
    annotated = ray.data.read_parquet(annotated_uri)
    summary = summarize(annotated, HIST_EDGES)
    n_in = sum(summary["reasons"].values())
    assert n_in == n_rows, f"rows lost between passes: {n_rows} read, {n_in} annotated"

    # 4. mixing, then splits
    mixing = None
    with run.time("write_s"):
        final = annotated
        if cfg.mix.ratios:
            weight = {"docs": "docs", "chars": "chars", "tokens": "tokens"}[cfg.mix.by]
            totals = {s: float(v.get(weight, 0)) for s, v in summary["sources"].items()}
            rates = mix_rates(cfg.mix, totals)
            final = annotated.map_batches(apply_mix, fn_kwargs={"rates": rates, "seed": cfg.mix.seed},
                                          batch_format="pandas").materialize()
            summary = summarize(final, HIST_EDGES)
            achieved = {s: float(v.get(weight, 0)) for s, v in summary["sources"].items()}
            tot = sum(achieved.values()) or 1
            mixing = {"by": cfg.mix.by, "target": cfg.mix.ratios, "rates": rates, "before": totals,
                      "after": achieved, "achieved": {s: round(v / tot, 4) for s, v in achieved.items()},
                      "repeated_rows": sum(v["docs"] for v in summary["sources"].values())
                      - summary["reasons"].get(KEEP, 0)}
        kept = (final.filter(expr=col("drop_reason") == KEEP)
                .map_batches(_with_split, fn_kwargs={"val_percent": cfg.val_percent}, batch_format="pandas")
                .sort(["hash", "node"]).materialize())
        warnings: list[str] = []
        splits = _write_splits(run, kept, cfg, tok_path, warnings)

    reasons = summary["reasons"]
    kept_total = reasons.get(KEEP, 0)
    quarantined = {k: v for k, v in reasons.items() if k.startswith("malformed:")}
    dropped = {k: v for k, v in reasons.items() if k != KEEP and not k.startswith("malformed:")}
    assert n_in == kept_total + sum(dropped.values()) + sum(quarantined.values())
    order = ["read", *[n for n, _ in ops]]
    order += [op for op, on in (("exact_dedup", cfg.exact_dedup.enabled), ("fuzzy_dedup", cfg.fuzzy_dedup.enabled),
                                ("paragraph_dedup", cfg.exact_dedup.enabled and cfg.exact_dedup.paragraphs),
                                ("mixing", bool(cfg.mix.ratios))) if on]
    # the dedup operators share one graph groupby; its time is shown on the first of them
    secs = {**op_seconds, order[len(ops) + 1] if len(order) > len(ops) + 1 else "-": {
        "seconds": run.manifest.timings.get("dedup_graph_s")}}
    stages = funnel(order, reasons, secs, n_in)

    if n_in - kept_total:
        (final.filter(expr=col("drop_reason") != KEEP)
         .select_columns(["id", "source", "text", "raw", "drop_reason", "drop_detail", "duplicate_of"])
         .write_parquet(run.uri("excluded")))
        run.add_artifact("excluded", "excluded", run.uri("excluded"),
                         meta={"dropped": dropped, "quarantined": quarantined})

    per_source = summary["sources"]
    for v in per_source.values():
        if "tokens" in v:
            v["tokens_per_char"] = round(v["tokens"] / max(1, v["chars"]), 4)
    metrics = {
        "docs_in": n_in, "docs_kept": kept_total, "docs_dropped": sum(dropped.values()),
        "docs_quarantined": sum(quarantined.values()), "drop_reasons": dropped, "quarantine_reasons": quarantined,
        "duplicates_removed": dropped.get("exact_duplicate", 0), "fuzzy_duplicates_removed":
            dropped.get("fuzzy_duplicate", 0), "funnel": stages, "dedup_graph": graph, "per_source": per_source,
        "splits": splits["counts"], "kept_chars": sum(v["chars"] for v in per_source.values()),
        "kept_pretokens": sum(v["pretokens"] for v in per_source.values()),
        "pii_replaced": {t: sum(v.get(f"pii_{t}", 0) for v in per_source.values()) for t in cfg.pii.types}
        if cfg.pii.enabled else {},
        "paragraphs_removed": sum(v.get("paragraphs_removed", 0) for v in per_source.values()),
        "task_families": splits["task_families"],
        # what a small (or heavily filtered) corpus could not provide: empty splits, task families not built
        "warnings": warnings,
    }
    if splits.get("tasks_mix"):  # the synthetic tasks' train rows, added to the pre-training text as a source
        metrics["per_source"] = {**per_source, "tasks": splits["tasks_mix"]}
    if mixing:
        metrics["mixing"] = mixing
    if tok_path:
        labels = [f"{lo}-{hi - 1}" if hi < HIST_EDGES[-1] else f">={lo}" for lo, hi in zip(HIST_EDGES, HIST_EDGES[1:])]
        metrics["tokens"] = {"total": sum(v["tokens"] for v in per_source.values()),
                             "tokens_per_char": {s: v["tokens_per_char"] for s, v in per_source.items()},
                             "histogram": dict(zip(labels, summary["hist"]))}
    if splits.get("packed"):
        metrics["packed"] = splits["packed"]
    run.add_artifact("dataset", "dataset", run.uri("data"), meta={"splits": splits["counts"], "source": cfg.source})
    run.log_metrics(metrics)
    for w in warnings:
        console.say(f"curate: warning: {w}")
    _remove(run.uri("work"))


def _with_split(batch: pd.DataFrame, val_percent: float) -> pd.DataFrame:
    batch = batch.copy()
    # a repeated (up-sampled) copy goes to its original's split, so the val split never leaks into train
    split = [split_of(i.split("#rep", 1)[0], val_percent) for i in batch["id"]]
    batch["split"] = frames.strings(split, batch.index)
    return batch


SPLIT_COLUMNS = ["id", "source", "text"]
# the text splits' schema as Ray Data writes it, for a split with no rows (written as one empty file)
SPLIT_SCHEMA = pa.schema([(c, pa.large_string()) for c in SPLIT_COLUMNS])
_TYPES = {"uid": pa.int64(), "chars": pa.int64(), "pretokens": pa.int64(), "tokens": pa.int64(),
          "paragraphs_removed": pa.int64(), "para_hashes": pa.list_(pa.int64()), "sig": pa.binary()}


def _empty_schemas(ops, cfg: Config, tok_path: str | None) -> tuple[pa.Schema, pa.Schema]:
    """Schemas of `work/docs` and `work/annotated`: the real operators run on a frame of no rows. Only used when
    an input holds no record at all (Ray Data then writes no file for the next pass to read)."""
    batch = rows_frame([])
    for _, fn in ops:
        batch = fn(batch)
    docs = Keys(cfg)(batch)
    annotated = ApplyDedup(cfg.exact_dedup.min_paragraph_chars, cfg.exact_dedup.enabled)(docs)
    if tok_path:
        annotated = count_tokens(annotated, tok_path)
    return tuple(frames.with_types(pa.Table.from_pandas(df, preserve_index=False), _TYPES)
                 for df in (docs, annotated))


def _write_splits(run, kept, cfg: Config, tok_path: str | None, warnings: list[str]) -> dict:
    """Every split is written, an empty one as one empty Parquet file with its columns: later stages find each
    split they expect and read zero rows from it rather than a missing path. What is empty goes to `warnings`."""
    cols = SPLIT_COLUMNS

    def rows_of(split):
        return lambda t: t.filter(pc.equal(t["split"], split)).select(cols)

    train = kept.map_batches(rows_of("train"), batch_format="pyarrow")
    val = kept.map_batches(rows_of("val"), batch_format="pyarrow")
    n_kept = kept.count()
    task_rows: list[dict] = []
    if cfg.tasks.enabled:
        texts = [r["text"] for r in kept.select_columns(["text"]).take(cfg.tasks.max_source_docs)]
        task_rows = tasks.make_tasks(texts, seed=cfg.tasks.seed, per_family=cfg.tasks.per_family,
                                     test_percent=cfg.tasks.test_percent)
        if not any(t["family"] == "repeat" for t in task_rows):
            warnings.append(f"tasks: no 'repeat' family: it needs 2+ words (4-8 letters) that occur 5+ times in the "
                            f"kept text, which its {len(texts)} kept document(s) do not have")
        if cfg.tasks.in_pretrain_mix:
            mix = pd.DataFrame([{"id": t["id"], "source": "tasks", "text": tasks.as_text(t)}
                                for t in task_rows if t["split"] == "train"], columns=cols)
            if len(mix):
                train = train.union(ray.data.from_arrow(pa.Table.from_pandas(mix, preserve_index=False)))
            out_mix = {"docs": len(mix), "chars": int(mix["text"].str.len().sum()), "pretokens": None}
    # one file per split while small (later stages read the rows in this order); many files at scale
    counts = {"text_train": train.count(), "text_val": val.count()}
    for ds, name in ((train, "text_train"), (val, "text_val")):
        frames.write_parquet(ds.repartition(1) if counts[name] <= 200_000 else ds, run.uri("data", name),
                             SPLIT_SCHEMA)
    if task_rows:
        tdf = pd.DataFrame(task_rows)
        for split, name in (("train", "tasks_train"), ("test", "tasks_test")):
            part = tdf[tdf["split"] == split]
            frames.write_parquet(ray.data.from_pandas(part).repartition(1), run.uri("data", name),
                                 pa.Table.from_pandas(part, preserve_index=False).schema)
            counts[name] = len(part)
    out = {"counts": counts, "task_families": sorted({t["family"] for t in task_rows})}
    if cfg.tasks.enabled and cfg.tasks.in_pretrain_mix:
        out["tasks_mix"] = out_mix
    if cfg.pack.enabled:
        with run.time("pack_s"):
            out["packed"] = pack_splits(kept, tok_path, cfg.pack, lambda split: run.uri("data", f"packed_{split}"))
            counts.update({f"packed_{s}": v["blocks"] for s, v in out["packed"].items()})
            # what pretrain checks before it uses the blocks instead of packing the text itself
            _write_json(run.uri("data", "packed.json"), {"tokenizer": tok_path, "seq_len": cfg.pack.seq_len,
                                                         "chunk_tokens": cfg.pack.chunk_tokens})
    why = {"text_train": f"{n_kept} documents kept" + (" and no task rows" if cfg.tasks.enabled else ""),
           "text_val": f"none of the {n_kept} kept documents hashed into it at val_percent={cfg.val_percent}",
           **{f"packed_{s}": f"its kept documents are shorter than one block of pack.seq_len={cfg.pack.seq_len} "
                             "tokens" for s in ("train", "val")}}
    warnings += [f"split {name} is empty ({why.get(name, 'no rows')}); it is written with its columns and no rows"
                 for name, n in counts.items() if not n]
    return out


def _write_json(uri: str, obj: dict) -> None:
    import fsspec

    with fsspec.open(uri, "w") as f:
        json.dump(obj, f, indent=1)


def _remove(uri: str) -> None:
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


if __name__ == "__main__":
    import sys

    from raylm.stage import cli_main

    cli_main(sys.modules[__name__])
