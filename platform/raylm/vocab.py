"""Vocabulary expansion (seed 002): add domain tokens to a trained tokenizer and grow the model to match.

- `mine_domain_tokens`: the domain words the tokenizer splits into >= 2 pieces, ranked by tokens saved
  (frequency x (pieces - 1)); a word whose addition would not really save tokens on the mined text is left out.
- `expand`: records each new token's pieces under the old tokenizer, adds the tokens, resizes the embeddings and
  sets every new input row (and output row, when untied) to the mean of its pieces' rows.
- `compression`: tokens per character (lower is better); `text_loss`: the model's NLL on text, per token and per
  character (the per-character figure is the one comparable across tokenizers).

How the tokens are added (`tokenizer.add_tokens`). Added tokens are matched on the raw text before
pre-tokenization; they are plain tokens (not special: they are text, decoded like any other and kept by
`skip_special_tokens`), matched on the text as written (`normalized=False`). With a ByteLevel or Metaspace
pre-tokenizer a word in running prose carries its leading space (" license" is one pre-token, "Ġlicense"): a
token added as "license" alone would leave the space as an extra token, so `expand` also adds the leading-space
variant of each bare word. The two forms need different matching rules:

- a bare word is added `single_word=True`: it matches only between non-word characters (never the start of
  " licenses", never inside "sublicense"). It would still match in " License" and split it into " " + "License"
  (two tokens where "ĠLicense" was one), so a bare word is only added together with its spaced variant, which
  starts one character earlier and so wins the leftmost match in prose (`addable`);
- a spaced word cannot be `single_word`: `tokenizers` checks the character before the match, i.e. before the
  space ("the license" has "e" there), and would never match in prose. Without it " cell" also matches the start
  of " cells" and turns a one-token word into " cell" + "s"; mining therefore encodes every word of the mined
  text with the expanded tokenizer and keeps only the words whose tokens really save tokens (`net_saved`).
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Iterable

import torch
from tokenizers import AddedToken, Tokenizer

_WORD = re.compile(r" ?[^\W\d_]+")  # letters, with the single leading space a ByteLevel/Metaspace pre-token keeps


def _ids(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def space_prefixed(tokenizer) -> bool:
    """Whether the tokenizer's pre-tokenizer attaches a word's leading space to the word (ByteLevel, Metaspace)."""
    pre = getattr(tokenizer, "backend_tokenizer", None)
    pre = pre.pre_tokenizer if pre is not None else None
    if pre is None:
        return False
    return any(span == (1, 4) for _, span in pre.pre_tokenize_str("a bc"))  # " bc" is one pre-token


def added_token(token: str) -> AddedToken:
    """How `expand` adds a token (see the module docstring for the matching rules)."""
    return AddedToken(token, single_word=not token[:1].isspace(), lstrip=False, rstrip=False, normalized=False,
                      special=False)


def word_counts(texts: Iterable[str], tokenizer) -> Counter:
    """Frequency of each word-like pre-token (as written in the text, leading space included)."""
    pre = tokenizer.backend_tokenizer.pre_tokenizer
    counts: Counter = Counter()
    for text in texts:
        if pre is None:
            counts.update(m.group(0) for m in _WORD.finditer(text))
            continue
        for _, (a, b) in pre.pre_tokenize_str(text):
            piece = text[a:b]
            if _WORD.fullmatch(piece):
                counts[piece] += 1
    return counts


def with_space_variants(tokenizer, tokens: Iterable[str]) -> list[str]:
    """`tokens` plus " word" for each bare word, when the pre-tokenizer puts a word's leading space on the word."""
    out = list(dict.fromkeys(tokens))
    if space_prefixed(tokenizer):
        out += [" " + t for t in out if t[:1].isalnum() and " " + t not in out]
    return list(dict.fromkeys(out))


def addable(tokenizer, pieces: dict[str, list[int]]) -> list[str]:
    """The tokens of {token: old piece ids} (all of >= 2 pieces) that can be added: with a space-prefixed
    pre-tokenizer, a bare word only together with its spaced variant (see the module docstring)."""
    if not space_prefixed(tokenizer):
        return list(pieces)
    return [t for t in pieces if not t[:1].isalnum() or " " + t in pieces]


