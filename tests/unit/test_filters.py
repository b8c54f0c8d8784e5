"""Curation blocks: filters give reasons, malformed lines are quarantined, duplicates are marked; counts add up."""
import json

import pandas as pd

from raylm.data.filters import (KEEP, AlphaRatio, ApplyFilters, MinChars, RepeatedLines, mark_duplicates,
                                normalized_hash, parse_jsonl)


def test_filter_reasons():
    assert MinChars(5).filter({"text": "hello world"}) is True
    assert MinChars(50).filter({"text": "short"}) == (False, "shorter than 50 chars")
    assert AlphaRatio(0.5).filter({"text": "1234 5678 90 !!"})[0] is False
    assert RepeatedLines(0.3).filter({"text": "same\n" * 6})[0] is False


def test_parse_quarantines_malformed_lines():
    lines = [json.dumps({"id": "a", "text": "ok"}), "{not json", json.dumps([1, 2]), json.dumps({"id": "b"})]
    out = parse_jsonl(pd.DataFrame({"text": lines}))
    assert list(out["drop_reason"]) == [KEEP, "malformed:invalid_json", "malformed:not_an_object",
                                        "malformed:no_text"]
    assert out.loc[1, "raw"] == "{not json"  # the bad line is kept for the quarantine file


def test_apply_filters_and_dedup():
    docs = pd.DataFrame({"id": ["1", "2", "3", "4"], "source": "s", "raw": "", "drop_detail": "",
                         "text": ["A long enough text here.", "A long  enough text\nhere.", "tiny",
                                  "Another long enough text."], "drop_reason": KEEP})
    out = normalized_hash(ApplyFilters([MinChars(10)])(docs))
    assert list(out["drop_reason"]) == [KEEP, KEEP, "min_chars", KEEP]
    groups = [mark_duplicates(g) for _, g in out.groupby("hash")]
    marked = pd.concat(groups).sort_values("id")
    assert list(marked["drop_reason"]) == [KEEP, "exact_duplicate", "min_chars", KEEP]
    assert "same text as 1" in marked.iloc[1]["drop_detail"]
    assert len(marked) == len(docs)  # in = kept + dropped
