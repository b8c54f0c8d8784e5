"""The fine-tuning menu: what a training stage trains (`LoraSpec.method`) and what its export holds.

| method | trains | `model/` on export |
|---|---|---|
| lora   | low-rank A·B beside `target_modules` (PEFT) | adapter merged in |
| dora   | LoRA + a per-column magnitude (PEFT `use_dora`) | merged |
| qlora  | LoRA on a 4-bit NF4 base (bitsandbytes; CUDA only) | adapter merged into the full-precision base |
| ia3    | (IA)³ scaling vectors on `target_modules` | merged |
| prefix | per-layer key/value prefixes (prefix tuning) | base unchanged: `merged: false`, serve with `adapter/` |
| prompt | virtual input embeddings (prompt tuning) | base unchanged: `merged: false`, serve with `adapter/` |
| bitfit | every bias term only | the trained model |
| full   | every parameter | the trained model |

`modules_to_save` are trained in full beside any method (and, for a sequence-classification model, its new
`score` head). PEFT methods also write `adapter/`. `check_peft` checks on the driver, before any worker starts,
what can be known without training: requirements (QLoRA), module names, adapter compatibility.
"""
from __future__ import annotations

import json
import os

import torch

from raylm.config import ConfigError, LoraSpec, ModelSpec
from raylm.models import model_config, param_count
from raylm.runs import local_path

MERGEABLE = ("lora", "dora", "qlora", "ia3")
PEFT_TYPES = {"lora": "LORA", "dora": "LORA", "qlora": "LORA", "ia3": "IA3", "prefix": "PREFIX_TUNING",
              "prompt": "PROMPT_TUNING"}  # bitfit and full are not PEFT adapters
DEFAULT_VIRTUAL_TOKENS = 20


# ---------------------------------------------------------------- building
def _peft_config(model, spec: LoraSpec, seq_cls: bool):
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig

    common = dict(task_type="SEQ_CLS" if seq_cls else "CAUSAL_LM", modules_to_save=spec.modules_to_save or None)
    # ["all-linear"] is PEFT's wildcard, which it accepts only as a plain string
    targets = "all-linear" if spec.target_modules == ["all-linear"] else spec.target_modules
    if spec.method in ("lora", "dora", "qlora"):
        return LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets,
                          use_dora=spec.method == "dora", **common)
    if spec.method == "ia3":
        return IA3Config(target_modules=targets, feedforward_modules=_feedforward(model.config, spec), **common)
    n = spec.num_virtual_tokens or DEFAULT_VIRTUAL_TOKENS
    cls = PrefixTuningConfig if spec.method == "prefix" else PromptTuningConfig
    return cls(num_virtual_tokens=n, **common)


def _feedforward(cfg, spec: LoraSpec) -> list[str]:
    if spec.feedforward_modules is not None:
        return spec.feedforward_modules
    from peft.utils import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FF

    return [m for m in FF.get(cfg.model_type, []) if spec.target_modules == ["all-linear"] or m in spec.target_modules]


