"""Exact, paragraph and fuzzy (MinHash-LSH) deduplication as Ray Data transforms, with distributed connected components.

Every document is a graph node, named `node` = "<id>\\x00<uid><text hash>" so that string order is (`id`, then a
per-record hash), and the id and text hash of any node can be read back without a join. Edges come from two sources:
- exact: documents with the same hash of their whitespace-normalised text (groupby on the hash);
- fuzzy: documents sharing an LSH bucket of their MinHash signatures (groupby on the bucket).
Connected components over all edges are found with the alternating large-star / small-star algorithm (Kiveris et
al., "Connected Components in MapReduce and Beyond", 2014): each round is two Ray Data groupbys over the edges, no
process holds the graph, and it converges in O(log n) rounds. Each component keeps its smallest node (the smallest
`id`; the stated rule) and every other member records it as `duplicate_of`.

The MinHash kernel is rensa's (Rust) `digest_matrix_from_flat_token_hashes`; shingles are hashed with numpy on the
whole batch (pandas' vectorised string hashing, then a rolling combination over n words or characters), so no
Python string is built per shingle. benchmarks/fuzzy_dedup.py measures it against datasketch and rensa alone.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow as pa
import rensa

from raylm.config import Section

U64 = np.uint64
_M1, _M2, _P = U64(0xBF58476D1CE4E5B9), U64(0x94D049BB133111EB), U64(0x100000001B3)
SEP = "\x00"


class FuzzySpec(Section):
    enabled: bool = True
    unit: str = "word"  # "word" n-grams (space-separated languages) or "char" n-grams (Chinese, Japanese, code)
    ngram: int = 5
    num_perm: int = 128
    threshold: float = 0.8  # Jaccard similarity of shingle sets
    # LSH finds candidates at a lower similarity, then every candidate pair is checked with the Jaccard estimate of
    # the full signatures: at 0.8 with 128 permutations plain LSH (9 bands x 13 rows, datasketch's choice) finds
    # only 40% of pairs at J=0.80 and 69% at 0.85; candidates at 0.65 (16 x 8) find 95% and 99%.
    verify: bool = True
    candidate_threshold: float | None = None  # None: threshold - 0.15 when verifying, else threshold
    bands: int | None = None  # None: chosen from the candidate threshold and num_perm (as datasketch does)
    rows: int | None = None
    seed: int = 42
    max_rounds: int = 30  # distributed connected-components rounds; converges in O(log n)
    # Once the edge list is this small, one Ray task finishes the components (scipy) instead of more rounds:
    # each distributed round costs ~3 s of shuffle overhead even on a few edges. 0 = always distributed.
    local_max_edges: int = 2_000_000


class ExactSpec(Section):
    enabled: bool = True
    paragraphs: bool = True  # remove a paragraph from every document but the first (smallest id) that has it
    min_paragraph_chars: int = 50  # shorter paragraphs ("Examples:", "}") are left alone


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads the bits of a rolling product before it is used as a hash."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> U64(30))
        x = x * _M1
        x = x ^ (x >> U64(27))
        x = x * _M2
        return x ^ (x >> U64(31))


def node_of(ids, uids, hashes) -> list[str]:
    return [f"{i}{SEP}{u:016x}{h}" for i, u, h in zip(ids, uids, hashes)]


def id_of(node: str) -> str:
    return node.rsplit(SEP, 1)[0]


def hash_of(node: str) -> str:
    return node[-16:]


def text_hash(texts) -> list[str]:
    """Exact-dedup key: hash of whitespace-normalised text (re-wrapped copies still match)."""
    norm = pd.Series([" ".join(t.split()) for t in texts], dtype=object)
    return [f"{h:016x}" for h in pd.util.hash_pandas_object(norm, index=False).to_numpy()]


def paragraphs(text: str) -> list[str]:
    return [p for p in text.split("\n\n")]


def batch_paragraph_hashes(texts, min_chars: int) -> list[list[int]]:
    """paragraph_hashes for many texts with one vectorised hashing call (per-call overhead dominates per text)."""
    paras = [[q for q in (" ".join(p.split()) for p in paragraphs(t)) if len(q) >= min_chars] for t in texts]
    flat = pd.Series([q for ps in paras for q in ps], dtype=object)
    if not len(flat):
        return [[] for _ in paras]
    h = pd.util.hash_pandas_object(flat, index=False).to_numpy().view(np.int64).tolist()
    out, i = [], 0
    for ps in paras:
        out.append(h[i:i + len(ps)])
        i += len(ps)
    return out


def paragraph_hashes(text: str, min_chars: int) -> np.ndarray:
    """int64 hashes of the paragraphs (whitespace-normalised) of at least `min_chars` characters."""
    keep = [q for q in (" ".join(p.split()) for p in paragraphs(text)) if len(q) >= min_chars]
    if not keep:
        return np.zeros(0, dtype=np.int64)
    return pd.util.hash_pandas_object(pd.Series(keep, dtype=object), index=False).to_numpy().view(np.int64)


# ---------------------------------------------------------------- MinHash signatures
def _token_hashes(texts, unit: str) -> tuple[np.ndarray, np.ndarray]:
    """All tokens of a batch as one uint64 array + per-document counts."""
    if unit == "char":
        arrays = [np.frombuffer(t.encode("utf-32-le"), dtype=np.uint32) for t in texts]
        lens = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
        flat = mix64(np.concatenate(arrays).astype(U64) if arrays else np.zeros(0, U64))
        return flat, lens
    words = [t.split() for t in texts]
    lens = np.fromiter((len(w) for w in words), dtype=np.int64, count=len(words))
    flat_words = pd.Series([w for ws in words for w in ws], dtype=object)
    flat = pd.util.hash_pandas_object(flat_words, index=False).to_numpy().astype(U64)
    return flat, lens


def shingle_hashes(texts, unit: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every n-gram of tokens of each text, flat, with row offsets (rensa's flat input).

    A text shorter than n tokens has one shingle (all its tokens); an empty text has one shingle of nothing.
    """
    flat, lens = _token_hashes(texts, unit)
    pad = n - 1
    padded = lens + pad
    dst = np.concatenate([[0], np.cumsum(padded)[:-1]]).astype(np.int64)
    src = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    buf = np.zeros(int(padded.sum()) + pad, dtype=U64)
    if len(flat):
        buf[np.repeat(dst, lens) + (np.arange(len(flat)) - np.repeat(src, lens))] = flat
    grams = np.zeros(len(buf) - pad, dtype=U64)
    with np.errstate(over="ignore"):
        for k in range(n):
            grams = grams * _P + buf[k: k + len(grams)]
    grams = mix64(grams)
    per_doc = np.maximum(lens - n + 1, 1)
    starts = np.concatenate([[0], np.cumsum(per_doc)[:-1]]).astype(np.int64)
    idx = np.repeat(dst, per_doc) + (np.arange(int(per_doc.sum())) - np.repeat(starts, per_doc))
    offsets = np.concatenate([[0], np.cumsum(per_doc)]).astype(U64)
    return grams[idx], offsets


