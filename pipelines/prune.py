"""prune: unstructured (magnitude / Wanda) or structured (attention heads + MLP channels) pruning of a model run.

- `method: magnitude` (L1, seed 004) or `wanda` (|W| x input-activation norm from calibration blocks of the
  dataset's own text) zero exactly round(sparsity x n) weights of the decoder's linear layers (`modules`), per layer
  or in one `global` ranking: `raylm.compress.prune`. The checkpoint keeps its shape (dense storage, zeros inside).
- `method: structured` removes KV groups (or query heads) and MLP channels by score, the same number in every layer,
  and saves a smaller config (num_attention_heads, num_key_value_heads, intermediate_size; head_dim kept):
  `raylm.compress.prune_structured`. Llama / Qwen2 / Mistral-style decoders only.
- `recovery.steps > 0`: a short causal-LM fine-tune of the pruned model on the dataset's text through the shared Ray
  Train loop; for unstructured pruning the loop re-zeroes the pruned weights after every optimizer step
  (`keep_zeros`), so the sparsity survives.
- Distillation from the unpruned model instead of (or after) recovery: the output is a normal `model` artifact, so
  `python -m pipelines.distill inputs.student=<this run> inputs.teacher=<the input model's run>` takes it.

Records method, sparsity requested and reached (counted from the saved weights), parameters before/after, nonzero
parameters, checkpoint bytes, config dims before/after, quality before/after, and `compression`:
`raylm.compress.measure.side_by_side(input vs output)` measured in this run (perplexity, exact match, forward
latency, vLLM tokens/s and peak memory). The pruning work runs as a Ray task.
"""
from __future__ import annotations

import glob
import os
import tempfile
from typing import Literal

import ray
from pydantic import Field, field_validator, model_validator

from raylm.compress.calibration import Calibration, calibration_blocks
from raylm.compress.measure import SideBySideSpec
from raylm.compress.prune import DECODER_LINEARS
from raylm.config import ConfigError, OptimSpec, ResourcesSpec, Section, StageConfig, TrainSpec
from raylm.runs import local_path
from raylm.stage import require_paths

STAGE = "prune"
INPUTS = {"model": ("model",), "dataset": ("dataset",)}


class Structured(Section):
    """method=structured: what goes. Every layer loses the same number of heads and channels (an HF config has one
    count for all layers); which ones is chosen per layer by `score`."""

    unit: Literal["kv_group", "query"] = "kv_group"  # whole KV groups, or the same number of queries per group
    heads_fraction: float = Field(0.0, ge=0, lt=1)  # of the query heads, rounded to whole units
    heads_per_layer: int | None = Field(None, ge=0)  # query heads removed per layer (instead of heads_fraction)
    mlp_fraction: float = Field(0.0, ge=0, lt=1)  # of the intermediate channels
    score: Literal["magnitude", "wanda"] = "wanda"


class Recovery(Section):
    """A short fine-tune after pruning (0 steps: none) on the dataset's text."""

    steps: int = Field(0, ge=0)
    lr: float = Field(5e-4, gt=0)
    batch_size: int = Field(8, ge=1)
    seq_len: int = Field(128, ge=2)
    split: str = "text_train"
    resources: ResourcesSpec = ResourcesSpec(num_workers=1, strategy="ddp")


class Measure(SideBySideSpec):
    vllm_max_tokens: int = 64


