"""reward: a Bradley-Terry reward model (scalar sequence-classification head) on preference pairs, on Ray Train.

The head sits on a base or SFT checkpoint's body and reads the last token of `prompt + answer`; it is trained with
LoRA (the head itself in full) or full fine-tuning so the correct answer (chosen) scores above the plausible wrong
one (rejected). After training, the exported model scores the held-out pairs on the driver: pairwise accuracy, per
task family, and the two reward distributions (the report draws them as a histogram).
"""
from __future__ import annotations

import fsspec
import pandas as pd
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray
from pydantic import field_validator, model_validator

from raylm.config import LoraSpec, OptimSpec, ResourcesSpec, TrainStageConfig, TrainSpec
from raylm.data.tokenize import PreferencePairs, map_tokens
from raylm.losses import REWARD_LOSSES
from raylm.runs import RunError
from raylm.stage import require_paths
from raylm.train.launch import fit, resume_point, train_facts
from raylm.train.steps import logged_metrics
from pipelines.sft import lora_meta

STAGE = "reward"
INPUTS = {"model": ("model",), "dataset": ("dataset",)}
METRICS = logged_metrics("reward")  # per log step: what a sweep can optimise
PAIR_COLUMNS = {"prompt": "the prompt", "answer": "the chosen answer", "wrong": "the rejected answer"}
MAX_LISTED = 500  # reward values kept in the manifest per side (the scores artifact has them all)


class Config(TrainStageConfig):
    loss: str = "bradley_terry"
    margin: float = 0.0  # required gap r_chosen - r_rejected (Llama 2's margin term)
    center_coef: float = 0.0  # weight of (r_c + r_r)^2, keeps rewards near zero (TRL center_rewards_coefficient)
    lora: LoraSpec | None = LoraSpec()  # null = full fine-tuning; with LoRA the score head is trained in full

    @model_validator(mode="after")
    def _lora_methods(self):
        if self.lora and self.lora.method not in ("lora", "dora"):  # the ones tested with a sequence-classification head
            raise ValueError(f"lora.method={self.lora.method!r}: the reward model trains with lora, dora or in full "
                             "(lora: null)")
        return self
    optim: OptimSpec = OptimSpec(lr=1e-3, warmup_steps=10)
    train: TrainSpec = TrainSpec(max_steps=100, batch_size=16, seq_len=48, eval_every=20)
    resources: ResourcesSpec = ResourcesSpec()
    train_split: str = "tasks_train"
    val_split: str = "tasks_test"
    heldout_max: int = 500  # held-out pairs scored on the driver after training

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, v: str) -> str:
        if v not in REWARD_LOSSES:
            raise ValueError(f"unknown reward loss {v!r}; choose one of {sorted(REWARD_LOSSES)}")
        return v


def split_columns(uri: str) -> list[str]:
    """Column names of a Parquet split (schema only, no rows read)."""
    fs, path = fsspec.core.url_to_fs(uri)
    return pads.dataset(path, format="parquet", filesystem=fs).schema.names


def check(inputs, cfg: Config) -> None:
    data = inputs["dataset"].uri
    require_paths(STAGE, data, {"train_split": cfg.train_split, "val_split": cfg.val_split})
    for key, split in (("train_split", cfg.train_split), ("val_split", cfg.val_split)):
        cols = split_columns(f"{data}/{split}")
        missing = [c for c in PAIR_COLUMNS if c not in cols]
        if missing:
            what = ", ".join(f"{c!r} ({PAIR_COLUMNS[c]})" for c in missing)
            raise RunError(f"{STAGE}: {key}={split!r} has no column {what}, which preference pairs need; "
                           f"it has: {', '.join(cols)}")


def has_rejected(batch: pd.DataFrame) -> pd.DataFrame:
    """Rows with a non-empty rejected answer; the others cannot form a pair."""
    wrong = batch["wrong"]
    return batch[wrong.notna() & (wrong.astype(str).str.strip() != "")]


def pair_dataset(uri: str, tok_path: str, max_len: int, seed: int | None = None):
    """Tokenized pairs (a training split globally shuffled, as in sft/dpo) and the rows skipped for having no
    rejected answer. The filter runs before tokenizing, so a null never reaches the chat template."""
    raw = ray.data.read_parquet(uri)
    ds = map_tokens(raw.map_batches(has_rejected, batch_format="pandas"), PreferencePairs, tok_path, max_len)
    ds = (ds.random_shuffle(seed=seed) if seed is not None else ds).materialize()
    return ds, raw.count() - ds.count()


