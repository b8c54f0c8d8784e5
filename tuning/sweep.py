"""sweep: a Ray Tune search over any training stage's config, each trial a full stage run.

One YAML names the stage, its base config, the space, the search algorithm, the scheduler and the metric
(`tuning/configs/`). Before any trial starts the space is checked against the stage's config, the metric against
what the stage logs, and the trial's resources against the cluster. Each trial is a normal run in the registry
(`sweep` in its manifest points here); this `sweep` run records the trial table, the best config as a ready-to-run
stage YAML and the best trial's model, and every trial's curve of the metric.

    raylm sweep tuning/configs/sft_lr.yaml [k=v ...]       python -m tuning.sweep tuning/configs/sft_lr.yaml
    raylm sweep --resume SWEEP_RUN_ID                      (an interrupted sweep; finished trials are kept)
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field

from raylm.cluster import REPO_DIR, init_ray
from raylm.config import ConfigError, Section, deep_merge, load_config
from raylm.runs import HISTORY, RunError, RunStore, _now
from raylm.stage import resolve_inputs
from tuning.cleanup import NAMESPACE, Ledger, ReleaseStoppedTrials, remove_groups
from tuning.space import check_against_stage, flatten, param_space

STAGE = "sweep"
TRIAL_CPU = 0.01  # the trial's own process: it only drives the stage; its workers and replicas hold the rest


class SearchSpec(Section):
    algorithm: Literal["grid", "random", "optuna", "hyperopt"] = "random"
    seed: int = 0


class SchedulerSpec(Section):
    kind: Literal["fifo", "asha", "median", "pbt"] = "fifo"
    grace_period: int = 10  # steps before ASHA or the median rule may stop a trial
    reduction_factor: float = 2.0  # ASHA keeps 1/reduction_factor of the trials at each rung
    min_samples_required: int = 3  # median rule
    perturbation_interval: int = 20  # PBT: steps between exploit/explore, and between trial checkpoints
    quantile_fraction: float = 0.25  # PBT: the bottom fraction copies the top fraction


class LRScaling(Section):
    """Seed 003: when the batch size changes, scale the LR linearly (SGD-like) or by the square root (Adam)."""
    rule: Literal["none", "linear", "sqrt"] = "none"
    base_batch_size: int = 16  # the batch size the (sampled or configured) LR is meant for
    lr_key: str = "optim.lr"
    batch_key: str = "train.batch_size"


class Config(Section):
    stage: str
    base: str | None = None  # the stage's YAML (relative to this file, the working directory or the repo)
    overrides: dict[str, Any] = {}  # stage keys fixed for every trial (nested, like the stage YAML)
    inputs: dict[str, str] = {}  # the stage's inputs; `latest/STAGE` is resolved once, for every trial
    space: dict[str, Any]
    metric: str
    mode: Literal["min", "max"] = "min"
    num_samples: int = Field(1, ge=1)  # samples of the space (x the grid's size for grid values)
    max_concurrent_trials: int | None = Field(None, ge=1)  # None: as many as the cluster holds
    trial_retries: int = Field(0, ge=0)  # a trial that raises is started again up to this many times
    search: SearchSpec = SearchSpec()
    scheduler: SchedulerSpec = SchedulerSpec()
    lr_scaling: LRScaling = LRScaling()
    root: str = "runs"
    name: str | None = None
    ray_address: str | None = None


# ---------------------------------------------------------------- checking, before anything starts
def stage_recipe(stage: str):
    try:
        recipe = importlib.import_module(f"pipelines.{stage}")
    except ModuleNotFoundError:
        raise ConfigError(f"stage={stage!r}: no such stage") from None
    if not hasattr(recipe, "METRICS"):
        raise ConfigError(f"stage={stage!r} cannot be swept: it logs no per-step metric (sweepable: pretrain, "
                          f"sft, dpo, reward, rl)")
    return recipe


def find_base(cfg: Config, origin: Path | None) -> Path | None:
    if not cfg.base:
        return None
    candidates = [Path(cfg.base)] if Path(cfg.base).is_absolute() else \
        [*([origin / cfg.base] if origin else []), Path.cwd() / cfg.base, REPO_DIR / cfg.base]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise ConfigError(f"base={cfg.base!r}: file not found (looked in {', '.join(map(str, candidates))})")
    return path.resolve()


def base_config(cfg: Config, origin: Path | None) -> dict:
    """The stage config every trial starts from: the base YAML, then `overrides`, then `inputs`."""
    path = find_base(cfg, origin)
    data: dict = yaml.safe_load(path.read_text()) or {} if path else {}
    data = deep_merge(data, cfg.overrides)
    if cfg.inputs:
        data["inputs"] = {**data.get("inputs", {}), **cfg.inputs}
    return {**data, "root": cfg.root}


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def check(cfg: Config, recipe, base: dict) -> dict:
    """The flat space, after checking it, the metric and the scheduler against the stage; ConfigError names the key."""
    stage_cfg = load_config(recipe.Config, base)  # the base alone must be a valid stage config
    if cfg.metric not in recipe.METRICS:
        raise ConfigError(f"metric={cfg.metric!r}: stage {cfg.stage} does not log it; it logs "
                          f"{', '.join(recipe.METRICS)}")
    flat = flatten(cfg.space)
    if not flat:
        raise ConfigError("space: empty; give at least one key to search")
    check_against_stage(flat, recipe.Config, base, cfg.search.algorithm)
    ls = cfg.lr_scaling
    if ls.rule != "none":
        for key in (ls.lr_key, ls.batch_key):
            try:
                _get(stage_cfg, key)
            except AttributeError:
                raise ConfigError(f"lr_scaling: {key!r} is not a key of the {cfg.stage} config") from None
    sch = cfg.scheduler
    if sch.kind == "pbt":
        if cfg.stage == "rl":
            raise ConfigError("scheduler.kind=pbt: the rl stage writes no resumable checkpoints yet; use asha, "
                              "median or fifo")
        if cfg.search.algorithm in ("optuna", "hyperopt"):
            raise ConfigError("scheduler.kind=pbt explores by itself: use search.algorithm random or grid")
        grid = [k for k, spec in flat.items() if "grid" in spec]
        if grid:
            raise ConfigError(f"space.{grid[0]}: PBT mutates from distributions; use choice instead of grid")
    return flat


def max_steps(stage_cfg) -> int:
    return stage_cfg.max_steps if hasattr(stage_cfg, "max_steps") else stage_cfg.train.max_steps


def trial_resources(stage: str, stage_cfg) -> dict[str, float]:
    """What one trial holds at its peak. Training stages: the train workers (Ray Data's tokenizing actor, 1 CPU,
    runs before them). RL adds its rollout replicas: on CPU a replica takes 2 CPU slots (the replica actor and
    vLLM's engine bundle, as Ray reports it), on GPU one GPU per replica."""
    res = stage_cfg.resources
    cpu = max(res.num_workers * res.cpus_per_worker, 1.0)
    gpu = float(res.num_workers) if res.use_gpu else 0.0
    if stage == "rl":
        ro = stage_cfg.rollout
        tp = int(ro.engine_kwargs.get("tensor_parallel_size", 1))
        cpu += ro.replicas * (2.0 if ro.accelerator == "cpu" else 1.0)
        gpu += 0.0 if ro.accelerator == "cpu" else float(ro.replicas * tp)
    return {"CPU": cpu + TRIAL_CPU, "GPU": gpu}


def concurrency(need: dict[str, float], have: dict[str, float], asked: int | None, n_trials: int) -> int:
    """Trials that fit side by side; a trial that can never fit is an error now, not a sweep that hangs."""
    fits = []
    for kind, amount in need.items():
        if amount <= 0:
            continue
        if have.get(kind, 0.0) < amount:
            raise ConfigError(f"a trial needs {amount:g} {kind} but the cluster has {have.get(kind, 0.0):g}: lower "
                              f"the stage's resources (num_workers, cpus_per_worker, rollout.replicas)")
        fits.append(int(have[kind] // amount))
    return max(1, min([*fits, asked or n_trials, n_trials]))


def count_trials(cfg: Config, flat: dict) -> int:
    grid = [len(spec["grid"]) for spec in flat.values() if "grid" in spec]
    return cfg.num_samples * math.prod(grid)


# ---------------------------------------------------------------- Tune objects
def search_alg(cfg: Config, width: int):
    from ray.tune.search.basic_variant import BasicVariantGenerator

    algo, seed = cfg.search.algorithm, cfg.search.seed
    if algo in ("grid", "random"):  # Tune ignores TuneConfig.max_concurrent_trials for a given generator
        return BasicVariantGenerator(random_state=seed, max_concurrent=width)
    try:
        if algo == "optuna":
            import optuna
            from ray.tune.search.optuna import OptunaSearch

            return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=seed))
        from ray.tune.search.hyperopt import HyperOptSearch

        return HyperOptSearch(random_state_seed=seed)
    except ImportError as exc:
        raise ConfigError(f"search.algorithm={algo}: needs the {algo} package ({exc.name} is not installed)") from None


def scheduler(cfg: Config, flat: dict, total_steps: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule, PopulationBasedTraining

    s = cfg.scheduler
    if s.kind == "asha":
        return ASHAScheduler(time_attr="step", max_t=total_steps, grace_period=s.grace_period,
                             reduction_factor=s.reduction_factor)
    if s.kind == "median":
        return MedianStoppingRule(time_attr="step", grace_period=s.grace_period,
                                  min_samples_required=s.min_samples_required)
    if s.kind == "pbt":
        return PopulationBasedTraining(time_attr="step", perturbation_interval=s.perturbation_interval,
                                       quantile_fraction=s.quantile_fraction,
                                       hyperparam_mutations=param_space(flat))
    return FIFOScheduler()


# ---------------------------------------------------------------- the sweep run
def run(cfg: Config, origin: Path | None = None, resume: str | None = None) -> str:
    """Check everything, run the Tune experiment inside a `sweep` run, record the results; returns its run id."""
    from ray import tune

    from tuning.trial import run_trial

    if "://" not in cfg.root:
        cfg.root = os.path.abspath(cfg.root)  # Tune runs each trial in its own working directory
    recipe = stage_recipe(cfg.stage)
    base = base_config(cfg, origin)
    if cfg.base:
        cfg.base = str(find_base(cfg, origin))  # recorded absolute: `--resume` finds it from anywhere
    flat = check(cfg, recipe, base)
    store = RunStore(cfg.root)
    stage_cfg = load_config(recipe.Config, base)
    inputs = resolve_inputs(store, cfg.stage, stage_cfg, recipe.INPUTS, getattr(recipe, "OPTIONAL_INPUTS", None))
    if hasattr(recipe, "check"):
        recipe.check(inputs, stage_cfg)
    # every trial reads the same parents, even if `latest/STAGE` moves while the sweep runs
    base["inputs"] = {role: f"{ref.run_id}:{ref.artifact}" for role, ref in inputs.items()}
    init_ray(cfg.ray_address)
    import ray

    need, n_trials = trial_resources(cfg.stage, stage_cfg), count_trials(cfg, flat)
    width = concurrency(need, ray.cluster_resources(), cfg.max_concurrent_trials, n_trials)
    resolved = cfg.model_dump(mode="json")
    with store.start_run(STAGE, resolved, list(inputs.values()), name=cfg.name, run_id=resume) as run:
        ls = cfg.lr_scaling
        setup = {"stage": cfg.stage, "base": base, "root": cfg.root, "sweep_id": run.id, "metric": cfg.metric,
                 "checkpoint_every": cfg.scheduler.perturbation_interval if cfg.scheduler.kind == "pbt" else 0,
                 "data_cache": run.uri("tokenized"), "ledger": f"pg-ledger-{run.id}", "lr_scaling": ls.model_dump(),
                 "base_lr": _get(stage_cfg, ls.lr_key) if ls.rule != "none" else 0}
        trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), {"CPU": TRIAL_CPU})
        storage = run.uri()
        run.log_metrics({"stage": cfg.stage, "metric": cfg.metric, "mode": cfg.mode, "trials_planned": n_trials,
                         "concurrent_trials": width, "trial_resources": need,
                         "cluster_resources": {k: ray.cluster_resources().get(k, 0) for k in ("CPU", "GPU")},
                         "scheduler": cfg.scheduler.kind, "search": cfg.search.algorithm,
                         "space": {k: spec for k, spec in flat.items()}})
        # named after the sweep run: a resumed sweep's restored callback finds the new ledger by the same name
        ledger = Ledger.options(name=setup["ledger"], namespace=NAMESPACE).remote()
        release = ReleaseStoppedTrials(setup["ledger"])
        if resume and tune.Tuner.can_restore(f"{storage}/tune"):
            # failed trials stay failed: they were retried `trial_retries` times and reported already
            tuner = tune.Tuner.restore(f"{storage}/tune", trainable, resume_unfinished=True)
        else:
            tuner = tune.Tuner(
                trainable, param_space=param_space(flat),
                tune_config=tune.TuneConfig(metric=cfg.metric, mode=cfg.mode, search_alg=search_alg(cfg, width),
                                            scheduler=scheduler(cfg, flat, max_steps(stage_cfg)),
                                            num_samples=cfg.num_samples, max_concurrent_trials=width),
                run_config=tune.RunConfig(name="tune", storage_path=storage,
                                          failure_config=tune.FailureConfig(max_failures=cfg.trial_retries),
                                          # PBT restores trials from each other's checkpoints; with
                                          # num_to_keep=2 Tune deleted one a restore still needed here
                                          checkpoint_config=tune.CheckpointConfig(num_to_keep=None), verbose=1,
                                          callbacks=[release]))
        try:
            with rollout_serve(cfg.stage), run.time("tune_s"):
                grid = tuner.fit()
        finally:
            leaked = remove_groups(ray.get(ledger.take.remote()))
            ray.kill(ledger)
        run.log_metrics({"worker_groups_released": leaked + release.removed})
        record(run, store, cfg, grid, flat)
    return run.id


