"""`raylm serve` end to end: the command in a subprocess with its own local Ray cluster (HAProxy in front of the
vLLM replicas, API keys on), real HTTP from here. Covers streaming, the bad-input list, auth, multi-LoRA from SFT
runs, metrics, autoscaling up and down, a replica killed under load, and an A/B split.

Runs before the session cluster exists (`own_cluster`: conftest orders these first), with hand-made tiny models
so it needs no lifecycle run.
"""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.own_cluster]
REPO = Path(__file__).resolve().parents[2]
RAYLM = str(Path(sys.executable).parent / "raylm")
KEYS = ("sk-test-alpha-1f3e", "sk-test-beta-77aa")
J = {"Content-Type": "application/json"}


def _free_port() -> int:
    """A free port below the kernel's ephemeral range. A port from bind(0) is ephemeral, and the Ray cluster and
    vLLM engines that `raylm serve` starts before HAProxy binds it take ephemeral ports of their own (a CI run lost
    42435 that way: "cannot bind socket (Address already in use)"). Skips Ray's worker ports (10002-19999) and
    Serve's replica HTTP/gRPC ports (30000-31000, 40000-41000)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    candidates = list(range(20000, min(low, 30000)))
    random.shuffle(candidates)
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # an unusual ephemeral range: take what the kernel gives
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, body=None, key=KEYS[0], headers=None, raw: bytes | None = None, timeout=120):
    """(status, headers, parsed JSON or text)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    h = {**J, **(headers or {})}
    if key:
        h["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            text = resp.read().decode()
            status, hdrs = resp.status, dict(resp.headers)
    except urllib.error.HTTPError as err:
        text, status, hdrs = err.read().decode(errors="replace"), err.code, dict(err.headers)
    try:
        return status, hdrs, json.loads(text)
    except json.JSONDecodeError:
        return status, hdrs, text


# ---------------------------------------------------------------- fixtures
def _tiny_runs(root: Path, versions: int = 1, adapters: int = 0) -> tuple[list[str], list[str]]:
    """Hand-made `sft` runs: model runs (random init, seeds differ) and LoRA-adapter runs on the first model."""
    import torch
    from peft import LoraConfig, get_peft_model

    from raylm.config import ModelSpec
    from raylm.models import build_model, train_tokenizer
    from raylm.runs import RunStore

    store = RunStore(root)
    tok = train_tokenizer(["What is three plus four? The answer is seven. Name a colour: blue, red."] * 40, 300)
    model_runs, adapter_runs = [], []
    for seed in range(versions):
        with store.start_run("sft", {"note": f"hand-made tiny model, seed {seed}"}) as run:
            model = build_model(ModelSpec(overrides={"num_hidden_layers": 1}), tok, seed=seed)
            model.save_pretrained(root / run.id / "model")
            tok.save_pretrained(root / run.id / "model")
            run.add_artifact("model", "model", run.uri("model"))
        model_runs.append(run.id)
    for i in range(adapters):
        with store.start_run("sft", {"note": f"hand-made LoRA adapter {i}"}) as run:
            base = build_model(ModelSpec(overrides={"num_hidden_layers": 1}), tok, seed=0)
            torch.manual_seed(100 + i)  # after build_model, which seeds its own init
            peft = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"],
                                                   init_lora_weights=False))
            for name, p in peft.named_parameters():
                if "lora_B" in name:
                    p.data.normal_(0, 1.0)  # far from the base, so adapters answer differently
            peft.save_pretrained(root / run.id / "adapter")
            run.add_artifact("adapter", "adapter", run.uri("adapter"))
        adapter_runs.append(run.id)
    return model_runs, adapter_runs


