"""Quantization maths (raylm.compress.quant): error bounds, packing, GPTQ, sensitivity ranking, fused-group ignore;
and the quantize stage's config errors. Tiny tensors, no Ray."""
import pytest
import torch
from torch import nn

from raylm.compress import quant as Q
from raylm.config import ConfigError, load_config


@pytest.mark.parametrize("bits,group_size", [(8, 0), (8, 32), (4, 32), (4, 16), (4, 0)])
def test_quantize_dequantize_within_half_a_step(bits, group_size):
    torch.manual_seed(0)
    w = torch.randn(24, 64) * torch.logspace(-2, 1, 64)  # columns of very different size
    gs = group_size or w.shape[1]
    dq, s = Q.rtn(w, bits, gs)
    assert s.shape == (24, 64 // gs)
    step = s.repeat_interleave(gs, dim=1)
    assert ((w - dq).abs() <= step / 2 + 1e-6).all()
    q = Q.quantize(w, s, bits)
    assert q.abs().max() <= Q.qmax(bits) and q.abs().max() == Q.qmax(bits)  # the group maximum hits the end
    # a smaller group never does worse than a whole row
    if group_size:
        assert (w - dq).pow(2).mean() <= (w - Q.rtn(w, bits, 64)[0]).pow(2).mean()


def test_int4_is_coarser_than_int8():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    e8 = (w - Q.rtn(w, 8, 32)[0]).abs().mean()
    e4 = (w - Q.rtn(w, 4, 32)[0]).abs().mean()
    assert e4 > 8 * e8


def test_int4_packing_round_trips_and_matches_compressed_tensors():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    q = torch.randint(-8, 8, (5, 64), generator=torch.Generator().manual_seed(2), dtype=torch.int8)
    packed = Q.pack_int4(q)
    assert packed.shape == (5, 8) and packed.dtype == torch.int32
    assert torch.equal(Q.unpack_int4(packed, 64), q)
    assert torch.equal(packed, pack_to_int32(q, 4))  # the same words compressed-tensors writes for vLLM


def test_gptq_beats_rtn_on_correlated_inputs():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2048, 8, generator=g) @ torch.randn(8, 64, generator=g)  # low-rank, correlated inputs
    x = x + 0.05 * torch.randn(2048, 64, generator=g)
    w = torch.randn(32, 64, generator=g)
    h = 2 * x.T @ x / x.shape[0]
    for bits in (4, 8):
        wg, sg = Q.gptq(w, h, bits, 16)
        wr, _ = Q.rtn(w, bits, 16)
        err_g = (x @ (w - wg).T).pow(2).mean()
        err_r = (x @ (w - wr).T).pow(2).mean()
        assert err_g < 0.7 * err_r, (bits, err_g, err_r)
        # GPTQ output lies on its own grid: every value is an integer multiple of its group scale
        codes = wg / sg.repeat_interleave(16, dim=1)
        assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.abs().max() <= Q.qmax(bits) + 1e-3


class Tiny(nn.Module):
    """A stand-in decoder: model.layers[i].{self_attn,mlp}.* Linears."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Module()
        self.model.layers = nn.ModuleList()
        for _ in range(2):
            layer = nn.Module()
            layer.self_attn = nn.Module()
            for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(layer.self_attn, p, nn.Linear(16, 16, bias=False))
            layer.mlp = nn.Module()
            for p in ("gate_proj", "up_proj", "down_proj"):
                setattr(layer.mlp, p, nn.Linear(16, 16, bias=False))
            self.model.layers.append(layer)
        self.lm_head = nn.Linear(16, 16, bias=False)


def test_targets_ignore_and_fused_groups():
    m = Tiny()
    t = Q.target_linears(m, ["lm_head"])
    assert len(t) == 14 and "lm_head" not in t
    assert "model.layers.1.mlp.down_proj" not in Q.target_linears(m, ["*.1.mlp.down_proj"])
    assert len(Q.target_linears(m, ["re:layers\\.0\\."])) == 7
    names = [n for n, x in m.named_modules() if isinstance(x, nn.Linear)]
    ignore, added = Q.expand_fused(["model.layers.0.self_attn.k_proj"], names)
    assert sorted(added) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    assert len(Q.target_linears(m, ignore)) == 11


def test_sensitivity_scan_finds_the_fragile_layer():
    """A tiny Llama trained a few steps, then made fragile at layer 1's down_proj: one huge weight per row in an
    input channel that is always zero (up_proj row 5 zeroed) is harmless in full precision but sets every row's
    scale, so per-channel int4 rounds the row's other weights to zero. That Linear must rank first."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from raylm.models import train_tokenizer

    texts = [f"the {w} number {i} is {i * 7}" for i in range(200) for w in ("red", "blue")]
    tok = train_tokenizer(texts, 300)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg)
    ids = torch.tensor(sum(tok(texts, add_special_tokens=False)["input_ids"], [])[: 64 * 32]).view(64, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        mlp = model.model.layers[1].mlp
        mlp.up_proj.weight[5, :] = 0
        mlp.down_proj.weight[:, 5] = 100 * mlp.down_proj.weight.abs().max()
    ranked = Q.sensitivity_scan(model, tok, texts[:50], bits=4, group_size=0, granularity="linear", seq_len=32,
                                max_blocks=8, ignore=["lm_head"])
    assert ranked[0]["name"] == "model.layers.1.mlp.down_proj", ranked[:3]
    assert ranked[0]["delta"] > 3 * ranked[1]["delta"] and len(ranked) == 14
    layers = Q.sensitivity_scan(model, tok, texts[:50], bits=4, group_size=0, granularity="layer", seq_len=32,
                                max_blocks=8, ignore=["lm_head"])
    assert [r["name"] for r in layers][0] == "model.layers.1" and layers[0]["pattern"] == "model.layers.1.*"


def test_smoothing_and_awq_keep_the_function():
    """SmoothQuant's and AWQ's scale folding must not change the full-precision model's output."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    ids = [torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with torch.no_grad():
        ref = model(input_ids=ids[0]).logits
        Q.smooth(model, ids, alpha=0.5)
        assert torch.allclose(model(input_ids=ids[0]).logits, ref, atol=1e-4)
        Q.awq(model, ids, bits=4, group_size=16, grid=5)
        assert torch.allclose(model(input_ids=ids[0]).logits, ref, atol=1e-4)


@pytest.mark.parametrize("over,key", [
    ({"bits": 3}, "bits must be 4 or 8"),
    ({"method": "fp8"}, "method"),
    ({"bits": 4, "scheme": "W8A16"}, "scheme=W8A16 needs bits=8"),
    ({"method": "smoothquant_w8a8", "bits": 4}, "W8A8"),
    ({"method": "dynamic_int8", "group_size": 32}, "group_size: 0"),
    ({"group_size": -1}, "group_size"),
])
def test_config_errors(over, key):
    from pipelines import quantize

    with pytest.raises(ConfigError, match=key):
        load_config(quantize.Config, {"inputs": {"model": "x", "dataset": "y"}, **over})


def test_tiny_yaml_is_the_int8_demo_config():
    from pathlib import Path

    from pipelines import quantize

    cfg = load_config(quantize.Config, Path(__file__).parents[2] / "pipelines/configs/quantize/tiny.yaml")
    assert cfg.bits == 8 and cfg.resolved_scheme() == "W8A8" and cfg.ignore == ["lm_head"]
