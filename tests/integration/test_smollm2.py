"""A real model through the platform: SmolLM2-135M-Instruct (imported from its GGUF once per session) takes a few
LoRA SFT steps on chat data (its ChatML template and special tokens, the Llama LoRA targets) and the result is
served by the `serve` stage (vLLM on Ray Serve), whose chat answer is still right. The full real-model lifecycle
(more steps, evaluations, GRPO) is a README command, not part of the suite."""
from __future__ import annotations

import os

import pandas as pd
import pytest

pytestmark = pytest.mark.integration


def test_a_few_lora_sft_steps_then_a_served_chat_completion(smollm2_import, ray_cluster, tmp_path):
    from pipelines import serve, sft
    from raylm.config import load_config
    from raylm.runs import RunStore
    from raylm.stage import execute

    root, model_run = smollm2_import
    store = RunStore(root)
    rows = [{"messages": [{"role": "user", "content": f"What is the capital of {c}?"},
                          {"role": "assistant", "content": f"The capital of {c} is {a}."}]}
            for c, a in (("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Peru", "Lima"))] * 2
    for split in ("tasks_train", "tasks_test"):
        os.makedirs(tmp_path / split)
        pd.DataFrame(rows).to_parquet(tmp_path / split / "part.parquet")
    with store.start_run("curate", {}) as run:
        run.add_artifact("dataset", "dataset", str(tmp_path))
    cfg = load_config(sft.Config, None, [
        f"root={root}", f"inputs.model={model_run}", f"inputs.dataset={run.id}", "resources.num_workers=1",
        "train.max_steps=2", "train.batch_size=2", "train.seq_len=48", "train.eval_every=2", "train.log_every=1",
        "optim.lr=1e-4", "optim.warmup_steps=0", "lora.rank=4", "lora.alpha=8"])
    tuned = store.load(execute(sft, cfg))
    assert tuned.metrics["method"] == "lora" and tuned.metrics["merged"] is True
    assert tuned.metrics["trainable_params"] < tuned.metrics["params"] / 50  # adapters only
    history = store.history(tuned.run_id)
    assert len(history) >= 2 and all(r["loss"] == r["loss"] and r["loss"] < 10 for r in history)  # finite, sane

    cfg = load_config(serve.Config, None, [
        f"root={root}", f"inputs.model={tuned.run_id}", "model_id=smollm2-sft", "port=8013",
        "engine_kwargs.max_model_len=512", "prompt=What is the capital of France?"])
    served = store.load(execute(serve, cfg))
    assert "Paris" in served.metrics["chat"], served.metrics["chat"]
