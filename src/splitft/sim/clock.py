"""An event-driven simulated clock for one round of split training.

Clients run in parallel in simulated time; the server is one FCFS queue with
``workers`` servers. Every request a client sends costs ``bytes / uplink +
RTT / 2`` to arrive, waits for a free server worker, takes its service time,
and its reply costs ``bytes / downlink + RTT / 2`` to come back. Events are
processed in simulated-time order, and the work behind an event (a client's
forward, the server's step) is *executed* when its event is processed, so the
server sees the steps in the order the simulated network delivers them: with
a shared server-side adapter the order of its updates is the simulated one.

The engine does not know what a message is. A process (one client) returns
how long its last piece of work took and what it sends next; ``serve``
returns the server's service time and its reply. The same engine runs real
training (durations measured, or taken from the cost model) and the
planner's predictions (durations from the cost model, no training at all).
"""

from __future__ import annotations

import heapq
import itertools
from collections import defaultdict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from splitft.sim.profiles import Device


@dataclass
class Outgoing:
    """A message on its way: its payload, size on the wire and byte-count kind."""

    payload: Any
    nbytes: int
    kind: str


class Process(Protocol):
    """One client: ``resume(reply)`` runs until its next request.

    Returns ``(seconds, outgoing)``: the simulated seconds of the work just
    done and the next request, or ``None`` when the client is done. The first
    call gets ``reply=None``. Raising :class:`ClientFailed` ends the client.
    """

    def resume(self, reply: Any) -> tuple[float, Outgoing | None]: ...


# (client id, request payload) -> (server seconds, reply)
Serve = Callable[[int, Any], tuple[float, Outgoing]]


class ClientFailed(RuntimeError):
    """A client stopped in the middle of its round (e.g. the server refused it)."""


@dataclass
class ClientTiming:
    """Where one client's simulated round time went (seconds, bytes)."""

    finish: float = 0.0
    compute: float = 0.0  # on its own device
    uplink: float = 0.0  # sending, RTT included
    downlink: float = 0.0
    queued: float = 0.0  # waiting for a server worker
    served: float = 0.0  # server service time of its requests
    bytes_up: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    bytes_down: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    messages: int = 0
    failed: str = ""


@dataclass
class RoundTiming:
    clients: dict[int, ClientTiming]
    makespan: float  # the last client's finish
    server_busy: float  # summed service time over all workers

    def record(self) -> dict[str, Any]:
        """JSON-friendly per-client timings for metrics.jsonl."""
        return {
            str(cid): {
                "finish_s": t.finish,
                "compute_s": t.compute,
                "uplink_s": t.uplink,
                "downlink_s": t.downlink,
                "queued_s": t.queued,
                "served_s": t.served,
                **({"failed": t.failed} if t.failed else {}),
            }
            for cid, t in sorted(self.clients.items())
        }


def simulate_round(
    processes: Mapping[int, Process],
    devices: Mapping[int, Device],
    serve: Serve,
    workers: int = 1,
) -> RoundTiming:
    """Run one round of all ``processes`` from simulated time 0.

    Args:
        processes: client id -> its process.
        devices: client id -> its links (the process's compute time already
            includes the device's slowdown).
        serve: the server; called when a worker starts on a request, which is
            when the request's work is executed.
        workers: requests the server serves at once.
    """
    timing = {cid: ClientTiming() for cid in processes}
    seq = itertools.count()  # ties in time keep the order events were made in
    events: list[tuple[float, int, str, int, Any]] = []
    waiting: deque[tuple[float, int, Any]] = deque()  # FCFS: (arrival, cid, req)
    free = workers
    busy = 0.0

    def push(t: float, kind: str, cid: int, payload: Any) -> None:
        heapq.heappush(events, (t, next(seq), kind, cid, payload))

    def start_service(now: float) -> None:
        nonlocal free, busy
        arrived, cid, request = waiting.popleft()
        free -= 1
        seconds, reply = serve(cid, request)
        t = timing[cid]
        t.queued += now - arrived
        t.served += seconds
        busy += seconds
        push(now + seconds, "served", cid, reply)

    for cid in sorted(processes):
        push(0.0, "resume", cid, None)
    while events:
        now, _, kind, cid, payload = heapq.heappop(events)
        t = timing[cid]
        if kind == "resume":
            try:
                seconds, out = processes[cid].resume(payload)
            except ClientFailed as e:
                t.failed, t.finish = str(e), now
                continue
            t.compute += seconds
            if out is None:
                t.finish = now + seconds
                continue
            link = devices[cid].up_seconds(out.nbytes)
            t.uplink += link
            t.bytes_up[out.kind] += out.nbytes
            t.messages += 1
            push(now + seconds + link, "arrive", cid, out.payload)
        elif kind == "arrive":
            waiting.append((now, cid, payload))
            if free:
                start_service(now)
        else:  # "served": the worker is free again, the reply travels back
            free += 1
            link = devices[cid].down_seconds(payload.nbytes)
            t.downlink += link
            t.bytes_down[payload.kind] += payload.nbytes
            push(now + link, "resume", cid, payload.payload)
            if waiting:
                start_service(now)
    makespan = max((t.finish for t in timing.values()), default=0.0)
    return RoundTiming(timing, makespan, busy)
