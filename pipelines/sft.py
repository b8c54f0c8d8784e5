"""sft: supervised fine-tuning on instruction data, assistant-only loss (Ray Train).

The method is `lora.method` (raylm.train.peft_menu: lora, dora, qlora, ia3, prefix, prompt, bitfit, full; `lora:
null` is full fine-tuning too). Rows are prompt/answer, alpaca, sharegpt or OpenAI messages (`data_format`, detected
per row by default), rendered with the tokenizer's chat template; only assistant turns (and their end-of-turn
tokens) are learned. Saves the adapter (PEFT methods) and a model for serving and later stages: merged where the
method allows, else the base with `merged: false` (prefix/prompt tuning: serve with the adapter).
`inputs.adapter=RUN_ID` continues that run's adapter (incremental LoRA) instead of starting a fresh one.
"""
from __future__ import annotations

from typing import Literal

import ray

from raylm.config import ConfigError, LoraSpec, OptimSpec, ReplaySpec, ResourcesSpec, TrainSpec, TrainStageConfig
from raylm.data.cache import tokenized
from raylm.data.replay import general_blocks, mix_replay
from raylm.data.tokenize import ChatExamples, map_tokens
from raylm.stage import require_paths
from raylm.train.launch import fit, resume_point, train_facts
from raylm.train.peft_menu import check_peft
from raylm.train.steps import logged_metrics

STAGE = "sft"
INPUTS = {"model": ("model",), "dataset": ("dataset",)}
# incremental LoRA: an earlier run's adapter, trained on this run's `model`, is trained further instead of a new one
OPTIONAL_INPUTS = {"adapter": ("adapter",)}
METRICS = logged_metrics("lm")  # per log step: what a sweep can optimise


class Config(TrainStageConfig):
    lora: LoraSpec | None = LoraSpec()  # the method (lora.method); null = full fine-tuning
    optim: OptimSpec = OptimSpec(lr=2e-3, warmup_steps=10)
    train: TrainSpec = TrainSpec(max_steps=120, batch_size=16, seq_len=48, eval_every=20)
    resources: ResourcesSpec = ResourcesSpec()
    train_split: str = "tasks_train"
    val_split: str = "tasks_test"
    # instruction rows: prompt/answer, alpaca, sharegpt or openai (messages); auto: per row, from its columns
    data_format: Literal["auto", "prompt", "alpaca", "sharegpt", "openai"] = "auto"
    # General-text blocks mixed into training against forgetting (seed 004's 7:3: replay.ratio=0.3)
    replay: ReplaySpec | None = None


def chat_dataset(uri: str, tok_path: str, max_len: int, op=ChatExamples, seed: int | None = None,
                 fmt: str | None = None):
    """Tokenized examples; with a seed (training splits) globally shuffled, since tasks arrive grouped by family.
    `fmt`: ChatExamples' explicit instruction format (None: detected per row)."""
    args = (tok_path, max_len) if fmt is None else (tok_path, max_len, fmt)

    def build():
        ds = map_tokens(ray.data.read_parquet(uri), op, *args)
        return ds.random_shuffle(seed=seed) if seed is not None else ds

    key = {"uri": uri, "tokenizer": tok_path, "max_len": max_len, "op": op.__name__, "seed": seed}
    return tokenized(build, key if fmt is None else {**key, "format": fmt})  # unchanged keys for existing caches


def lora_meta(cfg) -> dict:
    return cfg.lora.model_dump() if cfg.lora else {"full_finetune": True}


def method(cfg) -> str:
    return cfg.lora.method if cfg.lora else "full"


def peft_job(cfg) -> dict | None:
    """The job's `lora` entry: None when nothing is wrapped (full fine-tuning), so the trainer's LoRA-only paths
    (adapter-disabled reference, adapter export) stay off."""
    return cfg.lora.model_dump() if cfg.lora and cfg.lora.method != "full" else None


