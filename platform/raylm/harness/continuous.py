"""Continuous evaluation: a training run scores its own checkpoints on lm-eval tasks every N steps.

Training pauses only to write a snapshot (rank 0 exports the model as at the end of a run: merged for LoRA); the
snapshot goes to a small `TaskEvaluator` actor, which scores it on its own vLLM engine (`raylm.harness.backend`)
while training goes on, one snapshot after another. The training loop never waits for a score, so a cluster with
no free CPU for the engine still trains at full speed; its scores then arrive after training ends, when `fit`
collects the curve. Snapshots are deleted once scored.
"""
from __future__ import annotations

import os
import shutil
import uuid
from concurrent.futures import Future, ThreadPoolExecutor

import ray


@ray.remote(num_cpus=0)
class TaskEvaluator:
    def __init__(self, spec: dict):
        self.spec = spec
        self.pool = ThreadPoolExecutor(max_workers=1)  # one snapshot at a time, in step order
        self.pending: list[tuple[int, Future]] = []
        self.lm = None  # one engine for the whole run: later snapshots are loaded into it in place

    def submit(self, model_dir: str, step: int) -> None:
        self.pending.append((step, self.pool.submit(self._score, model_dir, step)))

    def _score(self, model_dir: str, step: int) -> dict:
        from raylm.harness.backend import RayVLLM
        from raylm.harness.run import evaluate

        from raylm.harness.backend import WEIGHT_EXT

        s = self.spec
        try:
            if self.lm is None:
                self.lm = RayVLLM(model_dir, n_engines=1,
                                  engine_kwargs={**(s.get("engine") or {}), "worker_extension_cls": WEIGHT_EXT})
            else:
                ray.get([e.load_checkpoint.remote(model_dir) for e in self.lm.engines])
            res = evaluate(self.lm, s["tasks"], limit=s.get("limit"), num_fewshot=s.get("num_fewshot"),
                           apply_chat_template=s.get("apply_chat_template", False), bootstrap_iters=0)
        finally:
            shutil.rmtree(os.path.dirname(model_dir), ignore_errors=True)
        return {"step": step, **{f"{task}/{metric}": v["value"] for task, r in res.items()
                                 for metric, v in r.metrics.items()}}

    def curve(self) -> list[dict]:
        """Every submitted snapshot's scores (waits for those still running); a failed one gives its error."""
        rows = []
        for step, fut in self.pending:
            try:
                rows.append(fut.result())
            except Exception as exc:  # noqa: BLE001 - one bad snapshot must not lose the others' scores
                rows.append({"step": step, "error": f"{type(exc).__name__}: {exc}"[:500]})
        if self.lm is not None:
            self.lm.shutdown()
        return rows


def start(spec: dict):
    """The evaluator for one training run: (its name, for the loop's rank 0 to find it; the handle, which the
    driver keeps so the actor lives until `finish`)."""
    name = f"raylm-task-eval-{uuid.uuid4().hex[:8]}"
    return name, TaskEvaluator.options(name=name).remote(spec)


def finish(actor) -> list[dict]:
    try:
        return ray.get(actor.curve.remote())
    finally:
        ray.kill(actor)


def snapshot(job: dict, backend, tokenizer, rank: int, step: int) -> None:
    """In the training loop: every rank joins the state gather; rank 0 exports a fresh copy (the model being
    trained is never touched: a LoRA merge happens on the copy) and hands it to the evaluator."""
    import tempfile

    from raylm.train.loop import export

    state = backend.full_state_dict()
    if rank != 0:
        return
    out = tempfile.mkdtemp(prefix=f"raylm-snapshot-{step}-")
    export(job, state, tokenizer, out)
    ray.get_actor(job["task_eval"]["actor"]).submit.remote(os.path.join(out, "model"), step)


def due(spec: dict | None, step: int, last: bool) -> bool:
    """Score after step `step` (0-based)? Every `every` steps and at the end."""
    return bool(spec and spec.get("every") and spec.get("tasks")) and ((step + 1) % spec["every"] == 0 or last)