class Server:
    """`raylm serve ...` in a subprocess; output to a file (checked for leaked keys)."""

    def __init__(self, args: list[str], log: Path):
        self.port = _free_port()
        self.log = log
        env = {**os.environ, "RAYLM_API_KEYS": ",".join(KEYS), "RAY_ADDRESS": "",
               # direct-ingress replicas drain 30 s before stopping by default: too slow for a test's scale-down
               "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}
        self.proc = subprocess.Popen([RAYLM, "serve", *args, f"port={self.port}"], cwd=REPO, env=env,
                                     stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 900
        while time.time() < deadline:
            if f"at {self.base}/v1" in log.read_text(errors="replace"):
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"raylm serve exited {self.proc.returncode}:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        self.stop()
        raise TimeoutError(f"raylm serve not ready:\n{log.read_text()[-4000:]}")

    def tree(self) -> dict:
        """pid -> (name, create time) of every process this server started (Ray, HAProxy, vLLM engines)."""
        from raylm.reaper import descendants

        return descendants(self.proc.pid)

    def stop(self) -> int:
        if self.proc.poll() is not None:  # killed by a test
            return self.proc.returncode
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return -9


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-runs")
    (model,), (a, b) = _tiny_runs(root, versions=1, adapters=2)
    server = Server([model, "--config", "serve/configs/tiny.yaml", f"root={root}",
                     f"lora.adapters.style-a={a}", f"lora.adapters.style-b={b}", "lora.max_lora_rank=8",
                     "engine_kwargs.gpu_memory_utilization=0.05", "autoscaling.max_replicas=2",
                     # downscale only after a replica's start-up time (~30 s here) has passed, or a replica
                     # replacing a killed one is downscaled while it starts
                     "autoscaling.target_ongoing_requests=2", "autoscaling.upscale_delay_s=2",
                     "autoscaling.downscale_delay_s=30", "autoscaling.look_back_period_s=5"],
                    root / "serve.log")
    yield server
    rc = server.stop()
    out = server.log.read_text(errors="replace")
    assert rc == 0, out[-3000:]  # SIGINT shut the application down cleanly
    assert not any(k in out for k in KEYS), "an API key appeared in the server's output"


def _stream(base, path, body, key=KEYS[0]) -> tuple[int, list[dict], dict]:
    req = urllib.request.Request(f"{base}{path}", data=json.dumps({**body, "stream": True}).encode(),
                                 headers={**J, "Authorization": f"Bearer {key}"}, method="POST")
    with urllib.request.urlopen(req, timeout=120) as resp:
        lines = [ln.decode().strip() for ln in resp]
        status, headers = resp.status, dict(resp.headers)
    data = [ln[len("data: "):] for ln in lines if ln.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return status, [json.loads(d) for d in data[:-1]], headers


# ---------------------------------------------------------------- tests
def test_openai_routes_streaming_and_not(endpoint):
    base = endpoint.base
    status, _, models = http("GET", f"{base}/v1/models")
    assert status == 200 and models["data"][0]["id"] == "raylm-tiny"
    assert http("GET", f"{base}/health", key=None)[0] == 200  # probes need no key
    assert http("GET", f"{base}/ready", key=None)[2]["ready"] is True
    body = {"model": "raylm-tiny", "prompt": "What is three plus four?", "max_tokens": 12, "ignore_eos": True}
    status, headers, comp = http("POST", f"{base}/v1/completions", body)
    assert status == 200 and comp["usage"]["completion_tokens"] == 12
    assert headers.get("x-raylm-version") == "v1"
    status, chunks, headers = _stream(base, "/v1/completions", body)
    assert status == 200 and headers.get("x-raylm-version") == "v1"
    assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["text"]) >= 6  # tokens arrive one by one
    chat = {"model": "raylm-tiny", "messages": [{"role": "user", "content": "Name a colour"}], "max_tokens": 8,
            "ignore_eos": True}
    status, _, reply = http("POST", f"{base}/v1/chat/completions", chat)
    assert status == 200 and reply["choices"][0]["message"]["role"] == "assistant"
    status, chunks, _ = _stream(base, "/v1/chat/completions", chat)
    assert status == 200 and chunks[0]["object"] == "chat.completion.chunk"


def test_auth_required_with_openai_errors(endpoint):
    url = f"{endpoint.base}/v1/completions"
    body = {"model": "raylm-tiny", "prompt": "hi", "max_tokens": 2}
    for key in (None, "sk-wrong", KEYS[0][:-1]):
        status, headers, err = http("POST", url, body, key=key)
        assert status == 401 and err["error"]["code"] == 401 and "API key" in err["error"]["message"], err
    assert http("GET", f"{endpoint.base}/v1/models", key=None)[0] == 401
    assert http("POST", url, body, key=KEYS[1])[0] == 200  # every configured key works


BAD_REQUESTS = {
    "malformed JSON": dict(raw=b'{"model": "raylm-tiny", "prompt": '),
    "empty body": dict(raw=b""),
    "non-UTF-8 bytes": dict(raw=b'{"model": "raylm-tiny", "prompt": "\xff\xfe", "max_tokens": 2}'),
    "JSON array": dict(body=[1, 2]),
    "unknown model": dict(body={"model": "no-such-model", "prompt": "hi", "max_tokens": 2}),
    "wrong type": dict(body={"model": "raylm-tiny", "prompt": "hi", "max_tokens": "many"}),
    "prompt over the context": dict(body={"model": "raylm-tiny", "prompt": "seven " * 400, "max_tokens": 2}),
    "negative max_tokens": dict(body={"model": "raylm-tiny", "prompt": "hi", "max_tokens": -5}),
    "huge max_tokens": dict(body={"model": "raylm-tiny", "prompt": "hi", "max_tokens": 10**9}),
    "negative temperature": dict(body={"model": "raylm-tiny", "prompt": "hi", "max_tokens": 2, "temperature": -1}),
    "top_p over 1": dict(body={"model": "raylm-tiny", "prompt": "hi", "max_tokens": 2, "top_p": 1.5}),
    "no prompt": dict(body={"model": "raylm-tiny", "max_tokens": 2}),
    "oversized body": dict(body={"model": "raylm-tiny", "prompt": "a" * (2 << 20)}),
    "admin route": dict(body={"lora_name": "x", "lora_path": "/etc"}, path="/v1/load_lora_adapter"),
}


@pytest.mark.parametrize("kind", list(BAD_REQUESTS))
def test_bad_request_gets_openai_4xx_and_server_stays_up(endpoint, kind):
    spec = dict(BAD_REQUESTS[kind])
    path = spec.pop("path", "/v1/completions")
    status, _, err = http("POST", f"{endpoint.base}{path}", **spec)
    assert 400 <= status < 500, (kind, status, err)
    assert isinstance(err, dict) and set(err) == {"error"} and err["error"]["message"], (kind, err)
    assert err["error"]["code"] in (status, str(status)) or isinstance(err["error"]["code"], (int, str))
    ok = http("POST", f"{endpoint.base}/v1/completions", {"model": "raylm-tiny", "prompt": "hi", "max_tokens": 2})
    assert ok[0] == 200


def test_lora_adapters_from_sft_runs_routed_by_model(endpoint):
    url = f"{endpoint.base}/v1/completions"
    answers = {}
    for model in ("raylm-tiny", "style-a", "style-b"):
        status, _, out = http("POST", url, {"model": model, "prompt": "What is three plus four?", "max_tokens": 12,
                                            "temperature": 0, "ignore_eos": True})
        assert status == 200 and out["model"] == model, out
        answers[model] = out["choices"][0]["text"]
    assert len(set(answers.values())) == 3, answers  # base and both adapters answer differently
    again = http("POST", url, {"model": "style-a", "prompt": "What is three plus four?", "max_tokens": 12,
                               "temperature": 0, "ignore_eos": True})[2]
    assert again["choices"][0]["text"] == answers["style-a"]  # loaded once, same weights on the next call
    status, _, err = http("POST", url, {"model": "style-c", "prompt": "hi", "max_tokens": 2})
    assert status == 404 and "style-c" in err["error"]["message"]


def _load(base: str, stop: threading.Event, results: list, concurrency: int, max_tokens: int = 64):
    """Bounded load: `concurrency` threads send streamed completions until `stop` (or 10 minutes)."""
    def worker():
        deadline = time.time() + 600
        while not stop.is_set() and time.time() < deadline:
            t0 = time.time()
            try:
                status, chunks, _ = _stream(base, "/v1/completions", {
                    "model": "raylm-tiny", "prompt": "count with me", "max_tokens": max_tokens, "ignore_eos": True})
                results.append((t0, time.time(), status))
            except Exception as exc:  # connection reset by a killed replica, 5xx
                results.append((t0, time.time(), getattr(exc, "code", type(exc).__name__)))
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    return threads


def _replicas(base: str) -> int:
    """Running replicas as the Serve controller reports them (-1 when the endpoint does not answer)."""
    try:
        status, _, stats = http("GET", f"{base}/raylm/stats", timeout=10)
    except OSError:
        return -1
    return sum(v for v in stats["replicas"].values() if isinstance(v, int)) if status == 200 else -1


def _wait(pred, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_autoscales_up_survives_a_replica_kill_and_scales_down(endpoint):
    """Load above the target (2 ongoing per replica) adds the second replica; a replica killed under load costs
    only the requests in flight on it; once the load stops the deployment returns to one replica."""
    base = endpoint.base
    assert _replicas(base) == 1
    stop, results = threading.Event(), []
    threads = _load(base, stop, results, concurrency=6)
    try:
        _wait(lambda: _replicas(base) == 2, 300, "a second replica under load")
        _wait(lambda: _replica_pids() and len(_replica_pids()) == 2, 60, "two replica processes")
        time.sleep(5)  # both serving
        victim = _replica_pids()[0]
        killed_at = time.time()
        os.kill(victim, signal.SIGKILL)
        _wait(lambda: len(_replica_pids()) == 2 and victim not in _replica_pids(), 300, "a replacement process")
        _wait(lambda: _replicas(base) == 2, 300, "the replacement replica running")
        recovered_at = time.time()
        time.sleep(10)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=180)
    failed = [r for r in results if r[2] != 200]
    print(f"killed at {killed_at:.1f}, recovered {recovered_at - killed_at:.1f}s later; {len(results)} requests, "
          f"failed: {[(round(r[0] - killed_at, 1), round(r[1] - killed_at, 1), r[2]) for r in failed]}")
    after = [r for r in results if r[0] > recovered_at]
    assert after and all(r[2] == 200 for r in after), after[:10]  # requests after recovery succeed
    # Only requests in flight at the kill (at most one per load thread), plus those routed to the dead replica
    # before HAProxy's next health check, may fail; everything else keeps being answered.
    assert all(r[0] <= killed_at + 15 for r in failed), failed
    assert len(failed) <= 12, failed
    ok_during = [r for r in results if killed_at < r[0] < recovered_at and r[2] == 200]
    assert ok_during, "the surviving replica answered nothing while the other was replaced"
    _wait(lambda: _replicas(base) == 1, 180, "scale-down to one replica after the load")
    status, _, stats = http("GET", f"{base}/raylm/stats")
    # every answered request is in the metrics, except what the killed replica had not shipped yet (<= 1 s)
    assert stats["total"]["requests"] >= 0.95 * (len(results) - len(failed))


def _replica_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "ServeReplica:raylm:EndpointServer"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_metrics_summary_and_cli(endpoint):
    base = endpoint.base
    http("POST", f"{base}/v1/completions", {"model": "raylm-tiny", "prompt": "hi", "max_tokens": 2}, key="bad")
    _stream(base, "/v1/completions", {"model": "raylm-tiny", "prompt": "hi", "max_tokens": 8, "ignore_eos": True})
    time.sleep(2.5)  # replicas ship samples every second
    status, _, stats = http("GET", f"{base}/raylm/stats")
    v1 = stats["versions"]["v1"]
    assert status == 200 and v1["requests"] > 10 and v1["errors"].get("401", 0) >= 1
    assert v1["ttft_ms"]["p50"] > 0 and v1["tpot_ms"]["p99"] >= v1["tpot_ms"]["p50"] > 0
    assert v1["latency_ms"]["p99"] >= v1["latency_ms"]["p95"] >= v1["latency_ms"]["p50"]
    assert stats["engine"]["max_model_len"] == 256 and stats["engine"]["enable_lora"] is True
    # the same requests in Prometheus format from the node's Ray metrics agent (exported every ~10 s)
    status_line = next(json.loads(ln) for ln in endpoint.log.read_text().splitlines() if '"prometheus_targets"' in ln)
    target = status_line["prometheus_targets"][0]

    def scraped():
        with urllib.request.urlopen(f"http://{target}/metrics", timeout=10) as resp:
            return [ln for ln in resp.read().decode().splitlines() if ln.startswith("ray_raylm_serve_requests")]
    _wait(lambda: any('status="401"' in ln for ln in scraped()), 60, "raylm_serve_requests in Prometheus")
    out = subprocess.run([RAYLM, "serve-stats", base, "--api-key", KEYS[0]], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "ttft p50" in out.stdout and "v1" in out.stdout, out.stderr
    load = subprocess.run([RAYLM, "loadtest", base, "--api-key", KEYS[0], "--requests", "16", "--concurrency", "4",
                           "--output-len", "8:8", "--json"], capture_output=True, text=True, timeout=300)
    result = json.loads(load.stdout[load.stdout.index("{"):])
    assert result["ok"] == 16 and result["output_tokens"] == 16 * 8 and result["ttft_ms"]["p50"] > 0


def _speaks_http(ip: str, port: int) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=3) as s:
            s.sendall(b"GET /v1/models HTTP/1.0\r\nHost: x\r\n\r\n")
            s.settimeout(5)
            return s.recv(16).startswith(b"HTTP/")
    except OSError:
        return False


def test_every_port_it_opens_is_on_the_host_given(endpoint):
    """HAProxy's frontend, stats and metrics pages and the replicas' HTTP ports of `raylm serve` on host 127.0.0.1
    stay on loopback: HAProxy listens nowhere else, and no replica port answers HTTP on the machine's own network
    address. (Ray's own gRPC and metrics ports are Ray's: they listen on every interface on any Ray node.)
    Defined before the A/B tests: their fixture stops this endpoint first."""
    import ipaddress

    import psutil

    assert endpoint.proc.poll() is None, "the endpoint was stopped (by the A/B fixture?) before this test"
    assert "ingress: HAProxy -> vLLM replicas" in endpoint.log.read_text(errors="replace")  # the status line
    tree = endpoint.tree()
    listening = [(c.pid, c.laddr) for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.pid in tree]
    haproxy = [addr for pid, addr in listening if tree[pid][0] == "haproxy"]
    assert endpoint.port in {a.port for a in haproxy} and len({a.port for a in haproxy}) >= 3, haproxy
    assert all(ipaddress.ip_address(a.ip).is_loopback for a in haproxy), haproxy  # frontend, stats, metrics
    def title(pid):
        try:
            return (psutil.Process(pid).cmdline() or [""])[0]
        except psutil.Error:  # ended since the listing (a Ray task worker)
            return ""

    replicas = {pid for pid in tree if title(pid).startswith("ray::ServeReplica")}
    assert replicas, "no Serve replica process found"
    own_ips = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
               if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback]
    exposed = [(ip, addr.port) for pid, addr in listening if pid in replicas and not ipaddress.ip_address(
        addr.ip).is_loopback for ip in own_ips if _speaks_http(ip, addr.port)]
    assert not exposed, f"replica HTTP ports reachable beyond loopback: {exposed}"
    assert any(_speaks_http("127.0.0.1", addr.port) for pid, addr in listening if pid in replicas)  # found them


@pytest.fixture(scope="module")
def ab_endpoint(tmp_path_factory, endpoint):
    """Started after the first endpoint's tests (it reuses nothing but the machine)."""
    endpoint.stop()
    root = tmp_path_factory.mktemp("ab-runs")
    (m1, m2), _ = _tiny_runs(root, versions=2)
    cfg = root / "ab.yaml"
    cfg.write_text(json.dumps({
        "model_id": "raylm-tiny", "engine_kwargs": {"max_model_len": 256, "gpu_memory_utilization": 0.05},
        "ab": {"versions": [{"name": "stable", "model": m1, "weight": 0.75},
                            {"name": "canary", "model": m2, "weight": 0.25}], "sticky_header": "x-user-id"}}))
    server = Server(["--config", str(cfg), f"root={root}"], root / "serve.log")
    yield server
    assert server.stop() in (0, -signal.SIGKILL)  # SIGINT shut it down cleanly, or the last test killed it


def test_ab_split_sticky_users_and_per_version_metrics(ab_endpoint):
    base, n = ab_endpoint.base, 200
    url = f"{base}/v1/completions"
    seen = {"stable": 0, "canary": 0}
    for _ in range(n):
        status, headers, out = http("POST", url, {"model": "raylm-tiny", "prompt": "hi", "max_tokens": 1})
        assert status == 200
        version = headers["x-raylm-version"]
        assert out["model"] == f"raylm-tiny@{version}"  # the body names the version too
        seen[version] += 1
    assert abs(seen["canary"] / n - 0.25) < 0.1, seen  # 3.3 standard deviations at n=200
    for user in ("ana", "bo", "cy"):
        versions = {http("POST", url, {"model": "raylm-tiny", "prompt": "hi", "max_tokens": 1},
                         headers={"x-user-id": user})[1]["x-raylm-version"] for _ in range(5)}
        assert len(versions) == 1, (user, versions)
    status, chunks, headers = _stream(base, "/v1/completions", {"model": "raylm-tiny", "prompt": "hi",
                                                                 "max_tokens": 4, "ignore_eos": True})
    assert status == 200 and headers["x-raylm-version"] in seen
    assert http("POST", url, {"model": "raylm-tiny", "prompt": "hi", "max_tokens": 1}, key=None)[0] == 401
    time.sleep(2.5)
    stats = http("GET", f"{base}/raylm/stats")[2]
    assert stats["versions"]["stable"]["requests"] + stats["versions"]["canary"]["requests"] >= n + 15
    assert stats["versions"]["canary"]["requests"] >= seen["canary"]


def test_sigkill_leaves_no_process_behind(ab_endpoint):
    """A supervisor's SIGKILL after its grace period: the Ray cluster, HAProxy and the vLLM engines it started
    are gone within a bounded time (they used to be orphaned, ~5.7 GB each). Runs last: it kills the server."""
    import psutil

    tree = ab_endpoint.tree()
    assert any("EngineCore" in name for name, _ in tree.values()), tree  # engines are there to be orphaned
    ab_endpoint.proc.send_signal(signal.SIGKILL)
    ab_endpoint.proc.wait(timeout=30)

    def alive():
        left = []
        for pid, (name, created) in tree.items():
            try:
                if psutil.Process(pid).create_time() == created:
                    left.append(f"{pid} {name}")
            except psutil.Error:
                pass
        return left

    deadline = time.time() + 60
    while alive() and time.time() < deadline:
        time.sleep(1)
    assert not alive(), f"left running 60 s after SIGKILL: {alive()}"
