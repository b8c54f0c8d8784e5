"""Pure functions: losses, LR schedules, masking, tasks."""
import math

import pytest
import torch

from raylm import losses as L
from raylm.tasks import exact_match, make_tasks
from raylm.train.schedules import lr_multiplier


def test_causal_lm_ignores_masked_labels():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    masked = labels.clone()
    masked[:, :3] = L.IGNORE
    full, part = L.causal_lm(logits, labels), L.causal_lm(logits, masked)
    manual = torch.nn.functional.cross_entropy(logits[:, 2:4].flatten(0, 1), labels[:, 3:].flatten())
    assert torch.isclose(part, manual) and not torch.isclose(full, part)


def test_sequence_logps_sums_unmasked_tokens():
    logits = torch.zeros(1, 4, 8)  # uniform: every token has log-prob -log 8
    labels = torch.tensor([[L.IGNORE, 1, 2, L.IGNORE]])
    assert math.isclose(L.sequence_logps(logits, labels).item(), -2 * math.log(8), rel_tol=1e-5)


@pytest.mark.parametrize("name", sorted(L.PREFERENCE_LOSSES))
def test_preference_losses_prefer_the_chosen_answer(name):
    fn = L.PREFERENCE_LOSSES[name]
    ref = torch.zeros(4)
    good, _, _ = fn(torch.full((4,), 2.0), torch.full((4,), -2.0), ref, ref, beta=0.5)
    bad, rc, rr = fn(torch.full((4,), -2.0), torch.full((4,), 2.0), ref, ref, beta=0.5)
    assert good.shape == (4,) and (good < bad).all() and (rc < rr).all()


def test_dpo_matches_closed_form():
    losses, rc, rr = L.dpo(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([0.5]), torch.tensor([0.5]), beta=2)
    assert math.isclose(losses.item(), -math.log(1 / (1 + math.exp(-2))), rel_tol=1e-5)
    assert math.isclose(rc.item(), 1.0) and math.isclose(rr.item(), -1.0)


def test_bradley_terry_matches_hand_computed_values():
    fn = L.REWARD_LOSSES["bradley_terry"]
    r_c, r_r = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])
    # -log sigma(1) = log(1 + e^-1) = 0.31326; -log sigma(0) = log 2 = 0.69315
    assert torch.allclose(fn(r_c, r_r), torch.tensor([0.31326, 0.69315]), atol=1e-5)
    # margin 0.5: log(1 + e^-0.5) = 0.47408, log(1 + e^0.5) = 0.97408; centering adds 0.1 * (r_c + r_r)^2 = 0.1, 0
    assert torch.allclose(fn(r_c, r_r, margin=0.5, center_coef=0.1), torch.tensor([0.57408, 0.97408]), atol=1e-5)
    # only the difference matters to the BT term: shifting both rewards changes nothing without centering
    assert torch.allclose(fn(r_c + 3, r_r + 3), fn(r_c, r_r))
    assert fn(torch.full((4,), 2.0), torch.zeros(4)).shape == (4,)


def test_warmup_cosine_schedule():
    total, warm = 100, 10
    m = [lr_multiplier(s, total, warm, "cosine", 0.1) for s in range(total + 1)]
    assert m[0] == pytest.approx(0.1) and m[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(m[10:], m[11:]))  # monotone decay after warmup
    assert m[-1] == pytest.approx(0.1)
    assert lr_multiplier(50, total, warm, "constant") == 1.0
    assert lr_multiplier(total, total, warm, "linear", 0.0) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_multiplier(50, total, warm, "step")


def test_tasks_have_stable_heldout_split_and_checkable_answers():
    texts = ["alpha beta gamma delta " * 5, "gamma delta epsilon zeta " * 5] * 10
    a, b = make_tasks(texts, seed=0, per_family=30), make_tasks(texts, seed=0, per_family=30)
    assert a == b and len({t["prompt"] for t in a}) == len(a)
    assert {t["split"] for t in a} == {"train", "test"}
    assert all(t["answer"] != t["wrong"] for t in a)
    assert exact_match(" Seven. ", "seven") and not exact_match("8", "7")
