"""Model compression: shared measurement (`measure`), quantization (`quant`); distillation and pruning helpers
live beside them. Every figure a compression stage reports comes from `measure`, measured in the same run."""
