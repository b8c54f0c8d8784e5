"""tokenizer: train a byte-level BPE tokenizer on the curated corpus and measure it (Ray task + Ray Data).

Records vocabulary size and compression rate (tokens per character, seed 002) overall and per source, on the
training text and on held-out text. With `path` set, an existing tokenizer (e.g. a Qwen2.5 checkpoint's) is
measured and passed on instead of training a new one.
"""
from __future__ import annotations

import os
import tempfile

import pandas as pd
import pyarrow.parquet as pq
import ray

from raylm.config import ConfigError, StageConfig
from raylm.data.tokenize import cached_tokenizer, map_tokens
from raylm.models import load_tokenizer, train_tokenizer
from raylm.stage import require_paths

STAGE = "tokenizer"
INPUTS = {"dataset": ("dataset",)}


class Config(StageConfig):
    vocab_size: int = 2048
    min_frequency: int = 2
    path: str | None = None  # use this local tokenizer instead of training one


def check(inputs, cfg: Config) -> None:
    require_paths(STAGE, inputs["dataset"].uri, {"split": "text_train", "val split": "text_val"})
    if cfg.path:
        if not os.path.exists(os.path.join(cfg.path, "tokenizer_config.json")):
            raise ConfigError(f"tokenizer: path={cfg.path!r} is not a tokenizer directory "
                              "(no tokenizer_config.json there)")


@ray.remote(num_cpus=1)
def _train(train_uri: str, vocab_size: int, min_frequency: int, out_dir: str) -> int:
    texts = pq.read_table(train_uri, columns=["text"]).column("text").to_pylist()
    tok = train_tokenizer(texts, vocab_size=vocab_size, min_frequency=min_frequency)
    tok.save_pretrained(out_dir)
    return len(tok)


class CountTokens:
    def __init__(self, path: str):
        self.tok = cached_tokenizer(path)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        ids = self.tok(list(batch["text"]), add_special_tokens=False)["input_ids"]
        return pd.DataFrame({"source": batch["source"], "chars": batch["text"].str.len(),
                             "tokens": [len(i) for i in ids]})


def _stats(uri: str, tok_dir: str) -> dict:
    ds = map_tokens(ray.data.read_parquet(uri), CountTokens, tok_dir)
    df = ds.groupby("source").sum(["chars", "tokens"]).to_pandas()
    per = {r["source"]: {"chars": int(r["sum(chars)"]), "tokens": int(r["sum(tokens)"]),
                         "tokens_per_char": round(r["sum(tokens)"] / max(1, r["sum(chars)"]), 4)}
           for r in df.to_dict("records")}
    chars, toks = sum(p["chars"] for p in per.values()), sum(p["tokens"] for p in per.values())
    return {"chars": chars, "tokens": toks, "tokens_per_char": round(toks / max(1, chars), 4), "per_source": per}


def body(run, inputs, cfg: Config) -> None:
    data = inputs["dataset"].uri
    local = run.local_dir("tokenizer") or tempfile.mkdtemp()
    with run.time("train_s"):
        if cfg.path:
            load_tokenizer(cfg.path).save_pretrained(local)
        else:
            ray.get(_train.remote(f"{data}/text_train", cfg.vocab_size, cfg.min_frequency, local))
    uri = run.upload(local, "tokenizer")
    tok = load_tokenizer(local)
    with run.time("measure_s"):  # Ray Data actors load the uploaded tokenizer: they may run on other nodes
        train, val = _stats(f"{data}/text_train", uri), _stats(f"{data}/text_val", uri)
    run.add_artifact("tokenizer", "tokenizer", uri, meta={"vocab_size": len(tok), "trained": not cfg.path})
    run.log_metrics({"vocab_size": len(tok), "special_tokens": tok.all_special_tokens,
                     "train_tokens": train["tokens"], "tokens_per_char_train": train["tokens_per_char"],
                     "tokens_per_char_val": val["tokens_per_char"], "chars_per_token_val":
                     round(1 / max(val["tokens_per_char"], 1e-9), 3),
                     "per_source_train": train["per_source"], "per_source_val": val["per_source"]})


if __name__ == "__main__":
    import sys

    from raylm.stage import cli_main

    cli_main(sys.modules[__name__])
