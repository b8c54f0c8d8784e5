"""Rewards for online RL: the registered functions, failure handling, composition, HTTP judge, reward model."""
import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from pydantic import ValidationError

from raylm.rl import rewards as R
from raylm.rl.rewards import CompositeReward, RewardSpec, safe_score


# ---------------------------------------------------------------- functions
@pytest.mark.parametrize("response,answer,expected", [
    ("12", "12", 1.0), ("  Even. ", "even", 1.0), ("odd", "even", 0.0), ("12 apples", "12", 0.0),
])
def test_exact_match(response, answer, expected):
    assert R.REWARDS["exact_match"]("p", response, {"answer": answer}) == expected


@pytest.mark.parametrize("response,answer,expected", [
    ("The answer is 12.", "12", 1.0),
    ("1e3", "1000", 1.0),
    ("first 3, then -4", "-4", 1.0),
    ("first 12, then 13", "12", 0.0),  # the last number counts
    ("2.5000000001", "2.5", 1.0),
    ("2.51", "2.5", 0.0),
    ("a total of 1,000", "1000", 1.0),
    ("no number here", "12", 0.0),
    ("12", "twelve", 0.0),  # answer not numeric
])
def test_numeric(response, answer, expected):
    assert R.REWARDS["numeric"]("p", response, {"answer": answer}) == expected


def test_numeric_tolerance_param():
    assert R.REWARDS["numeric"]("p", "3.2", {"answer": "3"}, tol=0.5) == 1.0
    assert R.REWARDS["numeric"]("p", "3.2", {"answer": "3"}) == 0.0


def test_format_default_and_custom_pattern():
    fmt = R.REWARDS["format"]
    assert fmt("p", " 42 ", {}) == 1.0
    assert fmt("p", "the answer is 42", {}) == 0.0
    assert fmt("p", "Answer: 42", {}, pattern=r"Answer: \d+") == 1.0
    assert fmt("p", "Answer: 42 because", {}, pattern=r"Answer: \d+") == 0.0  # fullmatch, not search


def test_format_invalid_regex_rejected_at_construction():
    with pytest.raises(ValueError, match="invalid regex"):
        RewardSpec(name="format", params={"pattern": "(unclosed"})


CODE_TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"


def test_code_tests_passes_correct_and_fails_wrong():
    record = {"answer": "", "tests": CODE_TESTS}
    fenced = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    assert R.REWARDS["code_tests"]("p", fenced, record) == 1.0
    assert R.REWARDS["code_tests"]("p", "def add(a, b):\n    return a + b\n", record) == 1.0
    assert R.REWARDS["code_tests"]("p", "def add(a, b):\n    return a - b\n", record) == 0.0
    assert R.REWARDS["code_tests"]("p", "def add(a, b) return", record) == 0.0  # syntax error
    with pytest.raises(ValueError, match="no `tests`"):  # a task without asserts is a failure, not a free 1.0
        R.REWARDS["code_tests"]("p", "print(1)", {"answer": ""})


@pytest.mark.parametrize("escape", ["import sys\nsys.exit(0)", "exit()", "import os\nos._exit(0)"])
def test_code_tests_gives_no_reward_for_exiting_before_the_asserts(escape):
    record = {"tests": "assert add(2, 3) == 5"}
    assert R.code_tests("", f"def add(a, b):\n    return a - b\n{escape}\n", record) == 0.0  # a reward hack


@pytest.mark.skipif(R.resource is None, reason="no RLIMIT_AS here")
def test_code_tests_memory_limit_fails_a_huge_allocation():
    record = {"answer": "", "tests": "assert len(x) > 0"}
    big = "x = bytearray(4 * 1024 ** 3)\n"  # 4 GB, over the 256 MB limit
    assert R.REWARDS["code_tests"]("p", big, record, memory_mb=256) == 0.0


def test_code_tests_infinite_loop_times_out():
    record = {"answer": "", "tests": CODE_TESTS}
    spec = RewardSpec(name="code_tests", params={"timeout": 1.0}, timeout_s=5.0)
    start = time.monotonic()
    result = CompositeReward([spec]).score(["p"], ["while True:\n    pass\n"], [record])
    assert time.monotonic() - start < 1.0 + 2.0
    assert result.rewards == [0.0]
    assert result.failures == {"code_tests:timeout": 1}
    with pytest.raises(R.RewardTimeout):
        R.REWARDS["code_tests"]("p", "while True:\n    pass\n", record, timeout=0.5)


