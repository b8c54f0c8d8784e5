"""Typed stage configs loaded from YAML with `key=value` overrides.

Every config is a pydantic model that forbids unknown keys. Loading goes through `load_config`, which turns
pydantic's errors into one `ConfigError` that names the bad key and, for an unknown key, lists the valid choices
(with a "did you mean" hint). Nothing starts when a config is invalid.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, ClassVar, Literal, Type, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

T = TypeVar("T", bound="Section")


class ConfigError(ValueError):
    """An invalid config: names the offending key."""


class Section(BaseModel):
    """Base of every config block: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    @model_validator(mode="before")
    @classmethod
    def _merge_nested_defaults(cls, data: Any) -> Any:
        """A partial nested section keeps the stage's own defaults for the keys it does not set.

        (Plain pydantic would rebuild the section from the field type's defaults: `optim: {lr: 1e-4}` on a stage
        whose default warmup is 20 would silently fall back to the generic warmup.)
        """
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name, field in cls.model_fields.items():
            # `key=null` on a field whose default is an empty list or mapping means "none"
            # (`lora.modules_to_save=null`), not a type error.
            if name in out and out[name] is None and isinstance(field.default, (list, dict)) and not field.default:
                out[name] = type(field.default)()
            if isinstance(out.get(name), dict) and isinstance(field.default, BaseModel):
                out[name] = deep_merge(field.default.model_dump(), out[name])
        return out


# ---------------------------------------------------------------- shared parts
class ModelSpec(Section):
    """Where a model comes from: a tiny preset (random init) or a local Hugging Face directory."""

    preset: str | None = "tiny"
    path: str | None = None  # a local HF directory (e.g. a Qwen2.5 or Llama checkpoint); wins over preset
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Overrides of the preset's architecture fields (hidden_size, num_hidden_layers, ...).
    overrides: dict[str, Any] = {}


