"""The planner's beliefs: each client's speed and links, the server's speed.

:class:`Estimator` starts from the world as declared and corrects it with
every round's observations (an exponentially weighted moving average).
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Iterable, Mapping

from splitft.sim.clock import RoundTiming
from splitft.sim.predict import World, predict_round
from splitft.sim.profiles import Device


class Estimator:
    """The planner's beliefs about the federation, refreshed every round.

    Starts from the declared profiles (in a deployment: each client's own
    probe); after each round, each client's compute factor, its uplink and
    downlink and the server's factor move towards what the round showed, by
    ``ewma``; a value that moved by more than a factor ``1 + jump`` is taken
    as a change, not noise, and replaces the belief. Memory budgets are
    declared by the clients, not learned.
    """

    def __init__(self, world: World, ewma: float, jump: float = 0.0) -> None:
        self.world = world
        self.ewma, self.jump = ewma, jump

    def _blend(self, old: float, new: float) -> float:
        if self.jump and not old / (1 + self.jump) <= new <= old * (1 + self.jump):
            return new
        return (1 - self.ewma) * old + self.ewma * new

    def state_dict(self) -> dict:
        """The beliefs (the cost model itself is saved beside the run)."""
        w = self.world
        return {
            "devices": {c: dataclasses.asdict(d) for c, d in w.devices.items()},
            "compute": dict(w.compute),
            "server_factor": w.server_factor,
            "slots": dict(w.workload.slots),
            "labelled": dict(w.workload.labelled),
        }

    def load_state_dict(self, state: dict) -> None:
        w = self.world
        w.devices.update({c: Device(**d) for c, d in state["devices"].items()})
        w.compute.update(state["compute"])
        w.server_factor = state["server_factor"]
        w.workload.slots.update(state["slots"])
        w.workload.labelled.update(state["labelled"])

    def declare_memory(self, devices: Mapping[int, Device]) -> None:
        """Clients report their current memory budgets (known, not estimated)."""
        for cid, dev in devices.items():
            old = self.world.devices[cid]
            self.world.devices[cid] = dataclasses.replace(old, memory=dev.memory)

    def observe(
        self,
        cuts: Mapping[int, int],
        timing: RoundTiming,
        steps: Iterable[dict],
        recut: Mapping[int, float] | None = None,
    ) -> None:
        """Fold one round's timings and step records into the beliefs.

        What the cost model alone predicts for the round (the clock on unit
        factors, at the token slots the clients actually had) is set against
        what the round took: the ratios are the new compute and server factors.
        ``recut`` holds each client's device seconds spent moving its cut this
        round: one-off work the compute factor must not learn.
        """
        recut = recut or {}
        w = self.world.workload
        slots: dict[int, list[float]] = {}
        labelled: dict[int, list[float]] = {}
        for s in steps:
            slots.setdefault(s["client"], []).append(s["slots"] / w.grad_accum)
            labelled.setdefault(s["client"], []).append(s["tokens"] / w.grad_accum)
        ok = [c for c, t in timing.clients.items() if not t.failed and c in slots]
        if not ok:
            return
        for cid in ok:
            w.slots[cid] = self._blend(w.slots[cid], statistics.fmean(slots[cid]))
            w.labelled[cid] = self._blend(
                w.labelled[cid], statistics.fmean(labelled[cid])
            )
        unit = World(
            self.world.costs,
            self.world.devices,
            self.world.server,
            dataclasses.replace(w),
            dict.fromkeys(ok, 1.0),
            1.0,
            self.world.tail,
        )
        model = predict_round({cid: cuts[cid] for cid in ok}, unit)
        for cid in ok:
            t, m = timing.clients[cid], model.clients[cid]
            if m.compute > 0:
                ratio = max(t.compute - recut.get(cid, 0.0), 0.0) / m.compute
                self.world.compute[cid] = self._blend(self.world.compute[cid], ratio)
            dev = self.world.devices[cid]
            half_rtts = t.messages * dev.rtt / 2
            up, down = dev.up_bps, dev.down_bps
            if t.uplink > half_rtts:
                seen = 8 * sum(t.bytes_up.values()) / (t.uplink - half_rtts)
                up = self._blend(up, seen)
            if t.downlink > half_rtts:
                seen = 8 * sum(t.bytes_down.values()) / (t.downlink - half_rtts)
                down = self._blend(down, seen)
            self.world.devices[cid] = dataclasses.replace(dev, up_bps=up, down_bps=down)
        served = sum(timing.clients[c].served for c in ok)
        modelled = sum(model.clients[c].served for c in ok)
        if modelled > 0:
            self.world.server_factor = self._blend(
                self.world.server_factor, served / modelled
            )
