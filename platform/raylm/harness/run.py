"""Run lm-evaluation-harness tasks on a model and keep what a report needs: per task and metric the value, its
stderr and n, and every sample (prompt, answer, target, score) for inspection and for paired comparisons.

Tasks are named as lm-eval names them (bundled ones in `raylm/harness/tasks/`, any lm-eval task the installed
package has) or given as YAML paths (their directory joins the include path). lm-eval does the loading, few-shot,
filters, metrics and stderr; nothing of that is rewritten here.
"""
from __future__ import annotations

import copy
import functools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raylm.config import ConfigError
from raylm.harness.compare import CORPUS_METRICS

BUNDLED = str(Path(__file__).parent / "tasks")


class _Tagless(yaml.SafeLoader):
    """Reads a task YAML for its name only: lm-eval's `!function` tags are left alone."""


_Tagless.add_multi_constructor("!", lambda loader, suffix, node: None)


def task_names(specs: list[str]) -> tuple[list[str], list[str]]:
    """(lm-eval task names, extra include dirs) for names and YAML paths; a path that is not there is an error."""
    names, dirs = [], []
    for spec in specs:
        if spec.endswith((".yaml", ".yml")):
            if not os.path.isfile(spec):
                raise ConfigError(f"tasks: no task file {spec}")
            with open(spec) as f:
                doc = yaml.load(f, Loader=_Tagless) or {}
            if not doc.get("task"):
                raise ConfigError(f"tasks: {spec} has no `task:` name")
            names.append(doc["task"])
            dirs.append(os.path.dirname(os.path.abspath(spec)))
        else:
            names.append(spec)
    return names, dirs


@functools.lru_cache(maxsize=8)
def _manager(dirs: tuple[str, ...], include_defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[BUNDLED, *dirs], include_defaults=include_defaults)


def task_manager(names: list[str], dirs: list[str] = (), metadata: dict | None = None):
    """lm-eval's TaskManager over the bundled tasks and the given YAML dirs; lm-eval's own ~15,000 tasks are
    indexed (8 s on 2 cores) only when a name is not found without them. Cached per process.

    `metadata` goes into every task's config (what a task's `custom_dataset` is called with), as lm-eval's
    `TaskManager(metadata=...)` does; the cached index is reused with a task factory that carries it."""
    dirs = tuple(dict.fromkeys(dirs))
    defaults = not all(n in _manager(dirs, False).all_tasks for n in names)
    tm = _manager(dirs, defaults)
    if not metadata:
        return tm
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._factory import TaskFactory

    if not isinstance(getattr(tm, "_factory", None), TaskFactory):  # another lm-eval layout: index again
        return TaskManager(include_path=[BUNDLED, *dirs], include_defaults=defaults, metadata=metadata)
    out = copy.copy(tm)
    out.metadata, out._factory = metadata, TaskFactory(meta=metadata)
    return out


def check_tasks(specs: list[str]) -> None:
    """Unknown task names fail before any engine starts, naming what is close."""
    import difflib

    names, dirs = task_names(specs)
    known = task_manager(names, dirs).all_tasks
    bad = [n for n in names if n not in known]
    if bad:
        hints = {n: difflib.get_close_matches(n, known, n=3) for n in bad}
        raise ConfigError("tasks: unknown " + "; ".join(f"{n!r}" + (f" (did you mean {', '.join(h)}?)" if h else "")
                                                        for n, h in hints.items()))


@dataclass
class TaskResult:
    task: str
    metrics: dict[str, dict[str, float | None]]  # metric -> {"value", "stderr"}
    n: int
    samples: list[dict] = field(default_factory=list)  # doc_id, prompt, answer, target, scores {metric: value}
    num_fewshot: int | None = None


