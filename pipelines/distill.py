"""distill: knowledge distillation from a frozen teacher into a smaller student (Ray Train, the shared loop).

The student is a model run (`inputs.student`, e.g. a pruned model) or a config (`student: {preset, overrides}`,
random init with the teacher's tokenizer). Each Ray Train worker loads the teacher in eval mode without gradients
(`raylm.compress.distill.worker_setup`) and trains the student on loss = alpha * KD + (1 - alpha) * CE
(+ hidden.weight * hidden-state MSE), KD being forward KL, reverse KL or GKD's generalised JSD at a temperature
(x T^2). Data: the curated text blocks (`data: text`, default: every token is a soft target, 3k documents in the
demo set) or the instruction rows (`data: tasks`: answer tokens only; ~1k short answers in the demo set, hence not
the default). `on_policy` (GKD, Agarwal et al. 2024): the student answers the task prompts itself (HF generate in
the worker) and is trained on the teacher's per-token distribution over its own samples.

Recorded: teacher and student, their parameters and the compression ratio, temperature, loss weights and kind,
the curves (kd_loss, ce_loss, hidden_loss, kl_to_teacher on train and held-out), the held-out KL to the teacher
before and after, and `compression` = `raylm.compress.measure.side_by_side(teacher vs student)` (perplexity, exact
match, speed, memory) with `retention` = student / teacher figures from that one measurement.
"""
from __future__ import annotations

from typing import Literal

import ray
from pydantic import Field, field_validator, model_validator

from raylm.compress.distill import DIVERGENCES
from raylm.config import ConfigError, ModelSpec, OptimSpec, ResourcesSpec, Section, TrainSpec, TrainStageConfig
from raylm.stage import require_paths
from raylm.train.launch import fit, resume_point, train_facts
from raylm.train.steps import logged_metrics

STAGE = "distill"
INPUTS = {"teacher": ("model",), "dataset": ("dataset",)}
OPTIONAL_INPUTS = {"student": ("model",)}  # a model run (e.g. `prune`'s output); else the `student` config
METRICS = logged_metrics("distill")


class HiddenSpec(Section):
    """Hidden-state matching: MSE between paired layers' outputs (indices into HF `hidden_states`: 0 = embeddings,
    i = after layer i, negative from the end). Same hidden width only: no learned projection is implemented."""

    weight: float = Field(0.0, ge=0)  # 0: off
    layers: list[tuple[int, int]] = [(-1, -1)]  # (student index, teacher index) pairs


class OnPolicySpec(Section):
    fraction: float = Field(1.0, gt=0, le=1)  # GKD's lambda: the share of training batches sampled by the student
    max_new_tokens: int = Field(8, ge=1)
    temperature: float = Field(1.0, gt=0)  # sampling temperature of the student's answers


class DistillSpec(Section):
    loss: str = "forward_kl"  # forward_kl | reverse_kl | jsd (DIVERGENCES)
    # Measured on the demo (2-layer 64-wide student of the 4-layer teacher, 60 steps, held-out CE vs alpha=0):
    # alpha 0.9 at T 1 gained 0.34 / 0.23 (seeds 0 / 1), alpha 0.5 at T 2 only 0.06 / 0.10.
    temperature: float = Field(1.0, gt=0)
    alpha: float = Field(0.9, ge=0, le=1)  # loss = alpha * KD + (1 - alpha) * CE
    beta: float = Field(0.5, ge=0, le=1)  # jsd only: GKD's interpolation (0 = forward KL, 1 = reverse KL)
    hidden: HiddenSpec = HiddenSpec()
    teacher_dtype: Literal["float32", "bfloat16"] = "float32"  # bfloat16 halves the teacher's memory per worker

    @field_validator("loss")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in DIVERGENCES:
            raise ValueError(f"unknown distillation loss {v!r}; choose one of {sorted(DIVERGENCES)}")
        return v


class MeasureSpec(Section):
    """The side-by-side measurement after training (`raylm.compress.measure.side_by_side`) and the held-out KL."""

    vllm: bool = True  # tokens/s and peak memory through a real vLLM engine (about 30 s per model on 2 cores)
    max_blocks: int = 64
    max_tasks: int = 100
    heldout_rows: int = Field(64, ge=1)  # held-out rows for the KL to the teacher before/after


