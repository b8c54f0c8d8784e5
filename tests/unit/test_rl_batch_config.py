"""RL stage pieces that need no cluster: the sample -> tensor layout and the config's up-front refusals."""
import pytest
import torch

from raylm.config import ConfigError, load_config
from raylm.losses import token_logps
from raylm.rl.batch import build_batch, outcome_on_last_token


def test_batch_puts_response_logps_at_next_token_positions():
    prompts = [[5, 6, 7], [8, 9]]
    samples = [[{"ids": [1, 2], "logps": [-0.1, -0.2]}, {"ids": [3], "logps": [-0.3]}],
               [{"ids": [4, 4, 4], "logps": [-1.0, -2.0, -3.0]}, {"ids": [2], "logps": [-0.5]}]]
    b = build_batch(prompts, samples, pad_id=0)
    assert b["input_ids"].tolist()[0] == [5, 6, 7, 1, 2] and b["input_ids"].tolist()[2] == [8, 9, 4, 4, 4]
    assert b["attention_mask"].tolist()[1] == [1, 1, 1, 1, 0]
    # logits at t predict ids[t+1]: the first response token of row 0 (position 3) is scored at column 2
    assert b["mask"].tolist() == [[0, 0, 1, 1], [0, 0, 1, 0], [0, 1, 1, 1], [0, 1, 0, 0]]
    assert b["behaviour_logp"][0].tolist() == pytest.approx([0, 0, -0.1, -0.2])
    assert b["behaviour_logp"][2].tolist() == pytest.approx([0, -1.0, -2.0, -3.0])
    assert b["response_len"].tolist() == [2, 1, 3, 1]
    # the learner's own log-probs land on exactly the same cells
    logits = torch.randn(4, 5, 10)
    _, mask = token_logps(logits, b["labels"])
    assert torch.equal(mask, b["mask"])


def test_outcome_reward_sits_on_the_last_response_token():
    mask = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0.]])
    out = outcome_on_last_token(torch.tensor([2.0, -1.0, 5.0]), mask)
    assert out.tolist() == [[0, 0, 2, 0], [-1, 0, 0, 0], [0, 0, 0, 0]]


def _rl(*overrides):
    import pipelines.rl as rl

    return load_config(rl.Config, "pipelines/configs/rl/tiny.yaml", list(overrides))


@pytest.mark.parametrize("override, message", [
    ("algorithm=grpoo", "unknown RL algorithm 'grpoo'; choose one of .*'dapo'.*'ppo'"),
    ("rewards=[{name: exact}]", "unknown reward 'exact'; choose one of .*exact_match"),
    ("kl.estimator=k4", "unknown KL estimator 'k4'"),
    ("kl.controller=adaptive", "needs kl.target"),
    ("group_size=1", "group_size must be >= 2"),
    ("rollout.placement=far", "rollout.placement"),
    ("max_prompt_len=250", "exceeds the rollout engine's context rollout.engine_kwargs.max_model_len=256"),
])
def test_bad_rl_config_is_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        _rl(override)


def test_every_algorithm_and_reward_is_accepted():
    from raylm.rl.algos import ALGORITHMS

    for name in ALGORITHMS:
        assert _rl(f"algorithm={name}").algorithm == name
    cfg = _rl("rewards=[{name: exact_match, weight: 1}, {name: format, weight: 0.2}]")
    assert [r.name for r in cfg.rewards] == ["exact_match", "format"]
