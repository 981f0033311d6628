"""A federation of split-learning clients simulated in one process.

The round coordinator (:mod:`splitft.federation.coordinator`) with
:class:`SimulatedRounds`: every client is a real :class:`SplitClient` in this
process, reaching the real server through the simulated network
(:mod:`splitft.sim.clocked`): real messages, encoded exactly as on a
wire, delivered when the event-driven clock says, so heterogeneous devices,
links and the server queue shape each round's simulated time.
"""

from __future__ import annotations

from splitft.config import ConfigError, RunConfig
from splitft.data.federated import client_rows
from splitft.federation.coordinator import Coordinator
from splitft.federation.strategy import RoundDecision, RoundResult
from splitft.sim.clock import simulate_round
from splitft.sim.clocked import ClockedClient, ClockedServer, replay
from splitft.sim.costs import CostModel
from splitft.sim.predict import expected_slots, row_size
from splitft.split.client import JoinFailed, SplitClient

__all__ = ["Simulation", "SimulatedRounds", "expected_slots"]


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
        sim = c.cfg.sim
        c.server.open_round(planned.round, planned.cuts)
        processes = {
            cid: ClockedClient(
                self.clients[cid], planned.round, devices[cid], sim.timing, c.costs
            )
            for cid in planned.cuts
        }
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


class Simulation(Coordinator):
    """The coordinator with every client simulated in this process.

    Args:
        cfg: the run's settings.
        costs: a cost model to use instead of probing (benchmarks share one).
        resume: continue the run in ``cfg.run_dir`` from its last checkpoint.
    """

    def __init__(
        self, cfg: RunConfig, costs: CostModel | None = None, resume: bool = False
    ) -> None:
        super().__init__(cfg, SimulatedRounds(), costs=costs, resume=resume)

    @property
    def clients(self) -> dict[int, SplitClient]:
        return self.runner.clients
