"""Scale run: >= 1 GB of generated text through the whole curate pipeline on this machine, streaming.

read -> normalise -> quality/language filters -> PII -> exact + fuzzy dedup -> token counting -> chunk + pack,
on a local Ray cluster with the machine's cores. Records GB/h (input JSONL bytes over the stage's wall time), the
peak memory in use on the machine (psutil, sampled every 2 s, minus what was in use before the run), the peak
object-store use and what Ray spilled, and the stage's own funnel and timings.

    .venv/bin/python benchmarks/curate_scale.py [--gb 1.0] [--dir /tmp/raylm-scale] [--out result.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import threading
import time


def generate(path: str, gb: float, seed: int = 0) -> tuple[int, int]:
    """Planted-duplicate corpus in chunks of 20k documents until the file holds `gb` GiB; (docs, bytes)."""
    from raylm.data.synth import planted_corpus

    n, size, chunk = 0, 0, 0
    with open(path, "w") as f:
        while size < gb * 2 ** 30:
            recs, _ = planted_corpus(20000, seed=seed + chunk, source="web" if chunk % 3 else "docs")
            for r in recs:
                r["id"] = f"c{chunk:04d}-{r['id']}"  # unique across chunks; each chunk plants its own duplicates
                line = json.dumps(r) + "\n"
                f.write(line)
                size += len(line.encode())
                n += 1
            chunk += 1
    return n, size


class Sampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        import psutil

        self.psutil = psutil
        self.base = psutil.virtual_memory().used
        self.peak = 0
        self.stop = threading.Event()

    def run(self):
        while not self.stop.wait(2.0):
            self.peak = max(self.peak, self.psutil.virtual_memory().used - self.base)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--dir", default="/tmp/raylm-scale")
    ap.add_argument("--out")
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    corpus = os.path.join(args.dir, "corpus.jsonl")
    t = time.time()
    if not os.path.exists(corpus):
        n_docs, n_bytes = generate(corpus, args.gb)
        print(f"generated {n_docs:,} docs, {n_bytes / 2**30:.2f} GiB in {time.time() - t:.0f} s", flush=True)
    n_bytes = os.path.getsize(corpus)

    tok_dir = os.path.join(args.dir, "tokenizer")
    if not os.path.exists(tok_dir):
        from raylm.data.synth import planted_corpus
        from raylm.models import train_tokenizer

        recs, _ = planted_corpus(5000, seed=99)
        train_tokenizer([r["text"] for r in recs], vocab_size=8192).save_pretrained(tok_dir)

    import ray

    from pipelines import curate
    from raylm.config import load_config
    from raylm.runs import RunStore
    from raylm.stage import execute

    root = os.path.join(args.dir, "runs")
    cfg = load_config(curate.Config, None, [f"root={root}", f"source={corpus}", "tasks.enabled=false",
                                            f"tokens.tokenizer_path={tok_dir}", "pack.enabled=true",
                                            "pack.chunk_tokens=512", "pack.seq_len=1024"])
    from raylm.cluster import init_ray

    init_ray()  # the same local cluster `raylm run` starts (curate caps Ray Data at the machine's cores)
    sampler = Sampler()
    sampler.start()
    t = time.time()
    run_id = execute(curate, cfg)
    wall = time.time() - t
    sampler.stop.set()
    m = RunStore(root).load(run_id)
    spilled = None
    try:
        from ray._private.internal_api import memory_summary

        summary = memory_summary(stats_only=True)
        spilled = [ln.strip() for ln in summary.splitlines() if "Spilled" in ln or "spilled" in ln][:3]
    except Exception as exc:  # noqa: BLE001 - best effort
        spilled = [f"unavailable: {exc}"]
    ray.shutdown()
    x = m.metrics
    result = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "cores": os.cpu_count(),
        "input_gib": round(n_bytes / 2 ** 30, 3), "docs_in": x["docs_in"], "docs_kept": x["docs_kept"],
        "wall_s": round(wall, 1), "gb_per_hour": round(n_bytes / 1e9 / (wall / 3600), 2),
        "docs_per_s": round(x["docs_in"] / wall, 1), "peak_memory_gib": round(sampler.peak / 2 ** 30, 2),
        "timings": m.timings, "dedup_graph": x["dedup_graph"], "drop_reasons": x["drop_reasons"],
        "quarantine_reasons": x["quarantine_reasons"], "packed": x.get("packed"), "tokens_total": x["tokens"]["total"],
        "funnel": [{k: r[k] for k in ("op", "in", "kept", "removed", "seconds", "docs_per_s")} for r in x["funnel"]],
        "spilling": spilled, "run_id": run_id,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
