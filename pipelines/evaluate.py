"""evaluate: score a model (and, optionally, every checkpoint it descends from) and compare.

Two kinds of scores, either or both in one run:
- **lm-eval tasks** (`tasks:`): lm-evaluation-harness tasks, bundled ones by name or the user's YAML by path, run on
  vLLM engines that are Ray actors (`raylm.harness`). The model and each `baselines` run answer the same documents;
  the manifest keeps per task and metric the value, stderr and n (`metrics.tasks`), each baseline's scores, and the
  difference to each baseline with a paired-bootstrap confidence interval (`metrics.deltas`); every scored sample
  is in the `eval` artifact (`samples/<run>/<task>.jsonl`).
  With a `dataset` input the bundled `raylm_lifecycle` tasks (`raylm_heldout`, `raylm_exact_match`,
  `raylm_preference`: the lineage metrics below as lm-eval tasks) read it (the harness passes its URI as the
  tasks' metadata `dataset`).
- **Lineage metrics** (with a `dataset` input, the lifecycle's own; `lineage_metrics: false` skips them):
  perplexity on held-out text, exact match per task family, preference accuracy, and example answers side by side,
  for the model and (`lineage`) each earlier checkpoint (one Ray task each); `deltas` records each checkpoint's
  change over the previous one.
"""
from __future__ import annotations

import json
import os
import tempfile

import pyarrow.parquet as pq
import ray

from typing import Any

from pydantic import Field

from raylm.config import ConfigError, StageConfig
from raylm.runs import RunError, RunStore
from raylm.stage import require_paths

STAGE = "evaluate"
LIFECYCLE_TASKS = {"raylm_lifecycle", "raylm_heldout", "raylm_exact_match", "raylm_preference"}
INPUTS = {"model": ("model",)}
OPTIONAL_INPUTS = {"dataset": ("dataset",)}


class Config(StageConfig):
    lineage: bool = True  # also score every earlier checkpoint the model descends from
    lineage_metrics: bool = True  # with a dataset input: the PyTorch lineage metrics (false: it only feeds tasks)
    max_tasks: int = 200
    max_text_blocks: int = 128
    seq_len: int = 128
    max_new_tokens: int = 8
    examples: int = 8
    num_gpus: float = 0  # per checkpoint being scored; >0 on GPU clusters (the model then runs on CUDA)
    # lm-eval tasks: names (bundled or lm-eval's own) or YAML paths
    tasks: list[str] = []
    baselines: list[str] = []  # model runs (run id or latest/STAGE) scored on the same tasks and compared
    limit: int | None = Field(None, gt=0)  # documents per task (None: all)
    num_fewshot: int | None = Field(None, ge=0)  # None: each task's own
    apply_chat_template: bool = False  # render prompts with the model's chat template (instruct models)
    engines: int = Field(1, ge=1)  # vLLM engine actors per model, spread over the cluster (data parallel)
    cpus_per_engine: float = Field(1, gt=0)  # Ray CPUs per engine; on CPU nodes also its thread count
    tensor_parallel: int = Field(1, ge=1)  # GPUs per engine (with num_gpus > 0)
    engine: dict[str, Any] = {}  # vLLM engine arguments (max_model_len, kv_cache_memory_bytes, dtype, ...)
    batch_size: int = Field(256, ge=1)  # requests per engine call
    bootstrap_resamples: int = Field(2000, ge=100)  # paired bootstrap of the deltas to baselines
    stderr_bootstrap_iters: int = Field(1000, ge=0)  # lm-eval's bootstrap for metrics without a closed-form stderr
    seed: int = 0


