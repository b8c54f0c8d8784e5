"""expand_vocab: add domain tokens to a trained model's tokenizer and grow its embeddings (seed 002).

Domain text comes from a curate run (`split`, optionally only some `source`s) read with Ray Data. The new tokens are
the configured `tokens` and/or the top-k mined words (`raylm.vocab.mine_domain_tokens`: the words the tokenizer
splits most, by tokens saved). One Ray task adds them, resizes the embeddings and initialises each new row
(input, and output when untied) from the mean of its old pieces' rows, then measures on held-out text (`val_split`):
tokens per character on domain and general text before and after, and the model's loss on domain text before
expansion and after it with mean-init and with random-init rows. The expanded model (with its tokenizer) is the
`model` artifact, loadable by every later stage (sft, dpo, evaluate, serve; pretrain with `model.path` and the
`tokenizer` artifact).
"""
from __future__ import annotations

import tempfile
from typing import Literal

import pandas as pd
import ray

from raylm.config import ConfigError, Section, StageConfig
from raylm.runs import RunError
from raylm.stage import require_paths

STAGE = "expand_vocab"
INPUTS = {"model": ("model",), "dataset": ("dataset",)}


class MineSpec(Section):
    k: int = 32  # at most this many mined words (plus their leading-space variants, see raylm.vocab)
    min_freq: int = 5
    max_docs: int = 20000  # domain documents read for mining


class Config(StageConfig):
    tokens: list[str] = []  # explicit tokens to add
    mine: MineSpec | None = MineSpec()  # null: add only `tokens`
    split: str = "text_train"  # domain text to mine from
    val_split: str = "text_val"  # held-out text for the measurements
    source: list[str] | None = None  # domain = these sources (curate's `source` column); null = all text
    space_variants: bool = True  # also add " word" for a bare "word" (ByteLevel/Metaspace tokenizers)
    init: Literal["mean", "random"] = "mean"  # the new rows of the exported model
    eval_docs: int = 1000  # held-out documents per side (domain, general) for compression
    loss_docs: int = 64  # held-out domain documents for the loss comparison; 0 = skip it
    seq_len: int = 128  # loss windows
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    num_gpus: float = 0


def check(inputs, cfg: Config) -> None:
    if not cfg.tokens and cfg.mine is None:
        raise ConfigError("expand_vocab: nothing to add; set tokens=[...] and/or mine={k, min_freq}")
    if cfg.mine is not None and (cfg.mine.k < 1 or cfg.mine.min_freq < 1):
        raise ConfigError(f"expand_vocab: mine.k and mine.min_freq must be >= 1, got {cfg.mine.model_dump()}")
    require_paths(STAGE, inputs["dataset"].uri, {"split": cfg.split, "val_split": cfg.val_split})
    require_paths(STAGE, inputs["model"].uri, {"model config": "config.json", "tokenizer": "tokenizer_config.json"})


def _texts(uri: str, sources: list[str] | None, limit: int, domain: bool = True) -> list[str]:
    """Up to `limit` texts of a split: the domain rows (or, domain=False, the rows of every other source)."""
    def pick(df: pd.DataFrame) -> pd.DataFrame:
        keep = df["source"].isin(sources) if sources else pd.Series(True, index=df.index)
        return df[keep if domain else ~keep][["text"]]

    if not sources and not domain:
        return []
    ds = ray.data.read_parquet(uri, columns=["source", "text"]).map_batches(pick, batch_format="pandas")
    return [r["text"] for r in ds.limit(limit).take_all() if r["text"]]


