"""report: one HTML page for a run's lineage, filled from manifests only (seed 001's technical-report structure).

Walks from the given run back to the data, then adds the evaluate and serve runs that consumed any model of that
lineage. Sections: overview, data, tokenizer, architecture and pre-training (optimizer, schedule, distributed
setup, compute), SFT (LoRA rank/targets/merge), preference alignment (algorithm, loss, beta, rewards), reward model
(Bradley-Terry: held-out pairwise accuracy, chosen vs rejected reward histogram), online RL (algorithm, loss, KL,
rewards, reward/KL/entropy/clip curves, time per step, before/after answers), evaluation (per checkpoint,
deltas, before/after examples, radar chart), serving, environment. Loss and LR curves are drawn
with matplotlib and embedded in the page, so the report is one self-contained file.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
import tempfile

from raylm.config import StageConfig
from raylm.runs import Manifest, RunStore
from raylm.train.diagnose import diagnose
from raylm.train.schedules import schedule_facts

STAGE = "report"
ANY_KIND = ("model", "dataset", "tokenizer", "adapter", "reward_model", "eval", "endpoint", "excluded", "report")
INPUTS = {"run": ANY_KIND}

# The loss written out per algorithm (seed 001 asks for "the full loss expression").
LOSS_FORMULAS = {
    "causal_lm": "L = -(1/N) &Sigma;<sub>t</sub> log p<sub>&theta;</sub>(x<sub>t</sub> | x<sub>&lt;t</sub>)",
    "sft": "L = -(1/|A|) &Sigma;<sub>t&isin;A</sub> log p<sub>&theta;</sub>(y<sub>t</sub> | x, y<sub>&lt;t</sub>), "
           "A = assistant tokens only (prompt masked with -100)",
    "dpo": "L = -log &sigma;(&beta; [(log &pi;<sub>&theta;</sub>(y<sub>w</sub>|x) - log &pi;<sub>ref</sub>(y<sub>w</sub>|x))"
           " - (log &pi;<sub>&theta;</sub>(y<sub>l</sub>|x) - log &pi;<sub>ref</sub>(y<sub>l</sub>|x))])",
    "ipo": "L = (h - 1/(2&beta;))<sup>2</sup>, h = log-ratio margin of chosen over rejected",
    "hinge": "L = max(0, 1 - &beta; h), h = log-ratio margin of chosen over rejected",
    "bradley_terry": "L = -log &sigma;(r<sub>&phi;</sub>(x, y<sub>w</sub>) - r<sub>&phi;</sub>(x, y<sub>l</sub>) - m)"
                     " + c (r<sub>&phi;</sub>(x, y<sub>w</sub>) + r<sub>&phi;</sub>(x, y<sub>l</sub>))<sup>2</sup>,"
                     " m = margin, c = center_coef",
}


class Config(StageConfig):
    title: str = "raylm lineage report"


# ---------------------------------------------------------------- collecting runs
def collect(store: RunStore, run_id: str) -> dict[str, list[Manifest]]:
    """stage -> runs: the lineage of `run_id` plus evaluate/serve/reward runs that used one of its models (a reward
    model is trained beside the chain, from the SFT model, so it is not in the final model's lineage)."""
    lineage = store.lineage(run_id)
    ids = {m.run_id for m in lineage}
    by_stage: dict[str, list[Manifest]] = {}
    for m in lineage:
        by_stage.setdefault(m.stage, []).append(m)
    for stage in ("reward", "evaluate", "serve", "quantize"):
        if stage in by_stage:
            continue
        users = [m for m in store.list(stage) if m.status == "succeeded" and any(i.run_id in ids for i in m.inputs)]
        if users:
            by_stage[stage] = [users[-1]]
    return by_stage


# ---------------------------------------------------------------- figures
def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def curves(history: list[dict], title: str, reward_label: str = "implicit reward") -> str | None:
    """Loss (train/val) and LR against step; for preference and reward stages also chosen/rejected rewards."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    panels = 3 if "reward_chosen" in history[0] else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3))
    ax = axes[0]
    ax.plot(steps, [r["loss"] for r in history], label="train")
    val = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    if val:
        ax.plot(*zip(*val), marker="o", label="validation")
    ax.set(title=f"{title}: loss", xlabel="step")
    ax.legend()
    axes[1].plot(steps, [r["lr"] for r in history], color="tab:green")
    axes[1].set(title=f"{title}: learning rate", xlabel="step")
    if panels == 3:
        axes[2].plot(steps, [r["reward_chosen"] for r in history], label="chosen")
        axes[2].plot(steps, [r["reward_rejected"] for r in history], label="rejected")
        axes[2].set(title=f"{title}: {reward_label}", xlabel="step")
        axes[2].legend()
    fig.tight_layout()
    return _png(fig)


def task_curve(rows: list[dict]) -> str:
    """Continuous evaluation (`train.task_eval`): each task metric against the training step, and the table."""
    scored = [r for r in rows if "error" not in r]
    if not rows:
        return ""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chart = ""
    keys = sorted({k for r in scored for k in r if k != "step"})
    if scored and keys:
        fig, ax = plt.subplots(figsize=(5.5, 3))
        for k in keys:
            ax.plot([r["step"] for r in scored if r.get(k) is not None],
                    [r[k] for r in scored if r.get(k) is not None], marker="o", label=k)
        ax.set(title="lm-eval tasks during training", xlabel="step")
        ax.legend(fontsize=7)
        chart = img(_png(fig))
    return f"<h3>Task scores during training (continuous evaluation)</h3>{chart}{grid(rows)}"


def diagnosis_html(history: list[dict]) -> str:
    """The loss-curve diagnosis of a training run (label and seed 003's advice); empty without a loss history."""
    try:
        d = diagnose(history)
    except ValueError:  # fewer than 3 logged losses: nothing to say
        return ""
    advice = "".join(f"<li>{html.escape(a)}</li>" for a in d["advice"])
    return f"<h3>Loss-curve diagnosis: {html.escape(d['label'])}</h3><ul>{advice}</ul>"


def reward_histogram(chosen: list[float], rejected: list[float]) -> str | None:
    """Held-out rewards of chosen and rejected answers: two overlaid histograms on the same bins."""
    if not chosen or not rejected:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    lo, hi = min(chosen + rejected), max(chosen + rejected)
    bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 31)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for values, label, color in ((rejected, "rejected", "tab:red"), (chosen, "chosen", "tab:blue")):
        ax.hist(values, bins=bins, alpha=0.55, color=color, label=f"{label} (mean {np.mean(values):+.2f})")
    ax.set(title=f"held-out rewards, {len(chosen)} pairs", xlabel="reward r(x, y)", ylabel="answers")
    ax.legend()
    fig.tight_layout()
    return _png(fig)


def radar(models: dict) -> str | None:
    """Per-family exact match of every checkpoint on one polar chart (seed 000's capability radar)."""
    fams = sorted({f for m in models.values() for f in m.get("exact_match_per_family", {})})
    if len(fams) < 3:
        return None
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    angles = [2 * math.pi * i / len(fams) for i in range(len(fams))] + [0.0]
    fig = plt.figure(figsize=(4.5, 4.5))
    ax = fig.add_subplot(polar=True)
    for m in models.values():
        vals = [m["exact_match_per_family"].get(f, 0.0) for f in fams]
        ax.plot(angles, vals + vals[:1], label=m["stage"])
        ax.fill(angles, vals + vals[:1], alpha=0.1)
    ax.set_xticks(angles[:-1], fams)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper right", bbox_to_anchor=(1.3, 1.1))
    return _png(fig)


# ---------------------------------------------------------------- html helpers
def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return html.escape(json.dumps(v, default=str)[:600])
    return html.escape(str(v))


def kv_table(rows: dict) -> str:
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_fmt(v)}</td></tr>" for k, v in rows.items()
                   if v is not None)
    return f"<table class='kv'>{body}</table>"


