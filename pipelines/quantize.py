"""quantize: post-training quantization of a model run into a compressed-tensors checkpoint that vLLM serves.

- `method`: `rtn` (round-to-nearest), `gptq` (error feedback through the calibration Hessian), `awq` (activation-
  aware scales searched per norm group, then RTN), `smoothquant_w8a8` (activation outliers folded into the weights,
  then W8A8), `dynamic_int8` (RTN int8 weights + dynamic per-token int8 activations: W8A8; also records PyTorch's
  `quantize_dynamic` forward latency on CPU). Symmetric int weights, per output channel (`group_size: 0`) or in
  groups of `group_size` input columns. Algorithms: `raylm.compress.quant`; export: compressed_tensors
  (`raylm.compress.quant_export`). Why not llm-compressor: docs/compression.md.
- Calibration: `calibration.samples` blocks of `calibration.seq_len` tokens of the dataset run's own
  `calibration.split`, packed and spread over the split (`raylm.compress.calibration`, shared with prune).
- `ignore`: module-name patterns kept in full precision (lm_head by default). vLLM fuses q/k/v and gate/up, so a
  partly ignored fused group is ignored whole (recorded as `ignored_for_fusion`).
- `sensitivity.enabled`: quantize one linear (or one decoder layer) at a time, measure the held-out perplexity
  change, rank; `sensitivity.keep_top_k` adds the top-k to `ignore`.

Outputs a `model` artifact (serve/evaluate take it) and `compression` = measure.side_by_side(input vs quantized),
measured in this run. The quantization work runs as a Ray task.
"""
from __future__ import annotations

import tempfile
import time
from typing import Literal

import ray
from pydantic import model_validator

from raylm.compress.calibration import Calibration, calibration_blocks
from raylm.compress.measure import SideBySideSpec
from raylm.config import ConfigError, Section, StageConfig
from raylm.runs import local_path
from raylm.stage import require_paths

STAGE = "quantize"
INPUTS = {"model": ("model",), "dataset": ("dataset",)}
NEEDS_CALIBRATION = ("gptq", "awq", "smoothquant_w8a8")
W8A8_METHODS = ("smoothquant_w8a8", "dynamic_int8")


class Sensitivity(Section):
    enabled: bool = False
    top_k: int = 5
    granularity: Literal["linear", "layer"] = "linear"
    max_blocks: int = 8  # held-out perplexity blocks per probe (the scan runs one evaluation per unit)
    keep_top_k: bool = False  # keep the top_k most sensitive units in full precision


class Config(StageConfig):
    method: Literal["rtn", "gptq", "awq", "smoothquant_w8a8", "dynamic_int8"] = "rtn"
    bits: int = 8
    group_size: int = 0  # 0: one scale per output channel; else a scale per group of this many input columns
    scheme: Literal["auto", "W8A16", "W4A16", "W8A8"] = "auto"  # auto: W8A8 for the *_w8a8/dynamic methods
    ignore: list[str] = ["lm_head"]
    smoothquant_alpha: float = 0.5
    gptq_damp: float = 0.01
    calibration: Calibration = Calibration()
    sensitivity: Sensitivity = Sensitivity()
    measure: SideBySideSpec = SideBySideSpec()
    num_cpus: float = 1

    @model_validator(mode="after")
    def _check(self):
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        if self.group_size < 0:
            raise ValueError(f"group_size must be >= 0 (0 = per channel), got {self.group_size}")
        s = self.resolved_scheme()
        if int(s[1]) != self.bits:
            raise ValueError(f"scheme={s} needs bits={s[1]}, got bits={self.bits}")
        if self.method in W8A8_METHODS and s != "W8A8":
            raise ValueError(f"method={self.method} produces W8A8 (int8 activations); scheme={self.scheme} conflicts")
        if s == "W8A8" and self.group_size:
            raise ValueError("scheme W8A8 uses per-channel weight scales: set group_size: 0")
        return self

    def resolved_scheme(self) -> str:
        if self.scheme != "auto":
            return self.scheme
        return "W8A8" if self.method in W8A8_METHODS else f"W{self.bits}A16"


