"""Rewards for online RL, registered by name, with failure handling that never stops a rollout.

A reward function scores one sampled response::

    fn(prompt: str, response: str, record: dict, **params) -> float

where `record` is the task row (it has at least "answer"; code tasks also have "tests"). Adding a reward = one
registered function + one test. Rewards are combined by `CompositeReward` from a list of `RewardSpec`
(name, weight, params, timeout_s); "reward_model" is a further component name served by `RewardModelScorer`.

Failure handling is the point: a reward function may raise, return NaN or a non-number, or hang (a judge server
that never answers, a generated program that loops). `safe_score` turns each of these into a reward of 0.0 plus a
failure reason, and `CompositeReward` counts the reasons per component so a run can report them instead of dying.

Timeouts: `safe_score` runs the function in its own daemon thread and waits at most `timeout` seconds, so the
caller never hangs. Python cannot kill a thread: a pure-Python hang (``while True: pass`` inside a reward
function) leaves that thread running in the background (it is a daemon thread, so it does not block interpreter
exit). Rewards that run untrusted code must bound themselves: `code_tests` runs the program in `raylm.sandbox`, a
subprocess with its own timeout whose process group is killed when it expires.
"""
from __future__ import annotations

import inspect
import json
import math
import numbers
import re
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from pydantic import field_validator, model_validator

from raylm import sandbox, tasks
from raylm.config import Section

resource = sandbox.resource  # None where RLIMIT_AS does not exist (no memory limit there)

REWARDS: dict[str, Callable[..., float]] = {}
REWARD_MODEL = "reward_model"
MAX_FAILURE_EXAMPLES = 5


class RewardTimeout(Exception):
    """A reward function ran out of time (counted as a failure with reason "timeout")."""


def register(name: str):
    def deco(fn):
        REWARDS[name] = fn
        return fn
    return deco


def valid_names() -> list[str]:
    return sorted({*REWARDS, REWARD_MODEL})


# ---------------------------------------------------------------- reward functions
NUMBER_RE = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}\b)")


@register("exact_match")
def exact_match(prompt: str, response: str, record: dict) -> float:
    """1.0 if the response equals the answer after `raylm.tasks.normalize` (case, spaces, final period)."""
    return 1.0 if tasks.exact_match(response, str(record["answer"])) else 0.0


@register("numeric")
def numeric(prompt: str, response: str, record: dict, tol: float = 1e-6) -> float:
    """1.0 if the last number in the response is within `tol` (absolute) of the numeric answer.

    Numbers may be signed, decimal or in scientific notation ("1e3" == 1000); thousands separators ("1,000") are
    accepted. 0.0 if the response has no number or the answer is not numeric.
    """
    try:
        target = float(str(record["answer"]).strip().replace(",", ""))
    except ValueError:
        return 0.0
    found = NUMBER_RE.findall(_THOUSANDS_RE.sub("", response))
    if not found or not math.isfinite(target):
        return 0.0
    value = float(found[-1])
    return 1.0 if abs(value - target) <= tol else 0.0


@register("format")
def format_(prompt: str, response: str, record: dict, pattern: str = r"^\s*\S+\s*$") -> float:
    """1.0 if the whole response matches the regex `pattern` (default: one short token, no spaces inside)."""
    return 1.0 if re.fullmatch(pattern, response, re.S) else 0.0


_FENCE_RE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.S | re.I)


def extract_code(response: str) -> str:
    """The first ```python (or bare ```) fenced block of the response, else the whole response."""
    m = _FENCE_RE.search(response)
    return m.group(1) if m else response


