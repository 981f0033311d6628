"""The simulated network: real clients and the real server under the clock.

Every message is encoded and decoded exactly as on a wire (the same codec as
the in-process and network transports) and its encoded size is what the
simulated links carry. What differs from a blocking transport is *when*
things happen: the clock (:mod:`splitft.sim.clock`) decides when each request
reaches the server and each reply reaches its client, and each side's
simulated duration is its measured compute scaled by its device profile
(``timing="measured"``) or the cost model's prediction (``"predicted"``).
"""

from __future__ import annotations

import time
from typing import Any

from splitft.sim.clock import ClientFailed, Outgoing
from splitft.sim.costs import CostModel
from splitft.sim.profiles import Device
from splitft.split.client import ServerRefused, SplitClient
from splitft.split.messages import SmashedData, decode, encode
from splitft.split.server import SplitServer


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

    def _seconds(self, wall: float) -> float:
        """Device seconds of the segment just run (the first part build is
        start-up, not round time)."""
        wall -= self.client.startup_s
        self.client.startup_s = 0.0
        if self.timing == "measured":
            return max(wall, 0.0) * self.device.slowdown
        c, k, fs = self.costs, self.client.cut_layer, self.costs.forward_share
        share = {"forward": fs, "backward": 1 - fs, "local": 1.0}
        modelled = 0.0
        for kind, amount in self.client.work:
            if kind == "load":
                modelled += amount * c.load_block_s
            else:
                modelled += share[kind] * c.client_seconds(k, amount)
        return modelled * self.device.slowdown

    def resume(self, reply: Any) -> tuple[float, Outgoing | None]:
        t0 = time.perf_counter()
        self.client.work.clear()
        self.client.startup_s = 0.0
        try:
            if self._started:
                request = self._protocol.send(decode(reply, self.client.store.device))
            else:
                self._started = True
                request = next(self._protocol)
        except StopIteration as done:
            self.steps = done.value
            return self._seconds(time.perf_counter() - t0), None
        except ServerRefused as e:
            raise ClientFailed(str(e)) from e
        data = encode(request)
        seconds = self._seconds(time.perf_counter() - t0)
        return seconds, Outgoing(data, len(data), request.kind)


def clocked_server(server: SplitServer, speed: float, timing: str, costs: CostModel):
    """The server as the clock's ``serve``: decode, handle, encode the reply."""

    def serve(cid: int, data: bytes) -> tuple[float, Outgoing]:
        t0 = time.perf_counter()
        request = decode(data, server.device)
        reply = server.handle(request)
        out = encode(reply)
        if timing == "measured":
            seconds = (time.perf_counter() - t0) / speed
        elif isinstance(request, SmashedData):
            slots = request.hidden.shape[0] * request.hidden.shape[1]
            seconds = costs.server_seconds(server.cut_layers[cid], slots) / speed
        else:
            seconds = 0.0
        return seconds, Outgoing(out, len(out), reply.kind)

    return serve
