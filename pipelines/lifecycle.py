"""lifecycle: the whole walking lifecycle as chained stage runs on one Ray cluster.

curate -> tokenizer -> pretrain -> sft -> dpo -> reward -> rl -> evaluate -> quantize -> serve -> report (the reward
model is trained beside the chain; rl continues from dpo, or sft when dpo is skipped; quantize measures an INT8
copy of the final model beside it: serve still serves the full-precision one). Each stage is an ordinary run
(its own manifest); inputs are wired by run id. Every stage config is validated before the first stage starts,
so a typo in the last stage's section fails in seconds, not after training.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

from raylm import console
from raylm.config import ConfigError, Section, deep_merge, load_config
from raylm.runs import RunError, RunStore
from raylm.stage import execute

ORDER = ["curate", "tokenizer", "pretrain", "sft", "dpo", "reward", "rl", "evaluate", "quantize", "serve", "report"]
# role -> the earlier stages whose run can feed it, in order of preference (the first one not skipped wins)
WIRING = {
    "tokenizer": {"dataset": ("curate",)},
    "pretrain": {"dataset": ("curate",), "tokenizer": ("tokenizer",)},
    "sft": {"model": ("pretrain",), "dataset": ("curate",)},
    "dpo": {"model": ("sft",), "dataset": ("curate",)},
    "reward": {"model": ("sft",), "dataset": ("curate",)},
    "rl": {"model": ("dpo", "sft"), "dataset": ("curate",)},
    "evaluate": {"model": ("rl", "dpo", "sft"), "dataset": ("curate",)},
    "quantize": {"model": ("rl", "dpo", "sft"), "dataset": ("curate",)},
    "serve": {"model": ("rl", "dpo", "sft")},
    "report": {"run": ("serve", "evaluate")},
}


def source(sources: tuple[str, ...], available) -> str | None:
    return next((s for s in sources if s in available), None)


class Config(Section):
    root: str = "runs"
    ray_address: str | None = None
    name: str | None = None
    skip: list[str] = []
    # One section per stage: that stage's config keys, optionally `config: <yaml>` to start from a file.
    curate: dict = {}
    tokenizer: dict = {}
    pretrain: dict = {}
    sft: dict = {}
    dpo: dict = {}
    reward: dict = {}
    rl: dict = {}
    evaluate: dict = {}
    quantize: dict = {}
    serve: dict = {}
    report: dict = {}


def recipe(stage: str):
    return importlib.import_module(f"pipelines.{stage}")


def stage_configs(cfg: Config, base_dir: Path) -> dict:
    """Validate every stage's config up front (inputs are filled in as the chain runs)."""
    bad = [s for s in cfg.skip if s not in ORDER]
    if bad:
        raise ConfigError(f"unknown stage(s) in skip: {bad}; stages: {ORDER}")
    out = {}
    for stage in ORDER:
        if stage in cfg.skip:
            continue
        section = dict(getattr(cfg, stage))
        base: dict = {}
        if "config" in section:
            path = Path(section.pop("config"))
            path = path if path.is_absolute() else base_dir / path
            base = load_config(recipe(stage).Config, path).model_dump(exclude_unset=True)
        common = {"root": cfg.root, "ray_address": cfg.ray_address, "name": cfg.name}
        try:
            out[stage] = load_config(recipe(stage).Config, deep_merge(deep_merge(base, section), common))
        except ConfigError as exc:
            raise ConfigError(f"lifecycle section {stage!r}: {exc}") from None
    return out


def run(cfg: Config, base_dir: Path = Path(".")) -> dict[str, str]:
    configs = stage_configs(cfg, base_dir)
    for stage, stage_cfg in configs.items():  # wiring checked before the first stage starts
        missing = [" or ".join(srcs) for role, srcs in WIRING.get(stage, {}).items()
                   if source(srcs, configs) is None and role not in stage_cfg.inputs]
        if missing:
            raise ConfigError(f"stage {stage} needs the output of {missing}, which were skipped "
                              f"(or give {stage}.inputs.<role>=RUN_ID)")
    done: dict[str, str] = {}
    for stage, stage_cfg in configs.items():
        wiring = {role: done[source(srcs, done)] for role, srcs in WIRING.get(stage, {}).items()
                  if source(srcs, done)}
        stage_cfg.inputs = {**wiring, **stage_cfg.inputs}
        t0 = time.time()
        console.say(f"==> {stage} ...")
        done[stage] = execute(recipe(stage), stage_cfg)
        console.say(f"==> {stage}: run {done[stage]} succeeded in {time.time() - t0:.0f}s"
                    + (f"  {headline(stage, RunStore(cfg.root).load(done[stage]).metrics)}"
                       if console.log_path() else ""))
    return done


HEADLINE = {"curate": ("docs_in", "docs_kept"), "tokenizer": ("vocab_size",),
            "pretrain": ("initial_loss", "final_loss", "final_val_loss"), "sft": ("final_loss", "final_val_loss"),
            "dpo": ("final_loss", "val_reward_accuracy", "val_reward_margin"), "reward": ("heldout_accuracy",),
            "rl": ("heldout_reward_before", "heldout_reward_after"), "serve": ("deploy_s",)}


def headline(stage: str, metrics: dict) -> str:
    """A stage's one-line summary from its manifest (the keys it has of HEADLINE's)."""
    x = {k: metrics[k] for k in HEADLINE.get(stage, ()) if isinstance(metrics.get(k), (int, float))}
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in x.items())


def summary(store: RunStore, done: dict[str, str]) -> str:
    lines = ["", "lifecycle finished. runs:"]
    for stage, rid in done.items():
        lines.append(f"  {stage:<10} {rid}  {store.uri(rid)}")
    if "report" in done:
        lines.append(f"report: {store.load(done['report']).metrics.get('index')}")
    if "reward" in done:
        x = store.load(done["reward"]).metrics
        lines.append(f"  reward model: held-out pairwise accuracy {x.get('heldout_accuracy')}")
    if "rl" in done:
        x = store.load(done["rl"]).metrics
        lines.append(f"  rl ({x['algorithm']}): held-out reward {x['heldout_reward_before']} -> "
                     f"{x['heldout_reward_after']} (greedy {x['heldout_greedy_reward_before']} -> "
                     f"{x['heldout_greedy_reward_after']}), {x['weight_version']} weight pushes to the replicas")
    if "evaluate" in done:
        ev = store.load(done["evaluate"]).metrics
        for rid, m in ev.get("models", {}).items():
            lines.append(f"  eval {m['stage']:<9} ppl={m['perplexity']:<9} exact_match={m['exact_match']:<6} "
                         f"preference_accuracy={m['preference_accuracy']}")
    if "quantize" in done:
        comp = store.load(done["quantize"]).metrics.get("compression", {})
        for name, r in comp.get("ratios", {}).items():
            lines.append(f"  quantize {name}: perplexity x{r.get('perplexity')}, checkpoint bytes "
                         f"x{r.get('checkpoint_bytes')}, vLLM tokens/s x{r.get('tokens_per_s')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, str]:
    ap = argparse.ArgumentParser(prog="raylm lifecycle", description=__doc__)
    ap.add_argument("config", help="lifecycle YAML (e.g. pipelines/configs/lifecycle/tiny.yaml)")
    ap.add_argument("overrides", nargs="*", help="key=value, e.g. root=runs/x pretrain.train.max_steps=50")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(Config, args.config, args.overrides)
        done = run(cfg, Path(args.config).parent)
    except (ConfigError, RunError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    console.say(summary(RunStore(cfg.root), done))
    return done


if __name__ == "__main__":
    main()
