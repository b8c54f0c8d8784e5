"""A sweep's search space: parsed from YAML, checked against the stage's config, turned into Ray Tune domains.

The space mirrors the stage config's nesting; a leaf is a one-key mapping naming the distribution:

    space:
      optim:
        lr: {loguniform: [1.0e-4, 1.0e-2]}
      train:
        batch_size: {choice: [8, 16, 32]}
      lora:
        rank: {grid: [8, 16]}

Distributions: `loguniform`, `uniform` and `randint` take [low, high]; `choice` and `grid` take a list.
Everything is checked before any trial starts, and every error names the key.
"""
from __future__ import annotations

import math
from typing import Any

from raylm.config import ConfigError, deep_merge, load_config

KINDS = ("loguniform", "uniform", "randint", "choice", "grid")


def flatten(space: dict, prefix: str = "") -> dict[str, dict]:
    """Nested space -> {"optim.lr": {"loguniform": [a, b]}, ...}."""
    out: dict[str, dict] = {}
    for key, node in space.items():
        path = f"{prefix}{key}"
        if not isinstance(node, dict) or not node:
            raise ConfigError(f"space.{path}: expected a distribution such as {{loguniform: [1e-4, 1e-2]}} or a "
                              f"section of them, got {node!r}")
        if len(node) == 1 and not isinstance(next(iter(node.values())), dict) and next(iter(node)) not in KINDS:
            raise ConfigError(f"space.{path}: unknown distribution {next(iter(node))!r}; choose one of "
                              f"{', '.join(KINDS)}")
        if any(k in KINDS for k in node):
            if len(node) != 1:
                raise ConfigError(f"space.{path}: one distribution per key, got {sorted(node)}")
            out[path] = node
        else:
            out.update(flatten(node, f"{path}."))
    return out


def unflatten(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for dotted, value in flat.items():
        node = tree
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _is_lr(key: str) -> bool:
    leaf = key.rsplit(".", 1)[-1]
    return leaf == "lr" or leaf.endswith("_lr")


def check_leaf(key: str, spec: dict) -> tuple[str, Any]:
    """(kind, argument) of one leaf, or a ConfigError naming `space.KEY`."""
    kind, arg = next(iter(spec.items()))
    if kind not in KINDS:
        raise ConfigError(f"space.{key}: unknown distribution {kind!r}; choose one of {', '.join(KINDS)}")
    if kind in ("choice", "grid"):
        if not isinstance(arg, list) or not arg:
            raise ConfigError(f"space.{key}: {kind} needs a non-empty list of values, got {arg!r}")
        if _is_lr(key) and any(isinstance(v, (int, float)) and v <= 0 for v in arg):
            raise ConfigError(f"space.{key}: a learning rate must be positive, got {arg!r}")
        return kind, arg
    if (not isinstance(arg, list) or len(arg) != 2 or not all(isinstance(v, (int, float)) for v in arg)):
        raise ConfigError(f"space.{key}: {kind} needs [low, high] numbers, got {arg!r}")
    low, high = arg
    if not low < high:
        raise ConfigError(f"space.{key}: {kind} needs low < high, got [{low}, {high}]")
    if (kind == "loguniform" or _is_lr(key)) and low <= 0:
        raise ConfigError(f"space.{key}: {'a learning rate' if _is_lr(key) else 'loguniform'} bound must be "
                          f"positive, got low={low}")
    if kind == "randint" and not all(isinstance(v, int) for v in arg):
        raise ConfigError(f"space.{key}: randint needs integer bounds, got {arg!r}")
    return kind, arg


def probe_values(kind: str, arg: Any) -> list:
    """Values that stand for a leaf when the stage config validates it (a float range on an int key fails)."""
    if kind in ("choice", "grid"):
        return list(arg)
    low, high = arg
    mid = math.sqrt(low * high) if kind == "loguniform" else (low + high) / 2
    return [low, high - 1 if kind == "randint" else high, int(mid) if kind == "randint" else mid]


def check_against_stage(flat: dict[str, dict], config_cls, base: dict, algorithm: str) -> None:
    """Every key must be a key of the stage config and every value it can take must validate there."""
    for key, spec in flat.items():
        kind, arg = check_leaf(key, spec)
        if kind == "grid" and algorithm in ("optuna", "hyperopt"):
            raise ConfigError(f"space.{key}: grid values need search.algorithm grid or random; {algorithm} samples "
                              f"(use choice)")
        for value in probe_values(kind, arg):
            try:
                load_config(config_cls, deep_merge(base, unflatten({key: value})))
            except ConfigError as exc:
                raise ConfigError(f"space.{key}={value!r} does not fit the stage config: {exc}") from None


def tune_domain(kind: str, arg: Any):
    from ray import tune

    return {"loguniform": lambda: tune.loguniform(*arg), "uniform": lambda: tune.uniform(*arg),
            "randint": lambda: tune.randint(arg[0], arg[1]), "choice": lambda: tune.choice(arg),
            "grid": lambda: tune.grid_search(arg)}[kind]()


def param_space(flat: dict[str, dict]) -> dict:
    """Flat Tune param space keyed by the dotted config key (Tune reports it as `config/optim.lr`)."""
    return {key: tune_domain(*check_leaf(key, spec)) for key, spec in flat.items()}


def scale_lr(params: dict, rule: str, base_batch: int, lr_key: str, batch_key: str, base_lr: float) -> dict:
    """Seed 003's batch-size rule: lr x (batch / base_batch) (linear) or its square root (sqrt). The LR is the
    trial's sampled one, or the stage config's when the sweep does not search it."""
    if rule == "none" or batch_key not in params:
        return dict(params)
    ratio = params[batch_key] / base_batch
    lr = params.get(lr_key, base_lr) * (ratio if rule == "linear" else math.sqrt(ratio))
    return {**params, lr_key: lr}
