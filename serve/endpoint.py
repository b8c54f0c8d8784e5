"""The production endpoint: an OpenAI-compatible Ray Serve application around vLLM, autoscaled and guarded.

Built from the same `serve/app.py` `llm_config` as the RL rollout engine. Two shapes:

- **One model version (the default): the vLLM replica is the ingress.** Each replica serves vLLM's own OpenAI app
  (`LLMServer.__serve_build_asgi_app__`, Ray Serve LLM's "direct streaming" path) behind our `Guard` middleware,
  so a streamed token crosses no extra actor hop. With HAProxy (`RAY_SERVE_ENABLE_HA_PROXY=1` in the cluster's
  environment) HAProxy forwards HTTP straight to the replicas; without it Serve's proxy forwards to the replica
  (one hop, still no Ray Serve LLM ingress or response batching). See `raylm serve` for how the mode is chosen.
- **A/B or canary (`ab.versions`): an `ABIngress` in front of one deployment per version.** It draws a version
  per request by weight (or by a hash of a sticky header), rewrites `model`, and marks the answer with
  `x-raylm-version`. It is Ray Serve LLM's `OpenAiIngress` path (one more hop per streamed chunk): the price of a
  traffic split inside the application.

LoRA adapters are vLLM LoRA requests resolved on first use by a vLLM `LoRAResolver` that maps the request's
`model` to an adapter directory (an SFT run's `adapter` artifact, fetched to the node once).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import random
from typing import Literal

from pydantic import model_validator

from raylm.config import Section
from serve.app import llm_config
from serve.guard import VERSION_HEADER, Guard, load_api_keys
from serve.stats import Recorder, stats_actor

class Autoscaling(Section):
    min_replicas: int = 1
    max_replicas: int = 1
    initial_replicas: int | None = None
    target_ongoing_requests: float = 8.0  # per replica; Serve adds replicas when the average goes above
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 30.0
    look_back_period_s: float = 5.0

    @model_validator(mode="after")
    def _bounds(self):
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError(f"need 0 <= min_replicas ({self.min_replicas}) <= max_replicas ({self.max_replicas})"
                             " and max_replicas >= 1")
        return self


class LoraAdapters(Section):
    adapters: dict[str, str] = {}  # served name -> SFT run id, `latest/sft`, or an adapter directory
    max_loras: int = 4  # adapters resident in the engine at once (vLLM `max_loras`)
    max_lora_rank: int = 64


class Version(Section):
    name: str
    model: str  # run id, latest/STAGE or a local HF directory
    weight: float = 1.0


class ABSpec(Section):
    versions: list[Version]
    sticky_header: str | None = "x-user-id"  # same header value -> same version; absent -> weighted draw

    @model_validator(mode="after")
    def _check(self):
        if len(self.versions) < 2:
            raise ValueError("ab.versions needs at least two versions")
        if any(v.weight < 0 for v in self.versions) or sum(v.weight for v in self.versions) <= 0:
            raise ValueError("ab.versions weights must be >= 0 with a positive sum")
        if len({v.name for v in self.versions}) != len(self.versions):
            raise ValueError("ab.versions names must be unique")
        return self


class EndpointConfig(Section):
    model: str | None = None  # run id, latest/STAGE or a local HF directory (MODEL on the command line)
    model_id: str = "raylm"  # the name clients send as `model`
    version: str = "v1"  # answered in `x-raylm-version` (single-version endpoints)
    root: str = "runs"  # run store that run ids resolve in
    app_name: str = "raylm"
    accelerator: str = "cpu"
    engine_kwargs: dict = {"max_model_len": 256}
    host: str = "127.0.0.1"
    port: int = 8000
    ingress: Literal["auto", "haproxy", "proxy"] = "auto"
    allow_unauthenticated_network: bool = False  # HAProxy without API keys exposes replica ports
    autoscaling: Autoscaling = Autoscaling()
    max_ongoing_requests: int = 64  # per replica; beyond it requests queue in front
    stream_batching_interval_ms: int = 0  # Ray Serve LLM waits this long before its first flush (ray#59681)
    lora: LoraAdapters = LoraAdapters()
    ab: ABSpec | None = None
    api_keys_env: str = "RAYLM_API_KEYS"
    api_keys_file: str | None = None
    max_body_bytes: int = 1 << 20
    ready_timeout_s: float = 900

    @model_validator(mode="after")
    def _adapters_need_one_version(self):
        if self.ab is not None and self.lora.adapters:
            raise ValueError("lora.adapters are served on a single-version endpoint, not with ab.versions")
        return self


# ---------------------------------------------------------------- replica side
def _adapter_resolver(adapters: dict[str, str]):
    """A vLLM LoRA resolver over the configured adapters only (never an arbitrary path from a request)."""
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver

    from raylm.runs import local_path

    class RunAdapterResolver(LoRAResolver):
        async def resolve_lora(self, base_model_name: str, lora_name: str):
            uri = adapters.get(lora_name)
            if uri is None:
                return None
            # a remote adapter is fetched to this node once; off the event loop, which serves other requests
            path = await asyncio.to_thread(local_path, uri)
            return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=path)  # vLLM assigns the real id

    return RunAdapterResolver()


def _engine_summary(server) -> dict:
    """What seed 000 section 7 asks a serving report to show, read from the running engine."""
    try:
        cfg = server.engine._engine_client.vllm_config
        cache, sched, par = cfg.cache_config, cfg.scheduler_config, cfg.parallel_config
        blocks = getattr(cache, "num_gpu_blocks", None) or getattr(cache, "num_cpu_blocks", None)
        return {"max_model_len": cfg.model_config.max_model_len, "dtype": str(cfg.model_config.dtype),
                "kv_cache_tokens": (blocks or 0) * cache.block_size or None, "block_size": cache.block_size,
                "max_num_batched_tokens": sched.max_num_batched_tokens, "max_num_seqs": sched.max_num_seqs,
                "tensor_parallel_size": par.tensor_parallel_size, "pipeline_parallel_size": par.pipeline_parallel_size,
                "enable_lora": cfg.lora_config is not None}
    except Exception as exc:  # an engine without these fields must still serve
        return {"error": str(exc)[:200]}


def endpoint_server_cls():
    """`LLMServer` as the HTTP ingress, with the guard, /ready, /raylm/stats and LoRA resolution added."""
    from ray import serve
    from ray.llm._internal.serve.core.server.llm_server import LLMServer, _add_middleware_to_built_app

    class EndpointServer(LLMServer):
        async def __init__(self, llm_config, *, guard: dict, version: str, app_name: str,
                           adapters: dict[str, str] | None = None, **kwargs):
            if adapters:
                from vllm.lora.resolver import LoRAResolverRegistry

                LoRAResolverRegistry.register_resolver("raylm-run-adapters", _adapter_resolver(adapters))
            self._guard_opts, self._version, self._app_name = guard, version, app_name
            await super().__init__(llm_config, **kwargs)
            self._recorder = Recorder(app_name, serve.get_replica_context().deployment)
            await self._recorder.actor.set_engine.remote(_engine_summary(self))

        async def __serve_build_asgi_app__(self):
            from fastapi.responses import JSONResponse

            app = await super().__serve_build_asgi_app__()

            @app.get("/ready")
            async def ready():
                await self.check_health()  # raises (-> 5xx) while the engine is dead
                return {"ready": True, "model": self._llm_config.model_id, "version": self._version}

            @app.get("/raylm/stats")
            async def stats():
                return JSONResponse(await self._recorder.summary())

            _add_middleware_to_built_app(app, Guard, version=self._version, **self._guard_opts)
            return app

    return EndpointServer


def ab_ingress_cls():
    """Ray Serve LLM's `OpenAiIngress` with a weighted (optionally sticky) choice among versions."""
    from fastapi import Request
    from ray import serve
    from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress, init

    class ABIngress(OpenAiIngress):
        def __init__(self, llm_deployments, model_cards, *, public_id: str, versions: list[dict],
                     sticky_header: str | None, app_name: str, **kwargs):
            super().__init__(llm_deployments, model_cards, **kwargs)
            self._public, self._versions, self._sticky = public_id, versions, sticky_header
            self._weights = [v["weight"] for v in versions]
            self._recorder = Recorder(app_name, serve.get_replica_context().deployment)

        def _choose(self, request: Request) -> dict:
            key = request.headers.get(self._sticky) if self._sticky else None
            if key:
                u = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2 ** 64
            else:
                u = random.random()
            acc, total = 0.0, sum(self._weights)
            for v, w in zip(self._versions, self._weights):
                acc += w / total
                if u < acc:
                    return v
            return self._versions[-1]

        async def _process_llm_request(self, body, call_method, raw_request=None):
            version = None
            if body.model in (None, self._public):
                version = self._choose(raw_request)
                body.model = version["model_id"]
            else:
                version = next((v for v in self._versions if v["model_id"] == body.model), None)
            response = await super()._process_llm_request(body, call_method, raw_request)
            if version is not None:
                response.headers[VERSION_HEADER] = version["name"]
            return response

        async def models(self):
            listed = await super().models()
            card = listed.data[0].model_copy(update={"id": self._public})
            listed.data.insert(0, card)
            return listed

    app = init()

    @app.get("/ready")
    async def ready():
        return {"ready": True}

    @app.get("/raylm/stats")
    async def stats():
        from serve import stats as serve_stats

        return await serve_stats.RECORDER.summary()

    return ABIngress, app


