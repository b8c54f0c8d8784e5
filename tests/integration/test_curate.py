"""The curate pipeline on small real files: every operator's outcome asserted on one shared run.

The run reads three inputs (a glob of gzip + zstd JSONL with planted near-duplicates and malformed lines, a Parquet
file of a second source, a directory of text files), forces the distributed connected-components path, mixes the two main sources
7:3 and packs with a tokenizer trained here. Each test checks one operator's effect on that run.
"""
from __future__ import annotations

import gzip
import json
import unicodedata

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylm.config import load_config
from raylm.data.synth import Generator, jaccard, planted_corpus, true_duplicates
from raylm.runs import RunStore
from raylm.stage import execute

pytestmark = pytest.mark.integration

EMAIL, CARD_OK, CARD_BAD = "jane.doe@example.org", "4111 1111 1111 1111", "4111 1111 1111 1112"


def cn_id(first17: str) -> str:
    weights = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2]
    return first17 + "10X98765432"[sum(int(c) * w for c, w in zip(first17, weights)) % 11]


ID_OK = cn_id("11010519491231002")
ID_BAD = ID_OK[:-1] + ("0" if ID_OK[-1] != "0" else "1")
CHINESE = ("数据清洗是训练大语言模型之前最重要的步骤之一。我们需要去除重复的文档，过滤低质量的网页，并且删除个人隐私信息。"
           "高质量的数据能够显著提升模型的效果，而低质量的数据会浪费大量的计算资源。因此，每一个步骤都应该被记录下来，"
           "以便之后检查和复现整个流程。在预训练阶段，团队通常会把领域数据和通用数据按照七比三的比例混合，"
           "这样既能学习专业知识，又能保留通用能力。分词器的压缩率也值得关注，它决定了同样的文本需要多少个词元。")
