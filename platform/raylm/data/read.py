"""Reading raw corpora into Ray Data without losing a record.

JSONL (one object per line), Parquet (a text column) and plain-text files (one document per file), each optionally
gzip/zstd-compressed (Arrow picks the codec from the extension), local or any fsspec/pyarrow URI. JSONL is read as
raw bytes line by line, in chunks, by our own `FileBasedDatasource`: Ray's `read_text` decodes a whole file at once,
so one undecodable byte failed the run. Decoding happens per line in `parse_rows`, which quarantines what it cannot
use (`malformed:*` reasons) and keeps the raw line (truncated) so that nothing is lost.

Every row gets `uid`, a 64-bit hash of where it came from (path and line, or path and row content for Parquet),
which with `id` names the row's graph node in deduplication.
"""
from __future__ import annotations

import json
import os
import unicodedata
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import xxhash
from ray.data.datasource.file_based_datasource import FileBasedDatasource

from raylm.config import Section
from raylm.data.frames import strings

KEEP = ""
COLUMNS = ["id", "source", "text", "raw", "drop_reason", "drop_detail", "uid"]
DTYPES = {**{c: "str" for c in COLUMNS}, "uid": "int64"}  # also at zero rows (pandas leaves those untyped)
RAW_KEPT = 2000  # bytes of a malformed record written to the quarantine
COMPRESSED = (".gz", ".zst", ".zstd", ".bz2")
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".txt": "text",
           ".md": "text", ".text": "text"}


class InputSpec(Section):
    path: str  # file, directory or glob; local or a URI (s3://, gs://, ...)
    format: str = "auto"  # auto (by extension) | jsonl | parquet | text
    source: str | None = None  # tag for every record; default: the record's own "source", else the file's stem
    text_key: str = "text"
    id_key: str = "id"


class NormalizeSpec(Section):
    nfc: bool = True
    whitespace: bool = True  # trailing spaces per line, runs of blank lines, \r\n -> \n
    control_chars: bool = True  # drop C0/C1 control characters except \n and \t


def format_of(path: str) -> str:
    base = path
    for ext in COMPRESSED:
        if base.endswith(ext):
            base = base[: -len(ext)]
    return FORMATS.get(os.path.splitext(base)[1].lower(), "")