class Config(StageConfig):
    method: Literal["magnitude", "wanda", "structured"] = "magnitude"
    sparsity: float | None = None  # magnitude / wanda: the fraction of the targeted weights set to zero
    scope: Literal["per_layer", "global"] = "per_layer"
    modules: list[str] = list(DECODER_LINEARS)  # + lm_head / embed_tokens to prune those too
    structured: Structured = Structured()
    calibration: Calibration = Calibration()
    recovery: Recovery = Recovery()
    measure: Measure = Measure()

    @field_validator("sparsity")
    @classmethod
    def _sparsity_range(cls, v):
        if v is not None and not 0 <= v < 1:
            raise ValueError(f"sparsity must be in [0, 1), got {v}")
        return v

    @model_validator(mode="after")
    def _fields_fit_method(self):
        if self.method == "structured":
            wrong = [f"{k}={getattr(self, k)!r}" for k in ("sparsity", "scope", "modules")
                     if getattr(self, k) != type(self).model_fields[k].default]
            if wrong:
                raise ValueError(f"method=structured does not read {', '.join(wrong)}: set structured.heads_fraction "
                                 "/ structured.heads_per_layer / structured.mlp_fraction")
            s = self.structured
            if not (s.heads_fraction or s.heads_per_layer or s.mlp_fraction):
                raise ValueError("method=structured removes nothing: set structured.heads_fraction, "
                                 "structured.heads_per_layer or structured.mlp_fraction")
            if s.heads_fraction and s.heads_per_layer is not None:
                raise ValueError("set one of structured.heads_fraction and structured.heads_per_layer, not both")
        else:
            if self.sparsity is None:
                raise ValueError(f"method={self.method} needs sparsity (in [0, 1))")
            if self.structured != Structured():
                raise ValueError(f"structured.* is read by method=structured only, not method={self.method}")
        return self


def needs_calibration(cfg: dict) -> bool:
    """cfg: `Config.model_dump()` (the Ray tasks get the plain dict)."""
    return cfg["method"] == "wanda" or (cfg["method"] == "structured" and cfg["structured"]["score"] == "wanda")


# ---------------------------------------------------------------- what check() reads without loading weights
def checkpoint_keys(model_uri: str) -> list[str]:
    """Tensor names of a checkpoint directory (safetensors headers, or a .bin read memory-mapped)."""
    d = local_path(model_uri)
    files = sorted(glob.glob(os.path.join(d, "*.safetensors")))
    if files:
        from safetensors import safe_open

        keys = []
        for f in files:
            with safe_open(f, "pt") as fh:
                keys.extend(fh.keys())
        return keys
    import torch

    return [k for f in sorted(glob.glob(os.path.join(d, "*.bin")))
            for k in torch.load(f, mmap=True, weights_only=True, map_location="meta")]


def check(inputs, cfg: Config) -> None:
    from transformers import AutoConfig

    from raylm.compress import prune_structured as S
    from raylm.models import load_tokenizer

    data, model_uri = inputs["dataset"].uri, inputs["model"].uri
    splits = {"held-out text": "text_val", "held-out tasks": "tasks_test"}
    if needs_calibration(cfg.model_dump()):
        splits["calibration.split"] = cfg.calibration.split
    if cfg.recovery.steps:
        splits["recovery.split"] = cfg.recovery.split
    require_paths(STAGE, data, splits)
    config = AutoConfig.from_pretrained(local_path(model_uri))
    arch = (getattr(config, "architectures", None) or [config.model_type])[0]
    keys = checkpoint_keys(model_uri)
    if cfg.method == "structured":
        try:
            S.check_llama_style(config, keys)
            p = S.plan(config, **cfg.structured.model_dump(exclude={"score"}))
        except ValueError as exc:
            raise ConfigError(f"prune: {exc}") from None
        heads_cut = p.kv_keep * p.q_per_kv < S.dims(config)["num_attention_heads"]
        if heads_cut and config.model_type == "qwen2":
            # vLLM's Qwen2 (vllm/model_executor/models/qwen2.py) computes head_dim = hidden_size / num_heads and
            # ignores config.head_dim (its Llama reads it): a head-pruned Qwen2 would load with wrong shapes.
            raise ConfigError(f"prune: {arch}: vLLM's Qwen2 derives head_dim from hidden_size / "
                              "num_attention_heads, so a head-pruned Qwen2 cannot be served; prune MLP channels "
                              "only (structured.heads_fraction=0)")
    else:
        names = set(cfg.modules)
        hit = [k for k in keys if k.endswith(".weight") and k[:-7].rsplit(".", 1)[-1] in names
               and (".layers." in f".{k}" or k[:-7].rsplit(".", 1)[-1] in ("lm_head", "embed_tokens"))]
        if not hit:
            leaves = sorted({k[:-7].rsplit(".", 1)[-1] for k in keys if k.endswith(".weight")})
            raise ConfigError(f"prune: modules={cfg.modules} match no weight of {arch} (model_type "
                              f"{config.model_type}); its weights are named: {', '.join(leaves)}")
        if cfg.recovery.steps and cfg.recovery.resources.strategy.startswith("zero"):
            raise ConfigError(f"recovery.resources.strategy={cfg.recovery.resources.strategy}: keeping pruned weights "
                              "at zero during recovery is done for ddp/fsdp2 (DeepSpeed keeps its own weight copies)")
    if needs_calibration(cfg.model_dump()):
        calibration_blocks(f"{data}/{cfg.calibration.split}", load_tokenizer(model_uri), cfg.calibration.samples,
                           cfg.calibration.seq_len)


