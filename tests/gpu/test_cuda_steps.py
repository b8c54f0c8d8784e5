"""The training objectives and evaluation on a CUDA GPU in bfloat16 (skipped without CUDA).

No Ray here on purpose: these are the pieces the Ray Train loop runs on each GPU worker, checked where the CPU
suite cannot reach (device placement, bf16 numerics). The multi-worker NCCL path needs Ray on a GPU node.
"""
import pandas as pd
import pytest
import torch

from raylm import eval as E
from raylm.data.tokenize import ChatExamples, PreferencePairs
from raylm.models import train_tokenizer
from raylm.tasks import make_tasks
from raylm.train.steps import OBJECTIVES, make_model

pytestmark = pytest.mark.gpu
TEXT = ("The interpreter reads a module, compiles it to bytecode and executes it. Each function call creates a "
        "new frame with its own local names. ") * 4


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    train_tokenizer([TEXT] * 50 + [f"Question: What is {a} plus {b}? Answer: {a + b}" for a in range(10)
                                   for b in range(10)], vocab_size=512).save_pretrained(path)
    return str(path)


def _train(model, objective, batches, job, steps=40, lr=3e-3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for i in range(steps):
        loss, metrics = OBJECTIVES[objective](model, batches[i % len(batches)], job)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses, metrics


def test_lm_and_preference_steps_learn_on_cuda_in_bf16(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = torch.tensor(tok(TEXT * 10, add_special_tokens=False)["input_ids"][:8 * 64]).view(8, 64).cuda()
    job = {"model": {"preset": "tiny", "dtype": "bfloat16"}, "train": {"seed": 0}, "lora": None,
           "loss": "causal_lm"}
    model = make_model(job, tok).cuda()
    assert next(model.parameters()).dtype == torch.bfloat16
    losses, _ = _train(model, "lm", [{"input_ids": ids, "labels": ids}], job)
    assert losses[-1] < 0.5 * losses[0]

    tasks = [t for t in make_tasks([TEXT] * 20, per_family=40) if t["family"] in ("parity", "add")]

    pairs = PreferencePairs(tokenizer_dir, 48)(pd.DataFrame(tasks))
    batch = {k: torch.as_tensor(v).cuda() for k, v in pairs.items()}
    pjob = {"model": {"preset": "tiny", "dtype": "bfloat16"}, "train": {"seed": 0}, "loss": "dpo", "beta": 0.3,
            "rpo_alpha": 1.0, "lora": {"rank": 8, "alpha": 16, "modules_to_save": ["embed_tokens", "lm_head"]}}
    policy = make_model(pjob, tok).cuda()
    _, before = OBJECTIVES["preference"](policy, batch, pjob)
    losses, after = _train(policy, "preference", [batch], pjob, steps=30, lr=2e-3)
    assert float(before["reward_margin"]) == pytest.approx(0.0, abs=1e-3)  # policy == reference at the start
    assert float(after["reward_margin"]) > 0.1 and float(after["reward_accuracy"]) > 0.7
    assert losses[-1] < losses[0]


def test_reward_step_learns_on_cuda_in_bf16(tokenizer_dir, tmp_path):
    """A scalar-head reward model (LoRA + score head) in bf16 separates chosen from rejected on a fixed batch, and
    the evaluation-side scorer reads it on the GPU."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    base = make_model({"model": {"preset": "tiny"}, "train": {"seed": 0}}, tok)
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    tasks = [t for t in make_tasks([TEXT] * 20, per_family=40) if t["family"] in ("parity", "add")]
    batch = {k: torch.as_tensor(v).cuda() for k, v in PreferencePairs(tokenizer_dir, 48)(pd.DataFrame(tasks)).items()}
    job = {"task": "seq_cls", "model": {"path": str(tmp_path / "base"), "preset": None, "dtype": "bfloat16"},
           "train": {"seed": 0}, "loss": "bradley_terry", "lora": {"rank": 8, "alpha": 16}}
    model = make_model(job, tok).cuda()
    assert next(model.parameters()).dtype == torch.bfloat16
    losses, after = _train(model, "reward", [batch], job, steps=30, lr=2e-3)
    assert losses[-1] < losses[0] and float(after["accuracy"]) > 0.7
    scores = E.reward_pair_scores(model.eval(), tok, tasks[:16])
    assert scores["heldout_pairs"] == 16 and len(scores["reward_chosen"]) == 16


def test_evaluation_runs_on_cuda(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = make_model({"model": {"preset": "tiny", "dtype": "bfloat16"}, "train": {"seed": 0}}, tok).cuda().eval()
    tasks = make_tasks([TEXT] * 20, per_family=10)[:12]
    ppl = E.perplexity(model, tok, [TEXT] * 4, seq_len=32)
    assert ppl["perplexity"] > 1 and ppl["tokens"] > 0
    em = E.exact_match(model, tok, tasks, max_new_tokens=4)
    assert len(em["predictions"]) == len(tasks)
    pref = E.preference_accuracy(model, tok, tasks)
    assert 0.0 <= pref["preference_accuracy"] <= 1.0
    # SFT examples tokenized for the GPU path look like the CPU ones: answer-only labels
    ex = ChatExamples(tokenizer_dir, 48)(pd.DataFrame(tasks))
    assert (ex["labels"] != -100).sum(1).min() >= 2  # at least one answer token and the end-of-turn marker