def grid(rows: list[dict]) -> str:
    if not rows:
        return ""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table class='grid'><tr>{head}</tr>{body}</table>"


def img(b64: str | None) -> str:
    return f"<img src='data:image/png;base64,{b64}'/>" if b64 else ""


def run_header(m: Manifest) -> str:
    inputs = ", ".join(f"{i.role}={i.run_id}:{i.artifact} (sha256 {i.sha256[:12]})" for i in m.inputs) or "none"
    outs = ", ".join(f"{a.name} ({a.kind}, sha256 {a.sha256[:12]})" for a in m.outputs.values())
    return (f"<p class='run'>run <code>{m.run_id}</code> · {m.status} · {m.timings.get('wall_s', '?')} s wall"
            f"<br>inputs: {html.escape(inputs)}<br>outputs: {html.escape(outs)}</p>")


def pick(d: dict, *keys: str) -> dict:
    return {k: d.get(k) for k in keys if d.get(k) is not None}


# ---------------------------------------------------------------- sections
def funnel_chart(rows: list[dict]) -> str | None:
    """Documents entering each curate operator, in pipeline order, with what each removed."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.32 * len(rows) + 0.8))
    names = [r["op"] for r in rows][::-1]
    kept = [r["kept"] for r in rows][::-1]
    removed = [r["removed"] for r in rows][::-1]
    ax.barh(names, kept, color="#4c72b0", label="kept")
    ax.barh(names, removed, left=kept, color="#dd8452", label="removed")
    for y, (k, r) in enumerate(zip(kept, removed)):
        if r:
            ax.text(k + r, y, f" -{r:,}", va="center", fontsize=7)
    ax.set_xlabel("documents")
    ax.set_title("curation funnel (in = kept + removed, per operator)")
    ax.legend(loc="lower right", fontsize=7)
    return _png(fig)


def section_data(m: Manifest) -> str:
    x = m.metrics
    counts = pick(x, "docs_in", "docs_kept", "docs_dropped", "docs_quarantined", "duplicates_removed",
                  "fuzzy_duplicates_removed", "paragraphs_removed", "kept_chars", "kept_pretokens")
    rules = pick(m.config, "source", "sources", "min_chars", "max_chars", "min_alpha_ratio",
                 "max_repeated_line_fraction", "val_percent")
    for key in ("language", "fuzzy_dedup", "mix"):
        if isinstance(m.config.get(key), dict):
            rules.update({f"{key}.{k}": v for k, v in m.config[key].items() if v not in (None, {}, [])})
    per_source = [{"source": s, **v} for s, v in x.get("per_source", {}).items()]
    funnel = [{k: r[k] for k in ("op", "in", "kept", "removed", "seconds", "docs_per_s")} for r in x.get("funnel", [])]
    extra = ""
    if x.get("dedup_graph"):
        extra += f"<h3>Deduplication graph</h3>{kv_table(x['dedup_graph'])}"
    if x.get("pii_replaced"):
        extra += f"<h3>PII replaced (by type)</h3>{kv_table(x['pii_replaced'])}"
    if x.get("mixing"):
        mix = x["mixing"]
        extra += ("<h3>Mixing (target vs achieved share)</h3>"
                  + grid([{"source": s, "target weight": mix["target"].get(s), "rate": round(mix["rates"].get(s, 1), 4),
                           "achieved share": v} for s, v in mix["achieved"].items()]))
    if x.get("tokens"):
        extra += (f"<h3>Tokens</h3>{kv_table({'total': x['tokens']['total'], **{f'tokens/char {s}': v for s, v in x['tokens']['tokens_per_char'].items()}})}"
                  f"<h4>Document length histogram (tokens)</h4>{kv_table(x['tokens']['histogram'])}")
    if x.get("packed"):
        extra += f"<h3>Packed blocks</h3>{grid([{'split': s, **v} for s, v in x['packed'].items()])}"
    return (f"<h2>2. Data (curate)</h2>{run_header(m)}<h3>Counts (in = kept + dropped + quarantined)</h3>"
            f"{kv_table(counts)}<h3>Funnel</h3>{img(funnel_chart(x.get('funnel', [])))}{grid(funnel)}"
            f"<h3>Cleaning rules</h3>{kv_table(rules)}"
            f"<h3>Drop and quarantine reasons</h3>{kv_table({**x.get('drop_reasons', {}), **x.get('quarantine_reasons', {})})}"
            f"{extra}<h3>Sources (mix)</h3>{grid(per_source)}<h3>Splits</h3>{kv_table(x.get('splits', {}))}")


def section_tokenizer(m: Manifest) -> str:
    x = m.metrics
    per = [{"source": s, **v} for s, v in x.get("per_source_val", {}).items()]
    return (f"<h2>3. Tokenizer</h2>{run_header(m)}"
            f"{kv_table({**pick(m.config, 'vocab_size', 'min_frequency', 'path'), **pick(x, 'vocab_size', 'special_tokens', 'tokens_per_char_train', 'tokens_per_char_val', 'chars_per_token_val', 'train_tokens')})}"
            f"<h3>Compression rate per source (held-out, tokens per character)</h3>{grid(per)}")


def _training(m: Manifest, store: RunStore, title: str, **curve_kw) -> tuple[dict, dict, str]:
    cfg = m.config
    optim, train, res = cfg.get("optim", {}), cfg.get("train", {}), cfg.get("resources", {})
    # computed by the schedule itself, so warmup ratio, WSD/decay phases and step milestones are stated right
    schedule = {**(schedule_facts(train.get("max_steps", 0), optim) if optim.get("lr") is not None else {}),
                "optimizer": f"AdamW betas={optim.get('betas')} wd={optim.get('weight_decay')}",
                "grad_clip": optim.get("grad_clip")}
    accum = train.get("grad_accum") or 1
    setup = {"steps": train.get("max_steps"), "batch_size_per_worker": train.get("batch_size"),
             "grad_accum": accum, "global_batch": (train.get("batch_size") or 0) * accum * (res.get("num_workers") or 1),
             "seq_len": train.get("seq_len"),
             "workers": f"{res.get('num_workers')}x {'GPU' if res.get('use_gpu') else 'CPU'}",
             "strategy": res.get("strategy"), "offload": res.get("offload"), "precision": train.get("precision"),
             "activation_checkpointing": train.get("activation_checkpointing"),
             "framework": "Ray Train TorchTrainer" + (" + DeepSpeed" if str(res.get("strategy")).startswith("zero")
                                                      else ""),
             **pick(m.metrics, "stop_reason", "steps_run", "restarts", "resumed_from", "mfu", "peak_memory_bytes",
                    "device_hours")}
    history = store.history(m.run_id)
    return schedule, setup, (img(curves(history, title, **curve_kw)) + diagnosis_html(history)
                             + task_curve(m.metrics.get("task_curve") or []))


def section_pretrain(m: Manifest, store: RunStore) -> str:
    x = m.metrics
    schedule, setup, fig = _training(m, store, "pretrain")
    arch = x.get("architecture", {})
    compute = pick(x, "params", "dataset_tokens", "tokens_seen", "epochs", "flops_per_token", "total_flops",
                   "train_s", "mean_tokens_per_s", "devices")
    result = pick(x, "initial_loss", "final_loss", "initial_val_loss", "final_val_loss", "final_val_ppl")
    return (f"<h2>4. Architecture and pre-training</h2>{run_header(m)}<h3>Architecture</h3>{kv_table(arch)}"
            f"<h3>Training strategy</h3>{kv_table(setup)}<h3>Learning-rate schedule (warmup + annealing)</h3>"
            f"{kv_table(schedule)}<h3>Compute</h3>{kv_table(compute)}<h3>Loss</h3>"
            f"<p>{LOSS_FORMULAS['causal_lm']}</p>{kv_table(result)}{fig}")


def section_sft(m: Manifest, store: RunStore) -> str:
    x = m.metrics
    schedule, setup, fig = _training(m, store, "sft")
    lora = m.config.get("lora")
    kind = (lora or {}).get("method", "lora")
    if not lora or kind == "full":
        method = {"method": "full fine-tuning"}
    else:
        method = {"method": f"{kind} (PEFT)",
                  **({"rank": lora["rank"], "alpha": lora["alpha"], "dropout": lora["dropout"]}
                     if kind in ("lora", "dora", "qlora") else {}),
                  **({"virtual tokens": lora.get("num_virtual_tokens")} if kind in ("prefix", "prompt") else {}),
                  "target_modules": lora.get("target_modules") if kind not in ("bitfit", "prefix", "prompt") else "-",
                  "fully trained modules": lora.get("modules_to_save") or "none",
                  "merge": x.get("merge_note") or ("merged into the base weights for export" if x.get("merged", True)
                                                   else "not merged: serve with the adapter"),
                  **pick(x, "incremental_from")}
    data = pick(x, "examples", "epochs", "trainable_params", "params", "adapter_params", "replay_rows",
                "replay_ratio_achieved")
    result = pick(x, "initial_loss", "final_loss", "initial_val_loss", "final_val_loss")
    return (f"<h2>5. Supervised fine-tuning</h2>{run_header(m)}<h3>Method</h3>{kv_table(method)}"
            f"<h3>Data</h3>{kv_table({'data': 'synthetic instruction tasks (tasks_train split)', **data})}"
            f"<h3>Training</h3>{kv_table({**setup, **schedule})}<h3>Loss</h3><p>{LOSS_FORMULAS['sft']}</p>"
            f"{kv_table(result)}{fig}")


def section_preference(m: Manifest, store: RunStore) -> str:
    x = m.metrics
    schedule, setup, fig = _training(m, store, m.stage)
    algo = m.config.get("loss", "dpo")
    info = {"algorithm": algo, "beta (KL strength)": m.config.get("beta"),
            "label_smoothing": m.config.get("label_smoothing"), "rpo_alpha": m.config.get("rpo_alpha"),
            "reference": x.get("reference"),
            "reward model": "none: implicit reward r = beta * log(pi/pi_ref)", "value network": "none",
            "preference pairs": x.get("pairs"), "pair source": "task answer (chosen) vs plausible wrong answer"}
    result = pick(x, "initial_loss", "final_loss", "final_reward_margin", "final_reward_accuracy",
                  "val_reward_accuracy", "val_reward_margin")
    formula = LOSS_FORMULAS.get(algo, algo)
    if m.config.get("rpo_alpha"):
        formula += (f" + {m.config['rpo_alpha']} &middot; (-(1/|y<sub>w</sub>|) log &pi;<sub>&theta;</sub>(y<sub>w</sub>|x))"
                    " (RPO: NLL of the chosen answer)")
    return (f"<h2>6. Preference alignment ({html.escape(algo)})</h2>{run_header(m)}{kv_table(info)}"
            f"<h3>Loss</h3><p>{formula}</p><h3>Training</h3>{kv_table({**setup, **schedule})}"
            f"<h3>Result</h3>{kv_table(result)}{fig}")


def section_reward(m: Manifest, store: RunStore) -> str:
    x, c = m.metrics, m.config
    schedule, setup, fig = _training(m, store, "reward", reward_label="reward (score head)")
    lora = c.get("lora")
    method = {"base model": x.get("base_model"),
              "model": "the base model's body + a scalar score head on the last token (sequence classification)",
              "fine-tuning": (f"LoRA (PEFT) rank {lora['rank']}, alpha {lora['alpha']} on {lora['target_modules']}; "
                              "score head trained in full; merged for export") if lora else "full fine-tuning",
              "loss": c.get("loss"), "margin": c.get("margin"), "center_coef": c.get("center_coef"),
              "pairs (train)": x.get("pairs"), "pairs (held-out)": x.get("val_pairs"),
              "skipped: no rejected answer": x.get("pairs_skipped_missing_rejected_per_split"),
              "pair source": "task answer (chosen) vs plausible wrong answer",
              "trainable_params": x.get("trainable_params")}
    result = pick(x, "heldout_pairs", "heldout_accuracy", "heldout_margin_mean", "reward_chosen_mean",
                  "reward_chosen_std", "reward_rejected_mean", "reward_rejected_std", "initial_loss", "final_loss",
                  "final_accuracy")
    fams = x.get("heldout_accuracy_per_family", {})
    return (f"<h2>7. Reward model</h2>{run_header(m)}<h3>Method</h3>{kv_table(method)}"
            f"<h3>Loss (Bradley-Terry)</h3><p>{LOSS_FORMULAS.get(c.get('loss'), c.get('loss'))}</p>"
            f"<h3>Training</h3>{kv_table({**setup, **schedule})}{fig}"
            f"<h3>Held-out pairs (chance: accuracy 0.5)</h3>{kv_table(result)}"
            f"<h3>Pairwise accuracy per task family</h3>{grid([fams] if fams else [])}"
            f"<h3>Reward distributions, chosen vs rejected (held-out)</h3>"
            f"{img(reward_histogram(x.get('reward_chosen', []), x.get('reward_rejected', [])))}")


RL_LOSS = ("L = -(1/|G|) &Sigma;<sub>i</sub> agg<sub>t</sub> min(&rho;<sub>i,t</sub> A<sub>i,t</sub>, "
           "clip(&rho;<sub>i,t</sub>, 1-&epsilon;<sub>low</sub>, 1+&epsilon;<sub>high</sub>) A<sub>i,t</sub>)"
           " + &beta; KL<sub>k</sub>(&pi;<sub>&theta;</sub> || &pi;<sub>ref</sub>), "
           "&rho; = &pi;<sub>&theta;</sub>/&pi;<sub>old</sub>")
RL_ALGOS = {"grpo": "A = (r - mean<sub>group</sub>) / std<sub>group</sub>",
            "drgrpo": "A = r - mean<sub>group</sub>; token sums / max length",
            "dapo": "A = (r - mean) / std; clip-higher; all-equal groups dropped; token-level mean; overlong penalty",
            "gspo": "sequence-level ratio &rho;<sub>i</sub> = exp(mean<sub>t</sub> log(&pi;<sub>&theta;</sub>/&pi;<sub>old</sub>))",
            "rloo": "A = r - mean of the other k-1 samples",
            "reinforce_pp": "A = whitened returns-to-go of per-token rewards (batch)",
            "ppo": "A = GAE(&gamma;, &lambda;) from a critic; + c<sub>v</sub> clipped value loss"}


def rl_curves(history: list[dict]) -> str | None:
    """Reward (train, held-out), KL and entropy, clip fraction and length, and where each step's seconds went."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3))
    mean = [r["reward_mean"] for r in history]
    std = [r["reward_std"] for r in history]
    axes[0].plot(steps, mean, label="train (mean)")
    axes[0].fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.15)
    held = [(r["step"], r["heldout_reward"]) for r in history if "heldout_reward" in r]
    if held:
        axes[0].plot(*zip(*held), marker="o", label="held-out")
    axes[0].set(title="reward", xlabel="step")
    axes[0].legend()
    axes[1].plot(steps, [r["kl"] for r in history], label="KL to reference")
    axes[1].plot(steps, [r["entropy"] for r in history], label="entropy")
    axes[1].set(title="KL and entropy", xlabel="step")
    axes[1].legend()
    axes[2].plot(steps, [r["clip_frac"] for r in history], label="clip fraction")
    axes[2].plot(steps, [r["response_len"] / max(1, max(x["response_len"] for x in history)) for r in history],
                 label="response length (rel.)")
    axes[2].set(title="clipping and length", xlabel="step")
    axes[2].legend()
    bottom = [0.0] * len(steps)
    for key in ("generate_s", "reward_s", "learn_s", "sync_s"):
        vals = [r.get(key, 0.0) for r in history]
        axes[3].bar(steps, vals, bottom=bottom, label=key.removesuffix("_s"))
        bottom = [b + v for b, v in zip(bottom, vals)]
    axes[3].set(title="seconds per step", xlabel="step")
    axes[3].legend()
    fig.tight_layout()
    return _png(fig)


