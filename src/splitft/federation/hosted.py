"""Simulated clients that run outside the coordinator's process: on hosts.

The local simulation (:mod:`splitft.federation.simulation`) keeps every client
in the coordinator's process and runs its work when the clock's event for it
comes. Here a client's work runs on a *host* (a Ray actor:
:mod:`splitft.federation.raybackend`; or this process, for tests): the
coordinator, the server and the clock stay where they are, and the clock
hands each client's next input to its host as soon as it is known
(``Process.start`` in :mod:`splitft.sim.clock`), so the hosts compute in
parallel while the results are still *used* in simulated-time order. A
round is therefore the local simulation's round, message for message.

Hosts are stateless between rounds, as deployed clients are: a round's
client is built from the run's config, its state (data position and cut,
the checkpoint's ``clients`` entry, the same as the local simulation's) and
the plan the server sends it. A host that dies takes its clients' rounds
with it: they fail as a crashed local client does, and the round goes on
without them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

import torch

from splitft.config import ConfigError, RunConfig
from splitft.data.federated import client_rows, load_run_data
from splitft.data.format import pad_token_id
from splitft.federation.coordinator import Coordinator, run_with_retries
from splitft.federation.simulation import clock_round
from splitft.federation.strategy import RoundDecision, RoundResult
from splitft.models.load import load_for_run
from splitft.models.parts import WeightStore, load_tokenizer
from splitft.sim.clock import ClientFailed, Outgoing
from splitft.sim.clocked import ClockedClient
from splitft.sim.costs import CostModel
from splitft.sim.predict import row_size
from splitft.sim.profiles import Device
from splitft.split.client import SplitClient
from splitft.split.messages import Ack, decode, encode

log = logging.getLogger(__name__)

# what a host returns for one segment of a client's round: (seconds on the
# clock, the request it sends or None, its trace entry, why it failed or "",
# at its end (steps, re-cut seconds, its state) else None)
Segment = tuple[float, Outgoing | None, tuple, str, tuple | None]


class HostLost(RuntimeError):
    """A host died or was restarted: the clients it held lost their round."""


class ClientHost:
    """Runs clients' rounds for a coordinator elsewhere.

    Loads the run's model config, tokenizer, data partitions and one frozen
    base (``client.base_dtype``) once; builds each round's clients from the
    state it is given and drops them when their round ends.
    """

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        loaded = load_for_run(cfg)
        tokenizer = load_tokenizer(loaded.folder)
        self.model_config, self.pad_id = loaded.model_config, pad_token_id(tokenizer)
        self.partitions = load_run_data(cfg, tokenizer).partitions
        self.store = WeightStore.for_base(
            loaded.folder, cfg.client.base_dtype, loaded.device
        )
        self.live: dict[int, ClockedClient] = {}  # this round's clients
        self.rows: dict[int, list[dict]] = {}  # a client's rows, made once

    def _client(self, cid: int) -> SplitClient:
        partition = self.partitions[cid]
        if cid not in self.rows:
            self.rows[cid] = client_rows(self.cfg, partition)
        return SplitClient.from_run(
            self.cfg,
            cid,
            self.store,
            self.model_config,
            self.rows[cid],
            self.pad_id,
            len(partition),
        )

    def ping(self) -> bool:
        return True

    def join(self, cid: int) -> tuple[bytes, dict]:
        """Client ``cid``'s Join (encoded) and its state before any round."""
        client = self._client(cid)
        return encode(next(client._join())), client.state_dict()

    def begin(
        self,
        cid: int,
        rnd: int,
        state: dict,
        device: Device,
        timing: str,
        costs: CostModel,
    ) -> None:
        """Build client ``cid`` as the last round left it, for round ``rnd``."""
        client = self._client(cid)
        client.joined = True  # it joined at set-up
        client.load_state_dict(state)  # the old cut: a moved one is re-cut work
        self.live[cid] = ClockedClient(client, rnd, device, timing, costs)

    def resume(self, cid: int, reply: bytes | None) -> Segment:
        """Client ``cid``'s next segment (the clock's ``resume``).

        Raises:
            HostLost: this host does not hold it (it was restarted).
        """
        process = self.live.get(cid)
        if process is None:
            raise HostLost(f"its host restarted and lost client {cid}'s round")
        try:
            seconds, out = process.resume(reply)
            failure = ""
        except ClientFailed as e:
            seconds, out, failure = 0.0, None, str(e)
        end = None
        if out is None:  # done or failed: what the coordinator keeps
            end = (process.steps, process.recut, process.client.state_dict())
            del self.live[cid]
        return seconds, out, process.trace[-1], failure, end

    def drop(self) -> None:
        """Forget this round's clients (a round that stopped early)."""
        self.live.clear()


class Executor(Protocol):
    """Where the hosts run: ``submit`` a call to a host's method, ``wait``
    for its result (raises :class:`HostLost` if the host died)."""

    size: int  # hosts

    def submit(self, host: int, method: str, *args: Any) -> Any: ...

    def wait(self, handle: Any) -> Any: ...

    def ensure(self) -> None:
        """Before a round: every host is up (restarted or replaced)."""
        ...

    def close(self) -> None: ...


class InProcess:
    """Hosts in this process, each call run when submitted (tests; the
    reference the Ray executor must equal). The calls draw on their own
    copy of torch's random state, as a host in another process does."""

    def __init__(self, cfg: RunConfig, size: int = 1) -> None:
        self.size = size
        self.hosts = [ClientHost(cfg) for _ in range(size)]

    def submit(self, host: int, method: str, *args: Any) -> Callable[[], Any]:
        with torch.random.fork_rng(devices=[]):
            try:
                result = getattr(self.hosts[host], method)(*args)
            except Exception as e:  # noqa: BLE001 - raised again by wait
                error = e
                return lambda: _raise(error)
        return lambda: result

    def wait(self, handle: Callable[[], Any]) -> Any:
        return handle()

    def ensure(self) -> None:
        pass  # hosts in this process do not die alone

    def close(self) -> None:
        self.hosts.clear()


