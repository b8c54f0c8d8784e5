"""Quality filters (Gopher, C4, repetition, language) and PII redaction on small real texts."""
import pickle

import pandas as pd
import pytest
from pydantic import ValidationError

from raylm.data.filters import KEEP, ApplyFilters, MinChars
from raylm.data.pii import PiiSpec, RedactPii, redact
from raylm.data.quality import (C4Quality, C4Spec, GopherQuality, GopherSpec, LanguageFilter, LanguageSpec,
                                RepetitionFilter, RepetitionSpec, explain, words_of)

EN = ("The river that runs through the old town has shaped its history for centuries. Farmers brought their "
      "grain to the mills along its banks, and merchants built warehouses where the water was deep enough for "
      "boats. In the spring the snow melts in the mountains and the river rises quickly, so the town learned to "
      "build its houses on stone foundations. Today the mills have become museums, and visitors walk along the "
      "paths that once carried flour to the market. Local historians have collected letters and maps that show "
      "how the town grew with the trade.")
ZH = ("北京是中华人民共和国的首都，也是全国的政治、文化和国际交往中心。这座城市有三千多年的建城史和八百多年的建都史，"
      "拥有故宫、天坛、颐和园等众多名胜古迹。每年都有大量游客来到这里参观游览，了解中国悠久的历史和灿烂的文化。"
      "近年来，北京在科技创新和城市建设方面也取得了显著的成就。")
FR = ("La rivière qui traverse la vieille ville a façonné son histoire pendant des siècles. Les paysans apportaient "
      "leur grain aux moulins installés sur ses rives, et les marchands construisaient des entrepôts là où l'eau "
      "était assez profonde pour les bateaux. Au printemps, la neige fond dans les montagnes et la rivière monte "
      "rapidement, si bien que la ville a appris à bâtir ses maisons sur des fondations de pierre.")

FILTERS = [GopherQuality(GopherSpec()), C4Quality(C4Spec()), RepetitionFilter(RepetitionSpec()),
           LanguageFilter(LanguageSpec())]


def doc(text):
    return {"id": "t/0", "source": "test", "text": text}


def reason(f, text):
    """drop_reason as the pipeline records it ("" = kept)."""
    return explain(f, f.filter(doc(text)))[0]


# ---------------------------------------------------------------- words and verdicts
def test_words_of():
    assert words_of("Hello, world! don't stop... os.path.join(a, b) 3.14 -- __init__") == [
        "Hello", "world", "don't", "stop", "os.path.join", "a", "b", "3.14", "init"]
    assert words_of("北京是首都。ok") == ["北", "京", "是", "首", "都", "ok"]


def test_explain_handles_every_verdict_convention():
    f = MinChars(10)
    assert explain(f, True) == ("", "")
    assert explain(f, (False, "too short")) == ("min_chars", "too short")
    assert explain(GopherQuality(), (False, "word_count", "word count 3 < 20")) == ("gopher.word_count",
                                                                                   "word count 3 < 20")


def test_normal_english_paragraph_passes_every_filter():
    assert [f.filter(doc(EN)) for f in FILTERS] == [True, True, True, True]


def test_chinese_passes_gopher_and_language():
    assert GopherQuality().filter(doc(ZH)) is True  # 124 one-character words, no English stop words needed
    assert LanguageFilter().filter(doc(ZH)) is True
    assert LanguageFilter().detect(ZH)[0] == "zh"
    assert C4Quality().filter(doc(ZH)) is True  # 。 is terminal punctuation
    assert RepetitionFilter().filter(doc(ZH)) is True


