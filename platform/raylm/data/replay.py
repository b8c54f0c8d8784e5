"""Replay: general-text blocks mixed into a fine-tuning dataset so the model keeps what pre-training taught it.

Seed 004 mixes domain:general data 7:3 in fine-tuning; without it the demo's SFT model's general-text perplexity
rose from ~145 to 5.8k-8.6k. The replay rows are pre-training blocks (every token learned) of the same length as
the fine-tuning rows, drawn with a seed from a split of the stage's dataset and shuffled in; `ratio` is their share
of the training rows (0.3 = 7:3).
"""
from __future__ import annotations

import numpy as np
import ray

from raylm.data.cache import tokenized
from raylm.data.tokenize import PACK_BATCH_ROWS, pack_text


def general_blocks(uri: str, tok_path: str, seq_len: int, seed: int):
    """Text packed into `seq_len`-token blocks with labels and a full attention mask (the chat rows' columns)."""
    def with_mask(batch: dict) -> dict:
        ids = np.stack(batch["input_ids"]).astype(np.int64)
        return {"input_ids": ids, "labels": np.stack(batch["labels"]).astype(np.int64),
                "attention_mask": np.ones_like(ids)}

    def build():
        return (ray.data.read_parquet(uri)
                .map_batches(pack_text, fn_kwargs={"tokenizer_path": tok_path, "seq_len": seq_len},
                             batch_size=PACK_BATCH_ROWS, batch_format="pandas")
                .map_batches(with_mask, batch_format="numpy").random_shuffle(seed=seed))

    return tokenized(build, {"uri": uri, "tokenizer": tok_path, "seq_len": seq_len, "op": "replay_blocks",
                             "seed": seed})


def replay_rows(n_domain: int, ratio: float) -> int:
    """Replay rows so that they are `ratio` of all rows: n / (n_domain + n) = ratio."""
    return round(n_domain * ratio / (1 - ratio))


def mix_replay(train, blocks, ratio: float, seed: int):
    """`train` plus `ratio` of replay blocks (all there are, if fewer), shuffled; and the facts to record."""
    n_domain, available = train.count(), blocks.count()
    n = min(replay_rows(n_domain, ratio), available)
    mixed = train.union(blocks.limit(n)).random_shuffle(seed=seed).materialize()
    return mixed, {"replay_rows": n, "replay_available": available, "domain_rows": n_domain,
                   "replay_ratio_achieved": round(n / max(1, n + n_domain), 4)}
