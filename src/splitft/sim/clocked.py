"""Real clients and the real server as the clock's processes (the simulated
network).

Every message is encoded and decoded exactly as on a wire (the same codec as
the in-process and network transports) and its encoded size is what the
simulated links carry. What differs from a blocking transport is *when*
things happen: the clock (:mod:`splitft.sim.clock`) decides when each request
reaches the server and each reply reaches its client.

Each side's duration is both measured (wall time here, times the client's
slowdown or over the server's speed) and predicted (the cost model's price of
the work done). ``sim.timing`` picks how they are used:

- ``measured``: the round *runs* on the predicted durations, so the order in
  which the server sees steps (which a shared server-side adapter learns in)
  does not depend on this machine's timing noise, and its simulated time is
  then *replayed* from the measured durations (:func:`replay`);
- ``predicted``: predicted durations for both;
- ``live``: measured durations for both, as they happen.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from splitft.models.parts import labelled_tokens
from splitft.sim.clock import ClientFailed, Outgoing, RoundTiming, simulate_round
from splitft.sim.costs import CostModel
from splitft.sim.profiles import Batching, Device
from splitft.split import engine
from splitft.split.client import ServerRefused, SplitClient
from splitft.split.messages import SmashedData, TailGradient, decode, encode
from splitft.split.server import SplitServer

log = logging.getLogger(__name__)


class ClockedClient:
    """A :class:`SplitClient`'s round protocol as a clock process."""

    def __init__(
        self,
        client: SplitClient,
        round: int,
        device: Device,
        timing: str,
        costs: CostModel,
    ) -> None:
        self.client, self.device = client, device
        self.timing, self.costs = timing, costs
        self._protocol = client.round_protocol(round)
        self._started = False
        self.steps: list[dict] = []  # the protocol's result once it is done
        self.recut = 0.0  # device seconds this round spent moving the cut
        # per resume: (measured device seconds, what was sent or None, failure)
        self.trace: list[tuple[float, Outgoing | None, str]] = []

    def _predicted(self) -> tuple[float, float]:
        """The cost model's device seconds of the work logged: (all, re-cut)."""
        c, k, fs = self.costs, self.client.cut_layer, self.costs.forward_share
        share = {"forward": fs, "backward": 1 - fs, "local": 1.0}
        modelled = recut = 0.0
        for kind, amount, labelled in self.client.work:
            if kind == "load":
                recut += amount * c.load_block_s
            elif kind == "tail":
                modelled += c.tail_seconds(self.client.tail_layers, amount, labelled)
            else:
                base = c.client_seconds(k, amount, labelled, recompute=False)
                modelled += share[kind] * base
                if kind != "forward":  # checkpointed blocks run again here
                    modelled += c.recompute_seconds(min(k, c.num_layers), amount)
        s = self.device.slowdown
        return (modelled + recut) * s, recut * s

    def _seconds(
        self, t0: float, received: int, out: Outgoing | None, failure: str = ""
    ) -> float:
        """Record the segment just run; return its duration for this clock.

        Building the client's first part is start-up, not round time.
        """
        wall = time.perf_counter() - t0 - self.client.startup_s
        measured = max(wall, 0.0) * self.device.slowdown
        wire = received + (out.nbytes if out is not None else 0)
        codec = self.costs.codec_seconds(wire) * self.device.slowdown
        predicted, recut = self._predicted()
        predicted += codec
        if self.timing == "predicted":
            self.recut += recut
        else:  # the time reported is the measured one
            self.recut += self.client.recut_s * self.device.slowdown
        self.trace.append((measured, out, failure))
        return measured if self.timing == "live" else predicted

    def resume(self, reply: Any) -> tuple[float, Outgoing | None]:
        t0 = time.perf_counter()
        self.client.work.clear()
        self.client.startup_s = self.client.recut_s = 0.0
        received = 0 if reply is None else len(reply)
        try:
            if self._started:
                request = self._protocol.send(decode(reply, self.client.store.device))
            else:
                self._started = True
                request = next(self._protocol)
        except StopIteration as done:
            self.steps = done.value
            return self._seconds(t0, received, None), None
        except ServerRefused as e:
            self._seconds(t0, received, None, str(e))
            raise ClientFailed(str(e)) from e
        except Exception as e:  # a client crash ends that client, not the run
            detail = f"{type(e).__name__}: {e}"
            log.warning(
                "client %d failed: %s", self.client.client_id, detail, exc_info=True
            )
            self._seconds(t0, received, None, detail)
            raise ClientFailed(detail) from e
        data = encode(request)
        out = Outgoing(data, len(data), request.kind, _batchable(request))
        return self._seconds(t0, received, out), out