def test_apply_filters_records_filter_and_rule():
    batch = pd.DataFrame({"id": ["1", "2", "3", "4"], "source": "s", "raw": "", "drop_detail": "",
                          "drop_reason": KEEP, "text": [EN, FR, "\n\n".join([EN] * 3), "Too short."]})
    gopher, c4, repetition, language = FILTERS
    # language first: Gopher's English stop-word rule would otherwise be the one to name the French document
    out = ApplyFilters([MinChars(20), language, gopher, c4, repetition])(batch)
    assert list(out["drop_reason"]) == [KEEP, "language.language", "repetition.dup_para_frac", "min_chars"]
    assert list(out["drop_detail"]) == ["", "detected fr (1.00) not in [en, zh]", "duplicate paragraphs 0.67 > 0.3",
                                        "shorter than 20 chars"]
    assert len(pickle.dumps(FILTERS)) < 10_000  # cheap to ship to Ray workers


# ---------------------------------------------------------------- Gopher
def test_gopher_word_count():
    g = GopherQuality()
    assert g.filter(doc("Return the value of the field, or None when it was never set.")) == (
        False, "word_count", "word count 13 < 20")
    assert GopherQuality(GopherSpec(max_words=50)).filter(doc(EN)) == (False, "word_count", "word count 96 > 50")


def test_gopher_mean_word_length():
    assert reason(GopherQuality(), "to be or no go by me " * 5) == "gopher.mean_word_length"
    long = "internationalization characteristically institutionalisation uncharacteristically " * 6
    verdict = GopherQuality().filter(doc(long))
    assert verdict[:2] == (False, "mean_word_length") and verdict[2].endswith("> 10.0")


def test_gopher_symbol_word_ratio():
    assert GopherQuality().filter(doc(EN + " #travel" * 12)) == (
        False, "symbol_word_ratio", "'#' per word 0.111 > 0.1")
    assert GopherQuality().filter(doc(EN + " Wait" + "..." * 12 + " end.")) == (
        False, "symbol_word_ratio", "ellipses per word 0.122 > 0.1")


def test_gopher_bullet_and_ellipsis_lines():
    bullets = "\n".join(f"• the item {w} with a price" for w in
                        ["apple", "pear", "plum", "fig", "kiwi", "lime", "date", "melon"])
    assert GopherQuality().filter(doc(bullets)) == (False, "bullet_lines", "bullet lines 1.00 > 0.9")
    trailing = "\n".join(f"the story of the {w} went on and on for a long while and then…" for w in
                         ["king", "queen", "miller", "farmer", "sailor"])
    assert GopherQuality().filter(doc(trailing))[:2] == (False, "ellipsis_lines")


def test_gopher_alpha_words_and_stop_words():
    numbers = "the values of the table are " + " ".join(str(i * 37) for i in range(40))
    assert GopherQuality().filter(doc(numbers)) == (False, "alpha_words", "words with a letter 0.13 < 0.8")
    # ("within" contains "with" but is no stop word)
    no_stop = ("Quick brown foxes jump over lazy dogs while bright stars shine above quiet hills. Children play "
               "in gardens near rivers, singing songs about distant mountains within reach.")
    assert GopherQuality().filter(doc(no_stop)) == (False, "stop_words", "stop words 0 < 1")
    assert reason(GopherQuality(GopherSpec(min_stop_words=2)), no_stop + " Then the night fell.") == "gopher.stop_words"
    assert GopherQuality(GopherSpec(enabled=False)).filter(doc("x")) is True


# ---------------------------------------------------------------- C4
def test_c4_document_rules():
    c4 = C4Quality()
    assert c4.filter(doc(EN + " Lorem ipsum dolor sit amet.")) == (False, "lorem_ipsum", "contains 'lorem ipsum'")
    assert c4.filter(doc(EN + " Use {name} as a placeholder.")) is True  # curly brackets allowed by default
    assert C4Quality(C4Spec(drop_curly_bracket=True)).filter(doc(EN + " {x}")) == (
        False, "curly_bracket", "contains '{'")
    assert c4.filter(doc(EN + " What the FUCK was that?")) == (False, "bad_words", "contains bad word 'fuck'")
    assert c4.filter(doc(EN + " The team from Scunthorpe won.")) is True  # whole words only
    assert C4Quality(C4Spec(bad_words=[])).filter(doc(EN + " shit.")) is True


