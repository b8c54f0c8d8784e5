"""Benchmark: tokenize + pack text into fixed-length blocks, raylm (Ray Data) vs Hugging Face `datasets.map`.

The anchor is what users do by hand today: `datasets.Dataset.map(batched=True, num_proc=N)` with the HF
`group_texts` recipe. Both sides use the same tokenizer, the same corpus (the embedded default, repeated
`--repeat` times) and the same number of processes; both must produce the same number of blocks.

    .venv/bin/python benchmarks/tokenize_pack.py [--repeat 4] [--procs 2] [--seq-len 128]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import pandas as pd

from raylm.data.tokenize import PACK_BATCH_ROWS  # the batch size the pretrain stage packs with


def corpus(repeat: int) -> pd.DataFrame:
    from types import SimpleNamespace

    from raylm.corpus import builtin_records

    cfg = SimpleNamespace(sources=["pydoc_topics", "stdlib_docstrings", "licenses"], max_chars_per_doc=1500,
                          max_stdlib_files=400)
    recs = builtin_records(cfg)
    return pd.DataFrame([{"text": r["text"]} for _ in range(repeat) for r in recs])


def anchor(df: pd.DataFrame, tok_dir: str, seq_len: int, procs: int) -> tuple[int, float]:
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(tok_dir)

    def group_texts(batch):  # the HF run_clm recipe, with an EOS between documents like ours
        ids = [i for enc in tok(batch["text"], add_special_tokens=False)["input_ids"] for i in enc + [tok.eos_token_id]]
        n = len(ids) // seq_len
        return {"input_ids": [ids[k * seq_len:(k + 1) * seq_len] for k in range(n)]}

    t0 = time.perf_counter()
    ds = datasets.Dataset.from_pandas(df).map(group_texts, batched=True, batch_size=PACK_BATCH_ROWS, num_proc=procs,
                                              remove_columns=["text"])
    return len(ds), time.perf_counter() - t0


def ours(df: pd.DataFrame, tok_dir: str, seq_len: int, procs: int) -> tuple[int, float]:
    import ray

    from raylm.data.tokenize import PackText

    t0 = time.perf_counter()
    ds = ray.data.from_pandas(df).map_batches(PackText, fn_constructor_args=(tok_dir, seq_len),
                                              compute=ray.data.ActorPoolStrategy(size=procs),
                                              batch_size=PACK_BATCH_ROWS, batch_format="pandas").materialize()
    return ds.count(), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=4)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    args = ap.parse_args()

    from raylm.cluster import init_ray
    from raylm.models import train_tokenizer

    df = corpus(args.repeat)
    tok_dir = tempfile.mkdtemp()
    train_tokenizer(df["text"].head(3000), vocab_size=2048).save_pretrained(tok_dir)
    init_ray()
    ours(df.head(512), tok_dir, args.seq_len, args.procs)  # warm-up: actor start-up is not what we measure
    n_ours, t_ours = ours(df, tok_dir, args.seq_len, args.procs)
    n_anchor, t_anchor = anchor(df, tok_dir, args.seq_len, args.procs)
    # Packing per batch drops each batch's tail, so block counts differ by at most one block per batch.
    assert abs(n_ours - n_anchor) <= len(df) // PACK_BATCH_ROWS + 1, (n_ours, n_anchor)
    chars = int(df["text"].str.len().sum())
    print(f"docs={len(df)} chars={chars} procs={args.procs} seq_len={args.seq_len} cpus={os.cpu_count()}")
    print(f"raylm (Ray Data map_batches): {n_ours} blocks in {t_ours:.2f}s = {n_ours * args.seq_len / t_ours:,.0f} tokens/s")
    print(f"anchor (datasets.map num_proc={args.procs}): {n_anchor} blocks in {t_anchor:.2f}s = "
          f"{n_anchor * args.seq_len / t_anchor:,.0f} tokens/s")
    print(f"ratio raylm/anchor throughput: {(n_ours / t_ours) / (n_anchor / t_anchor):.2f}x")


if __name__ == "__main__":
    main()
