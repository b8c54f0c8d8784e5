"""taskset: a dataset run of generated tasks with checkable answers, for fine-tuning an existing model.

The lifecycle of an imported model (`import` -> sft -> rl -> ...) needs no corpus curation, only instruction data
whose answers can be checked: this stage writes it, deterministically, as the same splits curate writes, so sft
(`tasks_train`, `tasks_test`), dpo and reward (the `wrong` column), rl (prompts + `answer` for the verifiable
rewards) and quantize/evaluate (`text_train`, `text_val`) take it unchanged.

`generator: arithmetic` (`raylm.tasks.arithmetic_tasks`): "What is 47 plus 38? Answer with the number only." over
0..`max_operand`, plus and minus. The held-out part of the problem space is fixed by a hash of each prompt, the
same partition the bundled lm-eval task `raylm_arithmetic` (platform/raylm/harness/tasks/raylm_arithmetic) draws
its problems from, so no training row is ever an evaluation problem (checked here: `overlap_with_eval: 0`).
`text_sources` (the builtin corpus parts) give the plain-text splits used for perplexity and calibration.

The work is small and runs in the driver (a few thousand rows).
"""
from __future__ import annotations

import os
import tempfile
from typing import Literal

from pydantic import Field

from raylm.config import ConfigError, StageConfig

STAGE = "taskset"
INPUTS: dict = {}


class Config(StageConfig):
    generator: Literal["arithmetic"] = "arithmetic"
    n_train: int = Field(4000, ge=1)  # rows of tasks_train (at most the train part of the space)
    n_test: int = Field(200, ge=1)  # rows of tasks_test (held-out: sft's validation loss, rl's held-out reward)
    seed: int = 0
    max_operand: int = Field(99, ge=1)
    ops: list[str] = ["plus", "minus"]
    test_percent: int = Field(10, ge=1, le=50)  # the held-out share of the problem space
    text_sources: list[str] = ["pydoc_topics"]  # builtin corpus parts for text_train / text_val ([]: none)
    max_chars_per_doc: int = 1500
    max_stdlib_files: int = 100
    text_val_percent: float = Field(10.0, gt=0, lt=100)


def check(inputs, cfg: Config) -> None:
    from raylm import corpus, tasks

    bad = [op for op in cfg.ops if op not in tasks.ARITHMETIC_OPS]
    if bad or not cfg.ops:
        raise ConfigError(f"{STAGE}: ops={cfg.ops}: choose one or more of {sorted(tasks.ARITHMETIC_OPS)}")
    bad = [s for s in cfg.text_sources if s not in corpus.SOURCES]
    if bad:
        raise ConfigError(f"{STAGE}: unknown text_sources {bad}; choose from {sorted(corpus.SOURCES)}")


def rows(cfg: Config) -> dict[str, list[dict]]:
    from raylm import tasks

    kw = dict(max_operand=cfg.max_operand, ops=tuple(cfg.ops), test_percent=cfg.test_percent)
    train = tasks.arithmetic_tasks("train", cfg.n_train, cfg.seed, **kw)
    test = tasks.arithmetic_tasks("test", cfg.n_test, cfg.seed + 1, **kw)
    return {"tasks_train": train, "tasks_test": test}


def text_rows(cfg: Config) -> dict[str, list[dict]]:
    import hashlib

    from raylm import corpus

    from types import SimpleNamespace

    spec = SimpleNamespace(sources=cfg.text_sources, max_chars_per_doc=cfg.max_chars_per_doc,
                           max_stdlib_files=cfg.max_stdlib_files)
    docs = corpus.builtin_records(spec) if cfg.text_sources else []
    val = [d for d in docs if int(hashlib.sha1(d["id"].encode()).hexdigest(), 16) % 1000 < cfg.text_val_percent * 10]
    val_ids = {d["id"] for d in val}
    return {"text_train": [d for d in docs if d["id"] not in val_ids], "text_val": val}


def body(run, inputs, cfg: Config) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raylm import tasks

    local = run.local_dir("data") or tempfile.mkdtemp(prefix="raylm-taskset-")
    splits = {**rows(cfg), **text_rows(cfg)}
    eval_prompts = {r["prompt"] for r in tasks.arithmetic_eval_problems()}  # the bundled lm-eval task's
    overlap = sum(r["prompt"] in eval_prompts for r in splits["tasks_train"])
    if overlap:  # cannot happen by construction (a hash partition); refuse rather than train on the test set
        raise ConfigError(f"{STAGE}: {overlap} training problems are in the `raylm_arithmetic` evaluation set")
    counts = {}
    for name, data in splits.items():
        os.makedirs(os.path.join(local, name), exist_ok=True)
        cols = ["id", "family", "prompt", "answer", "wrong", "split"] if name.startswith("tasks") else \
            ["id", "source", "text"]
        table = pa.table({c: [r[c] for r in data] for c in cols},
                         schema=pa.schema([(c, pa.string()) for c in cols]))
        pq.write_table(table, os.path.join(local, name, "part-0.parquet"))
        counts[name] = len(data)
    uri = run.upload(local, "data")
    run.add_artifact("dataset", "dataset", uri, meta={"splits": counts, "generator": cfg.generator})
    fams = {}
    for r in splits["tasks_train"]:
        fams[r["family"]] = fams.get(r["family"], 0) + 1
    run.log_metrics({"generator": cfg.generator, "splits": counts, "train_families": fams,
                     "overlap_with_eval": overlap, "examples": splits["tasks_train"][:5],
                     "text_chars": sum(len(r["text"]) for r in splits["text_train"])})


if __name__ == "__main__":
    import sys

    from raylm.stage import cli_main

    cli_main(sys.modules[__name__])