def section_rl(m: Manifest, store: RunStore) -> str:
    x, c = m.metrics, m.config
    algo = c.get("algorithm", "grpo")
    kl = c.get("kl", {})
    roll = c.get("rollout", {})
    method = {"algorithm": algo, "advantage": RL_ALGOS.get(algo, ""), "group size k": c.get("group_size"),
              "prompts per step (per worker)": c.get("prompts_per_step"), "steps": c.get("max_steps"),
              "max new tokens": c.get("max_new_tokens"), "temperature": c.get("temperature"),
              "KL": f"{kl.get('coef')} x {kl.get('estimator')} in the {kl.get('where')} ({kl.get('controller')})",
              "rewards": c.get("rewards"), "policy": "LoRA" if c.get("lora") else "full fine-tuning",
              "optimizer": f"AdamW lr={c.get('optim', {}).get('lr')}",
              "roles": "actor (trained), reference (frozen input model), reward (functions/model)"
                       + (", critic (value head, same Ray Train job)" if algo == "ppo" else ""),
              "learner": f"Ray Train, {c.get('resources', {}).get('num_workers')} workers "
                         f"({c.get('resources', {}).get('strategy')})",
              "rollouts": f"Ray Serve, {roll.get('replicas')} vLLM replica(s), weights pushed in place every step"}
    result = pick(x, "heldout_reward_before", "heldout_reward_after", "heldout_greedy_reward_before",
                  "heldout_greedy_reward_after", "heldout_prompts", "initial_reward", "final_reward",
                  "weight_version", "replica_versions", "rollout_engine", "train_prompts", "prompts_skipped_too_long",
                  "reward_failures", "mean_step_seconds", "train_s")
    return (f"<h2>8. Online RL ({html.escape(algo)})</h2>{run_header(m)}<h3>Method</h3>{kv_table(method)}"
            f"<h3>Loss</h3><p>{RL_LOSS}</p><h3>Result</h3>{kv_table(result)}"
            f"{img(rl_curves(store.history(m.run_id)))}"
            f"<h3>Before / after on fixed held-out prompts (greedy)</h3>{grid(x.get('examples', []))}")


