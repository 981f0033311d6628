"""The round coordinator: one round loop for the simulation and the deployment.

A recipe in the torchtune sense: ``setup`` builds the server, the strategy
and the evaluator from the config, ``train`` owns the round loop (select the
clients and their cuts, run the round, aggregate, evaluate, log, checkpoint),
``finish`` writes the adapter and the summary. How a round is *run* is the
one thing that differs, and belongs to a :class:`RoundRunner` object: in-process
clients on the simulated clock (:class:`splitft.federation.simulation.SimulatedRounds`)
or remote clients over gRPC (:class:`splitft.federation.deployment.NetworkRounds`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from splitft import interrupts, lora, report, runs
from splitft.config import ConfigError, RunConfig, save_config
from splitft.data.federated import load_run_data
from splitft.data.format import pad_token_id
from splitft.eval import GlobalEvaluator
from splitft.federation.aggregate import aggregate
from splitft.federation.policies import PolicyContext, make_policy
from splitft.federation.strategy import RoundDecision, RoundResult, Strategy
from splitft.models.load import check_cuts, load_for_run
from splitft.models.parts import (
    WeightStore,
    load_tokenizer,
)
from splitft.sim.costs import CostModel
from splitft.sim.estimator import Estimator
from splitft.sim.predict import Workload, World
from splitft.sim.probe import probe
from splitft.sim.profiles import Device, devices_at, server_device
from splitft.split.server import SplitServer
from splitft.trackers import Trackers, chosen
from splitft.transport import Traffic

log = logging.getLogger(__name__)


class RoundFailed(runs.RunError):
    """A round cannot be taken into the run: too few clients uploaded it,
    even after its retries (deployment), or its aggregate is not finite."""


class RoundRunner(Protocol):
    """How the selected clients run a round: the part that differs between the
    simulation and the deployment."""

    def setup(self, coordinator: Coordinator) -> dict[int, list[tuple[int, int]]]:
        """Build what it needs; return each client's training rows' sizes as
        far as known, (tokens, labelled tokens) a row (the planner's expected
        batch sizes; others get the worst)."""
        ...

    def run_round(
        self, planned: RoundDecision, devices: dict[int, Device]
    ) -> RoundResult: ...

    def declared(self, devices: dict[int, Device]) -> dict[int, Device]:
        """The devices as the clients declared them (memory), where they did."""
        ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def ready(self) -> None:
        """Set-up is done: the first round may start (a server says so to
        health checks)."""
        ...

    def close(self, reason: str, resumes: bool = False) -> None:
        """Release what it holds; clients still waiting are told ``reason``
        (``resumes``: the run goes on from its last checkpoint when resumed)."""
        ...


class Coordinator:
    """Runs ``cfg.federation.rounds`` rounds of split federated fine-tuning.

    Args:
        cfg: the run's settings.
        rounds: how the clients run each round (simulated or networked).
        costs: a cost model to use instead of probing (benchmarks share one).
        resume: continue the run in ``cfg.run_dir`` from its last checkpoint.
    """

    def __init__(
        self,
        cfg: RunConfig,
        rounds: RoundRunner,
        costs: CostModel | None = None,
        resume: bool = False,
    ) -> None:
        self.cfg = cfg
        self.runner = rounds
        self.run_dir: Path = cfg.run_dir
        self.rounds: list[dict[str, Any]] = []
        self.costs = costs
        self.resume = resume
        self.start_round = 0  # the first round to run (after a resume: the next)
        self.lock = runs.RunLock(self.run_dir)
        self.log: report.MetricsLog | None = None
        self.trackers: Trackers | None = None  # TensorBoard, W&B, ... (log.to)
        # set once the strategy exists: a deployed server opens its port before
        # the cost probe, and a client's Join waits on it to check its memory
        self.strategy_ready = threading.Event()
        self.progress_to: Any = None  # where the progress bar goes (None: stderr)

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg, fed = self.cfg, self.cfg.federation
        tracked = chosen(cfg.log.to)  # a missing tracker: before anything loads
        torch.manual_seed(cfg.seed)
        loaded = load_for_run(cfg)
        device, self.model_dir = loaded.device, loaded.folder
        self.model_config = loaded.model_config
        # before the weights and data load
        checkpoint = runs.open_run_dir(self.run_dir, self.lock, self.resume)
        if checkpoint is not None or self.resume:  # the cost model it ran with
            self.costs = self.costs or CostModel.load(self.run_dir / "costs.json")
        L = self.model_config.num_hidden_layers
        # U-shaped: the client's tail blocks; the deepest cut leaves the server one
        self.tail = fed.client_tail
        self.k_max = fed.k_max or L - 1 - self.tail
        check_cuts(fed, self.k_max, L, self.tail)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.pad_id = pad_token_id(self.tokenizer)
        self.data = load_run_data(cfg, self.tokenizer)
        self.store = WeightStore(self.model_dir, device=device)
        # the server's frozen base, in its own precision (the same tensors
        # when both are float32)
        dtype = getattr(torch, cfg.model.server_dtype)
        self.server_store = (
            self.store
            if dtype == self.store.dtype
            else WeightStore(self.model_dir, dtype=dtype, device=device)
        )
        # the simulated clients' frozen base (client.base_dtype), shared by all
        base = cfg.client.base_dtype
        self.client_store = next(
            (st for st in (self.store, self.server_store) if st.base == base),
            None,
        ) or WeightStore.for_base(self.model_dir, base, device)
        # the fixed policy's cuts; any other policy starts every client at k_min
        fixed = fed.cut_layers if fed.policy == "fixed" else [fed.k_min]
        self.cut_layers = {
            cid: fixed[cid % len(fixed)] for cid in range(fed.num_clients)
        }
        self.per_round = fed.clients_per_round or fed.num_clients
        self.server = SplitServer(
            self.server_store,
            self.model_config,
            cfg.lora,
            cfg.train,
            self.cut_layers,
            total_steps=fed.rounds * fed.local_steps,
            local_steps=fed.local_steps,
            seed=cfg.seed,
            server_side=fed.server_side,
            max_length=cfg.data.max_length,
            upload_norm_bound=fed.upload_norm_bound,
            grad_compression=cfg.transport.grad_compression,
            tail_layers=self.tail,
            compression=cfg.transport.compression,
            batching=cfg.server.batching,
            max_samples=fed.max_samples_per_client or len(self.data.train),
        )
        sizes = self.runner.setup(self)
        self._setup_strategy(sizes)
        self.traffic = {cid: Traffic() for cid in range(fed.num_clients)}
        self.evaluator = GlobalEvaluator(
            self.store, self.model_config, cfg, self.tokenizer, self.data.held_out
        )
        adapter_bytes = sum(
            t.numel() * t.element_size() for t in self.server.global_state.values()
        )
        runs.check_writable(self.run_dir, (cfg.checkpoint.keep + 2) * adapter_bytes)
        self.sim_time = 0.0
        self._elapsed = 0.0  # wall seconds of earlier sessions of this run
        if checkpoint is None:
            save_config(cfg, self.run_dir / "config.yaml")
            self.costs.save(self.run_dir / "costs.json")
            self.log = report.MetricsLog(self.run_dir / "metrics.jsonl", truncate_to=0)
        else:
            self._restore(checkpoint)
        self.trackers = Trackers.open(cfg, tracked, self.start_round)
        runs.write_status(self.run_dir, "running", round=self.start_round)

    # ---------------------------------------------------------- checkpoints
    def checkpoint(self, rnd: int) -> Path:
        """Everything the next round depends on, after round ``rnd``."""
        state = {
            "version": 1,
            "round": rnd,
            "server": self.server.state_dict(),
            "clients": self.runner.state_dict(),
            "strategy": self.strategy.state_dict(),
            "sim_time": self.sim_time,
            "elapsed_s": time.perf_counter() - self._t_start,
            "traffic": {
                cid: {"up": dict(t.up), "down": dict(t.down)}
                for cid, t in self.traffic.items()
            },
            "rounds": self.rounds,
            "metrics_bytes": self.log.sync(),
            "torch_rng": torch.get_rng_state(),
        }
        with interrupts.deferred():  # a signal now: after the round is kept
            path = runs.save_checkpoint(
                self.run_dir,
                rnd,
                self.server.global_state,
                state,
                self.cfg.checkpoint.keep,
            )
            runs.write_status(self.run_dir, "running", round=rnd, checkpoint=str(path))
        return path

    def _restore(self, path: Path) -> None:
        adapter, state = runs.load_checkpoint(path)
        self.server.load_state_dict(state["server"], adapter)
        self.runner.load_state_dict(state["clients"])
        self.strategy.load_state_dict(state["strategy"])
        self.sim_time = state["sim_time"]
        self._elapsed = state["elapsed_s"]
        for cid, t in state["traffic"].items():
            for direction in ("up", "down"):
                for kind, n in t[direction].items():
                    self.traffic[cid].record(direction, kind, n)
        self.rounds = list(state["rounds"])
        self.start_round = state["round"]
        torch.set_rng_state(state["torch_rng"])
        self.log = report.MetricsLog(
            self.run_dir / "metrics.jsonl", truncate_to=state["metrics_bytes"]
        )

    def _setup_strategy(self, sizes: dict[int, list[tuple[int, int]]]) -> None:
        """The cost model, the planner's beliefs, the policy and the strategy."""
        cfg, fed, sim = self.cfg, self.cfg.federation, self.cfg.sim
        bs = cfg.train.batch_size
        if self.costs is None and sim.cost_model:
            self.costs = CostModel.load(sim.cost_model)
            base = cfg.client.base_dtype
            if self.costs.client_base != base:  # its client memory and time
                raise ConfigError(
                    f"sim.cost_model={sim.cost_model} was measured with clients "
                    f"of client.base_dtype={self.costs.client_base!r}, this run's "
                    f"is {base!r}: leave sim.cost_model empty to measure it"
                )
            server = cfg.model.server_dtype
            if self.costs.server_base != server:  # its server's block and head
                raise ConfigError(
                    f"sim.cost_model={sim.cost_model} was measured with a server "
                    f"of model.server_dtype={self.costs.server_base!r}, this "
                    f"run's is {server!r}: leave sim.cost_model empty to measure it"
                )
        if self.costs is None:
            known = [n for rows in sizes.values() for n, _ in rows]
            typical = int(np.mean(known)) if known else cfg.data.max_length
            self.costs = probe(
                self.server_store,  # the server's blocks and head as it runs them
                self.model_config,
                cfg.lora,
                bs,
                typical,
                compression=(cfg.transport.compression, cfg.transport.grad_compression),
                batching=cfg.server.batching,
                client_store=self.client_store,
            )
        # the clients' prices follow how this run's clients keep activations
        checkpointing = cfg.client.checkpointing == "blocks"
        self.costs = dataclasses.replace(self.costs, client_checkpointing=checkpointing)
        workload = Workload.of(
            sizes,
            fed.num_clients,
            fed.local_steps,
            cfg.train.grad_accum,
            bs,
            cfg.data.max_length,
            cfg.seed,
        )
        self.server_device = server_device(sim, cfg.server)
        devices = devices_at(sim, fed.num_clients, 0)
        world = World.of(self.costs, devices, self.server_device, workload, self.tail)
        estimator = Estimator(world, cfg.planner.ewma, cfg.planner.replan_miss)
        context = PolicyContext(
            num_layers=self.model_config.num_hidden_layers,
            k_min=fed.k_min,
            k_max=self.k_max,
            fixed=self.cut_layers,
            settings=cfg.planner,
            server_side=fed.server_side,
            estimator=estimator,
            rng=np.random.default_rng([cfg.seed, 1]),
        )
        policy = make_policy(fed.policy, context)
        self.strategy = Strategy(
            policy, estimator, fed.num_clients, self.per_round, cfg.seed
        )
        self.strategy_ready.set()

    # ---------------------------------------------------------------- train
    def evaluate_global(self, accuracy: bool) -> dict[str, Any]:
        """Evaluate the global adapter on the unsplit model (what is exported)."""
        return self.evaluator(self.server.global_state, accuracy)

    def train(
        self, stop: Callable[[dict[str, Any]], bool] | None = None
    ) -> list[dict[str, Any]]:
        """The round loop; ``stop(record)`` may end it early (benchmarks)."""
        fed, sim = self.cfg.federation, self.cfg.sim
        self._t_start = time.perf_counter() - self._elapsed
        if self.start_round == 0:
            base = {
                "type": "round",
                "round": 0,
                **self.evaluate_global(self.evaluator.accuracy_due(0)),
                "sim_time_s": 0.0,
                "elapsed_s": time.perf_counter() - self._t_start,
            }
            self.log.write(base)
            self.rounds.append(base)
        steps = self.per_round * fed.local_steps
        self._bar = tqdm(
            total=fed.rounds * steps,
            initial=self.start_round * steps,
            desc="split training",
            unit="step",
            file=self.progress_to,
        )
        for rnd in range(self.start_round, fed.rounds):
            devices = self.runner.declared(devices_at(sim, fed.num_clients, rnd))
            planned = self.strategy.configure_round(rnd, devices)
            result = self.run_round(planned, devices)
            record = self.finish_round(planned, result)
            with interrupts.deferred():  # the trackers get what a resume keeps
                self.checkpoint(rnd + 1)
                self.trackers.log_rounds(self.rounds)
            if stop is not None and stop(record):
                break
        self._bar.close()
        return self.rounds

    def run_round(self, planned: RoundDecision, devices) -> RoundResult:
        """The selected clients train through the server (the runner's part)."""
        self._bar.set_postfix(round=planned.round + 1)
        self._round_t0 = time.perf_counter()
        result = self.runner.run_round(planned, devices)
        self._bar.update(len(result.steps))
        return result

    def finish_round(
        self, planned: RoundDecision, result: RoundResult
    ) -> dict[str, Any]:
        """Aggregate, feed the strategy, evaluate when due, log the round."""
        cfg, rnd = self.cfg, planned.round + 1
        timing, steps = result.timing, result.steps
        t0 = time.perf_counter()
        counted = aggregate_round(self.server, cfg.federation.aggregation)
        aggregate_s = (time.perf_counter() - t0) / self.server_device.speed
        wall_s = time.perf_counter() - self._round_t0  # training + aggregation
        if cfg.sim.timing == "predicted":  # not in the cost model: negligible
            aggregate_s = 0.0
        self.sim_time += timing.makespan + aggregate_s
        for s in steps:
            self.log.write({"type": "step", **s})
        observed = self.strategy.observe_round(planned, result, dict(self.server.drift))
        for cid, t in timing.clients.items():
            for kind, n in t.bytes_up.items():
                self.traffic[cid].record("up", kind, n)
            for kind, n in t.bytes_down.items():
                self.traffic[cid].record("down", kind, n)
        worst = self.strategy.estimator.world.workload.worst_slots
        record = report.round_record(
            rnd,
            planned.cuts,
            counted,
            timing,
            steps,
            round_s=timing.makespan + aggregate_s,
            sim_time_s=self.sim_time,
            wall_s=wall_s,
            plan={
                "over_budget": planned.over_budget,
                "replan": planned.reason,
                **observed,
                "planner_s": planned.planner_s,
            },
            memory_mb={
                c: self.costs.client_memory(k, worst, worst, self.tail) / 1e6
                for c, k in planned.cuts.items()
            },
        )
        accuracy = self.evaluator.accuracy_due(rnd)
        last = rnd == cfg.federation.rounds
        if accuracy or rnd % cfg.eval.every == 0 or last:
            record.update(self.evaluate_global(accuracy))
        record["elapsed_s"] = time.perf_counter() - self._t_start
        self.log.write(record)
        self.rounds.append(record)
        return record

    # ---------------------------------------------------------------- finish
    def finish(self) -> dict[str, Any]:
        """Export the global adapter in PEFT format and write summary.json."""
        adapter_dir = self.run_dir / "adapter"
        with runs.atomic_folder(adapter_dir) as tmp:
            lora.export_peft(
                self.server.global_state,
                self.model_config,
                self.cfg.lora,
                tmp,
                str(self.model_dir),
            )
            runs.fault("export")
        summary = report.run_summary(
            self.cfg,
            self.model_dir,
            self.rounds,
            {cid: t.snapshot() for cid, t in self.traffic.items()},
            self.sim_time,
            self.data.info,
            adapter_dir,
        )
        extra = getattr(self.runner, "summary", None)
        if extra is not None:  # what only this kind of round knows
            summary.update(extra())
        self.log.close()
        self.trackers.close()
        t0 = time.perf_counter()
        if self.cfg.log.plots:
            self._plot()
        # what watching the run cost it (beyond metrics.jsonl), in wall seconds
        summary["logging_s"] = {
            "trackers": self.trackers.seconds,
            "plots": time.perf_counter() - t0,
        }
        report.write_summary(self.run_dir / "summary.json", summary)
        runs.write_status(self.run_dir, "complete")
        return summary

    def _plot(self) -> None:
        """The run's plots (``splitft plot``); a failure to draw them is a
        warning, not a failed run: the adapter and metrics are written."""
        from splitft.plots import plot_run  # matplotlib: only at the end

        try:
            plot_run(self.run_dir)
        except Exception as e:  # noqa: BLE001 - the run itself is complete
            log.warning("plots not written: %s", e)

    def run(
        self,
        stop: Callable[[dict[str, Any]], bool] | None = None,
        table: bool = True,
    ) -> dict[str, Any]:
        """setup, train, finish; an interrupt or error leaves the folder
        marked ``interrupted`` / ``failed`` with its last checkpoint intact,
        and the runner tells its clients why it stopped."""
        reason, resumes = "the run is over", False
        with interrupts.interruptible():  # a second signal, even in clean-up
            try:
                self.setup()
                self.runner.ready()
                self.train(stop)
                summary = self.finish()
            except BaseException as e:
                reason = _stopped_because(e)
                resumes = isinstance(e, interrupts.Interrupted)
                if self.lock.held:
                    state = (
                        "interrupted"
                        if isinstance(e, interrupts.Interrupted)
                        else "failed"
                    )
                    with contextlib.suppress(OSError):  # a full disk: keep the cause
                        runs.write_status(self.run_dir, state, error=str(e)[:500])
                raise
            finally:
                self.runner.close(reason, resumes)
                if self.log is not None:
                    self.log.close()
                if self.trackers is not None:
                    self.trackers.close()
                self.lock.release()
        if table:
            report.print_table(self.rounds, f"SplitFT run {self.cfg.name!r}")
        return summary


