"""The endpoint's parts that need no engine: the guard (on a real Starlette app over ASGI), configs, the ingress
choice, model/adapter resolution, the emitted Ray Serve config, and the metrics summary."""
from __future__ import annotations

import asyncio
import json

import pytest
import yaml

from raylm.config import ConfigError, load_config
from serve.endpoint import EndpointConfig
from serve.guard import Guard, load_api_keys
from serve.main import _check_adapter, check_port, emit_config, ingress_mode, resolve_all, resolve_model
from serve.stats import ServeStats, percentiles


class Rec:
    def __init__(self):
        self.rows, self.inflight = [], 0

    def record(self, *row):
        self.rows.append(row)


def downstream():
    """A real Starlette app standing in for vLLM's: echoes the JSON, streams, answers FastAPI-style errors."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def completions(request):
        body = await request.json()
        if body.get("model") == "gone":
            return JSONResponse({"detail": "model gone"}, status_code=404)
        if body.get("stream"):
            async def gen():
                for i in range(3):
                    yield f'data: {{"i": {i}}}\n\n'
                yield "data: [DONE]\n\n"
            return StreamingResponse(gen(), media_type="text/event-stream")
        return JSONResponse({"echo": body, "usage": {"completion_tokens": 5}})

    async def models(request):
        return JSONResponse({"data": [{"id": "m"}]})

    return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                             Route("/v1/models", models), Route("/health", models)])


def call(app, method, path, body=b"", headers=()):
    """One request through the ASGI app; returns (status, headers dict, body bytes)."""
    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers], "http_version": "1.1",
             "scheme": "http", "server": ("t", 80), "client": ("c", 1), "root_path": ""}
    sent, out = [False], {"status": None, "headers": {}, "body": b""}

    async def receive():
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)

    async def send(msg):
        if msg["type"] == "http.response.start":
            out["status"] = msg["status"]
            out["headers"] = {k.decode(): v.decode() for k, v in msg.get("headers", [])}
        else:
            out["body"] += msg.get("body", b"")

    asyncio.run(app(scope, receive, send))
    return out["status"], out["headers"], out["body"]


@pytest.fixture
def guarded(monkeypatch):
    monkeypatch.setenv("TEST_KEYS", "k-one, k-two")
    rec = Rec()
    return Guard(downstream(), api_keys_env="TEST_KEYS", version="v7", max_body_bytes=1000, recorder=rec), rec


AUTH = (("authorization", "Bearer k-two"),)


def test_guard_auth(guarded):
    app, rec = guarded
    for headers in ((), (("authorization", "Bearer nope"),), (("authorization", "k-one"),)):
        status, h, body = call(app, "GET", "/v1/models", headers=headers)
        assert status == 401 and json.loads(body)["error"]["code"] == 401 and h["www-authenticate"] == "Bearer"
    assert call(app, "GET", "/v1/models", headers=AUTH)[0] == 200
    assert call(app, "GET", "/health")[0] == 200  # probes are open


@pytest.mark.parametrize("raw,needle", [(b"", "empty"), (b"{bad", "not valid JSON"), (b'{"a": "\xff"}', "UTF-8"),
                                        (b"[1]", "JSON object"), (b"x" * 2000, "over the limit")])
def test_guard_rejects_bad_bodies_openai_style(guarded, raw, needle):
    app, rec = guarded
    status, h, body = call(app, "POST", "/v1/completions", raw, AUTH)
    err = json.loads(body)["error"]
    assert 400 <= status < 500 and needle in err["message"] and h["x-raylm-version"] == "v7"
    assert rec.rows[-1][1] == status  # rejected requests count in the error metrics


def test_guard_passes_streams_counts_tokens_and_rewrites_detail_errors(guarded):
    app, rec = guarded
    status, h, body = call(app, "POST", "/v1/completions", b'{"model": "m"}', AUTH)
    assert status == 200 and json.loads(body)["echo"] == {"model": "m"} and h["x-raylm-version"] == "v7"
    assert rec.rows[-1][:2] == ("v7", 200) and rec.rows[-1][4:] == (5, False)
    status, h, body = call(app, "POST", "/v1/completions", b'{"model": "m", "stream": true}', AUTH)
    assert status == 200 and body.count(b"data: ") == 4 and rec.rows[-1][4:] == (3, True)
    status, h, body = call(app, "POST", "/v1/completions", b'{"model": "gone"}', AUTH)
    assert status == 404 and json.loads(body) == {"error": {"message": "model gone", "type": "NotFoundError",
                                                            "param": None, "code": 404}}
    assert int(h["content-length"]) == len(body)
    assert call(app, "POST", "/v1/load_lora_adapter", b"{}", AUTH)[0] == 404  # admin routes are not reachable
    assert rec.inflight == 0


def test_api_keys_from_env_and_file(tmp_path, monkeypatch):
    f = tmp_path / "keys"
    f.write_text("# team keys\nk-file\n\n")
    monkeypatch.setenv("K", "a,b ,")
    assert load_api_keys("K", str(f)) == ["a", "b", "k-file"]


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="autoscaling"):
        load_config(EndpointConfig, {"autoscaling": {"min_replicas": 3, "max_replicas": 2}})
    with pytest.raises(ConfigError, match="ab"):
        load_config(EndpointConfig, {"ab": {"versions": [{"name": "a", "model": "x"}]}})
    with pytest.raises(ConfigError, match="autoscaling.target_ongoing"):
        load_config(EndpointConfig, {}, ["autoscaling.target_ongoing=3"])
    with pytest.raises(ConfigError, match="ingress"):
        load_config(EndpointConfig, {}, ["ingress=fast"])
    with pytest.raises(ConfigError, match="lora.adapters"):  # refused before anything starts
        load_config(EndpointConfig, {"ab": {"versions": [{"name": "a", "model": "x"}, {"name": "b", "model": "y"}]},
                                     "lora": {"adapters": {"s": "sft-1"}}})


def test_fast_path_is_the_default_and_never_exposes_an_unauthenticated_port(monkeypatch):
    monkeypatch.delenv("RAYLM_API_KEYS", raising=False)
    cfg = EndpointConfig()  # loopback, no keys: HAProxy with every listener on loopback
    assert ingress_mode(cfg, local=True) == "haproxy"
    assert ingress_mode(cfg, local=False) == "cluster"
    exposed = EndpointConfig(host="0.0.0.0")
    assert ingress_mode(exposed, local=True) == "proxy"  # no keys on the network: no stats pages open
    with pytest.raises(ConfigError, match="API keys"):
        ingress_mode(EndpointConfig(host="0.0.0.0", ingress="haproxy"), local=True)
    assert ingress_mode(EndpointConfig(host="0.0.0.0", ingress="haproxy", allow_unauthenticated_network=True),
                        local=True) == "haproxy"
    assert ingress_mode(EndpointConfig(ingress="proxy"), local=True) == "proxy"
    monkeypatch.setenv("RAYLM_API_KEYS", "k")
    assert ingress_mode(exposed, local=True) == "haproxy"


def test_haproxy_template_binds_its_pages_to_the_frontend_host():
    from ray.serve._private import haproxy, haproxy_templates

    from serve.haproxy_bind import bind_pages_to_frontend_host, bound_template

    t = bound_template(haproxy_templates.HAPROXY_CONFIG_TEMPLATE)  # the installed Ray's template still matches
    assert "bind *:" not in t and "bind :" not in t
    assert t.count("bind {{ config.frontend_host }}:") == 3  # frontend, stats, metrics
    with pytest.raises(RuntimeError, match="template changed"):
        bound_template("listen stats\n  bind *:8404\n")
    original = haproxy.HAPROXY_CONFIG_TEMPLATE
    try:
        bind_pages_to_frontend_host()
        bind_pages_to_frontend_host()  # idempotent: a worker may run it twice
        assert haproxy.HAPROXY_CONFIG_TEMPLATE == t
    finally:
        haproxy.HAPROXY_CONFIG_TEMPLATE = original


def test_port_reserved_by_haproxy_mode_is_refused():
    with pytest.raises(ConfigError, match="RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"):  # HAProxy mode's own port
        check_port(EndpointConfig(port=8500), "haproxy")
    check_port(EndpointConfig(port=8500), "proxy")


def test_a_local_haproxy_gets_its_own_free_ports_and_keeps_a_users(monkeypatch):
    """Two `raylm serve` on one machine: Ray's fixed stats/metrics/fallback ports collided (the first server's
    HAProxy stopped listening). Each local server now picks free ones; a port set by its variable stays."""
    import socket

    from serve.main import HAPROXY_PORTS, pick_haproxy_ports

    for name in HAPROXY_PORTS:
        monkeypatch.delenv(name, raising=False)
    cfg = EndpointConfig(host="127.0.0.1", port=18000)
    first = pick_haproxy_ports(cfg)
    assert set(first) == set(HAPROXY_PORTS) and len(set(first.values())) == 3
    assert str(cfg.port) not in first.values() and not set(first.values()) & {"8404", "9101", "8500"}
    for port in first.values():  # free when chosen
        with socket.socket() as s:
            s.bind(("127.0.0.1", int(port)))
    monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "8404")
    assert "RAY_SERVE_HAPROXY_STATS_PORT" not in pick_haproxy_ports(cfg)


def _model_dir(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def test_resolve_models_and_adapters(tmp_path):
    model = _model_dir(tmp_path / "m")
    assert resolve_model(str(model), str(tmp_path / "runs")) == str(model)
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_model(str(tmp_path), str(tmp_path / "runs"))
    with pytest.raises(ConfigError, match="neither a local directory nor a run"):
        resolve_model("sft-20990101-000000-abcd", str(tmp_path / "runs"))
    with pytest.raises(ConfigError, match="give MODEL"):
        resolve_all(EndpointConfig())
    adapter = tmp_path / "a"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "modules_to_save": ["lm_head"]}))
    with pytest.raises(ConfigError, match="modules_to_save"):
        _check_adapter("x", str(adapter))
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ConfigError, match="LoRA only"):
        _check_adapter("x", str(adapter))


def test_emitted_config_is_a_valid_serve_deploy_file(tmp_path, monkeypatch):
    from ray.serve.schema import ServeDeploySchema

    monkeypatch.setenv("RAYLM_API_KEYS", "sk-never-written")
    cfg = EndpointConfig(model=str(_model_dir(tmp_path / "m")), model_id="prod", port=8080)
    out = tmp_path / "serve.yaml"
    emit_config(cfg, {"v1": cfg.model}, {}, str(out))
    doc = yaml.safe_load(out.read_text())
    schema = ServeDeploySchema.model_validate(doc)
    app = schema.applications[0]
    assert app.import_path == "serve.main:app_builder" and app.args["config"]["model_id"] == "prod"
    assert "sk-never-written" not in out.read_text()  # keys stay in each node's environment


def test_stats_percentiles_and_summary():
    assert percentiles([]) == {}
    p = percentiles([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert (p["p50"], p["p95"], p["p99"]) == (50.0, 95.0, 99.0)
    stats = ServeStats.__ray_actor_class__("app")
    stats.push("r1", [("a", 1e12, 200, 0.01, 0.11, 11, True), ("a", 1e12, 401, 0, 0, 0, False),
                      ("b", 1e12, 200, 0.02, 0.02, 4, False)], inflight=3)
    s = stats._summarise(list(stats.samples["a"]), dict(stats.counts["a"]), 1e12 + 1)
    assert s["requests"] == 2 and s["errors"] == {"401": 1} and s["error_rate"] == 0.5
    assert s["tpot_ms"]["p50"] == 10.0 and s["ttft_ms"]["p50"] == 10.0
    b = stats._summarise(list(stats.samples["b"]), dict(stats.counts["b"]), 1e12 + 1)
    assert b["ttft_ms"] == {} and b["latency_ms"]["p50"] == 20.0  # TTFT only from streamed answers
