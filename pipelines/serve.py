"""serve: the recorded smoke test of the production endpoint (`raylm serve`, `serve/endpoint.py`).

Deploys the same application `raylm serve` deploys, waits until `/v1/models` lists the model, sends one
completion, one chat request and one bad request (which must get a 4xx while the server stays up), records
latencies, answers, the engine's configuration and the endpoint's metrics summary, then shuts the application
down (or keeps it running with `keep_running=true`). For a long-running endpoint use `raylm serve MODEL`.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
import urllib.error
import urllib.request

from ray import serve

from raylm.config import StageConfig
from raylm.runs import RunError
from serve.endpoint import Autoscaling, EndpointConfig, build_endpoint
from serve.main import wait_ready
from serve.stats import drop_stats_actor

STAGE = "serve"
INPUTS = {"model": ("model",)}


class Config(StageConfig):
    model_id: str = "raylm"
    accelerator: str = "cpu"
    min_replicas: int = 1
    max_replicas: int = 1
    engine_kwargs: dict = {"max_model_len": 256}
    host: str = "127.0.0.1"
    port: int = 8000
    prompt: str = "What is 3 plus 4?"
    max_tokens: int = 16
    ready_timeout_s: float = 600
    keep_running: bool = False


def http(method: str, url: str, body: dict | None = None, timeout: float = 60) -> tuple[int, dict, float]:
    """(status, JSON body, seconds). 4xx/5xx are returned, not raised."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    t0 = time.time()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}"), time.time() - t0
    except urllib.error.HTTPError as err:
        raw = err.read()
        try:
            payload = json.loads(raw)
        except json.JSONDecodeError:
            payload = {"raw": raw.decode(errors="replace")[:500]}
        return err.code, payload, time.time() - t0


def stream_first_token(url: str, body: dict) -> tuple[float, int]:
    """(ms to the first streamed token, number of data chunks) for one streamed request."""
    req = urllib.request.Request(url, data=json.dumps({**body, "stream": True}).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    t0, first, chunks = time.time(), None, 0
    with urllib.request.urlopen(req, timeout=60) as resp:
        for line in resp:
            if line.startswith(b"data: {"):
                chunks += 1
                first = first or time.time()
    return round(1000 * ((first or time.time()) - t0), 1), chunks


def exercise(base: str, cfg: Config) -> dict:
    """One completion, one chat, one bad request; the server must still answer afterwards."""
    status, comp, t_comp = http("POST", f"{base}/v1/completions", {
        "model": cfg.model_id, "prompt": cfg.prompt, "max_tokens": cfg.max_tokens, "temperature": 0})
    if status != 200:
        raise RuntimeError(f"completion request failed with HTTP {status}: {comp}")
    status, chat, t_chat = http("POST", f"{base}/v1/chat/completions", {
        "model": cfg.model_id, "messages": [{"role": "user", "content": cfg.prompt}],
        "max_tokens": cfg.max_tokens, "temperature": 0})
    if status != 200:
        raise RuntimeError(f"chat request failed with HTTP {status}: {chat}")
    stream_ttft_ms, chunks = stream_first_token(f"{base}/v1/completions", {
        "model": cfg.model_id, "prompt": cfg.prompt, "max_tokens": cfg.max_tokens, "temperature": 0})
    bad_status, bad_body, _ = http("POST", f"{base}/v1/completions", {
        "model": cfg.model_id, "prompt": cfg.prompt, "max_tokens": -5})
    after_status, _, _ = http("GET", f"{base}/v1/models")
    return {
        "completion": comp["choices"][0]["text"], "completion_latency_ms": round(t_comp * 1000, 1),
        "completion_usage": comp.get("usage"),
        "chat": chat["choices"][0]["message"]["content"], "chat_latency_ms": round(t_chat * 1000, 1),
        "chat_usage": chat.get("usage"),
        "stream_ttft_ms": stream_ttft_ms, "stream_chunks": chunks,
        "bad_request_status": bad_status, "bad_request_error": str(bad_body)[:300],
        "status_after_bad_request": after_status,
    }


def _check_http(cfg: Config) -> None:
    """`serve.start` keeps an already running Serve instance as it is: one started for handles only (an `rl` run's
    rollouts, `proxy_location: Disabled`) or on another port would leave this endpoint unreachable, and the stage
    would wait `ready_timeout_s` for nothing. Say so at once."""
    import ray
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    location = ray.get(client._controller.get_proxy_location.remote())
    port = client.http_config.port
    if str(getattr(location, "value", location)) == "Disabled" or port != cfg.port:
        raise RunError(f"Ray Serve is already running on this cluster without an HTTP proxy on port {cfg.port} "
                       f"(proxies: {getattr(location, 'value', location)}, port {port}); the serve stage cannot "
                       "start its own. Stop it (`serve shutdown`) or set port to the running one.")


def body(run, inputs, cfg: Config) -> None:
    model_uri = inputs["model"].uri
    base = f"http://{cfg.host}:{cfg.port}"
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    _check_http(cfg)
    # The smoke test runs without API keys (it never reads $RAYLM_API_KEYS: the env name below is unset).
    endpoint = EndpointConfig(model_id=cfg.model_id, accelerator=cfg.accelerator, engine_kwargs=cfg.engine_kwargs,
                              host=cfg.host, port=cfg.port, api_keys_env="RAYLM_SMOKE_TEST_NO_KEYS",
                              autoscaling=Autoscaling(min_replicas=cfg.min_replicas, max_replicas=cfg.max_replicas))
    t0 = time.time()
    serve.run(build_endpoint(endpoint, {endpoint.version: model_uri}), name="raylm", route_prefix="/",
              blocking=False)
    try:
        ready_s = wait_ready(base, cfg.model_id, cfg.ready_timeout_s)
        deploy_s = time.time() - t0
        results = exercise(base, cfg)
        time.sleep(1.5)  # replicas ship their request samples every second
        _, stats, _ = http("GET", f"{base}/raylm/stats")
    finally:
        if not cfg.keep_running:
            serve.delete("raylm")
            serve.shutdown()
            drop_stats_actor(endpoint.app_name)
    record = {"url": base, "model_id": cfg.model_id, "model": model_uri, "engine": "vllm",
              "deploy_s": round(deploy_s, 1), "ready_wait_s": round(ready_s, 1), **results,
              "kept_running": cfg.keep_running, "engine_config": stats.get("engine", {}),
              "endpoint_stats": stats.get("total", {}), "replicas": stats.get("replicas", {})}
    local = run.local_dir("endpoint") or tempfile.mkdtemp()
    with open(os.path.join(local, "endpoint.json"), "w") as f:
        json.dump(record, f, indent=1)
    run.add_artifact("endpoint", "endpoint", run.upload(local, "endpoint"), meta={"url": base, "model_id": cfg.model_id})
    run.log_metrics(record)


if __name__ == "__main__":
    import sys

    from raylm.stage import cli_main

    cli_main(sys.modules[__name__])