class rollout_serve:
    """RL trials deploy their rollout replicas on Serve; the sweep starts Serve once, so that a finishing trial
    (which shuts Serve down only if it started it) never takes its neighbours' replicas with it."""

    def __init__(self, stage: str):
        self.active, self.started = stage == "rl", False

    def __enter__(self):
        if self.active:
            from ray import serve

            from serve.rollout import serve_running

            self.started = not serve_running()
            serve.start(http_options={"location": "NoServer"})
        return self

    def __exit__(self, *exc):
        if self.started:
            from ray import serve

            serve.shutdown()


def record(run, store: RunStore, cfg: Config, grid, flat: dict) -> None:
    """Trial table, curves, best config and model; trial runs a scheduler ended are marked `stopped`."""
    from ray.tune import ExperimentAnalysis

    trials, curves = [], []
    tune_trials = grid._experiment_analysis.trials  # the same order as the results (ResultGrid builds them so)
    # Statuses as Tune saved them when it ended: after a Ctrl-C, the in-memory trials it cleaned up read
    # TERMINATED, while the saved state keeps the RUNNING and PENDING ones a resume will run.
    saved = {t.trial_id: t.status for t in ExperimentAnalysis(grid.experiment_path).trials}
    for result, tune_trial in zip(grid, tune_trials):
        df = result.metrics_dataframe
        rows = [] if df is None or df.empty else df.to_dict("records")
        last = rows[-1] if rows else (result.metrics or {})
        run_id = last.get("run_id")
        params = {k: (result.config or {}).get(k) for k in flat}
        effective = {k[len("effective/"):]: v for k, v in last.items() if k.startswith("effective/")}
        interrupted = saved.get(tune_trial.trial_id) not in ("TERMINATED", "ERROR")
        status = "interrupted" if interrupted else _trial_status(store, run_id, result)
        trials.append({"run_id": run_id, "config": params, "effective": effective or params,
                       "metric": _num(last.get(cfg.metric)), "step": _num(last.get("step")), "status": status,
                       "stopped_early": status == "stopped", "error": _error(result),
                       "failures": tune_trial.num_failures,
                       "seconds": _num(last.get("time_total_s"))})
        curves += [{"trial": run_id, "step": r.get("step"), cfg.metric: _num(r.get(cfg.metric))}
                   for r in rows if r.get(cfg.metric) is not None]
        if status == "stopped" and run_id:
            _mark_stopped(store, run_id, cfg.scheduler.kind, last, rows)
    _stop_orphans(store, run.id)  # runs of trials PBT restarted from another trial's checkpoint
    unfinished = [t for t in trials if t["status"] == "interrupted"]
    run.log_history(curves)
    done = [t for t in trials if t["status"] == "succeeded" and t["metric"] is not None]
    sign = 1 if cfg.mode == "min" else -1
    best = min(done, key=lambda t: sign * t["metric"]) if done else None
    run.log_metrics({"trials": trials, "best": best, "trials_finished": len(done),
                     "trials_stopped_early": sum(t["stopped_early"] for t in trials),
                     "trials_failed": sum(t["status"] == "failed" for t in trials)})
    if unfinished:
        raise RunError(f"sweep interrupted with {len(unfinished)} of {len(trials)} trials unfinished; resume with "
                       f"`raylm sweep --resume {run.id}` (finished trials are kept)")
    if best is None:
        raise RunError(f"sweep {run.id}: no trial finished; errors: "
                       + "; ".join(f"{t['run_id']}: {t['error']}" for t in trials if t["error"]))
    best_run = store.load(best["run_id"])
    stage_cfg = {k: v for k, v in best_run.config.items() if k not in ("root", "name", "ray_address")}
    tmp = tempfile.mkdtemp()
    with open(os.path.join(tmp, f"{cfg.stage}.yaml"), "w") as f:
        f.write(f"# best of sweep {run.id}: {cfg.metric}={best['metric']:.6g} ({cfg.mode}), trial run "
                f"{best['run_id']}\n# run it: raylm run {cfg.stage} --config THIS_FILE\n")
        yaml.safe_dump(stage_cfg, f, sort_keys=False)
    uri = run.upload(tmp, "best")
    run.add_artifact("best_config", "config", f"{uri}/{cfg.stage}.yaml", meta={"trial": best["run_id"]})
    try:
        model = best_run.output(kind="model")
        run.add_artifact("model", "model", model.uri, meta={"trial": best["run_id"], **model.meta})
    except RunError:
        pass  # a stage without a model output


