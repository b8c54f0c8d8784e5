"""sft: supervised fine-tuning with LoRA (PEFT) on instruction data, assistant-only loss (Ray Train).

Each example is rendered with the tokenizer's chat template; prompt tokens get label -100 so only the answer
(and its end-of-turn token) is learned. Saves the LoRA adapter and a merged model for serving and later stages.
"""
from __future__ import annotations

import ray

from raylm.config import LoraSpec, OptimSpec, ResourcesSpec, StageConfig, TrainSpec
from raylm.data.cache import tokenized
from raylm.data.tokenize import ChatExamples
from raylm.stage import require_paths
from raylm.train.launch import fit
from raylm.train.steps import logged_metrics

STAGE = "sft"
INPUTS = {"model": ("model",), "dataset": ("dataset",)}
METRICS = logged_metrics("lm")  # per log step: what a sweep can optimise


class Config(StageConfig):
    lora: LoraSpec | None = LoraSpec()  # null = full fine-tuning
    optim: OptimSpec = OptimSpec(lr=2e-3, warmup_steps=10)
    train: TrainSpec = TrainSpec(max_steps=120, batch_size=16, seq_len=48, eval_every=20)
    resources: ResourcesSpec = ResourcesSpec()
    train_split: str = "tasks_train"
    val_split: str = "tasks_test"


def chat_dataset(uri: str, tok_path: str, max_len: int, op=ChatExamples, seed: int | None = None):
    """Tokenized examples; with a seed (training splits) globally shuffled, since tasks arrive grouped by family."""
    def build():
        ds = ray.data.read_parquet(uri).map_batches(op, fn_constructor_args=(tok_path, max_len),
                                                    compute=ray.data.ActorPoolStrategy(size=1), batch_format="pandas")
        return ds.random_shuffle(seed=seed) if seed is not None else ds

    return tokenized(build, {"uri": uri, "tokenizer": tok_path, "max_len": max_len, "op": op.__name__, "seed": seed})


def lora_meta(cfg) -> dict:
    return cfg.lora.model_dump() if cfg.lora else {"full_finetune": True}


def save_outputs(run, out: dict, cfg) -> None:
    """The merged model (what later stages and serving load), the LoRA adapter if any, and the curves."""
    run.add_artifact("model", "model", f"{out['checkpoint']}/model", meta={"merged_from_lora": bool(cfg.lora)})
    if cfg.lora:
        run.add_artifact("adapter", "adapter", f"{out['checkpoint']}/adapter", meta=lora_meta(cfg))
    run.log_history(out["history"])


def check(inputs, cfg: Config) -> None:
    require_paths(STAGE, inputs["dataset"].uri, {"train_split": cfg.train_split, "val_split": cfg.val_split})


def body(run, inputs, cfg: Config) -> None:
    model_uri, data = inputs["model"].uri, inputs["dataset"].uri
    train = chat_dataset(f"{data}/{cfg.train_split}", model_uri, cfg.train.seq_len, seed=cfg.train.seed)
    val = chat_dataset(f"{data}/{cfg.val_split}", model_uri, cfg.train.seq_len)
    job = {"objective": "lm", "loss": "sft", "tokenizer_path": model_uri,
           "model": {"path": model_uri, "preset": None}, "lora": cfg.lora.model_dump() if cfg.lora else None,
           "optim": cfg.optim.model_dump(), "train": cfg.train.model_dump()}
    with run.time("train_s"):
        out = fit(job, {"train": train, "val": val}, cfg.resources, run.uri("train"), run.id)
    save_outputs(run, out, cfg)
    first, last = out["history"][0], out["history"][-1]
    n_train = train.count()
    run.log_metrics({
        "method": "lora" if cfg.lora else "full", **{f"lora_{k}": v for k, v in lora_meta(cfg).items()},
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