def _stopped_because(e: BaseException) -> str:
    """What the clients are told when the run stops on ``e``."""
    if isinstance(e, interrupts.Interrupted):
        return (
            f"the server was interrupted ({e}); it goes on from its last "
            "checkpoint when resumed"
        )
    return f"the server stopped: {type(e).__name__}: {e}"[:300]


def run_with_retries(
    attempt: Callable[[], tuple[RoundResult, list[int]]],
    planned: RoundDecision,
    server: SplitServer,
    min_clients: int,
    retries: int,
    short: str,
    advice: str,
) -> RoundResult:
    """``attempt()`` (the round's result and who uploaded) until at least
    ``min_clients`` of the selected clients uploaded, ``retries`` + 1 times
    at most; a short attempt is abandoned (the server forgets it). The
    error says what left clients out (``short``) and what to do (``advice``).

    Raises:
        RoundFailed: every attempt was short.
    """
    for tried in range(retries + 1):
        result, counted = attempt()
        if len(counted) >= min(min_clients, len(planned.cuts)):
            return result
        server.abandon_round()
        log.warning(
            "round %d: %d of %d clients uploaded %s (federation.min_clients=%d); %s",
            planned.round + 1,
            len(counted),
            len(planned.cuts),
            short,
            min_clients,
            "running it again" if tried < retries else "stopping",
        )
    raise RoundFailed(
        f"round {planned.round + 1}: fewer than federation.min_clients="
        f"{min_clients} clients uploaded {short} in {retries + 1} tries; {advice}"
    )


def aggregate_round(server: SplitServer, how: str = "mean") -> list[int]:
    """The round's aggregation: every holder's update folded into the global
    adapter, layer by layer (``docs/aggregation.md``); returns who counted.

    Raises:
        RoundFailed: the aggregate is not finite; it never replaces the
            global adapter, and the last checkpoint stays the one to resume.
    """
    updates = server.round_updates()
    runs.fault("aggregate")
    new = aggregate(server.global_state, updates, how) if updates else None
    if new is not None:
        bad = [key for key, t in new.items() if not torch.isfinite(t).all()]
        if bad:
            server.abandon_round()
            raise RoundFailed(
                f"the round's aggregate is not finite ({len(bad)} tensors, e.g. "
                f"{bad[0]}); the global adapter stays the last round's. Resume "
                "from the last checkpoint (splitft run --resume): a simulated "
                "round runs again as it ran, so change what made it diverge "
                "first (train.lr; federation.aggregation=median if a client "
                "is suspect)"
            )
    return server.end_round(new)
