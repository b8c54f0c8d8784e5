"""pretrain: a causal LM from a config (or a local checkpoint, for continued pre-training) on Ray Train.

Ray Data tokenizes and packs the curated text into fixed-length blocks; `TorchTrainer` runs the shared loop on
N workers with FSDP2 (or DDP): warmup + cosine LR, train and validation loss per log step, a full HF checkpoint
exported at the end.
"""
from __future__ import annotations

import math
import re

import numpy as np
import ray
from transformers import AutoConfig

from raylm.config import ConfigError, ModelSpec, OptimSpec, ResourcesSpec, TrainStageConfig, TrainSpec
from raylm.data.cache import tokenized
from raylm.data.tokenize import PACK_BATCH_ROWS, pack_text
from raylm.models import architecture, check_architecture, flops_per_token, load_tokenizer, model_config
from raylm.runs import local_path
from raylm.stage import require_paths
from raylm.train.launch import fit, resume_point, train_facts
from raylm.train.steps import logged_metrics

STAGE = "pretrain"
INPUTS = {"dataset": ("dataset",), "tokenizer": ("tokenizer",)}
# Continued pre-training or an annealing run (configs/pretrain/anneal.yaml): start from a model run's weights
# (the same as model.path=its directory, but by run id and in the lineage).
OPTIONAL_INPUTS = {"model": ("model",)}


def model_spec(inputs, cfg) -> ModelSpec:
    if "model" in inputs:
        return cfg.model.model_copy(update={"path": inputs["model"].uri, "preset": None})
    return cfg.model
METRICS = logged_metrics("lm")  # per log step: what a sweep can optimise


class Config(TrainStageConfig):
    # Train on the dataset's packed blocks (curate's pack.enabled: chunked at paragraph/sentence ends, document
    # starts recorded) instead of packing its text here. None: when the dataset has them for this tokenizer and
    # seq_len. Attention across the recorded document starts is masked when `doc_mask` is on.
    use_packed: bool | None = None
    # On curated packed blocks: a token attends only to earlier tokens of its own document (piece), positions
    # restart at 0 at each document start and the first token of a document is not predicted from the previous
    # one (its label is ignored). No effect on blocks packed here (use_packed=false or no curated blocks): those
    # record no document starts and train as one sequence per block.
    doc_mask: bool = True
    model: ModelSpec = ModelSpec()
    optim: OptimSpec = OptimSpec(lr=3e-3, warmup_steps=20)
    train: TrainSpec = TrainSpec(max_steps=200, batch_size=16, seq_len=128, eval_every=25)
    resources: ResourcesSpec = ResourcesSpec()


def packed(uri: str, tok_path: str, seq_len: int, seed: int | None = None):
    """Packed blocks; with a seed (the training split) globally shuffled: curated text arrives grouped by source."""
    def build():
        ds = ray.data.read_parquet(uri).map_batches(pack_text, fn_kwargs={"tokenizer_path": tok_path,
                                                                          "seq_len": seq_len},
                                                    batch_size=PACK_BATCH_ROWS, batch_format="pandas")
        return ds.random_shuffle(seed=seed) if seed is not None else ds

    return tokenized(build, {"uri": uri, "tokenizer": tok_path, "seq_len": seq_len, "op": "pack_text", "seed": seed})


def curated_blocks(data: str, tok_path: str, cfg: Config) -> bool:
    """Whether to read the dataset's packed blocks; a clear error when asked for blocks that do not fit."""
    import json

    import fsspec

    fs, path = fsspec.core.url_to_fs(f"{data}/packed.json")
    if cfg.use_packed is False or (not fs.exists(path) and cfg.use_packed is None):
        return False
    if not fs.exists(path):
        raise ConfigError(f"use_packed=true but dataset {data} has no packed blocks (curate with pack.enabled=true)")
    meta = json.loads(fs.cat(path))
    same = meta["seq_len"] == cfg.train.seq_len and meta["tokenizer"].rstrip("/") == tok_path.rstrip("/")
    if not same and cfg.use_packed:
        raise ConfigError(f"use_packed=true: the dataset's blocks are {meta['seq_len']} tokens from tokenizer "
                          f"{meta['tokenizer']}; this run has train.seq_len={cfg.train.seq_len} and {tok_path}")
    return same


def as_lm(batch: dict, doc_mask: bool = True) -> dict:
    """Curated packed blocks (numpy batch: `input_ids`, `doc_starts`) -> LM rows, int64 (B, seq_len) columns.

    With `doc_mask`, as packed-sequence training does: `position_ids` restart at 0 at every document start,
    `segment_ids` number the documents (pieces) of a block 0, 1, ... (`lm_step` masks attention across them),
    and the label of each document's first token after the block's first is -100 (not predicted from the
    previous document's end)."""
    ids = np.stack(batch["input_ids"]).astype(np.int64)
    out = {"input_ids": ids, "labels": ids.copy()}
    if not doc_mask:
        return out
    n, t = ids.shape
    starts = np.zeros((n, t), dtype=bool)
    for row, s in enumerate(batch["doc_starts"]):
        s = np.asarray(s, dtype=np.int64)
        starts[row, s[(s >= 0) & (s < t)]] = True
    starts[:, 0] = True  # a block always opens a segment (curate records 0; the tail of a cut document counts)
    idx = np.arange(t, dtype=np.int64)
    out["segment_ids"] = np.cumsum(starts, axis=1, dtype=np.int64) - 1
    out["position_ids"] = idx - np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
    starts[:, 0] = False
    out["labels"][starts] = -100
    return out


