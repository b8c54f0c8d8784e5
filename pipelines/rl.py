"""rl: online policy optimisation (GRPO family, RLOO, REINFORCE++, PPO) with rollouts on Ray Serve vLLM replicas.

setup: tokenize the prompt sets (Ray Data; over-long prompts skipped and counted), deploy the rollout application
(N vLLM replicas via `ray.serve.llm`, the same builder as `serve/`) and its weight store -> train: a Ray Train job
(`raylm.rl.learner`) samples through deployment handles, scores, learns and pushes weights into the replicas in
place after every step -> save: the final policy, the per-step curves, before/after answers on fixed prompts.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager

import pyarrow.parquet as pq
import ray
from pydantic import field_validator, model_validator
from ray import serve

from raylm.config import LoraSpec, OptimSpec, ResourcesSpec, Section, StageConfig
from raylm.rl.algos import ALGORITHMS, KL_ESTIMATORS
from raylm.rl.rewards import RewardSpec
from raylm.runs import RunError
from raylm.stage import require_paths

STAGE = "rl"
INPUTS = {"model": ("model",), "dataset": ("dataset",)}
OPTIONAL_INPUTS = {"reward_model": ("reward_model",)}  # needed when a `reward_model` reward is configured
# per step (heldout_reward every eval_every steps and at the end): what a sweep can optimise
METRICS = ("reward_mean", "reward_std", "heldout_reward", "kl", "kl_coef", "entropy", "loss", "clip_frac",
           "approx_kl", "response_len", "grad_norm", "kept_frac", "value_loss", "lr")


class KLSpec(Section):
    coef: float = 0.0  # GRPO's beta; DeepSeekMath used 0.04
    estimator: str = "k3"
    where: str = "loss"  # "loss" (GRPO) or "reward" (PPO/RLOO/REINFORCE++ style per-token penalty)
    controller: str = "fixed"  # or "adaptive" (Ziegler et al.): moves coef towards `target` KL
    target: float | None = None
    horizon: int = 10000

    @model_validator(mode="after")
    def _check(self):
        if self.estimator not in KL_ESTIMATORS:
            raise ValueError(f"unknown KL estimator {self.estimator!r}; choose one of {sorted(KL_ESTIMATORS)}")
        if self.where not in ("loss", "reward"):
            raise ValueError(f"kl.where must be 'loss' or 'reward', got {self.where!r}")
        if self.controller not in ("fixed", "adaptive"):
            raise ValueError(f"kl.controller must be 'fixed' or 'adaptive', got {self.controller!r}")
        if self.controller == "adaptive" and not self.target:
            raise ValueError("kl.controller=adaptive needs kl.target (the KL to steer towards)")
        return self


class RolloutSpec(Section):
    replicas: int = 1
    # "shared": replicas go wherever Ray places them (on one machine: beside the learner). "separate": replicas
    # need the custom resource `raylm_rollout` (give it to the rollout node type in cluster.yaml), so rollouts
    # and the learner's train workers run on different nodes.
    placement: str = "shared"
    accelerator: str = "cpu"
    engine_kwargs: dict = {"max_model_len": 256}
    chunk_size: int = 16  # prompts per handle call; chunks spread over the replicas
    max_retries: int = 8  # per chunk, when a replica dies mid-rollout (backoff 1, 2, 4, ... 30 s)

    @field_validator("placement")
    @classmethod
    def _placement(cls, v: str) -> str:
        if v not in ("shared", "separate"):
            raise ValueError(f"rollout.placement must be 'shared' or 'separate', got {v!r}")
        return v


class Config(StageConfig):
    algorithm: str = "grpo"
    group_size: int = 8  # k samples per prompt
    prompts_per_step: int = 16  # per train worker
    max_steps: int = 40
    eval_every: int = 10
    max_new_tokens: int = 8
    max_prompt_len: int = 64  # longer prompts are skipped and counted
    temperature: float = 1.0
    top_p: float = 1.0
    clip_low: float | None = None  # None: the algorithm's default (e.g. DAPO 0.2/0.28, GSPO 3e-4/4e-4)
    clip_high: float | None = None
    kl: KLSpec = KLSpec()
    ppo_epochs: int = 1
    entropy_coef: float = 0.0
    value_coef: float = 0.5  # PPO critic
    value_clip: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    overlong_cache: int = 2  # DAPO soft overlong penalty window (tokens before max_new_tokens)
    stale: bool = False  # one-step off-policy: the next rollout overlaps this update
    rewards: list[RewardSpec] = [RewardSpec(name="exact_match")]
    rollout: RolloutSpec = RolloutSpec()
    lora: LoraSpec | None = None  # None: full fine-tuning of the policy
    optim: OptimSpec = OptimSpec(lr=1e-4, warmup_steps=0, schedule="constant", grad_clip=1.0)
    resources: ResourcesSpec = ResourcesSpec(strategy="ddp")
    seed: int = 0
    train_split: str = "tasks_train"
    heldout_split: str = "tasks_test"
    max_heldout: int = 100
    heldout_samples: int = 32  # samples per held-out prompt for heldout_reward_before/after
    examples: int = 8  # fixed held-out prompts shown before/after in the report

    @field_validator("algorithm")
    @classmethod
    def _known_algorithm(cls, v: str) -> str:
        if v not in ALGORITHMS:
            raise ValueError(f"unknown RL algorithm {v!r}; choose one of {sorted(ALGORITHMS)}")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.group_size < 2 and self.algorithm != "ppo":
            raise ValueError(f"group_size must be >= 2 for {self.algorithm} (advantages are relative to the group)")
        context = self.rollout.engine_kwargs.get("max_model_len")
        if context and self.max_prompt_len + self.max_new_tokens > context:
            raise ValueError(f"max_prompt_len + max_new_tokens = {self.max_prompt_len + self.max_new_tokens} exceeds "
                             f"the rollout engine's context rollout.engine_kwargs.max_model_len={context}")
        if self.lora and self.lora.method != "lora":
            # the weight push merges LoRA deltas by name (learner.merged_state); other PEFT methods are not wired in
            raise ValueError(f"lora.method={self.lora.method!r}: rl trains the policy with lora or in full (lora: null)")
        if self.resources.strategy.startswith("zero"):
            raise ValueError(f"resources.strategy={self.resources.strategy!r}: the RL learner runs fsdp2 or ddp "
                             "(DeepSpeed ZeRO is for pretrain, sft, dpo and reward)")
        if self.lora and self.resources.strategy == "fsdp2" and self.resources.num_workers > 1:
            raise ValueError("rl with lora needs resources.strategy=ddp (merging adapters for the weight push "
                             "is not done on FSDP2 shards)")
        return self


def check(inputs, cfg: Config) -> None:
    require_paths(STAGE, inputs["dataset"].uri, {"train_split": cfg.train_split, "heldout_split": cfg.heldout_split})
    for key, split in (("train_split", cfg.train_split), ("heldout_split", cfg.heldout_split)):
        if _num_rows(f"{inputs['dataset'].uri}/{split}") == 0:
            raise RunError(f"{STAGE}: {key}={split!r} has no prompts")
    if any(r.name == "reward_model" for r in cfg.rewards) and "reward_model" not in inputs:
        raise RunError(f"{STAGE}: a reward_model reward needs inputs.reward_model=RUN_ID (a `reward` run)")


def _num_rows(uri: str) -> int:
    """Rows in a split's Parquet files, from their footers (nothing is read)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    files = sorted(f for f in fs.find(path) if f.endswith(".parquet"))
    if not files:
        raise RunError(f"{STAGE}: no parquet files in {uri}")
    rows = 0
    for f in files:
        with fs.open(f, "rb") as fh:
            rows += pq.ParquetFile(fh).metadata.num_rows
    return rows


