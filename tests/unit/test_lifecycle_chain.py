"""The lifecycle's chains (no Ray, nothing runs): the embedded default unchanged, a chain that starts from an
import, evaluations after several stages with the chain's runs as baselines; the arithmetic taskset never trains on
the bundled evaluation's problems."""
from pathlib import Path

import pytest

from pipelines import lifecycle as lc
from raylm import tasks
from raylm.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "pipelines" / "configs"


def chain_of(name: str, *overrides: str) -> tuple:
    path = CONFIGS / "lifecycle" / f"{name}.yaml"
    cfg = load_config(lc.Config, path, ["root=/nonexistent-raylm-root", *overrides])
    configs = lc.stage_configs(cfg, path.parent)
    return cfg, configs, lc.steps(cfg, list(configs))


def test_the_embedded_default_chain_is_unchanged():
    _, configs, steps = chain_of("tiny")
    assert [k for k, _, _ in steps] == ["curate", "tokenizer", "pretrain", "sft", "dpo", "reward", "rl", "evaluate",
                                        "quantize", "serve", "report"]
    assert lc.source(lc.WIRING["sft"]["model"], configs) == "pretrain"
    assert lc.source(lc.WIRING["sft"]["dataset"], configs) == "curate"


def test_an_import_chain_runs_only_its_sections_and_evaluates_after_each_model():
    cfg, configs, steps = chain_of("smollm2")
    assert [k for k, _, _ in steps] == ["import", "evaluate@import", "taskset", "sft", "evaluate@sft", "rl",
                                        "evaluate@rl", "quantize", "serve", "report"]
    assert configs["import"].source == "builtin:smollm2"
    assert lc.source(lc.WIRING["sft"]["model"], configs) == "import"
    assert lc.source(lc.WIRING["rl"]["dataset"], configs) == "taskset"
    assert lc.source(lc.WIRING["evaluate"].get("dataset", ()), configs) is None  # lm-eval tasks only
    # baselines: the chain's runs that came before, never the model itself
    ev = configs["evaluate"]
    done = {"import": "imp-1"}
    assert lc.baselines_of(ev, list(configs), done, "imp-1") == []
    done.update(sft="sft-1")
    assert lc.baselines_of(ev, list(configs), done, "sft-1") == ["imp-1"]
    done.update(rl="rl-1")
    assert lc.baselines_of(ev, list(configs), done, "rl-1") == ["imp-1", "sft-1"]
    assert lc.source(("serve", "evaluate"), {"evaluate@sft": 1, "evaluate@rl": 2}) == "evaluate@rl"


def test_bad_import_chains_fail_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match="evaluate.after.*pretrain"):
        chain_of("smollm2", "evaluate.after=[pretrain]")
    cfg = load_config(lc.Config, CONFIGS / "lifecycle" / "smollm2.yaml",
                      [f"root={tmp_path}", "evaluate.after=[import]", "evaluate.baselines=[dpo]"])
    with pytest.raises(ConfigError, match="baselines.*dpo"):
        lc.run(cfg, CONFIGS / "lifecycle")
    assert not list(tmp_path.iterdir())


def test_arithmetic_training_rows_never_include_the_evaluation_problems():
    held = {r["prompt"] for r in tasks.arithmetic_eval_problems()}
    assert len(held) == 250
    train = tasks.arithmetic_tasks("train")  # the whole train part
    assert not held & {r["prompt"] for r in train}
    assert all(str(eval(r["prompt"].split("What is ")[1].split("?")[0].replace("plus", "+").replace("minus", "-")))
               == r["answer"] for r in train[:50])
    # deterministic across calls (and machines: a hash partition, a string-seeded draw)
    assert tasks.arithmetic_tasks("train", 5, 3) == tasks.arithmetic_tasks("train", 5, 3)