def _trim_virtual_logits(module, args, kwargs, output):
    """Prompt tuning prepends virtual tokens, so PEFT returns logits for V + L positions; every objective expects
    (B, L, vocab) aligned with its labels. Keep the last L (a no-op when adapters are disabled)."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    logits = getattr(output, "logits", None)
    if ids is not None and logits is not None and logits.dim() == 3 and logits.shape[1] > ids.shape[1]:
        output.logits = logits[:, -ids.shape[1]:]
    return output


def _bitfit(model, spec: LoraSpec, seq_cls: bool):
    """Bias terms only (Ben Zaken et al., 2022), plus `modules_to_save` and a classification head. Llama-family
    models have no biases: rather than add untrained ones silently, this is an error (see `check_peft`)."""
    keep = [*spec.modules_to_save, *(["score"] if seq_cls else [])]
    model.requires_grad_(False)
    n_bias = 0
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            p.requires_grad_(True)
            n_bias += 1
        elif any(_matches(name.rsplit(".", 1)[0], m) for m in keep):
            p.requires_grad_(True)
    if n_bias == 0:
        raise ValueError(_no_bias_message(model.config))
    return model


def apply_peft(model, spec: LoraSpec | None, seq_cls: bool = False, adapter: str | None = None):
    """`model` prepared for `spec.method` (None or "full": returned as is, every parameter trainable).

    `adapter`: a saved PEFT adapter directory to continue training (incremental LoRA) instead of a fresh one; its
    own config (rank, targets, ...) wins over `spec`, which `check_peft` has checked it against.
    """
    if spec is None or spec.method == "full":
        return model
    if spec.method == "bitfit":
        return _bitfit(model, spec, seq_cls)
    from peft import PeftModel, get_peft_model

    if adapter:
        model = PeftModel.from_pretrained(model, local_path(adapter), is_trainable=True)
    else:
        model = get_peft_model(model, _peft_config(model, spec, seq_cls))
    if model.peft_config[model.active_adapter].is_prompt_learning and not seq_cls:
        model.register_forward_hook(_trim_virtual_logits, with_kwargs=True)
    return model


def qlora_missing(use_gpu: bool | None = None) -> list[str]:
    """What QLoRA lacks here: bitsandbytes, and CUDA (`use_gpu`: the workers' setting; None: this process)."""
    import importlib.util

    missing = []
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("the bitsandbytes package (pip install bitsandbytes)")
    if not (torch.cuda.is_available() if use_gpu is None else use_gpu):
        missing.append("a CUDA GPU" + (" (resources.use_gpu=true)" if use_gpu is not None else " on this machine"))
    return missing


def load_4bit_base(spec: ModelSpec, seq_cls: bool = False, tokenizer=None):
    """The QLoRA base (Dettmers et al., 2023): NF4 weights with double quantisation, bf16 compute, prepared for
    k-bit training (norms in fp32, input grads on, gradient checkpointing: memory is QLoRA's point)."""
    missing = qlora_missing()
    if missing:
        raise ValueError(f"lora.method=qlora needs {' and '.join(missing)}; use method lora or dora here")
    if not spec.path:
        raise ValueError("lora.method=qlora quantizes a trained checkpoint: set model.path (not a preset)")
    from peft import prepare_model_for_kbit_training
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification,
                              BitsAndBytesConfig)

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    path, kwargs = local_path(spec.path), {}
    if seq_cls:
        kwargs["config"] = AutoConfig.from_pretrained(path, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    cls = AutoModelForSequenceClassification if seq_cls else AutoModelForCausalLM
    model = cls.from_pretrained(path, quantization_config=quant, dtype=torch.bfloat16,
                                device_map={"": torch.cuda.current_device()}, **kwargs)
    # non-reentrant checkpointing: the reentrant kind breaks DDP's gradient hooks ("marked ready twice")
    return prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})


# ---------------------------------------------------------------- export
def export_job(job: dict) -> dict:
    """The job that rebuilds the model for export on CPU. QLoRA's adapter is merged into the full-precision base
    (merging into NF4 weights would round the update away, and the export runs without a GPU)."""
    lora = job.get("lora")
    if lora and lora.get("method") == "qlora":
        return {**job, "lora": {**lora, "method": "lora"}}
    return job


def load_trained_state(model, state: dict, job: dict) -> None:
    """Load the gathered training state into the rebuilt model; every trainable tensor must be in it. QLoRA's
    state holds quantized base tensors: only the trained ones are taken."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if (job.get("lora") or {}).get("method") == "qlora":
        state = {k: v for k, v in state.items() if k in trainable}
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [k for k in missing if k in trainable]
    if unexpected or bad:
        raise RuntimeError(f"state dict mismatch on export: missing={bad[:5]} unexpected={unexpected[:5]}")


def _unwrap_saved_modules(model):
    """Replace PEFT's ModulesToSaveWrapper by its trained copy (prompt learning has no merge_and_unload)."""
    from peft.utils.other import ModulesToSaveWrapper

    for name, module in list(model.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child,
                    module.modules_to_save[module.active_adapter])
    return model


def export_model(model, out_dir: str, spec: LoraSpec | None = None):
    """Write `out_dir/model` (and `out_dir/adapter` for PEFT methods); returns (exported model, info).

    info: `peft_method`, `merged` (whether `model/` holds the fine-tuned behaviour on its own), `merge_note` when it
    does not, and `adapter_params`.
    """
    from peft import PeftModel

    method = spec.method if spec else "full"
    info: dict = {"peft_method": method, "merged": True}
    if isinstance(model, PeftModel):
        model.save_pretrained(os.path.join(out_dir, "adapter"))
        info["adapter_params"] = param_count(model, trainable_only=True)
        if model.peft_config[model.active_adapter].is_prompt_learning:
            # virtual tokens / prefixes are extra inputs, not a weight update: nothing to fold into the weights
            model = _unwrap_saved_modules(model.get_base_model())
            info.update(merged=False, merge_note=f"{method} tuning adds learned virtual tokens, which no weight "
                        "can absorb: model/ is the base (plus any modules_to_save); serve it with adapter/")
        else:
            model = model.merge_and_unload()
    model.save_pretrained(os.path.join(out_dir, "model"))
    return model, info


# ---------------------------------------------------------------- checks (driver side)
def _matches(name: str, target: str) -> bool:
    """PEFT's rule for a module key: the full name or a dotted suffix of it."""
    return name == target or name.endswith("." + target)


def _no_bias_message(cfg) -> str:
    return (f"lora.method=bitfit trains bias terms only, and this {cfg.model_type} model has none (Llama-family "
            "models have no biases; Qwen2 has q/k/v biases). For a preset set model.overrides.attention_bias=true "
            "and/or mlp_bias=true; otherwise choose another method")


