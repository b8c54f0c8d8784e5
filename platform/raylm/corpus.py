"""The bundled real-text corpus, built at run time from text every machine has.

Sources: CPython's pydoc help topics, docstrings of the standard library (read with `ast`, nothing imported),
and the licence texts under /usr/share/common-licenses (several are the same file under two names: real exact
duplicates for the dedup step). Documents are paragraph groups of at most `max_chars` characters.
"""
from __future__ import annotations

import ast
import os
import sysconfig
from pathlib import Path
from typing import Iterator

LICENSES = Path("/usr/share/common-licenses")


def _chunks(text: str, max_chars: int) -> Iterator[str]:
    buf: list[str] = []
    size = 0
    for para in text.split("\n\n"):
        para = para.strip("\n")
        if not para.strip():
            continue
        if buf and size + len(para) > max_chars:
            yield "\n\n".join(buf)
            buf, size = [], 0
        buf.append(para[:max_chars])
        size += len(para) + 2
    if buf:
        yield "\n\n".join(buf)


def pydoc_topics(max_chars: int) -> Iterator[dict]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        for i, chunk in enumerate(_chunks(topics[name], max_chars)):
            yield {"id": f"pydoc/{name}/{i}", "source": "pydoc_topics", "text": chunk}


def stdlib_docstrings(max_files: int) -> Iterator[dict]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py"))[:max_files]
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    name = getattr(node, "name", "<module>")
                    yield {"id": f"stdlib/{path.stem}/{name}/{node.lineno if hasattr(node, 'lineno') else 0}",
                           "source": "stdlib_docstrings", "text": doc}


def licenses(max_chars: int) -> Iterator[dict]:
    if not LICENSES.is_dir():
        return
    for path in sorted(LICENSES.iterdir()):
        if path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace")
            for i, chunk in enumerate(_chunks(text, max_chars)):
                yield {"id": f"license/{path.name}/{i}", "source": "licenses", "text": chunk}


SOURCES = {
    "pydoc_topics": lambda cfg: pydoc_topics(cfg.max_chars_per_doc),
    "stdlib_docstrings": lambda cfg: stdlib_docstrings(cfg.max_stdlib_files),
    "licenses": lambda cfg: licenses(cfg.max_chars_per_doc),
}


def builtin_records(cfg) -> list[dict]:
    unknown = set(cfg.sources) - set(SOURCES)
    if unknown:
        raise ValueError(f"unknown builtin source(s) {sorted(unknown)}; choose from {sorted(SOURCES)}")
    out: list[dict] = []
    for name in cfg.sources:
        out.extend(SOURCES[name](cfg))
    return out


def stdlib_dir() -> str:
    return os.fspath(sysconfig.get_paths()["stdlib"])
