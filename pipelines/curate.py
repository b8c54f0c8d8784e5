"""curate: raw JSONL -> parsed -> quality-filtered -> exact-deduplicated dataset (Ray Data).

Reads the bundled real-text corpus (or user JSONL files with a `text` field), quarantines malformed lines,
drops documents that fail a quality filter or duplicate an earlier one (each with its reason), counts
characters and pre-tokens per source, and writes Parquet splits plus the synthetic instruction tasks.
Counts always add up: in = kept + dropped + quarantined.
"""
from __future__ import annotations

import json
import os
import tempfile

import pandas as pd
import ray

from raylm import corpus, tasks
from raylm.config import Section, StageConfig
from raylm.data.filters import (KEEP, QUARANTINE_PREFIX, ApplyFilters, build_filters, count_pretokens,
                                mark_duplicates, normalized_hash, parse_jsonl, split_of)

STAGE = "curate"
INPUTS: dict = {}


class TasksSpec(Section):
    enabled: bool = True
    per_family: int = 150
    test_percent: int = 15
    seed: int = 0
    in_pretrain_mix: bool = True  # add the train split as plain text to the pre-training data


class Config(StageConfig):
    source: str = "builtin"  # "builtin" or a path/glob of JSONL files ({"id", "source", "text"} per line)
    sources: list[str] = ["pydoc_topics", "stdlib_docstrings", "licenses"]
    max_chars_per_doc: int = 1500
    max_stdlib_files: int = 400
    min_chars: int = 120
    max_chars: int = 20000
    min_alpha_ratio: float = 0.55
    max_repeated_line_fraction: float = 0.3
    val_percent: float = 5.0
    tasks: TasksSpec = TasksSpec()


def _write(df_or_ds, uri: str) -> None:
    ds = ray.data.from_pandas(df_or_ds) if isinstance(df_or_ds, pd.DataFrame) else df_or_ds
    ds.repartition(1).write_parquet(uri)


def body(run, inputs, cfg: Config) -> None:
    # 1. raw input: the builtin corpus is materialised as JSONL inside the run, so the run is reproducible
    if cfg.source == "builtin":
        tmp = tempfile.mkdtemp()
        with open(os.path.join(tmp, "builtin.jsonl"), "w") as f:
            for rec in corpus.builtin_records(cfg):
                f.write(json.dumps(rec) + "\n")
        raw = run.upload(os.path.join(tmp, "builtin.jsonl"), "raw/builtin.jsonl")
    else:
        raw = cfg.source

    # 2. parse -> filter -> dedup -> count (one Ray Data pipeline)
    with run.time("pipeline_s"):
        ds = (ray.data.read_text(raw)
              .map_batches(parse_jsonl, batch_format="pandas")
              .map_batches(ApplyFilters(build_filters(cfg)), batch_format="pandas")
              .map_batches(normalized_hash, batch_format="pandas")
              .groupby("hash").map_groups(mark_duplicates, batch_format="pandas")
              .map_batches(count_pretokens, batch_format="pandas")
              .materialize())
        reasons = {r["drop_reason"]: r["count()"] for r in ds.groupby("drop_reason").count().take_all()}

    n_in = sum(reasons.values())
    kept = reasons.pop(KEEP, 0)
    quarantined = {k: v for k, v in reasons.items() if k.startswith(QUARANTINE_PREFIX)}
    dropped = {k: v for k, v in reasons.items() if not k.startswith(QUARANTINE_PREFIX)}
    assert n_in == kept + sum(dropped.values()) + sum(quarantined.values())

    # 3. kept documents -> train/val split; excluded and quarantined rows keep their reason
    kept_ds = ds.map_batches(lambda b: b[b["drop_reason"] == KEEP], batch_format="pandas")
    # Rows come out of the dedup shuffle in arrival order; sorting makes the written splits (and so every later
    # stage's data order) the same on every run.
    kept_df = kept_ds.to_pandas().sort_values(["hash", "id"], kind="stable").reset_index(drop=True)
    kept_df["split"] = [split_of(i or h, cfg.val_percent) for i, h in zip(kept_df["id"], kept_df["hash"])]
    per_source = (kept_df.groupby("source").agg(docs=("text", "size"), chars=("chars", "sum"),
                                                 pretokens=("pretokens", "sum")).to_dict("index"))
    train_text = kept_df[kept_df["split"] == "train"][["id", "source", "text"]]
    val_text = kept_df[kept_df["split"] == "val"][["id", "source", "text"]]

    task_rows = []
    if cfg.tasks.enabled:
        task_rows = tasks.make_tasks(list(kept_df["text"]), seed=cfg.tasks.seed, per_family=cfg.tasks.per_family,
                                     test_percent=cfg.tasks.test_percent)
        if cfg.tasks.in_pretrain_mix:
            mix = pd.DataFrame([{"id": t["id"], "source": "tasks", "text": tasks.as_text(t)}
                                for t in task_rows if t["split"] == "train"])
            train_text = pd.concat([train_text, mix], ignore_index=True)
            per_source["tasks"] = {"docs": len(mix), "chars": int(mix["text"].str.len().sum()), "pretokens": None}

    _write(train_text, run.uri("data", "text_train"))
    _write(val_text, run.uri("data", "text_val"))
    if task_rows:
        tdf = pd.DataFrame(task_rows)
        _write(tdf[tdf["split"] == "train"], run.uri("data", "tasks_train"))
        _write(tdf[tdf["split"] == "test"], run.uri("data", "tasks_test"))
    excluded = ds.map_batches(lambda b: b[b["drop_reason"] != KEEP][["id", "source", "text", "raw", "drop_reason", "drop_detail"]],
                              batch_format="pandas")
    if n_in - kept:
        _write(excluded, run.uri("excluded"))

    splits = {"text_train": len(train_text), "text_val": len(val_text)}
    if task_rows:
        splits.update(tasks_train=int((tdf["split"] == "train").sum()), tasks_test=int((tdf["split"] == "test").sum()))
    run.add_artifact("dataset", "dataset", run.uri("data"), meta={"splits": splits, "source": cfg.source})
    if n_in - kept:
        run.add_artifact("excluded", "excluded", run.uri("excluded"),
                         meta={"dropped": dropped, "quarantined": quarantined})
    run.log_metrics({
        "docs_in": n_in, "docs_kept": kept, "docs_dropped": sum(dropped.values()),
        "docs_quarantined": sum(quarantined.values()), "drop_reasons": dropped, "quarantine_reasons": quarantined,
        "duplicates_removed": dropped.get("exact_duplicate", 0), "per_source": per_source, "splits": splits,
        "kept_chars": int(kept_df["chars"].sum()), "kept_pretokens": int(kept_df["pretokens"].sum()),
        "task_families": sorted({t["family"] for t in task_rows}),
    })


if __name__ == "__main__":
    import sys

    from raylm.stage import cli_main

    cli_main(sys.modules[__name__])