def check(inputs, cfg: Config) -> None:
    if not cfg.tasks and ("dataset" not in inputs or not cfg.lineage_metrics):
        raise ConfigError("evaluate: nothing to score; name lm-eval `tasks` or give inputs.dataset (lineage metrics)")
    if "dataset" in inputs:
        require_paths(STAGE, inputs["dataset"].uri, {"held-out text": "text_val", "held-out tasks": "tasks_test"})
    if cfg.tasks:
        from raylm.harness.run import check_tasks, task_names

        check_tasks(cfg.tasks)
        lifecycle = sorted(set(task_names(cfg.tasks)[0]) & LIFECYCLE_TASKS)
        if lifecycle and "dataset" not in inputs:
            raise ConfigError(f"evaluate: tasks {', '.join(lifecycle)} read the lifecycle's held-out data; give "
                              "inputs.dataset (a curate or taskset run, e.g. latest/curate)")
    if cfg.baselines and not cfg.tasks:
        raise ConfigError("evaluate: baselines are compared on lm-eval `tasks`; name some")
    for ref in cfg.baselines:  # a baseline that is not a model run fails here, before the run exists
        if RunStore(cfg.root).resolve("baseline", ref, ("model",)).run_id == inputs["model"].run_id:
            raise ConfigError(f"evaluate: baselines: {ref} is the model being evaluated")


@ray.remote(num_cpus=1)
def score(model_uri: str, data_uri: str, cfg: dict) -> dict:
    import torch

    from raylm import eval as E
    from raylm.models import load_model, load_tokenizer

    torch.set_num_threads(1)
    device = "cuda" if cfg["num_gpus"] > 0 and torch.cuda.is_available() else "cpu"
    model, tok = load_model(model_uri).to(device).eval(), load_tokenizer(model_uri)
    texts = pq.read_table(f"{data_uri}/text_val", columns=["text"]).column("text").to_pylist()
    rows = pq.read_table(f"{data_uri}/tasks_test").to_pylist()[: cfg["max_tasks"]]
    ppl = E.perplexity(model, tok, texts, cfg["seq_len"], cfg["max_text_blocks"])
    em = E.exact_match(model, tok, rows, cfg["max_new_tokens"])
    pref = E.preference_accuracy(model, tok, rows)
    return {"perplexity": ppl["perplexity"], "val_loss": ppl["loss"], "exact_match": em["exact_match"],
            "exact_match_per_family": em["per_family"], **pref, "predictions": em["predictions"],
            "n_tasks": len(rows), "eval_tokens": ppl["tokens"]}


def checkpoints(store: RunStore, run_id: str, whole_lineage: bool) -> list[tuple[str, str, str]]:
    """(run_id, stage, model uri) for the model and, optionally, every model artifact it descends from."""
    runs = store.lineage(run_id) if whole_lineage else [store.load(run_id)]
    out = []
    for m in runs:
        try:
            out.append((m.run_id, m.stage, m.output(kind="model").uri))
        except RunError:
            continue
    return out


def body(run, inputs, cfg: Config) -> None:
    local = run.local_dir("eval") or tempfile.mkdtemp()
    if cfg.tasks:
        score_tasks(run, inputs["model"], cfg, local, inputs["dataset"].uri if "dataset" in inputs else None)
    if "dataset" in inputs and cfg.lineage_metrics:
        score_lineage(run, inputs, cfg, local)
    run.add_artifact("eval", "eval", run.upload(local, "eval"), meta={"tasks": cfg.tasks})


def score_tasks(run, model, cfg: Config, local: str, dataset: str | None = None) -> None:
    """The model and each baseline on the lm-eval tasks, one after the other on fresh engines; then the deltas.
    `dataset`: the dataset input's URI, the metadata `dataset` of the raylm_lifecycle tasks."""
    from raylm.harness.compare import task_deltas
    from raylm.harness.report import task_table

    baselines = [run.store.resolve("baseline", ref, ("model",)) for ref in cfg.baselines]
    scored: dict[str, dict] = {}
    for ref in [model, *baselines]:
        with run.time(f"tasks_s/{ref.run_id}"):
            scored[ref.run_id] = evaluate_model(ref.uri, cfg,
                                                metadata={"dataset": dataset} if dataset else None)
        write_samples(os.path.join(local, "samples", ref.run_id), scored[ref.run_id])
    mine = scored[model.run_id]
    deltas = [{"baseline": b.run_id, **row}
              for b in baselines
              for row in task_deltas(samples_of(mine), samples_of(scored[b.run_id]), cfg.bootstrap_resamples, cfg.seed)]
    table = task_table(model.run_id, mine, {b.run_id: scored[b.run_id] for b in baselines}, deltas)
    with open(os.path.join(local, "tasks.md"), "w") as f:
        f.write(table + "\n")
    run.log_metrics({"tasks": summary(mine), "model_run": model.run_id,
                     "baselines": {b.run_id: summary(scored[b.run_id]) for b in baselines},
                     "task_deltas": deltas, "task_table": table})