def plan(tokenizer, tokens: Iterable[str], space_variants: bool = True) -> tuple[dict[str, list[int]], list[str]]:
    """What `expand` adds for `tokens`: ({token: its piece ids under the current tokenizer}, skipped tokens).

    Skipped: tokens that already encode as one id, and bare words that cannot be added safely (`addable`).
    """
    tokens = [t for t in dict.fromkeys(tokens) if t]
    if space_variants:
        tokens = with_space_variants(tokenizer, tokens)
    pieces = {t: ids for t, ids in zip(tokens, _ids(tokenizer, tokens)) if len(ids) >= 2}
    keep = addable(tokenizer, pieces)
    return {t: pieces[t] for t in keep}, [t for t in tokens if t not in keep]


def net_saved(tokenizer, tokens: Iterable[str], counts: dict[str, int]) -> dict[str, int]:
    """Tokens each of `tokens` saves on the words of `counts` ({word: frequency}) once they are all added.

    Exact: a copy of the tokenizer with the tokens added encodes every word; a word's change in length is
    credited to the added token it now contains (a word holds at most one: the bare ones are whole words, a
    spaced one starts the word). Negative where a token cuts into longer words (" cell" in " cells").
    """
    tokens = list(tokens)
    backend = tokenizer.backend_tokenizer
    new = Tokenizer.from_str(backend.to_str())
    new.add_tokens([added_token(t) for t in tokens])
    ids = {new.token_to_id(t): t for t in tokens}
    words = list(counts)
    net = dict.fromkeys(tokens, 0)
    for w, old, enc in zip(words, backend.encode_batch(words, add_special_tokens=False),
                           new.encode_batch(words, add_special_tokens=False)):
        hit = next((ids[i] for i in enc.ids if i in ids), None)
        if hit is not None:
            net[hit] += counts[w] * (len(old.ids) - len(enc.ids))
    return net


def mine_candidates(texts: Iterable[str], tokenizer, k: int = 32, min_freq: int = 5) -> list[dict]:
    """Top-k words by tokens saved: [{token, freq, pieces, saved, net_saved}].

    Words of >= `min_freq` occurrences that split into >= 2 pieces are ranked by `saved` = freq x (pieces - 1);
    the top ones are verified with `net_saved` on all the words of `texts`, those that would not save tokens
    (a spaced word that is the start of frequent longer words) are dropped and the next ones tried.
    """
    counts = word_counts(texts, tokenizer)
    frequent = [w for w, c in counts.items() if c >= min_freq]
    pieces = dict(zip(frequent, _ids(tokenizer, frequent)))
    ranked = sorted((w for w in frequent if len(pieces[w]) >= 2),
                    key=lambda w: (-counts[w] * (len(pieces[w]) - 1), w))
    chosen: list[str] = []
    net: dict[str, int] = {}
    nxt = 0
    while True:
        trial = chosen + ranked[nxt: nxt + k - len(chosen)]
        nxt += k - len(chosen)
        while trial:  # drop what does not pay off until the rest all do (dropping one can change another)
            added, _ = plan(tokenizer, trial)
            by_token = net_saved(tokenizer, added, counts)
            # a candidate is credited with its spaced variant when that came with it (not a candidate itself)
            net = {c: by_token.get(c, 0) + (by_token.get(" " + c, 0) if " " + c not in trial else 0)
                   for c in trial if c in added}
            keep = [c for c in trial if net.get(c, 0) > 0]
            if keep == trial:
                break
            trial = keep
        chosen = trial
        if len(chosen) >= k or nxt >= len(ranked):
            break
    return [{"token": w, "freq": counts[w], "pieces": len(pieces[w]), "saved": counts[w] * (len(pieces[w]) - 1),
             "net_saved": net[w]} for w in chosen]


def mine_domain_tokens(texts: Iterable[str], tokenizer, k: int = 32, min_freq: int = 5) -> list[str]:
    """Frequent domain words the tokenizer splits into >= 2 pieces, ranked by tokens saved = freq x (pieces - 1)."""
    return [r["token"] for r in mine_candidates(texts, tokenizer, k, min_freq)]


def compression(texts: Iterable[str], tokenizer) -> float:
    """Tokens per character (seed 002's compression rate; lower is better)."""
    texts = list(texts)
    chars = sum(len(t) for t in texts)
    return sum(len(i) for i in _ids(tokenizer, texts)) / max(1, chars)


