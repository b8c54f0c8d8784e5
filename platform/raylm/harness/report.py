"""The lm-eval-style results table (`|Tasks|n-shot|Metric|Value| |Stderr|`), with a column per baseline and its
difference to the model (paired-bootstrap 95% interval; `*` where the interval excludes 0)."""
from __future__ import annotations


def _fmt(v: float | None) -> str:
    return "N/A" if v is None else f"{v:.4f}"


def task_table(model_run: str, results: dict, baselines: dict[str, dict], deltas: list[dict]) -> str:
    head = ["Tasks", "n-shot", "n", "Metric", model_run, "", "Stderr"]
    for b in baselines:
        head += [b, f"delta vs {b} [95% CI]"]
    lines = ["|" + "|".join(head) + "|", "|" + "|".join("---" for _ in head) + "|"]
    by_key = {(d["baseline"], d["task"], d["metric"]): d for d in deltas}
    for task, r in sorted(results.items()):
        for metric, mv in sorted(r.metrics.items()):
            row = [task, "" if r.num_fewshot is None else str(r.num_fewshot), str(r.n), metric,
                   _fmt(mv["value"]), "±", _fmt(mv["stderr"])]
            for b, bres in baselines.items():
                bv = bres.get(task).metrics.get(metric, {}).get("value") if task in bres else None
                d = by_key.get((b, task, metric))
                if d and d["delta"] is not None:
                    star = "*" if d["ci_low"] > 0 or d["ci_high"] < 0 else ""
                    cell = f"{d['delta']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]{star}"
                else:
                    cell = ""
                row += [_fmt(bv), cell]
            lines.append("|" + "|".join(row) + "|")
    return "\n".join(lines)
