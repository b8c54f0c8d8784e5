"""Pure parts of curation: MinHash signatures and LSH, components, mixing rates, chunking, the funnel."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from raylm.data import dedup
from raylm.data.funnel import funnel
from raylm.data.mix import MixSpec, apply_mix, chunk_ids, mix_rates
from raylm.data.synth import Generator, jaccard


@pytest.fixture(scope="module")
def gen():
    return Generator(seed=5)


def test_signature_agreement_estimates_the_exact_jaccard(gen):
    spec = dedup.FuzzySpec()
    base = gen.document(300)
    others = [gen.edit(base, f) for f in (0.0, 0.01, 0.03, 0.08)] + [gen.document(300)]
    sigs = dedup.signatures([base] + others, spec)
    assert sigs.shape == (6, 128) and sigs.dtype == np.uint32
    for i, text in enumerate(others, start=1):
        est = (sigs[0] == sigs[i]).mean()
        assert est == pytest.approx(jaccard(base, text), abs=0.12)  # 128 permutations: sd <= 0.045
    assert (sigs[0] == sigs[1]).all()  # identical text, identical signature
    assert (sigs[0] == sigs[5]).mean() < 0.1  # unrelated text


def test_shingles_do_not_cross_documents_and_short_texts_get_one():
    toks, offsets = dedup.shingle_hashes(["a b c d e f", "x", ""], "word", 5)
    assert offsets.tolist() == [0, 2, 3, 4]  # 2 five-grams, then one shingle each for the short and empty text
    again, _ = dedup.shingle_hashes(["x", "a b c d e f"], "word", 5)
    assert toks[2] == again[0] and set(toks[:2]) == set(again[1:])  # position-independent hashes
    chars, off = dedup.shingle_hashes(["数据清洗很重要"], "char", 3)
    assert off.tolist() == [0, 5]


def test_lsh_parameters_trade_recall_for_candidates():
    b, r = dedup.lsh_params(0.8, 128)
    assert (b, r) == (9, 13)  # datasketch's choice for 0.8 / 128
    b2, r2 = dedup.lsh_params(0.65, 128)
    p = lambda j, b, r: 1 - (1 - j ** r) ** b  # noqa: E731 - probability that a pair shares a bucket
    assert p(0.8, b2, r2) > 0.9 > 0.5 > p(0.8, b, r)


def test_local_components_keep_the_smallest_node():
    edges = pd.DataFrame({"a": ["b", "c", "x", "q"], "b": ["c", "d", "y", "p"]})
    out = dedup._local_components(edges)
    assert dict(zip(out["node"], out["rep"])) == {"c": "b", "d": "b", "y": "x", "q": "p"}


def test_mixing_rates_hit_the_target_and_sampling_is_reproducible():
    rates = mix_rates(MixSpec(ratios={"domain": 7, "general": 3}), {"domain": 1000.0, "general": 1000.0})
    assert rates["domain"] == pytest.approx(1.0) and rates["general"] == pytest.approx(3 / 7)
    up = mix_rates(MixSpec(ratios={"domain": 7, "general": 3}, upsample=True), {"domain": 1000.0, "general": 1000.0})
    assert up["domain"] == pytest.approx(1.4) and up["general"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="no kept documents: \\['web'\\]"):
        mix_rates(MixSpec(ratios={"web": 1, "domain": 1}), {"domain": 10.0})
    batch = pd.DataFrame({"id": [f"d{i}" for i in range(2000)], "node": [f"d{i}\x00" for i in range(2000)],
                          "source": ["domain"] * 2000, "drop_reason": [""] * 2000, "drop_detail": [""] * 2000})
    a, b = apply_mix(batch, up, seed=1), apply_mix(batch, up, seed=1)
    assert a.equals(b)
    assert len(a) == pytest.approx(2800, rel=0.05) and a["id"].is_unique  # 1.4 copies per document
    assert (a["copy"] > 0).sum() == pytest.approx(800, rel=0.1)


def test_chunks_end_at_paragraph_or_sentence_boundaries():
    text = "First sentence here. Second one follows.\n\nA new paragraph starts. It ends."
    words = [(m.start(), m.end()) for m in __import__("re").finditer(r"\S+", text)]
    ids = list(range(len(words)))
    pieces = chunk_ids(ids, words, text, max_tokens=7)
    assert sum(len(p) for p in pieces) == len(ids) and all(len(p) <= 7 for p in pieces)
    cuts = [words[p[-1]][1] for p in pieces[:-1]]
    assert all(text[c - 1] in ".!?" for c in cuts)  # every cut follows a sentence end


def test_funnel_chains_operators_and_rejects_unknown_reasons():
    rows = funnel(["read", "gopher", "fuzzy_dedup"], {"": 5, "malformed:invalid_json": 1, "gopher.word_count": 2,
                                                     "fuzzy_duplicate": 2}, {}, 10)
    assert [(r["op"], r["in"], r["kept"]) for r in rows] == [("read", 10, 9), ("gopher", 9, 7), ("fuzzy_dedup", 7, 5)]
    with pytest.raises(AssertionError, match="no operator"):
        funnel(["read"], {"c4.bad_words": 1}, {}, 1)
