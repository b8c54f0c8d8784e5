"""Write a fake-quantized model (weights already equal to q * scale) as a compressed-tensors checkpoint.

compressed_tensors does the on-disk work: `apply_quantization_config` attaches the scheme and scale parameters,
we copy our scales in, `ModelCompressor.compress_model` turns each weight into its integer codes (pack-quantized
int32 words for weight-only schemes, int8 tensors for W8A8) and `update_config` writes `quantization_config` into
config.json, which vLLM and transformers read.
"""
from __future__ import annotations

import torch
from torch import nn


def scheme_args(bits: int, group_size: int, activations: str):
    """compressed_tensors QuantizationScheme kwargs: symmetric int weights (group or channel); activations
    'none' (W{bits}A16) or 'int8_dynamic' (per-token dynamic int8: W8A8)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy, QuantizationType

    w = QuantizationArgs(num_bits=bits, type=QuantizationType.INT, symmetric=True, dynamic=False,
                         strategy=QuantizationStrategy.GROUP if group_size else QuantizationStrategy.CHANNEL,
                         group_size=group_size or None)
    kw = {"weights": w}
    if activations == "int8_dynamic":
        kw["input_activations"] = QuantizationArgs(num_bits=8, type=QuantizationType.INT, symmetric=True,
                                                   dynamic=True, strategy=QuantizationStrategy.TOKEN)
    return kw


@torch.no_grad()
def export_compressed(model: nn.Module, tok, out_dir: str, scales: dict[str, torch.Tensor], *, bits: int,
                      group_size: int, activations: str = "none") -> dict:
    """Save `model` (fake-quantized in place, `scales` per target Linear) compressed to `out_dir`.
    Linears without scales stay in the model's dtype and are listed in the config's `ignore`."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, QuantizationStatus
    from compressed_tensors.quantization.lifecycle.apply import apply_quantization_config

    kept = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in scales)
    scheme = QuantizationScheme(targets=["Linear"], **scheme_args(bits, group_size, activations))
    qcfg = QuantizationConfig(config_groups={"group_0": scheme}, ignore=kept,
                              quantization_status=QuantizationStatus.FROZEN)
    apply_quantization_config(model, qcfg)
    mods = dict(model.named_modules())
    for name, s in scales.items():
        m = mods[name]
        m.weight_scale.data = s.reshape(m.weight_scale.shape).to(m.weight_scale.dtype)
        if hasattr(m, "weight_zero_point"):
            m.weight_zero_point.data.zero_()
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(out_dir)
    compressor.update_config(out_dir)
    if tok is not None:
        tok.save_pretrained(out_dir)
    fmt = compressor.quantization_config.format if compressor.quantization_config else None
    return {"format": fmt, "ignore": kept, "scheme": scheme.model_dump(exclude_none=True)}
