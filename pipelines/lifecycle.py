"""lifecycle: the whole walking lifecycle as chained stage runs on one Ray cluster.

Two ways to start a chain:
- from data (the embedded default, `tiny.yaml`): every stage of ORDER but `import` and `taskset` runs unless named
  in `skip`;
- from an existing model (`smollm2.yaml`): an `import` section (`source: PATH`, a HF directory or a .gguf file)
  makes the chain explicit: only the stages that have a section run. Their `model` inputs wire from the import
  (sft, rl, evaluate, quantize, serve, ... take the latest model of the chain); their `dataset` from a `taskset`
  (generated tasks with checkable answers) or a `curate` section.

`evaluate.after: [import, sft, rl]` evaluates after each of those stages (the run of each is keyed
`evaluate@STAGE`); in `evaluate.baselines` a stage name of the chain stands for that stage's run (only stages that
ran before, not the model itself), so each evaluation's manifest holds its deltas to them with bootstrap CIs.

curate -> tokenizer -> pretrain -> sft -> dpo -> reward -> rl -> evaluate -> quantize -> serve -> report (the reward
model is trained beside the chain; rl continues from dpo, or sft when dpo is skipped; quantize measures an INT8
copy of the final model beside it: serve still serves the full-precision one). Each stage is an ordinary run
(its own manifest); inputs are wired by run id. Every stage config is validated before the first stage starts,
so a typo in the last stage's section fails in seconds, not after training.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pydantic import Field

from raylm import console
from raylm.config import ConfigError, Section, deep_merge, load_config
from raylm.runs import RunError, RunStore
from raylm.stage import execute, recipe

ORDER = ["import", "taskset", "curate", "tokenizer", "pretrain", "sft", "dpo", "reward", "rl", "evaluate", "quantize",
         "serve", "report"]
# role -> the earlier stages whose run can feed it, in order of preference (the first one not skipped wins)
WIRING = {
    "tokenizer": {"dataset": ("curate",)},
    "pretrain": {"dataset": ("curate",), "tokenizer": ("tokenizer",)},
    "sft": {"model": ("pretrain", "import"), "dataset": ("taskset", "curate")},
    "dpo": {"model": ("sft",), "dataset": ("taskset", "curate")},
    "reward": {"model": ("sft",), "dataset": ("taskset", "curate")},
    "rl": {"model": ("dpo", "sft", "import"), "dataset": ("taskset", "curate")},
    "evaluate": {"model": ("rl", "dpo", "sft", "import"), "dataset": ("curate",)},
    "quantize": {"model": ("rl", "dpo", "sft", "import"), "dataset": ("curate", "taskset")},
    "serve": {"model": ("rl", "dpo", "sft", "import")},
    "report": {"run": ("serve", "evaluate")},
}
OPTIONAL = ("import", "taskset")  # run only when their section is given
FIELDS = {"import": "import_"}  # stage -> Config field (`import` is a Python keyword)
MODEL_STAGES = ("import", "pretrain", "sft", "dpo", "rl")  # what `evaluate.after` may name


def source(sources: tuple[str, ...], available) -> str | None:
    """The first of `sources` that ran (or will run); a stage evaluated several times is found by its last key
    (`evaluate@rl`)."""
    for s in sources:
        keys = [k for k in available if k == s or k.split("@")[0] == s]
        if keys:
            return keys[-1]
    return None


class Config(Section):
    root: str = "runs"
    ray_address: str | None = None
    name: str | None = None
    skip: list[str] = []
    # One section per stage: that stage's config keys, optionally `config: <yaml>` to start from a file.
    import_: dict = Field({}, alias="import")  # an existing model: starts an explicit chain (see the docstring)
    taskset: dict = {}
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


def section(cfg: Config, stage: str) -> dict:
    return dict(getattr(cfg, FIELDS.get(stage, stage)))


def stages(cfg: Config) -> list[str]:
    """The stages that run, in ORDER: with an `import` section only those given a section, else all but OPTIONAL
    ones not given; never those in `skip`."""
    given = {s for s in ORDER if FIELDS.get(s, s) in cfg.model_fields_set}
    explicit = "import" in given
    return [s for s in ORDER if s not in cfg.skip and (s in given or (not explicit and s not in OPTIONAL))]


def evaluate_after(cfg: Config, chain: list[str]) -> list[str]:
    """The stages `evaluate.after` names (checked against the chain); [] for one evaluation in ORDER's place."""
    after = section(cfg, "evaluate").get("after") or []
    if isinstance(after, str):
        after = [after]
    bad = [s for s in after if s not in MODEL_STAGES or s not in chain]
    if bad:
        raise ConfigError(f"evaluate.after: {bad} not stage(s) of this chain that make a model; "
                          f"choose from {[s for s in chain if s in MODEL_STAGES]}")
    return list(after)


def steps(cfg: Config, chain: list[str]) -> list[tuple[str, str, str | None]]:
    """(key, stage, evaluated stage) in running order; `evaluate` once per `evaluate.after` entry, right after it."""
    after = evaluate_after(cfg, chain) if "evaluate" in chain else []
    out = []
    for stage in chain:
        if stage == "evaluate" and after:
            continue
        out.append((stage, stage, None))
        if stage in after:
            out.append((f"evaluate@{stage}", "evaluate", stage))
    return out


