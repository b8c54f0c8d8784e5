"""Evaluation on the field's benchmarks: lm-evaluation-harness tasks on raylm's vLLM engines (Ray actors)."""
