"""The RL rollout engine: N vLLM replicas as a Ray Serve application, sampled through deployment handles, with
weights updated in place after every learner step.

This file and `serve/endpoint.py` are the only ones that touch Ray Serve LLM internals (`LLMServer`,
`build_llm_deployment`, the replica broadcast helper, `OpenAiIngress`) and vLLM's engine client; a Ray upgrade that
moves them changes these two files only. The learner sees
`RolloutClient.sample(...)` and `RolloutClient.push_weights(...)`.

Weight flow (CPU and single-node GPU): the learner puts the state dict in the object store once and records it in a
small named `WeightStore` actor; every replica (a Ray actor, so it fetches the object on its own node) writes it to
a safetensors file in /dev/shm and hands the path to its vLLM workers (`serve/weight_ext.py`). Generation is paused
for the swap (`pause_generation(mode="wait", clear_cache=True)`: in-flight requests finish on the old weights, the
prefix cache holding old-weight KV is dropped), so no sample mixes two versions; each sample is tagged with the
version it came from. A replica that Serve starts to replace a dead one catches up from the `WeightStore` before it
answers its first request.
"""
from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
import uuid
import ray
from ray import serve

from serve.app import llm_config

log = logging.getLogger(__name__)
EXTENSION = "serve.weight_ext.WeightSyncExtension"
STORE_NAMESPACE = "raylm"


# ---------------------------------------------------------------- replica side
@ray.remote(num_cpus=0)
class WeightStore:
    """Holds the latest published weights (an object ref inside a list, so it is not resolved) and its version."""

    def __init__(self):
        self.refs: list = []
        self.version = 0

    def publish(self, refs: list, version: int) -> int:
        self.refs, self.version = refs, version
        return version

    def latest(self) -> tuple[list, int]:
        return self.refs, self.version


def _server_cls():
    from ray.llm._internal.serve.core.server.llm_server import LLMServer

    class RolloutServer(LLMServer):
        """LLMServer plus what RL needs: token-level sampling with log-probs, a weight version, in-place update."""

        async def __init__(self, llm_config, *, weight_store: str | None = None, **kwargs):
            self._weight_store = weight_store
            self.weight_version = 0
            self._updating = asyncio.Lock()
            self._inflight = 0
            self._idle = asyncio.Event()
            self._idle.set()
            await super().__init__(llm_config, **kwargs)
            await self._catch_up()

        async def _catch_up(self, expected: int = 0) -> None:
            """A fresh replica (or one that missed a broadcast while restarting) loads the latest weights."""
            if not self._weight_store:
                return
            store = ray.get_actor(self._weight_store, namespace=STORE_NAMESPACE)
            refs, version = await store.latest.remote()
            if refs and version > self.weight_version:
                await self.update_weights(refs, version)
            if self.weight_version < expected:
                raise RuntimeError(f"replica at weight version {self.weight_version}, learner expects {expected}")

        async def update_weights(self, weights: list, version: int) -> dict:
            """`weights`: [ObjectRef of a {name: tensor} state dict]. Returns timings for the learner's log."""
            async with self._updating:
                if version <= self.weight_version:
                    return {"version": self.weight_version, "skipped": True}
                t0 = time.perf_counter()
                state = await weights[0]
                t_fetch = time.perf_counter()
                from safetensors.torch import save_file

                shm = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
                path = os.path.join(shm, f"raylm-weights-{uuid.uuid4().hex}.safetensors")
                save_file({k: v.contiguous() for k, v in state.items()}, path)
                await self.engine.pause(mode="wait", clear_cache=True)
                try:
                    await self._idle.wait()
                    await self.collective_rpc("raylm_load_weights", args=(path,))
                    self.weight_version = version
                finally:
                    os.remove(path)
                    await self.engine.resume()
                t1 = time.perf_counter()
                nbytes = sum(v.numel() * v.element_size() for v in state.values())
                return {"version": version, "bytes": nbytes, "fetch_s": t_fetch - t0, "load_s": t1 - t_fetch}

        async def get_weight_version(self) -> int:
            return self.weight_version

        async def sample(self, prompts: list[list[int]], params: dict, expected_version: int | None = None) -> dict:
            """`prompts`: token ids. `params`: vLLM SamplingParams fields (n, max_tokens, temperature, ...).
            Returns {"version", "replica", "outputs": per prompt, n x {"ids", "logps", "finish"}}."""
            from vllm import SamplingParams
            from vllm.sampling_params import RequestOutputKind

            if expected_version is not None and self.weight_version < expected_version:
                await self._catch_up(expected_version)
            async with self._updating:  # no sample starts while weights are being swapped
                version = self.weight_version
                self._inflight += 1
                self._idle.clear()
            try:
                # FINAL_ONLY: one output holding all n samples (streamed outputs carry only the samples that
                # advanced); logprobs=0: the sampled token's log-prob only.
                sp = SamplingParams(**{**params, "logprobs": 0, "output_kind": RequestOutputKind.FINAL_ONLY})
                client = self.engine._engine_client

                async def one(ids: list[int]):
                    final = None
                    async for out in client.generate({"prompt_token_ids": ids}, sp, request_id=uuid.uuid4().hex):
                        final = out
                    return [{"ids": list(c.token_ids),
                             "logps": [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)],
                             "finish": c.finish_reason} for c in final.outputs]

                outputs = await asyncio.gather(*(one(p) for p in prompts))
            finally:
                self._inflight -= 1
                if self._inflight == 0:
                    self._idle.set()
            if self.weight_version != version:  # cannot happen while the gate above holds; checked, not assumed
                raise RuntimeError(f"weights changed during sampling ({version} -> {self.weight_version})")
            return {"version": version, "replica": serve.get_replica_context().replica_id.unique_id,
                    "outputs": outputs}

    return RolloutServer


