"""The federation deployed: the server and each client as their own process.

The server process is the round coordinator (:mod:`splitft.federation.coordinator`)
with :class:`NetworkRounds`: the same strategy, split server, aggregation,
evaluation and checkpoints as the simulation; only how a round runs differs.
A round is opened for the clients the strategy selected; each client, polling
with ``RoundRequest(round=-1)``, is handed its plan, trains through the
server over gRPC and uploads; the round closes when every selected client
has uploaded or at the deadline (``federation.round_timeout_s``), and those
who did not upload are left out of its aggregation.

A client process (:mod:`splitft.federation.remote`) joins, then asks for
plans until the server says stop.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import queue
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from splitft import runs
from splitft.config import ConfigError, RunConfig
from splitft.federation.coordinator import Coordinator, RoundFailed, run_with_retries
from splitft.federation.remote import message_limit_for
from splitft.federation.strategy import RoundDecision, RoundResult
from splitft.sim.clock import ClientTiming, RoundTiming
from splitft.split.messages import (
    Ack,
    AdapterUpdate,
    Join,
    RoundRequest,
    SmashedData,
    Stop,
    TailGradient,
    Wait,
    report_steps,
)

log = logging.getLogger(__name__)


class NetworkRounds:
    """Rounds run by remote clients: the coordinator's side of the network.

    Args:
        serve: builds and starts the transport's server for a request handler
            (``handler.handle(msg, peer)``, ``handler.device``) and returns it;
            it must have ``traffic`` (per client) and ``stop()``.
        timeout_s: how long a round waits for its uploads.
        min_clients: the fewest uploads a round may be aggregated with.
        retries: how often a round short of ``min_clients`` is run again.
        poll_s: how long a client's request for a plan is held, waiting for
            one, before it is told to ask again (a long poll).
    """

    def __init__(
        self,
        serve,
        timeout_s: float,
        min_clients: int = 1,
        retries: int = 1,
        poll_s: float = 2.0,
    ) -> None:
        self._serve = serve
        self.timeout_s, self.min_clients = timeout_s, min_clients
        self.retries, self.poll_s = retries, poll_s
        self._cond = threading.Condition()
        self._open: RoundDecision | None = None
        self._next_round = 0
        self._uploaded: dict[int, float] = {}
        self._reports: dict[int, list[dict]] = {}
        self.memory: dict[int, int] = {}  # bytes each client declared at Join
        self._stopped = ""  # why the run stopped, once it has
        self._resumes = False  # ...and whether it goes on when resumed
        self._told: set[int] = set()  # the clients answered Stop
        self.transport = None
        # the model's work during a round, run by the coordinator's thread:
        # (fn, future, request, peer)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._held: collections.deque = collections.deque()  # taken, not yet run
        self._running: list[tuple] = []  # being run (a signal may cut them short)
        self._pumping = False

    # ------------------------------------------------------ the coordinator
    def setup(self, coordinator) -> dict[int, list[tuple[int, int]]]:
        self.coordinator = coordinator
        self.server = coordinator.server
        self.device = self.server.device
        settings = coordinator.cfg.server
        self.batching = settings.batching
        self.window_s = settings.batch_window_ms / 1e3
        self.max_slots = settings.max_batch_tokens
        self.transport = self._serve(self)
        return {}  # the clients' data sizes are theirs: the planner learns them

    def run_round(
        self, planned: RoundDecision, devices: Mapping[int, Any]
    ) -> RoundResult:
        """Open the round, wait for its uploads or the deadline, close it."""
        return run_with_retries(
            lambda: self._attempt(planned),
            planned,
            self.server,
            self.min_clients,
            self.retries,
            f"within federation.round_timeout_s={self.timeout_s:g}",
            "start more clients, then resume the run",
        )

    def _attempt(self, planned: RoundDecision) -> tuple[RoundResult, list[int]]:
        traffic = self.transport.traffic
        before = {
            c: traffic[c].snapshot() if c in traffic else {} for c in planned.cuts
        }
        self.server.open_round(planned.round, planned.cuts)
        t0 = time.monotonic()
        with self._cond:
            self._open = planned
            self._uploaded, self._reports = {}, {}
            self._pumping = True
            self._cond.notify_all()  # the clients waiting for a plan
        deadline = t0 + self.timeout_s
        while time.monotonic() < deadline:
            with self._cond:
                if set(self._uploaded) == set(planned.cuts):
                    break
            jobs = self._take(min(0.05, deadline - time.monotonic()))
            if jobs:
                self._running = jobs
                self._do_all(jobs)
                self._running = []
        with self._cond:
            self._pumping = False
            self._open = None  # no more plans; late steps are refused
            self._next_round = planned.round + 1
            uploaded = dict(self._uploaded)
            reports = dict(self._reports)
            self.server.close_round(keep=uploaded)
        while self._held or not self._jobs.empty():  # refused: their round closed
            job = self._held.popleft() if self._held else self._jobs.get()
            _do(*job[:2])
        clients = {}
        for cid in planned.cuts:
            steps = reports.get(cid, [])
            t = ClientTiming(
                finish=uploaded.get(cid, time.monotonic()) - t0,
                compute=sum(s.get("client_seconds", 0.0) for s in steps),
                served=sum(s.get("server_seconds", 0.0) for s in steps),
                messages=len(steps),
                failed="" if cid in uploaded else "no upload by the deadline",
            )
            now = traffic[cid].snapshot() if cid in traffic else {}
            for key, n in now.items():
                direction, kind = key.split("_", 1)
                grew = n - before[cid].get(key, 0)
                if grew:
                    getattr(t, f"bytes_{direction}")[kind] += grew
            clients[cid] = t
        timing = RoundTiming(
            clients=clients,
            makespan=max((t.finish for t in clients.values()), default=0.0),
            server_busy=sum(t.served for t in clients.values()),
        )
        steps = [s for cid in sorted(reports) for s in reports[cid]]
        return RoundResult(timing, steps, {}), sorted(uploaded)

    def _take(self, timeout: float) -> list[tuple]:
        """The next jobs to run: one, or with ``server.batching`` every one
        waiting (after ``server.batch_window_ms`` from the first, at most
        ``server.max_batch_tokens`` slots of micro-batches)."""
        if not self._held:
            try:
                self._held.append(self._jobs.get(timeout=max(timeout, 0.0)))
            except (queue.Empty, ValueError):
                return []
        if not self.batching:
            return [self._held.popleft()]
        until = time.monotonic() + self.window_s
        while True:
            try:
                self._held.append(self._jobs.get_nowait())
                continue
            except queue.Empty:
                pass
            left = until - time.monotonic()
            if left <= 0 or _slots(self._held) >= (self.max_slots or math.inf):
                break
            try:
                self._held.append(self._jobs.get(timeout=left))
            except queue.Empty:
                break
        taken, slots = [], 0
        while self._held:
            n = _batchable(self._held[0][2])
            if taken and n and self.max_slots and slots + n > self.max_slots:
                break
            taken.append(self._held.popleft())
            slots += n
        return taken

    def _do_all(self, jobs: list[tuple]) -> None:
        """Run jobs: the micro-batches among them as one batch of the server
        (:meth:`SplitServer.handle_many`), the rest one by one."""
        batch = [job for job in jobs if _batchable(job[2])]
        for job in jobs:
            if not _batchable(job[2]):
                _do(*job[:2])
        if not batch:
            return
        try:
            replies = self.server.handle_many([(job[2], job[3]) for job in batch])
        except Exception as e:  # noqa: BLE001 - the waiting requests get it
            for job in batch:
                job[1].set_exception(e)
            return
        for job, reply in zip(batch, replies, strict=True):
            job[1].set_result(reply)

    def declared(self, devices: Mapping[int, Any]) -> dict[int, Any]:
        """The config's device profiles (``sim.mix``: what the planner starts
        from), with the memory budget each client declared when it joined."""
        with self._cond:
            memory = dict(self.memory)
        return {
            cid: dataclasses.replace(dev, memory=memory[cid]) if cid in memory else dev
            for cid, dev in devices.items()
        }

    def _too_little_memory(self, cid: int, memory: int) -> str:
        """Why a declared memory budget cannot hold the shallowest cut, or ""."""
        # the port opens before the cost probe so that clients join while it
        # runs and the first plan knows their budgets: a Join may come first
        until = time.monotonic() + 120.0
        while not self.coordinator.strategy_ready.wait(timeout=0.25):
            if self._stopped or time.monotonic() > until:
                return ""  # the planner will see it; it names the client
        k_min = self.coordinator.cfg.federation.k_min
        need = self.coordinator.strategy.estimator.world.memory(cid, k_min)
        if memory >= need:
            return ""
        return (
            f"--memory-mb {memory / 1e6:g} cannot hold its part of the model at "
            f"federation.k_min={k_min} ({need / 1e6:.1f} MB)"
        )

    def state_dict(self) -> dict:
        return {}  # the server's plans tell each client where its data order is

    def load_state_dict(self, state: dict) -> None:
        pass

    def summary(self) -> dict:
        """Payload bytes of every message the transport carried (joins and
        polls between rounds too), per client."""
        traffic = getattr(self.transport, "traffic", {})
        return {"transport_bytes": {str(c): t.snapshot() for c, t in traffic.items()}}

    def ready(self) -> None:
        """Set-up is done: health checks hear SERVING."""
        self.transport.serving(True)

    def close(self, reason: str = "", resumes: bool = False) -> None:
        """Stop: every waiting request is answered :class:`Stop` with
        ``reason`` (the jobs a signal cut short too), health checks hear
        NOT_SERVING, then the port closes. Leaves no thread waiting.

        The port stays open a little for the clients that were not waiting
        to hear it: ``min(2 poll_s, 2 s)`` when the run stops to resume later
        (``resumes``: a grace period is short, and they wait for the server
        anyway), up to ``5 poll_s`` for every client to hear that it is over
        (one away checks the server's health every second)."""
        with self._cond:
            self._stopped = self._stopped or reason or "the run is over"
            self._resumes = resumes
            self._pumping, self._open = False, None
            # run() queues nothing once _stopped is set: these are all there are
            waiting = [*self._running, *self._held]
            self._running, self._held = [], collections.deque()
            while not self._jobs.empty():
                waiting.append(self._jobs.get_nowait())
            for _fn, future, msg, _peer in waiting:
                if not future.done():
                    future.set_result(self._stop(msg.client_id))
            self._cond.notify_all()  # the long polls
        if self.transport is None:
            return
        self.transport.serving(False)
        t0 = time.monotonic()
        everyone = set(range(self.coordinator.cfg.federation.num_clients))
        with self._cond:
            while True:
                left = (
                    min(2 * self.poll_s, 2.0)
                    if resumes or everyone <= self._told
                    else 5 * self.poll_s
                ) - (time.monotonic() - t0)
                if left <= 0:
                    break
                self._cond.wait(left)
        if not resumes and not everyone <= self._told:
            log.warning(
                "clients %s did not hear that the run is over (gone?)",
                sorted(everyone - self._told),
            )
        self.transport.stop(grace=1.0)

    def _stop(self, cid: int) -> Stop:
        """The Stop a client is told (under ``_cond``)."""
        self._told.add(cid)
        self._cond.notify_all()
        return Stop(cid, self._stopped, self._resumes)

    # --------------------------------------------------------- the clients
    def run(self, msg, fn, peer: int | None = None):
        """Run a request for the transport. During a round the model's work
        (a micro-batch) runs on the coordinator's thread, the process's main
        one: PyTorch on CPU ran the same server step 1.45x slower on another
        thread here (docs/benchmarks.md, the network transport); with
        ``server.batching`` the micro-batches waiting there run as one batch."""
        future: Future | None = None
        with self._cond:
            if self._stopped:  # whatever it asked: the run is over for it
                return self._stop(getattr(msg, "client_id", -1))
            # plans, joins and uploads run on the transport's thread
            if self._pumping and isinstance(msg, (SmashedData, TailGradient)):
                future = Future()
                self._jobs.put((fn, future, msg, peer))
        return fn() if future is None else future.result()

    def handle(self, msg, peer: int | None = None):
        """A client's request: plans and waits here, the split work in the server."""
        cid = getattr(msg, "client_id", -1)
        if isinstance(msg, RoundRequest) and msg.round == -1:
            if peer is not None and cid != peer:
                return self.server.handle(msg, peer)  # refused there, by class
            with self._cond:  # a long poll: answered as soon as there is news
                until = time.monotonic() + self.poll_s
                while True:
                    if self._stopped:
                        return self._stop(cid)
                    open_ = self._open
                    if open_ and cid in open_.cuts and cid not in self._uploaded:
                        break
                    if time.monotonic() >= until:
                        nxt = open_.round if open_ is not None else self._next_round
                        return Wait(cid, nxt, 0.0)  # ask again at once
                    runs.fault("poll")
                    self._cond.wait(until - time.monotonic())
            msg = RoundRequest(cid, open_.round)
        if isinstance(msg, Join):
            reply = self.server.handle(msg, peer)
            if isinstance(reply, Ack) and not reply.code and msg.memory_bytes:
                short = self._too_little_memory(cid, msg.memory_bytes)
                if short:
                    return Ack(cid, f"client {cid}: {short}", "FAILED_PRECONDITION")
                with self._cond:
                    if self._stopped:  # it waited for a run that stopped
                        return self._stop(cid)
                    self.memory[cid] = msg.memory_bytes
            return reply
        if not isinstance(msg, AdapterUpdate):
            return self.server.handle(msg, peer)
        with self._cond:  # an upload and the round's closing never cross
            reply = self.server.handle(msg, peer)
            ok = isinstance(reply, Ack) and not reply.code
            if ok and self._open is not None and self._open.round == msg.round:
                self._uploaded.setdefault(cid, time.monotonic())
                self._reports[cid] = step_records(msg, self.server.cut_layers[cid])
                self._cond.notify_all()
        return reply


def _batchable(msg) -> int:
    """The token slots of a vanilla split's micro-batch (it may share a
    batch), else 0."""
    if isinstance(msg, SmashedData) and msg.labels is not None:
        return msg.hidden.shape[0] * msg.hidden.shape[1]
    return 0


def _slots(jobs) -> int:
    return sum(_batchable(job[2]) for job in jobs)


def _do(fn, future: Future) -> None:
    """Run a request's work; its failure is the request's (an interrupt is
    not: it goes on to the coordinator, and close() answers the request)."""
    try:
        future.set_result(fn())
    except Exception as e:  # noqa: BLE001 - the waiting request gets it
        future.set_exception(e)


def step_records(msg: AdapterUpdate, cut: int) -> list[dict]:
    """The client's step metrics its upload carries, as the simulation logs them."""
    return [
        {"round": msg.round, "client": msg.client_id, "cut_layer": cut, **s}
        for s in report_steps(msg.report)
    ]


# ------------------------------------------------------------ the processes
def serve_run(
    cfg: RunConfig,
    address: str,
    certs: Path | None,
    tokens: Path | None,
    insecure: bool = False,
    allow_insecure_remote: bool = False,
    resume: bool = False,
) -> dict:
    """``splitft server``: the coordinator with networked rounds, until done."""
    from splitft.transport.health import read_file
    from splitft.transport.network import NetworkServer, check_address
    from splitft.transport.security import (
        check_key_pair,
        check_tokens_cover,
        load_token_hashes,
    )

    check_address(address, insecure, allow_insecure_remote)
    if not insecure and certs is None:
        raise ConfigError(
            "--certs DIR is required (from `splitft certs`), or --insecure"
        )
    tokens = tokens or (certs / "tokens.json" if certs else None)
    if tokens is None:
        raise ConfigError("--tokens FILE is required with --insecure (no --certs)")
    hashes = load_token_hashes(tokens)
    check_tokens_cover(hashes, tokens, cfg.federation.num_clients)
    tls = None
    if not insecure:
        cert, key = certs / "server.pem", certs / "server.key"
        tls = (read_file(cert), read_file(key))
        check_key_pair(*tls, cert, key)
    fed = cfg.federation

    def serve(handler: NetworkRounds):
        limit = message_limit_for(cfg, handler.server.model_config)
        net = NetworkServer(
            handler,
            address,
            tls=tls,
            token_hashes=hashes,
            max_message_bytes=limit,
            insecure=insecure,
            workers=fed.num_clients + 8,  # a long poll holds a worker
            max_calls_per_client=cfg.server.max_calls_per_client,
            allow_insecure_remote=allow_insecure_remote,
        )
        net.start()
        host = address.rpartition(":")[0]
        log.info(
            "serving %s on %s:%d (%s), waiting for %d clients",
            cfg.name,
            host,
            net.port,
            "plaintext" if insecure else "TLS",
            fed.num_clients,
        )
        return net

    rounds = NetworkRounds(
        serve, fed.round_timeout_s, fed.min_clients, fed.round_retries
    )
    return Coordinator(cfg, rounds, resume=resume).run()


__all__ = ["NetworkRounds", "RoundFailed", "serve_run"]
