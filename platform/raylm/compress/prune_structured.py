"""Structured pruning of Llama-style decoders (Llama, Qwen2, Mistral, ...): remove attention heads and MLP channels
so the config itself shrinks (fewer parameters, a smaller checkpoint, a faster forward). Pure functions, no Ray.

Hand-written for decoders whose layers are `self_attn.{q,k,v,o}_proj` + `mlp.{gate,up,down}_proj` (torch-pruning's
dependency graph was not used: its LLM example patches head counts into the config by hand too, and slicing these
seven matrices is the whole job). A standard HF config has one head count and one intermediate size for every
layer, so every layer loses the same number of heads and channels; *which* ones is chosen per layer by score.

Attention heads under GQA (`structured.unit`):
- `kv_group` (default): remove whole KV groups, i.e. a K/V head with every query head that reads it. q, k, v and o
  all shrink, and so does the KV cache when serving. For MHA (one query per KV head) this is plain head removal.
- `query`: keep every KV head and remove the same number of query heads from each group (num_key_value_heads
  stays, num_attention_heads falls). The choice when there are few KV heads (Qwen2.5-0.5B: 2 KV heads x 7 queries,
  where dropping a group halves attention).
Either way num_attention_heads stays a multiple of num_key_value_heads and head_dim is kept (vLLM's CPU attention
supports head sizes 32, 64, 80, 96, 112, 128, ..., 512 only: `CPUAttentionBackend.get_supported_head_sizes`).

Scores (`score`): `magnitude`: the L1 norm of the unit's weights (a head's q rows and o columns, plus its k/v rows
for a whole group; a channel's gate and up rows and down column). `wanda`: Wanda's |W| x ||X||, summed over the
columns of the projection the unit feeds (o_proj for heads, down_proj for channels), X from calibration data.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# per-layer tensors that do not depend on the head count or the intermediate size (Qwen3-style q/k norms are per
# head_dim, which is kept)
NEUTRAL = ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_norm.weight",
           "self_attn.k_norm.weight")


class Unsupported(ValueError):
    """The model is not a Llama-style decoder this pruner can slice."""


def dims(config) -> dict:
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {"num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim,
            "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size}


def check_llama_style(config, keys: list[str]) -> None:
    """Raise `Unsupported` naming the architecture unless every decoder layer is q/k/v/o + gate/up/down.

    keys: the checkpoint's tensor names (no weights need loading)."""
    arch = (getattr(config, "architectures", None) or [getattr(config, "model_type", "?")])[0]
    n = getattr(config, "num_hidden_layers", None)
    if n is None or not all(hasattr(config, a) for a in ("num_attention_heads", "intermediate_size")):
        raise Unsupported(f"{arch} (model_type {getattr(config, 'model_type', '?')}) has no num_attention_heads / "
                          "intermediate_size / num_hidden_layers: not a Llama-style decoder")
    want = [f"model.layers.{i}.{blk}.{p}.weight" for i in range(n)
            for blk, ps in (("self_attn", ATTN), ("mlp", MLP)) for p in ps]
    have = set(keys)
    missing = [k for k in want if k not in have]
    if missing:
        raise Unsupported(f"{arch} (model_type {config.model_type}): its decoder layers are not Llama-style "
                          f"self_attn.q/k/v/o_proj + mlp.gate/up/down_proj (missing e.g. {missing[0]}); structured "
                          "pruning handles Llama, Qwen2, Mistral-style decoders only")
    allowed = {f"{blk}.{p}.{t}" for blk, ps in (("self_attn", ATTN), ("mlp", MLP)) for p in ps
               for t in ("weight", "bias")} | set(NEUTRAL)
    for k in keys:
        if k.startswith("model.layers."):
            rest = k.split(".", 3)[3]
            if rest not in allowed:
                raise Unsupported(f"{arch} (model_type {config.model_type}): decoder tensor {k} is not one this "
                                  "pruner knows how to slice (Llama-style q/k/v/o + gate/up/down only)")


@dataclass
class Plan:
    """How many units each layer keeps. kv_keep KV heads, each with q_per_kv query heads; inter_keep channels."""

    kv_keep: int
    q_per_kv: int
    inter_keep: int
    unit: str


