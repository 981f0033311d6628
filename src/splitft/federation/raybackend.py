"""``sim.backend=ray``: the simulation's clients in Ray actors.

The coordinator, the server and the simulated clock stay in the run's
process; the clients' work runs in a pool of Ray actors, each a
:class:`~splitft.federation.hosted.ClientHost` that loads the run's model
and data once and builds each round's clients from their state and plan
(stateless between rounds, as deployed clients are). What crosses between
the processes is what crosses the simulated network: the encoded messages,
as bytes. The clock decides, as in the local simulation, when each result
is used, so a round on Ray equals the local round (``docs/scaling.md``).

Ray is imported only here, and only when a run asks for it
(``pip install 'splitft[ray]'``).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from typing import Any

from splitft import interrupts, runs
from splitft.config import ConfigError, RunConfig
from splitft.federation.hosted import ClientHost, HostedRounds, HostLost

log = logging.getLogger(__name__)

POLL_S = 0.25  # how often a wait looks for a signal (Ctrl-C, SIGTERM)
RESTART_WAIT_S = 300.0  # how long a round waits for a restarting actor
STOP_WAIT_S = 120.0  # how long a signalled run waits for its server actor to stop


class _Stop:
    """In a server actor: the signal the run's process got (0: none)."""

    signum = 0


def _poll(ray, ref, each=None) -> None:
    """Until ``ref`` is ready, calling ``each()`` after every poll; a signal
    to this process (or, in a server actor, to the run's) raises
    :class:`~splitft.interrupts.Interrupted` between polls."""
    while True:
        if _Stop.signum:
            raise interrupts.Interrupted(_Stop.signum)
        with interrupts.deferred():  # a signal is raised between polls
            done, _ = ray.wait([ref], timeout=POLL_S)
            if each is not None:
                each()
        if done:
            return


def _ray():
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "sim.backend='ray' needs Ray: pip install 'splitft[ray]' "
            "(or sim.backend=local)"
        ) from None
    return ray


def start_ray(sim) -> bool:
    """Join ``sim.ray_address``'s cluster, or start a local Ray (returns
    True: this run started it and stops it). A Ray already started in this
    process (a notebook's) is used as it is."""
    ray = _ray()
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING}
    if sim.ray_address:
        kwargs["address"] = sim.ray_address
    else:  # a fresh one, even if RAY_ADDRESS names another
        kwargs["address"] = "local"
    main = threading.current_thread() is threading.main_thread()
    kept = signal.getsignal(signal.SIGTERM) if main else None
    t0 = time.perf_counter()
    try:
        with interrupts.deferred():  # a signal inside ray.init: once it is up
            context = ray.init(**kwargs)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise ConfigError(
            f"sim.ray_address={sim.ray_address!r}: Ray did not start or connect: {e}"
        ) from None
    finally:
        if main:  # ray.init makes SIGTERM exit at once; the run stops cleanly
            signal.signal(signal.SIGTERM, kept)
    url = getattr(context, "dashboard_url", "")
    log.info(
        "%s in %.1f s; %s",
        sim.ray_address or "a local Ray",
        time.perf_counter() - t0,
        f"its dashboard: http://{url}"
        if url
        else "no dashboard (pip install 'ray[default]' for one)",
    )
    return True


def pool_size(
    resources: dict[str, float], cluster: dict[str, float], wanted: int
) -> int:
    """Actors that fit: per resource asked for, the cluster's total over the
    actor's share (Flower's rule), at most ``wanted``.

    Raises:
        ConfigError: not one actor fits.
    """
    fits = wanted
    for key, need in resources.items():
        if need <= 0:
            continue
        name = {"num_cpus": "CPU", "num_gpus": "GPU"}.get(key, key)
        fits = min(fits, math.floor(cluster.get(name, 0.0) / need + 1e-9))
    if fits < 1:
        raise ConfigError(
            f"sim.client_resources={resources} fits no actor in what the Ray "
            f"cluster has free ({cluster}): ask for less"
        )
    return fits


def actor_options(sim, res: dict[str, float]) -> dict[str, Any]:
    """Resources (``sim.client_resources``, ``sim.server_resources``) and
    ``sim.actor_restarts`` as Ray's actor options."""
    known = {"num_cpus", "num_gpus", "memory"}
    options: dict[str, Any] = {k: v for k, v in res.items() if k in known}
    custom = {k: v for k, v in res.items() if k not in known}
    if custom:
        options["resources"] = custom
    options.setdefault("num_cpus", 1.0)
    return {**options, "max_restarts": sim.actor_restarts, "max_task_retries": 0}


