"""`raylm`: run a stage, the whole lifecycle, list and inspect runs, diagnose a loss curve, build a report."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from raylm import console
from raylm.config import ConfigError, load_config
from raylm.runs import RunError, RunStore

STAGES = ["curate", "tokenizer", "pretrain", "expand_vocab", "sft", "dpo", "reward", "rl", "evaluate", "serve",
          "report", "distill", "prune", "quantize", "import", "taskset"]  # import: pipelines/import_model.py


def _root(args) -> str:
    return args.root or os.environ.get("RAYLM_ROOT", "runs")


def cmd_run(args) -> None:
    from raylm.stage import execute, recipe as stage_recipe

    recipe = stage_recipe(args.stage)
    overrides = list(args.overrides) + ([f"root={args.root}"] if args.root else [])
    cfg = load_config(recipe.Config, args.config, overrides)
    run_id = execute(recipe, cfg)
    store = RunStore(cfg.root)
    console.say(f"{args.stage} run {run_id} succeeded; manifest: {store.uri(run_id, 'manifest.json')}; "
                f"log: {store.uri(run_id, 'logs', 'driver.log')}")


def cmd_lifecycle(args) -> None:
    from pipelines import lifecycle

    lifecycle.main([args.config, *args.overrides] + ([f"root={args.root}"] if args.root else []))


def cmd_runs(args) -> None:
    store = RunStore(_root(args))
    runs = store.list(args.stage)
    if not runs:
        print(f"no runs in {store.uri()}")
    for m in runs:
        parent = m.parent or "-"
        print(f"{m.run_id:<36} {m.stage:<10} {m.status:<10} {m.timings.get('wall_s', ''):>8}s  parent={parent}")


def cmd_show(args) -> None:
    store = RunStore(_root(args))
    run_id = store.resolve_id(args.run)  # `latest/dpo` works here as it does for stage inputs
    if args.lineage:
        for m in store.lineage(run_id):
            outs = ", ".join(f"{a.name}({a.kind})" for a in m.outputs.values())
            print(f"{m.stage:<10} {m.run_id:<36} {m.status:<10} outputs: {outs}")
        return
    print(store.load(run_id).to_json())


def cmd_diagnose(args) -> None:
    from raylm.train.diagnose import diagnose

    store = RunStore(_root(args))
    m = store.load(store.resolve_id(args.run))
    if m.stage == "rl":  # its logged loss is a policy-gradient surrogate, not a learning curve
        raise RunError(f"run {m.run_id} is an rl run: its loss is a policy-gradient surrogate, nothing to diagnose")
    try:
        d = diagnose(store.history(m.run_id))
    except ValueError as exc:
        raise RunError(f"run {m.run_id} ({m.stage}) has no loss history to diagnose: {exc}") from None
    if args.json:
        print(json.dumps(d, indent=1))
        return
    print(f"{m.stage} run {m.run_id}: {d['label']}\nevidence:")
    for k, v in d["evidence"].items():
        if v is not None:
            print(f"  {k}: {v}")
    print("advice:\n" + "\n".join(f"  - {a}" for a in d["advice"]))


def cmd_report(args) -> None:
    from pipelines import report
    from raylm.stage import execute

    cfg = load_config(report.Config, None, [f"root={_root(args)}",
                                            f"inputs.run={RunStore(_root(args)).resolve_id(args.run)}"])
    run_id = execute(report, cfg)
    print(RunStore(cfg.root).load(run_id).metrics.get("index"))


def cmd_import(args) -> None:
    """Register a local HF directory, an s3:// one or a .gguf file as a `model` run; the run id is the last line."""
    from pipelines import import_model
    from raylm.stage import execute

    given = {"source": args.path, "name": args.name, "gguf_file": args.gguf_file, "dtype": args.dtype}
    cfg = load_config(import_model.Config, {k: v for k, v in given.items() if v is not None},
                      [f"root={_root(args)}", *args.overrides])
    run_id = execute(import_model, cfg)
    x = RunStore(cfg.root).load(run_id).metrics
    console.say(f"imported {args.path}: {x['architecture']['model_type']}, {x['params']:,} params, vocab "
                f"{x['vocab_size']}, context {x['context_length']}, {x['dtype']}, chat template "
                f"{'yes' if x['chat_template'] else 'no'}; manifest: {RunStore(cfg.root).uri(run_id, 'manifest.json')}")
    console.say(run_id)


