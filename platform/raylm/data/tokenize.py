"""Tokenization as Ray Data `map_batches` operators, run as map *tasks* (`map_tokens`); the tokenizer loads once per
worker process (`cached_tokenizer`).

- `pack_text`: documents -> fixed-length blocks for causal-LM pre-training (HF `group_texts` per batch).
- `ChatExamples`: instruction data -> chat tokens with assistant-only labels (everything else masked), from
  prompt/answer rows or the alpaca, sharegpt and OpenAI-messages formats (multi-turn).
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


def run_op(batch: pd.DataFrame, op: type, args: tuple):
    """One batch through a tokenizing operator class. Built per batch, which is cheap (its tokenizer comes from
    `cached_tokenizer`), so Ray Data runs it as a task on pooled, already-warm worker processes. An actor pool
    (`ActorPoolStrategy(size=1)`) started a fresh process importing transformers for every dataset: 7-16 s each on
    2 cores, three times per sft run (measured 2026-12-07)."""
    return op(*args)(batch)


def map_tokens(ds, op: type, *args, **kwargs):
    """`ds.map_batches` with the operator class `op(*args)` as a task (see `run_op`)."""
    return ds.map_batches(run_op, fn_kwargs={"op": op, "args": args}, batch_format="pandas", **kwargs)


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


# Each instruction-data format and the columns that identify it (checked in this order, per row).
FORMAT_COLUMNS = {"openai": ("messages",), "sharegpt": ("conversations",), "alpaca": ("instruction", "output"),
                  "prompt": ("prompt", "answer")}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
ROLES = ("system", "user", "assistant")


def _present(v) -> bool:
    return v is not None and not (isinstance(v, float) and v != v)  # pandas stores a missing value as None or NaN


def detect_format(row: dict) -> str:
    """The format a row is in, from the columns that hold a value; a clear error naming them when none fits."""
    have = sorted(k for k, v in row.items() if _present(v))
    for fmt, cols in FORMAT_COLUMNS.items():
        if all(c in have for c in cols):
            return fmt
    raise ValueError(f"row in no known instruction format: it has columns {have}; expected messages (OpenAI), "
                     "conversations (sharegpt), instruction + output (alpaca) or prompt + answer")


def _text(v) -> str:
    if isinstance(v, str):
        return v
    if hasattr(v, "__iter__") and not isinstance(v, dict):  # OpenAI content parts: [{"type": "text", "text": ..}]
        return "".join(p["text"] for p in v if isinstance(p, dict) and p.get("type") == "text")
    raise ValueError(f"message content must be text, got {type(v).__name__}: {v!r}")


def to_messages(row: dict, fmt: str) -> list[dict]:
    """A row of `fmt` as OpenAI-style messages [{role, content}]."""
    if fmt == "alpaca":
        user = row["instruction"] + (f"\n\n{row['input']}" if _present(row.get("input")) and row["input"] else "")
        system = [{"role": "system", "content": row["system"]}] if _present(row.get("system")) and row["system"] else []
        return [*system, {"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
    if fmt == "prompt":
        return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["answer"]}]
    key, role_key, text_key = (("conversations", "from", "value") if fmt == "sharegpt" else
                               ("messages", "role", "content"))
    roles = SHAREGPT_ROLES if fmt == "sharegpt" else dict(zip(ROLES, ROLES))
    out = []
    for turn in row[key]:
        if not isinstance(turn, dict) or turn.get(role_key) not in roles or text_key not in turn:
            raise ValueError(f"{fmt} turn {turn!r}: expected {{{role_key!r}: one of {sorted(roles)}, "
                             f"{text_key!r}: text}}")
        out.append({"role": roles[turn[role_key]], "content": _text(turn[text_key])})
    return out


def render(tok, msgs: list[dict], add_generation_prompt: bool = False) -> str:
    """The tokenizer's chat template; without one a plain `Role: text` layout with EOS ending each answer."""
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tokenize=False)
    text = "".join(f"{m['role'].capitalize()}: {m['content']}{tok.eos_token if m['role'] == 'assistant' else ''}\n\n"
                   for m in msgs)
    return text + ("Assistant: " if add_generation_prompt else "")


def conversation_tokens(tok, msgs: list[dict], max_len: int) -> tuple[list[int], list[int]]:
    """Tokens of a (multi-turn) conversation and labels that keep only the assistant turns (each with its
    end-of-turn token, not the whitespace after it). Rendered turn by turn, so every span is exact; a template
    whose rendering of a conversation's start is not a prefix of the whole cannot be masked this way."""
    if not any(m["role"] == "assistant" for m in msgs):
        raise ValueError(f"conversation without an assistant turn (nothing to learn): {msgs!r}")
    ids: list[int] = []
    labels: list[int] = []
    text = ""
    for i, m in enumerate(msgs):
        cuts = [(render(tok, msgs[:i], True), False)] if m["role"] == "assistant" else []
        for upto, learn in cuts + [(render(tok, msgs[: i + 1]), m["role"] == "assistant")]:
            if not upto.startswith(text):
                raise ValueError("the chat template does not render a conversation turn by turn; "
                                 "its assistant turns cannot be located for loss masking")
            seg = tok(upto[len(text):], add_special_tokens=False)["input_ids"]
            seg_labels = list(seg) if learn else [IGNORE] * len(seg)
            if learn and seg and tok.decode([seg[-1]]).strip() == "":
                seg_labels[-1] = IGNORE
            ids += seg
            labels += seg_labels
            text = upto
    return ids[:max_len], labels[:max_len]


class ChatExamples:
    """Instruction rows -> fixed-length input_ids / labels / attention_mask. `format`: one of FORMAT_COLUMNS, or
    None to detect it per row from its columns. prompt/answer rows go through `chat_tokens` (one turn)."""

    def __init__(self, tokenizer_path: str, max_len: int, format: str | None = None):
        if format is not None and format not in FORMAT_COLUMNS:
            raise ValueError(f"unknown instruction format {format!r}; choose one of {sorted(FORMAT_COLUMNS)}")
        self.tok = cached_tokenizer(tokenizer_path)
        self.max_len = max_len
        self.format = format

    def _tokens(self, row: dict) -> tuple[list[int], list[int]]:
        fmt = self.format or detect_format(row)
        missing = [c for c in FORMAT_COLUMNS[fmt] if not _present(row.get(c))]
        if missing:
            raise ValueError(f"{fmt} row lacks {missing}; it has columns {sorted(row)}")
        if fmt == "prompt":  # the one-turn path every other stage uses, unchanged
            return chat_tokens(self.tok, row["prompt"], row["answer"], self.max_len)
        return conversation_tokens(self.tok, to_messages(row, fmt), self.max_len)

    def __call__(self, batch: pd.DataFrame) -> dict:
        ids, labels = zip(*(self._tokens(row) for row in batch.to_dict("records")))
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