@register("code_tests")
def code_tests(prompt: str, response: str, record: dict, timeout: float = 5.0, memory_mb: int = 512) -> float:
    """1.0 if the response's program followed by `record["tests"]` (Python asserts) exits with status 0.

    The program runs in `raylm.sandbox` (shared with the evaluation harness's pass@k): `sys.executable -I`
    (isolated: no user site, no PYTHON* variables) in a fresh temporary directory, stdout discarded, address space
    limited to `memory_mb` (where RLIMIT_AS is supported), in its own process group. Past `timeout` seconds the
    whole group is killed and `RewardTimeout` is raised. Strict: a program that exits (status 0) before the
    asserts have run scores 0, or a policy would learn to `sys.exit(0)` for full reward.
    """
    if not str(record.get("tests") or "").strip():  # running the answer with no asserts would reward any program
        raise ValueError("code_tests: the record has no `tests` to run")
    program = extract_code(response).rstrip() + "\n\n" + str(record["tests"]) + "\n"
    result = sandbox.run_program(program, timeout=timeout, memory_mb=memory_mb, strict=True)
    if result.status == "timeout":
        raise RewardTimeout(f"program ran past {timeout}s")
    return 1.0 if result.passed else 0.0


DEFAULT_JUDGE_TEMPLATE = (
    "Rate how well the response answers the prompt, on a scale from 0 (wrong or unhelpful) to 10 (correct and "
    "helpful). Reply with the number only.\n\nPrompt:\n{prompt}\n\nResponse:\n{response}\n\nScore:"
)
_SCORE_RE = re.compile(r"[-+]?\d+(?:\.\d+)?")
_PLACEHOLDER_RE = re.compile(r"\{(prompt|response)\}")


@register("http_judge")
def http_judge(prompt: str, response: str, record: dict, url: str, model: str,
               template: str = DEFAULT_JUDGE_TEMPLATE, max_score: float = 10.0, timeout: float = 10.0,
               api_key: str | None = None) -> float:
    """A judge model behind an OpenAI-compatible server (vLLM, Ray Serve LLM, ...): score / max_score in [0, 1].

    POSTs `{url}/chat/completions` (url like http://host:8000/v1) with the judge prompt (`template` with {prompt}
    and {response} filled in; other braces are left as they are), temperature 0 and max_tokens 8, and reads the
    first number of the reply, clamped to [0, max_score]. A reply without a number raises ValueError.
    """
    filled = _PLACEHOLDER_RE.sub(lambda m: prompt if m.group(1) == "prompt" else response, template)
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": filled}],
                       "temperature": 0, "max_tokens": 8}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url.rstrip("/") + "/chat/completions", data=body, headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        reply = json.loads(resp.read().decode())
    content = reply["choices"][0]["message"]["content"] or ""
    m = _SCORE_RE.search(content)
    if m is None:
        raise ValueError(f"judge reply has no score: {content[:100]!r}")
    return min(max(float(m.group()), 0.0), max_score) / max_score


# ---------------------------------------------------------------- failure handling
def safe_score(fn: Callable[..., Any], prompt: str, response: str, record: dict, params: dict | None = None,
               timeout: float | None = 10.0) -> tuple[float, str | None]:
    """(reward, None) on success, else (0.0, reason). Never raises.

    Reasons: "error:<ExceptionType>" when `fn` raises, "timeout" when it raises `RewardTimeout` or takes more than
    `timeout` seconds, "nan" for NaN/inf, "not_a_number" for anything that is not a real number. The call runs in a
    daemon thread so a hung function returns control after `timeout`; the thread itself may linger for a
    pure-Python hang (see the module docstring). `timeout=None` runs the call inline with no limit.
    """
    try:
        box: dict[str, Any] = {}

        def call() -> None:
            try:
                box["value"] = fn(prompt, response, record, **(params or {}))
            except BaseException as e:  # noqa: BLE001 - a reward must never take the rollout down
                box["error"] = e

        if timeout is None:
            call()
        else:
            worker = threading.Thread(target=call, name=f"reward-{getattr(fn, '__name__', 'fn')}", daemon=True)
            worker.start()
            worker.join(timeout)
            if worker.is_alive():
                return 0.0, "timeout"
        if "error" in box:
            err = box["error"]
            return 0.0, "timeout" if isinstance(err, RewardTimeout) else f"error:{type(err).__name__}"
        return _as_reward(box.get("value"))
    except BaseException as e:  # noqa: BLE001 - e.g. no thread could be started
        return 0.0, f"error:{type(e).__name__}"