def evaluate(lm, specs: list[str], *, num_fewshot: int | None = None, limit: int | float | None = None,
             bootstrap_iters: int = 1000, apply_chat_template: bool = False, seed: int = 0,
             metadata: dict | None = None) -> dict[str, TaskResult]:
    """Score `lm` (any lm-eval LM) on the tasks; {task: TaskResult}.

    `metadata`: keys for every task's config, as `lm_eval --metadata` (e.g. {"dataset": URI} for the bundled
    raylm_lifecycle tasks). When given, the model's tokenizer (`tokenizer`) and `apply_chat_template` are added
    unless set, for tasks that render or count tokens as the model does."""
    from lm_eval import simple_evaluate

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # task data comes from local files, never the hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    for name in ("lm_eval.evaluator_utils", "lm_eval.api.task"):
        logging.getLogger(name).addFilter(_expected_warnings)
    names, dirs = task_names(specs)
    if metadata:
        tokenizer = getattr(lm, "model_dir", None) or getattr(getattr(lm, "tokenizer", None), "name_or_path", None)
        metadata = {**({"tokenizer": tokenizer} if tokenizer else {}), "apply_chat_template": apply_chat_template,
                    **metadata}
    out = simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, log_samples=True,
                          bootstrap_iters=bootstrap_iters, apply_chat_template=apply_chat_template,
                          task_manager=task_manager(names, dirs, metadata), metadata=metadata, random_seed=seed,
                          numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                          confirm_run_unsafe_code=True)
    return {name: _task_result(name, out) for name in out["results"] if name in out.get("samples", {})}


def _expected_warnings(record: logging.LogRecord) -> bool:
    """lm-eval warnings that the raylm_lifecycle tasks trigger by design, dropped: their per-family metrics
    (exact_match_<family>, acc_<family>) are not declared (the families are the dataset's) and each covers only its
    family's documents, which lm-eval averages as intended after a warning per metric and one per task; and every
    `custom_dataset` task gets a hint to use `--metadata`, which raylm's harness does for them."""
    msg = record.getMessage()
    return not (msg.startswith(LIFECYCLE_LOGGED) and any(e in msg for e in EXPECTED_WARNINGS))


LIFECYCLE_LOGGED = tuple(f"{p}{t}{q}" for t in ("raylm_heldout", "raylm_exact_match", "raylm_preference")
                         for p, q in (("[", "]"), ("", ":")))
EXPECTED_WARNINGS = ("No aggregation function defined for metric", "Metrics were not scored on the same number",
                     "Custom kwargs can be passed to `--metadata`")


def _task_result(name: str, out: dict) -> TaskResult:
    row = out["results"][name]
    metrics: dict[str, dict[str, float | None]] = {}
    for key, value in row.items():
        if "," not in key or "_stderr," in key:
            continue
        metric, filt = key.split(",", 1)
        label = metric if filt == "none" else f"{metric},{filt}"
        stderr = row.get(f"{metric}_stderr,{filt}")
        metrics[label] = {"value": _num(value), "stderr": _num(stderr)}
    samples = [_sample(s) for s in out["samples"][name]]
    n = out.get("n-samples", {}).get(name, {}).get("effective", len(samples))
    return TaskResult(name, metrics, n, samples, out.get("n-shot", {}).get(name))


def _sample(s: dict) -> dict[str, Any]:
    """One scored document, flattened for JSONL: the prompt sent, the answer (the chosen index for multiple
    choice, the filtered text for generation), the raw response, the target and the per-document scores."""
    args, filtered, resps = s.get("arguments") or [], s.get("filtered_resps") or [], s.get("resps") or []
    prompt = args[0][0] if args else None
    if len(args) > 1:  # one log-likelihood request per choice: the answer is the most likely one
        lls = [r[0] if isinstance(r, (list, tuple)) else r for r in filtered]
        answer = max(range(len(lls)), key=lambda i: lls[i]) if lls else None
        response = args[answer][1] if answer is not None else None
    else:
        answer = filtered[0] if filtered else None
        response = resps[0][0] if resps and isinstance(resps[0], (list, tuple)) and resps[0] else None
    scores = {m: _num(s.get(m)) for m in s.get("metrics", []) if _num(s.get(m)) is not None}
    for m in set(s.get("metrics", [])) & set(CORPUS_METRICS):  # (log-likelihood, words / bytes / tokens)
        v = s.get(m)
        if isinstance(v, (list, tuple)) and len(v) == 2 and all(_num(x) is not None for x in v):
            scores[m] = [_num(v[0]), _num(v[1])]
    return {"doc_id": s.get("doc_id"), "prompt": prompt, "answer": _plain(answer), "response": _plain(response),
            "target": _plain(s.get("target")), "filter": s.get("filter"), "scores": scores}


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if f != f else f  # "N/A" stderr, NaN -> None


def _plain(v: Any) -> Any:
    """JSON-safe: tuples/lists of (logprob, is_greedy) and numpy scalars become lists and floats."""
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if hasattr(v, "item"):
        return v.item()
    return v