def test_c4_terminal_punctuation():
    menu = "\n".join(["Home", "About us", "Products and services", "Contact", "Careers", "Press"] * 4)
    assert C4Quality().filter(doc(menu)) == (False, "terminal_punct",
                                             "lines ending in terminal punctuation 0.00 < 0.05")
    assert C4Quality(C4Spec(min_terminal_punct_ratio=0.0)).filter(doc(menu)) is True
    wrapped = "It was said (as the report notes.)\n" + "\n".join(["a line that wraps mid sentence and"] * 15)
    assert C4Quality().filter(doc(wrapped)) is True  # 1/16 lines: '.)' ends a sentence
    # a line mentioning javascript is one C4 would delete, so it does not count as a good line
    js = "Please enable JavaScript to continue.\n" + "\n".join(["a line that wraps mid sentence and"] * 15)
    assert C4Quality().filter(doc(js))[:2] == (False, "terminal_punct")


# ---------------------------------------------------------------- repetition
def test_repetition_catches_a_repeated_paragraph():
    assert RepetitionFilter().filter(doc("\n\n".join([EN] * 3))) == (
        False, "dup_para_frac", "duplicate paragraphs 0.67 > 0.3")


def test_repetition_rules():
    lines = ["Buy cheap watches online today.", "Best prices on the market.", "Free shipping worldwide."]
    assert reason(RepetitionFilter(), "\n".join(lines * 4)) == "repetition.dup_line_frac"
    spam = " ".join(f"cheap watches {w}" for w in ["red", "blue", "gold", "steel", "black", "white", "green",
                                                   "pink", "grey", "brown", "silver", "sport", "dress", "smart",
                                                   "retro", "diver", "pilot", "field", "racing", "kids"])
    assert reason(RepetitionFilter(), spam + ".") == "repetition.top_2_gram"
    assert reason(RepetitionFilter(), EN + " " + EN) == "repetition.dup_5_gram"  # one paragraph, one line
    # the n-gram rules need >= 50 words: a short docstring saying a phrase twice is fine
    short = "Test if the address is a loopback address.\n\nReturns True if the address is a loopback address."
    assert RepetitionFilter().filter(doc(short)) is True
    assert reason(RepetitionFilter(RepetitionSpec(ngram_min_words=5)), short) == "repetition.top_3_gram"


# ---------------------------------------------------------------- language
def test_language_filter():
    lang = LanguageFilter()
    assert lang.filter(doc(FR)) == (False, "language", "detected fr (1.00) not in [en, zh]")
    assert LanguageFilter(LanguageSpec(keep=[])).filter(doc(FR)) is True
    assert LanguageFilter(LanguageSpec(keep=["fr"])).filter(doc(EN))[1] == "language"
    assert lang.filter(doc(">>> x = f(3, 4)\n7\n>>> y = [1, 2]\n")) [1] == "low_score"
    code, score = lang.detect(EN)
    assert code == "en" and 0.99 < score <= 1.0
    # all-capitals legal text is lowercased before identification (py3langid alone scores it ~0.05)
    shout = ("16. Limitation of Liability.\n\nIN NO EVENT UNLESS REQUIRED BY APPLICABLE LAW OR AGREED TO IN WRITING "
             "WILL ANY COPYRIGHT HOLDER BE LIABLE TO YOU FOR DAMAGES, INCLUDING ANY GENERAL, SPECIAL, INCIDENTAL OR "
             "CONSEQUENTIAL DAMAGES ARISING OUT OF THE USE OR INABILITY TO USE THE PROGRAM.")
    assert lang.filter(doc(shout)) is True


def test_language_filter_pickles_without_its_model():
    lang = LanguageFilter()
    lang.detect(EN)  # loads the identifier
    blob = pickle.dumps(lang)
    assert len(blob) < 2000
    assert pickle.loads(blob).detect(FR)[0] == "fr"


def test_specs_reject_unknown_keys():
    with pytest.raises(ValidationError):
        GopherSpec(min_wordz=10)
    with pytest.raises(ValidationError):
        PiiSpec(types=["ssn"])