def stage_configs(cfg: Config, base_dir: Path) -> dict:
    """Validate every stage's config up front (inputs are filled in as the chain runs)."""
    bad = [s for s in cfg.skip if s not in ORDER]
    if bad:
        raise ConfigError(f"unknown stage(s) in skip: {bad}; stages: {ORDER}")
    out = {}
    for stage in stages(cfg):
        section_ = section(cfg, stage)
        if stage == "evaluate":
            section_.pop("after", None)  # the lifecycle's key, not the stage's
        base: dict = {}
        if "config" in section_:
            path = Path(section_.pop("config"))
            path = path if path.is_absolute() else base_dir / path
            base = load_config(recipe(stage).Config, path).model_dump(exclude_unset=True)
        common = {"root": cfg.root, "ray_address": cfg.ray_address, "name": cfg.name}
        try:
            out[stage] = load_config(recipe(stage).Config, deep_merge(deep_merge(base, section_), common))
        except ConfigError as exc:
            raise ConfigError(f"lifecycle section {stage!r}: {exc}") from None
    return out


def baselines_of(stage_cfg, chain: list[str], done: dict[str, str], model_run: str) -> list[str]:
    """evaluate's baselines with the chain's stage names replaced by their runs: those not run yet and the model
    being evaluated itself are left out."""
    out = []
    for ref in stage_cfg.baselines:
        if ref in ORDER:
            if ref not in chain:
                raise ConfigError(f"evaluate.baselines: {ref!r} is not a stage of this chain ({chain})")
            if ref not in done or done[ref] == model_run:
                continue
            ref = done[ref]
        if ref not in out:
            out.append(ref)
    return out


def run(cfg: Config, base_dir: Path = Path(".")) -> dict[str, str]:
    configs = stage_configs(cfg, base_dir)
    chain = list(configs)
    plan = steps(cfg, chain)
    for key, stage, after in plan:  # wiring checked before the first stage starts
        stage_cfg = configs[stage]
        required = recipe(stage).INPUTS  # an optional input (evaluate's dataset) may stay unwired
        missing = [" or ".join(srcs) for role, srcs in WIRING.get(stage, {}).items()
                   if role in required and source(srcs, configs) is None and role not in stage_cfg.inputs
                   and not (after and role == "model")]
        if missing:
            raise ConfigError(f"stage {stage} needs the output of {missing}, which were skipped "
                              f"(or give {stage}.inputs.<role>=RUN_ID)")
        if stage == "evaluate":
            baselines_of(stage_cfg, chain, {}, "")  # names outside the chain fail now
    done: dict[str, str] = {}
    for key, stage, after in plan:
        stage_cfg = configs[stage].model_copy(deep=True)
        wiring = {role: done[source(srcs, done)] for role, srcs in WIRING.get(stage, {}).items()
                  if source(srcs, done)}
        if after:
            wiring["model"] = done[after]
        stage_cfg.inputs = {**wiring, **stage_cfg.inputs}
        if stage == "evaluate" and stage_cfg.baselines:
            stage_cfg.baselines = baselines_of(stage_cfg, chain, done, stage_cfg.inputs.get("model"))
        t0 = time.time()
        console.say(f"==> {key} ...")
        done[key] = execute(recipe(stage), stage_cfg)
        console.say(f"==> {key}: run {done[key]} succeeded in {time.time() - t0:.0f}s"
                    + (f"  {headline(stage, RunStore(cfg.root).load(done[key]).metrics)}"
                       if console.log_path() else ""))
    return done


HEADLINE = {"curate": ("docs_in", "docs_kept"), "tokenizer": ("vocab_size",),
            "pretrain": ("initial_loss", "final_loss", "final_val_loss"), "sft": ("final_loss", "final_val_loss"),
            "dpo": ("final_loss", "val_reward_accuracy", "val_reward_margin"), "reward": ("heldout_accuracy",),
            "rl": ("heldout_reward_before", "heldout_reward_after"), "serve": ("deploy_s",),
    "import": ("params", "vocab_size"), "taskset": ("splits",)}


def headline(stage: str, metrics: dict) -> str:
    """A stage's one-line summary from its manifest (the keys it has of HEADLINE's)."""
    x = {k: metrics[k] for k in HEADLINE.get(stage, ()) if isinstance(metrics.get(k), (int, float, dict))}
    if stage == "evaluate" and metrics.get("tasks"):
        x.update({f"{t}/{m}": v["value"] for t, r in metrics["tasks"].items() for m, v in r["metrics"].items()
                  if isinstance(v.get("value"), (int, float))})
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
    for key in (k for k in done if k.split("@")[0] == "evaluate"):
        ev = store.load(done[key]).metrics
        for rid, m in ev.get("models", {}).items():
            lines.append(f"  eval {m['stage']:<9} ppl={m['perplexity']:<9} exact_match={m['exact_match']:<6} "
                         f"preference_accuracy={m['preference_accuracy']}")
        lines += task_lines(key, ev, {rid: k for k, rid in done.items()})
    if "quantize" in done:
        comp = store.load(done["quantize"]).metrics.get("compression", {})
        for name, r in comp.get("ratios", {}).items():
            lines.append(f"  quantize {name}: perplexity x{r.get('perplexity')}, checkpoint bytes "
                         f"x{r.get('checkpoint_bytes')}, vLLM tokens/s x{r.get('tokens_per_s')}")
    return "\n".join(lines)


def task_lines(key: str, ev: dict, names: dict[str, str]) -> list[str]:
    """An lm-eval evaluation: each task metric of the model, and its delta to each baseline with the 95% CI."""
    out = []
    for task, r in ev.get("tasks", {}).items():
        for metric, v in r["metrics"].items():
            if v.get("value") is None:
                continue
            deltas = [f"vs {names.get(d['baseline'], d['baseline'])} {d['delta']:+.3f} "
                      f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
                      for d in ev.get("task_deltas", []) if d["task"] == task and d["metric"] == metric
                      and d.get("delta") is not None]
            out.append(f"  {key:<17} {task} {metric}={v['value']:.3f}" + (f"  ({'; '.join(deltas)})" if deltas else ""))
    return out


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