# ---------------------------------------------------------------- the work (Ray tasks)
@ray.remote(num_cpus=1)
def prune_task(model_uri: str, data_uri: str, cfg: dict, out_dir: str) -> dict:
    """Load, prune, save; returns what was pruned and the pruned model's quality before any recovery."""
    import torch

    from raylm.compress import measure
    from raylm.compress import prune as P
    from raylm.compress import prune_structured as S
    from raylm.models import load_model, load_tokenizer

    torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    model, tok = load_model(model_uri).eval(), load_tokenizer(model_uri)
    c = cfg["calibration"]
    blocks = calibration_blocks(f"{data_uri}/{c['split']}", tok, c["samples"], c["seq_len"]) \
        if needs_calibration(cfg) else None
    info: dict = {"dims_before": S.dims(model.config)}
    if cfg["method"] == "structured":
        s = cfg["structured"]
        p = S.plan(model.config, s["unit"], s["heads_fraction"], s["heads_per_layer"], s["mlp_fraction"])
        norms = S.activation_norms(model, blocks) if s["score"] == "wanda" else None
        model, kept = S.prune_structured(model, p, s["score"], norms)
        info.update(kept=kept, masked=[])
    else:
        masks = P.prune_unstructured(model, cfg["method"], cfg["sparsity"], cfg["scope"], cfg["modules"], blocks)
        info["masked"] = [f"{n}.weight" for n in masks]
    info["dims_after"] = S.dims(model.config)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    m = cfg["measure"]
    info["quality_pruned"] = measure.quality(out_dir, data_uri, seq_len=m["seq_len"], max_blocks=m["max_blocks"],
                                             max_tasks=m["max_tasks"], max_new_tokens=m["max_new_tokens"],
                                             model=model, tok=tok)
    return info


@ray.remote(num_cpus=1)
def measure_task(input_uri: str, output_uri: str, data_uri: str, cfg: dict) -> dict:
    """The input and the pruned model side by side, and the sparsity counted from the saved weights."""
    import torch
    from safetensors.torch import load_file

    from raylm.compress import measure
    from raylm.compress.prune import sparsity_report

    torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    state = {}
    for f in sorted(glob.glob(os.path.join(local_path(output_uri), "*.safetensors"))):
        state.update(load_file(f))
    counted = sparsity_report(state, cfg["modules"])
    comp = measure.side_by_side(("input", input_uri), {"pruned": output_uri}, data_uri, cfg["measure"])
    return {"counted": counted, "compression": comp}