class RayExecutor:
    """Client hosts as Ray actors (the :class:`~splitft.federation.hosted.Executor`
    of ``sim.backend=ray``): calls are actor tasks, results object refs."""

    def __init__(self, cfg: RunConfig) -> None:
        ray = self.ray = _ray()
        sim = cfg.sim
        self.owns = start_ray(sim)
        self.actors: list[Any] = []
        try:
            per_round = cfg.federation.clients_per_round or cfg.federation.num_clients
            self.size = sim.client_actors or pool_size(  # what is free: a
                sim.client_resources, ray.available_resources(), per_round
            )  # server actor holds its share
            options = actor_options(sim, sim.client_resources)
            self._host = ray.remote(ClientHost).options(**options)
            self.cfg = cfg
            self.actors = [self._host.remote(cfg) for _ in range(self.size)]
            t0 = time.perf_counter()
            for i in range(self.size):  # their set-up errors, here
                self._started(i)
            log.info(
                "%d client actors (%s each) ready in %.1f s",
                self.size,
                sim.client_resources,
                time.perf_counter() - t0,
            )
        except BaseException:
            self.close()
            raise

    def _started(self, host: int) -> None:
        try:
            self.wait(self.actors[host].ping.remote())
        except HostLost as e:
            raise runs.RunError(f"client actor {host} did not start: {e}") from None

    def submit(self, host: int, method: str, *args: Any) -> Any:
        return getattr(self.actors[host], method).remote(*args)

    def wait(self, ref: Any) -> Any:
        """The call's result; Ctrl-C and SIGTERM stop the wait.

        Raises:
            HostLost: its actor died or is restarting.
        """
        ray = self.ray
        _poll(ray, ref)
        try:
            return ray.get(ref)
        except ray.exceptions.RayActorError as e:
            raise HostLost(f"{type(e).__name__}: {_first_line(e)}") from None
        except ray.exceptions.RayTaskError as e:
            raise e.as_instanceof_cause() from None

    def ensure(self) -> None:
        """Before a round: wait for restarting actors, replace dead ones."""
        deadline = time.monotonic() + RESTART_WAIT_S
        for i in range(self.size):
            while (state := self._ping(i)) != "up":
                if state == "dead":  # its restarts used up: a new one
                    log.warning("client actor %d is dead; starting another", i)
                    self.actors[i] = self._host.remote(self.cfg)
                elif time.monotonic() > deadline:
                    raise runs.RunError(
                        f"client actor {i} has not come back in {RESTART_WAIT_S:g} s"
                    )
                else:  # restarting
                    time.sleep(POLL_S)

    def _ping(self, host: int) -> str:
        """'up', 'restarting' or 'dead'."""
        ray = self.ray
        ref = self.actors[host].ping.remote()
        _poll(ray, ref)
        try:
            ray.get(ref)
        except ray.exceptions.ActorDiedError:
            return "dead"
        except ray.exceptions.RayActorError:
            return "restarting"
        return "up"

    def close(self) -> None:
        ray = self.ray
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - gone already
                pass
        self.actors = []
        if self.owns and ray.is_initialized():
            ray.shutdown()
            self.owns = False


class ServerHost:
    """The run's coordinator, and so its server, in a Ray actor of its own
    (``sim.server_resources``); its client actors are started from there.
    Threaded (two calls at once), so the run's process can ask how far it
    is and pass a signal on while ``run`` runs."""

    def run(self, cfg: RunConfig, costs, resume: bool, stop) -> tuple:
        """The run; ``("complete", summary, rounds)`` or, stopped by a
        signal, ``("interrupted", signum, rounds)`` (an exception of the
        run's own is raised)."""
        from splitft.federation.coordinator import Coordinator
        from splitft.federation.simulation import Simulation

        _Stop.signum = 0
        self.sim = sim = Simulation(cfg, costs, resume=resume)
        sim.progress_to = open(os.devnull, "w")  # noqa: SIM115 - the run's process draws it
        try:
            summary = Coordinator.run(sim, stop, table=False)
        except interrupts.Interrupted as e:
            return "interrupted", e.signum, sim.rounds
        finally:
            sim.progress_to.close()
        return "complete", summary, sim.rounds

    def progress(self) -> tuple[int, int]:
        """(steps done, steps in the run) so far."""
        bar = getattr(getattr(self, "sim", None), "_bar", None)
        return (0, 0) if bar is None else (bar.n, bar.total or 0)

    def interrupt(self, signum: int) -> None:
        """The run's process was signalled: stop at the next wait."""
        _Stop.signum = signum


def run_on_server_actor(
    cfg: RunConfig, costs, resume: bool, stop=None
) -> tuple[dict, list[dict]]:
    """Run the simulation with its coordinator in a :class:`ServerHost`
    (``sim.server_resources``); this process draws the progress bar and
    passes Ctrl-C or SIGTERM on. Returns (summary, round records).

    Raises:
        Interrupted: the run stopped on a signal (its last checkpoint kept).
    """
    from tqdm.auto import tqdm

    ray = _ray()
    owns = start_ray(cfg.sim)
    options = {**actor_options(cfg.sim, cfg.sim.server_resources), "max_restarts": 0}
    host = ray.remote(ServerHost).options(max_concurrency=2, **options).remote()
    bar = None

    def show(n: int, total: int) -> None:  # the actor's steps, as they go
        nonlocal bar
        if total and bar is None:
            bar = tqdm(total=total, initial=n, desc="split training", unit="step")
        elif bar is not None and n != bar.n:
            bar.update(n - bar.n)

    try:
        ref = host.run.remote(cfg, costs, resume, stop)
        try:
            _poll(ray, ref, lambda: show(*ray.get(host.progress.remote())))
        except interrupts.Interrupted as e:  # passed on to the actor
            host.interrupt.remote(e.signum)  # it stops at its next wait
            ray.wait([ref], timeout=STOP_WAIT_S)
            raise
        try:
            state, value, rounds = ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            raise (e.cause or e) from None
        if state == "interrupted":
            raise interrupts.Interrupted(value)
        return value, rounds
    finally:
        if bar is not None:
            bar.close()
        ray.kill(host)
        if owns and ray.is_initialized():
            ray.shutdown()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""


def ray_rounds() -> HostedRounds:
    """The simulation's rounds with the clients in Ray actors."""
    return HostedRounds(RayExecutor)