def plan(config, unit: str = "kv_group", heads_fraction: float = 0.0, heads_per_layer: int | None = None,
         mlp_fraction: float = 0.0) -> Plan:
    """The per-layer counts; ValueError naming the key when a request leaves no head, no channel, or does not fit
    the GQA grouping. heads_fraction: the fraction of query heads removed (rounded to whole units);
    heads_per_layer: query heads removed per layer (must be a whole number of units)."""
    d = dims(config)
    heads, kv = d["num_attention_heads"], d["num_key_value_heads"]
    group = heads // kv
    units, per_unit, unit_name = (kv, group, "KV group") if unit == "kv_group" else (group, kv, "query per group")
    if heads_per_layer is not None:
        if heads_per_layer % per_unit:
            raise ValueError(
                f"structured.heads_per_layer={heads_per_layer} breaks GQA divisibility: with "
                f"num_attention_heads={heads}, num_key_value_heads={kv} and unit={unit} heads go in steps of "
                f"{per_unit} ({'a whole KV group' if unit == 'kv_group' else 'one query from every group'})")
        removed = heads_per_layer // per_unit
        key = f"structured.heads_per_layer={heads_per_layer}"
    else:
        removed = int(round(heads_fraction * units))
        key = f"structured.heads_fraction={heads_fraction}"
        if heads_fraction > 0 and removed == 0:
            raise ValueError(f"{key} removes no head: with unit={unit} there are {units} units of {per_unit} "
                             f"heads ({unit_name}); the smallest step is {1 / units:.3g}")
    if removed >= units:
        raise ValueError(f"{key} leaves 0 attention heads per layer (num_attention_heads={heads}, "
                         f"num_key_value_heads={kv}, unit={unit})")
    inter = d["intermediate_size"]
    cut = int(round(mlp_fraction * inter))
    if cut >= inter:
        raise ValueError(f"structured.mlp_fraction={mlp_fraction} leaves 0 of intermediate_size={inter} channels")
    if unit == "kv_group":
        return Plan(kv_keep=kv - removed, q_per_kv=group, inter_keep=inter - cut, unit=unit)
    return Plan(kv_keep=kv, q_per_kv=group - removed, inter_keep=inter - cut, unit=unit)