def read_blocks(uri: str, seed: int | None = None, doc_mask: bool = True):
    cols = ["input_ids", "doc_starts"] if doc_mask else ["input_ids"]
    ds = ray.data.read_parquet(uri, columns=cols).map_batches(as_lm, fn_kwargs={"doc_mask": doc_mask},
                                                              batch_format="numpy")
    return (ds.random_shuffle(seed=seed) if seed is not None else ds).materialize()


def docs_per_block(blocks) -> float:
    """Mean number of documents (pieces) per block of `read_blocks(..., doc_mask=True)`."""
    return float(blocks.map_batches(lambda b: {"n": b["segment_ids"][:, -1] + 1}, batch_format="numpy").mean("n"))


def check(inputs, cfg: Config) -> None:
    require_paths(STAGE, inputs["dataset"].uri, {"train split": "text_train", "val split": "text_val"})
    spec = model_spec(inputs, cfg)
    where = "inputs.model" if "model" in inputs else "model.path" if spec.path else "model.overrides"
    try:  # transformers validates some shapes itself (its own exception types): one clear error either way
        arch = model_config(spec, vocab_size=1)
    except Exception as exc:  # noqa: BLE001
        reason = re.sub(r"^\s*\w+Error:\s*", "", str(exc).strip().splitlines()[-1])
        raise ConfigError(f"{where}: {reason}") from None
    check_architecture(arch, where)
    if spec.path and len(load_tokenizer(inputs["tokenizer"].uri)) > arch.vocab_size:
        raise ConfigError(f"{where}: the model has {arch.vocab_size} embedding rows but tokenizer "
                          f"{inputs['tokenizer'].run_id} has {len(load_tokenizer(inputs['tokenizer'].uri))} tokens")
    curated_blocks(inputs["dataset"].uri, inputs["tokenizer"].uri, cfg)


def body(run, inputs, cfg: Config) -> None:
    data, tok_path = inputs["dataset"].uri, inputs["tokenizer"].uri
    use_blocks = curated_blocks(data, tok_path, cfg)
    with run.time("tokenize_s"):
        if use_blocks:
            train = read_blocks(f"{data}/packed_train", cfg.train.seed, cfg.doc_mask)
            val = read_blocks(f"{data}/packed_val", doc_mask=cfg.doc_mask)
        else:
            train = packed(f"{data}/text_train", tok_path, cfg.train.seq_len, cfg.train.seed)
            val = packed(f"{data}/text_val", tok_path, cfg.train.seq_len)
    job = {"objective": "lm", "loss": "causal_lm", "tokenizer_path": tok_path,
           "model": model_spec(inputs, cfg).model_dump(), "optim": cfg.optim.model_dump(),
           "train": cfg.train.model_dump()}
    with run.time("train_s"):
        out = fit(job, {"train": train, "val": val}, cfg.resources, run.uri("train"), run.id,
                  resume_from=resume_point(run, cfg.resume_from))
    run.log_metrics(train_facts(out, cfg))
    model_uri = f"{out['checkpoint']}/model"
    model_cfg = AutoConfig.from_pretrained(local_path(model_uri))  # the exported config: no second model load
    arch, n_params = architecture(model_cfg), out["metrics"]["params"]
    run.add_artifact("model", "model", model_uri, meta={"architecture": arch, "params": n_params})
    run.log_history(out["history"])
    first, last = out["history"][0], out["history"][-1]
    run.log_metrics({
        "architecture": arch, "params": n_params, "train_blocks": train.count(), "curated_blocks": use_blocks,
        "doc_mask": use_blocks and cfg.doc_mask,
        "docs_per_block": round(docs_per_block(train), 3) if use_blocks and cfg.doc_mask else None,
        "dataset_tokens": train.count() * cfg.train.seq_len, "tokens_seen": last["tokens_seen"],
        "epochs": round(last["tokens_seen"] / max(1, train.count() *
                                                                                      cfg.train.seq_len), 2),
        "flops_per_token": flops_per_token(model_cfg, cfg.train.seq_len),
        "total_flops": flops_per_token(model_cfg, cfg.train.seq_len) * last["tokens_seen"],
        "initial_loss": first["loss"], "final_loss": last["loss"],
        "initial_val_loss": first.get("val_loss"), "final_val_loss": last.get("val_loss"),
        "final_val_ppl": round(math.exp(last["val_loss"]), 3) if "val_loss" in last else None,
        "train_s": out["metrics"].get("train_s"), "mean_tokens_per_s": round(
            last["tokens_seen"] / max(out["metrics"].get("train_s", 1), 1e-9)),
        "devices": f"{cfg.resources.num_workers}x {'GPU' if cfg.resources.use_gpu else 'CPU'} "
                   f"({cfg.resources.strategy})",
    })


if __name__ == "__main__":
    import sys

    from raylm.stage import cli_main

    cli_main(sys.modules[__name__])
