"""Tokenization as Ray Data `map_batches` operators (callable classes: the tokenizer loads once per actor).

- `pack_text`: documents -> fixed-length blocks for causal-LM pre-training (HF `group_texts` per batch).
- `ChatExamples`: prompt/answer -> ChatML tokens with assistant-only labels (prompt tokens masked).
- `PreferencePairs`: prompt/chosen/rejected -> two such sequences per row.
Fixed lengths let `iter_torch_batches` stack rows without a collate function.
"""
from __future__ import annotations

import functools

import numpy as np
import pandas as pd

from raylm.losses import IGNORE
from raylm.models import load_tokenizer

# Rows per `map_batches` call for packing: fewer partial blocks dropped at batch ends than with 256; the same
# throughput within noise on 2 cores (benchmarks/RESULTS.md).
PACK_BATCH_ROWS = 1024


@functools.lru_cache(maxsize=4)
def cached_tokenizer(path: str):
    """One tokenizer per worker process. Ray Data map *tasks* reuse their worker processes, so this loads once per
    process; an actor pool paid ~5 s per stage to start processes and import transformers (benchmarks/RESULTS.md)."""
    return load_tokenizer(path)


def pack_text(batch: pd.DataFrame, tokenizer_path: str, seq_len: int) -> dict:
    tok = cached_tokenizer(tokenizer_path)
    ids: list[int] = []
    for enc in tok(list(batch["text"]), add_special_tokens=False)["input_ids"]:
        ids.extend(enc + [tok.eos_token_id])
    n = len(ids) // seq_len
    blocks = np.asarray(ids[: n * seq_len], dtype=np.int64).reshape(n, seq_len)
    return {"input_ids": blocks, "labels": blocks.copy()}


def chat_tokens(tok, prompt: str, answer: str, max_len: int) -> tuple[list[int], list[int]]:
    """ChatML tokens of a one-turn exchange and labels that keep only the answer and its end-of-turn token."""
    msgs = [{"role": "user", "content": prompt}]
    prefix = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": answer}], tokenize=False)
    p_ids = tok(prefix, add_special_tokens=False)["input_ids"]
    f_ids = tok(full, add_special_tokens=False)["input_ids"]
    if f_ids[: len(p_ids)] != p_ids:  # templates that re-tokenize across the boundary: fall back to concatenation
        f_ids = p_ids + tok(full[len(prefix):], add_special_tokens=False)["input_ids"]
    labels = [IGNORE] * len(p_ids) + f_ids[len(p_ids):]
    # keep the end-of-turn token but drop the trailing newline after it from the loss
    if labels and tok.decode([f_ids[-1]]).strip() == "":
        labels[-1] = IGNORE
    return f_ids[:max_len], labels[:max_len]


def _pad(seqs: list[list[int]], value: int, max_len: int) -> np.ndarray:
    out = np.full((len(seqs), max_len), value, dtype=np.int64)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out


class ChatExamples:
    def __init__(self, tokenizer_path: str, max_len: int):
        self.tok = load_tokenizer(tokenizer_path)
        self.max_len = max_len

    def __call__(self, batch: pd.DataFrame) -> dict:
        ids, labels = zip(*(chat_tokens(self.tok, p, a, self.max_len)
                            for p, a in zip(batch["prompt"], batch["answer"])))
        return {"input_ids": _pad(ids, self.tok.pad_token_id, self.max_len),
                "labels": _pad(labels, IGNORE, self.max_len),
                "attention_mask": _pad([[1] * len(s) for s in ids], 0, self.max_len)}


class PreferencePairs:
    def __init__(self, tokenizer_path: str, max_len: int):
        self.chat = ChatExamples(tokenizer_path, max_len)

    def __call__(self, batch: pd.DataFrame) -> dict:
        chosen = self.chat(pd.DataFrame({"prompt": batch["prompt"], "answer": batch["answer"]}))
        rejected = self.chat(pd.DataFrame({"prompt": batch["prompt"], "answer": batch["wrong"]}))
        return {**{f"chosen_{k}": v for k, v in chosen.items()}, **{f"rejected_{k}": v for k, v in rejected.items()}}