FRENCH = ("Le nettoyage des données est une étape essentielle avant l'entraînement d'un modèle de langue. Il faut "
          "supprimer les doublons, filtrer les pages de mauvaise qualité et retirer les informations personnelles. "
          "Des données de bonne qualité améliorent nettement les résultats du modèle final, et chaque étape doit "
          "être documentée pour que le processus reste reproductible.")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    recs, planted = planted_corpus(400, dup_fraction=0.3, hard_negative_fraction=0.05, seed=1, source="domain")
    g = Generator(seed=7)
    pii_text = (g.document(120) + f"\n\nWrite to {EMAIL} or call +1 415 555 0100. Card {CARD_OK}, not {CARD_BAD}. "
                f"ID {ID_OK}; the number {ID_BAD} fails its check digit.")
    extra = [{"id": "pii-1", "source": "domain", "text": pii_text},
             {"id": "zh-1", "source": "domain", "text": CHINESE},
             {"id": "fr-1", "source": "domain", "text": FRENCH},
             {"id": "lorem-1", "source": "domain", "text": "Lorem ipsum dolor sit amet. " + g.document(150)},
             {"id": "nfc-1", "source": "domain", "text": unicodedata.normalize("NFD", "Café résumé naïve. ")
              + g.document(150)}]
    lines = [json.dumps(r).encode() for r in recs + extra]
    bad = [b'{"id": "trunc-1", "text": "cut off in the mid',  # truncated JSON
           json.dumps({"id": "type-1", "text": 5}).encode(),  # wrong type
           json.dumps({"id": {"x": 1}, "text": "an id that is an object"}).encode(),  # wrong type
           b'{"id": "bytes-1", "text": "caf\xe9 latin-1 byte"}',  # undecodable
           json.dumps({"id": "huge-1", "text": "x " * 1_100_000}).encode(),  # a 2.2 MB line
           json.dumps({"id": "empty-1", "text": "   "}).encode(),
           json.dumps({"id": "notext-1", "body": "no text field"}).encode()]
    with gzip.open(d / "domain-a.jsonl.gz", "wb") as f:
        f.write(b"\n".join(lines[:200] + bad) + b"\n")
    import zstandard

    (d / "domain-b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b"\n".join(lines[200:]) + b"\n"))
    general = [{"id": f"gen{i:05d}", "text": g.document(g.rng.randint(150, 300))} for i in range(160)]
    pq.write_table(pa.Table.from_pylist(general), d / "general.parquet")
    (d / "notes").mkdir()
    for i in range(3):
        (d / "notes" / f"note{i}.txt").write_text(g.document(200))
    texts = [r["text"] for r in recs + general]
    return {"dir": d, "recs": recs + extra, "planted": planted, "general": general, "texts": texts}


@pytest.fixture(scope="module")
def curated(ray_cluster, corpus, tmp_path_factory):
    from pipelines import curate
    from raylm.models import train_tokenizer

    tok_dir = tmp_path_factory.mktemp("tok")
    train_tokenizer(corpus["texts"], vocab_size=600).save_pretrained(tok_dir)
    root = tmp_path_factory.mktemp("runs")
    d = corpus["dir"]
    cfg = load_config(curate.Config, None, [
        f"root={root}", "tasks.enabled=false", "val_percent=10",
        f'read=[{{path: "{d}/domain-*"}}, {{path: "{d}/general.parquet", source: general}}, '
        f'{{path: "{d}/notes", source: notes}}]',
        "mix.ratios={domain: 7, general: 3}", "mix.by=chars",
        "fuzzy_dedup.local_max_edges=0",  # the distributed components rounds, not the one-task finish
        f"tokens.tokenizer_path={tok_dir}", "pack.enabled=true", "pack.chunk_tokens=128", "pack.seq_len=256"])
    run_id = execute(curate, cfg)
    store = RunStore(root)
    m = store.load(run_id)
    print("curate timings", m.timings, m.metrics["dedup_graph"])
    data = m.outputs["dataset"].uri
    kept = pd.concat([pq.read_table(f"{data}/text_{s}").to_pandas() for s in ("train", "val")], ignore_index=True)
    excluded = pq.read_table(m.outputs["excluded"].uri).to_pandas()
    return {"m": m, "x": m.metrics, "kept": kept, "excluded": excluded, "data": data, "tok": str(tok_dir)}


def test_counts_add_up_per_operator_and_overall(curated):
    x, excluded = curated["x"], curated["excluded"]
    assert x["docs_in"] == x["docs_kept"] + x["docs_dropped"] + x["docs_quarantined"]
    assert x["docs_in"] == 400 + 5 + 7 + 160 + 3
    rows = x["funnel"]
    assert rows[0]["op"] == "read" and rows[0]["in"] == x["docs_in"]
    for prev, cur in zip(rows, rows[1:]):
        assert cur["in"] == prev["kept"]
    for r in rows:
        assert r["in"] == r["kept"] + r["removed"]
    assert rows[-1]["kept"] == x["docs_kept"]
    assert {"read", "language", "gopher", "c4", "repetition", "pii", "exact_dedup", "fuzzy_dedup",
            "paragraph_dedup", "mixing"} <= {r["op"] for r in rows}
    # every dropped or quarantined row is written with its reason
    assert len(excluded) == x["docs_dropped"] + x["docs_quarantined"]
    assert {"id", "drop_reason", "duplicate_of"} <= set(excluded.columns) and (excluded["drop_reason"] != "").all()


def test_malformed_records_are_quarantined_not_fatal(curated):
    q = curated["x"]["quarantine_reasons"]
    assert q == {"malformed:invalid_json": 1, "malformed:wrong_type": 2, "malformed:undecodable": 1,
                 "malformed:oversized": 1, "malformed:empty_text": 1, "malformed:no_text": 1}
    ex = curated["excluded"]
    raw = ex[ex["drop_reason"] == "malformed:undecodable"]["raw"].iat[0]
    assert "bytes-1" in raw  # the bad line is kept (bytes escaped), so nothing is lost


def test_planted_near_duplicates_are_removed_with_the_right_duplicate_of(curated, corpus):
    ex, kept = curated["excluded"], curated["kept"]
    dups = ex[ex["drop_reason"].isin(["exact_duplicate", "fuzzy_duplicate"])]
    by_id = {r["id"]: r["text"] for r in corpus["recs"]}
    # ground truth among the documents that reached deduplication (not dropped by a filter before it)
    before = ex[~ex["drop_reason"].isin(["exact_duplicate", "fuzzy_duplicate", "mixing.downsampled"])
                & ~ex["drop_reason"].str.startswith("paragraph_dedup")]
    alive = [r for r in corpus["recs"][:400] if r["id"] not in set(before["id"])]
    members: dict = {}
    for a, b in zip(dups["id"], dups["duplicate_of"]):
        members.setdefault(b, [b]).append(a)
    component_pairs = [(x, y) for m in members.values() for i, x in enumerate(m) for y in m[i + 1:]]
    alive_ids = {r["id"] for r in alive}
    truth = true_duplicates(alive, 0.8, candidates=[(a, b) for a, b in corpus["planted"] + component_pairs
                                                     if a in alive_ids and b in alive_ids])
    removed = set(dups["id"]) & alive_ids
    assert len(truth) > 50
    recall = len(removed & truth) / len(truth)
    precision = len(removed & truth) / len(removed)
    assert recall >= 0.9 and precision >= 0.9, (recall, precision)
    # duplicate_of names a document that was kept (the smallest id of its component) and really is similar
    assert set(dups["duplicate_of"]) <= set(by_id)
    assert (dups["duplicate_of"] < dups["id"]).all()
    survivors = {i.split("#rep")[0] for i in kept["id"]} | set(ex[ex["drop_reason"] == "mixing.downsampled"]["id"])
    assert set(dups["duplicate_of"]) <= survivors
    sims = [jaccard(by_id[a], by_id[b]) for a, b in zip(dups["id"], dups["duplicate_of"])]
    assert sum(s >= 0.5 for s in sims) / len(sims) > 0.9
    g = curated["x"]["dedup_graph"]
    assert g["cc_finished_locally"] is False and g["cc_rounds"] >= 1


def _text_of(curated, doc_id: str) -> str:
    """A document's final text, kept or dropped after the operators ran (mixing may down-sample it)."""
    for df in (curated["kept"], curated["excluded"]):
        hit = df[df["id"] == doc_id]
        if len(hit):
            return hit["text"].iat[0]
    raise KeyError(doc_id)


def test_quality_language_and_pii(curated):
    ex = curated["excluded"]
    reason = dict(zip(ex["id"], ex["drop_reason"]))
    assert reason["fr-1"] == "language.language" and reason["lorem-1"] == "c4.lorem_ipsum"
    # Chinese is kept by the language filter (keep: en, zh) and passes Gopher's CJK-aware rules
    assert reason.get("zh-1", "") in ("", "mixing.downsampled")
    text = _text_of(curated, "pii-1")
    assert EMAIL not in text and "<EMAIL>" in text and "<PHONE>" in text
    assert CARD_OK not in text and "<CREDIT_CARD>" in text and CARD_BAD in text  # Luhn fails: kept
    assert ID_OK not in text and "<CN_ID>" in text and ID_BAD in text  # check digit fails: kept
    assert curated["x"]["pii_replaced"]["email"] >= 1 and curated["x"]["pii_replaced"]["cn_id"] == 1
    assert reason.get("pii-1", "") in ("", "mixing.downsampled")
    assert _text_of(curated, "nfc-1").startswith(unicodedata.normalize("NFC", "Café résumé naïve."))


def test_mixing_hits_the_target_ratio(curated):
    mix = curated["x"]["mixing"]
    got = mix["achieved"]
    share = got["domain"] / (got["domain"] + got["general"])
    assert share == pytest.approx(0.7, abs=0.04), mix
    assert min(mix["rates"].values()) < 1 and max(mix["rates"].values()) == pytest.approx(1.0)  # down-sampling only
    assert "notes" in set(curated["kept"]["source"])  # an unlisted source passes unchanged


def test_tokens_and_packed_blocks_keep_document_boundaries(curated):
    from raylm.models import load_tokenizer

    x = curated["x"]
    assert x["tokens"]["total"] > 0 and 0.1 < x["tokens"]["tokens_per_char"]["domain"] < 1
    assert sum(x["tokens"]["histogram"].values()) == x["docs_kept"] + x["mixing"]["repeated_rows"]
    packed = pq.read_table(f"{curated['data']}/packed_train").to_pandas()
    eos = load_tokenizer(curated["tok"]).eos_token_id
    assert len(packed) == x["packed"]["train"]["blocks"] > 10
    assert x["packed"]["train"]["docs_split"] > 0  # documents longer than 128 tokens were chunked
    for ids, starts in zip(packed["input_ids"], packed["doc_starts"]):
        assert len(ids) == 256 and starts[0] == 0 and list(starts) == sorted(set(starts))
        assert all(ids[s - 1] == eos for s in starts[1:])  # every piece after the first follows an EOS


def test_pretrain_reads_the_packed_blocks_and_refuses_mismatched_ones(curated):
    from pipelines import pretrain
    from raylm.config import ConfigError

    data, tok = curated["data"], curated["tok"]
    cfg = load_config(pretrain.Config, None, ["train.seq_len=256"])
    assert pretrain.curated_blocks(data, tok, cfg) is True  # auto: same tokenizer and length
    assert cfg.doc_mask is True  # the default: attention masked across the recorded document starts
    plain = pretrain.read_blocks(f"{data}/packed_train", doc_mask=False).take_batch(4)
    assert set(plain) == {"input_ids", "labels"}
    assert plain["input_ids"].shape == (4, 256) and (plain["labels"] == plain["input_ids"]).all()

    import numpy as np

    from raylm.models import load_tokenizer

    eos = load_tokenizer(tok).eos_token_id
    blocks = pretrain.read_blocks(f"{data}/packed_train")
    batch = blocks.take_batch(16)
    assert all(batch[k].shape == (16, 256) and batch[k].dtype == "int64" for k in batch)
    for ids, labels, pos, seg in zip(batch["input_ids"], batch["labels"], batch["position_ids"], batch["segment_ids"]):
        starts = np.flatnonzero(pos == 0)  # positions restart exactly at the recorded document starts
        assert starts[0] == 0 and all(ids[s - 1] == eos for s in starts[1:])
        assert (seg == np.cumsum(pos == 0) - 1).all() and (np.diff(pos)[np.diff(seg) == 0] == 1).all()
        assert (labels[starts[1:]] == -100).all()
        keep = np.ones(256, bool)
        keep[starts[1:]] = False
        assert (labels[keep] == ids[keep]).all()
    # what pretrain logs as docs_per_block: the mean number of recorded starts per block
    want = pq.read_table(f"{data}/packed_train", columns=["doc_starts"]).to_pandas()["doc_starts"].map(len).mean()
    assert pretrain.docs_per_block(blocks) == pytest.approx(want) and want > 1
    assert pretrain.curated_blocks(data, tok, load_config(pretrain.Config, None, ["train.seq_len=128"])) is False
    with pytest.raises(ConfigError, match="blocks are 256 tokens"):
        pretrain.curated_blocks(data, tok, load_config(pretrain.Config, None, ["train.seq_len=128",
                                                                              "use_packed=true"]))
