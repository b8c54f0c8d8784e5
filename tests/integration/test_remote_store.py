"""A run store on s3:// (a real S3 API over HTTP, moto's server): stages read their inputs from it and write
Parquet, checkpoints, models and manifests to it; training and evaluation fetch remote models themselves."""
import fsspec
import pytest

from raylm.config import load_config
from raylm.runs import RunStore
from raylm.stage import execute

pytestmark = pytest.mark.integration


def run(stage: str, root: str, *overrides: str) -> str:
    import importlib

    recipe = importlib.import_module(f"pipelines.{stage}")
    return execute(recipe, load_config(recipe.Config, None, [f"root={root}", *overrides]))


def test_lifecycle_stages_on_an_s3_run_store(ray_cluster, s3_endpoint):
    fsspec.filesystem("s3").mkdir("raylm-runs")
    root = "s3://raylm-runs/team/exp1"
    data = run("curate", root, "sources=[pydoc_topics]", "tasks.per_family=40")
    tok = run("tokenizer", root, f"inputs.dataset={data}", "vocab_size=512")
    pre = run("pretrain", root, f"inputs.dataset={data}", f"inputs.tokenizer={tok}", "train.max_steps=4",
              "train.eval_every=2", "train.batch_size=8", "train.seq_len=64", "optim.warmup_steps=1")
    sft = run("sft", root, f"inputs.model={pre}", f"inputs.dataset={data}", "train.max_steps=3",
              "train.eval_every=3", "optim.warmup_steps=1")
    ev = run("evaluate", root, f"inputs.model={sft}", f"inputs.dataset={data}", "max_tasks=16",
             "max_text_blocks=8")

    store = RunStore(root)
    assert [m.stage for m in store.lineage(ev)] == ["curate", "tokenizer", "pretrain", "sft", "evaluate"]
    fs = fsspec.filesystem("s3")
    for rid in (data, tok, pre, sft, ev):
        m = store.load(rid)
        assert m.status == "succeeded"
        for art in m.outputs.values():
            assert art.uri.startswith("s3://raylm-runs/team/exp1/"), art.uri
            assert fs.exists(art.uri), art.uri
    model = store.load(sft).outputs["model"].uri
    assert fs.exists(f"{model}/config.json") and fs.exists(f"{model}/tokenizer_config.json")
    scored = store.load(ev).metrics["models"]
    assert [v["stage"] for v in scored.values()] == ["pretrain", "sft"]
    assert all(v["perplexity"] > 1 for v in scored.values())
