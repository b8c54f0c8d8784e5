"""The reward stage without Ray: config and input checks, and the sequence-classification model it trains/exports."""
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raylm.config import ConfigError, load_config
from raylm.runs import RunError, RunStore
from raylm.stage import execute


def _reward():
    from pipelines import reward

    return reward


def _fake_run(store, stage, name, kind, uri_of):
    """A succeeded run whose one artifact is whatever `uri_of(run)` writes and returns."""
    with store.start_run(stage, {}) as run:
        run.add_artifact(name, kind, uri_of(run))
    return run.id


def test_unknown_loss_names_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown reward loss 'bt'.*bradley_terry"):
        load_config(_reward().Config, None, ["loss=bt"])


def test_split_without_rejected_column_fails_before_a_run_starts(tmp_path):
    store = RunStore(tmp_path / "runs")

    def dataset(run):
        for split in ("tasks_train", "tasks_test"):
            (tmp_path / "runs" / run.id / "data" / split).mkdir(parents=True)
            pq.write_table(pa.table({"prompt": ["Is 3 even or odd?"], "answer": ["odd"], "family": ["parity"]}),
                           tmp_path / "runs" / run.id / "data" / split / "part-0.parquet")
        return run.uri("data")

    def model(run):
        (tmp_path / "runs" / run.id / "model").mkdir(parents=True)
        return run.uri("model")

    data = _fake_run(store, "curate", "dataset", "dataset", dataset)
    sft = _fake_run(store, "sft", "model", "model", model)
    cfg = load_config(_reward().Config, None, [f"root={store.root}", f"inputs.model={sft}", f"inputs.dataset={data}"])
    with pytest.raises(RunError, match=r"reward: train_split='tasks_train' has no column 'wrong' \(the rejected"):
        execute(_reward(), cfg)
    assert sorted(m.stage for m in store.list()) == ["curate", "sft"]  # no reward run directory


def test_reward_model_trains_lora_and_head_and_exports_a_sequence_classifier(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from raylm.config import LoraSpec, ModelSpec
    from raylm.data.tokenize import PreferencePairs
    from raylm.models import build_model, load_tokenizer, train_tokenizer
    from raylm.train.loop import export
    from raylm.train.steps import make_model, reward_step

    train_tokenizer(["What is 2 plus 4? The answer is 6, not 4. Is 3 even or odd? odd"] * 20, 300).save_pretrained(
        tmp_path / "base")
    tok = load_tokenizer(str(tmp_path / "base"))
    build_model(ModelSpec(overrides={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}),
                tok).save_pretrained(tmp_path / "base")
    job = {"objective": "reward", "task": "seq_cls", "loss": "bradley_terry", "train": {"seed": 0},
           "model": {"path": str(tmp_path / "base"), "preset": None}, "lora": LoraSpec(rank=4).model_dump()}
    model = make_model(job, tok)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".score." in n for n in trainable) and any("lora_A" in n for n in trainable)
    assert not any("embed_tokens" in n for n in trainable)

    rows = pd.DataFrame({"prompt": ["What is 2 plus 4?", "Is 3 even or odd?"], "answer": ["6", "odd"],
                         "wrong": ["4", "even"]})
    batch = {k: torch.tensor(v) for k, v in PreferencePairs(str(tmp_path / "base"), 24)(rows).items()}
    loss, metrics = reward_step(model, batch, job)
    loss.backward()
    assert loss.ndim == 0 and set(metrics) == {"loss", "accuracy", "margin", "reward_chosen", "reward_rejected"}

    export(job, {k: v.detach() for k, v in model.state_dict().items()}, tok, str(tmp_path / "out"))
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "model").eval()
    assert exported.config.num_labels == 1 and exported.config.pad_token_id == tok.pad_token_id
    assert load_tokenizer(str(tmp_path / "out" / "model")).chat_template  # the tokenizer travels with the model
    model.eval()
    with torch.no_grad():  # the merged export scores exactly as the trained LoRA model
        ids, mask = batch["chosen_input_ids"], batch["chosen_attention_mask"]
        assert torch.allclose(exported(input_ids=ids, attention_mask=mask).logits,
                              model(input_ids=ids, attention_mask=mask).logits, atol=1e-5)
