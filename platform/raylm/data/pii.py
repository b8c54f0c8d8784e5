"""PII redaction: e-mail addresses, phone numbers, IP addresses, credit-card numbers, Chinese resident ID numbers.

`redact(text, types)` replaces each item found by a typed placeholder (<EMAIL>, <PHONE>, <IPV4>, <IPV6>,
<CREDIT_CARD>, <CN_ID>) and counts them per type. Candidates are validated before they are replaced: credit cards by
the Luhn checksum, Chinese IDs by their birth date and ISO 7064 MOD 11-2 check character, IPv4 by octet range, IPv6
by `ipaddress`. A look-alike that fails its check is left exactly as it was. The checksummed patterns run before the
phone patterns, so a valid ID is not half-eaten by a phone match, and a 16-digit number failing Luhn is not
phone-shaped, so it stays.

`RedactPii(spec)` is the Ray Data map_batches operator: it redacts kept rows (drop_reason == "") and adds one
integer column `pii_<type>` per configured type.
"""
from __future__ import annotations

import ipaddress
import re
from datetime import date
from typing import Iterable, Literal

import pandas as pd

from raylm.config import Section
from raylm.data.frames import strings

PiiType = Literal["email", "phone", "ipv4", "ipv6", "credit_card", "cn_id"]
PII_TYPES: tuple[str, ...] = ("email", "phone", "ipv4", "ipv6", "credit_card", "cn_id")
PLACEHOLDERS = {t: f"<{t.upper()}>" for t in PII_TYPES}


class PiiSpec(Section):
    enabled: bool = True
    types: list[PiiType] = list(PII_TYPES)


# ---------------------------------------------------------------- patterns
# re.ASCII: \d is 0-9 and \w is [A-Za-z0-9_], so a number right after a Chinese character ("手机13812345678")
# still has a boundary, and no other script's digits reach int() or the checksums.
EMAIL_RE = re.compile(r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+"
                      r"[A-Za-z]{2,}(?![\w-])", re.ASCII)
# 17 digits with a YYYYMMDD birth date at positions 7-14, then the check character; not inside a longer run.
CN_ID_RE = re.compile(r"(?<![\w.])\d{6}((?:18|19|20)\d{2})(0[1-9]|1[0-2])(0[1-9]|[12]\d|3[01])\d{3}[0-9Xx]"
                      r"(?![\w]|\.\d)", re.ASCII)
# 13-19 digits, single spaces or dashes allowed between them after the first four (every issuer groups 4 first).
# Not after '+' ("+86 138 1234 5678" is a phone number) nor inside a decimal number (0.1000000000000000055511).
CARD_RE = re.compile(r"(?<![\w+.-])\d{4}(?:[ -]?\d){9,15}(?![\w]|[.-]\d)", re.ASCII)
IPV4_RE = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)", re.ASCII)
# Full and '::'-compressed forms (optionally ending in an embedded IPv4); `ipaddress` decides.
IPV6_RE = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{1,4})?"
                     r"(?![\w:]|\.\w)", re.ASCII)
# International: +CC then 1-5 groups of digits separated by single spaces or dashes (one may be in parentheses),
# 8-15 digits in all (E.164); not followed by '.digit' (so "+35236450.6" is a number, not a phone).
PHONE_INTL_RE = re.compile(r"(?<![\w+])\+[1-9]\d{0,2}(?:[ -]?(?:\(\d{1,4}\)|\d{1,5})){1,5}(?![\w]|[.-]\d)", re.ASCII)
# US: (415) 555-2671, 415-555-2671.
PHONE_US_RE = re.compile(r"(?:(?<![\w(])\(\d{3}\) ?|(?<![\w-])\d{3}-)\d{3}-\d{4}(?![\w]|-\d)", re.ASCII)
# Chinese mobile: 1[3-9] and 9 more digits, not part of a longer digit run.
PHONE_CN_RE = re.compile(r"(?<![\w.])1[3-9]\d{9}(?![\w]|\.\d)", re.ASCII)

_ID_WEIGHTS = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2]  # 2**(17-i) mod 11
_ID_CHECK = "10X98765432"


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def cn_id_check_char(first17: str) -> str:
    """ISO 7064 MOD 11-2 check character of a Chinese resident ID's first 17 digits."""
    return _ID_CHECK[sum(w * (ord(c) - 48) for w, c in zip(_ID_WEIGHTS, first17)) % 11]