class PromptIds:
    """Ray Data operator: chat-template token ids of each prompt and their length."""

    def __init__(self, tok_path: str):
        from raylm.data.tokenize import cached_tokenizer

        self.tok = cached_tokenizer(tok_path)

    def __call__(self, batch):
        ids = [self.tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                            tokenize=False) for p in batch["prompt"]]
        ids = [self.tok(t, add_special_tokens=False)["input_ids"] for t in ids]
        batch["prompt_ids"] = ids
        batch["prompt_len"] = [len(x) for x in ids]
        return batch


def prompt_set(uri: str, tok_path: str, max_len: int):
    """Training prompts as a Ray Data dataset: (kept dataset, rows in, rows skipped for length)."""
    from raylm.data.tokenize import map_tokens

    ds = map_tokens(ray.data.read_parquet(uri), PromptIds, tok_path).materialize()
    n_in = ds.count()
    kept = ds.filter(lambda r: r["prompt_len"] <= max_len).materialize()
    return kept, n_in, n_in - kept.count()


def heldout_prompts(uri: str, tok_path: str, max_len: int, limit: int) -> tuple[list[dict], int]:
    """The first `limit` held-out prompts, tokenized here (a hundred rows: no pipeline needed); (rows, skipped)."""
    table = pq.read_table(uri).slice(0, limit)
    rows = PromptIds(tok_path)(table.to_pandas()).to_dict("records") if table.num_rows else []
    kept = [{**r, "prompt_ids": [int(t) for t in r["prompt_ids"]]} for r in rows if r["prompt_len"] <= max_len]
    return kept, len(rows) - len(kept)