def cmd_eval(args) -> None:
    """A one-shot `evaluate` run on lm-eval tasks; a local HF directory or GGUF file is imported first."""
    from pipelines import evaluate
    from raylm.stage import execute

    root, model = _root(args), args.model
    if os.path.isdir(model) or model.endswith(".gguf"):
        from pipelines import import_model

        model = execute(import_model, load_config(import_model.Config, None, [f"root={root}", f"source={model}"]))
        console.say(f"imported {args.model} as run {model}")
    tasks = [t for spec in args.tasks for t in spec.split(",") if t]
    overrides = [f"root={root}", f"inputs.model={model}", f"tasks={json.dumps(tasks)}",
                 f"baselines={json.dumps(args.baseline or [])}"]
    if args.dataset:  # for tasks that read a lifecycle dataset (raylm_lifecycle); not the per-checkpoint metrics
        overrides += [f"inputs.dataset={args.dataset}", "lineage_metrics=false"]
    overrides += [f"limit={args.limit}"] if args.limit else []
    overrides += [f"num_fewshot={args.num_fewshot}"] if args.num_fewshot is not None else []
    cfg = load_config(evaluate.Config, args.config, overrides + list(args.overrides))
    run_id = execute(evaluate, cfg)
    console.say(RunStore(root).load(run_id).metrics["task_table"])
    console.say(f"evaluate run {run_id}; samples: {RunStore(root).uri(run_id, 'eval', 'samples')}")


def cmd_serve(args) -> None:
    from serve.main import main as serve_main

    if args.model and "=" in args.model and not os.path.isdir(args.model):  # `raylm serve --config X k=v`
        args.overrides, args.model = [args.model, *args.overrides], None
    serve_main(args.model, args.config, list(args.overrides) + ([f"root={args.root}"] if args.root else []),
               emit=args.emit_config)


def cmd_serve_stats(args) -> None:
    from serve.guard import client_key
    from serve.stats import fetch, format_summary

    summary = fetch(args.url, args.api_key or client_key())
    print(json.dumps(summary, indent=1) if args.json else format_summary(summary))


def cmd_loadtest(args) -> None:
    from serve.loadtest import main as loadtest_main

    loadtest_main(args.argv)


