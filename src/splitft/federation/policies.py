"""Cut-layer policies: who gets which cut each round (``federation.policy``).

A policy is the pluggable part of the round strategy: ``plan`` picks each
selected client's cut for a round, ``observe`` takes what the round showed.
All of them see the planner's beliefs (:class:`~splitft.sim.estimator.Estimator`)
so they can respect memory budgets; only ``adaptive`` plans on times.
See ``docs/policies.md`` for the rules and the reconstruction of the paper's.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from splitft import config
from splitft.config import PlannerConfig
from splitft.federation import planner
from splitft.sim.clock import RoundTiming
from splitft.sim.estimator import Estimator
from splitft.sim.predict import predict_round


@dataclass
class RoundOutcome:
    """What a finished round tells the policy."""

    round: int
    cuts: dict[int, int]
    predicted: RoundTiming  # the clock's prediction from the beliefs at plan time
    timing: RoundTiming  # what the simulated round took
    steps: list[dict]  # the clients' step records
    drift: dict[int, float] = field(default_factory=dict)  # update vs aggregate


@dataclass
class PolicyContext:
    num_layers: int
    k_min: int
    k_max: int  # resolved: never 0
    fixed: dict[int, int]  # federation.cut_layers per client
    settings: PlannerConfig
    server_side: str
    estimator: Estimator
    rng: np.random.Generator


class CutPolicy:
    """Base: a policy that never changes its mind about anything."""

    name = "base"

    def __init__(self, ctx: PolicyContext) -> None:
        self.ctx = ctx
        self.reason = ""  # why the last plan changed cuts (for the metrics)

    def plan(self, rnd: int, clients: Sequence[int]) -> dict[int, int]:
        raise NotImplementedError

    def observe(self, outcome: RoundOutcome) -> None:
        """Take what a round showed (default: nothing to learn)."""

    def ranges(self, clients: Sequence[int]) -> dict[int, tuple[int, int]]:
        c = self.ctx
        return planner.feasible(c.estimator.world, clients, c.k_min, c.k_max)

    # what a checkpoint keeps of a policy besides its random generator
    state_keys: tuple[str, ...] = ("reason",)

    def state_dict(self) -> dict:
        state = {k: copy.deepcopy(getattr(self, k)) for k in self.state_keys}
        return {"rng": self.ctx.rng.bit_generator.state, **state}

    def load_state_dict(self, state: dict) -> None:
        self.ctx.rng.bit_generator.state = state["rng"]
        for k in self.state_keys:
            setattr(self, k, copy.deepcopy(state[k]))


class Fixed(CutPolicy):
    """``federation.cut_layers``, whatever the devices (may exceed budgets)."""

    name = "fixed"

    def plan(self, rnd, clients):
        return {cid: self.ctx.fixed[cid] for cid in clients}


class RandomCuts(CutPolicy):
    """A uniform cut per client per round within ``[k_min, k_max]`` and memory.

    The baseline of the vehicular ASFL paper's released code, kept inside each
    client's memory budget so it can run at all.
    """

    name = "random"

    def plan(self, rnd, clients):
        rng = self.ctx.rng
        return {
            cid: int(rng.integers(lo, hi + 1))
            for cid, (lo, hi) in self.ranges(clients).items()
        }


class SplitFTRule(CutPolicy):
    """The SplitFT paper's rule, as we reconstruct it (docs/policies.md).

    Start from cuts in proportion to each client's compute speed within its
    range (the fastest client gets its deepest cut). After each round, a client
    whose accuracy (next-token accuracy of its own batches, measured by the
    server's forward before the step that uses them) is above the round's
    mean gets ``round(gamma * L * (acc - mean) / mean)`` more client blocks,
    one below the mean that many fewer, at most ``planner.max_move``.
    """

    name = "splitft"
    state_keys = ("reason", "cuts")

    def __init__(self, ctx: PolicyContext) -> None:
        super().__init__(ctx)
        self.cuts: dict[int, int] = {}

    def _initial(self, ranges) -> dict[int, int]:
        compute = self.ctx.estimator.world.compute
        fastest = min(compute.values())  # device seconds per modelled second
        return {
            cid: lo + round((hi - lo) * fastest / compute[cid])
            for cid, (lo, hi) in ranges.items()
        }

    def plan(self, rnd, clients):
        ranges = self.ranges(clients)
        new = [c for c in clients if c not in self.cuts]
        self.cuts.update(self._initial({c: ranges[c] for c in new}))
        out = {}
        for cid in clients:
            lo, hi = ranges[cid]
            out[cid] = self.cuts[cid] = min(max(self.cuts[cid], lo), hi)
        return out

    def observe(self, outcome):
        """Apply the rule to the round's clients, against the round's mean."""
        tokens: dict[int, int] = {}
        hits: dict[int, float] = {}
        for s in outcome.steps:
            c = s["client"]
            tokens[c] = tokens.get(c, 0) + s["tokens"]
            hits[c] = hits.get(c, 0.0) + s["token_acc"] * s["tokens"]
        accuracy = {c: hits[c] / n for c, n in tokens.items() if n > 0}
        if len(accuracy) < 2 or statistics.fmean(accuracy.values()) <= 0:
            return
        mean = statistics.fmean(accuracy.values())
        g, L = self.ctx.settings.gamma, self.ctx.num_layers
        step = self.ctx.settings.max_move
        for cid, acc in accuracy.items():
            delta = round(g * L * (acc - mean) / mean)
            self.cuts[cid] = outcome.cuts[cid] + max(-step, min(step, delta))


class Adaptive(CutPolicy):
    """Shortest predicted round within memory, re-planned as the beliefs move.

    Plans with :func:`planner.fastest`; moves cuts only when it pays
    (:func:`planner.settle`); with a shared server-side adapter spends
    ``planner.eps`` of round time on giving blocks to the shared adapter
    (:func:`planner.shallower_for_quality`).
    Re-plans every ``planner.replan_every`` rounds, and at once when a
    client's round time missed the prediction by more than
    ``planner.replan_miss`` or a cut no longer fits its memory.
    """

    name = "adaptive"
    state_keys = ("reason", "cuts", "drift", "_since", "_due")

    def __init__(self, ctx: PolicyContext) -> None:
        super().__init__(ctx)
        self.cuts: dict[int, int] = {}
        self.drift: dict[int, float] = {}
        self._since = 0
        self._due = "first plan"
        self._planned_for: frozenset[int] = frozenset()

    def plan(self, rnd, clients):
        c, s = self.ctx, self.ctx.settings
        world = c.estimator.world
        ranges = self.ranges(clients)
        moved = [
            cid
            for cid in clients
            if cid in self.cuts
            and not ranges[cid][0] <= self.cuts[cid] <= ranges[cid][1]
        ]
        if frozenset(clients) != self._planned_for and not self._due:
            # who shares the server decides the best cuts: plan for this set
            self._due = "a different set of clients"
        if moved and not self._due:
            self._due = f"cut no longer fits the memory of clients {moved}"
        self.reason = ""
        if not self._due:
            return {cid: self.cuts[cid] for cid in clients}
        target = planner.fastest(world, clients, c.k_min, c.k_max)
        quality = c.server_side == "shared" and s.eps > 0  # learning, not just time
        if quality:
            budget = target.makespan * (1 + s.eps)
            drift = {cid: d for cid, d in self.drift.items() if cid in clients}
            shared = planner.shallower_for_quality(
                world, target.cuts, ranges, drift, budget
            )
            target = planner.Plan(shared, predict_round(shared, world).makespan)
        previous = {cid: self.cuts[cid] for cid in clients if cid in self.cuts}
        cuts = planner.settle(
            world,
            previous,
            target,
            ranges,
            s.max_move,
            s.min_gain,
            max(s.replan_every, 1),
        )
        if quality:  # settle weighs time only; shallower moves are free
            cuts = planner.shallower_for_quality(world, cuts, ranges, drift, budget)
        self.reason, self._due, self._since = self._due, "", 0
        self._planned_for = frozenset(clients)
        self.cuts.update(cuts)
        return dict(cuts)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "planned_for": sorted(self._planned_for)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._planned_for = frozenset(state["planned_for"])

    def observe(self, outcome):
        s = self.ctx.settings
        self._since += 1
        self.drift.update(outcome.drift)
        if s.replan_every and self._since >= s.replan_every:
            self._due = f"every {s.replan_every} rounds"
        if not s.replan_miss:
            return
        for cid, t in sorted(outcome.timing.clients.items()):
            pred = outcome.predicted.clients[cid].finish
            if t.failed or pred <= 0:
                continue
            if abs(t.finish - pred) > s.replan_miss * pred:
                self._due = (
                    f"client {cid} took {t.finish:.2f} s, predicted {pred:.2f} s"
                )
                break


POLICIES: dict[str, type[CutPolicy]] = {
    p.name: p for p in (Fixed, RandomCuts, SplitFTRule, Adaptive)
}
# config.py checks federation.policy against its list: the same names, in order
assert tuple(POLICIES) == config.POLICIES, (tuple(POLICIES), config.POLICIES)


def make_policy(name: str, ctx: PolicyContext) -> CutPolicy:
    try:
        return POLICIES[name](ctx)
    except KeyError:
        raise ValueError(
            f"federation.policy={name!r} is not allowed: one of {sorted(POLICIES)}"
        ) from None


def over_budget(estimator_world, cuts: Mapping[int, int], devices) -> list[int]:
    """Clients whose cut needs more memory than their device has."""
    return sorted(
        cid
        for cid, k in cuts.items()
        if estimator_world.memory(cid, k) > devices[cid].memory
    )