def _as_reward(value: Any) -> tuple[float, str | None]:
    if isinstance(value, (str, bytes)) or value is None:
        return 0.0, "not_a_number"
    if not isinstance(value, numbers.Real):
        try:  # numpy scalars, 0-d tensors
            value = float(value)
        except Exception:  # noqa: BLE001
            return 0.0, "not_a_number"
    value = float(value)
    if not math.isfinite(value):
        return 0.0, "nan"
    return value, None


# ---------------------------------------------------------------- composition
class RewardSpec(Section):
    """One reward component: a registered function (or "reward_model"), its weight, keyword params, time limit."""

    name: str
    weight: float = 1.0
    params: dict[str, Any] = {}
    timeout_s: float = 10.0

    @field_validator("name")
    @classmethod
    def _known_name(cls, name: str) -> str:
        if name not in REWARDS and name != REWARD_MODEL:
            raise ValueError(f"unknown reward {name!r}; choose one of {', '.join(valid_names())}")
        return name

    @field_validator("timeout_s")
    @classmethod
    def _positive_timeout(cls, v: float) -> float:
        if not v > 0:
            raise ValueError("timeout_s must be > 0")
        return v

    @model_validator(mode="after")
    def _check_params(self) -> "RewardSpec":
        if self.name == REWARD_MODEL:
            if self.params:
                raise ValueError("reward_model takes no params (its path is the stage's reward_model_path)")
            return self
        fn = REWARDS[self.name]
        sig = inspect.signature(fn)
        own = list(sig.parameters.values())[3:]  # after prompt, response, record
        if not any(p.kind is p.VAR_KEYWORD for p in own):
            allowed = {p.name for p in own}
            unknown = sorted(set(self.params) - allowed)
            if unknown:
                raise ValueError(f"unknown params {unknown} for reward {self.name!r}; valid params: "
                                 f"{', '.join(sorted(allowed)) or '(none)'}")
        missing = [p.name for p in own if p.default is p.empty and p.name not in self.params
                   and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if missing:
            raise ValueError(f"reward {self.name!r} needs params {missing}")
        if self.name == "format" and "pattern" in self.params:
            try:
                re.compile(self.params["pattern"])
            except (re.error, TypeError) as e:
                raise ValueError(f"invalid regex for format reward: {self.params['pattern']!r} ({e})") from None
        return self


@dataclass
class RewardResult:
    rewards: list[float]  # weighted sum per response
    components: dict[str, list[float]]  # unweighted, per component, 0.0 where it failed
    failures: dict[str, int] = field(default_factory=dict)  # "name:reason" -> count
    failure_examples: list[dict] = field(default_factory=list)  # up to 5 {reward, reason, response}

    @property
    def n_failures(self) -> int:
        return sum(self.failures.values())


class CompositeReward:
    """Weighted sum of reward components; every response gets a reward, failures count as 0 for their component."""

    def __init__(self, specs: list[RewardSpec | dict], reward_model_path: str | None = None, max_workers: int = 8):
        self.specs = [s if isinstance(s, RewardSpec) else RewardSpec.model_validate(s) for s in specs]
        if not self.specs:
            raise ValueError("CompositeReward needs at least one reward spec")
        names = [s.name for s in self.specs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"reward components must have distinct names; repeated: {dup}")
        self.max_workers = max_workers
        self.reward_model: RewardModelScorer | None = None
        if REWARD_MODEL in names:
            if not reward_model_path:
                raise ValueError("the 'reward_model' reward needs reward_model_path (a local HF directory)")
            self.reward_model = RewardModelScorer(reward_model_path)

    def score(self, prompts: list[str], responses: list[str], records: list[dict]) -> RewardResult:
        n = len(responses)
        if not (len(prompts) == n == len(records)):
            raise ValueError(f"prompts, responses and records must have the same length "
                             f"({len(prompts)}, {n}, {len(records)})")
        components = {s.name: [0.0] * n for s in self.specs}
        reasons: dict[str, list[str | None]] = {s.name: [None] * n for s in self.specs}
        fn_specs = [s for s in self.specs if s.name != REWARD_MODEL]

        def score_one(i: int) -> None:
            for s in fn_specs:
                components[s.name][i], reasons[s.name][i] = safe_score(
                    REWARDS[s.name], prompts[i], responses[i], records[i], s.params, s.timeout_s)

        if fn_specs and n:
            with ThreadPoolExecutor(max_workers=max(1, min(self.max_workers, n)),
                                    thread_name_prefix="reward-score") as pool:
                list(pool.map(score_one, range(n)))  # score_one never raises: safe_score catches everything
        if self.reward_model is not None and n:
            self._score_reward_model(prompts, responses, components[REWARD_MODEL], reasons[REWARD_MODEL])

        weights = {s.name: s.weight for s in self.specs}
        rewards = [sum(weights[name] * vals[i] for name, vals in components.items()) for i in range(n)]
        failures: dict[str, int] = {}
        examples: list[dict] = []
        for i in range(n):
            for name in components:
                reason = reasons[name][i]
                if reason is None:
                    continue
                key = f"{name}:{reason}"
                failures[key] = failures.get(key, 0) + 1
                if len(examples) < MAX_FAILURE_EXAMPLES:
                    examples.append({"reward": name, "reason": reason, "response": responses[i][:200]})
        return RewardResult(rewards=rewards, components=components, failures=failures, failure_examples=examples)

    def _score_reward_model(self, prompts, responses, values: list[float], reasons: list[str | None]) -> None:
        try:
            scores = self.reward_model.score(prompts, responses)
            if len(scores) != len(responses):
                raise ValueError(f"reward model returned {len(scores)} scores for {len(responses)} responses")
        except Exception as e:  # noqa: BLE001
            for i in range(len(responses)):
                values[i], reasons[i] = 0.0, f"error:{type(e).__name__}"
            return
        for i, s in enumerate(scores):
            values[i], reasons[i] = _as_reward(s)


# ---------------------------------------------------------------- reward model
class RewardModelScorer:
    """A sequence-classification reward model (one scalar logit per (prompt, response)) from a local HF directory.

    Each pair is rendered with the tokenizer's chat template (user prompt + assistant response) and scored at its
    last non-pad token. Sequences longer than `max_len` tokens are truncated on the left, so the response's end,
    where the score is read, is kept.
    """

    def __init__(self, path: str, max_len: int = 256, batch_size: int = 64, device: str | None = None):
        import torch
        from transformers import AutoModelForSequenceClassification

        from raylm.models import load_tokenizer
        from raylm.runs import local_path

        self.torch = torch
        self.max_len, self.batch_size = max_len, batch_size
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = load_tokenizer(path)
        self.tokenizer.padding_side = "right"
        self.tokenizer.truncation_side = "left"
        self.model = AutoModelForSequenceClassification.from_pretrained(local_path(path), num_labels=1,
                                                                        dtype=torch.float32)
        # HF reads the score at the last non-pad token, which it finds with config.pad_token_id
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(self.device).eval()

    def render(self, prompt: str, response: str) -> str:
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(msgs, tokenize=False)
        return f"{prompt}\n{response}"

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        texts = [self.render(p, r) for p, r in zip(prompts, responses, strict=True)]
        out: list[float] = []
        with self.torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[start:start + self.batch_size], add_special_tokens=False, padding=True,
                                     truncation=True, max_length=self.max_len, return_tensors="pt").to(self.device)
                logits = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
                out.extend(float(x) for x in logits[:, 0].float().cpu())
        return out
