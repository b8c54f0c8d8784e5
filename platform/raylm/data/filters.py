"""Ray Data curation blocks, datatrove style.

A filter implements one method, `filter(doc) -> bool | (False, detail) | (False, rule, detail)`. `ApplyFilters`
runs a list of them over pandas batches and records the first failing filter in `drop_reason` ("" = kept): its
name, or "<name>.<rule>" for a filter with several rules, and the measured value in `drop_detail`. Statistics and
exclusion writing come for free and every input row is accounted for: in = kept + dropped + quarantined.
"""
from __future__ import annotations

import hashlib
import json
import re
import unicodedata

import pandas as pd

from raylm.data.frames import ints, strings

KEEP = ""
COLUMNS = ["id", "source", "text", "raw", "drop_reason", "drop_detail"]
QUARANTINE_PREFIX = "malformed:"
# GPT-2/Llama-3 style pre-tokenizer split: a tokenizer-free proxy for token counts before a tokenizer exists.
PRETOKEN_RE = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+""")


class Filter:
    name = "filter"

    def filter(self, doc: dict) -> bool | tuple[bool, str]:
        raise NotImplementedError


class MinChars(Filter):
    name = "min_chars"

    def __init__(self, n: int):
        self.n = n

    def filter(self, doc):
        return len(doc["text"]) >= self.n or (False, f"shorter than {self.n} chars")


class MaxChars(Filter):
    name = "max_chars"

    def __init__(self, n: int):
        self.n = n

    def filter(self, doc):
        return len(doc["text"]) <= self.n or (False, f"longer than {self.n} chars")


class AlphaRatio(Filter):
    """Gopher-style: too few alphabetic characters means tables, code dumps or garbage."""

    name = "alpha_ratio"

    def __init__(self, min_ratio: float):
        self.min_ratio = min_ratio

    def filter(self, doc):
        text = doc["text"]
        ratio = sum(map(str.isalpha, text)) / max(1, len(text))  # map: 32 us per 1.6k chars, a genexpr 55 us
        return ratio >= self.min_ratio or (False, f"alpha ratio {ratio:.2f} < {self.min_ratio}")


class RepeatedLines(Filter):
    """Gopher-style repetition: the fraction of lines that duplicate an earlier line."""

    name = "repeated_lines"

    def __init__(self, max_fraction: float):
        self.max_fraction = max_fraction

    def filter(self, doc):
        lines = [ln.strip() for ln in doc["text"].splitlines() if ln.strip()]
        if len(lines) < 4:
            return True
        frac = 1 - len(set(lines)) / len(lines)
        return frac <= self.max_fraction or (False, f"repeated lines {frac:.2f} > {self.max_fraction}")


def build_filters(cfg) -> list[Filter]:
    return [MinChars(cfg.min_chars), MaxChars(cfg.max_chars), AlphaRatio(cfg.min_alpha_ratio),
            RepeatedLines(cfg.max_repeated_line_fraction)]


# ---------------------------------------------------------------- batch operators
def parse_jsonl(batch: pd.DataFrame) -> pd.DataFrame:
    """Raw lines (`text` column from read_text) -> id/source/text rows; malformed lines are quarantined."""
    rows = []
    for line in batch["text"]:
        rec, reason, detail = None, KEEP, ""
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                reason, detail = "malformed:not_an_object", type(rec).__name__
            elif not isinstance(rec.get("text"), str):
                reason, detail = "malformed:no_text", "missing or non-string 'text'"
        except json.JSONDecodeError as exc:
            reason, detail = "malformed:invalid_json", f"{exc.msg} at char {exc.pos}"
        if reason:
            rows.append({"id": "", "source": "", "text": "", "raw": line[:2000], "drop_reason": reason,
                         "drop_detail": detail})
        else:
            rows.append({"id": str(rec.get("id", "")), "source": str(rec.get("source", "user")),
                         "text": unicodedata.normalize("NFC", rec["text"]), "raw": "", "drop_reason": KEEP,
                         "drop_detail": ""})
    return pd.DataFrame(rows, columns=COLUMNS)


class ApplyFilters:
    """map_batches operator: the first failing filter's name goes to drop_reason, its message to drop_detail."""

    def __init__(self, filters: list[Filter]):
        self.filters = filters

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        reasons, details = list(batch["drop_reason"]), list(batch["drop_detail"])
        for i, doc in enumerate(batch.to_dict("records")):
            if reasons[i]:
                continue
            for f in self.filters:
                verdict = f.filter(doc)
                if verdict is True or (isinstance(verdict, tuple) and verdict[0]):
                    continue
                if isinstance(verdict, tuple) and len(verdict) == 3:  # (False, rule, detail): "<filter>.<rule>"
                    reasons[i], details[i] = f"{f.name}.{verdict[1]}", verdict[2]
                else:
                    reasons[i], details[i] = f.name, verdict[1] if isinstance(verdict, tuple) else ""
                break
        batch = batch.copy()
        batch["drop_reason"], batch["drop_detail"] = strings(reasons, batch.index), strings(details, batch.index)
        return batch


def normalized_hash(batch: pd.DataFrame) -> pd.DataFrame:
    """Exact-dedup key: sha1 of whitespace-normalised text (so re-wrapped copies still match)."""
    batch = batch.copy()
    batch["hash"] = [hashlib.sha1(" ".join(t.split()).encode()).hexdigest() for t in batch["text"]]
    return batch


def mark_duplicates(group: pd.DataFrame) -> pd.DataFrame:
    """map_groups over one hash: keep the smallest id among kept rows, mark the other kept rows."""
    group = group.sort_values("id").copy()
    kept = group.index[group["drop_reason"] == KEEP]
    group.loc[kept[1:], "drop_reason"] = "exact_duplicate"
    if len(kept) > 1:
        group.loc[kept[1:], "drop_detail"] = f"same text as {group.loc[kept[0], 'id']}"
    return group


def count_pretokens(batch: pd.DataFrame) -> pd.DataFrame:
    batch = batch.copy()
    batch["chars"] = ints([len(t) for t in batch["text"]], batch.index)
    batch["pretokens"] = ints([len(PRETOKEN_RE.findall(t)) for t in batch["text"]], batch.index)
    return batch


def split_of(doc_id: str, val_percent: float) -> str:
    return "val" if int(hashlib.sha1(doc_id.encode()).hexdigest(), 16) % 1000 < val_percent * 10 else "train"