def recover(run, model_uri: str, data: str, cfg: Config, masked: list[str]) -> dict:
    """Fine-tune the pruned model (causal LM on the dataset's text) through the shared Ray Train loop."""
    from pipelines.pretrain import packed
    from raylm.train.launch import fit

    r = cfg.recovery
    train = packed(f"{data}/{r.split}", model_uri, r.seq_len, seed=0)
    val = packed(f"{data}/text_val", model_uri, r.seq_len)
    job = {"objective": "lm", "loss": "causal_lm", "tokenizer_path": model_uri,
           "model": {"path": model_uri, "preset": None}, "lora": None,
           "optim": OptimSpec(lr=r.lr, warmup_steps=0, schedule="constant").model_dump(),
           "train": TrainSpec(max_steps=r.steps, batch_size=r.batch_size, seq_len=r.seq_len, eval_every=r.steps,
                              log_every=max(1, r.steps // 10)).model_dump(),
           "keep_zeros": masked}
    out = fit(job, {"train": train, "val": val}, r.resources, run.uri("train"), run.id)
    run.log_metrics({f"recovery_{k}": out["metrics"].get(k) for k in ("train_s", "steps_run", "tokens_seen")})
    run.log_history(out["history"])
    return out


def body(run, inputs, cfg: Config) -> None:
    model_uri, data = inputs["model"].uri, inputs["dataset"].uri
    local = run.local_dir("pruned") or tempfile.mkdtemp()
    with run.time("prune_s"):
        info = ray.get(prune_task.remote(model_uri, data, cfg.model_dump(), local))
    pruned_uri = run.upload(local, "pruned")
    final_uri, rec = pruned_uri, {}
    if cfg.recovery.steps:
        with run.time("recovery_s"):
            out = recover(run, pruned_uri, data, cfg, info["masked"])
        final_uri = f"{out['checkpoint']}/model"
        first, last = out["history"][0], out["history"][-1]
        rec = {"recovery_steps": cfg.recovery.steps, "recovery_initial_loss": first["loss"],
               "recovery_final_loss": last["loss"], "recovery_final_val_loss": last.get("val_loss")}
    with run.time("measure_s"):
        res = ray.get(measure_task.remote(model_uri, final_uri, data, cfg.model_dump()))
    counted, comp = res["counted"], res["compression"]
    before, after = comp["models"]["input"], comp["models"]["pruned"]
    meta = {"method": cfg.method, "pruned_from": inputs["model"].run_id, "architecture": info["dims_after"],
            "recovered": bool(cfg.recovery.steps)}
    run.add_artifact("model", "model", final_uri, meta=meta)
    if cfg.recovery.steps:  # the pruned weights before recovery, for comparison (not what later stages take)
        run.add_artifact("pruned", "pruned_model", pruned_uri, meta={**meta, "recovered": False})
    q = info["quality_pruned"]
    run.log_metrics({
        "method": cfg.method, "scope": cfg.scope if cfg.method != "structured" else None,
        "modules": cfg.modules if cfg.method != "structured" else None,
        "structured": cfg.structured.model_dump() if cfg.method == "structured" else None,
        "sparsity_requested": cfg.sparsity,
        # counted from the saved weights: zeros among the targeted weights / their count
        "sparsity_reached": round(counted["sparsity"], 6) if cfg.method != "structured" else None,
        "target_zeros": counted["target_zeros"], "target_params": counted["target_params"],
        "params_before": before["params"], "params_after": after["params"],
        "nonzero_params": counted["nonzero_params"],
        "param_ratio": round(after["params"] / before["params"], 4),
        "nonzero_ratio": round(counted["nonzero_params"] / before["params"], 4),
        "checkpoint_bytes_before": before["checkpoint_bytes"], "checkpoint_bytes_after": after["checkpoint_bytes"],
        "dims_before": info["dims_before"], "dims_after": info["dims_after"],
        "calibration": cfg.calibration.model_dump() if needs_calibration(cfg.model_dump()) else None,
        "perplexity_before": before["perplexity"], "perplexity_after": after["perplexity"],
        "exact_match_before": before["exact_match"], "exact_match_after": after["exact_match"],
        "val_loss_before": before["val_loss"], "val_loss_after": after["val_loss"],
        # the pruned model before any recovery (same scorer): what recovery starts from
        "perplexity_pruned": q["perplexity"], "val_loss_pruned": q["val_loss"], "exact_match_pruned": q["exact_match"],
        **rec, "compression": comp,
    })


if __name__ == "__main__":
    import sys

    from raylm.stage import cli_main

    cli_main(sys.modules[__name__])