def heldout_rows(uri: str, limit: int) -> list[dict]:
    rows = pq.read_table(uri).to_pylist()
    return [r for r in rows if r.get("wrong") is not None and str(r["wrong"]).strip()][:limit]


def score_heldout(model_uri: str, rows: list[dict], max_len: int) -> dict:
    """The exported reward model on the held-out pairs (plain torch on the driver's CPU: a few hundred pairs)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from raylm.eval import reward_pair_scores
    from raylm.models import load_tokenizer
    from raylm.runs import local_path

    model = AutoModelForSequenceClassification.from_pretrained(local_path(model_uri), dtype=torch.float32).eval()
    return reward_pair_scores(model, load_tokenizer(model_uri), rows, max_len)


def body(run, inputs, cfg: Config) -> None:
    model_uri, data = inputs["model"].uri, inputs["dataset"].uri
    train, skipped_train = pair_dataset(f"{data}/{cfg.train_split}", model_uri, cfg.train.seq_len,
                                        seed=cfg.train.seed)
    val, skipped_val = pair_dataset(f"{data}/{cfg.val_split}", model_uri, cfg.train.seq_len)
    n_train, n_val = train.count(), val.count()
    need = cfg.train.batch_size * cfg.resources.num_workers
    if n_train < need:  # each worker needs one full batch, or its batch iterator would never yield
        raise RunError(f"{STAGE}: {n_train} usable pairs in {cfg.train_split!r} ({skipped_train} skipped for a "
                       f"missing rejected answer); one step needs batch_size x num_workers = {need}")
    job = {"objective": "reward", "task": "seq_cls", "loss": cfg.loss, "margin": cfg.margin,
           "center_coef": cfg.center_coef, "tokenizer_path": model_uri, "model": {"path": model_uri, "preset": None},
           "lora": cfg.lora.model_dump() if cfg.lora else None,
           "optim": cfg.optim.model_dump(), "train": cfg.train.model_dump()}
    datasets = {"train": train, **({"val": val} if n_val else {})}
    with run.time("train_s"):
        out = fit(job, datasets, cfg.resources, run.uri("train"), run.id,
                  resume_from=resume_point(run, cfg.resume_from))
    run.log_metrics(train_facts(out, cfg))
    model_dir = f"{out['checkpoint']}/model"
    run.add_artifact("reward_model", "reward_model", model_dir, meta={"merged_from_lora": bool(cfg.lora),
                                                                      "loss": cfg.loss})
    run.log_history(out["history"])

    with run.time("score_s"):
        scores = score_heldout(model_dir, heldout_rows(f"{data}/{cfg.val_split}", cfg.heldout_max),
                               cfg.train.seq_len)
    run.store.write_json(f"{run.id}/scores.json", scores)
    run.add_artifact("scores", "eval", run.uri("scores.json"), meta={"pairs": scores["heldout_pairs"]})

    first, last = out["history"][0], out["history"][-1]
    summary = {k: v for k, v in scores.items() if k not in ("pairs", "reward_chosen", "reward_rejected")}
    run.log_metrics({
        "method": "lora" if cfg.lora else "full", **{f"lora_{k}": v for k, v in lora_meta(cfg).items()},
        "base_model": f"{inputs['model'].run_id}:{inputs['model'].artifact}",
        "loss": cfg.loss, "margin": cfg.margin, "center_coef": cfg.center_coef,
        "pairs": n_train, "val_pairs": n_val, "pairs_skipped_missing_rejected": skipped_train + skipped_val,
        "pairs_skipped_missing_rejected_per_split": {cfg.train_split: skipped_train, cfg.val_split: skipped_val},
        "initial_loss": first["loss"], "final_loss": last["loss"], "final_accuracy": last.get("accuracy"),
        "val_accuracy": last.get("val_accuracy"), "val_margin": last.get("val_margin"),
        **summary,
        "reward_chosen": [round(r, 4) for r in scores["reward_chosen"][:MAX_LISTED]],
        "reward_rejected": [round(r, 4) for r in scores["reward_rejected"][:MAX_LISTED]],
        "train_s": out["metrics"].get("train_s"), "trainable_params": out["metrics"].get("trainable_params"),
        "params": out["metrics"].get("params"), "adapter_params": out["metrics"].get("adapter_params"),
    })


if __name__ == "__main__":
    import sys

    from raylm.stage import cli_main

    cli_main(sys.modules[__name__])
