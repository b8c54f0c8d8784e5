"""Token accounting, source mixing and chunk-and-pack with document boundaries, as Ray Data operators.

- `count_tokens`: tokens per document with a trained tokenizer (a run's or a local HF directory), so the stage can
  report tokens and the compression rate (tokens per character, seed 002) per source and a length histogram.
- `mix_rates` + `apply_mix`: target ratios across sources (seed 004's domain:general 7:3) by down-sampling, or
  by down- and up-sampling at the same total size; each document's fate is a hash of its node and the seed, so
  a run is reproducible and no process needs the corpus.
- `ChunkPack` + `pack_splits`: documents split into <= chunk_tokens pieces at paragraph, then sentence boundaries
  (seed 004's 512-token chunks), packed into fixed-length blocks; every block lists where each of its pieces
  starts (`doc_starts`) so pre-training can mask attention across documents.
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pyarrow as pa
import xxhash
from ray.data.expressions import col

from raylm.config import ConfigError, Section
from raylm.data.frames import strings, to_pandas, write_parquet
from raylm.data.tokenize import cached_tokenizer

KEEP = ""
HIST_EDGES = [0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 2 ** 62]


class TokenSpec(Section):
    tokenizer_path: str | None = None  # a local HF tokenizer directory (or give inputs.tokenizer=RUN)


class MixSpec(Section):
    ratios: dict[str, float] = {}  # source -> weight, e.g. {domain: 7, general: 3}; unlisted sources pass as-is
    by: str = "chars"  # what the ratio is measured in: docs, chars or tokens (tokens needs a tokenizer)
    upsample: bool = False  # False: only down-sample; True: keep the listed sources' total, repeating the small
    seed: int = 0


# ---------------------------------------------------------------- tokens
def count_tokens(batch: pd.DataFrame, tokenizer_path: str) -> pd.DataFrame:
    batch = batch.copy()
    alive = (batch["drop_reason"] == KEEP).to_numpy()
    counts = np.zeros(len(batch), dtype=np.int64)
    if alive.any():
        enc = cached_tokenizer(tokenizer_path)(list(batch["text"][alive]), add_special_tokens=False)["input_ids"]
        counts[alive] = [len(e) for e in enc]
    batch["tokens"] = counts
    return batch


# ---------------------------------------------------------------- mixing
def mix_rates(spec: MixSpec, totals: dict[str, float]) -> dict[str, float]:
    """Sampling rate per listed source (expected copies per document) that hits the target ratios.

    A listed source without kept documents cannot get its share: a clear error (a typo, or a filter that removed
    it all). When nothing at all was kept there is nothing to mix: no rates, and the (empty) run still succeeds.
    """
    if not any(totals.values()):
        return {}
    missing = [s for s in spec.ratios if not totals.get(s)]
    if missing:
        raise ConfigError(f"mix.ratios names source(s) with no kept documents: {missing}; kept sources: "
                         f"{sorted(totals)}")
    weight = sum(spec.ratios.values())
    share = {s: r / weight for s, r in spec.ratios.items()}
    if spec.upsample:
        size = sum(totals[s] for s in share)  # the listed sources keep their combined size
    else:
        size = min(totals[s] / share[s] for s in share)  # the largest total no source has to be repeated for
    return {s: share[s] * size / totals[s] for s in share}


def _unit(node: str, seed: int) -> float:
    return xxhash.xxh64_intdigest(node.encode(), seed=seed) / 2.0 ** 64


def apply_mix(batch: pd.DataFrame, rates: dict[str, float], seed: int) -> pd.DataFrame:
    """Each kept row of a listed source gets floor(rate) or ceil(rate) copies; 0 copies drops it (with reason)."""
    batch = batch.copy()
    batch["copy"] = 0
    reasons, details = batch["drop_reason"].to_numpy(dtype=object), batch["drop_detail"].to_numpy(dtype=object)
    extra = []
    for i, (src, node, reason) in enumerate(zip(batch["source"], batch["node"], reasons)):
        rate = rates.get(src)
        if reason != KEEP or rate is None:
            continue
        whole = int(rate)
        copies = whole + (_unit(node, seed) < rate - whole)
        if copies == 0:
            reasons[i], details[i] = "mixing.downsampled", f"source {src} sampled at rate {rate:.4f}"
        for k in range(1, copies):
            extra.append((i, k))
    batch["drop_reason"], batch["drop_detail"] = strings(reasons, batch.index), strings(details, batch.index)
    if extra:
        reps = batch.iloc[[i for i, _ in extra]].copy()
        ks = [k for _, k in extra]
        reps["copy"] = ks
        reps["id"] = [f"{i}#rep{k}" for i, k in zip(reps["id"], ks)]
        reps["node"] = [f"{n}#rep{k}" for n, k in zip(reps["node"], ks)]
        batch = pd.concat([batch, reps], ignore_index=True)
    return batch


# ---------------------------------------------------------------- chunk and pack
_BOUNDARY = re.compile(r"\n\s*\n|(?<=[.!?。！？])\s+")


def chunk_ids(ids: list[int], offsets: list[tuple[int, int]], text: str, max_tokens: int) -> list[list[int]]:
    """Cut one document's tokens into pieces of <= max_tokens, preferring a paragraph end, then a sentence end."""
    if len(ids) <= max_tokens:
        return [ids]
    para_ends = {m.start() for m in re.finditer(r"\n\s*\n", text)}
    sent_ends = {m.start() for m in _BOUNDARY.finditer(text)}
    pieces, start = [], 0
    while len(ids) - start > max_tokens:
        window = range(start + max_tokens, start, -1)  # a cut before token j keeps tokens [start, j)
        cut = next((j for j in window if offsets[j - 1][1] in para_ends), None)
        if cut is None or cut - start < max_tokens // 4:  # too short a piece: a sentence end is better
            cut = next((j for j in window if offsets[j - 1][1] in sent_ends), None) or cut
        if cut is None or cut - start < max_tokens // 4:
            cut = start + max_tokens  # no boundary in reach: a hard cut
        pieces.append(ids[start:cut])
        start = cut
    pieces.append(ids[start:])
    return pieces