@contextmanager
def rollout_engine(run, model_uri: str, cfg: Config):
    """The rollout application and its weight store for the length of the run; yields what the learner needs to
    reach them. Serve is stopped afterwards only if this run started it (a later `serve` stage then starts its
    own, with HTTP; an endpoint someone else runs on the cluster is left alone)."""
    from serve.rollout import build_rollout_app, create_weight_store, serve_running

    app_name, store_name = f"rollout-{run.id}", f"weights-{run.id}"
    serve_was_running = serve_running()
    store = create_weight_store(store_name)  # the driver holds the handle: the actor lives as long as the run
    try:
        serve.start(http_options={"location": "NoServer"})  # handles only (ignored when Serve is already running)
        resources = {"raylm_rollout": 1} if cfg.rollout.placement == "separate" else None
        app = build_rollout_app(model_uri, "policy", store_name, accelerator=cfg.rollout.accelerator,
                                replicas=cfg.rollout.replicas, engine_kwargs=cfg.rollout.engine_kwargs,
                                replica_resources=resources)
        with run.time("deploy_s"):
            serve.run(app, name=app_name, route_prefix=None)
        yield {"app_name": app_name, "model_id": "policy", "weight_store": store_name}
    finally:
        serve.delete(app_name)
        ray.kill(store)
        if not serve_was_running:
            serve.shutdown()


def learner_job(inputs, cfg: Config, held_rows: list[dict]) -> dict:
    """Everything the Ray Train workers need besides the rollout engine's names (plain data, shipped once)."""
    model_uri = inputs["model"].uri
    return {"algorithm": cfg.algorithm, "group_size": cfg.group_size, "kl": cfg.kl.model_dump(),
            "prompts_per_step": cfg.prompts_per_step, "max_steps": cfg.max_steps, "eval_every": cfg.eval_every,
            "heldout_samples": cfg.heldout_samples,
            "sampling": {"n": cfg.group_size, "max_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
                         "top_p": cfg.top_p},
            "clip_low": cfg.clip_low, "clip_high": cfg.clip_high, "ppo_epochs": cfg.ppo_epochs,
            "entropy_coef": cfg.entropy_coef, "value_coef": cfg.value_coef, "value_clip": cfg.value_clip,
            "gamma": cfg.gamma, "lam": cfg.lam, "overlong_cache": cfg.overlong_cache, "stale": cfg.stale,
            "rewards": [r.model_dump() for r in cfg.rewards],
            "reward_model_path": inputs["reward_model"].uri if "reward_model" in inputs else None,
            "chunk_size": cfg.rollout.chunk_size, "max_retries": cfg.rollout.max_retries,
            "model": {"path": model_uri, "preset": None}, "lora": cfg.lora.model_dump() if cfg.lora else None,
            "optim": cfg.optim.model_dump(), "seed": cfg.seed, "train": {"seed": cfg.seed},
            "strategy": cfg.resources.strategy, "heldout": held_rows}