class Config(TrainStageConfig):
    student: ModelSpec = ModelSpec(preset="tiny", overrides={"num_hidden_layers": 2})  # unused with inputs.student
    distill: DistillSpec = DistillSpec()
    on_policy: OnPolicySpec | None = None  # null: off-policy (the dataset's tokens)
    data: Literal["text", "tasks"] = "text"
    optim: OptimSpec = OptimSpec(lr=3e-3, warmup_steps=10)
    train: TrainSpec = TrainSpec(max_steps=100, batch_size=16, seq_len=128, eval_every=25)
    resources: ResourcesSpec = ResourcesSpec()
    measure: MeasureSpec = MeasureSpec()

    @model_validator(mode="after")
    def _on_policy_needs_prompts(self):
        if self.on_policy is not None and self.data != "tasks":
            raise ValueError("on_policy needs prompts to answer: set data=tasks (text blocks have none)")
        return self


def student_spec(inputs, cfg: Config) -> ModelSpec:
    if "student" in inputs:
        return ModelSpec(path=inputs["student"].uri, preset=None)
    return cfg.student


def check(inputs, cfg: Config) -> None:
    """Everything that can be wrong before a worker starts: splits, tokenizers, architectures, layer indices."""
    from raylm.compress.distill import tokenizer_difference
    from raylm.models import check_architecture, load_tokenizer, model_config

    splits = {"train": "text_train", "val": "text_val"} if cfg.data == "text" else \
        {"train": "tasks_train", "val": "tasks_test"}
    require_paths(STAGE, inputs["dataset"].uri, {f"data={cfg.data} {k}": v for k, v in splits.items()})
    teacher_tok = load_tokenizer(inputs["teacher"].uri)
    if "student" in inputs:
        diff = tokenizer_difference(teacher_tok, load_tokenizer(inputs["student"].uri))
        if diff:
            raise ConfigError(f"inputs.student: its tokenizer differs from the teacher's ({diff}); logit "
                              "distillation needs one vocabulary")
    t_cfg = model_config(ModelSpec(path=inputs["teacher"].uri, preset=None), len(teacher_tok))
    where = "inputs.student" if "student" in inputs else "student"
    try:
        s_cfg = model_config(student_spec(inputs, cfg), len(teacher_tok), teacher_tok)
    except Exception as exc:  # noqa: BLE001 - transformers' own shape errors, reported against the key
        raise ConfigError(f"{where}: {exc}") from None
    check_architecture(s_cfg, where)
    if s_cfg.vocab_size != t_cfg.vocab_size:
        raise ConfigError(f"{where}: {s_cfg.vocab_size} output rows vs the teacher's {t_cfg.vocab_size}: logit "
                          "distillation needs the same vocabulary")
    h = cfg.distill.hidden
    if h.weight:
        if s_cfg.hidden_size != t_cfg.hidden_size:
            raise ConfigError(f"distill.hidden: student hidden_size {s_cfg.hidden_size} != teacher "
                              f"{t_cfg.hidden_size}; hidden-state matching is implemented for equal widths only "
                              "(no learned projection): set distill.hidden.weight=0")
        for s_i, t_i in h.layers:
            for who, i, n in (("student", s_i, s_cfg.num_hidden_layers), ("teacher", t_i, t_cfg.num_hidden_layers)):
                if not -(n + 1) <= i <= n:
                    raise ConfigError(f"distill.hidden.layers: {who} index {i} is out of range: the {who} has "
                                      f"{n} layers, so hidden states 0..{n} (or -{n + 1}..-1)")


def datasets(data: str, tok_path: str, cfg: Config):
    if cfg.data == "text":
        from pipelines.pretrain import packed

        return (packed(f"{data}/text_train", tok_path, cfg.train.seq_len, cfg.train.seed),
                packed(f"{data}/text_val", tok_path, cfg.train.seq_len))
    from pipelines.sft import chat_dataset

    return (chat_dataset(f"{data}/tasks_train", tok_path, cfg.train.seq_len, seed=cfg.train.seed),
            chat_dataset(f"{data}/tasks_test", tok_path, cfg.train.seq_len))


@ray.remote(num_cpus=1)
def measure(teacher: str, student_before: dict, student_after: str, tok_path: str, rows: dict, on_policy: dict | None,
            data: str, cfg: dict, seed: int) -> dict:
    """Held-out KL to the teacher (student before and after training) and the side-by-side comparison."""
    import torch

    from raylm.compress import distill as D
    from raylm.compress import measure as M
    from raylm.models import build_model, load_model, load_tokenizer

    torch.set_num_threads(1)
    tok = load_tokenizer(tok_path)
    t = load_model(teacher).eval()
    before = build_model(ModelSpec(**student_before), tok, seed=seed).eval()
    after = load_model(student_after).eval()
    ids = {k: torch.as_tensor(v) for k, v in rows.items() if k in ("input_ids", "labels", "attention_mask")}
    batches = [{k: v[i: i + 16] for k, v in ids.items()} for i in range(0, len(ids["input_ids"]), 16)]
    extra = dict(on_policy=on_policy, pad_id=tok.pad_token_id, stop_ids=D.stop_ids(tok))
    out = {"heldout_kl_before": D.heldout_kl(before, t, batches, **extra),
           "heldout_kl_after": D.heldout_kl(after, t, batches, **extra)}
    out["compression"] = M.side_by_side(("teacher", teacher), {"student": student_after}, data, cfg)
    return out