# ---------------------------------------------------------------- safe_score
def test_safe_score_success_passes_params():
    assert safe_score(lambda p, r, rec, k=1: 0.25 * k, "p", "r", {}, {"k": 2}, timeout=1) == (0.5, None)


def test_safe_score_raising_function():
    assert safe_score(lambda p, r, rec: 1 / 0, "p", "r", {}, timeout=1) == (0.0, "error:ZeroDivisionError")


@pytest.mark.parametrize("value,reason", [(math.nan, "nan"), (math.inf, "nan"), ("1.0", "not_a_number"),
                                          (None, "not_a_number"), ([1.0], "not_a_number")])
def test_safe_score_bad_values(value, reason):
    assert safe_score(lambda p, r, rec: value, "p", "r", {}, timeout=1) == (0.0, reason)


def test_safe_score_reward_timeout_exception_is_timeout():
    def fn(p, r, rec):
        raise R.RewardTimeout("slow")
    assert safe_score(fn, "p", "r", {}, timeout=1) == (0.0, "timeout")


def test_safe_score_hung_function_returns_after_timeout():
    start = time.monotonic()
    assert safe_score(lambda p, r, rec: time.sleep(30), "p", "r", {}, timeout=0.2) == (0.0, "timeout")
    assert time.monotonic() - start < 2.0


# ---------------------------------------------------------------- specs and composition
def test_reward_spec_unknown_name_lists_choices():
    with pytest.raises(ValidationError) as e:
        RewardSpec(name="foo")
    msg = str(e.value)
    assert "unknown reward 'foo'" in msg
    assert "code_tests, exact_match, format, http_judge, numeric, reward_model" in msg
    assert isinstance(e.value, ValueError)


def test_reward_spec_rejects_unknown_keys_and_params():
    with pytest.raises(ValidationError):
        RewardSpec(name="numeric", wieght=2.0)
    with pytest.raises(ValidationError, match="unknown params"):
        RewardSpec(name="numeric", params={"tolerance": 0.1})
    with pytest.raises(ValidationError, match="needs params"):
        RewardSpec(name="http_judge", params={"url": "http://127.0.0.1:1/v1"})  # no model


def test_composite_reward_model_needs_a_path():
    with pytest.raises(ValueError, match="reward_model_path"):
        CompositeReward([RewardSpec(name="reward_model")])


def test_composite_weighted_sum_and_failure_counts():
    specs = [RewardSpec(name="exact_match", weight=1.0), RewardSpec(name="format", weight=0.5)]
    records = [{"answer": "12"}, {"answer": "odd"}, {"answer": "7"}]
    responses = ["12", "it is odd", "8"]
    result = CompositeReward(specs).score(["p"] * 3, responses, records)
    assert result.components == {"exact_match": [1.0, 0.0, 0.0], "format": [1.0, 0.0, 1.0]}
    assert result.rewards == pytest.approx([1.5, 0.0, 0.5])
    assert result.failures == {}

    # a failing component: numeric on a record without "answer" raises KeyError for that response only
    specs = [RewardSpec(name="format", weight=0.5), RewardSpec(name="numeric", weight=2.0)]
    records = [{"answer": "12"}, {}, {"answer": "7"}]
    result = CompositeReward(specs).score(["p"] * 3, ["12", "12", "8"], records)
    assert result.rewards == pytest.approx([2.5, 0.5, 0.5])
    assert result.failures == {"numeric:error:KeyError": 1}
    failed = sum(v for k, v in result.failures.items() if k.startswith("numeric:"))
    succeeded = sum(1 for i in range(3) if records[i])
    assert failed + succeeded == 3
    assert result.failure_examples == [{"reward": "numeric", "reason": "error:KeyError", "response": "12"}]


def test_composite_failure_examples_are_capped():
    def always_fails(prompt, response, record):
        raise RuntimeError("boom")
    R.register("_test_always_fails")(always_fails)
    try:
        result = CompositeReward([{"name": "_test_always_fails"}]).score(["p"] * 8, ["x" * 500] * 8, [{}] * 8)
    finally:
        del R.REWARDS["_test_always_fails"]
    assert result.rewards == [0.0] * 8
    assert result.failures == {"_test_always_fails:error:RuntimeError": 8}
    assert len(result.failure_examples) == 5 and len(result.failure_examples[0]["response"]) == 200


