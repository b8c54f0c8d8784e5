"""How a worker's model is distributed, stepped and checkpointed: FSDP2, DDP or DeepSpeed ZeRO-1/2/3.

The loop in `loop.py` is the same for every strategy; it talks to one of two backends:
- `TorchBackend`: DDP or FSDP2 (`fully_shard` per decoder layer, then the root) with a torch AdamW. Gradient
  accumulation skips the gradient all-reduce on all but the last micro-batch (DDP `no_sync`, FSDP2
  `set_requires_gradient_sync`). Checkpoints are sharded with `torch.distributed.checkpoint` (DCP): each rank
  writes its own shard file, so FSDP2 never gathers the model to save it, and DCP reshards on load.
- `DeepSpeedBackend`: `deepspeed.initialize` with a ZeRO config (stage 1/2/3, optional CPU offload of the optimizer
  state and, for ZeRO-3, the parameters) around the same torch AdamW; DeepSpeed owns accumulation, clipping and
  its sharded checkpoint format (`engine.save_checkpoint`: one optimizer shard file per rank).
Ray Train merges every rank's checkpoint files into one directory, so both formats round-trip through
`ray.train.report` unchanged.
"""
from __future__ import annotations

import os
from contextlib import nullcontext

import torch
import torch.distributed as dist

ZERO_STAGES = {"zero1": 1, "zero2": 2, "zero3": 3}


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def wrap(model, strategy: str):
    """FSDP2 (`fully_shard` per decoder layer, then the root) or DDP. Gloo on CPU, NCCL on GPU (set by Ray Train)."""
    if _world() == 1:
        return model
    if strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for module in model.modules():
            if type(module).__name__.endswith("DecoderLayer"):
                fully_shard(module)
        return fully_shard(model)
    return torch.nn.parallel.DistributedDataParallel(model)


def full_state_dict(model, strategy: str) -> dict:
    """A full CPU state dict on rank 0 (collective under FSDP2: every rank must call it)."""
    if strategy == "fsdp2" and _world() > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    return {k: v.detach().cpu() for k, v in inner.state_dict().items()}


class TorchBackend:
    def __init__(self, model, strategy: str, optim: dict, accum: int):
        self.strategy, self.accum = strategy, accum
        self.model = wrap(model, strategy)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=optim["lr"], betas=tuple(optim["betas"]),
                                     weight_decay=optim["weight_decay"])

    def unwrapped(self):
        return self.model.module if isinstance(self.model, torch.nn.parallel.DistributedDataParallel) else self.model

    def backward(self, loss, last_micro: bool) -> None:
        """Accumulate `loss / accum`; gradients are synchronised across workers on the last micro-batch only."""
        if isinstance(self.model, torch.nn.parallel.DistributedDataParallel) and not last_micro:
            ctx = self.model.no_sync()
        else:
            ctx = nullcontext()
            if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2
                self.model.set_requires_gradient_sync(last_micro)
        with ctx:
            (loss / self.accum).backward()

    def grad_norm(self, clip: float) -> torch.Tensor:
        norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # DTensor under FSDP2

    def step(self, lr: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def skip_step(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    # ------------------------------------------------------------ state
    def full_state_dict(self) -> dict:
        return full_state_dict(self.model, self.strategy)

    def save(self, directory: str) -> None:
        """Collective: every rank writes its shard of model and optimizer state into `directory`."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(self.model, self.opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=directory)

    def load(self, directory: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(self.model, self.opt)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=directory)
        set_state_dict(self.model, self.opt, model_state_dict=state["model"], optim_state_dict=state["optim"])

    @staticmethod
    def has_state(directory: str) -> bool:
        return os.path.exists(os.path.join(directory, ".metadata"))


class DeepSpeedBackend:
    """ZeRO through DeepSpeed's engine (Ray Train has already initialised torch.distributed: gloo on CPU, NCCL on
    GPU, hence `dist_init_required=False`)."""

    TAG = "zero"

    def __init__(self, model, strategy: str, optim: dict, accum: int, batch_size: int, offload: str,
                 precision: str):
        import deepspeed

        self.stage = ZERO_STAGES[strategy]
        zero = {"stage": self.stage}
        if offload in ("optimizer", "all"):
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if offload == "all":
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        config = {
            "train_micro_batch_size_per_gpu": batch_size, "gradient_accumulation_steps": accum,
            "gradient_clipping": optim["grad_clip"], "zero_optimization": zero,
            "bf16": {"enabled": precision == "bf16" and torch.cuda.is_available()},
            # our torch AdamW, also under offload: DeepSpeedCPUAdam needs a compiled extension this install lacks
            "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 1 << 30, "wall_clock_breakdown": False,
        }
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=optim["lr"], betas=tuple(optim["betas"]),
                                weight_decay=optim["weight_decay"])
        self.model, self.opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, model_parameters=params,
                                                          config=config, dist_init_required=False)

    def unwrapped(self):
        return self.model.module

    def backward(self, loss, last_micro: bool) -> None:
        self.model.backward(loss)  # DeepSpeed scales by 1/accum itself
        if not last_micro:
            self.model.step()  # not a boundary: DeepSpeed only counts the micro-step

    def grad_norm(self, clip: float) -> torch.Tensor:
        return torch.tensor(float("nan"))  # known only after `step` (DeepSpeed clips inside it)

    def step(self, lr: float) -> None:
        for g in self.model.optimizer.param_groups:
            g["lr"] = lr
        self.model.step()

    def last_grad_norm(self) -> torch.Tensor:
        norm = self.model.get_global_grad_norm()
        return torch.as_tensor(float(norm) if norm is not None else float("nan"))

    def skip_step(self) -> None:
        self.model.zero_grad()

    def full_state_dict(self) -> dict:
        """Collective: ZeRO-3 gathers each parameter's shards; ZeRO-1/2 keep full parameters on every rank."""
        module = self.model.module
        if self.stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}

    def save(self, directory: str) -> None:
        self.model.save_checkpoint(directory, tag=self.TAG)

    def load(self, directory: str) -> None:
        path, _ = self.model.load_checkpoint(directory, tag=self.TAG)
        if path is None:
            raise RuntimeError(f"no DeepSpeed checkpoint under {directory}")

    @classmethod
    def has_state(cls, directory: str) -> bool:
        return os.path.isdir(os.path.join(directory, cls.TAG))


def create(model, job: dict):
    tc, oc = job["train"], job["optim"]
    accum = tc.get("grad_accum", 1)
    if job["strategy"] in ZERO_STAGES:
        return DeepSpeedBackend(model, job["strategy"], oc, accum, tc["batch_size"], job.get("offload", "none"),
                                tc.get("precision", "fp32"))
    return TorchBackend(model, job["strategy"], oc, accum)