def body(run, inputs, cfg: Config) -> None:
    teacher, data = inputs["teacher"].uri, inputs["dataset"].uri
    spec = student_spec(inputs, cfg)
    with run.time("tokenize_s"):
        train, val = datasets(data, teacher, cfg)
    d = cfg.distill
    job = {"objective": "distill", "tokenizer_path": teacher, "model": spec.model_dump(), "lora": None,
           "optim": cfg.optim.model_dump(), "train": cfg.train.model_dump(),
           "distill": {"teacher_path": teacher, "teacher_dtype": d.teacher_dtype, "loss": d.loss,
                       "temperature": d.temperature, "alpha": d.alpha, "beta": d.beta,
                       "hidden_weight": d.hidden.weight, "hidden_layers": [list(p) for p in d.hidden.layers],
                       "on_policy": cfg.on_policy.model_dump() if cfg.on_policy else None}}
    with run.time("train_s"):
        out = fit(job, {"train": train, "val": val}, cfg.resources, run.uri("train"), run.id,
                  resume_from=resume_point(run, cfg.resume_from))
    run.log_metrics(train_facts(out, cfg))
    student_uri = f"{out['checkpoint']}/model"
    run.log_history(out["history"])
    rows = val.take_batch(cfg.measure.heldout_rows, batch_format="numpy")
    m = cfg.measure
    with run.time("measure_s"):
        res = ray.get(measure.remote(teacher, spec.model_dump(), student_uri, teacher, dict(rows),
                                     cfg.on_policy.model_dump() if cfg.on_policy else None, data,
                                     {"vllm": m.vllm, "max_blocks": m.max_blocks, "max_tasks": m.max_tasks,
                                      "seq_len": 128}, cfg.train.seed))
    comp = res["compression"]
    t_row, s_row = comp["models"]["teacher"], comp["models"]["student"]
    ratios = comp["ratios"]["student"]
    run.add_artifact("model", "model", student_uri, meta={"distilled_from": inputs["teacher"].run_id,
                                                          "params": s_row["params"]})
    first, last = out["history"][0], out["history"][-1]
    run.log_metrics({
        "teacher": inputs["teacher"].run_id,
        "student": inputs["student"].run_id if "student" in inputs else spec.model_dump(),
        "teacher_params": t_row["params"], "student_params": s_row["params"],
        "compression_ratio": round(t_row["params"] / s_row["params"], 3),
        "loss_kind": d.loss, "temperature": d.temperature, "alpha": d.alpha,
        "beta": d.beta if d.loss == "jsd" else None, "hidden_weight": d.hidden.weight,
        "hidden_layers": [list(p) for p in d.hidden.layers] if d.hidden.weight else None,
        "on_policy": cfg.on_policy.model_dump() if cfg.on_policy else None, "data": cfg.data,
        "initial_loss": first["loss"], "final_loss": last["loss"],
        "initial_val_loss": first.get("val_loss"), "final_val_loss": last.get("val_loss"),
        "final_val_ce_loss": last.get("val_ce_loss"), "final_val_kl_to_teacher": last.get("val_kl_to_teacher"),
        "heldout_kl_before": res["heldout_kl_before"], "heldout_kl_after": res["heldout_kl_after"],
        "retention": {"perplexity": ratios.get("perplexity"), "exact_match": ratios.get("exact_match"),
                      "note": "student / teacher on the same evaluation (perplexity: lower is better, so > 1 is "
                              "a loss; exact_match: None when the teacher scores 0)"},
        "teacher_eval": {k: t_row.get(k) for k in ("perplexity", "val_loss", "exact_match")},
        "student_eval": {k: s_row.get(k) for k in ("perplexity", "val_loss", "exact_match")},
        "compression": comp, "train_s": out["metrics"].get("train_s"),
    })


if __name__ == "__main__":
    import sys

    from raylm.stage import cli_main

    cli_main(sys.modules[__name__])
