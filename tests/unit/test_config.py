"""Typed configs: YAML + key=value overrides; bad keys are named with the valid choices; nothing starts."""
import pytest

from raylm.config import ConfigError, load_config, parse_overrides


def recipe(stage):
    import importlib

    return importlib.import_module(f"pipelines.{stage}")


def test_overrides_parse_nested_and_typed():
    assert parse_overrides(["optim.lr=3e-4", "name=x", "lora.target_modules=[q_proj, v_proj]"]) == {
        "optim": {"lr": 3e-4}, "name": "x", "lora": {"target_modules": ["q_proj", "v_proj"]}}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["optim.lr"])


def test_yaml_plus_overrides(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("optim:\n  lr: 0.01\ntrain:\n  max_steps: 7\n")
    cfg = load_config(recipe("pretrain").Config, path, ["train.max_steps=9", "resources.strategy=ddp"])
    assert cfg.optim.lr == 0.01 and cfg.train.max_steps == 9 and cfg.resources.strategy == "ddp"


def test_partial_section_keeps_stage_defaults():
    # pretrain's own default warmup is 20 (the generic OptimSpec default is 10): a partial optim keeps 20.
    cfg = load_config(recipe("pretrain").Config, {"optim": {"lr": 1e-4}})
    assert cfg.optim.lr == 1e-4 and cfg.optim.warmup_steps == 20


def test_unknown_key_is_named_with_choices_and_hint():
    with pytest.raises(ConfigError) as err:
        load_config(recipe("pretrain").Config, None, ["optim.learning_rate=1e-3"])
    msg = str(err.value)
    assert "optim.learning_rate" in msg and "valid keys here" in msg and "warmup_steps" in msg
    with pytest.raises(ConfigError, match="did you mean 'train.max_steps'"):
        load_config(recipe("pretrain").Config, None, ["train.max_step=3"])


def test_null_means_none_for_list_and_mapping_keys():
    cfg = load_config(recipe("sft").Config, None, ["lora.modules_to_save=null", "inputs=null"])
    assert cfg.lora.modules_to_save == [] and cfg.inputs == {}
    assert load_config(recipe("sft").Config, None, ["lora.feedforward_modules=null"]).lora.feedforward_modules is None
    with pytest.raises(ConfigError, match="'train.max_steps'"):  # null is still no number
        load_config(recipe("sft").Config, None, ["train.max_steps=null"])


def test_mistyped_value_names_the_key():
    with pytest.raises(ConfigError, match="'train.max_steps'"):
        load_config(recipe("pretrain").Config, None, ["train.max_steps=many"])
    with pytest.raises(ConfigError, match="'resources.strategy'"):
        load_config(recipe("pretrain").Config, None, ["resources.strategy=megatron"])


def test_corrupt_or_missing_config_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(recipe("sft").Config, bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(recipe("sft").Config, lst)
    with pytest.raises(ConfigError, match="not found"):
        load_config(recipe("sft").Config, tmp_path / "nope.yaml")


def test_every_bundled_config_loads():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "pipelines" / "configs"
    stages = [p.name for p in root.iterdir() if p.is_dir() and p.name != "lifecycle"]
    assert {"curate", "tokenizer", "pretrain", "sft", "dpo", "evaluate", "serve", "report"} <= set(stages)
    for stage in stages:
        for y in (root / stage).glob("*.yaml"):
            load_config(recipe(stage).Config, y)


def test_lifecycle_validates_every_stage_before_starting(tmp_path):
    from pathlib import Path

    from pipelines import lifecycle as lc

    path = Path(__file__).resolve().parents[2] / "pipelines/configs/lifecycle/tiny.yaml"
    cfg = load_config(lc.Config, path, [f"root={tmp_path}", "report.titel=x"])
    with pytest.raises(ConfigError, match="(?s)section .report.*.titel."):
        lc.stage_configs(cfg, path.parent)
    cfg = load_config(lc.Config, path, [f"root={tmp_path}", "skip=[sft]"])
    with pytest.raises(ConfigError, match="skipped"):
        lc.run(cfg, path.parent)
    assert not list(tmp_path.iterdir())  # nothing started


def test_unknown_algorithm_is_a_config_error():
    with pytest.raises(ConfigError, match="'loss'.*choose one of.*dpo"):
        load_config(recipe("dpo").Config, None, ["loss=ppo_typo"])
