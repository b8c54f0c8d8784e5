"""Distillation losses and helpers (raylm.compress.distill) and the distill stage's config checks: pure functions on
tiny tensors, checked against TRL's GKD implementation where it defines the same quantity."""
import os

import pytest
import torch

from raylm.compress import distill as D
from raylm.losses import IGNORE

B, T, V = 3, 7, 11


def _logits(seed: int) -> torch.Tensor:
    return torch.randn(B, T, V, generator=torch.Generator().manual_seed(seed)) * 2


def _labels() -> torch.Tensor:
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(9))
    labels[0, :3] = IGNORE  # a prompt
    labels[2, 5:] = IGNORE  # padding
    return labels


@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.0), ("reverse_kl", 1.0), ("jsd", 0.5), ("jsd", 0.2)])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_matches_trl_gkd_generalized_jsd(kind, beta, temperature):
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    gkd = pytest.importorskip("trl.experimental.gkd").GKDTrainer
    s, t, labels = _logits(0), _logits(1), _labels()
    ours = D.kd_loss(s, t, labels, kind, temperature, beta)
    # TRL takes already-aligned logits and labels (it slices them itself before the call) and no T^2 factor
    ref = gkd.generalized_jsd_loss(s[:, :-1], t[:, :-1], labels[:, 1:], beta=beta, temperature=temperature)
    assert torch.allclose(ours, temperature ** 2 * ref, atol=1e-5), (ours, ref)


def test_jsd_endpoints_are_the_kls():
    s, t, labels = _logits(0), _logits(1), _labels()
    assert torch.allclose(D.kd_loss(s, t, labels, "jsd", beta=0.0), D.kd_loss(s, t, labels, "forward_kl"))
    assert torch.allclose(D.kd_loss(s, t, labels, "jsd", beta=1.0), D.kd_loss(s, t, labels, "reverse_kl"))


def test_kd_zero_for_identical_positive_otherwise_and_asymmetric():
    s, t, labels = _logits(0), _logits(1), _labels()
    for kind in D.DIVERGENCES:
        assert D.kd_loss(s, s.clone(), labels, kind).abs() < 1e-6
        assert D.kd_loss(s, t, labels, kind) > 0.01
    assert not torch.allclose(D.kd_loss(s, t, labels, "forward_kl"), D.kd_loss(s, t, labels, "reverse_kl"))


def test_only_label_positions_count():
    s, t, labels = _logits(0), _logits(1), _labels()
    base = D.kd_loss(s, t, labels)
    s2 = s.clone()
    s2[0, :2, 0] += 5.0  # positions 0-1 of row 0 predict labels 1-2: a prompt, ignored
    s2[2, 5:, 0] -= 3.0  # positions 5-6 of row 2 predict padding (and nothing)
    assert torch.allclose(D.kd_loss(s2, t, labels), base)
    s2[1, 3, 0] += 5.0
    assert not torch.allclose(D.kd_loss(s2, t, labels), base)


def test_temperature_scales_by_t_squared():
    s, t, labels = _logits(0), _logits(1), _labels()
    div = D.token_divergence(s, t, "forward_kl", 3.0)
    mask = D.label_mask(labels)
    assert torch.allclose(D.kd_loss(s, t, labels, temperature=3.0), 9 * (div * mask).sum() / mask.sum())


def test_gradient_steps_move_student_to_teacher():
    t, labels = _logits(1), _labels()
    for kind in D.DIVERGENCES:
        s = _logits(0).requires_grad_(True)
        opt = torch.optim.Adam([s], lr=0.2)
        start = D.kd_loss(s, t, labels, kind).item()
        for _ in range(60):
            opt.zero_grad()
            D.kd_loss(s, t, labels, kind, temperature=2.0).backward()
            opt.step()
        assert D.kd_loss(s, t, labels, kind).item() < 0.1 * start, kind


def test_objective_mixes_kd_and_ce_by_alpha():
    from raylm.losses import causal_lm

    s, t, labels = _logits(0), _logits(1), _labels()
    cfg = {"loss": "forward_kl", "temperature": 2.0, "alpha": 0.0}
    loss0, m0 = D.distill_objective(s, t, labels, cfg)
    assert torch.allclose(loss0, causal_lm(s, labels))
    loss1, m1 = D.distill_objective(s, t, labels, {**cfg, "alpha": 1.0})
    assert torch.allclose(loss1, D.kd_loss(s, t, labels, "forward_kl", 2.0))
    half, _ = D.distill_objective(s, t, labels, {**cfg, "alpha": 0.25})
    assert torch.allclose(half, 0.25 * loss1 + 0.75 * loss0)
    # the yardstick is the same whatever the loss and alpha: KL at T = 1
    assert torch.allclose(m0["kl_to_teacher"], m1["kl_to_teacher"])
    assert torch.allclose(m0["kl_to_teacher"], D.kd_loss(s, t, labels, "forward_kl", 1.0))
    assert torch.allclose(m0["reverse_kl_to_teacher"], D.kd_loss(s, t, labels, "reverse_kl", 1.0))