def cmd_sweep(args) -> None:
    from tuning.sweep import cli

    cli(args.config, list(args.overrides), args.resume, args.root)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="raylm", description="Ray-native LLM lifecycle platform")
    root_help = "run store: local dir or fsspec URI (default $RAYLM_ROOT or ./runs)"
    ap.add_argument("--root", help=root_help)
    # `--root` is accepted after the subcommand too (`raylm runs --root DIR`); SUPPRESS keeps a value given before
    # the subcommand from being overwritten by the subparser's default.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", default=argparse.SUPPRESS, help=root_help)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def add(name: str, parents=(common,), **kw):
        return sub.add_parser(name, parents=list(parents), **kw)

    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("--verbose", "-v", action="store_true",
                         help="show everything on the terminal too (it always goes to <run>/logs/driver.log)")
    p = add("run", help="run one stage", parents=[common, verbose])
    p.add_argument("stage", choices=STAGES)
    p.add_argument("--config", help="stage YAML")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.set_defaults(fn=cmd_run)
    p = add("lifecycle", help="run the chained lifecycle", parents=[common, verbose])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(fn=cmd_lifecycle)
    p = add("runs", help="list runs")
    p.add_argument("--stage", choices=STAGES)
    p.set_defaults(fn=cmd_runs)
    p = add("show", help="print a run's manifest (or its lineage)")
    p.add_argument("run")
    p.add_argument("--lineage", action="store_true", help="walk from this run back to the data")
    p.set_defaults(fn=cmd_show)
    p = add("diagnose", help="label a training run's loss curves (healthy, overfitting, ...) with advice")
    p.add_argument("run", help="run id or latest/STAGE")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_diagnose)
    p = add("import", help="register a local HF directory, s3:// directory or .gguf file as a model run",
            parents=[common, verbose])
    p.add_argument("path", help="a local Hugging Face directory, an s3:// directory or a .gguf file")
    p.add_argument("--name", help="a label for the run")
    p.add_argument("--gguf-file", help="a GGUF file inside PATH (a directory)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype (auto: an HF directory as stored, a GGUF dequantized to float32)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the import config")
    p.set_defaults(fn=cmd_import)
    p = add("eval", help="score a model on lm-eval tasks (names or YAML paths), against baselines",
            parents=[common, verbose])
    p.add_argument("model", help="run id, latest/STAGE, a local HF directory or a .gguf file (imported first)")
    p.add_argument("--tasks", action="append", required=True, help="task names or YAML paths, comma-separated")
    p.add_argument("--baseline", action="append", help="a model run to compare with (repeatable)")
    p.add_argument("--dataset", help="a dataset run for tasks that read one (raylm_lifecycle: latest/curate)")
    p.add_argument("--limit", type=int, help="documents per task")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's own)")
    p.add_argument("--config", help="evaluate YAML for everything else (engines, engine, apply_chat_template, ...)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the evaluate config")
    p.set_defaults(fn=cmd_eval)
    p = add("serve", help="serve a model (run id, latest/STAGE or HF dir) on an OpenAI-compatible endpoint")
    p.add_argument("model", nargs="?", help="run id, latest/STAGE or a local HF directory (or ab.versions in config)")
    p.add_argument("--config", help="endpoint YAML (serve/configs/)")
    p.add_argument("--emit-config", metavar="OUT", help="write a Ray Serve config for `serve deploy` and exit")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.set_defaults(fn=cmd_serve)
    p = add("serve-stats", help="summarise a running endpoint's metrics")
    p.add_argument("url")
    p.add_argument("--api-key", help="default: $RAYLM_API_KEY or the first of $RAYLM_API_KEYS")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_serve_stats)
    p = sub.add_parser("loadtest", help="bounded load test of an endpoint (see `raylm loadtest URL --help`)",
                       add_help=False)
    p.add_argument("argv", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_loadtest)
    p = add("sweep", help="Ray Tune sweep over a stage's config (tuning/configs/), each trial a full run")
    p.add_argument("config", nargs="?", help="sweep YAML")
    p.add_argument("--resume", metavar="SWEEP_RUN_ID", help="continue an interrupted sweep")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the sweep config")
    p.set_defaults(fn=cmd_sweep)
    p = add("report", help="build the HTML lineage report for a run")
    p.add_argument("run")
    p.set_defaults(fn=cmd_report)
    return ap


def _root_as_flag(argv: list[str]) -> list[str]:
    """One convention everywhere: `root=DIR` is `--root DIR`, wherever it stands. Commands that take key=value
    overrides keep it as one of them (it is a key of every stage, serve and sweep config)."""
    words = [a for i, a in enumerate(argv) if not a.startswith("-") and (i == 0 or argv[i - 1] != "--root")]
    cmd = words[0] if words else None
    if cmd in ("run", "lifecycle", "serve", "sweep", "loadtest"):
        return argv
    out = []
    for a in argv:
        out += ["--root", a.split("=", 1)[1]] if a.startswith("root=") else [a]
    roots = {out[i + 1] for i, a in enumerate(out[:-1]) if a == "--root"}
    if len(roots) > 1:
        print(f"raylm: error: give the run store once (--root DIR or root=DIR), got {sorted(roots)}", file=sys.stderr)
        raise SystemExit(2)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = parser()
    # `raylm run sft --config X k=v`: argparse ends a subcommand's `nargs="*"` positional at the first option,
    # so overrides after `--config` come back unparsed; they are overrides all the same.
    args, extra = ap.parse_known_args(_root_as_flag(list(sys.argv[1:] if argv is None else argv)))
    bad = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if bad:
        ap.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    quiet = console.session(args.verbose) if hasattr(args, "verbose") else contextlib.nullcontext()
    try:
        with quiet:
            args.fn(args)
    except (ConfigError, RunError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        _name_the_log()
        raise SystemExit(2) from None
    except BaseException:
        _name_the_log()
        raise


def _name_the_log() -> None:
    if console.failed_log():
        print(f"raylm: the full log is {console.failed_log()}", file=sys.stderr)


if __name__ == "__main__":
    main()
