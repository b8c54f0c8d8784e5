"""The lifecycle's own metrics as lm-eval tasks (`raylm/harness/tasks/raylm_lifecycle/`), scored on the harness like
any other task: value and stderr, every sample in the JSONL, deltas to baselines.

Data: a lifecycle dataset (a `curate` or `taskset` run's `dataset` artifact, a local path or an fsspec URI) named
by `metadata["dataset"]`: raylm's `evaluate` stage sets it from its `dataset` input; with lm-eval's own CLI,
``--include_path .../tasks --metadata '{"dataset": "/runs/curate-.../data"}'``.

- `raylm_heldout` (`loglikelihood_rolling` over `text_val`): lm-eval's word and byte perplexity and bits per byte,
  and `token_perplexity` when the model's tokenizer is known (`metadata["tokenizer"]`, which raylm's harness fills
  in from the model; lm-eval's CLI passes `pretrained`): each document then carries the number of tokens the
  backend scores (`len(tokenizer.encode(text))`: lm-eval's hf backend and raylm's score every token of it, the
  first from the prefix token), and the metric is exp(-sum log-likelihood / sum tokens) over the documents.
- `raylm_exact_match` (`generate_until` over `tasks_test`, greedy, 8 new tokens, stopping at `<|im_end|>` and
  EOS): `raylm.tasks.exact_match` of the answer, overall and per family (`exact_match_<family>`).
- `raylm_preference` (`multiple_choice` between the wrong and the right answer, in that order): `acc` (the right
  answer strictly more likely: a tie goes to the wrong one, as `margin > 0` in `raylm.eval`), `acc_<family>`, and
  `logp_margin` (log p(right) - log p(wrong)).

Prompts are rendered as `raylm.eval` renders them: the user turn through the model's chat template with the
generation prompt, and for preference each answer followed by the template's end of turn (its log-prob counts, as
in `raylm.eval.preference_accuracy`). The rendering needs the tokenizer; when lm-eval renders the chat itself
(`apply_chat_template`, which raylm's harness passes on in the metadata) the docs carry the plain prompt instead,
and lm-eval's rendering is the same string.
"""
from __future__ import annotations

import functools
from typing import Any

from raylm import tasks as T

TEXT, TASKS = "text_val", "tasks_test"
NEEDS = "raylm_heldout, raylm_exact_match and raylm_preference read a lifecycle dataset"


def _dataset_dir(task: str, metadata: dict) -> str:
    uri = metadata.get("dataset")
    if not uri:
        raise ValueError(f"{task}: no dataset: {NEEDS}; give its location as metadata key 'dataset' (raylm evaluate: "
                         "inputs.dataset=RUN; lm_eval: --metadata '{\"dataset\": \"/path/to/curate-run/data\"}')")
    from raylm.runs import local_path

    return local_path(str(uri))


def _read(task: str, metadata: dict, split: str, columns: list[str] | None = None) -> list[dict]:
    import os

    import pyarrow.parquet as pq

    base = _dataset_dir(task, metadata)
    path = os.path.join(base, split)
    if not os.path.exists(path):
        have = ", ".join(sorted(os.listdir(base))) if os.path.isdir(base) else "nothing (not a directory)"
        raise ValueError(f"{task}: dataset {metadata['dataset']} has no {split!r} split; it has: {have}")
    return pq.read_table(path, columns=columns).to_pylist()


@functools.lru_cache(maxsize=8)
def _tokenizer(path: str):
    from transformers import AutoTokenizer

    from raylm.runs import local_path

    return AutoTokenizer.from_pretrained(local_path(path))


def _tokenizer_of(metadata: dict):
    path = metadata.get("tokenizer") or metadata.get("pretrained")
    return _tokenizer(str(path)) if path else None


def _as_dataset(rows: list[dict]):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


# ---------------------------------------------------------------- datasets (lm-eval `custom_dataset`)
def heldout_text(**metadata: Any):
    """`text_val` documents; with a tokenizer, each with the number of tokens the backend will score."""
    rows = [{"text": t} for t in (r["text"] for r in _read("raylm_heldout", metadata, TEXT, ["text"])) if t]
    tok = _tokenizer_of(metadata)
    for r in rows:
        r["n_tokens"] = len(tok.encode(r["text"])) if tok is not None else 0
    return _as_dataset(rows)


def exact_match_docs(**metadata: Any):
    return _task_docs("raylm_exact_match", metadata)


def preference_docs(**metadata: Any):
    return _task_docs("raylm_preference", metadata)


def _task_docs(task: str, metadata: dict):
    """`tasks_test` rows with the prompt as raylm.eval sends it (`context`) and the two answers as scored (`choices`:
    wrong, right)."""
    rows = _read(task, metadata, TASKS)
    tok = _tokenizer_of(metadata)
    lm_renders = bool(metadata.get("apply_chat_template"))
    if tok is None and not lm_renders:
        raise ValueError(f"{task} renders prompts with the model's chat template, as raylm.eval does: give metadata "
                         "'tokenizer' (raylm's harness sets it from the model; lm_eval: model_args pretrained=...) "
                         "or run with apply_chat_template")
    out = []
    for r in rows:
        context, wrong, right = render(tok, r["prompt"], [r["wrong"], r["answer"]])
        out.append({"id": r.get("id"), "family": r.get("family") or "all", "prompt": r["prompt"],
                    "answer": r["answer"], "wrong": r["wrong"], "context": r["prompt"] if lm_renders else context,
                    "choices": [wrong, right]})
    return _as_dataset(out)


def render(tok, prompt: str, answers: list[str]) -> tuple[str, ...]:
    """(the prompt with the generation prompt, each answer with the end of turn) as `raylm.eval` renders them
    (`generate`; `chat_tokens`, which keeps the end-of-turn token in the scored part but not the newline after it).
    Without a tokenizer: the plain prompt and answers (lm-eval then renders the prompt)."""
    if tok is None:
        return (prompt, *answers)
    msgs = [{"role": "user", "content": prompt}]
    prefix = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    out = []
    for a in answers:
        full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": a}], tokenize=False)
        out.append(full[len(prefix):].rstrip() if full.startswith(prefix) else a)
    return (prefix, *out)


# ---------------------------------------------------------------- per-document scores (lm-eval `process_results`)
def process_heldout(doc: dict, results: list) -> dict:
    """lm-eval's own rolling metrics (as its loglikelihood_rolling tasks count words and bytes), plus tokens."""
    from lm_eval.api.task import ConfigurableTask

    (ll,) = results
    n_bytes = ConfigurableTask.count_bytes(doc["text"])
    out = {"word_perplexity": (ll, ConfigurableTask.count_words(doc["text"])), "byte_perplexity": (ll, n_bytes),
           "bits_per_byte": (ll, n_bytes)}
    if doc.get("n_tokens"):
        out["token_perplexity"] = (ll, doc["n_tokens"])
    return out


def process_exact_match(doc: dict, results: list) -> dict:
    hit = float(T.exact_match(results[0], doc["answer"]))
    return {"exact_match": hit, f"exact_match_{doc['family']}": hit}


def process_preference(doc: dict, results: list) -> dict:
    """choices = [wrong, right]: argmax picks the first on a tie, so a tie counts as wrong (raylm.eval: margin > 0)."""
    (ll_wrong, _), (ll_right, _) = results
    acc = float(ll_right > ll_wrong)
    return {"acc": acc, f"acc_{doc['family']}": acc, "logp_margin": ll_right - ll_wrong}