def test_hidden_loss_pairs_layers_and_masks_tokens():
    g = torch.Generator().manual_seed(3)
    sh = tuple(torch.randn(B, T, 5, generator=g) for _ in range(3))  # embeddings + 2 layers
    th = tuple(torch.randn(B, T, 5, generator=g) for _ in range(5))  # embeddings + 4 layers
    assert D.hidden_loss(sh, sh, [(-1, -1), (1, 1)]) == 0
    pair = D.hidden_loss(sh, th, [(-1, -1)])
    assert torch.allclose(pair, ((sh[2] - th[4]) ** 2).mean())
    mask = torch.ones(B, T)
    mask[1] = 0
    masked = D.hidden_loss(sh, th, [(-1, -1)], mask)
    assert torch.allclose(masked, ((sh[2] - th[4]) ** 2).mean(-1)[[0, 2]].mean())
    cfg = {"loss": "forward_kl", "temperature": 1.0, "alpha": 0.5, "hidden_weight": 2.0, "hidden_layers": [(-1, -1)]}
    loss, m = D.distill_objective(_logits(0), _logits(1), _labels(), cfg, sh, th)
    plain, _ = D.distill_objective(_logits(0), _logits(1), _labels(), {**cfg, "hidden_weight": 0.0})
    assert torch.allclose(loss, plain + 2.0 * m["hidden_loss"])


def test_prompt_lengths():
    labels = torch.tensor([[IGNORE, IGNORE, 5, 6], [IGNORE, 4, 4, IGNORE], [IGNORE] * 4])
    assert D.prompt_lengths(labels).tolist() == [2, 1, 4]


def _tok(words: list[str]):
    from raylm.models import train_tokenizer

    return train_tokenizer([" ".join(words)] * 20, 300)


def test_sample_completions_left_pads_and_masks_after_stop():
    from raylm.config import ModelSpec
    from raylm.data.tokenize import chat_tokens
    from raylm.models import build_model

    tok = _tok(["what is two plus two four five six seven"])
    model = build_model(ModelSpec(overrides={"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64,
                                              "num_attention_heads": 2, "num_key_value_heads": 1}), tok).eval()
    rows = [chat_tokens(tok, p, "four", 32) for p in ("what is two plus two", "six")]
    width = 32
    ids = torch.full((2, width), tok.pad_token_id)
    labels = torch.full((2, width), IGNORE)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)], labels[i, : len(y)] = torch.tensor(x), torch.tensor(y)
    stop = D.stop_ids(tok)
    out = D.sample_completions(model, ids, labels, tok.pad_token_id, stop, max_new_tokens=6, temperature=1.0)
    plen = D.prompt_lengths(labels)
    width_p = int(plen.max())
    assert out["input_ids"].shape == (2, width_p + 6)
    for i in range(2):  # the prompt sits right before the answer; its tokens and the left padding are not learned
        n = int(plen[i])
        assert out["input_ids"][i, width_p - n: width_p].tolist() == ids[i, :n].tolist()
        assert (out["labels"][i, :width_p] == IGNORE).all() and out["attention_mask"][i, : width_p - n].sum() == 0
    gen, lab = out["input_ids"][:, width_p:], out["labels"][:, width_p:]
    for i in range(2):
        learned = (lab[i] != IGNORE).tolist()
        hits = [j for j, t in enumerate(gen[i].tolist()) if t in stop]
        end = hits[0] + 1 if hits else 6  # up to and including the first stop token
        assert learned == [True] * end + [False] * (6 - end)
    greedy = [D.sample_completions(model, ids, labels, tok.pad_token_id, stop, 6, 1.0, greedy=True)["input_ids"]
              for _ in range(2)]
    assert torch.equal(*greedy)


def test_tokenizer_difference_names_it():
    a, b = _tok(["alpha beta gamma"]), _tok(["delta epsilon zeta"])
    assert D.tokenizer_difference(a, a) is None
    diff = D.tokenizer_difference(a, b)
    assert diff is not None and ("vocabulary" in diff)
    c = _tok(["alpha beta gamma"])
    c.eos_token = "<|im_start|>"
    assert "eos_token" in D.tokenizer_difference(a, c)


@pytest.mark.parametrize("override,key", [("distill.temperature=0", "distill.temperature"),
                                          ("distill.temperature=-1", "distill.temperature"),
                                          ("distill.alpha=1.5", "distill.alpha"),
                                          ("distill.alpha=-0.1", "distill.alpha"),
                                          ("distill.loss=kl", "distill.loss"),
                                          ("on_policy.fraction=0.5", "on_policy")])
def test_config_rejects_bad_values_naming_the_key(override, key):
    from pipelines import distill
    from raylm.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(distill.Config, None, [override])
    assert key in str(e.value)
    if "loss" in override:
        assert "forward_kl" in str(e.value) and "reverse_kl" in str(e.value)
