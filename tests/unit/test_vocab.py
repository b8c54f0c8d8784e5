"""Vocabulary expansion (raylm.vocab): mined domain words, mean-initialised rows, single-id encoding, compression."""
import pytest
import torch

from raylm import vocab as V
from raylm.config import ModelSpec
from raylm.models import build_model, load_model, load_tokenizer, train_tokenizer

GENERAL = [
    "The cat sat on the mat and looked at the garden for a long time.",
    "We walked to the market in the morning, bought bread and came home.",
    "She wrote a letter to her friend about the weather and the trip.",
    "A small boat crossed the river while the children played on the bank.",
    "He said that the plan was good, but the money was not there yet.",
    "They built a house near the road, with a red door and two windows.",
]
DOMAIN_WORDS = ["photosynthesis", "chlorophyll", "mitochondria", "ribosome"]
DOMAIN = [
    "In the leaf, photosynthesis needs chlorophyll; without chlorophyll there is no photosynthesis.",
    "The mitochondria make energy for the cell, and each ribosome builds a protein.",
    "Plants use photosynthesis. The ribosome and the mitochondria are parts of the cell.",
    "chlorophyll is green. photosynthesis (in plants) and mitochondria (in cells) store energy.",
]


@pytest.fixture()
def tiny():
    tok = train_tokenizer(GENERAL * 20, vocab_size=500)
    model = build_model(ModelSpec(overrides={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                             "num_attention_heads": 2, "num_key_value_heads": 1}), tok)
    return model, tok


def _rows(model):
    return model.get_input_embeddings().weight.detach().clone(), model.get_output_embeddings().weight.detach().clone()


def test_mining_ranks_domain_words_by_tokens_saved(tiny):
    _, tok = tiny
    rows = V.mine_candidates(DOMAIN * 3, tok, k=50, min_freq=3)
    assert rows and all(r["pieces"] >= 2 and r["saved"] == r["freq"] * (r["pieces"] - 1) for r in rows)
    assert [r["saved"] for r in rows] == sorted((r["saved"] for r in rows), reverse=True)
    mined = V.mine_domain_tokens(DOMAIN * 3, tok, k=50, min_freq=3)
    assert mined == [r["token"] for r in rows]
    # the words as they stand in prose: with their leading space (ByteLevel), and the bare form seen at a line start
    assert {" photosynthesis", " chlorophyll", " mitochondria", " ribosome", "chlorophyll"} <= set(mined)
    assert V.mine_domain_tokens(DOMAIN * 3, tok, k=2, min_freq=3) == mined[:2]
    assert " photosynthesis" not in V.mine_domain_tokens(DOMAIN, tok, k=50, min_freq=100)


def test_expand_initialises_new_rows_from_the_mean_of_their_pieces(tiny):
    model, tok = tiny
    emb0, out0 = _rows(model)
    n0 = len(tok)
    info = V.expand(model, tok, DOMAIN_WORDS)
    # each bare word comes with its leading-space variant (what running prose contains)
    assert set(info["added"]) == set(DOMAIN_WORDS) | {" " + w for w in DOMAIN_WORDS}
    assert len(tok) == n0 + len(info["added"]) == info["vocab_after"] == model.config.vocab_size
    emb, out = _rows(model)
    assert emb.shape[0] == out.shape[0] == len(tok) and not info["tied"]
    assert torch.equal(emb[:n0], emb0) and torch.equal(out[:n0], out0)  # old rows untouched
    for token, tid in zip(info["added"], info["ids"]):
        pieces = info["pieces"][token]
        assert len(pieces) >= 2 and tid >= n0
        assert torch.allclose(emb[tid], emb0[pieces].mean(0)) and torch.allclose(out[tid], out0[pieces].mean(0))
    V.init_rows(model, info, "random")
    emb_r, _ = _rows(model)
    assert not torch.allclose(emb_r[info["ids"][0]], emb[info["ids"][0]])
    assert torch.equal(emb_r[:n0], emb0)


def _check_single_ids(tok, info, old_tok):
    text = ("Here photosynthesis happens. Chlorophyll? Yes: the chlorophyll, and\nchlorophyll again; "
            "mitochondria!")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    new = dict(zip(info["added"], info["ids"]))
    for word in (" photosynthesis", " chlorophyll", "chlorophyll", " mitochondria"):
        assert new[word] in ids
    assert ids.count(new[" chlorophyll"]) == 1 and ids.count(new["chlorophyll"]) == 1
    assert tok.decode(ids) == text  # the new tokens decode to the text they came from (spaces included)
    assert len(ids) < len(old_tok(text, add_special_tokens=False)["input_ids"])
    # a bare word only matches a whole word: not inside "subchlorophyll" nor at the start of "chlorophylls"
    for word in ("subchlorophyll", "(chlorophylls)"):
        assert tok(word, add_special_tokens=False)["input_ids"] == old_tok(word, add_special_tokens=False)["input_ids"]


def test_new_tokens_encode_as_single_ids_in_running_text_and_compression_improves(tiny):
    model, tok = tiny
    old = train_tokenizer(GENERAL * 20, vocab_size=500)
    before_dom, before_gen = V.compression(DOMAIN, tok), V.compression(GENERAL, tok)
    info = V.expand(model, tok, V.mine_domain_tokens(DOMAIN * 3, tok, k=20, min_freq=3))
    _check_single_ids(tok, info, old)
    assert V.compression(DOMAIN, tok) < 0.85 * before_dom
    assert V.compression(GENERAL, tok) == before_gen
    # no text gets longer: added tokens only match whole words
    for text in GENERAL + DOMAIN:
        assert len(tok(text)["input_ids"]) <= len(old(text)["input_ids"])
    # the chat template still renders
    assert tok.apply_chat_template([{"role": "user", "content": "photosynthesis"}], tokenize=False)


