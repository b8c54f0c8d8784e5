"""`raylm loadtest URL`: a bounded load generator for an OpenAI-compatible endpoint.

Why: before sending users to a served model we want the latency they will see (TTFT, TPOT,
end-to-end percentiles), output tokens/s and an error breakdown at a chosen concurrency,
measured from the client, and bounded (request cap, duration, total timeout, loopback-only by
default) so a typo cannot flood someone's server.

Built on vLLM's serving benchmark (vllm/benchmarks in the vllm wheel) so the numbers mean what
`vllm bench serve` numbers mean: its streaming request functions `async_request_openai_completions`
/ `async_request_openai_chat_completions` with `RequestFuncInput` / `RequestFuncOutput`
(lib/endpoint_request_func.py) send each request and measure ttft, itl, latency and output tokens;
`get_first_model_from_server` (serve.py) picks the model; TPOT is `serve.calculate_metrics`'s
(latency - ttft) / (tokens - 1). `calculate_metrics` itself prints to stdout (breaking --json) and
wants the dataset's SampleRequests, so `summarize` redoes that arithmetic. Ours, for what vLLM
lacks: HTTP status of failures, explicit auth, non-streaming requests, closed-loop hard bounds.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import itertools
import json
import random
import re
import time
from collections import Counter
from urllib.parse import urlsplit

import aiohttp
import numpy as np
from serve.guard import client_key
from vllm.benchmarks.lib.endpoint_request_func import (
    RequestFuncInput, RequestFuncOutput, async_request_openai_chat_completions,
    async_request_openai_completions)

MAX_REQUESTS = 100_000
WORDS = ("the of and to in is it that was for on are as with his they at be this from have or by one had "
         "not but what all were when we there can an your which their said if do will each about how up out "
         "them then she many some so these would other into has more her two like him see time could no make "
         "than first been its who now people my made over did down only way find use may water long little "
         "very after words called just where most know get through back much before go good new write our").split()


def _base_url(url: str, allow_remote: bool) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"loadtest URL must be http(s)://host[:port][/v1], got {url!r}")
    if not _is_loopback(host := parts.hostname) and not allow_remote:
        raise ValueError(f"refusing to load-test non-loopback host {host!r}: a load test can degrade a shared "
                         "service; pass allow_remote=True (--allow-remote) if you own it")
    base = url.rstrip("/")
    return base[:-3] if base.endswith("/v1") else base


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name other than localhost: resolving it could point anywhere
        return False


class _AuthStatusSession:
    """Stands in for the aiohttp session passed to vLLM's request functions.

    They send `Authorization` from $OPENAI_API_KEY and, on failure, keep only `response.reason`;
    here the header is exactly the key we were given (never a stray env key sent to a remote host)
    and the status code is remembered so errors can be reported as "401", "503", ...
    """

    def __init__(self, session: aiohttp.ClientSession, api_key: str | None):
        self._session, self._api_key, self.status = session, api_key, None

    @contextlib.asynccontextmanager
    async def post(self, *args, headers=None, **kw):
        headers = {k: v for k, v in (headers or {}).items() if k.lower() != "authorization"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        async with self._session.post(*args, headers=headers, **kw) as resp:
            self.status = resp.status
            yield resp


async def _request_nonstream(rfi: RequestFuncInput, session, chat: bool) -> RequestFuncOutput:
    # vLLM's functions always stream and cannot parse a plain JSON body; ttft == latency here.
    body = ({"messages": [{"role": "user", "content": rfi.prompt}], "max_completion_tokens": rfi.output_len}
            if chat else {"prompt": rfi.prompt, "max_tokens": rfi.output_len})
    body |= {"model": rfi.model, "stream": False, "ignore_eos": rfi.ignore_eos, **(rfi.extra_body or {})}
    out = RequestFuncOutput(prompt_len=rfi.prompt_len, start_time=time.perf_counter())
    try:
        async with session.post(url=rfi.api_url, json=body, headers={}) as resp:
            if resp.status != 200:
                out.error = resp.reason or ""
                return out
            data = await resp.json()
        out.latency = out.ttft = time.perf_counter() - out.start_time
        out.output_tokens = (data.get("usage") or {}).get("completion_tokens", 0)
        out.success = True
    except Exception as e:  # same contract as vLLM's functions: failures are data, not exceptions
        out.error = f"{type(e).__name__}: {e}"
    return out


def _error_kind(out: RequestFuncOutput, status: int | None) -> str:
    if status is not None and status != 200:
        return str(status)
    if "TimeoutError" in out.error:
        return "timeout"
    # vLLM stores a whole traceback; its last line starts with the exception's name.
    m = re.match(r"([\w.]*(Error|Exception))\b", out.error.strip().rsplit("\n", 1)[-1])
    return m.group(1).rsplit(".", 1)[-1] if m else "failed"


def _stats(values_s: list[float]) -> dict:
    ms = np.asarray(values_s, dtype=float) * 1000
    pct = {f"p{q}": float(np.percentile(ms, q)) if ms.size else None for q in (50, 95, 99)}
    return pct | {"mean": float(ms.mean()) if ms.size else None}


def summarize(outputs: list[tuple[RequestFuncOutput, str | None]], duration_s: float) -> dict:
    """`outputs`: (result, error kind or None when it succeeded) per request sent."""
    ok = [o for o, kind in outputs if kind is None]
    errors = dict(Counter(kind for _, kind in outputs if kind is not None))
    tokens = sum(o.output_tokens or 0 for o in ok)
    # Non-streamed results carry latency == ttft: no decode timing, so no TPOT rather than a fake 0.
    decode = [o for o in ok if (o.output_tokens or 0) > 1 and o.latency > o.ttft]
    dur = max(duration_s, 1e-9)
    return {"requests": len(outputs), "ok": len(ok), "errors": errors, "duration_s": duration_s,
            "request_throughput": len(ok) / dur, "output_tokens": tokens, "output_tokens_per_s": tokens / dur,
            "ttft_ms": _stats([o.ttft for o in ok]),
            "tpot_ms": _stats([(o.latency - o.ttft) / (o.output_tokens - 1) for o in decode]),
            "latency_ms": _stats([o.latency for o in ok])}


async def _run(base: str, model: str | None, api_key: str | None, concurrency: int, num_requests: int,
               duration_s: float | None, input_len, output_len, stream: bool, chat: bool, timeout_s: float,
               seed: int) -> dict:
    deadline = time.perf_counter() + timeout_s
    if model is None:
        from vllm.benchmarks.serve import get_first_model_from_server  # heavy import: only when needed
        auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        model, _ = await asyncio.wait_for(get_first_model_from_server(base, auth), timeout_s)
    api_url = f"{base}/v1/chat/completions" if chat else f"{base}/v1/completions"
    func = async_request_openai_chat_completions if chat else async_request_openai_completions
    rng, counter, results, inflight = random.Random(seed), itertools.count(), [], {}
    start = time.perf_counter()
    stop_issuing = min(start + (duration_s if duration_s is not None else float("inf")), deadline)

    async def worker(session: aiohttp.ClientSession):
        while (i := next(counter)) < num_requests and time.perf_counter() < stop_issuing:
            n_words = rng.randint(*input_len)
            rfi = RequestFuncInput(prompt=" ".join(rng.choices(WORDS, k=n_words)), api_url=api_url,
                                   prompt_len=n_words, output_len=rng.randint(*output_len), model=model,
                                   ignore_eos=True)  # so every request generates exactly max_tokens
            s = inflight[i] = _AuthStatusSession(session, api_key)
            out = await (func(rfi, s) if stream else _request_nonstream(rfi, s, chat))
            del inflight[i]
            results.append((out, None if out.success else _error_kind(out, s.status)))

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        tasks = [asyncio.create_task(worker(session)) for _ in range(concurrency)]
        _, pending = await asyncio.wait(tasks, timeout=max(deadline - time.perf_counter(), 0))
        for t in pending:  # the total budget ran out: whatever is still in flight counts as a timeout
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    results += [(RequestFuncOutput(error="timeout"), "timeout")] * len(inflight)
    return summarize(results, time.perf_counter() - start)


def run_loadtest(url: str, *, model: str | None = None, api_key: str | None = None, concurrency: int = 8,
                 num_requests: int = 64, duration_s: float | None = None, input_len: tuple[int, int] = (8, 32),
                 output_len: tuple[int, int] = (16, 32), stream: bool = True, chat: bool = False,
                 timeout_s: float = 300, allow_remote: bool = False, seed: int = 0) -> dict:
    """Closed loop: `concurrency` workers each send a request as soon as their last one ends, until
    `num_requests` (capped at 100000) were sent or `duration_s` passed; all stops at `timeout_s`."""
    base = _base_url(url, allow_remote)
    for name, (a, b) in (("input_len", input_len), ("output_len", output_len)):
        if not 1 <= a <= b:
            raise ValueError(f"{name} must be (A, B) with 1 <= A <= B, got {(a, b)}")
    if concurrency < 1 or num_requests < 1 or timeout_s <= 0:
        raise ValueError("concurrency, num_requests and timeout_s must be positive")
    result = asyncio.run(_run(base, model, api_key, concurrency, min(num_requests, MAX_REQUESTS), duration_s,
                              input_len, output_len, stream, chat, timeout_s, seed))
    return result | {"concurrency": concurrency, "stream": stream}


def format_report(result: dict) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    lines = [f"requests {result['requests']}  ok {result['ok']}  errors {result['errors'] or '-'}  "
             f"concurrency {result['concurrency']}  stream {result['stream']}",
             f"duration {result['duration_s']:.2f}s  {result['request_throughput']:.2f} req/s  "
             f"{result['output_tokens']} output tokens  {result['output_tokens_per_s']:.1f} tok/s",
             f"{'':<12}{'p50':>10}{'p95':>10}{'p99':>10}{'mean':>10}"]
    for key, label in (("ttft_ms", "TTFT ms"), ("tpot_ms", "TPOT ms"), ("latency_ms", "E2E ms")):
        lines.append(f"{label:<12}" + "".join(f"{fmt(result[key][p]):>10}" for p in ("p50", "p95", "p99", "mean")))
    return "\n".join(lines)


def _parse_range(text: str) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected A:B (two integers), got {text!r}") from None
    if not 1 <= a <= b:
        raise argparse.ArgumentTypeError(f"expected 1 <= A <= B, got {text!r}")
    return a, b


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="raylm loadtest", description=__doc__.split("\n")[0])
    ap.add_argument("url", metavar="URL", help="endpoint base, e.g. http://127.0.0.1:8000 (or .../v1)")
    ap.add_argument("--model", help="model id (default: first of GET /v1/models)")
    ap.add_argument("--api-key", default=client_key(),
                    help="bearer key (default $RAYLM_API_KEY, else the first of $RAYLM_API_KEYS)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--requests", type=int, default=64, help=f"requests to send (max {MAX_REQUESTS})")
    ap.add_argument("--duration", type=float, help="stop sending after this many seconds")
    ap.add_argument("--timeout", type=float, default=300, help="hard limit on the whole run, seconds")
    ap.add_argument("--input-len", type=_parse_range, default=(8, 32), help="prompt words, A:B")
    ap.add_argument("--output-len", type=_parse_range, default=(16, 32), help="max_tokens, A:B")
    ap.add_argument("--no-stream", action="store_true")
    ap.add_argument("--chat", action="store_true", help="use /v1/chat/completions")
    ap.add_argument("--allow-remote", action="store_true", help="allow a non-loopback host")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    a = ap.parse_args(argv)
    try:
        result = run_loadtest(a.url, model=a.model, api_key=a.api_key, concurrency=a.concurrency,
                              num_requests=a.requests, duration_s=a.duration, input_len=a.input_len,
                              output_len=a.output_len, stream=not a.no_stream, chat=a.chat, timeout_s=a.timeout,
                              allow_remote=a.allow_remote, seed=a.seed)
    except (ValueError, RuntimeError) as e:  # refused host, bad bounds, no model list: a usage error, exit 2
        ap.error(str(e))
    print(json.dumps(result, indent=2) if a.json else format_report(result))
    return result


if __name__ == "__main__":
    main()
