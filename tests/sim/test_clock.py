"""The event-driven clock: FCFS server queue, links, parallel clients."""

import pytest
from synthetic import device, world

from splitft.sim.clock import ClientFailed, Outgoing, simulate_round
from splitft.sim.predict import predict_round
from splitft.sim.profiles import Batching


class Scripted:
    """A client that computes, then sends, a fixed list of (seconds, bytes)."""

    def __init__(self, script):
        self.script = list(script)
        self.replies = []

    def resume(self, reply):
        self.replies.append(reply)
        if not self.script:
            return 0.0, None
        seconds, nbytes = self.script.pop(0)
        return seconds, Outgoing(f"req{len(self.replies)}", nbytes, "smashed")


def server(seconds, order=None):
    def serve(cid, payload):
        if order is not None:
            order.append(cid)
        return seconds, Outgoing(payload, 1000, "gradients")

    return serve


FAST = device(up=8.0, down=8.0, rtt_ms=0.0)  # 1000 bytes take 1 ms each way


def test_one_client_adds_compute_links_and_service():
    timing = simulate_round(
        {0: Scripted([(1.0, 1000), (2.0, 1000)])}, {0: FAST}, server(0.5)
    )
    t = timing.clients[0]
    assert t.compute == 3.0 and t.served == 1.0 and t.queued == 0.0
    assert t.uplink == pytest.approx(0.002) and t.downlink == pytest.approx(0.002)
    assert timing.makespan == pytest.approx(3.0 + 1.0 + 0.004)
    assert t.bytes_up == {"smashed": 2000} and t.bytes_down == {"gradients": 2000}


@pytest.mark.parametrize("workers, queued", [(1, 0.5), (2, 0.0)])
def test_simultaneous_arrivals_queue_for_the_workers(workers, queued):
    procs = {c: Scripted([(1.0, 1000)]) for c in (0, 1)}
    devices = dict.fromkeys(procs, FAST)
    timing = simulate_round(procs, devices, server(0.5), workers)
    waits = sorted(t.queued for t in timing.clients.values())
    assert waits == pytest.approx([0.0, queued])
    assert timing.makespan == pytest.approx(1.0 + 0.001 + 0.5 + queued + 0.001)
    assert timing.server_busy == pytest.approx(1.0)


def test_server_serves_in_simulated_arrival_order():
    """The slow client's request was made first in code but arrives last."""
    order = []
    procs = {
        0: Scripted([(5.0, 1000)]),
        1: Scripted([(1.0, 1000)]),
        2: Scripted([(3.0, 1000)]),
    }
    simulate_round(procs, dict.fromkeys(procs, FAST), server(0.1, order))
    assert order == [1, 2, 0]


def test_slow_link_delays_only_its_client():
    slow = device(up=0.008, down=8.0, rtt_ms=100.0)  # 1000 bytes: 1 s up, +50 ms
    procs = {0: Scripted([(0.0, 1000)]), 1: Scripted([(0.0, 1000)])}
    timing = simulate_round(procs, {0: slow, 1: FAST}, server(0.0))
    assert timing.clients[0].uplink == pytest.approx(1.05)
    assert timing.clients[1].finish == pytest.approx(0.002)
    assert timing.clients[0].finish == pytest.approx(1.05 + 0.051)


def test_a_failed_client_ends_alone():
    class Failing(Scripted):
        def resume(self, reply):
            if len(self.replies) == 1:
                raise ClientFailed("refused")
            return super().resume(reply)

    procs = {0: Failing([(1.0, 1000), (1.0, 1000)]), 1: Scripted([(2.0, 1000)])}
    timing = simulate_round(procs, dict.fromkeys(procs, FAST), server(0.1))
    assert timing.clients[0].failed == "refused"
    assert timing.clients[1].finish > 2.0 and not timing.clients[1].failed


def test_modelled_round_trades_client_work_for_server_work():
    """Deeper cuts: more client time, less server time; a faster server helps."""
    devices = {c: device() for c in range(4)}
    shallow, deep = predict_round(dict.fromkeys(devices, 2), world(devices)), None
    deep = predict_round(dict.fromkeys(devices, 20), world(devices))
    assert deep.server_busy < shallow.server_busy
    assert deep.clients[0].compute > shallow.clients[0].compute
    fast = predict_round(dict.fromkeys(devices, 2), world(devices, speed=8.0))
    assert fast.makespan < shallow.makespan