def _meta_model(model_uri: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(local_path(model_uri))
    if getattr(cfg, "quantization_config", None):
        raise ConfigError(f"{STAGE}: inputs.model is already quantized ({cfg.quantization_config.get('quant_method')}"
                          f"); quantize a full-precision model")
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg), cfg


def check(inputs, cfg: Config) -> None:
    from raylm.compress import quant as Q

    data = inputs["dataset"].uri
    require_paths(STAGE, data, {"held-out text": "text_val", "held-out tasks": "tasks_test",
                                "calibration.split": cfg.calibration.split})
    model, hf_cfg = _meta_model(inputs["model"].uri)
    targets = Q.target_linears(model, cfg.ignore)
    if not targets:
        raise ConfigError(f"{STAGE}: {hf_cfg.model_type} model has no nn.Linear in its decoder layers outside "
                          f"ignore={cfg.ignore}; method={cfg.method} quantizes decoder Linear weights")
    if cfg.method in ("awq", "smoothquant_w8a8"):
        try:
            Q.norm_groups(model)
        except ValueError as exc:
            raise ConfigError(f"{STAGE}: method={cfg.method} folds scales into the norms before q/k/v and gate/up; "
                              f"{exc}") from None
    if cfg.group_size:
        for name, lin in targets.items():
            if lin.in_features % cfg.group_size:
                raise ConfigError(f"{STAGE}: group_size={cfg.group_size} does not divide {name}.in_features="
                                  f"{lin.in_features}")
    if cfg.bits == 4:
        for name, lin in targets.items():
            if lin.in_features % 8:  # eight int4 codes per int32 word
                raise ConfigError(f"{STAGE}: bits=4 packs 8 columns per int32; {name}.in_features={lin.in_features}")
    if cfg.method in NEEDS_CALIBRATION:  # enough text, before any work
        from raylm.models import load_tokenizer

        calibration_blocks(f"{data}/{cfg.calibration.split}", load_tokenizer(inputs["model"].uri),
                           cfg.calibration.samples, cfg.calibration.seq_len)


@ray.remote(num_cpus=1)
def quantize_task(model_uri: str, data_uri: str, out_dir: str, cfg: dict) -> dict:
    import pyarrow.parquet as pq
    import torch

    from raylm.compress import measure
    from raylm.compress import quant as Q
    from raylm.compress.quant_export import export_compressed

    torch.set_num_threads(max(1, int(cfg["num_cpus"])))
    t0 = time.time()
    model, tok = measure.load_for_eval(model_uri)
    c, s = cfg["calibration"], cfg["sensitivity"]
    ignore, info = list(cfg["ignore"]), {}
    if s["enabled"]:
        texts = pq.read_table(f"{data_uri}/text_val", columns=["text"]).column("text").to_pylist()
        ranked = Q.sensitivity_scan(model, tok, texts, bits=cfg["bits"], group_size=cfg["group_size"],
                                    granularity=s["granularity"], seq_len=cfg["measure"]["seq_len"],
                                    max_blocks=s["max_blocks"], ignore=ignore)
        info["sensitivity"] = {"ranked": ranked, "most_sensitive": [r["name"] for r in ranked[: s["top_k"]]]}
        if s["keep_top_k"]:
            ignore += [r["pattern"] for r in ranked[: s["top_k"]]]
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    ignore, fused = Q.expand_fused(ignore, names)
    info["ignored_for_fusion"] = fused
    batches = None
    if cfg["method"] in NEEDS_CALIBRATION:
        blocks = calibration_blocks(f"{data_uri}/{c['split']}", tok, c["samples"], c["seq_len"])
        batches = [blocks[i: i + 8] for i in range(0, len(blocks), 8)]
    t1 = time.time()
    with torch.no_grad():
        if cfg["method"] == "smoothquant_w8a8":
            info["smoothing_max_scale"] = Q.smooth(model, batches, cfg["smoothquant_alpha"])
        if cfg["method"] == "awq":
            info["awq_exponent"] = Q.awq(model, batches, cfg["bits"], cfg["group_size"] or model.config.hidden_size)
        rounding = "gptq" if cfg["method"] == "gptq" else "rtn"
        scales = Q.quantize_model(model, method=rounding, bits=cfg["bits"], group_size=cfg["group_size"],
                                  ignore=ignore, batches=batches, damp=cfg["gptq_damp"])
    info["quantize_s"] = round(time.time() - t1, 2)
    info["quantized_modules"] = len(scales)
    if cfg["method"] == "dynamic_int8":  # PyTorch's own dynamic int8 Linear on CPU, for the latency figure
        fp, _ = measure.load_for_eval(model_uri)
        dyn = torch.ao.quantization.quantize_dynamic(fp, {torch.nn.Linear}, dtype=torch.qint8)
        reps = cfg["measure"]["latency_reps"]
        info["pytorch_dynamic_int8"] = {
            "fp32_forward_ms": measure.forward_latency("", model=fp, reps=reps)["forward_ms"],
            "int8_forward_ms": measure.forward_latency("", model=dyn, reps=reps)["forward_ms"]}
    scheme = cfg["scheme_resolved"]
    info.update(export_compressed(model, tok, out_dir, scales, bits=cfg["bits"], group_size=cfg["group_size"],
                                  activations="int8_dynamic" if scheme == "W8A8" else "none"))
    info["calibration_blocks"] = sum(len(b) for b in batches) if batches else 0
    info["task_s"] = round(time.time() - t0, 2)
    return info


