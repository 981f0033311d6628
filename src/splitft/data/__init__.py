"""Data: BIG-bench tasks and their encoding for answer-only fine-tuning."""

from splitft.config import DEFAULT_TASKS
from splitft.data.bigbench import (
    Example,
    fetch_bigbench,
    load_task,
    split_examples,
)
from splitft.data.format import build_datasets, collate, encode_example

__all__ = [
    "DEFAULT_TASKS",
    "Example",
    "build_datasets",
    "collate",
    "encode_example",
    "fetch_bigbench",
    "load_task",
    "split_examples",
]