def _num(v):
    try:
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)
    except (TypeError, ValueError):
        return None


def _error(result) -> str | None:
    if result.error is None:
        return None
    text = str(result.error).strip().splitlines()
    return (text[-1] if text else type(result.error).__name__)[:500]


def _trial_status(store: RunStore, run_id: str | None, result) -> str:
    """Tune's verdict first: a trial it saw raise failed; one it ended without error either finished its run or
    was stopped by the scheduler (the run may then read `running`, or `failed` when the stop reached its Train
    controller first: Tune removes the trial's placement group, which holds the controller)."""
    if result.error is not None:
        return "failed"
    if run_id and store.load(run_id).status == "succeeded":
        return "succeeded"
    return "stopped"


def _mark_stopped(store: RunStore, run_id: str, by: str, last: dict, rows: list[dict]) -> None:
    m = store.load(run_id)
    if m.status == "succeeded":
        return
    m.status, m.finished = "stopped", _now()
    m.error = f"stopped early by the {by} scheduler at step {int(last.get('step') or 0)}"
    m.metrics.update({"stopped_early": True, "last_step": last.get("step")})
    store.save_manifest(m)
    # the curve it logged up to the stop (a finished run writes its own history; this one never got there)
    tune_keys = ("run_id", "time_", "timestamp", "training_iteration", "effective/", "config/", "date", "hostname",
                 "node_ip", "pid", "done", "trial_id", "iterations_since_restore", "checkpoint_dir_name",
                 "should_checkpoint")
    clean = [{k: v for k, v in r.items() if not k.startswith(tune_keys) and _num(v) is not None} for r in rows]
    store.write_json(f"{run_id}/{HISTORY}", "".join(json.dumps(r) + "\n" for r in clean))

