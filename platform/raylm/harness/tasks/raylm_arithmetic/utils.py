"""The held-out problems of the bundled `raylm_arithmetic` task, generated (no data file, nothing downloaded).

They are `raylm.tasks.arithmetic_eval_problems()`: 250 problems, drawn with a fixed seed from the part of the
problem space whose prompts hash into the held-out share. Training sets (the `taskset` stage, `generator:
arithmetic`) draw only from the other part, so no training problem is ever scored here.
"""
from raylm.tasks import arithmetic_eval_problems


def load_problems(**_):
    import datasets

    rows = [{k: r[k] for k in ("id", "family", "prompt", "answer")} for r in arithmetic_eval_problems()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