# ---------------------------------------------------------------- http judge
@pytest.fixture
def judge_server():
    """A stdlib OpenAI-style server; set `state["reply"]` to the judge's message content."""
    state = {"reply": "Score: 7", "requests": []}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state["requests"].append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
            data = json.dumps({"choices": [{"message": {"role": "assistant", "content": state["reply"]}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state["url"] = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield state
    server.shutdown()
    server.server_close()


def test_http_judge_scores_and_sends_model_and_response(judge_server):
    params = {"url": judge_server["url"], "model": "judge-7b", "api_key": "secret"}
    reward = R.REWARDS["http_judge"]("What is 2+2?", "It is four.", {"answer": "4"}, **params)
    assert reward == pytest.approx(0.7)
    (req,) = judge_server["requests"]
    assert req["path"] == "/v1/chat/completions"
    assert req["body"]["model"] == "judge-7b"
    assert req["body"]["temperature"] == 0 and req["body"]["max_tokens"] == 8
    content = req["body"]["messages"][0]["content"]
    assert "It is four." in content and "What is 2+2?" in content
    assert req["auth"] == "Bearer secret"


def test_http_judge_clamps(judge_server):
    judge_server["reply"] = "15"
    assert R.REWARDS["http_judge"]("p", "r", {}, url=judge_server["url"], model="m") == 1.0


def test_http_judge_unparseable_reply_is_a_counted_failure(judge_server):
    judge_server["reply"] = "no idea"
    spec = RewardSpec(name="http_judge", params={"url": judge_server["url"], "model": "m"}, timeout_s=5)
    result = CompositeReward([spec, RewardSpec(name="exact_match")]).score(["p", "q"], ["4", "5"],
                                                                          [{"answer": "4"}, {"answer": "4"}])
    assert result.failures == {"http_judge:error:ValueError": 2}
    assert result.rewards == [1.0, 0.0]
    with pytest.raises(ValueError, match="judge reply has no score"):
        R.REWARDS["http_judge"]("p", "r", {}, url=judge_server["url"], model="m")


def test_http_judge_unreachable_server_is_a_counted_failure():
    import socket
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = RewardSpec(name="http_judge", params={"url": f"http://127.0.0.1:{port}/v1", "model": "m", "timeout": 2})
    result = CompositeReward([spec]).score(["p"], ["r"], [{}])
    assert result.rewards == [0.0]
    assert list(result.failures) == ["http_judge:error:URLError"]


# ---------------------------------------------------------------- reward model
@pytest.fixture(scope="module")
def tiny_reward_model(tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from raylm.models import train_tokenizer

    path = tmp_path_factory.mktemp("rm")
    tok = train_tokenizer(["some text about numbers 1 2 3 and words like even odd larger repeat"] * 50,
                          vocab_size=300)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=tok.pad_token_id, num_labels=1)
    torch.manual_seed(0)
    LlamaForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_reward_model_scorer(tiny_reward_model):
    scorer = R.RewardModelScorer(tiny_reward_model, device="cpu")
    prompts = ["What is 1 plus 2?", "Is 3 even or odd?", "Repeat the word: words"]
    responses = ["3", "odd odd odd odd odd odd", "words"]
    scores = scorer.score(prompts, responses)
    assert len(scores) == 3 and all(isinstance(s, float) and math.isfinite(s) for s in scores)
    assert scorer.score(prompts[:1], responses[:1]) == pytest.approx(scores[:1], abs=1e-5)  # padding-independent
    assert scorer.score(prompts[:1], responses[:1]) == scorer.score(prompts[:1], responses[:1])
    assert len(set(scores)) > 1


def test_composite_with_reward_model_and_its_failure(tiny_reward_model):
    specs = [RewardSpec(name="reward_model", weight=2.0), RewardSpec(name="exact_match")]
    comp = CompositeReward(specs, reward_model_path=tiny_reward_model)
    result = comp.score(["p", "q"], ["3", "4"], [{"answer": "3"}, {"answer": "3"}])
    rm = result.components["reward_model"]
    assert result.rewards == pytest.approx([2 * rm[0] + 1.0, 2 * rm[1]])
    assert result.failures == {}

    def broken(prompts, responses):
        raise RuntimeError("CUDA out of memory")
    comp.reward_model.score = broken
    result = comp.score(["p", "q"], ["3", "4"], [{"answer": "3"}, {"answer": "3"}])
    assert result.components["reward_model"] == [0.0, 0.0]
    assert result.rewards == [1.0, 0.0]
    assert result.failures == {"reward_model:error:RuntimeError": 2}
