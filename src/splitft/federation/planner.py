"""The adaptive cut-layer planner: shortest round within memory budgets.

Pure functions of a :class:`~splitft.sim.predict.World` (what the planner
believes about clients, links and the server); the objective is the round's
makespan as the simulated clock predicts it, server queue included. The
search (see ``docs/policies.md``):

1. each client's feasible cuts: ``[k_min, min(k_max, deepest that fits its
   memory)]``;
2. binary search on the round time T: each client takes the deepest cut that
   finishes alone within T (deeper = less server work), and T is kept if the
   server's total work fits in T on its workers;
3. that plan and every uniform cut are scored by the clock; the best is
   improved client by client (coordinate descent on the clock's makespan)
   until no single move helps.

So the result is never predicted slower than any uniform cut.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from splitft.sim.predict import World, predict_round


class Infeasible(ValueError):
    """A client cannot hold even the smallest allowed cut in its memory."""


@dataclass
class Plan:
    cuts: dict[int, int]
    makespan: float  # predicted, seconds
    seconds: float = 0.0  # planner wall time


def feasible(world: World, clients: Sequence[int], k_min: int, k_max: int):
    """``{client: (lo, hi)}``: the cuts each client may take.

    Raises:
        Infeasible: naming the client, its budget and what ``k_min`` needs.
    """
    out = {}
    for cid in clients:
        hi = world.deepest_fit(cid, k_max)
        if hi < k_min:
            need = world.memory(cid, k_min) / 1e6
            have = world.devices[cid].memory / 1e6
            raise Infeasible(
                f"client {cid} ({world.devices[cid].name}): a memory budget of "
                f"{have:.0f} MB cannot hold k_min={k_min} blocks ({need:.0f} MB)"
            )
        out[cid] = (k_min, hi)
    return out


class _Scorer:
    """``(makespan, mean finish)`` from the clock, memoised.

    The mean finish breaks ties: when two clients are both critical, moving
    one of them does not shorten the round yet, but it frees the server and is
    the step the next move needs.
    """

    def __init__(self, world: World) -> None:
        self.world = world
        self.cache: dict[tuple, tuple[float, float]] = {}

    def __call__(self, cuts: Mapping[int, int]) -> tuple[float, float]:
        key = tuple(sorted(cuts.items()))
        if key not in self.cache:
            t = predict_round(cuts, self.world)
            mean = sum(c.finish for c in t.clients.values()) / len(t.clients)
            self.cache[key] = (t.makespan, mean)
        return self.cache[key]


def _better(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """``a`` beats ``b``: a shorter round, or as short with earlier finishes."""
    rel = 1e-9
    if a[0] < b[0] * (1 - rel):
        return True
    return a[0] <= b[0] * (1 + rel) and a[1] < b[1] * (1 - rel)


def _binary_search(world: World, ranges, tol: float = 1e-3) -> dict[int, int]:
    """Deepest cuts that finish alone within T, for the smallest feasible T."""
    w = world.workload
    n = w.local_steps * w.grad_accum
    solo = {  # a client's round with the server to itself
        cid: {k: predict_round({cid: k}, world).makespan for k in range(lo, hi + 1)}
        for cid, (lo, hi) in ranges.items()
    }
    # a batching server serves a client's work faster by the probed gain
    gain = world.costs.batch_gain if world.server.batching is not None else 1.0
    work = {
        cid: {
            k: n
            * world.server_factor
            * world.costs.server_seconds(k, w.slots[cid], w.labelled[cid], world.tail)
            / gain
            for k in range(lo, hi + 1)
        }
        for cid, (lo, hi) in ranges.items()
    }

    def cuts_for(T: float) -> dict[int, int] | None:
        cuts = {}
        for cid, times in solo.items():
            fits = [k for k, t in times.items() if t <= T]
            if not fits:
                return None
            cuts[cid] = max(fits)
        load = sum(work[cid][k] for cid, k in cuts.items()) / world.server.workers
        return cuts if load <= T else None

    lo = max(min(t.values()) for t in solo.values())
    hi = max(max(t.values()) for t in solo.values())
    hi += sum(max(c.values()) for c in work.values()) / world.server.workers
    best = cuts_for(hi)
    while hi - lo > tol * hi:
        mid = (lo + hi) / 2
        cuts = cuts_for(mid)
        if cuts is None:
            lo = mid
        else:
            hi, best = mid, cuts
    return best


def _descend(score: _Scorer, cuts: dict[int, int], ranges, passes: int = 8):
    """Coordinate descent: move one client's cut while the makespan drops."""
    best = score(cuts)
    for _ in range(passes):
        improved = False
        for cid, (lo, hi) in ranges.items():
            for k in range(lo, hi + 1):
                if k == cuts[cid]:
                    continue
                trial = {**cuts, cid: k}
                m = score(trial)
                if _better(m, best):
                    cuts, best, improved = trial, m, True
        if not improved:
            break
    return cuts, best


