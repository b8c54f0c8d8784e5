"""Pruning functions on tiny tensors and a tiny random Llama: exact sparsity, Wanda's scores by hand, structured
pruning equivalent to zeroing the removed heads and channels."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from raylm.compress import prune as P
from raylm.compress import prune_structured as S


def tiny(heads=4, kv=2, inter=48, layers=2, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, head_dim=8, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def blocks(n=6, t=16, seed=1):
    return torch.randint(0, 64, (n, t), generator=torch.Generator().manual_seed(seed))


def test_wanda_scores_match_a_hand_computation():
    w = torch.tensor([[1.0, -2.0, 3.0], [-4.0, 0.5, 6.0]])
    # inputs: 2 tokens x 3 features; ||X_j||_2 = sqrt(sum of squares over tokens) = (5, 0, 2)
    x = torch.tensor([[3.0, 0.0, 2.0], [4.0, 0.0, 0.0]])
    lin = torch.nn.Linear(3, 2, bias=False)
    lin.weight.data.copy_(w)

    class One(torch.nn.Module):  # input_norms calls model(input_ids=..., use_cache=False)
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, input_ids, use_cache=False):
            return self.lin(input_ids)

    norms = P.input_norms(One(), {"l": lin}, x[None])  # one "block" of 2 tokens
    assert torch.allclose(norms["l"], torch.tensor([5.0, 0.0, 2.0]))
    s = P.wanda_scores(w, norms["l"])
    assert torch.allclose(s, torch.tensor([[5.0, 0.0, 6.0], [20.0, 0.0, 12.0]]))
    # 1/3 per output row: each row drops its single lowest score (feature 1 in both)
    keep = P.row_mask(s, 1 / 3)
    assert keep.tolist() == [[True, False, True], [True, False, True]]
    # magnitude would drop different weights: row 0 drops |1|, row 1 drops |0.5|
    assert P.tensor_mask(P.magnitude_scores(w), 2 / 6).tolist() == [[False, True, True], [True, False, True]]


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
@pytest.mark.parametrize("scope", ["per_layer", "global"])
@pytest.mark.parametrize("sparsity", [0.5, 0.3])
def test_exact_sparsity(method, scope, sparsity):
    model = tiny()
    masks = P.prune_unstructured(model, method, sparsity, scope, blocks=blocks())
    mods = P.target_modules(model)
    assert set(masks) == set(mods) and len(mods) == 2 * 7
    total = sum(m.weight.numel() for m in mods.values())
    zeros = sum(int((m.weight == 0).sum()) for m in mods.values())
    if scope == "global":
        assert zeros == round(sparsity * total)
    for name, m in mods.items():
        w = m.weight
        if scope == "per_layer" and method == "magnitude":  # the whole matrix is the group
            assert int((w == 0).sum()) == round(sparsity * w.numel()), name
        if scope == "per_layer" and method == "wanda":  # each output row is a group
            assert ((w == 0).sum(1) == round(sparsity * w.shape[1])).all(), name
        assert torch.equal(w == 0, ~masks[name])
    # embeddings and the LM head stay dense by default
    assert int((model.lm_head.weight == 0).sum()) == 0 and int((model.model.embed_tokens.weight == 0).sum()) == 0
    rep = P.sparsity_report(model.state_dict())
    assert rep["target_zeros"] == zeros and rep["target_params"] == total
    assert rep["nonzero_params"] == rep["params"] - zeros


def test_magnitude_drops_the_smallest_and_lm_head_when_named():
    model = tiny()
    before = {n: m.weight.detach().abs().clone() for n, m in P.target_modules(model, ["lm_head", "q_proj"]).items()}
    P.prune_unstructured(model, "magnitude", 0.5, names=["lm_head", "q_proj"])
    for n, m in P.target_modules(model, ["lm_head", "q_proj"]).items():
        kept, dropped = before[n][m.weight != 0], before[n][m.weight == 0]
        assert dropped.max() <= kept.min()
    assert int((model.model.layers[0].mlp.up_proj.weight == 0).sum()) == 0


def test_tied_embeddings_are_pruned_once_at_the_exact_sparsity():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert list(P.target_modules(model, ["lm_head", "embed_tokens"])) == ["model.embed_tokens"]
    masks = P.prune_unstructured(model, "magnitude", 0.5, names=["lm_head", "embed_tokens"])
    assert list(masks) == ["model.embed_tokens"]
    assert int((model.lm_head.weight == 0).sum()) == 64 * 32 // 2  # one tensor, counted once


def test_wanda_is_sequential_per_layer():
    """Layer 1's activations are measured after layer 0 is pruned: a different result from the one-pass variant."""
    a, b = tiny(), tiny()
    P.prune_unstructured(a, "wanda", 0.5, blocks=blocks(), sequential=True)
    P.prune_unstructured(b, "wanda", 0.5, blocks=blocks(), sequential=False)
    la, lb = a.model.layers, b.model.layers
    assert torch.equal(la[0].self_attn.q_proj.weight, lb[0].self_attn.q_proj.weight)
    assert not torch.equal(la[1].mlp.down_proj.weight, lb[1].mlp.down_proj.weight)