@ray.remote(num_cpus=1)
def _expand(model_uri: str, texts: dict, cfg: dict, out_dirs: dict) -> dict:
    import torch

    from raylm import vocab as V
    from raylm.models import load_model, load_tokenizer

    device = "cuda" if cfg["num_gpus"] > 0 and torch.cuda.is_available() else "cpu"
    tok, model = load_tokenizer(model_uri), load_model(model_uri, cfg["dtype"]).to(device).eval()
    domain, general, loss_texts = texts["domain"], texts["general"], texts["domain"][: cfg["loss_docs"]]
    mined = V.mine_candidates(texts["mine"], tok, cfg["mine"]["k"], cfg["mine"]["min_freq"]) if cfg["mine"] else []
    before = {"domain": V.compression(domain, tok), "general": V.compression(general, tok) if general else None,
              "loss": V.text_loss(model, tok, loss_texts, cfg["seq_len"]) if loss_texts else None}
    info = V.expand(model, tok, [*cfg["tokens"], *(m["token"] for m in mined)], cfg["space_variants"], "mean")
    after = {"domain": V.compression(domain, tok), "general": V.compression(general, tok) if general else None}
    loss = {"mean": V.text_loss(model, tok, loss_texts, cfg["seq_len"]) if loss_texts else None}
    if loss_texts:  # the same model with random new rows (rows are independent: re-initialise only them)
        V.init_rows(model, info, "random")
        loss["random"] = V.text_loss(model, tok, loss_texts, cfg["seq_len"])
    V.init_rows(model, info, cfg["init"])
    model.save_pretrained(out_dirs["model"])
    tok.save_pretrained(out_dirs["model"])
    tok.save_pretrained(out_dirs["tokenizer"])
    return {"mined": mined, "info": {k: v for k, v in info.items() if k != "pieces"}, "before": before,
            "after": after, "loss": loss}


def _gain(before: float | None, after: float | None) -> float | None:
    """Relative cut in tokens per character (0.1 = 10% fewer tokens for the same text)."""
    return round(1 - after / before, 4) if before else None


def body(run, inputs, cfg: Config) -> None:
    model_uri, data = inputs["model"].uri, inputs["dataset"].uri
    with run.time("read_s"):
        texts = {"mine": _texts(f"{data}/{cfg.split}", cfg.source, cfg.mine.max_docs) if cfg.mine else [],
                 "domain": _texts(f"{data}/{cfg.val_split}", cfg.source, cfg.eval_docs),
                 "general": _texts(f"{data}/{cfg.val_split}", cfg.source, cfg.eval_docs, domain=False)}
    for key, split in (("mine", cfg.split), ("domain", cfg.val_split)):
        if not texts[key] and (key == "domain" or cfg.mine):
            raise RunError(f"expand_vocab: no text of source(s) {cfg.source} in {data}/{split}")
    local = {name: run.local_dir(name) or tempfile.mkdtemp() for name in ("model", "tokenizer")}
    with run.time("expand_s"):
        out = ray.get(_expand.options(num_gpus=cfg.num_gpus).remote(model_uri, texts, cfg.model_dump(), local))
    uris = {name: run.upload(path, name) for name, path in local.items()}
    info, before, after, loss = out["info"], out["before"], out["after"], out["loss"]
    meta = {"vocab_size": info["vocab_after"], "added_tokens": len(info["added"]), "init": cfg.init}
    run.add_artifact("model", "model", uris["model"], meta=meta)
    run.add_artifact("tokenizer", "tokenizer", uris["tokenizer"], meta={"vocab_size": info["vocab_after"]})

    def r(x):
        return round(x, 4) if x is not None else None

    metrics = {
        "tokens_added": info["added"], "n_tokens_added": len(info["added"]), "tokens_skipped": info["skipped"],
        "tokens_mined": out["mined"], "token_pieces": info["piece_tokens"], "init": cfg.init,
        "vocab_size_before": info["vocab_before"], "vocab_size_after": info["vocab_after"],
        "embedding_rows_before": info["rows_before"], "embedding_rows_after": info["rows_after"],
        "tied_embeddings": info["tied"], "mine_docs": len(texts["mine"]),
        "heldout_domain_docs": len(texts["domain"]), "heldout_general_docs": len(texts["general"]),
        "tokens_per_char_domain_before": r(before["domain"]), "tokens_per_char_domain_after": r(after["domain"]),
        "tokens_per_char_general_before": r(before["general"]), "tokens_per_char_general_after": r(after["general"]),
        "compression_gain_domain": _gain(before["domain"], after["domain"]),
        "compression_gain_general": _gain(before["general"], after["general"]),
    }
    if before["loss"]:
        for name, x in (("before", before["loss"]), ("mean_init", loss["mean"]), ("random_init", loss["random"])):
            metrics[f"domain_loss_{name}"] = x["loss"]  # per token: its tokens differ before/after
            metrics[f"domain_nll_per_char_{name}"] = x["nll_per_char"]  # comparable across tokenizers
        metrics["loss_docs"] = len(texts["domain"][: cfg.loss_docs])
    run.log_metrics(metrics)


if __name__ == "__main__":
    import sys

    from raylm.stage import cli_main

    cli_main(sys.modules[__name__])
