"""The fine-tuning menu (raylm.train.peft_menu), in process on a tiny Llama: each method trains only what it should,
the loss falls, mergeable methods export a model whose logits equal the PEFT model's, and bad configs fail in
`check_peft` (the driver-side check) with a message naming the problem."""
from __future__ import annotations

import os

import pytest
import torch

from raylm.config import ConfigError, LoraSpec, ModelSpec
from raylm.train.peft_menu import apply_peft, check_peft, export_model, load_4bit_base, qlora_missing

TINY = {"num_hidden_layers": 2}
BIASED = {**TINY, "attention_bias": True, "mlp_bias": True}  # Llama has no biases unless asked (BitFit needs them)


@pytest.fixture(scope="module")
def tok():
    from raylm.models import train_tokenizer

    return train_tokenizer(["What is 2 plus 4? The answer is 6, not 4. Is 3 even or odd? odd"] * 20, 300)


def base(tok, overrides=TINY):
    from raylm.models import build_model

    return build_model(ModelSpec(preset="tiny", overrides=overrides), tok, seed=0)


def batch(tok):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(tok), (4, 16), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def train(model, b, steps=8, lr=1e-2) -> list[float]:
    from raylm.train.steps import lm_step

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss, _ = lm_step(model, b, {"loss": "sft"})
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def logits(model, b):
    model.eval()
    with torch.no_grad():
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


# which trained tensors may change: a substring of their name (None: any)
CHANGES = {"lora": "lora_", "dora": "lora_", "ia3": "ia3_l", "prefix": "prompt_encoder", "prompt": "prompt_encoder",
           "bitfit": ".bias", "full": None}


@pytest.mark.parametrize("method", list(CHANGES))
def test_method_trains_only_its_parameters_and_exports(method, tok, tmp_path):
    from transformers import AutoModelForCausalLM

    spec = LoraSpec(method=method, rank=4, alpha=8) if method in ("lora", "dora") else \
        LoraSpec(method=method, num_virtual_tokens=4) if method in ("prefix", "prompt") else LoraSpec(method=method)
    overrides = BIASED if method == "bitfit" else TINY
    check_peft(spec, ModelSpec(preset="tiny", overrides=overrides))  # a valid config passes the driver check
    model = apply_peft(base(tok, overrides), spec)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    b = batch(tok)
    # scaling vectors and virtual tokens move a random-init model slowly: a larger step for them
    losses = train(model, b, lr=0.1 if method in ("ia3", "prefix", "prompt") else 1e-2)
    assert losses[-1] < losses[0] - 0.05, losses
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "nothing trained"
    if CHANGES[method]:
        assert all(CHANGES[method] in n for n in changed), sorted(changed)[:5]
    else:
        assert any("mlp.down_proj.weight" in n for n in changed)
    if method in ("lora", "dora"):  # the base weights themselves never move
        assert not any("base_layer" in n for n in changed)

    peft_logits = logits(model, b)
    exported, info = export_model(model, str(tmp_path), spec)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    if method in ("prefix", "prompt"):
        assert info["merged"] is False and "adapter/" in info["merge_note"]
        from peft import PeftModel

        served = PeftModel.from_pretrained(reloaded, tmp_path / "adapter")
        out = logits(served, b)
        torch.testing.assert_close(out[:, -b["input_ids"].shape[1]:], peft_logits)
        # the exported base is the untouched base model
        torch.testing.assert_close(logits(reloaded, b), logits(base(tok), b))
    else:
        assert info["merged"] is True
        assert os.path.isdir(tmp_path / "adapter") == (method not in ("bitfit", "full"))
        torch.testing.assert_close(logits(reloaded, b), peft_logits, atol=1e-5, rtol=1e-4)


def test_loop_export_rebuilds_merges_and_records(tok, tmp_path):
    """`loop.export` (what rank 0 runs): rebuild from the job, load the trained state, merge or not."""
    from transformers import AutoModelForCausalLM

    from raylm.train.loop import export
    from raylm.train.steps import make_model

    tok_dir = tmp_path / "tok"
    tok.save_pretrained(tok_dir)
    for method in ("dora", "prompt"):
        spec = LoraSpec(method=method, **({"num_virtual_tokens": 3} if method == "prompt" else {}))
        job = {"model": {"preset": "tiny", "overrides": TINY}, "train": {"seed": 0}, "lora": spec.model_dump()}
        model = make_model(job, tok)
        b = batch(tok)
        train(model, b, steps=3)
        out = tmp_path / method
        info = export(job, {k: v.detach() for k, v in model.state_dict().items()}, tok, str(out))
        assert info["peft_method"] == method and info["merged"] == (method == "dora")
        if method == "dora":
            torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out / "model"), b),
                                       logits(model, b), atol=1e-5, rtol=1e-4)


