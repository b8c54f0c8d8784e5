"""Bad input gets a clear error and loses nothing: malformed records quarantined, wrong parents refused."""
import json
import shutil
import subprocess
import sys

import pytest

from raylm.config import ConfigError, load_config
from raylm.runs import RunError
from raylm.stage import execute

pytestmark = pytest.mark.integration


def recipe(stage):
    import importlib

    return importlib.import_module(f"pipelines.{stage}")


def test_malformed_jsonl_is_quarantined_and_counts_add_up(ray_cluster, tmp_path):
    src = tmp_path / "docs.jsonl"
    from raylm.data.synth import Generator

    g = Generator(seed=3)  # distinct English-like documents: the quality filters and fuzzy dedup keep them all
    docs = [g.document(80) for _ in range(20)]
    lines = [json.dumps({"id": f"d{i}", "source": "web", "text": t}) for i, t in enumerate(docs)]
    lines += [json.dumps({"id": "dup", "source": "web", "text": docs[3]}),
              "{broken json", json.dumps(["not", "an", "object"]), json.dumps({"id": "x", "body": "no text"}),
              json.dumps({"id": "short", "source": "web", "text": "too short"}),
              json.dumps({"id": "junk", "source": "web", "text": "1234567890 " * 30})]
    src.write_text("\n".join(lines) + "\n")
    cfg = load_config(recipe("curate").Config, None, [f"root={tmp_path / 'runs'}", f"source={src}",
                                                      "tasks.enabled=false", "val_percent=10"])
    run_id = execute(recipe("curate"), cfg)
    from raylm.runs import RunStore

    x = RunStore(cfg.root).load(run_id).metrics
    assert x["docs_in"] == 26 == x["docs_kept"] + x["docs_dropped"] + x["docs_quarantined"]
    assert x["docs_kept"] == 20 and x["duplicates_removed"] == 1
    assert x["quarantine_reasons"] == {"malformed:invalid_json": 1, "malformed:not_an_object": 1,
                                       "malformed:no_text": 1}
    assert x["drop_reasons"]["min_chars"] == 1 and x["drop_reasons"]["alpha_ratio"] == 1


def test_stage_pointed_at_wrong_parent_fails_before_starting(ray_cluster, tmp_path):
    from raylm.runs import RunStore

    root = tmp_path / "runs"
    cfg = load_config(recipe("curate").Config, None, [f"root={root}", "sources=[pydoc_topics]",
                                                      "tasks.enabled=false"])
    data = execute(recipe("curate"), cfg)
    sft = load_config(recipe("sft").Config, None, [f"root={root}", f"inputs.model={data}", f"inputs.dataset={data}"])
    with pytest.raises(RunError, match=r"input 'model' needs a model artifact.*stage curate"):
        execute(recipe("sft"), sft)
    with pytest.raises(ConfigError, match="missing input.*inputs.tokenizer"):
        execute(recipe("pretrain"), load_config(recipe("pretrain").Config, None,
                                                [f"root={root}", f"inputs.dataset={data}"]))
    with pytest.raises(ConfigError, match="path='/no/such/tokenizer' is not a tokenizer directory"):
        execute(recipe("tokenizer"), load_config(recipe("tokenizer").Config, None, [
            f"root={root}", f"inputs.dataset={data}", "path=/no/such/tokenizer"]))
    assert [m.stage for m in RunStore(root).list()] == ["curate"]  # nothing half-started

    # the input artifact's files were deleted: the CLI says which, exits 2
    shutil.rmtree(root / data / "data")
    proc = subprocess.run([sys.executable, "-m", "pipelines.tokenizer", f"root={root}", f"inputs.dataset={data}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "is missing at" in proc.stderr


def test_stage_asking_for_a_split_the_dataset_lacks_fails_before_starting(lifecycle, tmp_path):
    """A dataset curated without tasks has no tasks_* splits: SFT/DPO/evaluate say so before any run starts."""
    from raylm.runs import RunStore

    root = tmp_path / "runs"
    data = execute(recipe("curate"), load_config(recipe("curate").Config, None, [
        f"root={root}", "sources=[pydoc_topics]", "tasks.enabled=false"]))
    model_run = lifecycle["runs"]["pretrain"]  # a real model, its manifest copied into this store
    (root / model_run).mkdir()
    (root / model_run / "manifest.json").write_text(lifecycle["store"].load(model_run).to_json())
    for stage, key in (("sft", "train_split='tasks_train'"), ("dpo", "train_split='tasks_train'"),
                       ("evaluate", "held-out tasks='tasks_test'")):
        cfg = load_config(recipe(stage).Config, None, [f"root={root}", f"inputs.model={model_run}",
                                                       f"inputs.dataset={data}"])
        with pytest.raises(RunError, match=f"{stage}: {key} not found in .*it has: .*text_train"):
            execute(recipe(stage), cfg)
    assert sorted(m.stage for m in RunStore(root).list()) == ["curate", "pretrain"]


def test_preference_rows_without_rejected_answer_are_counted_and_skipped(ray_cluster, tmp_path):
    """Task rows whose `wrong` (the rejected answer) is null or empty cannot form a pair: the reward stage drops
    them before tokenizing, counts them per split and trains on the rest. Everything is hand-made and tiny (a
    tokenizer and a 1-layer model saved as a run, 2 steps on 1 worker), so the test needs no lifecycle."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raylm import tasks
    from raylm.config import ModelSpec
    from raylm.models import build_model, train_tokenizer
    from raylm.runs import RunStore

    root = tmp_path / "runs"
    store = RunStore(root)
    text = "Which number comes after seven? Repeat the word: window. Is nine even or odd? " * 20
    rows = tasks.make_tasks([text], per_family=20)
    with store.start_run("pretrain", {"note": "hand-made tiny model"}) as model_run:
        tok = train_tokenizer([text, *(f"{t['prompt']} {t['answer']} {t['wrong']}" for t in rows)], 400)
        model = build_model(ModelSpec(overrides={"hidden_size": 32, "intermediate_size": 64,
                                                 "num_hidden_layers": 1}), tok)
        model.save_pretrained(root / model_run.id / "model")
        tok.save_pretrained(root / model_run.id / "model")
        model_run.add_artifact("model", "model", model_run.uri("model"))
    holes = {"tasks_train": (rows[:40], [None, None, "", "  "]), "tasks_test": (rows[40:52], [None, ""])}
    with store.start_run("curate", {"note": "hand-made: some rows lack the rejected answer"}) as data_run:
        for split, (part, bad) in holes.items():
            part = [dict(r) for r in part]
            for row, wrong in zip(part, bad):
                row["wrong"] = wrong
            (root / data_run.id / "data" / split).mkdir(parents=True)
            pq.write_table(pa.Table.from_pylist(part), root / data_run.id / "data" / split / "part-0.parquet")
        data_run.add_artifact("dataset", "dataset", data_run.uri("data"))
    cfg = load_config(recipe("reward").Config, None, [
        f"root={root}", f"inputs.model={model_run.id}", f"inputs.dataset={data_run.id}", "train.max_steps=2",
        "train.batch_size=8", "train.eval_every=2", "resources.num_workers=1", "optim.warmup_steps=1"])
    m = store.load(execute(recipe("reward"), cfg))
    x = m.metrics
    assert m.status == "succeeded" and x["pairs_skipped_missing_rejected"] == 6
    assert x["pairs_skipped_missing_rejected_per_split"] == {"tasks_train": 4, "tasks_test": 2}
    assert x["pairs"] == 36 and x["val_pairs"] == 10 and x["heldout_pairs"] == 10
