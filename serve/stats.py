"""Serving metrics: exported to Prometheus through Ray's metrics agent, and summarised per version on demand.

Each replica records every request twice, cheaply: into `ray.util.metrics` counters and histograms (Ray exports
them on every node's metrics port; Prometheus finds the nodes through the service-discovery file Ray writes,
`/tmp/ray/prom_metrics_service_discovery.json`), and into a small in-memory buffer that it ships every
`FLUSH_S` to one named `ServeStats` actor per application. That actor keeps a bounded window of samples, so any
replica can answer `GET /raylm/stats` (and `raylm serve-stats URL`) with percentiles over the whole
application rather than over whichever replica the load balancer picked.
"""
from __future__ import annotations

import asyncio
import json
import math
import time
import urllib.request
from collections import defaultdict, deque

import ray

NAMESPACE = "raylm"
FLUSH_S = 1.0
WINDOW = 20_000  # samples kept per version
RATE_WINDOW_S = 60.0
RECORDER = None  # this replica's Recorder (one Serve replica per process), used by serve.guard.Guard
LATENCY_BOUNDARIES_MS = [5, 10, 20, 40, 80, 160, 320, 640, 1280, 2560, 5120, 10240, 20480, 60000]


def stats_actor_name(app_name: str) -> str:
    return f"raylm-serve-stats-{app_name}"


def percentiles(values, qs=(50, 95, 99)) -> dict:
    """Nearest-rank percentiles in ms of values in seconds; {} for no values."""
    if not values:
        return {}
    xs = sorted(values)
    out = {f"p{q}": round(1000 * xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))], 2) for q in qs}
    out["mean"] = round(1000 * sum(xs) / len(xs), 2)
    return out


@ray.remote(num_cpus=0, max_restarts=-1)
class ServeStats:
    """Window of (time, status, ttft, latency, tokens, stream) per version, counters since start, replicas' in-flight."""

    def __init__(self, app_name: str):
        self.app_name = app_name
        self.samples: dict[str, deque] = defaultdict(lambda: deque(maxlen=WINDOW))
        self.counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.inflight: dict[str, tuple[float, int]] = {}
        self.engine: dict = {}

    def push(self, replica: str, samples: list, inflight: int) -> None:
        self.inflight[replica] = (time.time(), inflight)
        for version, t, status, ttft, latency, tokens, stream in samples:
            self.samples[version].append((t, status, ttft, latency, tokens, stream))
            self.counts[version][str(status)] += 1

    def set_engine(self, engine: dict) -> None:
        self.engine = engine

    def summary(self) -> dict:
        now = time.time()
        versions = {v: self._summarise(list(s), dict(self.counts[v]), now) for v, s in self.samples.items()}
        live = {r: n for r, (t, n) in self.inflight.items() if now - t < 10 * FLUSH_S}
        return {"app": self.app_name, "time": now, "versions": versions,
                "total": self._summarise([x for s in self.samples.values() for x in s],
                                         _merge([dict(c) for c in self.counts.values()]), now),
                "ongoing_requests": sum(live.values()), "replicas_reporting": len(live),
                "replicas": _replica_counts(self.app_name), "engine": self.engine}

    @staticmethod
    def _summarise(samples: list, counts: dict, now: float) -> dict:
        ok = [s for s in samples if s[1] < 400]
        # TTFT and time per output token only mean something for streamed answers
        streamed = [s for s in ok if s[5]]
        tpot = [(lat - ttft) / (tok - 1) for _, _, ttft, lat, tok, _ in streamed if tok > 1]
        recent = [s for s in ok if now - s[0] <= RATE_WINDOW_S]
        span = max(1e-9, min(RATE_WINDOW_S, now - min((s[0] for s in recent), default=now)))
        total = sum(counts.values())
        errors = {k: v for k, v in counts.items() if int(k) >= 400}
        return {"requests": total, "errors": errors, "error_rate": round(sum(errors.values()) / max(1, total), 4),
                "ttft_ms": percentiles([s[2] for s in streamed]), "tpot_ms": percentiles(tpot),
                "latency_ms": percentiles([s[3] for s in ok]),
                "output_tokens_per_s": round(sum(s[4] for s in recent) / span, 1) if recent else 0.0,
                "window_requests": len(samples)}


def _merge(dicts: list[dict]) -> dict:
    out: dict = defaultdict(int)
    for d in dicts:
        for k, v in d.items():
            out[k] += v
    return dict(out)


def _replica_counts(app_name: str) -> dict:
    """Running replicas per deployment of the application, from the Serve controller."""
    try:
        from ray import serve

        app = serve.status().applications.get(app_name)
        if app is None:
            return {}
        return {name: d.replica_states.get("RUNNING", 0) for name, d in app.deployments.items()}
    except Exception as exc:  # stats must not fail because the controller is busy
        return {"error": str(exc)[:200]}