def _output_rows(model, emb: torch.nn.Embedding):
    """The untied output projection, or None when it shares the input embedding's weight."""
    out = model.get_output_embeddings()
    if out is None or out.weight.data_ptr() == emb.weight.data_ptr():
        return None
    return out


@torch.no_grad()
def init_rows(model, info: dict, init: str = "mean", seed: int = 0) -> None:
    """(Re)initialise the new tokens' rows: "mean" of their pieces' rows, or "random" (normal with the model's
    initializer_range: what `resize_token_embeddings(..., mean_resizing=False)` gives)."""
    emb = model.get_input_embeddings()
    out = _output_rows(model, emb)
    std = getattr(model.config, "initializer_range", 0.02)
    gen = torch.Generator().manual_seed(seed)
    for tid, pieces in zip(info["ids"], info["pieces"].values()):
        for layer in (emb, out):
            if layer is None:
                continue
            w = layer.weight
            if init == "mean":
                w[tid] = w[pieces].float().mean(0).to(w.dtype)
            elif init == "random":
                w[tid] = (torch.randn(w.shape[1], generator=gen) * std).to(w.device, w.dtype)
            else:
                raise ValueError(f"init={init!r}: choose mean or random")
            bias = getattr(layer, "bias", None)
            if layer is out and bias is not None:
                bias[tid] = bias[pieces].mean() if init == "mean" else 0.0


def expand(model, tokenizer, new_tokens: Iterable[str], space_variants: bool = True, init: str = "mean") -> dict:
    """Add `new_tokens` to `tokenizer` (in place), resize `model`'s embeddings, initialise the new rows.

    Tokens that already encode as one id, and bare words that would split a spaced one-token word (`addable`), are
    skipped. Returns {added, skipped, ids, pieces (token -> old piece ids),
    piece_tokens (token -> old piece strings), vocab_before, vocab_after, rows_before, rows_after, tied}.
    """
    pieces, skipped = plan(tokenizer, new_tokens, space_variants)
    emb = model.get_input_embeddings()
    vocab_before, rows_before = len(tokenizer), emb.weight.shape[0]
    tokenizer.add_tokens([added_token(t) for t in pieces])
    ids = tokenizer.convert_tokens_to_ids(list(pieces))
    if len(tokenizer) > rows_before:  # a checkpoint may have spare (padded) rows already: then no resize is needed
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    emb = model.get_input_embeddings()
    info = {"added": list(pieces), "skipped": skipped, "ids": ids, "pieces": pieces,
            "piece_tokens": {t: tokenizer.convert_ids_to_tokens(p) for t, p in pieces.items()},
            "vocab_before": vocab_before, "vocab_after": len(tokenizer), "rows_before": rows_before,
            "rows_after": emb.weight.shape[0], "tied": _output_rows(model, emb) is None}
    init_rows(model, info, init)
    return info


@torch.no_grad()
def text_loss(model, tokenizer, texts: Iterable[str], seq_len: int = 128, batch_size: int = 16) -> dict:
    """The model's NLL on `texts`: every token of every document predicted once.

    Each document is preceded by the end-of-text token (the separator pre-training packs documents with) and cut
    into windows of `seq_len` predictions, each window starting from the previous one's last token. Returns the
    loss per token and per character: the per-character NLL compares models whose tokenizers differ.
    """
    texts = [t for t in texts if t]
    windows = []
    for ids in _ids(tokenizer, texts):
        seq = [tokenizer.eos_token_id, *ids]
        windows += [seq[i: i + seq_len + 1] for i in range(0, len(seq) - 1, seq_len)]
    nll, count = 0.0, 0
    device = next(model.parameters()).device
    for i in range(0, len(windows), batch_size):
        batch = windows[i: i + batch_size]
        width = max(len(w) for w in batch)
        inp = torch.full((len(batch), width), tokenizer.pad_token_id or 0, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for j, w in enumerate(batch):
            inp[j, :len(w)] = labels[j, :len(w)] = torch.tensor(w)
            mask[j, :len(w)] = 1
        logits = model(input_ids=inp.to(device), attention_mask=mask.to(device)).logits[:, :-1].float()
        target = labels[:, 1:].to(device)
        nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100,
                                                 reduction="sum").item()
        count += int((target != -100).sum())
    chars = sum(len(t) for t in texts)
    return {"loss": round(nll / max(1, count), 4), "nll_per_char": round(nll / max(1, chars), 4),
            "tokens": count, "chars": chars}