def test_incremental_adapter_continues_the_saved_weights(tok, tmp_path):
    spec = LoraSpec(rank=4, target_modules=["q_proj", "v_proj"])
    first = apply_peft(base(tok), spec)
    train(first, batch(tok), steps=3)
    first.save_pretrained(tmp_path / "adapter")
    saved = {n: p.detach().clone() for n, p in first.named_parameters() if "lora_" in n}
    check_peft(spec, ModelSpec(preset="tiny", overrides=TINY), adapter=str(tmp_path / "adapter"))
    again = apply_peft(base(tok), spec, adapter=str(tmp_path / "adapter"))
    now = dict(again.named_parameters())
    assert all(torch.equal(now[n], v) and now[n].requires_grad for n, v in saved.items())
    with pytest.raises(ConfigError, match="lora adapter, but lora.method='dora'"):
        check_peft(LoraSpec(method="dora"), ModelSpec(preset="tiny", overrides=TINY), adapter=str(tmp_path / "adapter"))


@pytest.mark.skipif(not qlora_missing(), reason="CUDA and bitsandbytes present: QLoRA can run here")
def test_qlora_fails_clearly_without_cuda_or_bitsandbytes(tok):
    with pytest.raises(ConfigError, match="qlora.*needs.*(bitsandbytes|CUDA)"):
        check_peft(LoraSpec(method="qlora"), ModelSpec(preset="tiny"))
    from raylm.config import ResourcesSpec

    with pytest.raises(ConfigError, match="use_gpu"):
        check_peft(LoraSpec(method="qlora"), ModelSpec(preset="tiny"), resources=ResourcesSpec(use_gpu=False))
    with pytest.raises(ValueError, match="qlora needs"):  # the worker-side guard, should the check be skipped
        load_4bit_base(ModelSpec(path="/nonexistent", preset=None))


def test_unknown_target_module_is_named(tok):
    with pytest.raises(ConfigError, match="no module named 'qkv_proj'.*q_proj"):
        check_peft(LoraSpec(target_modules=["q_proj", "qkv_proj"]), ModelSpec(preset="tiny"))
    with pytest.raises(ConfigError, match="modules_to_save.*'embed'"):
        check_peft(LoraSpec(method="prompt", modules_to_save=["embed"]), ModelSpec(preset="tiny"))


def test_bitfit_on_a_bias_free_model_fails_clearly(tok):
    with pytest.raises(ConfigError, match="bitfit trains bias terms only.*attention_bias"):
        check_peft(LoraSpec(method="bitfit"), ModelSpec(preset="tiny"))
    with pytest.raises(ValueError, match="has none"):
        apply_peft(base(tok), LoraSpec(method="bitfit"))


def test_options_that_do_not_fit_the_method_are_rejected():
    for bad in ({"method": "ia3", "rank": 8}, {"method": "prompt", "target_modules": ["q_proj"]},
                {"method": "lora", "num_virtual_tokens": 8}, {"method": "full", "modules_to_save": ["lm_head"]}):
        with pytest.raises(ValueError, match="does not use"):
            LoraSpec(**bad)
    assert LoraSpec(rank=32, alpha=64, modules_to_save=["embed_tokens", "lm_head"]).method == "lora"  # old YAML


def test_stage_checks_fail_before_any_worker(tok, tmp_path):
    """sft's and dpo's `check` (run before Ray starts) call check_peft on the input model's config."""
    from pipelines import dpo, sft
    from raylm.config import load_config
    from raylm.runs import InputRef

    base(tok).config.save_pretrained(tmp_path / "model")  # the check reads the architecture only
    for split in ("tasks_train", "tasks_test", "text_train"):  # text_train: the recipe replays general text
        (tmp_path / "data" / split).mkdir(parents=True)
    inputs = {"model": InputRef("model", "run-a", "model", "model", str(tmp_path / "model"), ""),
              "dataset": InputRef("dataset", "run-b", "dataset", "dataset", str(tmp_path / "data"), "")}
    recipe = "pipelines/configs/sft/tiny.yaml"  # an existing recipe keeps working, with the new fields
    sft.check(inputs, load_config(sft.Config, recipe, ["lora.method=dora"]))
    with pytest.raises(ConfigError, match="no module named 'qkv'"):
        sft.check(inputs, load_config(sft.Config, recipe, ["lora.target_modules=[q_proj,qkv]"]))
    if qlora_missing(use_gpu=False):
        with pytest.raises(ConfigError, match="qlora"):
            sft.check(inputs, load_config(sft.Config, None, ["lora.method=qlora"]))
    same = {**inputs, "adapter": InputRef("adapter", "run-a", "adapter", "adapter", str(tmp_path), "")}
    with pytest.raises(ConfigError, match="already has this adapter merged"):
        sft.check(same, load_config(sft.Config, recipe))
    with pytest.raises(ConfigError, match="no adapter to disable"):
        dpo.check(inputs, load_config(dpo.Config, None, ["lora.method=bitfit"]))
    with pytest.raises(ConfigError, match="does not use rank=32"):  # a recipe's rank does not fit prompt tuning
        load_config(sft.Config, recipe, ["lora.method=prompt"])
