"""What the compression stages share: the decoder layers of a HF causal LM, and calibration text from a dataset
run (quantize's GPTQ/AWQ/SmoothQuant statistics, prune's Wanda activation norms)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from raylm.config import ConfigError, Section
from raylm.runs import local_path

if TYPE_CHECKING:  # torch is imported where it is used: the stages import this module for their config alone
    import torch


class Calibration(Section):
    """`samples` blocks of `seq_len` tokens of the dataset run's own text."""

    samples: int = Field(32, ge=1)
    seq_len: int = Field(128, ge=2)
    split: str = "text_train"  # not text_val: quality is measured there


def decoder_layers(model) -> torch.nn.ModuleList | None:
    """The decoder layers of a HF causal LM (`model.model.layers`: Llama, Qwen2, Mistral, ...), or None."""
    import torch

    layers = getattr(getattr(model, "model", None), "layers", None)
    return layers if isinstance(layers, torch.nn.ModuleList) else None


def calibration_blocks(split_uri: str, tok, samples: int, seq_len: int) -> torch.Tensor:
    """(samples, seq_len) token ids from the split's text, packed as pre-training packs it (documents joined by
    EOS, so every token is real text). Read in row batches until 4x the blocks asked are in hand, then `samples`
    spread evenly over them (curated text is grouped by source: the first blocks alone would be one source).
    ConfigError naming both numbers when the split is short."""
    import pyarrow.dataset as pads
    import torch

    want = 4 * samples
    ids: list[int] = []
    for batch in pads.dataset(local_path(split_uri), format="parquet").to_batches(columns=["text"], batch_size=256):
        for enc in tok([t for t in batch.column("text").to_pylist() if t], add_special_tokens=False)["input_ids"]:
            ids.extend(enc + [tok.eos_token_id])
        if len(ids) >= want * seq_len:
            break
    n = len(ids) // seq_len
    if n < samples:
        raise ConfigError(f"calibration.samples={samples} blocks of calibration.seq_len={seq_len} tokens asked, but "
                          f"{split_uri} holds only {n} such blocks")
    blocks = torch.tensor(ids[: n * seq_len]).view(n, seq_len)
    return blocks[torch.linspace(0, n - 1, samples).round().long()]