class OptimSpec(Section):
    """AdamW and the LR schedule; `raylm.train.schedules.lr_at` draws it (the rules are in that module)."""

    lr: float = 1e-3  # peak LR
    min_lr_ratio: float = 0.1  # decaying schedules end at lr * min_lr_ratio (step: the floor)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    warmup_steps: int = 10
    warmup_ratio: float = 0.0  # instead of warmup_steps (then set warmup_steps=0): a fraction of train steps
    schedule: Literal["cosine", "linear", "constant", "step", "wsd", "decay"] = "cosine"
    step_size: int = 0  # step: multiply the LR by step_gamma every step_size steps ...
    step_milestones: list[int] = []  # ... or at these absolute steps
    step_gamma: float = 0.1
    decay_steps: int = 0  # wsd: decay over the last decay_steps steps ...
    decay_ratio: float = 0.0  # ... or over this fraction of the run
    decay_shape: Literal["linear", "cosine", "sqrt"] = "linear"  # wsd and decay; sqrt = 1 - sqrt(progress)

    @model_validator(mode="after")
    def _check_schedule(self):
        # Each message names the key: pydantic reports an after-validator's error against the whole section.
        for key in ("warmup_steps", "step_size", "decay_steps"):
            if getattr(self, key) < 0:
                raise ValueError(f"optim.{key} must be >= 0, got {getattr(self, key)}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_ratio and self.warmup_steps:
            raise ValueError(f"optim.warmup_ratio={self.warmup_ratio} and optim.warmup_steps={self.warmup_steps} "
                             "are both set; set optim.warmup_steps=0 to use the ratio")
        if self.decay_ratio and not 0 < self.decay_ratio <= 1:
            raise ValueError(f"optim.decay_ratio must be in (0, 1], got {self.decay_ratio}")
        if self.schedule == "wsd" and bool(self.decay_steps) == bool(self.decay_ratio):
            raise ValueError("optim.schedule=wsd needs exactly one of optim.decay_steps and optim.decay_ratio, got "
                             f"decay_steps={self.decay_steps} decay_ratio={self.decay_ratio}")
        if self.schedule != "wsd" and (self.decay_steps or self.decay_ratio):
            raise ValueError(f"optim.decay_steps/optim.decay_ratio only apply to schedule=wsd "
                             f"(schedule={self.schedule})")
        if self.schedule == "decay" and (self.warmup_steps or self.warmup_ratio):
            # An annealing run continues from a checkpoint at its peak: a stage's default warmup would re-ramp from 0.
            raise ValueError("optim.schedule=decay runs only the decay from step 0; set optim.warmup_steps=0")
        if self.schedule == "step":
            if bool(self.step_size) == bool(self.step_milestones):
                raise ValueError("optim.schedule=step needs exactly one of optim.step_size and optim.step_milestones")
            if any(m <= 0 for m in self.step_milestones) or self.step_milestones != sorted(set(self.step_milestones)):
                raise ValueError(f"optim.step_milestones must be increasing positive steps, got {self.step_milestones}")
            if not 0 < self.step_gamma <= 1:
                raise ValueError(f"optim.step_gamma must be in (0, 1], got {self.step_gamma}")
        elif self.step_size or self.step_milestones:
            raise ValueError(f"optim.step_size/optim.step_milestones only apply to schedule=step "
                             f"(schedule={self.schedule})")
        return self


class ResourcesSpec(Section):
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    # fsdp2 | ddp (torch), or DeepSpeed ZeRO stage 1 (optimizer state sharded), 2 (+ gradients), 3 (+ parameters)
    strategy: Literal["fsdp2", "ddp", "zero1", "zero2", "zero3"] = "fsdp2"
    # ZeRO only: keep the optimizer state (and with `all`, under ZeRO-3, the parameters) in CPU memory
    offload: Literal["none", "optimizer", "all"] = "none"
    max_failures: int = 0  # Ray Train restarts of the worker group (from the last checkpoint: train.checkpoint_every)

    @model_validator(mode="after")
    def _offload_needs_zero(self):
        if self.offload != "none" and not self.strategy.startswith("zero"):
            raise ValueError(f"resources.offload={self.offload!r} needs a DeepSpeed strategy (zero1|zero2|zero3), "
                             f"not {self.strategy!r}")
        if self.offload == "all" and self.strategy != "zero3":
            raise ValueError("resources.offload='all' offloads parameters, which only ZeRO-3 shards: use zero3")
        return self


class LoraSpec(Section):
    """The fine-tuning method (the name is historical: LoRA came first; `lora:` in YAML keeps working).

    `method` picks what is trained (see `raylm.train.peft_menu`): lora, dora, qlora (LoRA on a 4-bit base, CUDA +
    bitsandbytes only), ia3, prefix, prompt (prompt tuning), bitfit (bias terms only) or full. A field that has no
    effect on the chosen method must keep its default: a rank given to prompt tuning is a config mistake, not a
    no-op to ignore silently.
    """

    method: Literal["lora", "dora", "qlora", "ia3", "prefix", "prompt", "bitfit", "full"] = "lora"
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    # Modules trained in full next to the adapters (PEFT `modules_to_save`). Needed when the chat template brings
    # tokens the base model never saw (ChatML markers on a freshly pre-trained model): their embedding and output
    # rows are random, and low-rank updates of the other layers cannot fix that.
    modules_to_save: list[str] = []
    # ia3: the targets whose *input* is scaled (feed-forward down projections); None: PEFT's default for the model
    # type among target_modules (Llama, Qwen2: down_proj).
    feedforward_modules: list[str] | None = None
    num_virtual_tokens: int | None = None  # prefix/prompt: learned virtual tokens (None: 20)

    # The fields each method reads; any other field must stay at its default.
    USES: ClassVar[dict[str, tuple[str, ...]]] = {
        **dict.fromkeys(("lora", "dora", "qlora"), ("rank", "alpha", "dropout", "target_modules", "modules_to_save")),
        "ia3": ("target_modules", "feedforward_modules", "modules_to_save"),
        **dict.fromkeys(("prefix", "prompt"), ("num_virtual_tokens", "modules_to_save")),
        "bitfit": ("modules_to_save",),
        "full": (),
    }

    @model_validator(mode="after")
    def _fields_fit_method(self):
        used = self.USES[self.method]
        wrong = [f"{k}={getattr(self, k)!r}" for k, f in type(self).model_fields.items()
                 if k != "method" and k not in used and getattr(self, k) != f.default]
        if wrong:
            raise ValueError(f"lora.method={self.method!r} does not use {', '.join(wrong)}; it reads only "
                             f"{', '.join(used) or 'no other field'} (leave the others at their defaults)")
        if self.num_virtual_tokens is not None and self.num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")
        return self


class EarlyStopping(Section):
    """Stop when validation loss has not improved by `min_delta` for `patience` evaluations in a row."""

    patience: int = Field(3, ge=1)
    min_delta: float = Field(0.0, ge=0)


class TaskEvalSpec(Section):
    """Continuous evaluation (raylm.harness.continuous): score snapshots on lm-eval tasks every `every` steps and
    at the end, while training goes on; the curve lands in the run's metrics (`task_curve`) and its report."""

    tasks: list[str] = []  # task names or YAML paths, as for `evaluate`
    every: int = Field(0, ge=0)  # steps between snapshots (0: off)
    limit: int | None = Field(None, gt=0)  # documents per task
    num_fewshot: int | None = Field(None, ge=0)
    apply_chat_template: bool = False
    engine: dict[str, Any] = {}  # vLLM engine arguments

    @model_validator(mode="after")
    def _tasks_when_on(self) -> "TaskEvalSpec":
        if self.every and not self.tasks:
            raise ValueError("task_eval.every is set but task_eval.tasks is empty: name the tasks to score")
        if self.every and self.tasks:
            from raylm.harness.run import check_tasks

            try:
                check_tasks(self.tasks)
            except ConfigError as exc:
                raise ValueError(f"task_eval.{exc}") from None
        return self


class TrainSpec(Section):
    max_steps: int = 100
    batch_size: int = 16  # per worker
    seq_len: int = 128
    eval_every: int = 20
    log_every: int = 5
    seed: int = 0
    shuffle_buffer: int = 1024  # rows reshuffled locally each epoch (0 = data order)
    grad_accum: int = Field(1, ge=1)  # micro-batches per optimizer step (effective batch = batch_size x this x workers)
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast (CPU or GPU); weights and optimizer stay fp32
    activation_checkpointing: bool = False  # recompute decoder-layer activations in backward (memory for compute)
    checkpoint_every: int = Field(0, ge=0)  # steps between resumable sharded checkpoints (0: only at the end)
    stop_at: int | None = Field(None, ge=1)  # stop at this step (schedule still planned for max_steps): resume later
    early_stopping: EarlyStopping | None = None
    task_eval: TaskEvalSpec = TaskEvalSpec()


class StageConfig(Section):
    """Fields every stage has."""

    root: str = "runs"  # run store: a local path or an fsspec URI (s3://bucket/prefix)
    name: str | None = None  # optional human label for the run
    ray_address: str | None = None  # None: connect to RAY_ADDRESS or start a local cluster
    # Input artifacts: role -> "RUN_ID" or "RUN_ID:artifact_name". The first one is the run's parent.
    inputs: dict[str, str] = {}


class ReplaySpec(Section):
    """General text mixed into fine-tuning against forgetting (seed 004: domain:general 7:3)."""

    ratio: float = Field(0.3, gt=0, lt=1)  # the fraction of training rows that are general-text blocks
    split: str = "text_train"  # where the general text comes from: a split of the stage's dataset input


class TrainStageConfig(StageConfig):
    """Fields of every Ray Train stage (pretrain, sft, dpo, reward)."""

    # Continue a stopped or failed run of this stage from its newest checkpoint (a run id or latest/STAGE): model,
    # optimizer, scheduler position, data position and RNG state, with the same config; the new run's history
    # holds the old rows up to that step, then its own.
    resume_from: str | None = None


# ---------------------------------------------------------------- loading
def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is not a section")
        node = nxt
    node[keys[-1]] = value


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict:
    """`["train.lr=3e-4", "name=x"]` -> nested dict; values parsed as YAML scalars/lists."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        _set_path(tree, key.strip(), _scalar(raw))
    return tree


def _scalar(raw: str) -> Any:
    """YAML scalar/list; `3e-4` is a float (YAML 1.1 alone would read it as a string)."""
    if raw == "":
        return ""
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return float(value) if any(c in value.lower() for c in ".e") and value.strip() == value else value
        except ValueError:
            return value
    return value


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _model_at(cls: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that owns the field at `loc` (for listing valid keys)."""
    node: Any = cls
    for part in loc:
        if not (isinstance(node, type) and issubclass(node, BaseModel)):
            return None
        field = node.model_fields.get(str(part))
        if field is None:
            return None
        node = field.annotation
    return node if isinstance(node, type) and issubclass(node, BaseModel) else None


def _explain(cls: type[BaseModel], err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            owner = _model_at(cls, loc[:-1])
            valid = sorted(owner.model_fields) if owner else []
            hint = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            msg = f"unknown key {key!r}"
            if hint:
                msg += f" (did you mean {'.'.join([*map(str, loc[:-1]), hint[0]])!r}?)"
            msg += f"; valid keys here: {', '.join(valid)}"
        else:
            msg = f"bad value for {key!r}: {e['msg']} (got {e.get('input')!r})"
        lines.append(msg)
    what = f"{cls.__module__.rsplit('.', 1)[-1]} config" if cls.__name__ == "Config" else cls.__name__
    return f"invalid {what} from {origin}:\n  " + "\n  ".join(lines)


def load_config(cls: Type[T], source: str | Path | dict | None = None, overrides=()) -> T:
    """Build `cls` from a YAML path (or dict) plus `key=value` overrides; raise ConfigError naming bad keys."""
    origin = "defaults"
    data: dict = {}
    if isinstance(source, dict):
        data, origin = dict(source), "dict"
    elif source is not None:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config {path} is not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config {path} must be a mapping of keys, got {type(loaded).__name__}")
        data, origin = loaded or {}, str(path)
    data = deep_merge(data, parse_overrides(list(overrides)))
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_explain(cls, err, origin)) from None