def sweep_figures(m: Manifest, history: list[dict]) -> str | None:
    """The metric against each swept key (one point per trial) and every trial's curve of it on one plot."""
    trials = [t for t in m.metrics.get("trials", []) if t.get("metric") is not None]
    metric, keys = m.metrics.get("metric"), list(m.metrics.get("space", {}))
    if not trials or not metric:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys) + 1, figsize=(4.2 * (len(keys) + 1), 3.2), squeeze=False)
    colors = {"succeeded": "tab:blue", "stopped": "tab:orange", "failed": "tab:red"}
    for ax, key in zip(axes[0], keys):
        pts = [(t["effective"].get(key, t["config"].get(key)), t["metric"], t["status"]) for t in trials]
        pts = [p for p in pts if isinstance(p[0], (int, float))]
        for status in colors:
            sel = [(x, y) for x, y, s in pts if s == status]
            if sel:
                ax.scatter(*zip(*sel), color=colors[status], label=status)
        if "loguniform" in m.metrics["space"][key] or key.endswith("lr"):
            ax.set_xscale("log")
        ax.set(title=f"{metric} vs {key}", xlabel=key, ylabel=f"{metric} (last reported)")
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    for t in trials:
        rows = [(r["step"], r[metric]) for r in history if r.get("trial") == t["run_id"] and r.get(metric) is not None]
        if rows:
            ax.plot(*zip(*rows), marker=".", color=colors.get(t["status"], "gray"), alpha=0.8)
    ax.set(title=f"all trials: {metric} (orange: stopped early)", xlabel="step")
    fig.tight_layout()
    return _png(fig)