def expand(spec: InputSpec) -> dict[str, list[str]]:
    """The spec's files grouped by format; a clear error for a path that matches nothing."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(spec.path)
    if any(c in root for c in "*?["):
        files = sorted(fs.glob(root))
    elif fs.isdir(root):
        files = sorted(fs.find(root))
    elif fs.exists(root):
        files = [root]
    else:
        raise FileNotFoundError(f"input path {spec.path!r} does not exist")
    proto = spec.path.split("://", 1)[0] + "://" if "://" in spec.path else ""
    groups: dict[str, list[str]] = {}
    for f in files:
        fmt = spec.format if spec.format != "auto" else format_of(f)
        if fmt:
            groups.setdefault(fmt, []).append(proto + f if proto and not f.startswith(proto) else f)
    if not groups:
        raise ValueError(f"input path {spec.path!r} holds no .jsonl/.parquet/.txt files (set format= to force one)")
    return groups


class JsonLinesBytes(FileBasedDatasource):
    """Lines as raw bytes with their path and line number, read in chunks; over-long lines are cut, not held."""

    def __init__(self, paths, *, max_line_bytes: int, chunk_bytes: int = 16 << 20, rows_per_block: int = 4096,
                 **kwargs):
        super().__init__(paths, **kwargs)
        self.max_line_bytes, self.chunk_bytes, self.rows_per_block = max_line_bytes, chunk_bytes, rows_per_block

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        lines: list[bytes] = []
        numbers: list[int] = []
        sizes: list[int] = []
        carry, carry_size, n = b"", 0, 0

        def flush():
            table = pa.table({"path": pa.array([path] * len(lines), pa.string()),
                              "line": pa.array(numbers, pa.int64()), "raw": pa.array(lines, pa.binary()),
                              "bytes": pa.array(sizes, pa.int64())})
            lines.clear(), numbers.clear(), sizes.clear()
            return table

        while True:
            chunk = f.read(self.chunk_bytes)
            if not chunk:
                break
            parts = chunk.split(b"\n")
            for i, part in enumerate(parts):
                if i == len(parts) - 1:  # no newline yet: carry it (only a prefix once it is over-long)
                    if carry_size + len(part) <= self.max_line_bytes:
                        carry += part
                    else:
                        carry = (carry + part[:RAW_KEPT])[:RAW_KEPT]
                    carry_size += len(part)
                    break
                size = carry_size + len(part)
                line = carry + part if size <= self.max_line_bytes else (carry + part[:RAW_KEPT])[:RAW_KEPT]
                carry, carry_size = b"", 0
                n += 1
                if line.strip():
                    lines.append(line)
                    numbers.append(n), sizes.append(size)
                if len(lines) >= self.rows_per_block:
                    yield flush()
        if carry_size and carry.strip():
            lines.append(carry)
            numbers.append(n + 1), sizes.append(carry_size)
        if lines:
            yield flush()


def _uid(path: str, where) -> int:
    return xxhash.xxh64_intdigest(f"{path}\x00{where}".encode()) & 0x7FFFFFFFFFFFFFFF


def _row(id_, source, text, uid, reason=KEEP, detail="", raw=""):
    return {"id": id_, "source": source, "text": text, "raw": raw, "drop_reason": reason, "drop_detail": detail,
            "uid": uid}


def rows_frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=COLUMNS).astype(DTYPES)


def _stem(path: str) -> str:
    base = os.path.basename(path)
    for ext in COMPRESSED:
        base = base[: -len(ext)] if base.endswith(ext) else base
    return os.path.splitext(base)[0]


def _record(rec, spec: InputSpec, path: str, uid: int, raw: str) -> dict:
    """A decoded record -> a row, or a quarantined row naming what is wrong with it."""
    if not isinstance(rec, dict):
        return _row("", "", "", uid, "malformed:not_an_object", type(rec).__name__, raw)
    text, rid, src = rec.get(spec.text_key), rec.get(spec.id_key), rec.get("source")
    if text is None:
        return _row("", "", "", uid, "malformed:no_text", f"missing {spec.text_key!r}", raw)
    if not isinstance(text, str):
        return _row("", "", "", uid, "malformed:wrong_type", f"{spec.text_key!r} is {type(text).__name__}", raw)
    if rid is not None and not isinstance(rid, (str, int)):
        return _row("", "", "", uid, "malformed:wrong_type", f"{spec.id_key!r} is {type(rid).__name__}", raw)
    if src is not None and not isinstance(src, str):
        return _row("", "", "", uid, "malformed:wrong_type", f"'source' is {type(src).__name__}", raw)
    if not text.strip():
        return _row("", "", "", uid, "malformed:empty_text", "empty or whitespace-only text", raw)
    source = spec.source or src or _stem(path)
    # Absent ids come from a content hash (+ the record's place, so two copies of one text stay two records).
    rid = str(rid) if rid is not None else f"h{xxhash.xxh64_hexdigest(text.encode())}-{uid & 0xFFFFFF:06x}"
    return _row(rid, source, text, uid)


class ParseLines:
    """map_batches: raw JSONL lines -> rows; every line ends as a row, a bad one with a `malformed:*` reason."""

    def __init__(self, spec: InputSpec, max_line_bytes: int):
        self.spec, self.max_line_bytes = spec, max_line_bytes

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        rows = []
        for path, n, raw, size in zip(batch["path"], batch["line"], batch["raw"], batch["bytes"]):
            uid = _uid(path, n)
            shown = raw[:RAW_KEPT].decode("utf-8", errors="backslashreplace")
            if size > self.max_line_bytes:
                rows.append(_row("", "", "", uid, "malformed:oversized", f"line {n}: {size} bytes > "
                                 f"{self.max_line_bytes}", shown))
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                rows.append(_row("", "", "", uid, "malformed:undecodable", f"line {n}: {exc.reason} at byte "
                                 f"{exc.start}", shown))
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                rows.append(_row("", "", "", uid, "malformed:invalid_json", f"line {n}: {exc.msg} at char {exc.pos}",
                                 shown))
                continue
            rows.append(_record(rec, self.spec, path, uid, shown))
        return rows_frame(rows)


class ParseFiles:
    """map_batches over read_binary_files rows: one document per text file."""

    def __init__(self, spec: InputSpec, max_doc_bytes: int):
        self.spec, self.max_doc_bytes = spec, max_doc_bytes

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        rows = []
        for path, data in zip(batch["path"], batch["bytes"]):
            uid, shown = _uid(path, 0), data[:RAW_KEPT].decode("utf-8", errors="backslashreplace")
            if len(data) > self.max_doc_bytes:
                rows.append(_row("", "", "", uid, "malformed:oversized", f"{len(data)} bytes", shown))
                continue
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                rows.append(_row("", "", "", uid, "malformed:undecodable", f"{exc.reason} at byte {exc.start}",
                                 shown))
                continue
            rows.append(_record({self.spec.text_key: text, self.spec.id_key: _stem(path)}, self.spec, path, uid,
                                shown))
        return rows_frame(rows)


class ParseTable:
    """map_batches over Parquet rows: the configured text/id columns; wrong types are quarantined."""

    def __init__(self, spec: InputSpec):
        self.spec = spec

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        rows = []
        cols = [c for c in batch.columns if c != "path"]
        for rec in batch.to_dict("records"):
            path = rec.pop("path", "")
            content = json.dumps({k: rec.get(k) for k in cols}, default=str)
            rows.append(_record(rec, self.spec, path, _uid(path, content), content[:RAW_KEPT]))
        return rows_frame(rows)


def read_input(spec: InputSpec, max_line_bytes: int, wrap=lambda fn: fn):
    """One input spec -> a Ray Dataset of rows (COLUMNS); `wrap` decorates the parse step (timing)."""
    import ray

    parts = []
    for fmt, files in expand(spec).items():
        if fmt == "jsonl":
            # half a CPU: reading and splitting lines is light next to the operators fused after it
            ds = ray.data.read_datasource(JsonLinesBytes(files, max_line_bytes=max_line_bytes),
                                          ray_remote_args={"num_cpus": 0.5})
            parts.append(ds.map_batches(wrap(ParseLines(spec, max_line_bytes)), batch_format="pandas"))
        elif fmt == "text":
            ds = ray.data.read_binary_files(files, include_paths=True)
            parts.append(ds.map_batches(wrap(ParseFiles(spec, max_line_bytes)), batch_format="pandas"))
        elif fmt == "parquet":
            ds = ray.data.read_parquet(files, include_paths=True)
            parts.append(ds.map_batches(wrap(ParseTable(spec)), batch_format="pandas"))
        else:
            raise ValueError(f"input {spec.path!r}: unknown format {fmt!r} (jsonl, parquet or text)")
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


# ---------------------------------------------------------------- normalisation
_CONTROL = {c: None for c in range(0x20) if c not in (0x09, 0x0A)} | {c: None for c in range(0x7F, 0xA0)}


def normalize_text(text: str, spec: NormalizeSpec) -> str:
    if spec.nfc:
        text = unicodedata.normalize("NFC", text)
    if spec.whitespace:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        lines = [ln.rstrip() for ln in text.split("\n")]
        out, blank = [], 0
        for ln in lines:
            blank = blank + 1 if not ln else 0
            if blank <= 1:
                out.append(ln)
        text = "\n".join(out).strip("\n")
    if spec.control_chars:
        text = text.translate(_CONTROL)
    return text


class Normalize:
    def __init__(self, spec: NormalizeSpec):
        self.spec = spec

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        alive = (batch["drop_reason"] == KEEP).to_numpy()
        texts = batch["text"].to_numpy(dtype=object).copy()
        texts[alive] = [normalize_text(t, self.spec) for t in texts[alive]]
        batch = batch.copy()
        batch["text"] = strings(texts, batch.index)
        empty = alive & np.array([not t for t in texts], dtype=bool)
        batch.loc[empty, "drop_reason"] = "malformed:empty_text"
        batch.loc[empty, "drop_detail"] = "empty after normalisation"
        return batch