def test_modelled_local_client_uses_no_server():
    devices = {0: device(slowdown=2.0)}
    w = world(devices, num_layers=30)
    t = predict_round({0: 30}, w).clients[0]
    assert t.bytes_up.get("smashed", 0) == 0 and t.served == 0.0
    expected = 4 * 2.0 * w.costs.client_seconds(30, 256, 256)
    assert t.compute == pytest.approx(expected)


class Slotted(Scripted):
    """A scripted client whose requests may share a batch (``slots``)."""

    def resume(self, reply):
        seconds, out = super().resume(reply)
        if out is not None:
            out.slots = 10
        return seconds, out


def batch_server(seconds, batches):
    def serve_many(items):
        batches.append([cid for cid, _ in items])
        return seconds, [Outgoing(p, 1000, "gradients") for _, p in items]

    return serve_many


def test_a_free_server_takes_every_waiting_request_as_one_batch():
    batches = []
    procs = {cid: Slotted([(1.0, 1000)]) for cid in range(3)}
    timing = simulate_round(
        procs,
        {cid: FAST for cid in procs},
        server(0.5),
        batching=Batching(),
        serve_many=batch_server(0.8, batches),
    )
    assert batches == [[0, 1, 2]]  # all three arrive at once: one service
    assert timing.server_busy == pytest.approx(0.8)
    for t in timing.clients.values():
        assert t.served == pytest.approx(0.8) and t.queued == pytest.approx(0.0)
        assert t.finish == pytest.approx(1.0 + 0.001 + 0.8 + 0.001)


def test_a_batch_is_capped_and_a_window_waits_for_more():
    batches = []
    procs = {0: Slotted([(1.0, 1000)]), 1: Slotted([(1.1, 1000)])}
    procs[2] = Slotted([(1.15, 1000)])
    devices = {cid: FAST for cid in procs}
    kw = dict(serve_many=batch_server(0.5, batches))
    simulate_round(procs, devices, server(0.5), batching=Batching(), **kw)
    assert batches == [[0], [1, 2]]  # no window: the first goes alone
    batches.clear()
    procs = {cid: Slotted([(1.0 + 0.05 * cid, 1000)]) for cid in range(3)}
    timing = simulate_round(
        procs, devices, server(0.5), batching=Batching(window_s=0.2), **kw
    )
    assert batches == [[0, 1, 2]]  # a 200 ms window gathers all three
    assert timing.clients[0].queued == pytest.approx(0.2)
    batches.clear()
    procs = {cid: Slotted([(1.0, 1000)]) for cid in range(3)}
    simulate_round(procs, devices, server(0.5), batching=Batching(max_slots=20), **kw)
    assert batches == [[0, 1], [2]]  # 10 slots each, 20 at most


def test_requests_that_may_not_share_a_batch_are_served_alone_in_turn():
    batches, order = [], []
    procs = {0: Scripted([(1.0, 1000)]), 1: Slotted([(1.0, 1000)])}
    procs[2] = Slotted([(1.0, 1000)])
    simulate_round(
        procs,
        {cid: FAST for cid in procs},
        server(0.5, order),
        batching=Batching(),
        serve_many=batch_server(0.5, batches),
    )
    assert order == [0] and batches == [[1, 2]]


class Ahead(Slotted):
    """A client whose work runs elsewhere: ``start`` gets each input as soon
    as it is known, before ``resume`` takes the result."""

    def __init__(self, script, log):
        super().__init__(script)
        self.log, self.started = log, []

    def start(self, reply):
        self.started.append(reply)
        self.log.append(("start", reply))

    def resume(self, reply):
        assert self.started and self.started.pop(0) == reply  # started, same input
        self.log.append(("resume", reply))
        return super().resume(reply)


@pytest.mark.parametrize("batched", [False, True])
def test_a_process_may_start_on_its_input_before_its_event(batched):
    """``start`` sees every input before the clock uses the result, and the
    round's timing is the one without it."""
    scripts = {0: [(1.0, 1000), (2.0, 1000)], 1: [(1.5, 1000)], 2: [(0.2, 1000)]}
    devices = {cid: FAST for cid in scripts}
    kw = (
        dict(batching=Batching(window_s=0.1), serve_many=batch_server(0.3, []))
        if batched
        else {}
    )
    plain = simulate_round(
        {c: Slotted(s) for c, s in scripts.items()}, devices, server(0.4), **kw
    )
    log = []
    ahead = {c: Ahead(s, log) for c, s in scripts.items()}
    timing = simulate_round(ahead, devices, server(0.4), **kw)
    assert timing == plain
    assert all(not p.started for p in ahead.values())  # each start was resumed
    # every client's inputs started at time 0, before any result was used
    assert log[:3] == [("start", None)] * 3
