"""curate on the smallest inputs (issue 16): an empty file, only malformed lines, one document, all duplicates, near
duplicates. Each is a successful run whose counts add up, whose splits all exist (with their columns, also at zero
rows), and whose duplicates are gone. Tasks are off but in one run, which also turns on tokens, mixing and packing.
"""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from raylm.config import load_config
from raylm.data.synth import Generator
from raylm.runs import RunStore
from raylm.stage import execute

pytestmark = pytest.mark.integration

TINY = "pipelines/configs/curate/tiny.yaml"
DUPLICATE_REASONS = {"exact_duplicate", "fuzzy_duplicate", "paragraph_dedup.emptied"}


@pytest.fixture(scope="module")
def texts():
    g = Generator(seed=16)
    return [g.document(g.rng.randint(140, 180)) for _ in range(2)]  # 900-1200 chars of English-like prose


def near_copies(text: str, n: int) -> list[str]:
    """`text` and n - 1 copies that each differ from it in one word (a different word each): Jaccard ~0.9."""
    words = text.split(" ")
    out = [text]
    for i in range(1, n):
        w = list(words)
        w[7 * i] = "zebra"
        out.append(" ".join(w))
    return out


def lines_of(case: str, texts: list[str]) -> list[str]:
    if case == "empty":
        return []
    if case == "malformed":
        return ['{"id": "cut", "text": "truncated', "[1, 2]", json.dumps({"id": "n", "text": 5}),
                json.dumps({"id": "e", "text": "   "}), json.dumps({"id": "x", "body": "no text"})]
    if case in ("single", "tasks"):
        return [json.dumps({"id": "d0", "text": texts[0]})]
    if case == "all_duplicates":
        return [json.dumps({"id": f"d{i}", "text": texts[1]}) for i in range(6)]
    if case == "near_duplicates":
        return [json.dumps({"id": f"d{i:02d}", "text": t}) for i, t in enumerate(near_copies(texts[0], 10))]
    raise ValueError(case)


@pytest.fixture(scope="module")
def tokenizer(texts, tmp_path_factory):
    from raylm.models import train_tokenizer

    d = tmp_path_factory.mktemp("tok")
    g = Generator(seed=1)
    train_tokenizer(texts + [g.document(200) for _ in range(30)], vocab_size=400).save_pretrained(d)
    return str(d)


def curate_file(tmp_path, lines: list[str], *overrides: str):
    from pipelines import curate

    src = tmp_path / "small.jsonl"
    src.write_text("".join(line + "\n" for line in lines))
    root = tmp_path / "runs"
    cfg = load_config(curate.Config, TINY, [f"source={src}", f"root={root}", *overrides])
    m = RunStore(str(root)).load(execute(curate, cfg))
    assert m.status == "succeeded"
    return m


def check_counts(m, n_in: int) -> dict:
    """in = kept + dropped + quarantined, overall and chained through the funnel; every split readable."""
    x = m.metrics
    assert x["docs_in"] == n_in == x["docs_kept"] + x["docs_dropped"] + x["docs_quarantined"]
    assert sum(x["drop_reasons"].values()) == x["docs_dropped"]
    assert sum(x["quarantine_reasons"].values()) == x["docs_quarantined"]
    rows = x["funnel"]
    assert rows[0]["op"] == "read" and rows[0]["in"] == n_in and rows[-1]["kept"] == x["docs_kept"]
    for prev, cur in zip(rows, rows[1:]):
        assert cur["in"] == prev["kept"]
    assert all(r["in"] == r["kept"] + r["removed"] for r in rows)
    data = m.outputs["dataset"].uri
    for name, n in x["splits"].items():  # an empty split is there too, with its columns
        t = pq.read_table(f"{data}/{name}")
        assert t.num_rows == n, name
        if name.startswith("text_"):
            assert t.column_names == ["id", "source", "text"]
    empty = {name for name, n in x["splits"].items() if not n}
    assert empty == {w.split()[1] for w in x["warnings"] if w.startswith("split ")}
    return x


@pytest.mark.parametrize("case,n_in,n_kept", [("empty", 0, 0), ("malformed", 5, 0), ("single", 1, 1),
                                              ("all_duplicates", 6, 1), ("near_duplicates", 10, 1)])
def test_small_inputs_succeed_and_add_up(ray_cluster, texts, tmp_path, case, n_in, n_kept):
    m = curate_file(tmp_path, lines_of(case, texts), "tasks.enabled=false")
    x = check_counts(m, n_in)
    assert x["docs_kept"] == n_kept
    if case == "malformed":
        assert x["docs_quarantined"] == 5 and x["docs_dropped"] == 0
    if case in ("all_duplicates", "near_duplicates"):
        assert set(x["drop_reasons"]) <= DUPLICATE_REASONS and x["docs_dropped"] == n_in - 1
        train = pq.read_table(f"{m.outputs['dataset'].uri}/text_train").to_pandas()
        val = pq.read_table(f"{m.outputs['dataset'].uri}/text_val").to_pandas()
        assert list(train["id"]) + list(val["id"]) == [sorted(json.loads(ln)["id"] for ln in lines_of(case, texts))[0]]
    if case == "all_duplicates":
        assert x["drop_reasons"] == {"exact_duplicate": 5}
    if not n_kept:
        assert x["splits"]["text_train"] == x["splits"]["text_val"] == 0


def test_single_document_with_tasks_tokens_mixing_and_packing(ray_cluster, texts, tokenizer, tmp_path):
    """Too few documents for the text-made task family: the run succeeds and says why it is missing."""
    m = curate_file(tmp_path, lines_of("tasks", texts), "tasks.per_family=10", f"tokens.tokenizer_path={tokenizer}",
                    "mix.ratios={small: 1}", "pack.enabled=true", "pack.seq_len=128", "pack.chunk_tokens=64")
    x = check_counts(m, 1)
    assert x["docs_kept"] == 1 and x["mixing"]["rates"] == {"small": 1.0}
    assert x["tokens"]["total"] > 0 and x["packed"]["val"]["blocks"] == x["splits"]["packed_val"]
    assert x["splits"]["tasks_train"] > 0 and x["splits"]["tasks_test"] > 0
    assert {"add", "parity", "larger", "next"} <= set(x["task_families"])
    assert "repeat" in x["task_families"] or any("'repeat'" in w for w in x["warnings"])
    assert x["splits"]["text_train"] + x["splits"]["text_val"] == 1 + x["per_source"]["tasks"]["docs"]


def test_operators_keep_their_column_types_at_zero_rows():
    """What an input without records writes for the next pass: the operators' own columns, typed (pandas makes a
    column assigned from an empty list float64, and `drop_reason == ""` then failed in Arrow)."""
    import pyarrow as pa

    from pipelines import curate
    from raylm.data.mix import MixSpec, mix_rates

    cfg = load_config(curate.Config, TINY, ["tasks.enabled=false"])
    docs, annotated = curate._empty_schemas(curate._operators(cfg), cfg, None)
    text = lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)  # noqa: E731 - pandas 2 / pandas 3
    for schema in (docs, annotated):
        assert all(text(schema.field(c).type) for c in ("id", "text", "drop_reason", "node"))
        assert pa.types.is_int64(schema.field("chars").type) and pa.types.is_int64(schema.field("pii_email").type)
    assert docs.field("sig").type == pa.binary() and docs.field("para_hashes").type == pa.list_(pa.int64())
    assert text(annotated.field("duplicate_of").type)
    assert mix_rates(MixSpec(ratios={"web": 1}), {}) == {}  # nothing kept: nothing to mix, not an error