def _raise(error: Exception):
    raise error


class HostedClient:
    """A clock process whose work runs on a host (:class:`ClientHost`)."""

    def __init__(self, executor: Executor, host: int, cid: int) -> None:
        self.executor, self.host, self.cid = executor, host, cid
        self._pending: Any = None
        # as ClockedClient's: what replay and the coordinator read
        self.trace: list[tuple] = []
        self.steps: list[dict] = []
        self.recut = 0.0
        self.state: dict | None = None  # its state at the end of its round

    def start(self, reply: Any) -> None:
        self._pending = self.executor.submit(self.host, "resume", self.cid, reply)

    def resume(self, reply: Any) -> tuple[float, Outgoing | None]:
        if self._pending is None:
            self.start(reply)
        handle, self._pending = self._pending, None
        try:
            seconds, out, entry, failure, end = self.executor.wait(handle)
        except HostLost as e:
            why = f"its host was lost: {e}"
            log.warning("client %d failed: %s", self.cid, why)
            self.trace.append((0.0, None, why))
            raise ClientFailed(why) from None
        self.trace.append(entry)
        if end is not None:
            self.steps, self.recut, self.state = end
        if failure:
            raise ClientFailed(failure)
        return seconds, out


class HostedRounds:
    """The simulation's rounds with the clients' work on an executor's hosts.

    Client ``i`` of a round (in id order) runs on host ``i % size``, so each
    host holds one client at a time when there are as many hosts as clients
    in a round.
    """

    def __init__(self, executor: Callable[[RunConfig], Executor]) -> None:
        self._make = executor  # the executor, from the run's config
        self.executor: Executor | None = None
        self.states: dict[int, dict] = {}  # the checkpoint's "clients"
        self._ended: dict[int, dict] = {}  # a round's new states, once kept

    def setup(self, coordinator: Coordinator) -> dict[int, list[int]]:
        self.coordinator = c = coordinator
        self.executor = self._make(c.cfg)
        rows = {cid: client_rows(c.cfg, p) for cid, p in enumerate(c.data.partitions)}
        joins = {
            cid: self.executor.submit(cid % self.executor.size, "join", cid)
            for cid in rows
        }
        for cid, handle in joins.items():  # before the clock starts
            try:
                data, state = self.executor.wait(handle)
            except HostLost as e:
                raise ConfigError(f"client {cid} cannot join: {e}") from None
            reply = c.server.handle(decode(data, c.server.device))
            if not isinstance(reply, Ack) or reply.error:
                why = getattr(reply, "error", "") or type(reply).__name__
                raise ConfigError(f"client {cid} cannot join: {why}")
            self.states[cid] = state  # a resume's checkpoint comes after
        return {cid: [row_size(r) for r in rs] for cid, rs in rows.items()}

    def run_round(self, planned: RoundDecision, devices) -> RoundResult:
        """The round on the clock; a round that lost more clients than
        ``federation.min_clients`` allows (their hosts died) is run again,
        from the same states, as a deployed round short of uploads is."""
        fed = self.coordinator.cfg.federation
        result = run_with_retries(
            lambda: self._attempt(planned, devices),
            planned,
            self.coordinator.server,
            fed.min_clients,
            fed.round_retries,
            "(their hosts were lost)",
            "see the errors above, then resume the run",
        )
        self.states.update(self._ended)  # the kept attempt's
        return result

    def _attempt(self, planned: RoundDecision, devices) -> tuple[RoundResult, list]:
        c, ex = self.coordinator, self.executor
        ex.ensure()  # hosts that died are back (or replaced)
        chosen = sorted(planned.cuts)
        hosts = {cid: i % ex.size for i, cid in enumerate(chosen)}
        begun = {
            cid: ex.submit(
                hosts[cid],
                "begin",
                cid,
                planned.round,
                self.states[cid],
                devices[cid],
                c.cfg.sim.timing,
                c.costs,
            )
            for cid in chosen
        }
        processes: dict[int, Any] = {}
        for cid, handle in begun.items():
            try:
                ex.wait(handle)
                processes[cid] = HostedClient(ex, hosts[cid], cid)
            except HostLost as e:  # its round fails at its first segment
                processes[cid] = _Lost(f"its host was lost: {e}")
                log.warning("client %d: %s", cid, processes[cid].why)
        result = clock_round(c, planned, devices, processes)
        self._ended = {  # the clients' states, if this attempt is kept
            cid: p.state for cid, p in processes.items() if p.state is not None
        }
        uploaded = [cid for cid, t in result.timing.clients.items() if not t.failed]
        return result, uploaded

    def declared(self, devices):
        return devices

    def summary(self) -> dict:
        """What summary.json says of where the clients computed."""
        return {"client_hosts": self.executor.size}

    def state_dict(self) -> dict:
        return {cid: dict(state) for cid, state in self.states.items()}

    def load_state_dict(self, state: dict) -> None:
        self.states.update(state)

    def ready(self) -> None:
        pass

    def close(self, reason: str = "", resumes: bool = False) -> None:
        if self.executor is not None:
            self.executor.close()


class _Lost:
    """A client whose host was lost before its round began."""

    def __init__(self, why: str) -> None:
        self.why, self.trace, self.steps, self.recut = why, [], [], 0.0
        self.state = None

    def resume(self, reply: Any) -> tuple[float, Outgoing | None]:
        self.trace.append((0.0, None, self.why))
        raise ClientFailed(self.why)