def _cn_id_ok(m: re.Match) -> bool:
    s = m.group(0)
    if cn_id_check_char(s[:17]) != s[17].upper():
        return False
    try:
        born = date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
    except ValueError:  # 20230231
        return False
    return born <= date.today()


def _card_ok(m: re.Match) -> bool:
    digits = m.group(0).replace(" ", "").replace("-", "")
    return 13 <= len(digits) <= 19 and luhn_ok(digits)


def _ipv4_ok(m: re.Match) -> bool:
    return all(int(part) <= 255 for part in m.group(0).split("."))


def _ipv6_ok(m: re.Match) -> bool:
    s = m.group(0)
    # Fewer than three written groups is what Python slices (a[1::2]), C++ scopes and times look like; a real
    # address that short is ::1-like and identifies no one.
    if sum(1 for g in s.split(":") if g) < 3:
        return False
    try:
        return isinstance(ipaddress.ip_address(s), ipaddress.IPv6Address)
    except ValueError:
        return False


def _intl_phone_ok(m: re.Match) -> bool:
    n = sum(c.isdigit() for c in m.group(0))
    return 8 <= n <= 15


def _always(m: re.Match) -> bool:
    return True


# (type, pattern, validator, cheap precondition on the text), in the order they run.
_STEPS: list[tuple[str, re.Pattern, object, object]] = [
    ("email", EMAIL_RE, _always, lambda t: "@" in t),
    ("ipv6", IPV6_RE, _ipv6_ok, lambda t: ":" in t),
    ("ipv4", IPV4_RE, _ipv4_ok, lambda t: "." in t),
    ("cn_id", CN_ID_RE, _cn_id_ok, None),
    ("credit_card", CARD_RE, _card_ok, None),
    ("phone", PHONE_INTL_RE, _intl_phone_ok, lambda t: "+" in t),
    ("phone", PHONE_US_RE, _always, lambda t: "-" in t),
    ("phone", PHONE_CN_RE, _always, None),
]
_HAS_DIGIT_RE = re.compile(r"\d")
_MAY_HAVE_NO_DIGIT = {"email", "ipv6"}  # a@b.io, dead:beef:cafe::; every other type is mostly digits


def redact(text: str, types: Iterable[str] = PII_TYPES) -> tuple[str, dict[str, int]]:
    """Replace every valid PII item of `types` by its placeholder; return the new text and counts per type."""
    wanted = set(types)
    unknown = wanted - set(PII_TYPES)
    if unknown:
        raise ValueError(f"unknown PII type(s) {sorted(unknown)}; choose from {list(PII_TYPES)}")
    counts = {t: 0 for t in PII_TYPES if t in wanted}
    if not text:
        return text, counts
    has_digit = _HAS_DIGIT_RE.search(text) is not None
    for kind, pattern, ok, precondition in _STEPS:
        if kind not in wanted or (not has_digit and kind not in _MAY_HAVE_NO_DIGIT):
            continue
        if precondition is not None and not precondition(text):
            continue
        placeholder = PLACEHOLDERS[kind]
        found = 0

        def sub(m: re.Match, ok=ok, placeholder=placeholder) -> str:
            nonlocal found
            if ok(m):
                found += 1
                return placeholder
            return m.group(0)

        text = pattern.sub(sub, text)
        counts[kind] += found
    return text, counts


class RedactPii:
    """map_batches operator: redact `text` of kept rows; add `pii_<type>` counts (0 for rows not processed)."""

    def __init__(self, spec: PiiSpec | None = None):
        self.spec = spec or PiiSpec()
        self.types = [t for t in PII_TYPES if t in set(self.spec.types)]

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        batch = batch.copy()
        counts = {t: [0] * len(batch) for t in self.types}
        if self.spec.enabled and self.types:
            texts = list(batch["text"])
            for i, (text, reason) in enumerate(zip(texts, batch["drop_reason"])):
                if reason != "":
                    continue
                texts[i], found = redact(text, self.types)
                for t, n in found.items():
                    counts[t][i] = n
            batch["text"] = strings(texts, batch.index)
        for t in self.types:
            batch[f"pii_{t}"] = pd.Series(counts[t], index=batch.index, dtype="int64")
        return batch