# ---------------------------------------------------------------- PII
def cn_id(first17: str) -> str:
    """A Chinese resident ID with its ISO 7064 MOD 11-2 check character (computed here, independently)."""
    total = sum(int(d) * (2 ** (17 - i) % 11) for i, d in enumerate(first17))
    return first17 + "10X98765432"[total % 11]


VALID_ID = cn_id("11010519491231002")  # Beijing Dongcheng, born 1949-12-31 -> check character X
WRONG_ID = VALID_ID[:17] + "3"


def test_cn_id_helper():
    assert VALID_ID == "11010519491231002X"
    assert cn_id("44052418800101001") == "440524188001010014"  # the two examples of GB 11643-1999


def test_redact_replaces_valid_items():
    text = (f"Write to jane.doe@example.com or ops@mail.example.co.uk. The server is 192.168.0.1 and "
            f"2001:db8::8a2e:370:7334. Pay with 4111 1111 1111 1111 or 3782 822463 10005. ID {VALID_ID}. "
            f"Call +1 415 555 2671, (415) 555-2671, 415-555-2671 or 13812345678.")
    out, counts = redact(text)
    assert out == ("Write to <EMAIL> or <EMAIL>. The server is <IPV4> and <IPV6>. Pay with <CREDIT_CARD> or "
                   "<CREDIT_CARD>. ID <CN_ID>. Call <PHONE>, <PHONE>, <PHONE> or <PHONE>.")
    assert counts == {"email": 2, "phone": 4, "ipv4": 1, "ipv6": 1, "credit_card": 2, "cn_id": 1}


def test_redact_chinese_context():
    text = f"手机13812345678，身份证号{VALID_ID}，邮箱wang@example.cn。"
    assert redact(text) == ("手机<PHONE>，身份证号<CN_ID>，邮箱<EMAIL>。",
                            {"email": 1, "phone": 1, "ipv4": 0, "ipv6": 0, "credit_card": 0, "cn_id": 1})
    assert redact("拨打+86 138 1234 5678。")[0] == "拨打<PHONE>。"


def test_redact_keeps_look_alikes():
    text = (f"Card 4111 1111 1111 1112 and 4111111111111112, ID {WRONG_ID} and 110105194902301234, "
            f"IP 999.1.1.1, version 1.2.3.4.5, slice a[1::2], std::vector, 12:30:45, MAC 00:1A:2B:3C:4D:5E, "
            f"order 138123456789, pi 0.1000000000000000055511151231257827, total +35236450.6.")
    out, counts = redact(text)
    assert out == text
    assert sum(counts.values()) == 0


def test_redact_types_subset_and_unknown():
    text = "mail a@b.io from 10.0.0.1"
    assert redact(text, ["ipv4"]) == ("mail a@b.io from <IPV4>", {"ipv4": 1})
    with pytest.raises(ValueError, match="ssn"):
        redact(text, ["ssn"])


def test_redact_pii_operator():
    batch = pd.DataFrame({"id": ["1", "2"], "source": "s", "raw": "", "drop_detail": ["", "too short"],
                          "text": ["mail a@b.io or 10.0.0.1", "mail c@d.io"], "drop_reason": ["", "min_chars"]})
    out = RedactPii(PiiSpec())(batch)
    assert list(out["text"]) == ["mail <EMAIL> or <IPV4>", "mail c@d.io"]  # dropped rows are left alone
    assert list(out["pii_email"]) == [1, 0] and list(out["pii_ipv4"]) == [1, 0]
    assert [c for c in out.columns if c.startswith("pii_")] == [
        "pii_email", "pii_phone", "pii_ipv4", "pii_ipv6", "pii_credit_card", "pii_cn_id"]
    assert out["pii_email"].dtype == "int64"
    assert list(batch["text"]) == ["mail a@b.io or 10.0.0.1", "mail c@d.io"]  # input not modified
    off = RedactPii(PiiSpec(enabled=False, types=["email"]))(batch)
    assert list(off["text"]) == list(batch["text"]) and list(off["pii_email"]) == [0, 0]
