"""The stage contract: resolve inputs from the run store -> Ray workload -> outputs + manifest.

A recipe in `pipelines/` declares `STAGE`, `Config` (a StageConfig subclass), `INPUTS` (role -> accepted artifact
kinds), `body(run, inputs, cfg)` and optionally `check(inputs, cfg)` (raises ConfigError/RunError for what the
config asks of its inputs, e.g. a split the dataset lacks). `execute` resolves and checks the inputs *before*
anything starts, so a missing artifact or a stage pointed at the wrong parent fails with a clear message and no
half-written run.
"""
from __future__ import annotations

import argparse
import sys
from types import ModuleType

import fsspec

from raylm import console
from raylm.cluster import init_ray
from raylm.config import ConfigError, StageConfig, load_config
from raylm.runs import RunError, RunStore


# Stage names whose recipe module has another name (`import` is a Python keyword).
RECIPE_MODULES = {"import": "import_model"}


def recipe(stage: str) -> ModuleType:
    """The `pipelines` module of a stage name (`import` -> pipelines.import_model)."""
    import importlib

    return importlib.import_module(f"pipelines.{RECIPE_MODULES.get(stage, stage)}")


def resolve_inputs(store: RunStore, stage: str, cfg: StageConfig, accepted: dict[str, tuple[str, ...]],
                   optional: dict[str, tuple[str, ...]] | None = None) -> dict:
    """Required roles (`accepted`) must be given; `optional` roles are resolved when given."""
    optional = optional or {}
    missing = [r for r in accepted if r not in cfg.inputs]
    if missing:
        needs = ", ".join(f"{r} ({'|'.join(k)})" for r, k in accepted.items())
        raise ConfigError(f"{stage}: missing input(s) {', '.join('inputs.' + r for r in missing)}; "
                          f"{stage} needs {needs}")
    extra = [r for r in cfg.inputs if r not in accepted and r not in optional]
    if extra:
        raise ConfigError(f"{stage}: unknown input(s) {', '.join('inputs.' + r for r in extra)}; "
                          f"valid: {', '.join([*accepted, *optional]) or 'none'}")
    roles = {**accepted, **{r: k for r, k in optional.items() if r in cfg.inputs}}
    return {role: store.resolve(role, cfg.inputs[role], kinds) for role, kinds in roles.items()}


def require_paths(stage: str, base_uri: str, names: dict[str, str]) -> None:
    """{config key: relative path}: each must exist under `base_uri` (a dataset's splits, a model's files)."""
    fs, base = fsspec.core.url_to_fs(base_uri)
    have = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(base, detail=False)) if fs.exists(base) else []
    for key, rel in names.items():
        if not fs.exists(f"{base}/{rel}"):
            raise RunError(f"{stage}: {key}={rel!r} not found in {base_uri}; it has: {', '.join(have) or 'nothing'}")


def execute(recipe: ModuleType, cfg: StageConfig, run_id: str | None = None, sweep: str | None = None) -> str:
    """Run one stage; returns the new run id (`run_id` when given: a sweep trial names its run up front)."""
    store = RunStore(cfg.root)
    inputs = resolve_inputs(store, recipe.STAGE, cfg, recipe.INPUTS, getattr(recipe, "OPTIONAL_INPUTS", None))
    if hasattr(recipe, "check"):
        recipe.check(inputs, cfg)
    if getattr(cfg, "resume_from", None):  # a training stage continuing another run: it must have a checkpoint
        from raylm.train.launch import resume_checkpoint

        resume_checkpoint(store, cfg.resume_from)
    resolved = cfg.model_dump(mode="json")
    resolved["inputs"] = {role: f"{ref.run_id}:{ref.artifact}" for role, ref in inputs.items()}
    init_ray(cfg.ray_address)
    with store.start_run(recipe.STAGE, resolved, list(inputs.values()), name=cfg.name, run_id=run_id,
                         sweep=sweep) as run, console.run_log(run), console.stage(recipe.STAGE):
        recipe.body(run, inputs, cfg)
    return run.id


def cli_main(recipe: ModuleType, argv: list[str] | None = None) -> str:
    """`python -m pipelines.STAGE --config X.yaml [k=v ...]`."""
    ap = argparse.ArgumentParser(prog=f"python -m pipelines.{recipe.STAGE}", description=recipe.__doc__)
    ap.add_argument("--config", help="YAML config")
    ap.add_argument("--root", help="run store (the same as the override root=DIR)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=3e-4 inputs.model=RUN_ID")
    args, extra = ap.parse_known_args(argv)
    if any(a.startswith("-") or "=" not in a for a in extra):
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        overrides = [*args.overrides, *extra] + ([f"root={args.root}"] if args.root else [])
        cfg = load_config(recipe.Config, args.config, overrides)
        run_id = execute(recipe, cfg)
    except (ConfigError, RunError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"{recipe.STAGE} run {run_id} succeeded; manifest: {RunStore(cfg.root).uri(run_id, 'manifest.json')}")
    return run_id
