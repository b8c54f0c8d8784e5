"""dpo: preference optimisation (DPO family: dpo | ipo | hinge) on Ray Train, LoRA on the SFT model.

Pairs come from the instruction tasks: the correct answer is chosen, a plausible wrong one rejected. With LoRA
the reference policy is the same weights with adapters disabled, so no second model is held in memory.
"""
from __future__ import annotations

from pydantic import field_validator

from raylm.config import ConfigError, LoraSpec, OptimSpec, ResourcesSpec, TrainStageConfig, TrainSpec
from raylm.data.tokenize import PreferencePairs
from raylm.losses import PREFERENCE_LOSSES
from raylm.stage import require_paths
from raylm.train.launch import fit, resume_point, train_facts
from raylm.train.peft_menu import check_peft
from raylm.train.steps import logged_metrics
from pipelines.sft import chat_dataset, save_outputs

STAGE = "dpo"
INPUTS = {"model": ("model",), "dataset": ("dataset",)}
METRICS = logged_metrics("preference")  # per log step: what a sweep can optimise


class Config(TrainStageConfig):
    loss: str = "dpo"
    beta: float = 0.1
    label_smoothing: float = 0.0
    rpo_alpha: float = 0.0  # weight of the chosen answer's NLL added to the preference loss (RPO)
    lora: LoraSpec | None = LoraSpec()
    optim: OptimSpec = OptimSpec(lr=1e-3, warmup_steps=10)
    train: TrainSpec = TrainSpec(max_steps=80, batch_size=16, seq_len=48, eval_every=20)
    resources: ResourcesSpec = ResourcesSpec()
    train_split: str = "tasks_train"
    val_split: str = "tasks_test"

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, v: str) -> str:
        if v not in PREFERENCE_LOSSES:
            raise ValueError(f"unknown preference loss {v!r}; choose one of {sorted(PREFERENCE_LOSSES)}")
        return v


def check(inputs, cfg: Config) -> None:
    require_paths(STAGE, inputs["dataset"].uri, {"train_split": cfg.train_split, "val_split": cfg.val_split})
    if cfg.lora and cfg.lora.method in ("bitfit", "full"):
        # the reference policy is the same weights with the adapter disabled: these methods have no adapter
        raise ConfigError(f"dpo: lora.method={cfg.lora.method!r} has no adapter to disable for the reference "
                          "policy; use a PEFT method, or lora: null (full fine-tuning, a frozen copy as reference)")
    check_peft(cfg.lora, inputs["model"].uri, cfg.resources)


def body(run, inputs, cfg: Config) -> None:
    model_uri, data = inputs["model"].uri, inputs["dataset"].uri
    train = chat_dataset(f"{data}/{cfg.train_split}", model_uri, cfg.train.seq_len, PreferencePairs,
                         seed=cfg.train.seed)
    val = chat_dataset(f"{data}/{cfg.val_split}", model_uri, cfg.train.seq_len, PreferencePairs)
    job = {"objective": "preference", "loss": cfg.loss, "beta": cfg.beta, "label_smoothing": cfg.label_smoothing,
           "rpo_alpha": cfg.rpo_alpha,
           "tokenizer_path": model_uri, "model": {"path": model_uri, "preset": None},
           "lora": cfg.lora.model_dump() if cfg.lora else None,
           "optim": cfg.optim.model_dump(), "train": cfg.train.model_dump()}
    with run.time("train_s"):
        out = fit(job, {"train": train, "val": val}, cfg.resources, run.uri("train"), run.id,
                  resume_from=resume_point(run, cfg.resume_from))
    run.log_metrics(train_facts(out, cfg))
    save_outputs(run, out, cfg)
    first, last = out["history"][0], out["history"][-1]
    run.log_metrics({
        "algorithm": cfg.loss + (f" + {cfg.rpo_alpha} x NLL(chosen) (RPO)" if cfg.rpo_alpha else ""),
        "beta": cfg.beta, "rpo_alpha": cfg.rpo_alpha, "pairs": train.count(),
        "reference": "policy with LoRA adapters disabled" if cfg.lora else "frozen copy of the input model",
        "initial_loss": first["loss"], "final_loss": last["loss"],
        "final_reward_margin": last.get("reward_margin"), "final_reward_accuracy": last.get("reward_accuracy"),
        "val_reward_accuracy": last.get("val_reward_accuracy"), "val_reward_margin": last.get("val_reward_margin"),
        "train_s": out["metrics"].get("train_s"), "trainable_params": out["metrics"].get("trainable_params"),
    })


if __name__ == "__main__":
    import sys

    from raylm.stage import cli_main

    cli_main(sys.modules[__name__])