def build_rollout_app(model_path: str, model_id: str, weight_store: str, *, accelerator: str = "cpu",
                      replicas: int = 1, engine_kwargs: dict | None = None, replica_resources: dict | None = None):
    """The rollout application: `replicas` vLLM replicas with the weight-sync extension, no HTTP route."""
    from ray.llm._internal.serve.core.server.builder import build_llm_deployment

    engine = {**(engine_kwargs or {}), "worker_extension_cls": EXTENSION}
    deployment = {"ray_actor_options": {"resources": replica_resources}} if replica_resources else {}
    cfg = llm_config(model_path, model_id, accelerator=accelerator, min_replicas=replicas, max_replicas=replicas,
                     engine_kwargs=engine, deployment_config=deployment)
    return build_llm_deployment(cfg, deployment_cls=_server_cls(), name_prefix="Rollout:",
                                bind_kwargs={"weight_store": weight_store})


def deployment_name(model_id: str) -> str:
    return "Rollout:" + model_id.replace("/", "--").replace(".", "_")


# ---------------------------------------------------------------- learner side
RETRYABLE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, RuntimeError, TimeoutError)


class RolloutClient:
    """What the learner holds: batched sampling over the replicas and in-place weight pushes.

    Prompts are split into chunks sent concurrently through the deployment handle, so Serve's router spreads them
    over the replicas. A chunk whose replica dies is retried (up to `max_retries`) on the live replicas while Serve
    replaces the dead one; every returned sample carries the weight version it came from, and a sample from any
    version other than the expected one is refused.
    """

    def __init__(self, app_name: str, model_id: str, weight_store: str, chunk_size: int = 16,
                 max_retries: int = 8, timeout_s: float = 600):
        self.handle = serve.get_deployment_handle(deployment_name(model_id), app_name)
        self.store = ray.get_actor(weight_store, namespace=STORE_NAMESPACE)
        self.chunk_size, self.max_retries, self.timeout_s = chunk_size, max_retries, timeout_s
        self.retries = 0  # chunks re-sent after a replica failure (logged by the learner)

    def submit(self, prompts: list[list[int]], params: dict, expected_version: int) -> list:
        """Start sampling without waiting (for the one-step-stale mode); collect with `collect`."""
        chunks = [prompts[i: i + self.chunk_size] for i in range(0, len(prompts), self.chunk_size)]
        return [(c, self.handle.sample.remote(c, params, expected_version)) for c in chunks]

    def collect(self, pending: list, params: dict, expected_version: int,
                max_version: int | None = None) -> list[list[dict]]:
        """Per prompt, n samples {"ids", "logps", "finish", "version", "replica"}; retries failed chunks.

        Samples must come from `expected_version` (or, for requests overlapping a push, up to `max_version`)."""
        max_version = expected_version if max_version is None else max_version
        chunks, resps = [c for c, _ in pending], [r for _, r in pending]
        results: list[dict | None] = [None] * len(pending)
        todo = list(range(len(pending)))
        for attempt in range(self.max_retries + 1):
            failed = []
            for i in todo:
                try:
                    results[i] = resps[i].result(timeout_s=self.timeout_s)
                except Exception as exc:  # noqa: BLE001 - a dead actor, a dead engine inside a live actor, ...
                    failed.append((i, exc))
            if not failed:
                break
            first = failed[0][1]
            if attempt == self.max_retries:
                raise RuntimeError(f"{len(failed)} rollout chunk(s) failed after {attempt} retries: {first}") from first
            # re-send every failed chunk at once: one by one, each waited for its own answer (20 chunks lost with a
            # replica took 60 s to recover instead of one batch's time)
            self.retries += len(failed)
            log.warning("%d rollout chunk(s) failed (%s); re-sending them to the live replicas", len(failed),
                        type(first).__name__)
            # backoff up to ~2 minutes in all: long enough for Serve to replace a replica whose engine died
            time.sleep(min(2 ** attempt, 30))
            for i, _ in failed:
                resps[i] = self.handle.sample.remote(chunks[i], params, expected_version)
            todo = [i for i, _ in failed]
        out: list[dict] = []
        for res in results:
            if not expected_version <= res["version"] <= max_version:
                raise RuntimeError(f"sample from weight version {res['version']}, expected {expected_version}"
                                   + (f"..{max_version}" if max_version != expected_version else ""))
            for samples in res["outputs"]:
                out.append([{**s, "version": res["version"], "replica": res["replica"]} for s in samples])
        return out

    def sample(self, prompts: list[list[int]], params: dict, expected_version: int) -> list[list[dict]]:
        return self.collect(self.submit(prompts, params, expected_version), params, expected_version)

    def push_weights(self, state: dict, version: int) -> dict:
        """Put `state` in the object store once, publish it, and have every live replica load it in place."""
        from ray.llm._internal.serve.utils.broadcast import broadcast

        t0 = time.perf_counter()
        ref = ray.put(state)
        ray.get(self.store.publish.remote([ref], version))
        t_put = time.perf_counter()
        try:
            replicas = broadcast(self.handle, "update_weights", kwargs={"weights": [ref], "version": version})
        except RETRYABLE as exc:  # a replica died: its replacement catches up from the WeightStore
            log.warning("weight broadcast hit a dead replica (%s); it will catch up on restart", exc)
            replicas = []
        return {"put_s": t_put - t0, "sync_s": time.perf_counter() - t0, "replicas": replicas}

    def versions(self) -> list[int]:
        from ray.llm._internal.serve.utils.broadcast import broadcast

        return broadcast(self.handle, "get_weight_version")


def serve_running() -> bool:
    """Whether a Serve controller is up (without starting one, which `serve.status()` would do)."""
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return True
    except ValueError:
        return False


def create_weight_store(name: str):
    return WeightStore.options(name=name, namespace=STORE_NAMESPACE, lifetime=None).remote()