def stats_actor(app_name: str):
    """The application's `ServeStats` actor, created if missing. `build_endpoint` creates it on the deploying
    driver: one created by a replica did not come back when that replica was killed (it stayed "restarting")."""
    return ServeStats.options(name=stats_actor_name(app_name), namespace=NAMESPACE, get_if_exists=True,
                              lifetime="detached").remote(app_name)


def drop_stats_actor(app_name: str) -> None:
    try:
        ray.kill(ray.get_actor(stats_actor_name(app_name), namespace=NAMESPACE))
    except ValueError:  # never created, or already gone
        pass


class Recorder:
    """Per replica: Ray metrics now, samples to the `ServeStats` actor every FLUSH_S."""

    def __init__(self, app_name: str, deployment: str):
        from ray.util import metrics

        self.app_name, self.replica = app_name, f"{deployment}:{ray.get_runtime_context().get_actor_id()}"
        tags = ("app", "version", "status")
        self.requests = metrics.Counter("raylm_serve_requests", "HTTP requests by version and status", tags)
        self.tokens = metrics.Counter("raylm_serve_output_tokens", "Output tokens by version", tags)
        hist = lambda name, desc: metrics.Histogram(name, desc, LATENCY_BOUNDARIES_MS, ("app", "version"))  # noqa: E731
        self.ttft = hist("raylm_serve_ttft_ms", "Time to first token (first body byte)")
        self.tpot = hist("raylm_serve_tpot_ms", "Time per output token after the first")
        self.latency = hist("raylm_serve_latency_ms", "End-to-end request latency")
        self.buffer: list = []
        self.inflight = 0
        self.actor = stats_actor(app_name)
        self._task = None
        global RECORDER
        RECORDER = self

    def record(self, version: str, status: int, ttft: float, latency: float, tokens: int, stream: bool) -> None:
        if self._task is None:  # started on first use, inside the replica's event loop
            self._task = asyncio.get_running_loop().create_task(self._flush_loop())
        self.buffer.append((version, time.time(), status, ttft, latency, tokens, stream))
        tags = {"app": self.app_name, "version": version}
        self.requests.inc(1, {**tags, "status": str(status)})
        if status < 400:
            self.tokens.inc(tokens, {**tags, "status": str(status)})
            self.latency.observe(1000 * latency, tags)
            if stream:
                self.ttft.observe(1000 * ttft, tags)
            if stream and tokens > 1:
                self.tpot.observe(1000 * (latency - ttft) / (tokens - 1), tags)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            batch, self.buffer = self.buffer, []
            try:
                await self.actor.push.remote(self.replica, batch, self.inflight)
            except Exception:  # the actor restarts (max_restarts=-1); keep recent samples for the next flush
                self.buffer = (batch + self.buffer)[-WINDOW:]

    async def summary(self) -> dict:
        return await self.actor.summary.remote()


def fetch(url: str, api_key: str | None = None, timeout: float = 10) -> dict:
    base = url.rstrip("/").removesuffix("/v1")
    req = urllib.request.Request(f"{base}/raylm/stats",
                                 headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def format_summary(s: dict) -> str:
    def row(name, v):
        t, p, lat = v.get("ttft_ms", {}), v.get("tpot_ms", {}), v.get("latency_ms", {})
        return (f"{name:<16} {v['requests']:>8} {v['error_rate']:>7.2%} {t.get('p50', '-'):>8} {t.get('p95', '-'):>8}"
                f" {t.get('p99', '-'):>8} {p.get('p50', '-'):>8} {lat.get('p50', '-'):>9} {lat.get('p95', '-'):>9}"
                f" {lat.get('p99', '-'):>9} {v['output_tokens_per_s']:>8}")
    lines = [f"app {s['app']}: replicas {s.get('replicas')}, ongoing requests {s.get('ongoing_requests')}",
             f"{'version':<16} {'requests':>8} {'errors':>7} {'ttft p50':>8} {'p95':>8} {'p99':>8} {'tpot p50':>8}"
             f" {'lat p50':>9} {'p95':>9} {'p99':>9} {'tok/s':>8}  (ms)"]
    lines += [row(v, d) for v, d in sorted(s["versions"].items())]
    if len(s["versions"]) > 1:
        lines.append(row("all", s["total"]))
    errors = {v: d["errors"] for v, d in s["versions"].items() if d["errors"]}
    if errors:
        lines.append(f"errors by status: {errors}")
    if s.get("engine"):
        lines.append("engine: " + ", ".join(f"{k}={v}" for k, v in s["engine"].items()))
    return "\n".join(lines)
