"""The round strategy: who trains, at which cut, and what each round showed.

In the spirit of Flower's ``Strategy``: :meth:`Strategy.configure_round`
selects the round's clients and asks the cut-layer policy for their cuts;
:meth:`Strategy.observe_round` hands what the round showed to the policy and
to the planner's beliefs, and reports how far the prediction was off. The
round loop (the coordinator, simulated or deployed) calls these two
around running the round; it owns no decision of its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from splitft.federation.policies import CutPolicy, RoundOutcome, over_budget
from splitft.sim.clock import RoundTiming
from splitft.sim.estimator import Estimator
from splitft.sim.predict import predict_round
from splitft.sim.profiles import Device


@dataclass
class RoundResult:
    """What running a round gave: its timings and the clients' step records."""

    timing: RoundTiming
    steps: list[dict]
    recut: dict[int, float]  # device seconds each client spent moving its cut


@dataclass
class RoundDecision:
    """A round's decisions and the prediction they were made on."""

    round: int
    cuts: dict[int, int]  # selected clients -> cut layer
    predicted: RoundTiming  # the clock's prediction from the beliefs
    planner_s: float  # wall seconds the policy took
    reason: str  # why the cuts changed ("" = they did not)
    over_budget: list[int]  # clients whose cut needs more memory than they have


class Strategy:
    """Client selection plus a cut-layer policy, fed by the round's outcome."""

    def __init__(
        self,
        policy: CutPolicy,
        estimator: Estimator,
        num_clients: int,
        per_round: int,
        seed: int,
    ) -> None:
        self.policy, self.estimator = policy, estimator
        self.num_clients, self.per_round = num_clients, per_round
        self._rng = np.random.default_rng(seed)

    def state_dict(self) -> dict[str, Any]:
        """Client selection, the policy and the beliefs, as a checkpoint keeps them."""
        return {
            "rng": self._rng.bit_generator.state,
            "policy": self.policy.state_dict(),
            "beliefs": self.estimator.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._rng.bit_generator.state = state["rng"]
        self.policy.load_state_dict(state["policy"])
        self.estimator.load_state_dict(state["beliefs"])

    def configure_round(self, rnd: int, devices: dict[int, Device]) -> RoundDecision:
        """Select this round's clients and plan their cuts."""
        chosen = sorted(
            int(c)
            for c in self._rng.choice(self.num_clients, self.per_round, replace=False)
        )
        self.estimator.declare_memory({c: devices[c] for c in chosen})
        t0 = time.perf_counter()
        cuts = self.policy.plan(rnd, chosen)
        planner_s = time.perf_counter() - t0
        world = self.estimator.world
        return RoundDecision(
            round=rnd,
            cuts=cuts,
            predicted=predict_round(cuts, world),
            planner_s=planner_s,
            reason=self.policy.reason,
            over_budget=over_budget(world, cuts, devices),
        )

    def observe_round(
        self, config: RoundDecision, result: RoundResult, drift: dict[int, float]
    ) -> dict[str, Any]:
        """Feed the round to the policy and the beliefs; return its metrics."""
        timing = result.timing
        outcome = RoundOutcome(
            config.round, config.cuts, config.predicted, timing, result.steps, drift
        )
        self.policy.observe(outcome)
        self.estimator.observe(config.cuts, timing, result.steps, result.recut)
        predicted, measured = config.predicted.makespan, timing.makespan
        return {
            "predicted_round_s": predicted,
            "prediction_error": abs(predicted - measured) / measured
            if measured > 0
            else 0.0,
        }
