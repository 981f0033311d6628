"""PROTOTYPE (scratch, not the project): clients in Ray actors, the clock and
the server in this process; the same Coordinator, ClockedClient, ClockedServer."""

from __future__ import annotations

import time

import ray

from splitft import interrupts
from splitft.data.federated import client_rows, load_run_data
from splitft.data.format import pad_token_id
from splitft.federation.simulation import SimulatedRounds
from splitft.federation.strategy import RoundResult
from splitft.models.load import load_for_run
from splitft.models.parts import WeightStore, load_tokenizer
from splitft.sim.clock import ClientFailed, simulate_round
from splitft.sim.clocked import ClockedServer, replay
from splitft.sim.predict import row_size
from splitft.split.client import SplitClient
from splitft.split.messages import Ack, decode, encode


class ClientHost:
    """One actor: the run's model and data once; this round's clients."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        loaded = load_for_run(cfg)
        tok = load_tokenizer(loaded.folder)
        self.model_config, self.pad = loaded.model_config, pad_token_id(tok)
        self.partitions = load_run_data(cfg, tok).partitions
        self.store = WeightStore.for_base(
            loaded.folder, cfg.client.base_dtype, device=loaded.device
        )
        self.live: dict[int, object] = {}  # cid -> ClockedClient (this round)

    def _client(self, cid: int, state: dict | None) -> SplitClient:
        p = self.partitions[cid]
        c = SplitClient.from_run(
            self.cfg, cid, self.store, self.model_config,
            client_rows(self.cfg, p), self.pad, len(p),
        )
        if state is not None:
            c.joined = True  # it joined at set-up
            if state["order"] is not None:
                c.load_state_dict(state)
        return c

    def ping(self) -> int:
        import os
        return os.getpid()

    def join(self, cid: int) -> bytes:
        gen = self._client(cid, None)._join()
        return encode(next(gen))

    def begin(self, cid, rnd, state, device, timing, costs) -> None:
        from splitft.sim.clocked import ClockedClient

        self.live[cid] = ClockedClient(
            self._client(cid, state), rnd, device, timing, costs
        )

    def resume(self, cid: int, reply: bytes | None):
        import os
        p = self.live[cid]
        time.sleep(float(os.environ.get("PROTO_SLOW", "0")))
        if os.environ.get("PROTO_DIE") == f"{p.client._round if hasattr(p.client, '_round') else -1}:{cid}:{len(p.trace)}":
            os._exit(1)
        try:
            seconds, out = p.resume(reply)
            failure = ""
        except ClientFailed as e:
            seconds, out, failure = 0.0, None, str(e)
        end = None
        if out is None:  # done or failed: hand back what the coordinator keeps
            end = (p.steps, p.recut, p.client.state_dict())
            del self.live[cid]
        return seconds, out, p.trace[-1], failure, end


import signal as _signal
import threading as _threading

STOP = _threading.Event()  # set by ServerActor.interrupt (the driver's Ctrl-C)


def wait(ref, poll_s: float = 0.25):
    """ray.get that Ctrl-C (splitft's Interrupted) can stop between polls."""
    while True:
        if STOP.is_set():
            raise interrupts.Interrupted(_signal.SIGINT)
        with interrupts.deferred():
            done, _ = ray.wait([ref], timeout=poll_s)
        if done:
            return ray.get(done[0])


class RemoteClient:
    """A clock process whose work runs in a ClientHost actor."""

    def __init__(self, host, cid: int) -> None:
        self.host, self.cid = host, cid
        self.ref = None
        self.trace, self.steps, self.recut, self.state = [], [], 0.0, None

    def start(self, reply) -> None:
        self.ref = self.host.resume.remote(self.cid, reply)

    def resume(self, reply):
        if self.ref is None:
            self.start(reply)
        ref, self.ref = self.ref, None
        try:
            seconds, out, entry, failure, end = wait(ref)
        except ray.exceptions.RayTaskError as e:  # e.g. KeyError: a restarted host
            self.trace.append((0.0, None, f"host lost it: {e.cause!r}"))
            raise ClientFailed(f"its host lost it: {e.cause!r}") from None
        except ray.exceptions.RayActorError as e:
            self.trace.append((0.0, None, f"actor died: {e}"))
            raise ClientFailed(f"its actor died: {type(e).__name__}") from None
        self.trace.append(entry)
        if end is not None:
            self.steps, self.recut, self.state = end
        if failure:
            raise ClientFailed(failure)
        return seconds, out


class RayRounds(SimulatedRounds):
    def __init__(self, hosts: int = 2, resources: dict | None = None) -> None:
        self.n_hosts, self.resources = hosts, resources or {"num_cpus": 1}

    def setup(self, coordinator):
        self.coordinator = c = coordinator
        Host = ray.remote(ClientHost)
        self.hosts = [
            Host.options(max_restarts=1, **self.resources).remote(c.cfg)
            for _ in range(self.n_hosts)
        ]
        rows = {cid: client_rows(c.cfg, p) for cid, p in enumerate(c.data.partitions)}
        self.states = {cid: {"order": None, "cut": None} for cid in rows}
        for cid in rows:  # Join, as the local simulation does before the clock
            host = self.hosts[cid % len(self.hosts)]
            reply = c.server.handle(decode(wait(host.join.remote(cid))))
            assert isinstance(reply, Ack) and not reply.error, reply
        return {cid: [row_size(r) for r in rs] for cid, rs in rows.items()}

    def run_round(self, planned, devices):
        c, sim = self.coordinator, self.coordinator.cfg.sim
        c.server.open_round(planned.round, planned.cuts)
        for h in self.hosts:  # a host that died restarts: wait for it
            for _ in range(240):
                try:
                    wait(h.ping.remote())
                    break
                except ray.exceptions.ActorUnavailableError:
                    time.sleep(0.25)
        procs, begun = {}, []
        for i, cid in enumerate(sorted(planned.cuts)):
            host = self.hosts[i % len(self.hosts)]
            st = self.states[cid]
            state = st
            begun.append(
                host.begin.remote(cid, planned.round, state, devices[cid], sim.timing, c.costs)
            )
            procs[cid] = RemoteClient(host, cid)
        for ref in begun:
            wait(ref)
        server = ClockedServer(c.server, c.server_device.speed, sim.timing, c.costs)
        workers, batching = c.server_device.workers, c.server_device.batching
        timing = simulate_round(procs, devices, server, workers, batching, server.many, trace=True)
        if sim.timing == "measured":
            timing = replay(procs, server, devices, workers, batching)
        for cid, p in procs.items():
            if p.state is not None:
                self.states[cid] = p.state
        steps = [s for cid in sorted(procs) for s in procs[cid].steps]
        return RoundResult(timing, steps, {cid: p.recut for cid, p in procs.items()})

    def state_dict(self):
        return dict(self.states)

    def load_state_dict(self, state):
        self.states.update(state)

    def close(self, reason: str = "", resumes: bool = False) -> None:
        for h in getattr(self, "hosts", []):
            ray.kill(h)


class ServerActor:
    """Phase B sketch: the coordinator (with its SplitServer) in one actor."""

    def run(self, cfg, costs, resume=False, hosts=2):
        c = Coordinator(cfg, RayRounds(hosts=hosts, resources={"num_cpus": 0.5}), costs=costs, resume=resume)
        c.run(table=False)
        return c.sim_time, {k: v.cpu() for k, v in c.server.global_state.items()}

    def interrupt(self):
        STOP.set()
        return True


from splitft.federation.coordinator import Coordinator  # noqa: E402
