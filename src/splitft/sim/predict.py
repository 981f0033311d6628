"""Predict a round without running it: modelled clients on the simulated clock.

:func:`predict_round` runs the clock (:mod:`splitft.sim.clock`) on clients
and a server whose every duration and size comes from the cost model: no
model, no training. The planner and the policies call it for every plan they
weigh.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from splitft.sim.clock import Outgoing, RoundTiming, simulate_round
from splitft.sim.costs import CostModel
from splitft.sim.profiles import Device, ServerDevice
from splitft.split.messages import ADAPTERS, CONTROL, GRADIENTS, SMASHED


@dataclass
class Workload:
    """What every client does in a round, in the cost model's units."""

    local_steps: int
    grad_accum: int
    slots: dict[int, float]  # expected token slots per micro-batch, per client
    labelled: dict[int, float]  # ... of them labelled (where the head runs)
    # batch_size x max_length: memory is planned for it, every slot labelled
    # (an answer can fill a row, as every token does with data.loss_on=all)
    worst_slots: int

    @classmethod
    def of(
        cls,
        sizes: Mapping[int, list[tuple[int, int]]],
        num_clients: int,
        local_steps: int,
        grad_accum: int,
        batch_size: int,
        max_length: int,
        seed: int = 0,
    ) -> Workload:
        """The workload of clients whose rows have these sizes ((tokens,
        labelled tokens) a row, as far as known: a client without any is
        planned at the worst, every slot of a full batch labelled)."""
        worst = batch_size * max_length
        slots, labelled = {}, {}
        for cid in range(num_clients):
            rows = sizes.get(cid)
            slots[cid] = (
                expected_slots([n for n, _ in rows], batch_size, seed)
                if rows
                else float(worst)
            )
            labelled[cid] = (
                expected_labelled([n for _, n in rows], batch_size)
                if rows
                else float(worst)
            )
        return cls(local_steps, grad_accum, slots, labelled, worst)


@dataclass
class World:
    """Everything a round's time depends on besides the cuts."""

    costs: CostModel
    devices: dict[int, Device]
    server: ServerDevice
    workload: Workload
    compute: dict[int, float]  # per client: device seconds per modelled second
    server_factor: float  # server seconds per modelled second
    tail: int = 0  # federation.tail_layers of a U-shaped split (0: vanilla)

    @classmethod
    def of(
        cls,
        costs: CostModel,
        devices: Mapping[int, Device],
        server: ServerDevice,
        workload: Workload,
        tail: int = 0,
    ) -> World:
        """The world as declared: slowdowns and speeds taken at their word."""
        compute = {cid: d.slowdown for cid, d in devices.items()}
        return cls(
            costs, dict(devices), server, workload, compute, 1 / server.speed, tail
        )

    def memory(self, cid: int, k: int) -> float:
        worst = self.workload.worst_slots
        return self.costs.client_memory(k, worst, worst, self.tail)

    def fits(self, cid: int, k: int) -> bool:
        return self.memory(cid, k) <= self.devices[cid].memory

    def deepest_fit(self, cid: int, hi: int) -> int:
        """The largest cut <= ``hi`` within the client's memory (0 if none)."""
        for k in range(hi, 0, -1):
            if self.fits(cid, k):
                return k
        return 0


class _ModelledClient:
    """A client whose every duration and size comes from the cost model."""

    def __init__(self, cid: int, k: int, world: World) -> None:
        self._steps = self._run(cid, k, world)

    @staticmethod
    def _run(cid: int, k: int, world: World):
        """Yields (device seconds before the request, the request).

        Each piece of work is priced as the real client does it: decoding the
        reply it got, computing, encoding the request it sends.
        """
        c, w, f, tail = world.costs, world.workload, world.compute[cid], world.tail
        slots, labelled = w.slots[cid], w.labelled[cid]
        micro_s = f * c.client_seconds(k, slots, labelled)
        adapters = c.adapter_bytes(k, tail)
        smashed, gradient = c.smashed_bytes(slots, tail), c.gradient_bytes(slots)
        tail_s = f * c.tail_seconds(tail, slots, labelled)
        tail_in = c.tail_input_bytes(slots)

        def codec(nbytes: float) -> float:
            return f * c.codec_seconds(nbytes)

        upload = Outgoing(("upload", k, 0.0, 0.0), adapters, ADAPTERS)
        yield (
            codec(c.message_bytes),
            Outgoing(("plan", k, 0.0, 0.0), c.message_bytes, CONTROL),
        )
        n = w.local_steps * w.grad_accum
        if k >= c.num_layers:  # trains alone, then uploads
            yield codec(adapters) + n * micro_s + codec(adapters), upload
            return
        fwd = c.forward_share * micro_s
        for i in range(n):
            if i == 0:  # decode the plan, then this forward
                before = codec(adapters)
            else:  # decode the gradient, the previous backward, then this forward
                before = codec(gradient) + micro_s - fwd
            yield (
                before + fwd + codec(smashed),
                Outgoing(
                    ("smashed", k, slots, labelled),
                    smashed,
                    SMASHED,
                    0 if tail else max(round(slots), 1),  # vanilla: may be batched
                ),
            )
            if tail:  # decode the server's output, run the tail, send its gradient
                yield (
                    codec(tail_in) + tail_s + codec(gradient),
                    Outgoing(("tail", k, slots, labelled), gradient, GRADIENTS),
                )
        yield codec(gradient) + micro_s - fwd + codec(adapters), upload

    def resume(self, reply: Any) -> tuple[float, Outgoing | None]:
        try:
            return next(self._steps)
        except StopIteration:
            return 0.0, None