def _batchable(request) -> int:
    """The token slots of a vanilla split's micro-batch (it may share a
    batch on the server), else 0."""
    if isinstance(request, SmashedData) and request.labels is not None:
        return request.hidden.shape[0] * request.hidden.shape[1]
    return 0


class ClockedServer:
    """The server as the clock's ``serve``: decode, handle, encode the reply."""

    def __init__(
        self, server: SplitServer, speed: float, timing: str, costs: CostModel
    ) -> None:
        self.server, self.speed = server, speed
        self.timing, self.costs = timing, costs
        # per client, in the order served: (measured seconds, the reply)
        self.trace: dict[int, list[tuple[float, Outgoing]]] = defaultdict(list)

    def __call__(self, cid: int, data: bytes) -> tuple[float, Outgoing]:
        t0 = time.perf_counter()
        request = decode(data, self.server.device)
        reply = self.server.handle(request)
        out = encode(reply)
        measured = (time.perf_counter() - t0) / self.speed
        reply_out = Outgoing(out, len(out), reply.kind)
        self.trace[cid].append((measured, reply_out))
        if self.timing == "live":
            return measured, reply_out
        c = self.costs
        seconds = c.codec_seconds(len(data) + len(out))
        if isinstance(request, (SmashedData, TailGradient)):
            smashed = isinstance(request, SmashedData)
            values = request.hidden if smashed else request.grad
            labels = request.labels if smashed else None  # U-shaped: none here
            seconds += c.server_leg_seconds(
                "smashed" if smashed else "tail",
                self.server.cut_layers[cid],
                values.shape[0] * values.shape[1],
                0 if labels is None else labelled_tokens(labels),
                self.server.tail_layers,
            )
        return seconds / self.speed, reply_out

    def many(self, items: list[tuple[int, bytes]]) -> tuple[float, list[Outgoing]]:
        """A batch (``server.batching``): decode, handle together, encode."""
        t0 = time.perf_counter()
        requests = [decode(data, self.server.device) for _, data in items]
        replies = self.server.handle_many([(r, None) for r in requests])
        encoded = [encode(r) for r in replies]
        measured = (time.perf_counter() - t0) / self.speed
        outs = [
            Outgoing(e, len(e), r.kind) for e, r in zip(encoded, replies, strict=True)
        ]
        for (cid, _), out in zip(items, outs, strict=True):
            self.trace[cid].append((measured, out))
        if self.timing == "live":
            return measured, outs
        c = self.costs
        wire = sum(len(d) for _, d in items) + sum(len(e) for e in encoded)
        cuts = [self.server.cut_layers[cid] for cid, _ in items]
        work = [
            (k, slots, labelled_tokens(r.labels))
            for k, slots, r in zip(
                cuts, engine.slots(requests, cuts), requests, strict=True
            )
        ]  # each request's slots as the batch lays them out
        return (c.codec_seconds(wire) + c.batch_seconds(work)) / self.speed, outs


class _Replayed:
    """A client that repeats what a real one did, with its measured durations."""

    def __init__(self, trace: list[tuple[float, Outgoing | None, str]]) -> None:
        self._trace = iter(trace)
        self._sent = 0

    def resume(self, reply: Any) -> tuple[float, Outgoing | None]:
        seconds, out, failure = next(self._trace)
        if failure:
            raise ClientFailed(failure)
        if out is None:
            return seconds, None
        self._sent += 1
        return seconds, Outgoing(self._sent - 1, out.nbytes, out.kind, out.slots)


def replay(
    clients: Mapping[int, ClockedClient],
    server: ClockedServer,
    devices: Mapping[int, Device],
    workers: int,
    batching: Batching | None = None,
) -> RoundTiming:
    """The round again on the clock, with every duration as measured.

    With batching, a batch replayed takes the longest measured time of its
    requests' batches (the same batch when the replay forms it again).
    """

    def serve(cid: int, index: int) -> tuple[float, Outgoing]:
        seconds, out = server.trace[cid][index]
        return seconds, Outgoing(None, out.nbytes, out.kind)

    def many(items: list[tuple[int, int]]) -> tuple[float, list[Outgoing]]:
        served = [serve(cid, index) for cid, index in items]
        return max(s for s, _ in served), [out for _, out in served]

    processes = {cid: _Replayed(c.trace) for cid, c in clients.items()}
    return simulate_round(
        processes, devices, serve, workers, batching, many, trace=True
    )
