"""Build Ray Serve LLM applications for a model directory with `ray.serve.llm` (vLLM engine).

One builder, two uses: the production endpoint (`serve/endpoint.py`: `raylm serve` and the `serve` stage) and the RL
rollout engine (`serve/rollout.py`, same `llm_config` plus a weight-sync worker extension). The same code serves a tiny CPU model
in tests and a real checkpoint on GPU nodes: only `accelerator` and the engine kwargs change. On CPU, vLLM's
`gpu_memory_utilization` is the fraction of host memory reserved for the KV cache (the default 0.92 fails on small
machines, see FACTS.md).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray.serve.llm import LLMConfig

CPU_ENGINE_DEFAULTS = {"dtype": "float32", "enforce_eager": True, "gpu_memory_utilization": 0.2}


def model_source(model_path: str):
    """A local directory as is; a model in a remote run store (s3://, gs://) as Ray Serve LLM's cloud mirror, so
    each replica downloads it on its own node (untested here: no cloud storage on this machine)."""
    if "://" in model_path and not model_path.startswith("file://"):
        return {"bucket_uri": model_path}
    return model_path.removeprefix("file://")


def llm_config(model_path: str, model_id: str, accelerator: str = "cpu", min_replicas: int = 1,
               max_replicas: int = 1, engine_kwargs: dict[str, Any] | None = None,
               deployment_config: dict[str, Any] | None = None) -> LLMConfig:
    """`deployment_config` adds Serve options (e.g. `ray_actor_options.resources` to place replicas)."""
    from ray.serve.llm import LLMConfig  # 7.5 s of imports (vLLM's OpenAI protocol): not before a bad input is refused

    engine = {**(CPU_ENGINE_DEFAULTS if accelerator == "cpu" else {}), **(engine_kwargs or {})}
    return LLMConfig(
        model_loading_config={"model_id": model_id, "model_source": model_source(model_path)},
        accelerator_config={"kind": accelerator},  # without it Serve asks for a GPU and waits forever on CPU
        deployment_config={"autoscaling_config": {"min_replicas": min_replicas, "max_replicas": max_replicas},
                           **(deployment_config or {})},
        engine_kwargs=engine,
    )