def section_sweep(m: Manifest, store: RunStore) -> str:
    x = m.metrics
    best = x.get("best") or {}
    summary = {**pick(x, "stage", "metric", "mode", "search", "scheduler", "trials_planned", "trials_finished",
                      "trials_stopped_early", "trials_failed", "concurrent_trials", "trial_resources",
                      "cluster_resources", "space"),
               "best trial": best.get("run_id"), "best value": best.get("metric"), "best config": best.get("effective"),
               "best config file": next((a.uri for a in m.outputs.values() if a.kind == "config"), None)}
    rows = [{"run": t["run_id"], **{k: v for k, v in (t.get("effective") or {}).items()}, x.get("metric", "metric"):
             t["metric"], "step": t.get("step"), "status": t["status"], "seconds": t.get("seconds"),
             "error": t.get("error") or ""} for t in x.get("trials", [])]
    return (f"<h2>Sweep ({html.escape(str(x.get('stage')))})</h2>{run_header(m)}{kv_table(summary)}"
            f"<h3>Trials</h3>{grid(rows)}{img(sweep_figures(m, store.history(m.run_id)))}")


def section_eval(m: Manifest) -> str:
    x = m.metrics
    rows = [{"checkpoint": f"{v['stage']} ({rid})", **pick(v, "perplexity", "exact_match", "preference_accuracy",
                                                               "mean_logp_margin", "n_tasks")}
            for rid, v in x.get("models", {}).items()]
    fams = [{"checkpoint": v["stage"], **v.get("exact_match_per_family", {})} for v in x.get("models", {}).values()]
    pref = [{"checkpoint": v["stage"], **{f: f"{a} ({v['mean_logp_margin_per_family'][f]:+.2f})" for f, a in
                                           v.get("preference_accuracy_per_family", {}).items()}}
            for v in x.get("models", {}).values()]
    tasks = ""
    if x.get("task_table"):  # lm-eval tasks: value ± stderr, each baseline and the paired-bootstrap delta
        tasks = (f"<h3>lm-eval tasks</h3><pre>{html.escape(x['task_table'])}</pre>"
                 f"<p>Deltas: model minus baseline on the same documents, 95% paired-bootstrap interval; "
                 f"* marks an interval that excludes 0.</p>")
    if not x.get("models"):
        return f"<h2>9. Evaluation</h2>{run_header(m)}{tasks}"
    return (f"<h2>9. Evaluation</h2>{run_header(m)}{tasks}<p>Held-out text perplexity, exact match on held-out tasks, "
            f"preference accuracy (correct answer more likely than the wrong one).</p>{grid(rows)}"
            f"<h3>Change over the previous checkpoint</h3>{grid(x.get('deltas', []))}"
            f"<h3>Exact match per task family</h3>{grid(fams)}{img(radar(x.get('models', {})))}"
            f"<h3>Preference accuracy per task family (held-out pairs; mean log-prob margin in brackets)</h3>{grid(pref)}"
            f"<h3>Before / after examples</h3>{grid(x.get('examples', []))}")


