"""Data: generated tasks, BIG-bench tasks and local files, encoded for
response-only fine-tuning."""

from splitft.config import BIGBENCH_TASKS, DEFAULT_TASKS, GENERATED_TASKS
from splitft.data.bigbench import (
    Example,
    fetch_bigbench,
    load_task,
    split_examples,
)
from splitft.data.format import (
    build_datasets,
    collate,
    encode_conversation,
    encode_example,
    render_prompt,
)
from splitft.data.generated import generate
from splitft.data.local import Conversation, load_local

__all__ = [
    "BIGBENCH_TASKS",
    "DEFAULT_TASKS",
    "GENERATED_TASKS",
    "Conversation",
    "Example",
    "build_datasets",
    "collate",
    "encode_conversation",
    "encode_example",
    "fetch_bigbench",
    "generate",
    "load_local",
    "load_task",
    "render_prompt",
    "split_examples",
]