def test_a_bare_word_never_splits_a_one_token_spaced_word(tiny):
    model, tok = tiny
    # " the" is one token, "the" at the start of a line is not guaranteed to be: a bare added "the" would turn
    # every " the" in prose into " " + "the" (two tokens where there was one)
    words = [w for w in ("the", "and", "The", "market", "garden")
             if len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1
             and len(tok(w, add_special_tokens=False)["input_ids"]) >= 2]
    assert words, "the test corpus should give such a word"
    old = [tok(t, add_special_tokens=False)["input_ids"] for t in GENERAL]
    info = V.expand(model, tok, words)
    assert info["added"] == [] and set(words) <= set(info["skipped"])
    assert [tok(t, add_special_tokens=False)["input_ids"] for t in GENERAL] == old
    assert not set(words) & set(V.mine_domain_tokens(["\n".join(words * 10)] * 5, tok, k=10, min_freq=1))


def test_mining_drops_a_word_that_costs_more_in_longer_words_than_it_saves(tiny):
    _, tok = tiny
    assert len(tok(" garden", add_special_tokens=False)["input_ids"]) == 1
    assert len(tok(" gard", add_special_tokens=False)["input_ids"]) >= 2
    # a spaced token matches the start of longer words: " gard" would split every " garden" into two tokens
    net = V.net_saved(tok, [" gard"], {" gard": 2, " garden": 10, " gardens": 1})
    assert net[" gard"] < 0
    texts = ["the gard is near the garden; the garden, the garden and the garden."] * 4 + DOMAIN
    rows = V.mine_candidates(texts, tok, k=50, min_freq=3)
    assert " gard" not in [r["token"] for r in rows] and " photosynthesis" in [r["token"] for r in rows]
    assert all(r["net_saved"] > 0 for r in rows)
    # what mining keeps really saves that many tokens on its text
    old = sum(len(i) for i in tok(texts, add_special_tokens=False)["input_ids"])
    V.expand(build_model(ModelSpec(overrides={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                              "num_attention_heads": 2, "num_key_value_heads": 1}), tok),
             tok, [r["token"] for r in rows])
    assert old - sum(len(i) for i in tok(texts, add_special_tokens=False)["input_ids"]) == sum(
        r["net_saved"] for r in rows)


def test_expanded_model_survives_save_and_reload(tiny, tmp_path):
    model, tok = tiny
    old = train_tokenizer(GENERAL * 20, vocab_size=500)
    info = V.expand(model, tok, DOMAIN_WORDS)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    tok2, model2 = load_tokenizer(str(tmp_path)), load_model(str(tmp_path))
    assert len(tok2) == len(tok) == model2.config.vocab_size
    assert tok2.convert_tokens_to_ids(info["added"]) == info["ids"]
    _check_single_ids(tok2, info, old)
    for a, b in zip(_rows(model), _rows(model2)):
        assert torch.equal(a, b)
    assert tok2(DOMAIN)["input_ids"] == tok(DOMAIN)["input_ids"]
    # pretrain's `model.path` route loads it too
    assert build_model(ModelSpec(path=str(tmp_path))).config.vocab_size == len(tok)
    # a second expansion of the reloaded model adds nothing it already has
    assert V.expand(model2, tok2, DOMAIN_WORDS)["added"] == []


def test_tied_embeddings_and_spare_rows(tiny):
    from transformers import AutoModelForCausalLM

    model, tok = tiny
    cfg = model.config.to_dict() | {"tie_word_embeddings": True}
    tied = AutoModelForCausalLM.from_config(type(model.config).from_dict(cfg))
    n0 = len(tok)
    tied.resize_token_embeddings(n0 + 64, mean_resizing=False)  # a checkpoint with padded (spare) rows
    emb0 = tied.get_input_embeddings().weight.detach().clone()
    info = V.expand(tied, tok, ["photosynthesis"])
    assert info["tied"] and info["rows_before"] == info["rows_after"] == n0 + 64  # no resize needed
    emb = tied.get_input_embeddings().weight
    assert tied.get_output_embeddings().weight.data_ptr() == emb.data_ptr()
    for token, tid in zip(info["added"], info["ids"]):
        assert n0 <= tid < n0 + 64 and torch.allclose(emb[tid], emb0[info["pieces"][token]].mean(0))


def test_text_loss_predicts_every_token_once(tiny):
    model, tok = tiny
    n = sum(len(i) for i in tok(DOMAIN, add_special_tokens=False)["input_ids"])
    x = V.text_loss(model, tok, DOMAIN, seq_len=7, batch_size=3)  # windows shorter than the documents
    y = V.text_loss(model, tok, DOMAIN, seq_len=512)
    assert x["tokens"] == y["tokens"] == n and x["chars"] == sum(map(len, DOMAIN))
    assert x["loss"] > 0 and abs(x["nll_per_char"] - x["loss"] * n / x["chars"]) < 1e-3


def test_stage_config_needs_something_to_add():
    from pipelines import expand_vocab as stage
    from raylm.config import ConfigError, load_config

    cfg = load_config(stage.Config, None, ["mine=null"])
    with pytest.raises(ConfigError, match="nothing to add"):
        stage.check({}, cfg)
    assert load_config(stage.Config, None, ["tokens=[foo]", "mine=null"]).tokens == ["foo"]
