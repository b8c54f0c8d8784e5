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