def _stop_orphans(store: RunStore, sweep_id: str) -> None:
    for m in store.list():
        if m.sweep == sweep_id and m.status == "running":
            m.status, m.finished = "stopped", _now()
            m.error = m.error or "its trial was stopped, interrupted, or restarted from another trial's checkpoint"
            store.save_manifest(m)


# ---------------------------------------------------------------- entry points
def load(config: str | None, overrides: list[str], resume: str | None, root: str | None) -> tuple[Config, Path | None]:
    """A new sweep from YAML + overrides, or an interrupted one from its run's manifest (its inputs as recorded)."""
    if resume:
        store = RunStore(root or os.environ.get("RAYLM_ROOT", "runs"))
        m = store.load(store.resolve_id(resume))
        if m.stage != STAGE:
            raise ConfigError(f"--resume {resume}: run {m.run_id} is a {m.stage} run, not a sweep")
        data = {**m.config, "inputs": {i.role: f"{i.run_id}:{i.artifact}" for i in m.inputs}}
        return load_config(Config, data, overrides), None
    if not config:
        raise ConfigError("give a sweep YAML (tuning/configs/) or --resume SWEEP_RUN_ID")
    extra = [f"root={root}"] if root else []
    return load_config(Config, config, [*overrides, *extra]), Path(config).resolve().parent


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m tuning.sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", help="sweep YAML (tuning/configs/)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the sweep config")
    ap.add_argument("--resume", metavar="SWEEP_RUN_ID", help="continue an interrupted sweep")
    ap.add_argument("--root", help="run store (default $RAYLM_ROOT or ./runs)")
    args, extra = ap.parse_known_args(argv)
    return cli(args.config, [*args.overrides, *extra], args.resume, args.root)


def cli(config, overrides, resume, root) -> str:
    try:
        cfg, origin = load(config, overrides, resume, root)
        run_id = run(cfg, origin, resume=RunStore(cfg.root).resolve_id(resume) if resume else None)
    except (ConfigError, RunError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    store = RunStore(cfg.root)
    best = store.load(run_id).metrics.get("best") or {}
    print(f"sweep run {run_id} succeeded: best {cfg.metric}={best.get('metric')} from trial run "
          f"{best.get('run_id')} with {best.get('effective')}; config: "
          f"{store.load(run_id).output(name='best_config').uri}")
    return run_id


if __name__ == "__main__":
    main()
