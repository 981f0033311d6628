"""A federation of split-learning clients simulated in one process.

The round coordinator (:mod:`splitft.federation.coordinator`) with
:class:`SimulatedRounds`: every client is a real :class:`SplitClient` in this
process, reaching the real server through the simulated network
(:mod:`splitft.sim.clocked`): real messages, encoded exactly as on a
wire, delivered when the event-driven clock says, so heterogeneous devices,
links and the server queue shape each round's simulated time.
"""

from __future__ import annotations

from splitft import report
from splitft.config import ConfigError, RunConfig
from splitft.data.federated import client_rows
from splitft.federation.coordinator import Coordinator
from splitft.federation.strategy import RoundDecision, RoundResult
from splitft.sim.clock import simulate_round
from splitft.sim.clocked import ClockedClient, ClockedServer, replay
from splitft.sim.costs import CostModel
from splitft.sim.predict import expected_slots, row_size
from splitft.split.client import JoinFailed, SplitClient

__all__ = ["Simulation", "SimulatedRounds", "clock_round", "expected_slots"]


class SimulatedRounds:
    """Every client in this process, each round run on the simulated clock."""

    def setup(self, coordinator: Coordinator) -> dict[int, list[int]]:
        self.coordinator = c = coordinator
        cfg = c.cfg
        partitions = c.data.partitions
        rows = {cid: client_rows(cfg, p) for cid, p in enumerate(partitions)}
        self.clients = {
            cid: SplitClient.from_run(
                cfg,
                cid,
                c.client_store,
                c.model_config,
                rows[cid],
                c.pad_id,
                len(partitions[cid]),
            )
            for cid in rows
        }
        for cid, client in self.clients.items():  # before the clock starts
            try:
                client.join(c.server.handle)
            except JoinFailed as e:
                raise ConfigError(f"client {cid} cannot join: {e}") from None
        return {cid: [row_size(r) for r in rs] for cid, rs in rows.items()}

    def run_round(self, planned: RoundDecision, devices) -> RoundResult:
        """The selected clients train through the server on the simulated clock."""
        c = self.coordinator
        processes = {
            cid: ClockedClient(
                self.clients[cid],
                planned.round,
                devices[cid],
                c.cfg.sim.timing,
                c.costs,
            )
            for cid in planned.cuts
        }
        return clock_round(c, planned, devices, processes)

    def declared(self, devices):
        return devices  # the simulated devices are what they are

    def state_dict(self) -> dict:
        return {cid: client.state_dict() for cid, client in self.clients.items()}

    def load_state_dict(self, state: dict) -> None:
        for cid, client in self.clients.items():
            client.load_state_dict(state[cid])

    def ready(self) -> None:
        pass

    def close(self, reason: str = "", resumes: bool = False) -> None:
        pass


def clock_round(
    c: Coordinator, planned: RoundDecision, devices, processes
) -> RoundResult:
    """Round ``planned`` of the clock's ``processes`` (one per selected
    client) through the coordinator's server, on the simulated clock; the
    processes keep ``steps``, ``recut`` and ``trace`` as ClockedClient does."""
    sim = c.cfg.sim
    c.server.open_round(planned.round, planned.cuts)
    server = ClockedServer(c.server, c.server_device.speed, sim.timing, c.costs)
    workers, batching = c.server_device.workers, c.server_device.batching
    timing = simulate_round(
        processes, devices, server, workers, batching, server.many, trace=True
    )
    if sim.timing == "measured":  # ran in the modelled order; time as measured
        timing = replay(processes, server, devices, workers, batching)
    steps = [s for cid in sorted(processes) for s in processes[cid].steps]
    recut = {cid: p.recut for cid, p in processes.items()}
    return RoundResult(timing, steps, recut)


class Simulation(Coordinator):
    """The coordinator with every client simulated: in this process, or in
    Ray actors with ``sim.backend=ray`` (the same rounds).

    Args:
        cfg: the run's settings.
        costs: a cost model to use instead of probing (benchmarks share one).
        resume: continue the run in ``cfg.run_dir`` from its last checkpoint.
    """

    def __init__(
        self, cfg: RunConfig, costs: CostModel | None = None, resume: bool = False
    ) -> None:
        if cfg.sim.backend == "ray":  # the clients in Ray actors
            from splitft.federation.raybackend import ray_rounds

            rounds = ray_rounds()
        else:
            rounds = SimulatedRounds()
        super().__init__(cfg, rounds, costs=costs, resume=resume)

    def run(self, stop=None, table: bool = True) -> dict:
        """As :meth:`Coordinator.run`; with ``sim.backend=ray`` and
        ``sim.server_resources``, in a Ray actor of its own (this process
        draws the progress bar and passes a signal on)."""
        sim = self.cfg.sim
        if sim.backend != "ray" or not sim.server_resources:
            return super().run(stop, table)
        from splitft.federation.raybackend import run_on_server_actor

        summary, self.rounds = run_on_server_actor(
            self.cfg, self.costs, self.resume, stop
        )
        if table:
            report.print_table(self.rounds, f"SplitFT run {self.cfg.name!r}")
        return summary

    @property
    def clients(self) -> dict[int, SplitClient]:
        """The clients (``sim.backend=local``; Ray's are in their actors)."""
        return self.runner.clients
