"""evaluate: score every checkpoint in a model's lineage (one Ray task each) and compare them.

For each model (e.g. pretrain -> sft -> dpo): perplexity on held-out text, exact-match on held-out tasks (per
family), preference accuracy on held-out pairs, and side-by-side example answers (before/after, seed 000).
`deltas` records each checkpoint's change over the previous one.
"""
from __future__ import annotations

import json
import os
import tempfile

import pyarrow.parquet as pq
import ray

from raylm.config import StageConfig
from raylm.runs import RunError, RunStore
from raylm.stage import require_paths

STAGE = "evaluate"
INPUTS = {"model": ("model",), "dataset": ("dataset",)}


class Config(StageConfig):
    lineage: bool = True  # also score every earlier checkpoint the model descends from
    max_tasks: int = 200
    max_text_blocks: int = 128
    seq_len: int = 128
    max_new_tokens: int = 8
    examples: int = 8
    num_gpus: float = 0  # per checkpoint being scored; >0 on GPU clusters (the model then runs on CUDA)


def check(inputs, cfg: Config) -> None:
    require_paths(STAGE, inputs["dataset"].uri, {"held-out text": "text_val", "held-out tasks": "tasks_test"})


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
    local = run.local_dir("eval") or tempfile.mkdtemp()
    with open(os.path.join(local, "results.json"), "w") as f:
        json.dump({"models": per_model, "examples": examples, "deltas": deltas,
                   "predictions": {rid: res["predictions"] for (rid, _, _), res in zip(models, results)}}, f, indent=1)
    run.add_artifact("eval", "eval", run.upload(local, "eval"), meta={"models": [m[0] for m in models]})
    final = per_model[models[-1][0]]
    run.log_metrics({"models": per_model, "deltas": deltas, "examples": examples,
                     "final_exact_match": final["exact_match"], "final_perplexity": final["perplexity"],
                     "final_preference_accuracy": final["preference_accuracy"]})


if __name__ == "__main__":
    import sys

    from raylm.stage import cli_main

    cli_main(sys.modules[__name__])
