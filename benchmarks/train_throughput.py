"""Benchmark: raylm's trainer (Ray Train) vs a plain single-process PyTorch loop, steady state and whole run.

Same Llama (hidden 768, intermediate 2048, 12 layers, 12 heads, 12 KV heads; vocabulary: a byte-level BPE of 8,192
tokens trained here on the embedded corpus, so ~97.5 M parameters of which 84.9 M outside the embeddings), same
batch (8 x 256 tokens per optimizer step, random token ids), same AdamW (the OptimSpec defaults) and clipping.

- anchor: forward, causal-LM cross-entropy, backward, `clip_grad_norm_`, AdamW step in this process (torch's
  default threads: every core), then `save_pretrained` of the model and tokenizer (what an export is).
- raylm: `raylm.train.launch.fit` exactly as the pretrain stage calls it, on a synthetic materialized Ray dataset of
  random token blocks (no tokenization in the measurement), `train.log_every=1`: 1 worker (all cores:
  `cpus_per_worker` = cores) in fp32 and bf16 autocast, then 2 workers (1 core each, 4 rows each: the same global
  batch) with FSDP2, DDP and DeepSpeed ZeRO-2.

Per config: steady-state tokens/s (steps after the first `--warmup`; for raylm from its own logged per-row
`tokens_per_s`), whole-run tokens/s (steps x tokens / wall of the whole `fit` call: worker start-up and export
included; for the anchor: model build + steps + save), MFU = flops_per_token x steady tokens/s / matmul FLOP/s
(the trainer's `flops_per_token`, 6N + attention; the denominator is `loop.matmul_flops` measured in the same run:
raylm records it per worker as `matmul_flops_per_s`, the anchor calls the same function), and the fixed cost =
whole-run wall - steps x steady step time, split with the timing fields the loop records in its final metrics.

    .venv/bin/python benchmarks/train_throughput.py [--steps 8] [--warmup 2] [--quick] [--configs a,b,...]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

HIDDEN = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
              num_key_value_heads=12)
VOCAB, BATCH, SEQ = 8192, 8, 256
CONFIGS = {  # name: (runner, precision, workers, strategy)
    "anchor-fp32": ("anchor", "fp32", 1, None),
    "anchor-bf16": ("anchor", "bf16", 1, None),
    "raylm-1w-fp32": ("raylm", "fp32", 1, "fsdp2"),
    "raylm-1w-bf16": ("raylm", "bf16", 1, "fsdp2"),
    "raylm-fsdp2-2w-fp32": ("raylm", "fp32", 2, "fsdp2"),
    "raylm-ddp-2w-fp32": ("raylm", "fp32", 2, "ddp"),
    "raylm-zero2-2w-fp32": ("raylm", "fp32", 2, "zero2"),
}
QUICK = ("anchor-fp32", "raylm-1w-fp32")


def tokenizer_dir() -> str:
    from types import SimpleNamespace

    from raylm.corpus import builtin_records
    from raylm.models import train_tokenizer

    cfg = SimpleNamespace(sources=["pydoc_topics", "stdlib_docstrings", "licenses"], max_chars_per_doc=1500,
                          max_stdlib_files=400)
    out = tempfile.mkdtemp(prefix="bench-tok-")
    train_tokenizer([r["text"] for r in builtin_records(cfg)], vocab_size=VOCAB).save_pretrained(out)
    return out


def specs():
    from raylm.config import ModelSpec, OptimSpec

    return ModelSpec(preset="tiny", overrides=HIDDEN), OptimSpec()


def token_blocks(n: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(n, SEQ), dtype=np.int64)


class CpuSampler:
    """CPU seconds each process of the machine used while a config ran (sampled every second from /proc, so a
    process that lives < 1 s is missed): what the trainer's own processes and Ray's others took from the cores."""

    def __init__(self):
        import threading

        self.seen: dict[int, tuple[str, float, float]] = {}  # pid -> (name, cpu at first sight, latest cpu)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def sample(self) -> None:
        import psutil

        for proc in psutil.process_iter(["cmdline", "cpu_times"]):
            try:
                t = proc.info["cpu_times"]
                cpu = t.user + t.system
                cmd = proc.info["cmdline"] or ["?"]
            except Exception:  # noqa: BLE001 - gone meanwhile
                continue
            name = cmd[0] if cmd[0].startswith("ray::") else os.path.basename(cmd[0]) + (
                " " + os.path.basename(cmd[1]) if len(cmd) > 1 and cmd[0].endswith("python") else "")
            first = self.seen.get(proc.pid, (name, 0.0 if self.started else cpu, cpu))[1]
            self.seen[proc.pid] = (name.split(".")[0] if name.startswith("ray::") else name, first, cpu)

    def run(self) -> None:
        while not self.stop.wait(1.0):
            self.sample()

    def __enter__(self):
        self.started = False
        self.sample()
        self.started = True  # processes first seen later started inside the window: count all their CPU
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.sample()

    def by_name(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, first, last in self.seen.values():
            if last - first > 0.05:
                out[name] = out.get(name, 0.0) + last - first
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def steady(step_s: list[float], warmup: int) -> float:
    """Mean step time after the first `warmup` steps."""
    rest = step_s[warmup:]
    return sum(rest) / len(rest)


def median_run(rs: list[dict]) -> dict:
    """The repeat with the median steady tokens/s (its other figures come with it)."""
    return sorted(rs, key=lambda r: r["steady_tok_s"])[(len(rs) - 1) // 2]


def spread(ours: list[dict], ref: list[dict], key: str) -> str:
    """Ratio of the median repeats, and the range over the repeats paired in order (repeat i of each config ran
    back to back)."""
    med = median_run(ours)[key] / median_run(ref)[key]
    pairs = sorted(o[key] / a[key] for o, a in zip(ours, ref))
    return f"{med:.2f}x" + (f" ({pairs[0]:.2f}-{pairs[-1]:.2f})" if len(pairs) > 1 else "")


# ---------------------------------------------------------------- anchor
def anchor(tok_dir: str, precision: str, steps: int, warmup: int) -> dict:
    import torch.nn.functional as F

    from raylm.models import build_model, flops_per_token, load_tokenizer
    from raylm.train.loop import matmul_flops

    t0 = time.perf_counter()
    spec, oc = specs()
    tok = load_tokenizer(tok_dir)
    model = build_model(spec, tok, seed=0)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=oc.lr, betas=tuple(oc.betas), weight_decay=oc.weight_decay)
    flops_s = matmul_flops(torch.device("cpu"), precision)
    data = torch.from_numpy(token_blocks(steps * BATCH, len(tok)))
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else \
        (lambda: torch.autocast("cpu", enabled=False))
    t_steps, step_s, losses = time.perf_counter(), [], []
    for i in range(steps):
        t = time.perf_counter()
        ids = data[i * BATCH:(i + 1) * BATCH]
        with ctx():
            logits = model(input_ids=ids).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), oc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step_s.append(time.perf_counter() - t)
    t_save = time.perf_counter()
    out = tempfile.mkdtemp(prefix="bench-anchor-")
    model.save_pretrained(os.path.join(out, "model"))
    tok.save_pretrained(os.path.join(out, "model"))
    t_end = time.perf_counter()
    shutil.rmtree(out, ignore_errors=True)
    return {"wall_s": t_end - t0, "step_s": step_s, "flops_s": flops_s, "fpt": flops_per_token(model.config, SEQ),
            "params": sum(p.numel() for p in model.parameters()), "loss_first": losses[0], "loss_last": losses[-1],
            "parts": {"set-up (build, optimizer, matmul probe, data)": t_steps - t0,
                      "export (save_pretrained)": t_end - t_save}}


# ---------------------------------------------------------------- raylm
def ours(tok_dir: str, precision: str, steps: int, workers: int, strategy: str, storage: str) -> dict:
    import ray

    from raylm.config import ResourcesSpec, TrainSpec
    from raylm.train.launch import fit

    spec, oc = specs()
    per_worker = BATCH // workers
    t0 = time.perf_counter()
    from raylm.models import load_tokenizer

    ids = token_blocks(steps * BATCH, len(load_tokenizer(tok_dir)))
    train = ray.data.from_items([{"input_ids": r, "labels": r} for r in ids]).materialize()
    data_s = time.perf_counter() - t0
    tc = TrainSpec(max_steps=steps, batch_size=per_worker, seq_len=SEQ, log_every=1, precision=precision)
    job = {"objective": "lm", "loss": "causal_lm", "tokenizer_path": tok_dir, "model": spec.model_dump(),
           "optim": oc.model_dump(), "train": tc.model_dump()}  # as pipelines/pretrain.py builds it
    res = ResourcesSpec(num_workers=workers, strategy=strategy, cpus_per_worker=max(1, (os.cpu_count() or 2)
                                                                                     // workers))
    name = f"bench-{precision}-{workers}-{strategy}-{int(time.time())}"
    t_fit = time.time()
    t1 = time.perf_counter()
    out = fit(job, {"train": train}, res, storage, name)
    wall = time.perf_counter() - t1
    m, hist = out["metrics"], out["history"]
    tokens_per_step = BATCH * SEQ
    step_s = [tokens_per_step / r["tokens_per_s"] for r in hist]
    assert len(step_s) == steps, (len(step_s), steps)
    parts = {}
    if "loop_entered_at" in m:
        parts["worker group start (fit call -> loop entered)"] = m["loop_entered_at"] - t_fit
        parts["model build (tokenizer + make_model)"] = m["model_build_s"]
        parts["distribute (backend)"] = m["distribute_s"]
        parts["matmul probe"] = m["matmul_probe_s"]
        rest = m["setup_s"] - m["model_build_s"] - m["distribute_s"] - m["matmul_probe_s"]
        parts["other set-up (restore, data iterator)"] = rest
        parts["end: full state dict"] = m["state_dict_s"]
        parts["end: export (model/ written)"] = m["export_model_s"]
        parts["end: other (per-worker all-reduces, history)"] = m["export_s"] - m["state_dict_s"] - m["export_model_s"]
        parts["final report -> fit returns (persist, shutdown)"] = t_fit + wall - m["final_report_at"]
    return {"wall_s": wall, "step_s": step_s, "flops_s": sum(m["matmul_flops_per_s"]), "fpt": m["flops_per_token"],
            "params": m["params"], "loss_first": hist[0]["loss"], "loss_last": hist[-1]["loss"], "parts": parts,
            "mfu_recorded": m["mfu"], "train_s": m["train_s"], "dataset_s": data_s, "checkpoint": out["checkpoint"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the steady state")
    ap.add_argument("--quick", action="store_true", help=f"5 steps, only {', '.join(QUICK)}")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of: {', '.join(CONFIGS)}")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run the configs this many times, interleaved; the table shows medians and each ratio's range")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    names = list(QUICK) if args.quick else args.configs.split(",")
    steps = 5 if args.quick and args.steps == 8 else args.steps
    assert steps > args.warmup, "need steps after the warm-up"

    from raylm.cluster import init_ray

    tok_dir = tokenizer_dir()
    init_ray()  # up for every config: the anchor runs beside the same idle Ray processes the trainer has
    storage = tempfile.mkdtemp(prefix="bench-train-")
    runs: dict[str, list[dict]] = {}
    for name in [n for _ in range(args.repeats) for n in names]:  # interleaved: drift hits every config alike
        kind, precision, workers, strategy = CONFIGS[name]
        t = time.perf_counter()
        with CpuSampler() as cpu:
            if kind == "anchor":
                r = anchor(tok_dir, precision, steps, args.warmup)
            else:
                r = ours(tok_dir, precision, steps, workers, strategy, storage)
        if kind != "anchor":
            shutil.rmtree(r.pop("checkpoint"), ignore_errors=True)
        r["cpu_s"] = {k: round(v, 1) for k, v in cpu.by_name().items()}
        r["name"] = name
        st = steady(r["step_s"], args.warmup)
        r.update(steady_step_s=st, steady_tok_s=BATCH * SEQ / st, whole_tok_s=steps * BATCH * SEQ / r["wall_s"],
                 mfu=r["fpt"] * BATCH * SEQ / st / r["flops_s"], fixed_s=r["wall_s"] - steps * st,
                 first_steps_excess_s=sum(s - st for s in r["step_s"][:args.warmup]))
        runs.setdefault(name, []).append(r)
        print(f"{name}: {time.perf_counter() - t:.1f}s  steps {[round(s, 2) for s in r['step_s']]}  "
              f"loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}", flush=True)

    results = {name: median_run(rs) for name, rs in runs.items()}
    tokens = BATCH * SEQ
    print(f"\nmodel: {next(iter(results.values()))['params']:,} parameters, batch {BATCH} x {SEQ} = {tokens} tokens "
          f"per step, {steps} steps (steady state: steps {args.warmup + 1}-{steps}); cpus={os.cpu_count()} "
          f"torch {torch.__version__}")
    hdr = ("config", "steady tok/s", "whole-run tok/s", "MFU", "matmul GFLOP/s", "wall s", "fixed s",
           "steady vs anchor", "whole vs anchor")
    print(" | ".join(hdr))
    for name, r in results.items():
        ref = results.get(f"anchor-{CONFIGS[name][1]}") or results.get("anchor-fp32")
        ratio = (lambda k: spread(runs[name], runs[ref["name"]], k)) if ref else (lambda k: "-")
        print(" | ".join([name, f"{r['steady_tok_s']:.0f}", f"{r['whole_tok_s']:.0f}", f"{r['mfu']:.3f}",
                          f"{r['flops_s'] / 1e9:.0f}", f"{r['wall_s']:.1f}", f"{r['fixed_s']:.1f}",
                          ratio("steady_tok_s"), ratio("whole_tok_s")]))
    print("\nfixed cost split (s):")
    for name, r in results.items():
        parts = {**r["parts"], f"first {args.warmup} steps beyond steady": r["first_steps_excess_s"]}
        known = sum(parts.values())
        detail = ", ".join(f"{k} {v:.2f}" for k, v in parts.items())
        print(f"  {name}: fixed {r['fixed_s']:.2f} = {detail}; unaccounted {r['fixed_s'] - known:.2f}"
              + (f"; recorded mfu (whole train_s) {r['mfu_recorded']}; dataset built before fit "
                 f"{r['dataset_s']:.2f}" if "mfu_recorded" in r else ""))
    print("\nCPU seconds by process while each config ran (the anchor is the benchmark's own python):")
    for name, r in results.items():
        print(f"  {name} ({r['wall_s']:.0f} s wall): " + ", ".join(f"{k} {v}" for k, v in r["cpu_s"].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"steps": steps, "warmup": args.warmup, "repeats": args.repeats, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
