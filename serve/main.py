"""`raylm serve MODEL`: deploy the production endpoint, print where it answers, serve until interrupted.

Also `--emit-config out.yaml`: the same application as a Ray Serve config file for `serve deploy` on a cluster
(its `import_path` is `serve.main:app_builder`, so the cluster builds it with this same code).

Ingress mode. Ray Serve's Python proxy costs a hop per streamed chunk (1.7-8.8x bare vLLM's time to first token
here); with HAProxy (`RAY_SERVE_ENABLE_HA_PROXY=1`, set in the cluster's environment before it starts) HTTP goes
from HAProxy straight to the vLLM replicas, at parity with bare vLLM. So `auto` picks HAProxy for the local cluster
`raylm serve` starts, and binds everything it opens to `host` (loopback by default): the frontend, the replicas'
HTTP ports (Serve binds them to `http_options.host`), Serve's fallback proxy, and HAProxy's stats and metrics pages
(Ray hard-codes those to all interfaces; `serve.haproxy_bind` rewrites its template). Only a non-loopback `host`
without API keys falls back to Serve's proxy (the pages would be open to the network). On an existing cluster the
mode is the cluster's own (cluster.yaml sets it).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from raylm.config import ConfigError, load_config
from raylm.runs import RunError, RunStore
from serve.endpoint import EndpointConfig, build_endpoint, describe
from serve.guard import client_key, load_api_keys
from serve.haproxy_bind import HOOK as BIND_HOOK

HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}


def resolve_model(ref: str, root: str, role: str = "model", kind: str = "model") -> str:
    """A run id / `latest/STAGE` (its `model` or `adapter` artifact) or a local directory -> a path or URI."""
    marker = "config.json" if kind == "model" else "adapter_config.json"
    if os.path.isdir(ref):
        if not os.path.isfile(os.path.join(ref, marker)):
            raise ConfigError(f"{role}: directory {ref} has no {marker} (not a Hugging Face "
                              f"{'model' if kind == 'model' else 'PEFT adapter'} directory)")
        return os.path.abspath(ref)
    try:
        return RunStore(root).resolve(role, ref, (kind,)).uri
    except (RunError, FileNotFoundError) as exc:
        raise ConfigError(f"{role}: {ref!r} is neither a local directory nor a run with a {kind} artifact in "
                          f"{root} ({exc})") from None


def resolve_all(cfg: EndpointConfig) -> tuple[dict[str, str], dict[str, str]]:
    """(version -> model path, adapter name -> adapter path), every reference checked before anything starts."""
    if cfg.ab is not None:
        models = {v.name: resolve_model(v.model, cfg.root, f"ab.versions.{v.name}.model") for v in cfg.ab.versions}
    elif cfg.model:
        models = {cfg.version: resolve_model(cfg.model, cfg.root)}
    else:
        raise ConfigError("model: give MODEL (a run id, latest/STAGE or a local HF directory) or ab.versions")
    adapters = {name: resolve_model(ref, cfg.root, f"lora.adapters.{name}", "adapter")
                for name, ref in cfg.lora.adapters.items()}
    for name, path in adapters.items():
        _check_adapter(name, path)
    return models, adapters


def _check_adapter(name: str, path: str) -> None:
    """vLLM serves LoRA weights only; an adapter that also trained whole modules needs its merged model."""
    from raylm.runs import local_path

    with open(os.path.join(local_path(path), "adapter_config.json")) as f:
        ac = json.load(f)
    if ac.get("peft_type") != "LORA":
        raise ConfigError(f"lora.adapters.{name}: {ac.get('peft_type')} adapters cannot be served by vLLM (LoRA only)")
    if ac.get("modules_to_save"):
        raise ConfigError(f"lora.adapters.{name}: the adapter also trains {ac['modules_to_save']} in full "
                          "(PEFT modules_to_save), which vLLM cannot serve as a LoRA; serve that SFT run's merged "
                          "model instead, or train the adapter with lora.modules_to_save=[]")


def is_loopback(host: str) -> bool:
    return host == "localhost" or host == "::1" or host.startswith("127.")


def ingress_mode(cfg: EndpointConfig, local: bool) -> str:
    if not local:
        return "cluster"
    guarded = bool(load_api_keys(cfg.api_keys_env, cfg.api_keys_file)) or cfg.allow_unauthenticated_network
    exposed = not is_loopback(cfg.host)
    if cfg.ingress == "haproxy" and exposed and not guarded:
        raise ConfigError(f"ingress: haproxy on host {cfg.host} opens HAProxy's stats and metrics pages and every "
                          f"replica's port to the network; configure API keys (${cfg.api_keys_env} or "
                          "api_keys_file), serve on host=127.0.0.1, or set allow_unauthenticated_network=true")
    if cfg.ingress != "auto":
        return cfg.ingress
    return "haproxy" if guarded or not exposed else "proxy"


INGRESS_WORDS = {"haproxy": "HAProxy -> vLLM replicas (fast path)",
                 "proxy": "Ray Serve proxy -> vLLM replicas (one more hop per chunk)",
                 "cluster": "the cluster's own ingress"}


HAPROXY_PORTS = {"RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": 8500, "RAY_SERVE_HAPROXY_STATS_PORT": 8404,
                 "RAY_SERVE_HAPROXY_METRICS_PORT": 9101}


def haproxy_reserved_ports() -> dict[int, str]:
    """Ports Ray Serve's HAProxy mode takes for itself on every node (each overridable by its variable)."""
    return {int(os.environ.get(n, d)): n for n, d in HAPROXY_PORTS.items()}


