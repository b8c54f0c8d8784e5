"""Unstructured pruning: magnitude (L1, seed 004) and Wanda, at an exact target sparsity. Pure functions, no Ray.

Conventions (checked against the references):
- Magnitude follows `torch.nn.utils.prune`: `l1_unstructured` zeroes the `round(amount * n)` smallest |w| of one
  tensor (its `_compute_nparams_toprune`, Python's round), and `global_unstructured` ranks all targeted tensors
  together. Here the comparison group of `per_layer` magnitude is the whole weight matrix.
- Wanda (Sun et al., 2023; github.com/locuslab/wanda `prune_wanda`, llm-compressor's WandaPruningModifier): the
  score of weight W[i, j] is |W[i, j]| * ||X_j||_2, X_j the j-th input feature of the layer over all calibration
  tokens; weights are compared within each output row (`per_layer`: each row loses exactly round(s * in_features)).
  The reference takes `int(in_features * s)`; round() is used here for one rule across methods (same count for the
  usual 0.5). Like the reference, layers are pruned one decoder layer at a time, the activations of layer i
  measured on the model whose layers < i are already pruned (`sequential`); a `global` ranking needs every score at
  once, so it measures all activations on the dense model.
- `global`: one ranking over every targeted tensor; exactly round(s * total) zeros in all.
Selection is by index (argsort / topk), never by a threshold, so ties cannot make the count inexact.
"""
from __future__ import annotations

from typing import Iterable

import torch

from raylm.compress.calibration import decoder_layers

# The decoder's linear layers of Llama / Qwen2 / Mistral-style models (the default targets). Embeddings and the
# LM head are left dense unless named: they are a lookup table and the output distribution, and pruning them costs
# more quality per parameter (Wanda and SparseGPT prune the decoder layers only).
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def n_to_prune(sparsity: float, n: int) -> int:
    """How many of `n` weights a sparsity removes (torch.nn.utils.prune's rule)."""
    return int(round(sparsity * n))


def target_modules(model, names: Iterable[str] = DECODER_LINEARS) -> dict[str, torch.nn.Module]:
    """{qualified name: module} of the modules to prune: Linear leaves named in `names` inside decoder layers, plus
    `lm_head` / `embed_tokens` when named (their weight is pruned like a Linear's). A weight shared by two modules
    (tied embeddings: `lm_head.weight is embed_tokens.weight`) is listed once, under its first name, so it is scored,
    counted and pruned once."""
    names = set(names)
    out, seen = {}, set()
    for qual, mod in model.named_modules():
        leaf = qual.rsplit(".", 1)[-1]
        if leaf not in names:
            continue
        if leaf in ("lm_head", "embed_tokens") or (isinstance(mod, torch.nn.Linear) and ".layers." in f".{qual}"):
            if id(mod.weight) not in seen:
                seen.add(id(mod.weight))
                out[qual] = mod
    return out


# ---------------------------------------------------------------- scores
def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W|: (out, in) -> (out, in)."""
    return weight.detach().abs().float()


def wanda_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """|W[i, j]| * ||X_j||_2: weight (out, in), input_norm (in,) -> (out, in)."""
    return weight.detach().abs().float() * input_norm.float().reshape(1, -1)


# ---------------------------------------------------------------- masks (True = keep)
def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Each row of (out, in) loses exactly round(s * in) of its lowest scores (Wanda's per-output group)."""
    k = n_to_prune(sparsity, scores.shape[1])
    mask = torch.ones_like(scores, dtype=torch.bool)
    if k:
        idx = torch.sort(scores, dim=1, stable=True).indices[:, :k]
        mask.scatter_(1, idx, False)
    return mask