def head_scores(layer_sd: dict, d: dict, score: str, o_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Per query head (num_attention_heads,). layer_sd: this layer's tensors keyed `self_attn.q_proj.weight` etc.;
    o_norm: ||X_j|| of o_proj's inputs (num_heads * head_dim,) for `wanda`."""
    hd, heads = d["head_dim"], d["num_attention_heads"]
    o = layer_sd["self_attn.o_proj.weight"].abs().float()  # (hidden, heads * hd)
    if score == "wanda":
        return (o * o_norm.float().reshape(1, -1)).sum(0).view(heads, hd).sum(1)
    q = layer_sd["self_attn.q_proj.weight"].abs().float()  # (heads * hd, hidden)
    return q.view(heads, -1).sum(1) + o.sum(0).view(heads, hd).sum(1)


def kv_scores(layer_sd: dict, d: dict, score: str, per_head: torch.Tensor) -> torch.Tensor:
    """Per KV group (num_key_value_heads,): its query heads' scores (+ its k/v rows' L1 for magnitude)."""
    kv, hd = d["num_key_value_heads"], d["head_dim"]
    s = per_head.view(kv, -1).sum(1)
    if score == "magnitude":
        for p in ("k_proj", "v_proj"):
            s = s + layer_sd[f"self_attn.{p}.weight"].abs().float().view(kv, hd, -1).sum((1, 2))
    return s


def channel_scores(layer_sd: dict, score: str, down_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Per MLP channel (intermediate_size,)."""
    down = layer_sd["mlp.down_proj.weight"].abs().float()  # (hidden, inter)
    if score == "wanda":
        return (down * down_norm.float().reshape(1, -1)).sum(0)
    return (layer_sd["mlp.gate_proj.weight"].abs().float().sum(1) + layer_sd["mlp.up_proj.weight"].abs().float().sum(1)
            + down.sum(0))


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k highest scores, in their original order (keeps the surviving heads' relative layout)."""
    return sorted(torch.topk(scores, k).indices.tolist())


def choose(layer_sd: dict, d: dict, p: Plan, score: str, norms: dict | None = None) -> dict:
    """Which query heads (by original index), KV heads and channels one layer keeps."""
    norms = norms or {}
    heads, kv = d["num_attention_heads"], d["num_key_value_heads"]
    group = heads // kv
    per_head = head_scores(layer_sd, d, score, norms.get("o_proj"))
    if p.unit == "kv_group":
        keep_kv = _top(kv_scores(layer_sd, d, score, per_head), p.kv_keep)
        keep_q = [g * group + j for g in keep_kv for j in range(group)]
    else:
        keep_kv = list(range(kv))
        keep_q = [g * group + j for g in keep_kv for j in _top(per_head[g * group:(g + 1) * group], p.q_per_kv)]
    keep_c = _top(channel_scores(layer_sd, score, norms.get("down_proj")), p.inter_keep)
    return {"q_heads": keep_q, "kv_heads": keep_kv, "channels": keep_c}


def _rows(idx: list[int], hd: int) -> torch.Tensor:
    return torch.tensor([h * hd + i for h in idx for i in range(hd)], dtype=torch.long)


def slice_layer(layer_sd: dict, keep: dict, hd: int) -> dict:
    """This layer's tensors with only the kept heads/channels (biases, e.g. Qwen2's q/k/v bias, sliced alike)."""
    q, kv, ch = _rows(keep["q_heads"], hd), _rows(keep["kv_heads"], hd), torch.tensor(keep["channels"])
    out = {}
    for k, t in layer_sd.items():
        mod, kind = k.rsplit(".", 1)
        leaf = mod.rsplit(".", 1)[-1]
        rows = {"q_proj": q, "k_proj": kv, "v_proj": kv, "gate_proj": ch, "up_proj": ch}.get(leaf)
        if rows is not None:  # output features: rows of the weight, and the bias
            t = t.index_select(0, rows)
        elif leaf in ("o_proj", "down_proj") and kind == "weight":  # input features: columns
            t = t.index_select(1, q if leaf == "o_proj" else ch)
        out[k] = t.contiguous()
    return out


def pruned_config(config, p: Plan):
    new = copy.deepcopy(config)
    head_dim = dims(config)["head_dim"]
    new.num_attention_heads = p.kv_keep * p.q_per_kv
    new.num_key_value_heads = p.kv_keep
    new.intermediate_size = p.inter_keep
    new.head_dim = head_dim  # explicit: hidden_size / num_attention_heads no longer gives it
    return new


@torch.no_grad()
def prune_structured(model, p: Plan, score: str = "magnitude", norms: dict | None = None):
    """A new, smaller model (same class) and what each layer kept: (model, [{q_heads, kv_heads, channels}, ...]).

    norms (wanda): {layer index: {"o_proj": (heads*hd,), "down_proj": (inter,)}} input-feature norms."""
    from transformers import AutoModelForCausalLM

    d = dims(model.config)
    sd = model.state_dict()
    new_sd, kept = {}, []
    for i in range(d["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        layer_sd = {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}
        keep = choose(layer_sd, d, p, score, (norms or {}).get(i))
        kept.append(keep)
        new_sd.update({pre + k: v for k, v in slice_layer(layer_sd, keep, d["head_dim"]).items()})
    new_sd.update({k: v for k, v in sd.items() if not k.startswith("model.layers.")})
    cfg = pruned_config(model.config, p)
    small = AutoModelForCausalLM.from_config(cfg, dtype=next(model.parameters()).dtype)
    small.load_state_dict(new_sd, strict=True)
    small.generation_config = copy.deepcopy(model.generation_config)
    return small.eval(), kept


@torch.no_grad()
def zero_removed(model, kept: list[dict]) -> None:
    """In place: zero o_proj's columns of every removed query head and down_proj's columns of every removed channel.
    The forward of the result equals the pruned model's (a removed unit then contributes nothing): the
    equivalence check of the tests."""
    d = dims(model.config)
    for layer, keep in zip(model.model.layers, kept):
        o, down = layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight
        gone_q = sorted(set(range(d["num_attention_heads"])) - set(keep["q_heads"]))
        if gone_q:
            o[:, _rows(gone_q, d["head_dim"])] = 0
        gone_c = sorted(set(range(d["intermediate_size"])) - set(keep["channels"]))
        if gone_c:
            down[:, torch.tensor(gone_c)] = 0


def activation_norms(model, blocks: torch.Tensor) -> dict[int, dict[str, torch.Tensor]]:
    """Wanda inputs for `score=wanda`: per layer, ||X_j|| of o_proj's and down_proj's input features (dense model)."""
    from raylm.compress.prune import input_norms

    mods = {f"{i}.{p}": getattr(getattr(layer, blk), p) for i, layer in enumerate(model.model.layers)
            for blk, p in (("self_attn", "o_proj"), ("mlp", "down_proj"))}
    flat = input_norms(model, mods, blocks)
    out: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in flat.items():
        i, p = key.split(".")
        out.setdefault(int(i), {})[p] = v
    return out
