"""expand_vocab: domain tokens added to a trained model, compression measured, the model usable downstream."""
from pathlib import Path

import pytest
import torch

from raylm.config import load_config
from raylm.models import load_model, load_tokenizer
from raylm.runs import RunStore
from raylm.stage import execute

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def recipe(stage):
    import importlib

    return importlib.import_module(f"pipelines.{stage}")


def _check_expanded(store, run_id, base_model_uri):
    m = store.load(run_id)
    x = m.metrics
    assert m.status == "succeeded" and x["n_tokens_added"] == len(x["tokens_added"]) > 0
    assert x["vocab_size_after"] == x["vocab_size_before"] + x["n_tokens_added"]
    assert x["tokens_per_char_domain_after"] < x["tokens_per_char_domain_before"]
    assert x["compression_gain_domain"] > 0
    assert x["compression_gain_general"] is None or x["compression_gain_general"] >= 0
    for key in ("domain_loss_before", "domain_loss_mean_init", "domain_loss_random_init",
                "domain_nll_per_char_before", "domain_nll_per_char_mean_init", "domain_nll_per_char_random_init"):
        assert x[key] > 0
    # what later stages load: the model, its tokenizer, the mean-initialised rows
    uri = m.outputs["model"].uri
    tok, model, base = load_tokenizer(uri), load_model(uri), load_model(base_model_uri)
    assert len(tok) == model.config.vocab_size == model.get_input_embeddings().weight.shape[0]
    assert len(load_tokenizer(m.outputs["tokenizer"].uri)) == len(tok)
    old_emb = base.get_input_embeddings().weight
    emb = model.get_input_embeddings().weight
    for token, pieces in x["token_pieces"].items():
        tid = tok.convert_tokens_to_ids(token)
        ids = load_tokenizer(base_model_uri).convert_tokens_to_ids(pieces)
        assert torch.allclose(emb[tid], old_emb[ids].mean(0), atol=1e-6)
        if token.startswith(" "):  # used in running prose
            assert tid in tok(f"and the{token}, again", add_special_tokens=False)["input_ids"]
    return m


def test_stage_on_a_hand_made_store(ray_cluster, tmp_path):
    """No lifecycle needed: a tiny model and a curate-shaped dataset written by hand."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raylm.config import ModelSpec
    from raylm.models import build_model, train_tokenizer

    general = ["The cat sat on the mat and looked at the garden for a long time.",
               "We walked to the market in the morning, bought bread and came home."]
    domain = ["In the leaf, photosynthesis needs chlorophyll; without chlorophyll there is no photosynthesis.",
              "The mitochondria make energy for the cell, and the ribosome builds a protein in the cell."]
    store = RunStore(tmp_path / "runs")
    with store.start_run("pretrain", {"note": "hand-made tiny model"}) as model_run:
        out = Path(store.root) / model_run.id / "model"
        tok = train_tokenizer(general * 20, vocab_size=500)
        build_model(ModelSpec(overrides={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                         "num_attention_heads": 2, "num_key_value_heads": 1}), tok).save_pretrained(out)
        tok.save_pretrained(out)
        model_run.add_artifact("model", "model", model_run.uri("model"))
    splits = {"text_train": [("bio", t) for t in domain * 5] + [("web", t) for t in general * 5],
              "text_val": [("bio", domain[0]), ("web", general[1])]}
    with store.start_run("curate", {"note": "hand-made"}) as data_run:
        for split, rows in splits.items():
            (Path(store.root) / data_run.id / "data" / split).mkdir(parents=True)
            table = pa.Table.from_pylist([{"id": f"{split}{i}", "source": s, "text": t}
                                          for i, (s, t) in enumerate(rows)])
            pq.write_table(table, Path(store.root) / data_run.id / "data" / split / "part-0.parquet")
        data_run.add_artifact("dataset", "dataset", data_run.uri("data"))
    cfg = load_config(recipe("expand_vocab").Config, None, [
        f"root={store.root}", f"inputs.model={model_run.id}", f"inputs.dataset={data_run.id}", "source=[bio]",
        "mine.k=8", "mine.min_freq=3", "tokens=[ribosome]"])
    m = _check_expanded(store, execute(recipe("expand_vocab"), cfg), model_run.uri("model"))
    x = m.metrics
    assert {" ribosome", " photosynthesis", " chlorophyll"} <= set(x["tokens_added"])
    assert x["heldout_domain_docs"] == 1 and x["heldout_general_docs"] == 1 and x["mine_docs"] == 10
    assert x["compression_gain_general"] == 0  # the general text has none of the domain words
    assert m.inputs[0].run_id == model_run.id and m.outputs["model"].meta["init"] == "mean"


def test_stage_on_the_lifecycle_model_and_sft_accepts_it(lifecycle):
    """The demo's pre-trained model, domain = the licence texts; then a short SFT run starts from the result."""
    store, runs = lifecycle["store"], lifecycle["runs"]
    cfg = load_config(recipe("expand_vocab").Config, REPO / "pipelines/configs/expand_vocab/tiny.yaml", [
        f"root={store.root}", f"inputs.model={runs['pretrain']}", f"inputs.dataset={runs['curate']}"])
    run_id = execute(recipe("expand_vocab"), cfg)
    base = store.load(runs["pretrain"]).outputs["model"].uri
    x = _check_expanded(store, run_id, base).metrics
    assert x["n_tokens_added"] >= 32 and x["compression_gain_domain"] > 0.02
    # mean init keeps the model's per-character loss near the original's (measured: 1.63 -> 1.56 nats/char on the
    # licence texts; random-init rows gave the same on this 1.3 M-parameter model)
    assert abs(x["domain_nll_per_char_mean_init"] - x["domain_nll_per_char_before"]) < 0.2
    sft = load_config(recipe("sft").Config, REPO / "pipelines/configs/sft/tiny.yaml", [
        f"root={store.root}", f"inputs.model={run_id}", f"inputs.dataset={runs['curate']}", "train.max_steps=2",
        "train.eval_every=2", "resources.num_workers=1", "optim.warmup_steps=1"])
    m = store.load(execute(recipe("sft"), sft))
    assert m.status == "succeeded"
    assert load_model(m.outputs["model"].uri).config.vocab_size == x["vocab_size_after"]
