"""The SFT stage with the fine-tuning menu on Ray Train, on a tiny model and a handful of rows (not the lifecycle
fixture: that is a 12-minute run): LoRA on alpaca rows, then incremental LoRA continuing its adapter on OpenAI
messages, then prompt tuning on sharegpt rows, whose export is the base plus an adapter (`merged: false`).
The first run also evaluates itself as it trains (`train.task_eval`, continuous evaluation on lm-eval tasks)."""
import json
import os
from pathlib import Path

import pandas as pd
import pytest

from raylm.config import load_config
from raylm.runs import RunStore
from raylm.stage import execute

pytestmark = pytest.mark.integration

TASKS = [("What is 2 plus 4?", "6"), ("Is 3 even or odd?", "odd"), ("What is 5 plus 1?", "6"),
         ("Is 8 even or odd?", "even")] * 8
FORMATS = {
    "alpaca": lambda q, a: {"instruction": q, "input": "", "output": a},
    "openai": lambda q, a: {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]},
    "sharegpt": lambda q, a: {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]},
}


def seed_runs(store: RunStore, tmp_path) -> tuple[str, dict[str, str]]:
    """A model run (tiny Llama + ChatML tokenizer) and one dataset run per instruction format."""
    from raylm.config import ModelSpec
    from raylm.models import build_model, train_tokenizer

    tok = train_tokenizer([f"{q} {a}" for q, a in TASKS] * 5, 300)
    model_dir = tmp_path / "model"
    build_model(ModelSpec(preset="tiny", overrides={"num_hidden_layers": 2}), tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    with store.start_run("pretrain", {}) as run:
        run.add_artifact("model", "model", str(model_dir))
        model = run.id
    data = {}
    for fmt, row in FORMATS.items():
        for split in ("tasks_train", "tasks_test"):
            os.makedirs(tmp_path / fmt / split)
            pd.DataFrame([row(q, a) for q, a in TASKS]).to_parquet(tmp_path / fmt / split / "part.parquet")
        with store.start_run("curate", {}) as run:
            run.add_artifact("dataset", "dataset", str(tmp_path / fmt))
            data[fmt] = run.id
    return model, data


def test_sft_menu_lora_then_incremental_then_prompt_tuning(ray_cluster, tmp_path):
    from pipelines import sft

    store = RunStore(str(tmp_path / "runs"))
    model, data = seed_runs(store, tmp_path)
    common = [f"root={store.root}", f"inputs.model={model}", "resources.num_workers=1", "train.max_steps=6",
              "train.batch_size=8", "train.eval_every=3", "train.log_every=1", "optim.warmup_steps=0", "optim.lr=1e-2",
              "lora.rank=4", "lora.alpha=8"]

    def run(*overrides):
        return store.load(execute(sft, load_config(sft.Config, None, [*common, *overrides])))

    tasks = task_yamls(tmp_path)
    first = run(f"inputs.dataset={data['alpaca']}", f"train.task_eval.tasks=[{tasks['abcd_quiz']},"
                f"{tasks['prose_rolling']}]", "train.task_eval.every=3", "train.task_eval.limit=8",
                f"train.task_eval.engine={json.dumps(ENGINE)}")
    assert first.metrics["method"] == "lora" and first.metrics["merged"] is True
    assert {"model", "adapter"} <= set(first.outputs)
    check_task_curve(first, tasks)

    second = run(f"inputs.dataset={data['openai']}", f"inputs.adapter={first.run_id}", "data_format=openai")
    assert second.metrics["incremental_from"] == f"{first.run_id}:adapter"
    # it continues the trained adapter: it starts near where the first run ended, not at the base model's loss
    start, end = first.metrics["initial_loss"], first.metrics["final_loss"]
    assert end < start and second.metrics["initial_loss"] < (start + end) / 2

    third = run(f"inputs.dataset={data['sharegpt']}", "lora.method=prompt", "lora.rank=16", "lora.alpha=32",
                "lora.num_virtual_tokens=4")
    assert third.metrics["method"] == "prompt" and third.metrics["merged"] is False
    assert third.outputs["model"].meta["merged"] is False and "adapter/" in third.outputs["model"].meta["merge_note"]
    assert third.metrics["final_loss"] < third.metrics["initial_loss"]


LM_TASKS = Path(__file__).resolve().parents[1] / "data" / "lm_tasks"
ENGINE = {"max_model_len": 512, "kv_cache_memory_bytes": 64 << 20}


def task_yamls(tmp_path) -> dict[str, str]:
    """The lm-eval test tasks with their data path filled in."""
    out = {}
    for y in LM_TASKS.glob("*.yaml"):
        (tmp_path / y.name).write_text(y.read_text().replace("DATA", str(LM_TASKS)))
        out[y.stem] = str(tmp_path / y.name)
    return out


def check_task_curve(m, tasks) -> None:
    """Continuous evaluation: snapshots at steps 3 and 6 scored on one engine (the second reloaded in place); the
    last point equals a fresh engine's score of the exported model, so the reload delivered the weights."""
    from raylm.harness.backend import RayVLLM
    from raylm.harness.run import evaluate

    curve = m.metrics["task_curve"]
    assert [r["step"] for r in curve] == [3, 6], curve
    assert all(0 <= r["abcd_quiz/acc"] <= 1 and "error" not in r for r in curve)
    bpb = [r["prose_rolling/bits_per_byte"] for r in curve]
    assert bpb[1] != bpb[0]  # the second snapshot is scored on its own (trained further) weights
    fresh = RayVLLM(m.output(kind="model").uri, engine_kwargs=ENGINE)
    try:
        final = evaluate(fresh, [tasks["prose_rolling"]])["prose_rolling"].metrics["bits_per_byte"]["value"]
    finally:
        fresh.shutdown()
    assert final == pytest.approx(bpb[1], rel=1e-5)
