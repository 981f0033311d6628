"""An event-driven simulated clock for one round of split training.

Clients run in parallel in simulated time; the server is one FCFS queue with
``workers`` servers. Every request a client sends costs ``bytes / uplink +
RTT / 2`` to arrive, waits for a free server worker, takes its service time,
and its reply costs ``bytes / downlink + RTT / 2`` to come back. Events are
processed in simulated-time order, and the work behind an event (a client's
forward, the server's step) is *executed* when its event is processed, so the
server sees the steps in the order the simulated network delivers them: with
a shared server-side adapter the order of its updates is the simulated one.

With batching (``server.batching``), a free worker takes every waiting
request that may share a batch (a vanilla split's micro-batches, which say
how many token slots they hold), up to ``max_slots``, after waiting up to
``window_s`` from the first one's arrival for more; the batch is one service
(``serve_many``: its time, every reply at its end). A request that may not
be batched is served alone, in its place in the queue.

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

from splitft.sim.profiles import Batching, Device


@dataclass
class Outgoing:
    """A message on its way: its payload, size on the wire and byte-count
    kind; ``slots``: the token slots of a request that may share a batch
    (0: it is served alone)."""

    payload: Any
    nbytes: int
    kind: str
    slots: int = 0


class Process(Protocol):
    """One client: ``resume(reply)`` runs until its next request.

    Returns ``(seconds, outgoing)``: the simulated seconds of the work just
    done and the next request, or ``None`` when the client is done. The first
    call gets ``reply=None``. Raising :class:`ClientFailed` ends the client.

    A process whose work runs elsewhere (another process, a Ray actor) may
    also have ``start(reply)``: the clock calls it as soon as the input of
    its next ``resume`` is known (at time 0, and when the server makes its
    reply), so it may compute ahead; ``resume`` with the same reply then
    takes that result when its event comes. The order in which results are
    *used* stays the clock's, so the round is the same as without it.
    """

    def resume(self, reply: Any) -> tuple[float, Outgoing | None]: ...


# (client id, request payload) -> (server seconds, reply)
Serve = Callable[[int, Any], tuple[float, Outgoing]]
# [(client id, request payload)] -> (server seconds of the batch, replies)
ServeMany = Callable[[list[tuple[int, Any]]], tuple[float, list[Outgoing]]]


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


# one stretch of a client's round on the clock: (start s, end s, kind, client);
# kind is one of ClientTiming's parts: compute, uplink, queued, served, downlink
Span = tuple[float, float, str, int]


@dataclass
class RoundTiming:
    clients: dict[int, ClientTiming]
    makespan: float  # the last client's finish
    server_busy: float  # summed service time over all workers
    spans: list[Span] = field(default_factory=list)  # when asked to trace

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
    batching: Batching | None = None,
    serve_many: ServeMany | None = None,
    trace: bool = False,
) -> RoundTiming:
    """Run one round of all ``processes`` from simulated time 0.

    Args:
        processes: client id -> its process.
        devices: client id -> its links (the process's compute time already
            includes the device's slowdown).
        serve: the server; called when a worker starts on a request, which is
            when the request's work is executed.
        workers: requests (or batches) the server serves at once.
        batching: how requests that may share a batch are taken (None: one
            at a time); ``serve_many`` serves a batch.
        trace: also record every span of every client's round
            (:data:`Span`; the run's timeline and trace file), not only
            their sums; off for the planner's predictions.
    """
    if batching is not None and serve_many is None:
        raise ValueError("batching needs serve_many")
    timing = {cid: ClientTiming() for cid in processes}
    seq = itertools.count()  # ties in time keep the order events were made in
    events: list[tuple[float, int, str, int, Any]] = []
    # FCFS: (arrival, cid, request, token slots if it may share a batch)
    waiting: deque[tuple[float, int, Any, int]] = deque()
    free = workers
    busy = 0.0
    window_at: float | None = None  # a pending end of a batching window
    spans: list[Span] = []

    def span(start: float, end: float, kind: str, cid: int) -> None:
        if trace and end > start:
            spans.append((start, end, kind, cid))

    def push(t: float, kind: str, cid: int, payload: Any) -> None:
        heapq.heappush(events, (t, next(seq), kind, cid, payload))

    def early(cid: int, payload: Any) -> None:
        """A process that runs elsewhere starts on its input once it is known
        (its result is used when its event comes: :class:`Process`)."""
        begin = getattr(processes[cid], "start", None)
        if begin is not None:
            begin(payload)

    def start_service(now: float) -> None:
        nonlocal free, busy
        arrived, cid, request, _ = waiting.popleft()
        free -= 1
        seconds, reply = serve(cid, request)
        early(cid, reply.payload)
        t = timing[cid]
        t.queued += now - arrived
        t.served += seconds
        busy += seconds
        span(arrived, now, "queued", cid)
        span(now, now + seconds, "served", cid)
        push(now + seconds, "served", cid, reply)

    def start_batch(now: float, ripe: bool) -> bool:
        """Serve the waiting requests that may share a batch, if it is time
        (False: the window is still open). Not ``ripe``: first let the other
        events of this instant happen (requests arriving together are
        waiting together)."""
        nonlocal free, busy, window_at
        assert batching is not None and serve_many is not None
        cap, taken, slots, full = batching.max_slots, [], 0, False
        for item in waiting:
            if not item[3]:
                continue
            if taken and cap and slots + item[3] > cap:
                full = True
                break
            taken.append(item)
            slots += item[3]
        due = taken[0][0] + batching.window_s
        if not full and (now < due or not ripe):
            if window_at is None:  # look again when the first one's window ends
                window_at = max(due, now)
                push(window_at, "window", -1, None)
            return False
        ids = {id(item) for item in taken}
        kept = [item for item in waiting if id(item) not in ids]
        waiting.clear()
        waiting.extend(kept)
        free -= 1
        seconds, replies = serve_many([(cid, req) for _, cid, req, _ in taken])
        busy += seconds
        for (arrived, cid, _, _), reply in zip(taken, replies, strict=True):
            early(cid, reply.payload)
            t = timing[cid]
            t.queued += now - arrived
            t.served += seconds
            span(arrived, now, "queued", cid)
            span(now, now + seconds, "served", cid)
            push(now + seconds, "replied", cid, reply)
        push(now + seconds, "free", -1, None)
        return True

    def start(now: float, ripe: bool = False) -> None:
        """Give free workers what is waiting: a request that may not share a
        batch alone, the others as one batch."""
        while free and waiting:
            if batching is None or not waiting[0][3]:
                start_service(now)
            elif not start_batch(now, ripe):
                return

    for cid in sorted(processes):
        early(cid, None)
        push(0.0, "resume", cid, None)
    while events:
        now, _, kind, cid, payload = heapq.heappop(events)
        if kind in ("window", "free"):
            if kind == "window":
                window_at = None
            else:
                free += 1
            start(now, ripe=kind == "window")
            continue
        t = timing[cid]
        if kind == "resume":
            try:
                seconds, out = processes[cid].resume(payload)
            except ClientFailed as e:
                t.failed, t.finish = str(e), now
                continue
            t.compute += seconds
            span(now, now + seconds, "compute", cid)
            if out is None:
                t.finish = now + seconds
                continue
            link = devices[cid].up_seconds(out.nbytes)
            t.uplink += link
            span(now + seconds, now + seconds + link, "uplink", cid)
            t.bytes_up[out.kind] += out.nbytes
            t.messages += 1
            push(now + seconds + link, "arrive", cid, (out.payload, out.slots))
        elif kind == "arrive":
            request, slots = payload
            waiting.append((now, cid, request, slots))
            start(now)
        else:  # "served" (the worker is free again) or "replied" (a batch's)
            if kind == "served":
                free += 1
            link = devices[cid].down_seconds(payload.nbytes)
            t.downlink += link
            span(now, now + link, "downlink", cid)
            t.bytes_down[payload.kind] += payload.nbytes
            push(now + link, "resume", cid, payload.payload)
            if kind == "served":
                start(now)
    makespan = max((t.finish for t in timing.values()), default=0.0)
    return RoundTiming(timing, makespan, busy, spans)
