"""Instruction data formats (raylm.data.tokenize.ChatExamples): prompt/answer, alpaca, sharegpt and OpenAI
messages, multi-turn, with loss only on the assistant turns; the ChatML template or the plain fallback."""
from __future__ import annotations

import pandas as pd
import pytest

from raylm.data.tokenize import ChatExamples, chat_tokens, conversation_tokens
from raylm.losses import IGNORE

TURNS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 4?"},
         {"role": "assistant", "content": "6"}, {"role": "user", "content": "Is 3 even or odd?"},
         {"role": "assistant", "content": "odd"}]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from raylm.models import train_tokenizer

    d = tmp_path_factory.mktemp("tok")
    text = "What is 2 plus 4? The answer is 6. Is 3 even or odd? odd. Be brief."
    train_tokenizer([text] * 20, 300).save_pretrained(d)
    return str(d)


def spans(tok, ids, labels) -> list[str]:
    """The decoded runs of labelled tokens."""
    out, cur = [], []
    for i, lab in zip(ids, labels):
        if lab == IGNORE:
            if cur:
                out.append(tok.decode(cur))
            cur = []
        else:
            assert lab == i
            cur.append(i)
    return out + ([tok.decode(cur)] if cur else [])


def rows_of(batch: dict, i: int, tok):
    n = int(batch["attention_mask"][i].sum())
    return list(batch["input_ids"][i][:n]), list(batch["labels"][i][:n])


ROWS = {
    "openai": {"messages": TURNS},
    "sharegpt": {"conversations": [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[t["role"]],
                                    "value": t["content"]} for t in TURNS]},
}


@pytest.mark.parametrize("fmt", ["openai", "sharegpt"])
def test_multi_turn_formats_label_only_assistant_turns(fmt, tok_dir):
    op = ChatExamples(tok_dir, 96)
    out = op(pd.DataFrame([ROWS[fmt]]))
    ids, labels = rows_of(out, 0, op.tok)
    text = op.tok.decode(ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 plus 4?")
    assert spans(op.tok, ids, labels) == ["6<|im_end|>", "odd<|im_end|>"]
    assert ChatExamples(tok_dir, 96, format=fmt)(pd.DataFrame([ROWS[fmt]]))["labels"].tolist() == out["labels"].tolist()


def test_alpaca_with_and_without_input_and_system(tok_dir):
    op = ChatExamples(tok_dir, 96)
    df = pd.DataFrame([{"instruction": "Add the numbers.", "input": "2 and 4", "output": "6", "system": "Be brief."},
                       {"instruction": "Is 3 even or odd?", "input": None, "output": "odd", "system": None}])
    out = op(df)
    ids, labels = rows_of(out, 0, op.tok)
    assert "user\nAdd the numbers.\n\n2 and 4<|im_end|>" in op.tok.decode(ids)
    assert "<|im_start|>system\nBe brief." in op.tok.decode(ids)
    assert spans(op.tok, ids, labels) == ["6<|im_end|>"]
    ids, labels = rows_of(out, 1, op.tok)
    assert not op.tok.decode(ids).startswith("<|im_start|>system")
    assert spans(op.tok, ids, labels) == ["odd<|im_end|>"]


def test_prompt_answer_path_is_unchanged(tok_dir):
    """Other stages depend on the one-turn output: it is still exactly `chat_tokens`', and the general
    multi-turn renderer agrees with it on one turn."""
    op = ChatExamples(tok_dir, 48)
    out = op(pd.DataFrame({"prompt": ["What is 2 plus 4?"], "answer": ["6"], "family": ["addition"]}))
    ids, labels = chat_tokens(op.tok, "What is 2 plus 4?", "6", 48)
    assert rows_of(out, 0, op.tok) == (ids, labels)
    assert conversation_tokens(op.tok, TURNS[1:3], 48) == (ids, labels)


def test_plain_fallback_without_a_chat_template(tok_dir):
    op = ChatExamples(tok_dir, 96)
    op.tok.chat_template = None
    ids, labels = rows_of(op(pd.DataFrame([ROWS["openai"]])), 0, op.tok)
    assert op.tok.decode(ids).startswith("System: Be brief.\n\nUser: What is 2 plus 4?\n\nAssistant: 6<|endoftext|>")
    assert [s.strip() for s in spans(op.tok, ids, labels)] == ["6<|endoftext|>", "odd<|endoftext|>"]


def test_bad_rows_fail_clearly(tok_dir):
    op = ChatExamples(tok_dir, 48)
    with pytest.raises(ValueError, match=r"no known instruction format: it has columns \['question', 'reply'\]"):
        op(pd.DataFrame({"question": ["hi"], "reply": ["hello"]}))
    with pytest.raises(ValueError, match="sharegpt turn .*'from': one of"):
        op(pd.DataFrame([{"conversations": [{"from": "bot", "value": "hi"}]}]))
    with pytest.raises(ValueError, match="without an assistant turn"):
        op(pd.DataFrame([{"messages": [{"role": "user", "content": "hi"}]}]))
    with pytest.raises(ValueError, match=r"alpaca row lacks \['output'\]"):
        ChatExamples(tok_dir, 48, format="alpaca")(pd.DataFrame([{"instruction": "hi", "output": None}]))
    with pytest.raises(ValueError, match="unknown instruction format 'chatml'"):
        ChatExamples(tok_dir, 48, format="chatml")