@pytest.mark.parametrize("unit,score", [("kv_group", "magnitude"), ("query", "wanda"), ("kv_group", "wanda")])
def test_structured_equals_zeroing_the_removed_units(unit, score):
    model = tiny(heads=4, kv=2, inter=48)
    x = blocks()
    norms = S.activation_norms(model, x) if score == "wanda" else None
    p = S.plan(model.config, unit, heads_fraction=0.5, mlp_fraction=0.25)
    small, kept = S.prune_structured(model, p, score, norms)
    c = small.config
    if unit == "kv_group":
        assert (c.num_attention_heads, c.num_key_value_heads) == (2, 1)
    else:
        assert (c.num_attention_heads, c.num_key_value_heads) == (2, 2)
        assert all(len({h // 2 for h in k["q_heads"]}) == 2 for k in kept)  # one query from each group
    assert c.intermediate_size == 36 and c.head_dim == 8 and c.hidden_size == 32
    n_small, n_big = sum(t.numel() for t in small.parameters()), sum(t.numel() for t in model.parameters())
    assert n_small < n_big
    S.zero_removed(model, kept)
    with torch.no_grad():
        assert torch.allclose(small(input_ids=x).logits, model(input_ids=x).logits, atol=1e-5)
    # the units kept are the best-scored ones: a random choice would almost surely differ from the argmax
    if score == "magnitude":
        sd = {k[len("model.layers.0."):]: v for k, v in model.state_dict().items() if k.startswith("model.layers.0.")}
        assert kept[0]["channels"] == sorted(torch.topk(S.channel_scores(sd, "magnitude"), 36).indices.tolist())


def test_structured_plan_errors():
    cfg = tiny(heads=4, kv=2).config
    with pytest.raises(ValueError, match="leaves 0 attention heads"):
        S.plan(cfg, "kv_group", heads_fraction=1.0)
    with pytest.raises(ValueError, match="breaks GQA divisibility"):
        S.plan(cfg, "kv_group", heads_per_layer=1)
    with pytest.raises(ValueError, match="removes no head"):
        S.plan(cfg, "query", heads_fraction=0.2)
    with pytest.raises(ValueError, match="leaves 0 of intermediate_size"):
        S.plan(cfg, "kv_group", mlp_fraction=1.0)
    assert S.plan(cfg, "query", heads_per_layer=2) == S.Plan(kv_keep=2, q_per_kv=1, inter_keep=48, unit="query")


def test_not_llama_style_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    g = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
    with pytest.raises(S.Unsupported, match="model_type gpt2"):
        S.check_llama_style(g.config, list(g.state_dict()))
    m = tiny()
    S.check_llama_style(m.config, list(m.state_dict()))


def test_zero_keeper_keeps_pruned_weights_at_zero_through_adamw():
    model = tiny()
    masks = P.prune_unstructured(model, "magnitude", 0.5)
    names = [f"{n}.weight" for n in masks]
    keep = P.zero_keeper(model, names)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    q = model.model.layers[0].self_attn.q_proj.weight
    zeros = q == 0
    for step in range(3):
        model(input_ids=blocks(), labels=blocks()).loss.backward()
        opt.step()
        opt.zero_grad()
        if step == 0:  # without the hook AdamW revives the pruned weights (their gradient is not zero)
            assert int((q[zeros] != 0).sum()) > 0
        keep()
        assert torch.equal(q == 0, zeros)
    with pytest.raises(ValueError, match="no parameter named"):
        P.zero_keeper(model, ["model.layers.9.mlp.up_proj.weight"])