def section_serve(m: Manifest) -> str:
    x, c = m.metrics, m.config
    engine = {**c.get("engine_kwargs", {}), "accelerator": c.get("accelerator"),
              "replicas (min-max)": f"{c.get('min_replicas')}-{c.get('max_replicas')}",
              "running replicas": x.get("replicas"), **x.get("engine_config", {})}
    result = pick(x, "engine", "url", "model_id", "deploy_s", "completion_latency_ms", "chat_latency_ms",
                  "stream_ttft_ms", "completion", "chat", "bad_request_status", "status_after_bad_request")
    st = x.get("endpoint_stats", {})
    stats = [{"metric": k, **st.get(k, {})} for k in ("ttft_ms", "tpot_ms", "latency_ms") if st.get(k)]
    counts = {"requests": st.get("requests"), "errors by status": st.get("errors"), "error rate": st.get("error_rate"),
              "output tokens/s (last 60 s)": st.get("output_tokens_per_s")}
    return (f"<h2>10. Serving</h2>{run_header(m)}{kv_table(result)}<h3>Engine settings</h3>{kv_table(engine)}"
            f"<h3>Endpoint metrics during the smoke test (ms)</h3>{kv_table(counts)}{grid(stats)}"
            "<p>A long-running endpoint: <code>raylm serve MODEL</code>, metrics with <code>raylm serve-stats URL"
            "</code>, load with <code>raylm loadtest URL</code>.</p>")