@ray.remote(num_cpus=1)
def measure_task(reference: tuple[str, str], candidates: dict[str, str], data_uri: str, cfg: dict) -> dict:
    import torch

    from raylm.compress import measure

    torch.set_num_threads(1)
    return measure.side_by_side(reference, candidates, data_uri, cfg)


def body(run, inputs, cfg: Config) -> None:
    model_uri, data = inputs["model"].uri, inputs["dataset"].uri
    local = run.local_dir("model") or tempfile.mkdtemp()
    task_cfg = {**cfg.model_dump(), "scheme_resolved": cfg.resolved_scheme()}
    with run.time("quantize_s"):
        info = ray.get(quantize_task.options(num_cpus=cfg.num_cpus).remote(model_uri, data, local, task_cfg))
    uri = run.upload(local, "model")
    scheme = cfg.resolved_scheme()
    meta = {"quantized_from": inputs["model"].run_id, "method": cfg.method, "scheme": scheme, "bits": cfg.bits,
            "group_size": cfg.group_size, "format": info["format"], "ignore": info["ignore"]}
    run.add_artifact("model", "model", uri, meta=meta)
    with run.time("measure_s"):
        name = f"{cfg.method}_{scheme}" + (f"_g{cfg.group_size}" if cfg.group_size else "")
        comp = ray.get(measure_task.remote(("fp32", model_uri), {name: local_path(uri)}, data,
                                           cfg.measure.model_dump()))
    row, ref = comp["models"][name], comp["models"]["fp32"]
    metrics = {"method": cfg.method, "scheme": scheme, "bits": cfg.bits, "group_size": cfg.group_size,
               "format": info["format"], "compression": comp, "served": row.get("served"),
               "vllm_error": row.get("vllm_error"),
               "perplexity_before": ref["perplexity"], "perplexity_after": row["perplexity"],
               "perplexity_change": round(row["perplexity"] / ref["perplexity"] - 1, 5),
               "exact_match_before": ref["exact_match"], "exact_match_after": row["exact_match"],
               **{k: v for k, v in info.items() if k not in ("format", "scheme")}}
    if "sensitivity" in info:
        metrics["most_sensitive"] = info["sensitivity"]["most_sensitive"]
    run.log_metrics(metrics)


if __name__ == "__main__":
    import sys

    from raylm.stage import cli_main

    cli_main(sys.modules[__name__])