def signatures(texts, spec: FuzzySpec) -> np.ndarray:
    """[n_docs, num_perm] uint32 MinHash signatures."""
    if len(texts) == 0:
        return np.zeros((0, spec.num_perm), dtype=np.uint32)
    tokens, offsets = shingle_hashes(texts, spec.unit, spec.ngram)
    m = rensa.RMinHash.digest_matrix_from_flat_token_hashes(tokens, offsets, spec.num_perm, spec.seed)
    return np.asarray(m.to_rows(), dtype=np.uint32)


def lsh_params(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) minimising the weighted false-positive + false-negative area around the threshold.

    The same criterion as datasketch's MinHashLSH._optimal_param, integrated with numpy.
    """
    xs_fp, xs_fn = np.linspace(0, threshold, 201), np.linspace(threshold, 1, 201)
    best, best_err = (1, 1), math.inf
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = np.trapezoid(1 - (1 - xs_fp ** r) ** b, xs_fp)
            fn = np.trapezoid((1 - xs_fn ** r) ** b, xs_fn)
            err = fp_weight * fp + fn_weight * fn
            if err < best_err:
                best, best_err = (b, r), err
    return best


def estimated_jaccard(batch: pd.DataFrame, num_perm: int) -> np.ndarray:
    """Fraction of equal MinHash values between the `sig_a` and `sig_b` columns: the Jaccard estimate per pair."""
    sa = np.frombuffer(b"".join(batch["sig_a"]), dtype=np.uint32).reshape(len(batch), num_perm)
    sb = np.frombuffer(b"".join(batch["sig_b"]), dtype=np.uint32).reshape(len(batch), num_perm)
    return (sa == sb).mean(axis=1)


def band_buckets(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """[n_docs, bands] int64 bucket keys; the band index is mixed in so bands never share a bucket."""
    out = np.empty((len(sigs), bands), dtype=np.int64)
    with np.errstate(over="ignore"):
        for b in range(bands):
            h = np.full(len(sigs), U64(b + 1) * _M2, dtype=U64)
            for c in sigs[:, b * rows:(b + 1) * rows].astype(U64).T:
                h = mix64(h * _P + c)
            out[:, b] = h.view(np.int64)
    return out


# ---------------------------------------------------------------- graph edges
EXACT, LSH, PARAGRAPH = 0, 1, 2
_KIND_SALT = {EXACT: U64(0x9E3779B97F4A7C15), PARAGRAPH: U64(0xD6E8FEB86659FD93)}


def bucket_rows(batch: pd.DataFrame, exact: bool, paragraphs: bool, num_perm: int, bands: int, rows: int
                ) -> pd.DataFrame:
    """One row per (document, bucket) for the single graph groupby: its exact hash, each LSH band, each paragraph.

    Rows: kind (EXACT | LSH | PARAGRAPH), bucket (int64), node. Kinds are salted apart so they never share a bucket.
    """
    nodes = batch["node"].to_numpy(dtype=object)
    out = []
    if exact:
        h = np.array([int(x, 16) for x in batch["hash"]], dtype=U64)
        out.append((EXACT, mix64(h ^ _KIND_SALT[EXACT]).view(np.int64), nodes))
    if bands:
        sigs = np.frombuffer(b"".join(batch["sig"]), dtype=np.uint32).reshape(len(batch), num_perm)
        out.append((LSH, band_buckets(sigs, bands, rows).ravel(), np.repeat(nodes, bands)))
    if paragraphs:
        lens = [len(p) for p in batch["para_hashes"]]
        if sum(lens):
            ph = np.concatenate([np.asarray(p, dtype=np.int64) for p in batch["para_hashes"]]).view(U64)
            out.append((PARAGRAPH, mix64(ph ^ _KIND_SALT[PARAGRAPH]).view(np.int64), np.repeat(nodes, lens)))
    return pd.DataFrame({"kind": np.concatenate([np.full(len(b), k, dtype=np.int8) for k, b, _ in out]),
                         "bucket": np.concatenate([b for _, b, _ in out]),
                         "node": np.concatenate([n for _, _, n in out])}) if out else \
        pd.DataFrame({"kind": np.zeros(0, np.int8), "bucket": np.zeros(0, np.int64), "node": []})


def partition_of(keys: np.ndarray, n: int) -> np.ndarray:
    """Partition number of int64 keys (already hashes): rows with one key always land in one partition."""
    return (keys.view(U64) % U64(n)).astype(np.int64)


def grouped(ds, key_fn, n_partitions: int, fn):
    """`fn(pyarrow.Table)` on whole hash partitions of `ds` (all rows of a key together), vectorised inside.

    Ray Data's groupby calls its function (or its aggregation) once per group in Python: ~20-700 us a call, and
    the 1 GB run has 13 M buckets (an aggregation over them took 648 s). Grouping by a partition number
    instead makes one call per partition, in which pyarrow groups the rows in C++.
    """
    def tag(t: pa.Table) -> pa.Table:
        return t.append_column("_part", pa.array(partition_of(key_fn(t), n_partitions)))

    return (ds.map_batches(tag, batch_format="pyarrow")
            .groupby("_part", num_partitions=min(n_partitions, 200))
            .map_groups(lambda t: fn(t.drop_columns(["_part"])), batch_format="pyarrow"))


def shared_bucket_links(t: pa.Table) -> pa.Table:
    """Rows (kind, bucket, node) of whole buckets -> (kind, bucket, a=smallest node, b=other member) for every
    bucket with more than one member: an edge (EXACT, LSH) or a paragraph removal for `b` (PARAGRAPH)."""
    import pyarrow.compute as pc

    heads = t.group_by("bucket").aggregate([("node", "count"), ("node", "min")])
    heads = heads.filter(pc.greater(heads["node_count"], 1)).select(["bucket", "node_min"])
    j = t.join(heads, keys="bucket", join_type="inner")
    j = j.filter(pc.not_equal(j["node"], j["node_min"]))
    return pa.table({"kind": j["kind"], "bucket": j["bucket"], "a": j["node_min"], "b": j["node"]})


def node_key(nodes: pa.ChunkedArray) -> np.ndarray:
    return pd.util.hash_pandas_object(nodes.to_pandas(), index=False).to_numpy().view(np.int64)


def distinct_pairs(t: pa.Table) -> pa.Table:
    return t.group_by(["a", "b"]).aggregate([]).select(["a", "b"])


def pair_key(t: pa.Table) -> np.ndarray:
    return pd.util.hash_pandas_object(t.select(["a", "b"]).to_pandas(), index=False).to_numpy().view(np.int64)


def paragraph_bucket(h: int) -> int:
    """The PARAGRAPH bucket of a paragraph hash (as `bucket_rows` computes it), to match removals to text."""
    return int(mix64(np.array([h], dtype=np.int64).view(U64) ^ _KIND_SALT[PARAGRAPH]).view(np.int64)[0])


def _both_directions(batch: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"u": pd.concat([batch["a"], batch["b"]], ignore_index=True),
                         "v": pd.concat([batch["b"], batch["a"]], ignore_index=True)})


def _larger_first(batch: pd.DataFrame) -> pd.DataFrame:
    a, b = batch["a"].to_numpy(dtype=object), batch["b"].to_numpy(dtype=object)
    swap = a < b
    return pd.DataFrame({"u": np.where(swap, b, a), "v": np.where(swap, a, b)})


def _large_star(group: dict) -> dict:
    u = group["u"][0]
    nbrs = set(group["v"])
    m = min(min(nbrs), u)
    big = sorted(v for v in nbrs if v > u)
    return {"a": np.asarray(big, dtype=object), "b": np.asarray([m] * len(big), dtype=object)}


def _small_star(group: dict) -> dict:
    u = group["u"][0]
    nbrs = set(group["v"]) | {u}
    m = min(nbrs)
    rest = sorted(v for v in nbrs if v != m)
    return {"a": np.asarray(rest, dtype=object), "b": np.asarray([m] * len(rest), dtype=object)}


def _digest(ds) -> tuple[int, int]:
    """(edge count, order-free checksum): two equal digests in a row mean the edge set stopped changing."""
    def part(batch: pd.DataFrame) -> pd.DataFrame:
        h = pd.util.hash_pandas_object(batch[["a", "b"]], index=False).to_numpy()
        return pd.DataFrame({"n": [len(batch)], "h": [int(np.bitwise_xor.reduce(h)) if len(h) else 0]})

    rows = ds.map_batches(part, batch_format="pandas").take_all()
    return sum(r["n"] for r in rows), int(np.bitwise_xor.reduce(np.array([r["h"] for r in rows], dtype=np.uint64)))


def _local_components(*frames: pd.DataFrame) -> pd.DataFrame:
    """The last step on one worker once few edges are left: scipy's connected components over those edges."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components as scipy_cc

    edges = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({"a": [], "b": []})
    nodes = np.array(sorted(set(edges["a"]) | set(edges["b"])), dtype=object)
    if len(nodes) == 0:
        return pd.DataFrame({"node": [], "rep": []}, dtype=object)
    pos = pd.Index(nodes)
    a, b = pos.get_indexer(edges["a"]), pos.get_indexer(edges["b"])
    _, label = scipy_cc(coo_matrix((np.ones(len(a)), (a, b)), shape=(len(nodes), len(nodes))), directed=False)
    rep_pos = pd.Series(np.arange(len(nodes))).groupby(label).transform("min").to_numpy()  # nodes are sorted
    keep = rep_pos != np.arange(len(nodes))
    return pd.DataFrame({"node": nodes[keep], "rep": nodes[rep_pos[keep]]})