# ---------------------------------------------------------------- builder
def _deployment_config(cfg: EndpointConfig) -> dict:
    a = cfg.autoscaling
    scaling = {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
               "target_ongoing_requests": a.target_ongoing_requests, "upscale_delay_s": a.upscale_delay_s,
               "downscale_delay_s": a.downscale_delay_s, "look_back_period_s": a.look_back_period_s}
    if a.initial_replicas is not None:
        scaling["initial_replicas"] = a.initial_replicas
    return {"autoscaling_config": scaling, "max_ongoing_requests": cfg.max_ongoing_requests}


def _llm_config(cfg: EndpointConfig, model_path: str, model_id: str, lora: bool):
    engine = dict(cfg.engine_kwargs)
    if lora:
        engine.setdefault("enable_lora", True)
        engine.setdefault("max_loras", cfg.lora.max_loras)
        engine.setdefault("max_lora_rank", cfg.lora.max_lora_rank)
    c = llm_config(model_path, model_id, accelerator=cfg.accelerator, engine_kwargs=engine,
                   deployment_config=_deployment_config(cfg))
    c.experimental_configs["stream_batching_interval_ms"] = cfg.stream_batching_interval_ms
    if lora:
        # vLLM asks its resolvers for an unknown `model` only with runtime LoRA updating on; the guard keeps the
        # load/unload routes this also opens unreachable.
        c.runtime_env = {**(c.runtime_env or {}),
                         "env_vars": {**((c.runtime_env or {}).get("env_vars") or {}),
                                      "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}}
    return c


def _guard_opts(cfg: EndpointConfig) -> dict:
    # The keys themselves are read on each replica from its environment or the file, never shipped in the
    # application's arguments (which Serve records) or a manifest.
    return {"api_keys_env": cfg.api_keys_env, "api_keys_file": cfg.api_keys_file, "max_body_bytes": cfg.max_body_bytes}


def build_endpoint(cfg: EndpointConfig, models: dict[str, str], adapters: dict[str, str] | None = None):
    """`models`: version name -> local model path (one entry without A/B). `adapters`: name -> adapter dir/URI."""
    from ray import serve
    from ray.llm._internal.serve.core.server.builder import build_llm_deployment
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
    from ray.llm._internal.serve.core.ingress.ingress import make_fastapi_ingress
    from ray.serve._private.constants import RAY_SERVE_ENABLE_HA_PROXY
    from ray.serve.config import RequestRouterConfig
    from ray.serve.experimental.round_robin_router import RoundRobinRouter

    stats_actor(cfg.app_name)
    server = endpoint_server_cls()
    if cfg.ab is None:
        (version, path), = models.items()
        c = _llm_config(cfg, path, cfg.model_id, bool(adapters))
        # Behind Serve's proxy the replica router is ours to choose: round robin. Under HAProxy, HAProxy balances
        # the ingress replicas itself and Ray Serve refuses a custom router there (it would be ignored); Serve
        # reads the mode from this process's environment, as this check does.
        router = {} if RAY_SERVE_ENABLE_HA_PROXY else {
            "request_router_config": RequestRouterConfig(request_router_class=RoundRobinRouter)}
        return build_llm_deployment(
            c, deployment_cls=serve.ingress()(server),
            bind_kwargs={"guard": _guard_opts(cfg), "version": version, "app_name": cfg.app_name,
                         "adapters": adapters or None},
            override_serve_options=router)
    versions, handles, cards = [], {}, {}
    for v in cfg.ab.versions:
        model_id = f"{cfg.model_id}@{v.name}"
        c = _llm_config(cfg, models[v.name], model_id, False)
        handles[model_id] = build_llm_deployment(
            c, name_prefix=f"{v.name}:", deployment_cls=server,
            bind_kwargs={"guard": _guard_opts(cfg), "version": v.name, "app_name": cfg.app_name})
        cards[model_id] = to_model_metadata(model_id, c)
        versions.append({"name": v.name, "model_id": model_id, "weight": v.weight})
    ingress_cls, app = ab_ingress_cls()
    app.add_middleware(Guard, **_guard_opts(cfg))  # instantiated in the replica, where it reads the keys
    ingress = make_fastapi_ingress(ingress_cls, app=app)
    return serve.deployment(ingress, max_ongoing_requests=1000, num_replicas=1,
                            ray_actor_options={"num_cpus": 0}).bind(
        handles, cards, public_id=cfg.model_id, versions=versions, sticky_header=cfg.ab.sticky_header,
        app_name=cfg.app_name)


def describe(cfg: EndpointConfig) -> dict:
    """The endpoint's settings without secrets, for the run manifest and the report."""
    d = json.loads(cfg.model_dump_json())
    d.pop("api_keys_file", None)
    d["auth"] = "api keys" if load_api_keys(cfg.api_keys_env, cfg.api_keys_file) else "none"
    return d