def fastest(world: World, clients: Sequence[int], k_min: int, k_max: int) -> Plan:
    """The cuts that minimise the predicted round time (see the module doc)."""
    t0 = time.perf_counter()
    ranges = feasible(world, clients, k_min, k_max)
    score = _Scorer(world)
    candidates = [_binary_search(world, ranges)]
    for k in range(k_min, max(hi for _, hi in ranges.values()) + 1):
        candidates.append(
            {cid: min(max(k, lo), hi) for cid, (lo, hi) in ranges.items()}
        )
    start = min(candidates, key=score)
    cuts, (makespan, _) = _descend(score, dict(start), ranges)
    return Plan(cuts, makespan, time.perf_counter() - t0)


def move_cost(world: World, cid: int, old: int, new: int) -> float:
    """Device seconds a client spends moving its cut: loading the blocks it
    gains (blocks it gives up cost nothing; the adapters of its new blocks
    come with every round's plan anyway, and the round's prediction has them)."""
    return max(new - old, 0) * world.costs.load_block_s * world.compute[cid]


def settle(
    world: World,
    previous: Mapping[int, int],
    target: Plan,
    ranges,
    max_move: int,
    min_gain: float,
    horizon: int,
) -> dict[int, int]:
    """Hysteresis: move from ``previous`` towards ``target`` only if it pays.

    A client goes deeper by at most ``max_move`` blocks at a time (it loads
    each block it gains); it gives blocks back to the server in one go, which
    costs it nothing (the server holds every block, and the adapters come
    with every round's plan anyway), so a client that slowed down is relieved
    at once. Of the full move, the shallower moves alone and the deeper moves
    alone, the one with the shortest predicted round is kept if that round is
    shorter by more than ``min_gain`` (a fraction) and the time saved over
    ``horizon`` rounds beats the largest single client's cost of moving
    (clients move in parallel). A cut that no longer fits its range (a budget
    shrank) moves regardless.
    """
    score = _Scorer(world)
    stay = {}
    for cid, (lo, hi) in ranges.items():
        old = previous.get(cid, target.cuts[cid])
        stay[cid] = min(max(old, lo), hi)
    step = {cid: min(max_move, target.cuts[cid] - stay[cid]) for cid in ranges}
    shallower = {cid: stay[cid] + min(d, 0) for cid, d in step.items()}
    deeper = {cid: stay[cid] + max(d, 0) for cid, d in step.items()}
    both = {cid: stay[cid] + d for cid, d in step.items()}
    candidates = [m for m in (both, shallower, deeper) if m != stay]
    if not candidates:
        return stay
    before = score(stay)[0]
    moved = min(candidates, key=score)
    cost = max(move_cost(world, c, stay[c], moved[c]) for c in ranges)
    gain = before - score(moved)[0]
    if gain > min_gain * before and gain * horizon > cost:
        return moved
    return stay


def shallower_for_quality(
    world: World,
    cuts: Mapping[int, int],
    ranges,
    drift: Mapping[int, float],
    budget: float,
) -> dict[int, int]:
    """Spend round time up to ``budget`` on giving blocks to the shared adapter.

    With a shared server-side adapter every block the server holds is updated
    at every step of every client whose cut lies below it, while a block a
    client holds is updated only by that client's own steps (and averaged in
    at the end of the round); shallower cuts also pull non-IID updates towards
    the others (HASFL/AdaptSFL). So, starting from the fastest plan, blocks
    move to the server one at a time, each time the move that lengthens the
    predicted round least (ties: the client that drifted most from the
    aggregate, then the deepest cut), while the predicted round stays within
    ``budget`` seconds. Giving blocks back costs a client nothing, so there is
    no move limit.
    """
    score = _Scorer(world)
    out = dict(cuts)
    pull = {c: d if math.isfinite(d) else 0.0 for c, d in drift.items()}
    open_ = {cid for cid in out if out[cid] > ranges[cid][0]}
    while open_:
        trials = {
            cid: (score({**out, cid: out[cid] - 1}), -pull.get(cid, 0.0), -out[cid])
            for cid in open_
        }
        cid = min(open_, key=trials.__getitem__)
        if trials[cid][0][0] > budget:
            break
        out[cid] -= 1
        if out[cid] <= ranges[cid][0]:
            open_.discard(cid)
    return out