COMPRESSION_TITLES = {"distill": "Distillation", "prune": "Pruning", "quantize": "Quantization"}
COMPRESSION_COLUMNS = ("params", "checkpoint_bytes", "perplexity", "exact_match", "forward_ms", "tokens_per_s",
                       "peak_rss_bytes", "served")


def compression_table(comp: dict) -> str:
    """Every model a compression run measured (the input first), side by side, with ratios to the input: all
    figures measured in that run (`raylm.compress.measure.side_by_side`)."""
    models, ratios, ref = comp.get("models", {}), comp.get("ratios", {}), comp.get("reference")
    rows = []
    for name, row in models.items():
        r = ratios.get(name, {})
        cells = {"model": name + (" (reference)" if name == ref else "")}
        for k in COMPRESSION_COLUMNS:
            v = row.get(k)
            ratio = r.get(k)
            cells[k] = v if ratio is None or name == ref else f"{_fmt(v)} ({ratio:.3g}x)"
        if row.get("vllm_error"):
            cells["vLLM error"] = row["vllm_error"][:300]
        rows.append(cells)
    return grid(rows)


def section_compression(m: Manifest, store: RunStore) -> str:
    x = m.metrics
    nested = ("sensitive_layers", "most_sensitive", "pytorch_dynamic_int8", "dims_before", "dims_after",
              "loss_weights", "retention", "vllm_formats")
    facts = {k: v for k, v in x.items() if k != "compression" and (not isinstance(v, (list, dict)) or k in nested)}
    history = store.history(m.run_id)
    fig = img(curves(history, m.stage)) if history else ""
    return (f"<h2>{COMPRESSION_TITLES.get(m.stage, m.stage)}</h2>{run_header(m)}{kv_table(facts)}"
            f"<h3>Side by side (measured in this run; ratio to the reference in brackets)</h3>"
            f"{compression_table(x.get('compression', {}))}{fig}")


STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}table{border-collapse:collapse;"
         "margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:13px;vertical-align:top}"
         "table.kv th{background:#f4f4f4;width:260px}.run{color:#555;font-size:12px}img{max-width:100%}")


def render(store: RunStore, target: str, by_stage: dict[str, list[Manifest]], title: str) -> str:
    order = [m for s in ("import", "curate", "tokenizer", "pretrain", "prune", "distill", "sft", "dpo", "reward",
                         "rl", "evaluate", "quantize", "serve") for m in by_stage.get(s, [])]
    known = {"import", "curate", "tokenizer", "pretrain", "prune", "distill", "sft", "dpo", "reward", "rl",
             "evaluate", "quantize", "serve", "report"}
    order += [m for s, ms in by_stage.items() if s not in known for m in ms]
    chain = " → ".join(f"{m.stage}" for m in order)
    final_model = next((m for s in ("rl", "dpo", "sft", "pretrain", "import") for m in by_stage.get(s, [])), None)
    base = next((by_stage[s][0] for s in ("pretrain", "import") if by_stage.get(s)), None)  # where the model began
    overview = {"target run": target, "pipeline": chain,
                "final model": final_model.output(kind="model").uri if final_model else None,
                "architecture": base.metrics.get("architecture", {}).get("model_type") if base else None,
                "parameters": base.metrics.get("params") if base else None,
                "stage wall time (s)": {m.stage: m.timings.get("wall_s") for m in order}}
    parts = [f"<h1>{html.escape(title)}</h1><h2>1. Overview</h2>{kv_table(overview)}"]
    writers = {"curate": section_data, "tokenizer": section_tokenizer, "evaluate": section_eval,
               "serve": section_serve}
    trainers = {"pretrain": section_pretrain, "sft": section_sft, "dpo": section_preference, "reward": section_reward,
                "rl": section_rl, "sweep": section_sweep, **{s: section_compression for s in COMPRESSION_TITLES}}
    for m in order:
        if m.stage in writers:
            parts.append(writers[m.stage](m))
        elif m.stage in trainers:
            parts.append(trainers[m.stage](m, store))
        else:
            parts.append(f"<h2>{html.escape(m.stage)}</h2>{run_header(m)}{kv_table(m.metrics)}")
    env = order[-1].environment if order else {}
    parts.append(f"<h2>11. Environment and reproducibility</h2>{kv_table(env)}"
                 f"<h3>Resolved configs</h3>" + "".join(
                     f"<details><summary>{m.stage} ({m.run_id})</summary><pre>{html.escape(json.dumps(m.config, indent=1))}"
                     f"</pre></details>" for m in order))
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>" \
           f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>"


def body(run, inputs, cfg: Config) -> None:
    target = inputs["run"].run_id
    by_stage = collect(run.store, target)
    page = render(run.store, target, by_stage, cfg.title)
    local = run.local_dir("report") or tempfile.mkdtemp()
    with open(os.path.join(local, "index.html"), "w") as f:
        f.write(page)
    uri = run.upload(local, "report")
    run.add_artifact("report", "report", uri, meta={"target": target})
    run.log_metrics({"index": f"{uri}/index.html", "target": target,
                     "stages": sorted(by_stage), "runs": [m.run_id for ms in by_stage.values() for m in ms]})


if __name__ == "__main__":
    import sys

    from raylm.stage import cli_main

    cli_main(sys.modules[__name__])
