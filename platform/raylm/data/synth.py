"""A generated corpus with planted near-duplicates and known ground truth (tests, benchmarks, the scale run).

Sentences are drawn from the word distribution of the builtin corpus (real English: stop words, word lengths and
punctuation look like text, so quality filters keep it). A planted near-duplicate is a copy of an earlier document
with a fraction of its words replaced, inserted or deleted; a hard negative gets heavier edits (Jaccard around
0.4-0.7) so that a deduplicator that merges anything vaguely similar loses precision.
"""
from __future__ import annotations

import random
import re
from collections import Counter

from raylm import corpus


def vocabulary(max_words: int = 20000) -> tuple[list[str], list[int]]:
    from pipelines.curate import Config

    counts: Counter = Counter()
    for rec in corpus.builtin_records(Config(sources=["pydoc_topics", "licenses"])):
        counts.update(w for w in re.findall(r"[A-Za-z]+", rec["text"]) if len(w) < 16)
    words, freqs = zip(*counts.most_common(max_words))
    return list(words), list(freqs)


class Generator:
    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)
        self.words, self.freqs = vocabulary()
        self._cum = None

    def _sample(self, k: int) -> list[str]:
        return self.rng.choices(self.words, cum_weights=self._cum_weights(), k=k)

    def _cum_weights(self):
        if self._cum is None:
            acc, self._cum = 0, []
            for f in self.freqs:
                acc += f
                self._cum.append(acc)
        return self._cum

    def document(self, n_words: int) -> str:
        words = self._sample(n_words)
        out, sent, para = [], [], []
        for w in words:
            sent.append(w)
            if len(sent) >= self.rng.randint(8, 20):
                para.append(" ".join(sent).capitalize() + ".")
                sent = []
                if len(para) >= self.rng.randint(3, 6):
                    out.append(" ".join(para))
                    para = []
        if sent:
            para.append(" ".join(sent).capitalize() + ".")
        if para:
            out.append(" ".join(para))
        return "\n\n".join(out)

    def edit(self, text: str, fraction: float) -> str:
        """Replace/insert/delete about `fraction` of the words (the paragraph layout is kept)."""
        paras = []
        for para in text.split("\n\n"):
            words = para.split(" ")
            out = []
            for w in words:
                r = self.rng.random()
                if r < fraction / 3:
                    continue  # delete
                if r < 2 * fraction / 3:
                    out.append(self._sample(1)[0])  # replace
                    continue
                out.append(w)
                if r < fraction:
                    out.append(self._sample(1)[0])  # insert
            paras.append(" ".join(out))
        return "\n\n".join(paras)


def shingles(text: str, n: int = 5) -> set[str]:
    w = text.split()
    return {" ".join(w[i:i + n]) for i in range(max(1, len(w) - n + 1))}


def jaccard(a: str, b: str, n: int = 5) -> float:
    sa, sb = shingles(a, n), shingles(b, n)
    return len(sa & sb) / max(1, len(sa | sb))


def planted_corpus(n_docs: int, dup_fraction: float = 0.3, hard_negative_fraction: float = 0.05,
                   words: tuple[int, int] = (150, 400), seed: int = 0, edit: tuple[float, float] = (0.0, 0.02),
                   source: str = "synthetic") -> tuple[list[dict], list[tuple[str, str]]]:
    """(records, planted (copy id, original id) pairs). Ids are zero-padded so string order is creation order."""
    g = Generator(seed)
    recs: list[dict] = []
    planted: list[tuple[str, str]] = []
    for i in range(n_docs):
        rid = f"doc{i:08d}"
        r = g.rng.random()
        if recs and r < dup_fraction:
            orig = g.rng.choice(recs)
            recs.append({"id": rid, "source": source, "text": g.edit(orig["text"], g.rng.uniform(*edit))})
            planted.append((rid, orig["id"]))
        elif recs and r < dup_fraction + hard_negative_fraction:
            orig = g.rng.choice(recs)
            recs.append({"id": rid, "source": source, "text": g.edit(orig["text"], g.rng.uniform(0.15, 0.3))})
        else:
            recs.append({"id": rid, "source": source, "text": g.document(g.rng.randint(*words))})
    return recs, planted


def true_duplicates(recs: list[dict], threshold: float, n: int = 5, candidates=None) -> set[str]:
    """Ids that have an exact shingle Jaccard >= threshold with an earlier (smaller id) document.

    Exact over `candidates` (pairs to check, e.g. every pair an LSH with a low threshold proposes, plus the planted
    ones); documents generated independently share no 5-gram in practice, so that covers the true pairs.
    """
    by_id = {r["id"]: r["text"] for r in recs}
    sh = {}
    out = set()
    for a, b in candidates:
        lo, hi = min(a, b), max(a, b)
        if hi in out:
            continue
        sa = sh.setdefault(lo, shingles(by_id[lo], n))
        sb = sh.setdefault(hi, shingles(by_id[hi], n))
        if len(sa & sb) / max(1, len(sa | sb)) >= threshold:
            out.add(hi)
    return out
