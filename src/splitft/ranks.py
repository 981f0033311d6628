"""Rank arithmetic of LoRA adapter state: nested slices of rank components.

A LoRA adapter of rank ``r`` holds ``lora_A`` ``(r, in)`` and ``lora_B``
``(out, r)``; a holder of rank ``r_i <= r`` holds the first ``r_i`` components
(rows ``A[:r_i, :]``, columns ``B[:, :r_i]``: HeteroFL-style nested slices).
These helpers are used by the split server (what a client receives and sends),
the cost model (message sizes) and aggregation (``federation/aggregate.py``),
so they live below all three. All are pure: inputs are never modified.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

State = Mapping[str, Tensor]

LORA_A = ".lora_A."
LORA_B = ".lora_B."


def kind_of(key: str) -> str | None:
    """``"A"``, ``"B"`` or ``None`` for keys that carry no rank (bias, magnitude)."""
    if LORA_A in key:
        return "A"
    if LORA_B in key:
        return "B"
    return None


def rank_dim(key: str, tensor: Tensor) -> int:
    """The dimension of ``tensor`` indexing rank components (A: 0, B: 1)."""
    kind = kind_of(key)
    if kind is None:
        raise ValueError(
            f"{key!r} is neither a lora_A nor a lora_B key; it has no rank"
        )
    if tensor.ndim != 2:
        raise ValueError(
            f"{key!r} must be a 2-D LoRA matrix, got shape {tuple(tensor.shape)}"
        )
    return 0 if kind == "A" else 1


def rank_of(key: str, tensor: Tensor) -> int:
    """The LoRA rank of one adapter tensor.

    Args:
        key: adapter key containing ``.lora_A.`` (shape ``(r, in)``) or
            ``.lora_B.`` (shape ``(out, r)``).
        tensor: the adapter matrix.

    Returns:
        ``r``: rows of ``lora_A``, columns of ``lora_B``.

    Raises:
        ValueError: the key is neither A nor B, or the tensor is not 2-D.
    """
    return int(tensor.shape[rank_dim(key, tensor)])


def slice_rank(key: str, tensor: Tensor, rank: int) -> Tensor:
    """The first ``rank`` components of a LoRA tensor, as a new tensor.

    Args:
        key: adapter key; ``.lora_A.`` keys are sliced by rows, ``.lora_B.`` keys
            by columns. Other keys (bias, DoRA magnitude) have no rank and are
            returned unchanged (copied) whatever ``rank`` is.
        tensor: the full tensor.
        rank: how many leading components to keep, ``1 <= rank <= rank_of(...)``.

    Returns:
        A copy, so callers may train it in place without touching ``tensor``.

    Raises:
        ValueError: ``rank`` is out of range for this tensor.
    """
    if kind_of(key) is None:
        return tensor.clone()
    full = rank_of(key, tensor)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full:
        raise ValueError(
            f"{key!r}: cannot slice rank {rank!r} from a rank-{full} tensor"
        )
    dim = rank_dim(key, tensor)
    return tensor.narrow(dim, 0, rank).clone()


def truncate_to(global_state: State, ranks: Mapping[str, int]) -> dict[str, Tensor]:
    """What a holder receives: each key in ``ranks`` sliced to its rank.

    Args:
        global_state: the full-rank global adapter.
        ranks: key -> rank the holder uses for that key (ignored for keys that
            carry no rank).

    Returns:
        A new state dict with exactly the keys of ``ranks``.

    Raises:
        KeyError: a key of ``ranks`` is missing from ``global_state``.
        ValueError: a rank is out of range.
    """
    out: dict[str, Tensor] = {}
    for key, rank in ranks.items():
        if key not in global_state:
            raise KeyError(f"{key!r} is not in the global adapter")
        out[key] = slice_rank(key, global_state[key], rank)
    return out


def drift(state: State, keys, new: State, old: State) -> float:
    """How far one holder's layers ended from the aggregate, relative to how
    far the aggregate moved: ``|theta_i - new| / |new - old|`` over ``keys``
    of ``state`` (each compared at the holder's rank; 0 if nothing moved)."""
    far = moved = 0.0
    for key in keys:
        t = state[key]
        rank = rank_of(key, t)
        after = slice_rank(key, new[key], rank)
        before = slice_rank(key, old[key], rank)
        far += float((t - after).pow(2).sum())
        moved += float((after - before).pow(2).sum())
    return (far / moved) ** 0.5 if moved > 0 else 0.0