def body(run, inputs, cfg: Config) -> None:
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from raylm.rl.learner import rl_loop_per_worker
    from raylm.train import hooks
    from raylm.train.launch import FixedShards, read_result

    model_uri, data = inputs["model"].uri, inputs["dataset"].uri
    with run.time("prepare_s"):
        train, n_train, skipped = prompt_set(f"{data}/{cfg.train_split}", model_uri, cfg.max_prompt_len)
        held_rows, skipped_h = heldout_prompts(f"{data}/{cfg.heldout_split}", model_uri, cfg.max_prompt_len,
                                               cfg.max_heldout)
        if train.count() == 0 or not held_rows:
            raise RunError(f"{STAGE}: no prompts left after skipping those longer than max_prompt_len="
                           f"{cfg.max_prompt_len} tokens ({skipped} train, {skipped_h} held-out skipped)")
    with rollout_engine(run, model_uri, cfg) as rollout:
        job = {**rollout, **learner_job(inputs, cfg, held_rows), **hooks.job_flags()}
        trainer = TorchTrainer(
            rl_loop_per_worker, train_loop_config=job,
            scaling_config=ScalingConfig(num_workers=cfg.resources.num_workers, use_gpu=cfg.resources.use_gpu,
                                         resources_per_worker={"CPU": cfg.resources.cpus_per_worker}),
            run_config=hooks.run_config(run.id, run.uri("train"), cfg.resources.max_failures),
            datasets={"train": train}, dataset_config=FixedShards())
        with run.time("train_s"):
            out = read_result(trainer.fit())
    save(run, out, cfg, held_rows, n_train, skipped, skipped_h)


def save(run, out: dict, cfg: Config, held_rows: list[dict], n_train: int, skipped: int, skipped_h: int) -> None:
    m = out["metrics"]
    run.add_artifact("model", "model", f"{out['checkpoint']}/model", meta={"algorithm": cfg.algorithm})
    run.log_history(out["history"])
    examples = [{"prompt": r["prompt"], "answer": r["answer"], "before": b, "after": a}
                for r, b, a in zip(held_rows[: cfg.examples], m["answers_before"], m["answers_after"])]
    local = run.local_dir("rollouts") or tempfile.mkdtemp()
    with open(os.path.join(local, "examples.json"), "w") as f:
        json.dump({"examples": examples, "answers_before": m["answers_before"], "answers_after": m["answers_after"]},
                  f, indent=1)
    run.add_artifact("examples", "eval", run.upload(local, "rollouts"))
    hist = out["history"]
    steps = max(1, len(hist))
    share = {k: round(sum(r.get(k, 0) for r in hist) / steps, 4)
             for k in ("generate_s", "reward_s", "learn_s", "sync_s")}
    run.log_metrics({
        "algorithm": cfg.algorithm, "group_size": cfg.group_size, "kl_coef": cfg.kl.coef,
        "kl_estimator": cfg.kl.estimator, "kl_where": cfg.kl.where, "rewards": [r.name for r in cfg.rewards],
        "rollout_engine": "serve", "rollout_replicas": cfg.rollout.replicas,
        "heldout_reward_before": round(m["heldout_reward_before"], 4),
        "heldout_reward_after": round(m["heldout_reward_after"], 4),
        "heldout_greedy_reward_before": round(m["heldout_greedy_reward_before"], 4),
        "heldout_greedy_reward_after": round(m["heldout_greedy_reward_after"], 4),
        "heldout_prompts": len(held_rows), "train_prompts": n_train - skipped,
        "prompts_skipped_too_long": skipped + skipped_h, "weight_version": m["weight_version"],
        "replica_versions": m["replica_versions"], "reward_failures": m["reward_failures"],
        "initial_reward": hist[0]["reward_mean"], "final_reward": hist[-1]["reward_mean"],
        "mean_step_seconds": share, "examples": examples,
        "train_s": m["train_s"], "params": m["params"], "trainable_params": m["trainable_params"],
    })


if __name__ == "__main__":
    import sys

    from raylm.stage import cli_main

    cli_main(sys.modules[__name__])
