"""Document masking on packed blocks (pretrain's `doc_mask`), no Ray: `pipelines.pretrain.as_lm` turns curated
blocks into position_ids / segment_ids / labels, and `lm_step` masks attention across documents, so a document's
logits inside a packed block equal its logits run alone (sdpa and eager, Llama and Qwen2, bf16 autocast, under
DDP and FSDP2 wrappers)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from pipelines.pretrain import as_lm
from raylm.config import ModelSpec
from raylm.models import model_config
from raylm.train.steps import lm_step

VOCAB = 97
DOC_A, DOC_B = [5, 17, 3, 44, 2], [9, 61, 12, 7, 80, 33, 2]  # a 12-token block: A then B


def test_as_lm_positions_segments_and_labels():
    ids = np.arange(16).reshape(2, 8) + 10
    batch = {"input_ids": np.array([ids[0], ids[1]], dtype=object),
             "doc_starts": np.array([np.array([0, 3, 5], np.int32), np.array([4], np.int32)], dtype=object)}
    out = as_lm(batch, doc_mask=True)
    assert set(out) == {"input_ids", "labels", "position_ids", "segment_ids"}
    assert all(v.dtype == np.int64 and v.shape == (2, 8) for v in out.values())
    assert out["input_ids"].tolist() == ids.tolist()
    assert out["segment_ids"].tolist() == [[0, 0, 0, 1, 1, 2, 2, 2], [0, 0, 0, 0, 1, 1, 1, 1]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 3, 0, 1, 2, 3]]
    labels = ids.copy()
    labels[0, [3, 5]] = -100
    labels[1, 4] = -100  # a block whose recorded starts lack 0 still opens a segment at 0, label kept there
    assert out["labels"].tolist() == labels.tolist()

    plain = as_lm({"input_ids": batch["input_ids"]}, doc_mask=False)  # no doc_starts column needed
    assert set(plain) == {"input_ids", "labels"} and (plain["labels"] == ids).all()
    assert plain["labels"].dtype == np.int64


def _llama(attn: str):
    torch.manual_seed(0)
    cfg = model_config(ModelSpec(preset="tiny", overrides={"num_hidden_layers": 2}), vocab_size=VOCAB)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval()


def _qwen2(attn: str):
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval()


def packed_batch(doc_mask: bool = True) -> dict:
    """Two rows: A|B and B|A (B = 7 tokens, A = 5), through pretrain's transform, as torch tensors."""
    rows = np.array([np.array(DOC_A + DOC_B), np.array(DOC_B + DOC_A)], dtype=object)
    starts = np.array([np.array([0, len(DOC_A)]), np.array([0, len(DOC_B)])], dtype=object)
    return {k: torch.from_numpy(v) for k, v in as_lm({"input_ids": rows, "doc_starts": starts}, doc_mask).items()}


def alone(model, doc) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([doc])).logits[0]


def step_logits(model, batch, inner=None) -> tuple[torch.Tensor, torch.Tensor]:
    """lm_step on `model` (maybe wrapped); the logits the HF model inside computed (lm_step returns the loss)."""
    seen = []
    hook = (inner or model).register_forward_hook(lambda mod, args, out: seen.append(out.logits.detach()))
    try:
        with torch.no_grad():
            loss, _ = lm_step(model, batch, {"loss": "causal_lm"})
    finally:
        hook.remove()
    return seen[-1], loss


@pytest.mark.parametrize("build,attn", [(_llama, "sdpa"), (_llama, "eager"), (_qwen2, "sdpa"), (_qwen2, "eager")])
def test_a_packed_document_sees_only_itself(build, attn):
    model = build(attn)
    a, b = len(DOC_A), len(DOC_B)
    logits, loss = step_logits(model, packed_batch())
    solo_a, solo_b = alone(model, DOC_A), alone(model, DOC_B)
    torch.testing.assert_close(logits[0, :a], solo_a, atol=1e-5, rtol=0)  # unchanged: A comes first
    torch.testing.assert_close(logits[0, a:], solo_b, atol=1e-5, rtol=0)  # B after A: as if alone
    torch.testing.assert_close(logits[1, :b], solo_b, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[1, b:], solo_a, atol=1e-5, rtol=0)
    # the loss skips each document's first token after the block's first (its label is -100)
    ids = packed_batch()["input_ids"]
    keep = torch.ones_like(ids[:, 1:], dtype=torch.bool)
    keep[0, a - 1] = keep[1, b - 1] = False
    want = torch.nn.functional.cross_entropy(logits[:, :-1][keep], ids[:, 1:][keep])
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)

    unmasked, _ = step_logits(model, packed_batch(doc_mask=False))  # the old behaviour: B attends to A
    torch.testing.assert_close(unmasked[0, :a], solo_a, atol=1e-5, rtol=0)
    assert (unmasked[0, a:] - solo_b).abs().max() > 1e-2


def test_doc_mask_under_bf16_autocast():
    model = _llama("sdpa")
    a = len(DOC_A)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = step_logits(model, packed_batch())
        unmasked, _ = step_logits(model, packed_batch(doc_mask=False))
        solo_b = alone(model, DOC_B)
    masked_err = (logits[0, a:].float() - solo_b.float()).abs().max()
    unmasked_err = (unmasked[0, a:].float() - solo_b.float()).abs().max()
    assert torch.isfinite(loss) and masked_err < 0.05 and unmasked_err > 5 * masked_err, (masked_err, unmasked_err)


@pytest.fixture()
def one_process_group(tmp_path):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_doc_mask_through_distributed_wrappers(one_process_group, wrapper):
    model = _llama("sdpa")
    solo_b = alone(model, DOC_B)
    if wrapper == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        wrapped = fully_shard(model)
    batch = packed_batch()
    loss, _ = lm_step(wrapped, batch, {"loss": "causal_lm"})
    loss.backward()  # trains through the mask
    assert torch.isfinite(loss)
    logits, _ = step_logits(wrapped, batch, inner=model)  # the wrapper passed the mask and positions on
    torch.testing.assert_close(logits[0, len(DOC_A):], solo_b, atol=1e-5, rtol=0)
