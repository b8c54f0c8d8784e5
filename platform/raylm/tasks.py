"""Synthetic instruction tasks with checkable answers (the embedded default's SFT/DPO/eval data).

Each task has one correct answer and a plausible wrong one, so the same records give SFT examples,
DPO preference pairs (correct = chosen, wrong = rejected) and exact-match evaluation. The held-out split is
chosen by a hash of the prompt, so it is stable across runs and machines.
"""
from __future__ import annotations

import hashlib
import random
import re

WORDS_RE = re.compile(r"\b[a-z]{4,8}\b")


def _held_out(prompt: str, percent: int) -> bool:
    return int(hashlib.sha1(prompt.encode()).hexdigest(), 16) % 100 < percent


def _word_list(texts: list[str], n: int, rng: random.Random) -> list[str]:
    counts: dict[str, int] = {}
    for t in texts:
        for w in WORDS_RE.findall(t):
            counts[w] = counts.get(w, 0) + 1
    common = sorted((w for w, c in counts.items() if c >= 5), key=lambda w: (-counts[w], w))[: n * 3]
    rng.shuffle(common)
    return sorted(common[:n])


def make_tasks(texts: list[str], seed: int = 0, per_family: int = 150, test_percent: int = 15) -> list[dict]:
    """Records {id, family, prompt, answer, wrong, split}."""
    rng = random.Random(seed)
    out: list[dict] = []

    def add(family: str, prompt: str, answer, wrong) -> None:
        split = "test" if _held_out(prompt, test_percent) else "train"
        out.append(dict(id=f"{family}-{len(out)}", family=family, prompt=prompt, answer=str(answer),
                        wrong=str(wrong), split=split))

    # Ranges wide enough that the held-out prompts are new combinations of familiar pieces.
    pairs = [(a, b) for a in range(20) for b in range(10)]
    for a, b in rng.sample(pairs, min(per_family, len(pairs))):
        add("add", f"What is {a} plus {b}?", a + b, a + b + rng.choice([-2, -1, 1, 2]))
    for n in rng.sample(range(1000), min(per_family, 1000)):
        add("parity", f"Is {n} even or odd?", "even" if n % 2 == 0 else "odd", "odd" if n % 2 == 0 else "even")
    for _ in range(per_family):
        a, b = rng.sample(range(100), 2)
        add("larger", f"Which is larger, {a} or {b}?", max(a, b), min(a, b))
    words = _word_list(texts, per_family, rng)
    # a wrong answer is another listed word: with fewer than two (a corpus of a few documents) there is no family
    for w in words if len(words) >= 2 else []:
        other = rng.choice([x for x in words if x != w])
        add("repeat", f"Repeat the word: {w}", w, other)
    for n in rng.sample(range(999), min(per_family, 999)):
        add("next", f"What number comes after {n}?", n + 1, n + rng.choice([-1, 2]))
    # dedupe prompts (random pairs can repeat) keeping the first
    seen, unique = set(), []
    for r in out:
        if r["prompt"] not in seen:
            seen.add(r["prompt"])
            unique.append(r)
    return unique


def as_text(task: dict) -> str:
    """Plain-text rendering used in the pre-training mix (instruction data in pre-training, as in mid-training)."""
    return f"Question: {task['prompt']}\nAnswer: {task['answer']}"


def messages(task: dict, answer: str | None = None) -> list[dict]:
    msgs = [{"role": "user", "content": task["prompt"]}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": answer})
    return msgs


def normalize(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


def exact_match(prediction: str, answer: str) -> bool:
    return normalize(prediction) == normalize(answer)


# ---------------------------------------------------------------- arithmetic (a real model's SFT/RL/eval task)
ARITHMETIC_PROMPT = "What is {a} {op} {b}? Answer with the number only."
ARITHMETIC_OPS = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b}


def arithmetic_problems(max_operand: int = 99, ops: tuple[str, ...] = ("plus", "minus")) -> list[dict]:
    """Every problem of the space, in a fixed order: a op b for 0 <= a, b <= max_operand (minus with a >= b, so
    every answer is a non-negative integer)."""
    unknown = [op for op in ops if op not in ARITHMETIC_OPS]
    if unknown:
        raise ValueError(f"unknown arithmetic op(s) {unknown}; choose from {sorted(ARITHMETIC_OPS)}")
    out = []
    for op in ops:
        for a in range(max_operand + 1):
            for b in range(max_operand + 1):
                if op == "minus" and b > a:
                    continue
                out.append({"family": op, "prompt": ARITHMETIC_PROMPT.format(a=a, op=op, b=b),
                            "answer": str(ARITHMETIC_OPS[op](a, b))})
    return out


def arithmetic_split(prompt: str, test_percent: int = 10) -> str:
    """"test" or "train" by a hash of the prompt: fixed for a problem on every machine and for every seed, so no
    training set drawn from the "train" part can ever hold a held-out problem."""
    return "test" if _held_out(f"arith:{prompt}", test_percent) else "train"


def arithmetic_tasks(split: str, n: int | None = None, seed: int = 0, max_operand: int = 99,
                     ops: tuple[str, ...] = ("plus", "minus"), test_percent: int = 10) -> list[dict]:
    """`n` problems of one split ("train" or "test"), drawn by `seed` (None: all of the split, shuffled), as task
    records {id, family, prompt, answer, wrong, split}: the same rows SFT, DPO, RL and evaluation take."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    pool = [p for p in arithmetic_problems(max_operand, ops) if arithmetic_split(p["prompt"], test_percent) == split]
    rng = random.Random(f"{seed}/{split}")
    rng.shuffle(pool)
    pool = pool if n is None else pool[:n]
    out = []
    for i, p in enumerate(pool):
        ans = int(p["answer"])
        wrong = ans + rng.choice([-10, -1, 1, 10]) if ans >= 10 else ans + rng.choice([1, 2])
        out.append({"id": f"{p['family']}-{split}-{i}", **p, "wrong": str(wrong), "split": split})
    return out


ARITHMETIC_EVAL = {"n": 250, "seed": 0}  # the problems of the bundled lm-eval task `raylm_arithmetic`


def arithmetic_eval_problems() -> list[dict]:
    """The held-out problems the bundled lm-eval task `raylm_arithmetic` scores (0..99, plus and minus)."""
    return arithmetic_tasks("test", ARITHMETIC_EVAL["n"], ARITHMETIC_EVAL["seed"])