def connected_components(edges, max_rounds: int, num_partitions: int, local_max_edges: int = 0):
    """Edges (a, b) -> Dataset (node, rep) for every node that is not its component's smallest node.

    Returns (dataset, rounds, finished_locally). Raises when `max_rounds` pass without convergence.
    """
    import ray

    prev = _digest(edges)
    for rounds in range(1, max_rounds + 1):
        if prev[0] <= local_max_edges:
            refs = edges.to_pandas_refs()
            out = ray.remote(_local_components).options(num_cpus=1).remote(*refs)
            return ray.data.from_pandas_refs([out]), rounds - 1, True
        edges = (edges.map_batches(_both_directions, batch_format="pandas")
                 .groupby("u", num_partitions=num_partitions).map_groups(_large_star, batch_format="numpy")
                 .map_batches(_larger_first, batch_format="pandas")
                 .groupby("u", num_partitions=num_partitions).map_groups(_small_star, batch_format="numpy")
                 .materialize())
        cur = _digest(edges)
        if cur == prev:
            return edges.map_batches(lambda b: pd.DataFrame({"node": b["a"], "rep": b["b"]}),
                                     batch_format="pandas"), rounds, False
        prev = cur
    raise RuntimeError(f"connected components did not converge in {max_rounds} rounds (fuzzy_dedup.max_rounds)")