def pick_haproxy_ports(cfg: EndpointConfig) -> dict[str, str]:
    """Free ports for HAProxy's stats and metrics pages and Serve's fallback proxy on a cluster this process starts.
    Ray's fixed defaults made a second `raylm serve` on the same machine take over the first one's stats port, and
    the first one's HAProxy stopped listening at its next reload. A port the user set by its variable is kept."""
    import socket

    chosen, held = {}, []
    try:
        for name in HAPROXY_PORTS:
            if name in os.environ:
                continue
            while True:  # hold each socket until all are chosen, so the three differ
                s = socket.socket()
                s.bind((cfg.host, 0))
                held.append(s)
                if s.getsockname()[1] != cfg.port:
                    break
            chosen[name] = str(s.getsockname()[1])
    finally:
        for s in held:
            s.close()
    return chosen


def check_port(cfg: EndpointConfig, mode: str) -> None:
    reserved = haproxy_reserved_ports() if mode in ("haproxy", "cluster") else {}
    if cfg.port in reserved:
        raise ConfigError(f"port: {cfg.port} is taken by Ray Serve's HAProxy mode ({reserved[cfg.port]}); "
                          "choose another port")


def wait_ready(base: str, model_id: str, timeout: float, api_key: str | None = None) -> float:
    t0 = time.time()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    while time.time() - t0 < timeout:
        try:
            req = urllib.request.Request(f"{base}/v1/models", headers=headers)
            with urllib.request.urlopen(req, timeout=5) as resp:
                if any(m.get("id") == model_id for m in json.loads(resp.read()).get("data", [])):
                    return time.time() - t0
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError, OSError):
            pass
        time.sleep(1)
    raise TimeoutError(f"endpoint {base} did not list model {model_id!r} within {timeout:.0f}s")


def deploy(cfg: EndpointConfig, models: dict[str, str], adapters: dict[str, str]) -> float:
    """Deploy on the connected cluster; returns seconds until `/v1/models` lists the model."""
    from ray import serve

    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_endpoint(cfg, models, adapters), name=cfg.app_name, route_prefix="/", blocking=False)
    return wait_ready(f"http://{_client_host(cfg.host)}:{cfg.port}", cfg.model_id, cfg.ready_timeout_s,
                      client_key(cfg.api_keys_env, cfg.api_keys_file))


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::") else host


def shutdown(cfg: EndpointConfig) -> None:
    from ray import serve

    from serve.stats import drop_stats_actor

    try:
        serve.delete(cfg.app_name)
        serve.shutdown()
    finally:
        drop_stats_actor(cfg.app_name)


def app_builder(args: dict):
    """Ray Serve application builder for `serve deploy` (see `--emit-config`)."""
    cfg = load_config(EndpointConfig, args["config"])
    return build_endpoint(cfg, args["models"], args.get("adapters") or None)


def emit_config(cfg: EndpointConfig, models: dict, adapters: dict, out: str) -> None:
    doc = {
        "proxy_location": "EveryNode",
        "http_options": {"host": cfg.host, "port": cfg.port},
        "applications": [{
            "name": cfg.app_name, "route_prefix": "/", "import_path": "serve.main:app_builder",
            # the cluster's nodes have the project installed (cluster.yaml); keys come from each node's environment
            "runtime_env": {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
            "args": {"config": json.loads(cfg.model_dump_json()), "models": models, "adapters": adapters},
        }],
    }
    Path(out).write_text(yaml.safe_dump(doc, sort_keys=False))


def main(model: str | None, config: str | None, overrides: list[str], emit: str | None = None) -> None:
    import ray

    from raylm.cluster import init_ray

    sets = ([f"model={model}"] if model else []) + list(overrides)
    cfg = load_config(EndpointConfig, config, sets)
    models, adapters = resolve_all(cfg)
    if emit:
        emit_config(cfg, models, adapters, emit)
        print(f"wrote Ray Serve config for {cfg.app_name} to {emit} (deploy with: serve deploy {emit})")
        return
    local = not os.environ.get("RAY_ADDRESS")
    mode = ingress_mode(cfg, local)
    if mode == "haproxy":
        # inherited by the local cluster's processes started below
        os.environ.update({**HAPROXY_ENV, **pick_haproxy_ports(cfg)})
    check_port(cfg, mode)
    if local:
        # An engine dies with its replica: the raylet reaps a dead worker's orphans (a replica killed by Serve or a
        # crash left its EngineCore, ~5.7 GB). Only here: Ray then ignores SIGCHLD in this process, so a
        # `subprocess.run` in it would see exit status 0 whatever the child returned (seen in a test driver).
        os.environ.setdefault("RAY_kill_child_processes_on_worker_exit_with_raylet_subreaper", "true")
    init_ray(setup_hook=BIND_HOOK if mode == "haproxy" else None)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        ready_s = deploy(cfg, models, adapters)
        url = f"http://{_client_host(cfg.host)}:{cfg.port}/v1"
        print(f"serving {cfg.model_id} at {url} (ingress: {INGRESS_WORDS[mode]}; "
              f"auth: {'api keys' if client_key(cfg.api_keys_env, cfg.api_keys_file) else 'none'})", flush=True)
        # Prometheus targets: each node's metrics agent (also in /tmp/ray/prom_metrics_service_discovery.json)
        targets = [f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}" for n in ray.nodes() if n.get("Alive")]
        haproxy_ports = {n: os.environ[n] for n in HAPROXY_PORTS if mode == "haproxy"}
        print(json.dumps({"ready_s": round(ready_s, 1), "ingress": mode, "versions": list(models),
                          "adapters": list(adapters), "prometheus_targets": targets, "haproxy_ports": haproxy_ports,
                          "settings": describe(cfg)}),
              file=sys.stderr, flush=True)
        while not stop.wait(1.0):
            pass
        print("shutting down", file=sys.stderr, flush=True)
    finally:
        shutdown(cfg)
        ray.shutdown()