def modelled_serve(world: World):
    """The server of a modelled round: service times from the cost model."""
    c, tail = world.costs, world.tail

    def serve(
        cid: int, request: tuple[str, int, float, float]
    ) -> tuple[float, Outgoing]:
        """Decode the request, do the work, encode the reply."""
        kind, k, slots, labelled = request
        g = world.server_factor
        if kind == "plan":
            nbytes = c.adapter_bytes(k, tail)
            seconds = c.codec_seconds(c.message_bytes + nbytes)
            return g * seconds, Outgoing(None, nbytes, ADAPTERS)
        if kind in ("smashed", "tail"):
            work = c.server_leg_seconds(kind, k, slots, labelled, tail)
            if kind == "smashed" and tail:  # U-shaped: the forward, then the tail's
                nbytes = c.tail_input_bytes(slots)
                wire = c.codec_seconds(c.smashed_bytes(slots, tail) + nbytes)
                return g * (work + wire), Outgoing(None, nbytes, SMASHED)
            nbytes = c.gradient_bytes(slots)
            received = c.smashed_bytes(slots) if kind == "smashed" else nbytes
            seconds = work + c.codec_seconds(received + nbytes)
            return g * seconds, Outgoing(None, nbytes, GRADIENTS)
        seconds = c.codec_seconds(c.adapter_bytes(k, tail) + c.message_bytes)
        return g * seconds, Outgoing(None, c.message_bytes, CONTROL)

    return serve


def modelled_serve_many(world: World):
    """The server of a modelled round taking a batch of micro-batches (each
    at its expected slots alone: the stream's gaps and the tails it drops,
    ``split/engine.py``, are not modelled)."""
    c = world.costs

    def serve_many(items: list) -> tuple[float, list[Outgoing]]:
        work = [(k, slots, labelled) for _, (_kind, k, slots, labelled) in items]
        wire = sum(c.smashed_bytes(s) + c.gradient_bytes(s) for _, s, _ in work)
        seconds = c.batch_seconds(work) + c.codec_seconds(wire)
        replies = [Outgoing(None, c.gradient_bytes(s), GRADIENTS) for _, s, _ in work]
        return world.server_factor * seconds, replies

    return serve_many


def predict_round(cuts: Mapping[int, int], world: World) -> RoundTiming:
    """The simulated clock run on modelled clients: no model, no training."""
    processes = {cid: _ModelledClient(cid, k, world) for cid, k in cuts.items()}
    devices = {cid: world.devices[cid] for cid in cuts}
    return simulate_round(
        processes,
        devices,
        modelled_serve(world),
        world.server.workers,
        world.server.batching,
        modelled_serve_many(world),
    )


def expected_slots(lengths: list[int], batch_size: int, seed: int = 0) -> float:
    """Mean token slots of a right-padded batch: B x the longest row drawn."""
    rng = np.random.default_rng(seed)
    lengths_arr = np.asarray(lengths)
    bs = min(batch_size, len(lengths_arr))
    draws = [
        lengths_arr[rng.permutation(len(lengths_arr))[:bs]].max() for _ in range(64)
    ]
    return float(bs * np.mean(draws))


def expected_labelled(labelled: list[int], batch_size: int) -> float:
    """Mean labelled tokens of a batch: B x the mean labelled tokens a row."""
    return min(batch_size, len(labelled)) * float(np.mean(labelled))


def row_size(row: Mapping[str, list[int]]) -> tuple[int, int]:
    """A training row's tokens and labelled tokens (a label at the next one)."""
    return len(row["input_ids"]), sum(t != -100 for t in row["labels"][1:])
