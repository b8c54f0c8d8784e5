"""The prune stage on the lifecycle's SFT model: exact sparsity in the saved weights (Wanda per row + recovery that
keeps it, magnitude global), structured pruning that shrinks the config and still loads in HF and vLLM, and bad
inputs refused before any run starts."""
import glob
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from raylm.config import ConfigError, load_config
from raylm.runs import RunError, local_path
from raylm.stage import execute

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
# small scoring sets: the stage measures the input and the output model the same way (side_by_side)
FAST = ["measure.vllm=false", "measure.max_tasks=20", "measure.max_blocks=16", "measure.latency_reps=2",
        "calibration.samples=16"]


def prune_recipe():
    from pipelines import prune

    return prune


def run(lifecycle, *overrides, config="tiny.yaml"):
    store, runs = lifecycle["store"], lifecycle["runs"]
    p = prune_recipe()
    cfg = load_config(p.Config, REPO / "pipelines/configs/prune" / config,
                      [f"root={store.root}", f"inputs.model={runs['sft']}", f"inputs.dataset={runs['curate']}",
                       *FAST, *overrides])
    return store.load(execute(p, cfg))


def weights(uri):
    state = {}
    for f in glob.glob(os.path.join(local_path(uri), "*.safetensors")):
        state.update(load_file(f))
    return state


def targets(state):
    leaves = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    return {k: v for k, v in state.items() if ".layers." in k and k.endswith(".weight") and k.split(".")[-2] in leaves}


def test_wanda_then_recovery_keeps_exact_sparsity_and_lowers_loss(lifecycle):
    m = run(lifecycle, "recovery.steps=12", "recovery.lr=1e-3")
    x = m.metrics
    assert m.status == "succeeded" and x["method"] == "wanda" and x["sparsity_requested"] == 0.5
    for uri in (m.outputs["pruned"].uri, m.outputs["model"].uri):  # before and after recovery
        t = targets(weights(uri))
        assert len(t) == 4 * 7
        for name, w in t.items():  # Wanda's group: every output row loses exactly half of its inputs
            assert ((w == 0).sum(1) == w.shape[1] // 2).all(), (uri, name)
    assert x["sparsity_reached"] == 0.5 and x["target_zeros"] * 2 == x["target_params"]
    state = weights(m.outputs["model"].uri)
    assert x["nonzero_params"] == sum(int((w != 0).sum()) for w in state.values())
    assert x["params_after"] == x["params_before"] == sum(w.numel() for w in state.values())
    # recovery (12 steps, zeros kept) lowers the pruned model's held-out loss, same scorer
    assert x["recovery_steps"] == 12 and x["val_loss_after"] < x["val_loss_pruned"]
    assert set(x["compression"]["models"]) == {"input", "pruned"}
    assert x["compression"]["ratios"]["pruned"]["params"] == 1.0


def test_magnitude_global_reaches_the_exact_count(lifecycle):
    m = run(lifecycle, "method=magnitude", "scope=global", "sparsity=0.3", "recovery.steps=0")
    x, t = m.metrics, targets(weights(m.outputs["model"].uri))
    total = sum(w.numel() for w in t.values())
    zeros = sum(int((w == 0).sum()) for w in t.values())
    assert zeros == round(0.3 * total) == x["target_zeros"] and x["sparsity_reached"] == round(zeros / total, 6)
    per = [float((w == 0).float().mean()) for w in t.values()]
    assert max(per) - min(per) > 0.05  # global: layers end up with different sparsities
    assert "pruned" not in m.outputs  # no recovery, one model


def test_structured_shrinks_config_and_serves_in_hf_and_vllm(lifecycle):
    from transformers import AutoModelForCausalLM

    from raylm.compress import measure

    m = run(lifecycle, "recovery.steps=0", config="structured-tiny.yaml")
    x = m.metrics
    b, a = x["dims_before"], x["dims_after"]
    assert (b["num_attention_heads"], b["num_key_value_heads"], b["intermediate_size"]) == (4, 2, 384)
    assert (a["num_attention_heads"], a["num_key_value_heads"], a["intermediate_size"]) == (2, 1, 288)
    assert a["head_dim"] == b["head_dim"] == 32
    assert x["params_after"] < x["params_before"] and x["checkpoint_bytes_after"] < x["checkpoint_bytes_before"]
    assert x["sparsity_reached"] is None and x["compression"]["ratios"]["pruned"]["params"] < 0.85
    uri = m.outputs["model"].uri
    hf = AutoModelForCausalLM.from_pretrained(local_path(uri))
    assert hf.config.num_attention_heads == 2 and hf.config.intermediate_size == 288
    assert sum(p.numel() for p in hf.parameters()) == x["params_after"]
    with torch.no_grad():
        assert torch.isfinite(hf(input_ids=torch.tensor([[1, 2, 3, 4]])).logits).all()
    v = measure.vllm_generate_speed(uri, prompts=["<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n"] * 4,
                                    max_tokens=8)
    assert v["served"], v["error"]
    assert v["tokens_per_s"] > 0


def test_bad_inputs_fail_before_any_run(lifecycle, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    store, runs = lifecycle["store"], lifecycle["runs"]
    before = len(store.list("prune"))
    with pytest.raises(ConfigError, match=r"sparsity.*\[0, 1\).*1\.0"):
        run(lifecycle, "sparsity=1.0")
    with pytest.raises(ConfigError, match=r"calibration.samples=100000 .*calibration.seq_len=128.* only \d+ "):
        run(lifecycle, "calibration.samples=100000")
    with pytest.raises(ConfigError, match="leaves 0 attention heads"):
        run(lifecycle, "structured.heads_fraction=0.9", config="structured-tiny.yaml")
    with pytest.raises(ConfigError, match="breaks GQA divisibility"):
        run(lifecycle, "structured.heads_fraction=0", "structured.heads_per_layer=1", config="structured-tiny.yaml")
    with pytest.raises(ConfigError, match="method=magnitude needs sparsity"):
        run(lifecycle, "method=magnitude", "sparsity=null")
    # an architecture structured pruning cannot slice: a GPT-2 model run, in a store of its own (a "pretrain" run in
    # the lifecycle's store would become its latest/pretrain)
    from raylm.runs import RunStore

    other = RunStore(str(tmp_path / "runs"))
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(gpt2)
    with other.start_run("pretrain", {"note": "a GPT-2 for the prune test"}) as r:
        r.add_artifact("model", "model", str(gpt2))
    with other.start_run("curate", {"note": "the lifecycle's dataset"}) as d:
        d.add_artifact("dataset", "dataset", store.load(runs["curate"]).output(kind="dataset").uri)
    p = prune_recipe()
    common = [f"root={other.root}", f"inputs.model={r.id}", f"inputs.dataset={d.id}"]
    with pytest.raises(ConfigError, match="GPT2LMHeadModel"):
        execute(p, load_config(p.Config, REPO / "pipelines/configs/prune/structured-tiny.yaml", common))
    with pytest.raises(ConfigError, match="match no weight of GPT2LMHeadModel"):
        execute(p, load_config(p.Config, None, [*common, "sparsity=0.5"]))
    assert not other.list("prune")
    with pytest.raises(RunError, match="needs a model"):
        run(lifecycle, f"inputs.model={runs['curate']}")
    assert len(store.list("prune")) == before  # nothing started