def _config_dir(uri: str) -> str:
    """A local directory holding the checkpoint's config.json: only that file is fetched from a remote store (the
    driver needs the architecture, not gigabytes of weights)."""
    import tempfile

    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    fs, path = fsspec.core.url_to_fs(uri)
    if isinstance(fs, LocalFileSystem):
        return path
    tmp = tempfile.mkdtemp(prefix="raylm-config-")
    fs.get(f"{path.rstrip('/')}/config.json", os.path.join(tmp, "config.json"))
    return tmp


def meta_model(model: ModelSpec | str, seq_cls: bool = False):
    """The model's architecture on the meta device: module names and shapes, no memory, no weights read."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    if isinstance(model, ModelSpec) and not model.path:
        cfg = model_config(model, vocab_size=256)  # vocab size does not change module names
    else:
        cfg = AutoConfig.from_pretrained(_config_dir(model.path if isinstance(model, ModelSpec) else model))
    if seq_cls:
        cfg.num_labels = 1
    with torch.device("meta"):
        return (AutoModelForSequenceClassification if seq_cls else AutoModelForCausalLM).from_config(cfg)


def check_peft(spec: LoraSpec | None, model: ModelSpec | str, resources=None, adapter: str | None = None,
               seq_cls: bool = False) -> None:
    """Raise ConfigError for what would fail (or silently do nothing) in the workers: QLoRA without CUDA or
    bitsandbytes, a target/feed-forward/saved module the model lacks (named), BitFit on a bias-free model, an
    `adapter` to continue that is not of `spec.method`'s kind. `model`: a ModelSpec or a checkpoint path."""
    if spec is None:
        if adapter:
            raise ConfigError("inputs.adapter continues a PEFT adapter, but lora is null (full fine-tuning)")
        return
    if spec.method == "qlora":
        missing = qlora_missing(None if resources is None else resources.use_gpu)
        if missing:
            raise ConfigError(f"lora.method=qlora (4-bit base) needs {' and '.join(missing)}; "
                              "use method lora or dora on this machine")
        if isinstance(model, ModelSpec) and not model.path:
            raise ConfigError("lora.method=qlora quantizes a trained checkpoint: set model.path (not a preset)")
        if resources is not None and resources.strategy != "ddp" and resources.num_workers > 1:
            raise ConfigError(f"lora.method=qlora on {resources.num_workers} workers needs resources.strategy=ddp "
                              f"(not {resources.strategy}: sharding does not handle bitsandbytes' 4-bit weights)")
    net = meta_model(model, seq_cls)
    names = [n for n, _ in net.named_modules() if n]
    wanted = {"modules_to_save": spec.modules_to_save}
    if spec.method in ("lora", "dora", "qlora", "ia3") and spec.target_modules != ["all-linear"]:
        wanted["target_modules"] = spec.target_modules
    if spec.method == "ia3":
        ff = _feedforward(net.config, spec)
        if not set(ff) <= set(spec.target_modules) and spec.target_modules != ["all-linear"]:
            raise ConfigError(f"lora.feedforward_modules {ff} must be among lora.target_modules {spec.target_modules}")
        wanted["feedforward_modules"] = ff
    for key, targets in wanted.items():
        unknown = [t for t in targets if not any(_matches(n, t) for n in names)]
        if unknown:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in names if not n.rsplit(".", 1)[-1].isdigit()})
            raise ConfigError(f"lora.{key}: no module named {', '.join(map(repr, unknown))} in this "
                              f"{net.config.model_type} model; its module names end in: {', '.join(leaves)}")
    if spec.method == "bitfit" and not any(n.endswith(".bias") for n, _ in net.named_parameters()):
        raise ConfigError(_no_bias_message(net.config))
    if adapter:
        _check_adapter(spec, adapter, names)


def _check_adapter(spec: LoraSpec, adapter: str, names: list[str]) -> None:
    path = os.path.join(local_path(adapter), "adapter_config.json")
    if not os.path.exists(path):
        raise ConfigError(f"inputs.adapter: no adapter_config.json in {adapter}")
    with open(path) as f:
        cfg = json.load(f)
    kind = PEFT_TYPES.get(spec.method)
    dora = bool(cfg.get("use_dora"))
    if kind is None or cfg.get("peft_type") != kind or (kind == "LORA" and dora != (spec.method == "dora")):
        have = "dora" if dora else cfg.get("peft_type", "?").lower()
        raise ConfigError(f"inputs.adapter is a {have} adapter, but lora.method={spec.method!r}; "
                          "continuing an adapter needs the method it was trained with")
    targets = cfg.get("target_modules") or []
    if isinstance(targets, list):
        unknown = [t for t in targets if not any(_matches(n, t) for n in names)]
        if unknown:
            raise ConfigError(f"inputs.adapter targets modules this model lacks: {', '.join(unknown)}")