def save_outputs(run, out: dict, cfg) -> None:
    """The model (what later stages and serving load: merged where the method allows), the adapter for PEFT
    methods, and the curves. `merged: false` (prefix/prompt tuning): the model is the base; serve the adapter."""
    m = out["metrics"]
    merged = m.get("merged", True)
    meta = {"merged_from_lora": bool(cfg.lora) and merged, "method": method(cfg), "merged": merged,
            **({"merge_note": m["merge_note"]} if "merge_note" in m else {})}
    run.add_artifact("model", "model", f"{out['checkpoint']}/model", meta=meta)
    if method(cfg) not in ("bitfit", "full"):
        run.add_artifact("adapter", "adapter", f"{out['checkpoint']}/adapter", meta=lora_meta(cfg))
    run.log_history(out["history"])


def check(inputs, cfg: Config) -> None:
    require_paths(STAGE, inputs["dataset"].uri, {"train_split": cfg.train_split, "val_split": cfg.val_split,
                                                 **({"replay.split": cfg.replay.split} if cfg.replay else {})})
    adapter = inputs.get("adapter")
    if adapter is not None and adapter.run_id == inputs["model"].run_id:
        raise ConfigError(f"inputs.adapter: run {adapter.run_id}'s model already has this adapter merged in; "
                          "give as inputs.model the base that run was trained on (its own inputs.model)")
    check_peft(cfg.lora, inputs["model"].uri, cfg.resources, adapter=adapter.uri if adapter else None)


def body(run, inputs, cfg: Config) -> None:
    model_uri, data = inputs["model"].uri, inputs["dataset"].uri
    fmt = None if cfg.data_format == "auto" else cfg.data_format
    train = chat_dataset(f"{data}/{cfg.train_split}", model_uri, cfg.train.seq_len, seed=cfg.train.seed, fmt=fmt)
    val = chat_dataset(f"{data}/{cfg.val_split}", model_uri, cfg.train.seq_len, fmt=fmt)
    adapter = inputs.get("adapter")
    if cfg.replay:
        blocks = general_blocks(f"{data}/{cfg.replay.split}", model_uri, cfg.train.seq_len, cfg.train.seed)
        train, replay_facts = mix_replay(train, blocks, cfg.replay.ratio, cfg.train.seed)
        run.log_metrics(replay_facts)
    job = {"objective": "lm", "loss": "sft", "tokenizer_path": model_uri,
           "model": {"path": model_uri, "preset": None}, "lora": peft_job(cfg),
           "optim": cfg.optim.model_dump(), "train": cfg.train.model_dump(),
           **({"init_adapter": adapter.uri} if adapter else {})}
    with run.time("train_s"):
        out = fit(job, {"train": train, "val": val}, cfg.resources, run.uri("train"), run.id,
                  resume_from=resume_point(run, cfg.resume_from))
    run.log_metrics(train_facts(out, cfg))
    save_outputs(run, out, cfg)
    first, last = out["history"][0], out["history"][-1]
    n_train = train.count()
    run.log_metrics({
        "method": method(cfg), **{f"lora_{k}": v for k, v in lora_meta(cfg).items()},
        "merged": out["metrics"].get("merged", True), "merge_note": out["metrics"].get("merge_note"),
        "incremental_from": f"{adapter.run_id}:{adapter.artifact}" if adapter else None,
        "examples": n_train, "epochs": round(cfg.train.max_steps * cfg.train.batch_size *
                                             cfg.resources.num_workers / max(1, n_train), 2),
        "initial_loss": first["loss"], "final_loss": last["loss"],
        "initial_val_loss": first.get("val_loss"), "final_val_loss": last.get("val_loss"),
        "trainable_params": out["metrics"].get("trainable_params"), "params": out["metrics"].get("params"),
        "adapter_params": out["metrics"].get("adapter_params"), "train_s": out["metrics"].get("train_s"),
    })


if __name__ == "__main__":
    import sys

    from raylm.stage import cli_main

    cli_main(sys.modules[__name__])