def evaluate_model(model_uri: str, cfg: Config, metadata: dict | None = None) -> dict:
    from raylm.harness.backend import RayVLLM, start_engines
    from raylm.harness.run import evaluate

    engines = start_engines(model_uri, cfg.engines, cfg.engine, cfg.num_gpus, cfg.tensor_parallel,
                            cpus=cfg.cpus_per_engine)
    lm = RayVLLM(model_uri, engines=engines, batch_size=cfg.batch_size)
    try:
        return evaluate(lm, cfg.tasks, num_fewshot=cfg.num_fewshot, limit=cfg.limit,
                        bootstrap_iters=cfg.stderr_bootstrap_iters, apply_chat_template=cfg.apply_chat_template,
                        seed=cfg.seed, metadata=metadata)
    finally:
        lm.shutdown()


def samples_of(results: dict) -> dict[str, list[dict]]:
    return {task: r.samples for task, r in results.items()}


def summary(results: dict) -> dict:
    return {task: {"metrics": r.metrics, "n": r.n, "num_fewshot": r.num_fewshot} for task, r in results.items()}


def write_samples(folder: str, results: dict) -> None:
    os.makedirs(folder, exist_ok=True)
    for task, r in results.items():
        with open(os.path.join(folder, f"{task}.jsonl"), "w") as f:
            for s in r.samples:
                f.write(json.dumps(s, default=str) + "\n")


def score_lineage(run, inputs, cfg: Config, local: str) -> None:
    data = inputs["dataset"].uri
    models = checkpoints(run.store, inputs["model"].run_id, cfg.lineage)
    with run.time("score_s"):
        scorer = score.options(num_gpus=cfg.num_gpus) if cfg.num_gpus else score
        results = ray.get([scorer.remote(uri, data, cfg.model_dump()) for _, _, uri in models])
    rows = pq.read_table(f"{data}/tasks_test").to_pylist()[: cfg.max_tasks]
    per_model, examples = {}, []
    for (rid, stage, _), res in zip(models, results):
        per_model[rid] = {"stage": stage, **{k: v for k, v in res.items() if k != "predictions"}}
    for i, t in enumerate(rows[: cfg.examples]):
        examples.append({"prompt": t["prompt"], "answer": t["answer"],
                         **{f"{stage} ({rid})": res["predictions"][i] for (rid, stage, _), res in zip(models, results)}})
    deltas = []
    for (prev_id, prev_stage, _), (cur_id, cur_stage, _) in zip(models, models[1:]):
        a, b = per_model[prev_id], per_model[cur_id]
        deltas.append({"from": prev_stage, "to": cur_stage, "from_run": prev_id, "to_run": cur_id,
                       **{k: round(b[k] - a[k], 4) for k in ("exact_match", "preference_accuracy", "perplexity")}})
    with open(os.path.join(local, "results.json"), "w") as f:
        json.dump({"models": per_model, "examples": examples, "deltas": deltas,
                   "predictions": {rid: res["predictions"] for (rid, _, _), res in zip(models, results)}}, f, indent=1)
    final = per_model[models[-1][0]]
    run.log_metrics({"models": per_model, "deltas": deltas, "examples": examples,
                     "final_exact_match": final["exact_match"], "final_perplexity": final["perplexity"],
                     "final_preference_accuracy": final["preference_accuracy"]})


if __name__ == "__main__":
    import sys

    from raylm.stage import cli_main

    cli_main(sys.modules[__name__])
