"""`serve.loadtest` without a model server: the summary math, the safety refusals, the CLI's argument errors,
and one end-to-end run against a tiny in-process fake OpenAI endpoint (auth and HTTP status bookkeeping)."""
import asyncio
import json
import threading

import numpy as np
import pytest
from aiohttp import web

from serve import loadtest
from serve.loadtest import RequestFuncOutput, format_report, main, run_loadtest, summarize


def _ok(ttft, latency, tokens):
    return RequestFuncOutput(success=True, ttft=ttft, latency=latency, output_tokens=tokens), None


def test_summarize_percentiles_tpot_throughput_and_errors():
    outs = [_ok(0.010, 0.110, 11), _ok(0.020, 0.220, 21), _ok(0.030, 0.330, 31), _ok(0.040, 0.440, 41),
            (RequestFuncOutput(error="Unauthorized"), "401"), (RequestFuncOutput(), "401"),
            (RequestFuncOutput(), "timeout")]
    r = summarize(outs, duration_s=2.0)
    assert (r["requests"], r["ok"], r["errors"]) == (7, 4, {"401": 2, "timeout": 1})
    assert r["output_tokens"] == 104 and r["output_tokens_per_s"] == pytest.approx(52.0)
    assert r["request_throughput"] == pytest.approx(2.0)
    ttft_ms = np.array([10.0, 20.0, 30.0, 40.0])
    for k, q in (("p50", 50), ("p95", 95), ("p99", 99)):
        assert r["ttft_ms"][k] == pytest.approx(np.percentile(ttft_ms, q))
    assert r["ttft_ms"]["mean"] == pytest.approx(25.0) and r["latency_ms"]["p50"] == pytest.approx(275.0)
    # every request decodes at 10 ms/token after the first: (latency - ttft) / (tokens - 1)
    assert all(v == pytest.approx(10.0) for v in r["tpot_ms"].values())
    table = format_report(r | {"concurrency": 4, "stream": True})
    assert "TTFT ms" in table and "401" in table and "52.0 tok/s" in table


def test_summarize_non_streaming_and_all_failed():
    r = summarize([_ok(0.5, 0.5, 20), _ok(0.7, 0.7, 20)], duration_s=1.0)
    assert r["tpot_ms"]["p50"] is None  # latency == ttft: no decode timing, not a fake 0
    assert r["latency_ms"]["mean"] == pytest.approx(600.0) and r["output_tokens"] == 40
    r = summarize([(RequestFuncOutput(), "ClientConnectorError")], duration_s=0.0)
    assert r["ok"] == 0 and r["ttft_ms"] == {"p50": None, "p95": None, "p99": None, "mean": None}
    assert "-" in format_report(r | {"concurrency": 1, "stream": True})


def test_error_kinds():
    kind = loadtest._error_kind
    assert kind(RequestFuncOutput(error="Unauthorized"), 401) == "401"
    tb = "Traceback (most recent call last):\n  File ...\n"
    assert kind(RequestFuncOutput(error=tb + "TimeoutError"), None) == "timeout"
    assert kind(RequestFuncOutput(error=tb + "aiohttp.client_exceptions.ClientConnectorError: refused"),
                None) == "ClientConnectorError"
    assert kind(RequestFuncOutput(error="Never received a valid chunk to calculate TTFT."), 200) == "failed"


@pytest.mark.parametrize("url", ["http://10.0.0.5:8000", "http://example.com/v1", "http://127.0.0.1.nip.io:80"])
def test_non_loopback_host_is_refused(url):
    with pytest.raises(ValueError, match="non-loopback"):
        run_loadtest(url, model="m")


def test_cli_refusal_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["http://10.0.0.5:8000", "--model", "m"])
    assert e.value.code == 2 and "--allow-remote" in capsys.readouterr().err


def test_url_forms():
    assert loadtest._base_url("http://127.0.0.1:8000/v1/", False) == "http://127.0.0.1:8000"
    assert loadtest._base_url("http://localhost:8000", False) == "http://localhost:8000"
    assert loadtest._base_url("http://[::1]:8000/v1", False) == "http://[::1]:8000"
    assert loadtest._base_url("https://example.com/v1", True) == "https://example.com"
    with pytest.raises(ValueError, match="http"):
        loadtest._base_url("127.0.0.1:8000", False)


@pytest.mark.parametrize("flag,value,msg", [("--input-len", "5", "A:B"), ("--output-len", "a:b", "A:B"),
                                             ("--output-len", "9:3", "A <= B"), ("--input-len", "0:4", "1 <= A")])
def test_range_argument_errors(flag, value, msg, capsys):
    with pytest.raises(SystemExit) as e:
        main(["http://127.0.0.1:1", flag, value])
    assert e.value.code == 2 and msg in capsys.readouterr().err
    assert loadtest._parse_range("4:16") == (4, 16)


@pytest.fixture
def fake_openai():
    """Streams `max_tokens` completion chunks to the bearer key "k"; 401 otherwise. Records the auth headers."""
    seen = []

    async def completions(request):
        seen.append(request.headers.get("Authorization"))
        if request.headers.get("Authorization") != "Bearer k":
            return web.json_response({"error": "bad key"}, status=401)
        body = await request.json()
        n = body["max_tokens"]
        if not body.get("stream"):
            return web.json_response({"choices": [{"text": "x" * n}], "usage": {"completion_tokens": n}})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(n):
            await resp.write(b'data: {"choices": [{"text": "x"}]}\n\n')
        await resp.write(f'data: {json.dumps({"choices": [], "usage": {"completion_tokens": n}})}\n\n'.encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    loop, ready, port = asyncio.new_event_loop(), threading.Event(), []
    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app)

    def serve():
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        port.append(site._server.sockets[0].getsockname()[1])
        ready.set()
        loop.run_forever()

    threading.Thread(target=serve, daemon=True).start()
    assert ready.wait(10)
    yield f"http://127.0.0.1:{port[0]}", seen
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)


def test_against_fake_endpoint(fake_openai, monkeypatch):
    url, seen = fake_openai
    r = run_loadtest(url, model="m", api_key="k", concurrency=3, num_requests=10, output_len=(4, 6))
    assert (r["requests"], r["ok"], r["errors"]) == (10, 10, {}) and 40 <= r["output_tokens"] <= 60
    assert r["tpot_ms"]["p50"] is not None and r["concurrency"] == 3
    r = run_loadtest(url, model="m", api_key="k", num_requests=5, output_len=(7, 7), stream=False)
    assert (r["ok"], r["output_tokens"], r["tpot_ms"]["p50"]) == (5, 35, None)
    # vLLM's request functions would send $OPENAI_API_KEY; only the key we were given may go out
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    seen.clear()
    r = run_loadtest(url + "/v1", model="m", api_key=None, num_requests=4)
    assert r["errors"] == {"401": 4} and set(seen) == {None}
    r = run_loadtest(url, model="m", api_key="wrong", num_requests=4, concurrency=2)
    assert r["errors"] == {"401": 4} and r["ok"] == 0
