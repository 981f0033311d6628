"""Sequence packing: several short examples in one row, still independent.

Examples are concatenated in order into rows of at most ``max_length`` tokens.
Position ids restart at 0 for every example and the batch carries no 2-D
attention mask; transformers then builds a block-diagonal causal mask from the
position ids (``masking_utils.find_packed_sequence_indices``), so no token
attends across an example boundary and each example's logits are the ones it
would get alone. Less compute goes to padding when examples are short.
"""

from __future__ import annotations

from collections.abc import Sequence

from splitft.data.format import IGNORE_INDEX


def pack(rows: Sequence[dict], max_length: int) -> list[dict]:
    """Greedily pack encoded examples, in order, into rows of <= ``max_length``.

    The first label of every example is set to ignore: in a packed row the
    token before it belongs to another example, and unpacked it has no
    predecessor at all, so the loss is the same either way.

    Raises:
        ValueError: an example is longer than ``max_length``.
    """
    packed: list[dict] = []
    row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for i, ex in enumerate(rows):
        n = len(ex["input_ids"])
        if n > max_length:
            raise ValueError(f"example {i} has {n} tokens > max_length={max_length}")
        if row["input_ids"] and len(row["input_ids"]) + n > max_length:
            packed.append(row)
            row = {"input_ids": [], "labels": [], "position_ids": []}
        row["input_ids"] += ex["input_ids"]
        row["labels"] += [IGNORE_INDEX, *ex["labels"][1:]]
        row["position_ids"] += list(range(n))
    if row["input_ids"]:
        packed.append(row)
    return packed