class ChunkPack:
    """map_batches: documents -> chunks -> fixed-length blocks with the start of every piece inside each block."""

    def __init__(self, tokenizer_path: str, chunk_tokens: int, seq_len: int):
        self.tok = cached_tokenizer(tokenizer_path)
        self.chunk_tokens, self.seq_len = chunk_tokens, seq_len

    @staticmethod
    def empty(seq_len: int) -> pa.Table:
        return pa.table({"input_ids": pa.array([], pa.list_(pa.int32(), seq_len)),
                         "doc_starts": pa.array([], pa.list_(pa.int32())), "chunks": pa.array([], pa.int64()),
                         "docs_split": pa.array([], pa.int64()), "tail_tokens": pa.array([], pa.int64()),
                         "split": pa.array([], pa.string())})

    def __call__(self, batch: pd.DataFrame) -> pa.Table:
        texts = list(batch["text"])
        enc = self.tok(texts, add_special_tokens=False, return_offsets_mapping=True)
        stream, starts, n_chunks, n_split = [], [], 0, 0
        for ids, offs, text in zip(enc["input_ids"], enc["offset_mapping"], texts):
            pieces = chunk_ids(ids, offs, text, self.chunk_tokens)
            n_chunks += len(pieces)
            n_split += len(pieces) > 1
            for p in pieces:
                starts.append(len(stream))
                stream.extend(p + [self.tok.eos_token_id])
        n = len(stream) // self.seq_len
        s = np.asarray(starts, dtype=np.int64)
        offsets, flat = [0], []
        for b in range(n):
            lo, hi = b * self.seq_len, (b + 1) * self.seq_len
            inside = (s[(s >= lo) & (s < hi)] - lo).tolist()
            flat += ([0] if not inside or inside[0] != 0 else []) + inside
            offsets.append(len(flat))
        ids = pa.array(np.asarray(stream[: n * self.seq_len], dtype=np.int32))
        # plain Arrow lists (not Ray's tensor extension type), so any Parquet reader gets int lists back
        first = np.zeros(n, dtype=np.int64)
        if n:
            first[0] = 1
        return pa.table({
            "input_ids": pa.FixedSizeListArray.from_arrays(ids, self.seq_len) if n else
            pa.array([], pa.list_(pa.int32(), self.seq_len)),
            "doc_starts": pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, pa.int32())),
            "chunks": first * n_chunks, "docs_split": first * n_split,
            "tail_tokens": first * (len(stream) - n * self.seq_len)})


def pack_splits(kept, tokenizer_path: str, spec, uri_of) -> dict:
    """Chunk + pack the train and val rows of `kept` (one pass, map tasks) to Parquet at `uri_of(split)`."""
    def pack(batch: pd.DataFrame) -> pa.Table:
        packer = ChunkPack(tokenizer_path, spec.chunk_tokens, spec.seq_len)
        tables = []
        for split in ("train", "val"):  # blocks never mix splits
            rows = batch[batch["split"] == split]
            if len(rows):
                t = packer(rows)
                tables.append(t.append_column("split", pa.array([split] * t.num_rows, pa.string())))
        return pa.concat_tables(tables) if tables else ChunkPack.empty(spec.seq_len)

    packed = kept.map_batches(pack, batch_size=1024, batch_format="pandas").materialize()
    out = {}
    for split in ("train", "val"):
        rows = packed.filter(expr=col("split") == split)
        # a split of fewer than seq_len tokens (a small corpus) has no block: written as an empty file, 0 blocks
        write_parquet(rows.drop_columns(["split"]), uri_of(split), ChunkPack.empty(spec.seq_len).drop_columns(
            ["split"]).schema)
        stats = to_pandas(rows.select_columns(["chunks", "docs_split", "tail_tokens"]),
                          ["chunks", "docs_split", "tail_tokens"])
        out[split] = {"blocks": len(stats), "seq_len": spec.seq_len, "tokens": len(stats) * spec.seq_len,
                      "chunks": int(stats["chunks"].sum()), "docs_split": int(stats["docs_split"].sum()),
                      "tail_tokens_dropped": int(stats["tail_tokens"].sum())}
    return out
