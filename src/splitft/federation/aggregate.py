"""Layer-wise, sample-weighted aggregation of LoRA adapters of mixed ranks.

Every copy of a layer (client side below the cut, server side above it) is a
*holder* of that layer's adapter keys. A holder of rank ``r_i`` smaller than the
global rank ``r`` holds the first ``r_i`` rank components (HeteroFL-style nested
slices): rows ``A[:r_i, :]`` of ``lora_A`` and columns ``B[:, :r_i]`` of
``lora_B``. Aggregation averages each rank component over exactly the holders
that have it, weighted by their number of training samples; a component or key
held by nobody keeps its global value. ``alpha / r`` is assumed constant across
ranks, so a slice needs no rescaling. See ``docs/aggregation.md``.

All functions are pure: they never modify their inputs and return new tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from splitft.config import AGGREGATIONS
from splitft.ranks import LORA_A, LORA_B, State, kind_of, rank_dim, rank_of

__all__ = ["aggregate", "holders_by_key"]

Update = tuple[State, float]
HOW = AGGREGATIONS  # federation.aggregation


def holders_by_key(updates: Sequence[Update]) -> dict[str, list[int]]:
    """For each key, the indices of the updates that hold it (in update order)."""
    holders: dict[str, list[int]] = {}
    for i, (state, _weight) in enumerate(updates):
        for key in state:
            holders.setdefault(key, []).append(i)
    return holders


def _check_weights(updates: Sequence[Update]) -> list[float]:
    weights = []
    for i, (_state, weight) in enumerate(updates):
        w = float(weight)
        if not (math.isfinite(w) and w > 0):
            raise ValueError(
                f"update {i} has weight {weight!r}; weights are numbers of training "
                "samples and must be finite and > 0"
            )
        weights.append(w)
    return weights


def _check_paired_ranks(state: State, where: str) -> None:
    """The ``lora_A`` and ``lora_B`` of one module must have the same rank."""
    for key, tensor in state.items():
        if kind_of(key) != "A":
            continue
        b_key = key.replace(LORA_A, LORA_B, 1)
        if b_key in state:
            ra, rb = rank_of(key, tensor), rank_of(b_key, state[b_key])
            if ra != rb:
                raise ValueError(
                    f"{where}: {key!r} has rank {ra} but {b_key!r} has rank {rb}"
                )


def _component_first(key: str, tensor: Tensor) -> Tensor:
    """A view with rank components on dim 0 (no-rank keys become one component)."""
    kind = kind_of(key)
    if kind is None:
        return tensor.unsqueeze(0)
    return tensor if kind == "A" else tensor.transpose(0, 1)


def _check_shape(key: str, i: int, g: Tensor, t: Tensor) -> None:
    """A holder's tensor must match the global one except for a smaller rank."""
    bad = t.shape != g.shape
    if kind_of(key) is not None:
        dim = rank_dim(key, g)
        other = 1 - dim
        bad = (
            t.ndim != 2
            or t.shape[other] != g.shape[other]
            or not 1 <= t.shape[dim] <= g.shape[dim]
        )
    if bad:
        raise ValueError(
            f"update {i}: {key!r} has shape {tuple(t.shape)}, incompatible with the "
            f"global shape {tuple(g.shape)}"
        )


def _aggregate_key(
    key: str, g: Tensor, held: list[tuple[Tensor, float]], how: str = "mean"
) -> Tensor:
    """Per-component weighted mean (or median) over the holders of each
    component."""
    acc = torch.float64  # accumulate in float64; cast back to the global dtype
    g_cf = _component_first(key, g).to(acc)
    n_comp = g_cf.shape[0]
    stacked = g_cf.new_zeros((len(held), *g_cf.shape))
    ranks = []
    for h, (t, _w) in enumerate(held):  # loop over holders, not over components
        t_cf = _component_first(key, t).to(device=g.device, dtype=acc)
        stacked[h, : t_cf.shape[0]] = t_cf
        ranks.append(t_cf.shape[0])
    # mask[h, c]: holder h has component c (nested slices: c < rank_h)
    mask = torch.arange(n_comp, device=g.device) < torch.tensor(
        ranks, device=g.device
    ).unsqueeze(1)
    w = torch.tensor([w for _t, w in held], dtype=acc, device=g.device)
    cw = mask.to(acc) * w.unsqueeze(1)  # (holders, components)
    den = cw.sum(0)
    num = torch.einsum("hc,hc...->c...", cw, stacked)
    expand = (n_comp,) + (1,) * (g_cf.ndim - 1)
    held_any = (den > 0).view(expand)
    mean = num / den.clamp_min(torch.finfo(acc).tiny).view(expand)
    if how == "median":  # holders without a component do not vote on it
        votes = mask.view(*mask.shape, *(1,) * (g_cf.ndim - 1))
        nan = torch.full_like(stacked, float("nan"))
        mean = torch.where(votes, stacked, nan).nanquantile(0.5, dim=0)
    # where nobody holds a component, keep the global value bit for bit
    out_cf = torch.where(held_any, mean, g_cf).to(g.dtype)
    kind = kind_of(key)
    if kind is None:
        out = out_cf.squeeze(0)
    else:
        out = out_cf if kind == "A" else out_cf.transpose(0, 1)
    # torch.where made a new tensor, so the result never aliases an input
    return out.contiguous()


def aggregate(
    global_state: State, updates: Sequence[Update], how: str = "mean"
) -> dict[str, Tensor]:
    """New global adapter from holders' updates of mixed ranks and key subsets.

    For every key and every rank component ``c`` (row ``c`` of ``lora_A``,
    column ``c`` of ``lora_B``), the result is the sample-weighted mean over
    the holders that hold the key with rank ``> c`` (``how="median"``: their
    coordinate-wise median, unweighted, the mean of the two middle values
    for an even count). Components and keys held by nobody keep their global
    value.

    Args:
        global_state: full-rank global adapter (key -> tensor).
        updates: ``(holder_state, weight)`` pairs; ``holder_state`` holds a
            subset of the global keys at ranks ``<=`` the global rank, and
            ``weight`` is the holder's number of training samples (``> 0``).
        how: ``"mean"`` or ``"median"`` (``federation.aggregation``).

    Returns:
        A new state dict with the keys, shapes and dtypes of ``global_state``.

    Raises:
        ValueError: a weight is not ``> 0`` (names the update index), a shape is
            incompatible other than by a smaller rank, a module's A and B
            ranks disagree (names the key and shapes), or ``how`` is unknown.
        KeyError: a holder has a key the global adapter lacks (names the key).
    """
    if how not in HOW:
        raise ValueError(f"how={how!r} is not one of {HOW}")
    weights = _check_weights(updates)
    _check_paired_ranks(global_state, "global adapter")
    for i, (state, _w) in enumerate(updates):
        for key in state:
            if key not in global_state:
                raise KeyError(
                    f"update {i} holds {key!r}, which the global adapter lacks"
                )
        _check_paired_ranks(state, f"update {i}")
    holders = holders_by_key(updates)

    out: dict[str, Tensor] = {}
    for key, g in global_state.items():
        idx = holders.get(key, [])
        if not idx:
            out[key] = g.clone()
            continue
        held = []
        for i in idx:
            t = updates[i][0][key]
            _check_shape(key, i, g, t)
            held.append((t, weights[i]))
        out[key] = _aggregate_key(key, g, held, how)
    return out
