"""Loads this bundled example's problems.jsonl from next to this file, wherever the package is installed."""
from pathlib import Path

from raylm.harness.code_exec import jsonl_dataset


def load_problems(**_):
    return jsonl_dataset(Path(__file__).with_name("problems.jsonl"))