def tensor_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The tensor loses exactly round(s * numel) of its lowest scores (l1_unstructured's group)."""
    k = n_to_prune(sparsity, scores.numel())
    mask = torch.ones(scores.numel(), dtype=torch.bool)
    if k:
        mask[torch.topk(scores.flatten(), k, largest=False).indices] = False
    return mask.view_as(scores)


def global_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One ranking over every tensor: exactly round(s * total) zeros in all (global_unstructured's group)."""
    flat = torch.cat([s.flatten() for s in scores.values()])
    k = n_to_prune(sparsity, flat.numel())
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    if k:
        keep[torch.topk(flat, k, largest=False).indices] = False
    out, start = {}, 0
    for name, s in scores.items():
        out[name] = keep[start: start + s.numel()].view_as(s)
        start += s.numel()
    return out


@torch.no_grad()
def apply_masks(modules: dict[str, torch.nn.Module], masks: dict[str, torch.Tensor]) -> None:
    for name, mask in masks.items():
        w = modules[name].weight
        w.mul_(mask.to(w.device, w.dtype))


# ---------------------------------------------------------------- calibration activations
@torch.no_grad()
def input_norms(model, modules: dict[str, torch.nn.Module], blocks: torch.Tensor, batch_size: int = 8,
                stop_after: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """||X_j||_2 over every calibration token of each module's input feature j: {name: (in_features,)}.

    blocks: (n, seq_len) token ids. `stop_after`: end each forward once that module has run (the sequential
    Wanda pass measures one decoder layer at a time and needs nothing after it)."""
    sq = {name: None for name in modules}

    class _Stop(Exception):
        pass

    def hook(name):
        def fn(_mod, args, _out):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            s = (x * x).sum(0)
            sq[name] = s if sq[name] is None else sq[name] + s
        return fn

    def stop(*_):
        raise _Stop

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    if stop_after is not None:
        handles.append(stop_after.register_forward_hook(stop))
    try:
        dev = next(model.parameters()).device
        for i in range(0, blocks.shape[0], batch_size):
            try:
                model(input_ids=blocks[i: i + batch_size].to(dev), use_cache=False)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return {n: v.sqrt().cpu() for n, v in sq.items() if v is not None}


# ---------------------------------------------------------------- the whole model
def prune_unstructured(model, method: str, sparsity: float, scope: str = "per_layer",
                       names: Iterable[str] = DECODER_LINEARS, blocks: torch.Tensor | None = None,
                       sequential: bool = True) -> dict[str, torch.Tensor]:
    """Prune `model` in place; returns the keep-masks {module name: bool (out, in)} (recovery training keeps them).

    method: magnitude | wanda (needs `blocks`, (n, seq_len) calibration token ids); scope: per_layer | global."""
    modules = target_modules(model, names)
    if not modules:
        raise ValueError(f"no module named {sorted(set(names))} in {type(model).__name__}")
    if method == "magnitude":
        scores = {n: magnitude_scores(m.weight) for n, m in modules.items()}
        masks = global_masks(scores, sparsity) if scope == "global" else \
            {n: tensor_mask(s, sparsity) for n, s in scores.items()}
        apply_masks(modules, masks)
        return masks
    if method != "wanda":
        raise ValueError(f"unknown unstructured method {method!r}")
    if blocks is None:
        raise ValueError("wanda needs calibration blocks")
    layers = decoder_layers(model)
    if scope == "global" or not sequential or layers is None:
        norms = input_norms(model, modules, blocks)
        scores = {n: wanda_scores(m.weight, norms[n]) for n, m in modules.items()}
        masks = global_masks(scores, sparsity) if scope == "global" else \
            {n: row_mask(s, sparsity) for n, s in scores.items()}
        apply_masks(modules, masks)
        return masks
    masks = {}
    ids = {id(m): n for n, m in modules.items()}
    for layer in layers:  # layer i measured on the model whose earlier layers are pruned (Wanda's order)
        here = {ids[id(m)]: m for m in layer.modules() if id(m) in ids}
        if not here:
            continue
        norms = input_norms(model, here, blocks, stop_after=layer)
        layer_masks = {n: row_mask(wanda_scores(m.weight, norms[n]), sparsity) for n, m in here.items()}
        apply_masks(here, layer_masks)
        masks.update(layer_masks)
    rest = {n: m for n, m in modules.items() if n not in masks}  # lm_head / embed_tokens when named
    if rest:
        norms = input_norms(model, {n: m for n, m in rest.items() if isinstance(m, torch.nn.Linear)}, blocks)
        for n, m in rest.items():
            s = wanda_scores(m.weight, norms[n]) if n in norms else magnitude_scores(m.weight)
            masks[n] = row_mask(s, sparsity)
        apply_masks(rest, {n: masks[n] for n in rest})
    return masks


def sparsity_report(state: dict[str, torch.Tensor], names: Iterable[str] = DECODER_LINEARS) -> dict:
    """Zeros counted in a state dict (e.g. the saved weights): over the targeted weights and over all parameters."""
    names = set(names)
    tz = tn = az = an = 0
    for key, t in state.items():
        z, n = int((t == 0).sum()), t.numel()
        leaf = key[: -len(".weight")].rsplit(".", 1)[-1] if key.endswith(".weight") else None
        if leaf in names and (leaf in ("lm_head", "embed_tokens") or ".layers." in f".{key}"):
            tz, tn = tz + z, tn + n
        az, an = az + z, an + n
    return {"target_zeros": tz, "target_params": tn, "sparsity": tz / tn if tn else 0.0,
            "params": an, "nonzero_params": an - az}


def zero_keeper(model, names: Iterable[str]):
    """For recovery training: a function that re-zeroes the weights of `names` (parameter names, e.g.
    `model.layers.0.self_attn.q_proj.weight`) that are zero now, i.e. the pruned ones. The training loop calls it
    after every optimizer step, so the sparsity pattern survives fine-tuning (the gradient of a pruned weight is
    not zero: AdamW would otherwise revive it). Works on plain tensors and on FSDP2's DTensor shards alike (the
    masks are elementwise and live where their parameter does)."""
    wanted = set(names)
    params = {n: p for n, p in model.named_parameters() if n in wanted}
    missing = wanted - set(params)
    if missing:
        raise ValueError(f"keep_zeros: no parameter named {sorted(missing)[:3]} in the trained model")
    with torch.no_grad():
        masks = {n: p != 0 for n, p in params.items()}

    @torch.no_grad()
    def reapply() -> None:
        for n, p in params.items():
            p.mul_(masks[n])
    return reapply
