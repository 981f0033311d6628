"""Metric trackers: each round's numbers to TensorBoard, Weights & Biases or
Trackio, beside metrics.jsonl.

One small protocol (torchtune's ``MetricLoggerInterface``, the Trainer's
``report_to``): :meth:`Tracker.log` takes a round's scalars at its step and
:meth:`Tracker.close` ends the run's session. metrics.jsonl is always written
(resume and the reports read it); ``log.to`` adds trackers. The step is the
round, and every point carries the simulated time too: W&B and Trackio plot
against the logged ``sim_time_s``, TensorBoard stamps each event with the
run's start plus the simulated seconds, so its *Relative* axis is simulated
time (wall time is the scalar ``time/wall_s``).

The coordinator gives a round to the trackers once, after the checkpoint that
holds it (inside :func:`~splitft.interrupts.deferred`), so a resumed run
continues the same curves without repeating a step; TensorBoard also purges
any later step on resume, should a kill have come between the two.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import secrets
import time
from pathlib import Path
from typing import Any, Protocol

from splitft import runs
from splitft.config import ConfigError, RunConfig, to_dict

log = logging.getLogger(__name__)

IDENTITY = "trackers.json"  # the run's id in the trackers, kept for a resume


class Tracker(Protocol):
    """Where a run's scalars go besides metrics.jsonl."""

    def log(self, scalars: dict[str, float], step: int, sim_s: float) -> None:
        """Record ``scalars`` at round ``step``, ``sim_s`` simulated seconds in."""

    def close(self) -> None:
        """Flush and end this session of the run."""


def installed(name: str) -> bool:
    """Whether a tracker's package is there (each tracker's package, and the
    extra that installs it, bear its name)."""
    return importlib.util.find_spec(name) is not None


def chosen(to: list[str]) -> list[str]:
    """The trackers ``log.to`` names (``auto``: TensorBoard when installed).

    Raises:
        ConfigError: a tracker whose package is not installed, naming the
            extra that installs it.
    """
    names: list[str] = []
    for name in to:
        if name == "auto":
            names += ["tensorboard"] if installed("tensorboard") else []
        elif name != "jsonl":
            names.append(name)
    names = list(dict.fromkeys(names))  # each once, in the order named
    for name in names:
        if not installed(name):
            raise ConfigError(
                f"log.to={to!r} names {name!r}, whose package is not installed: "
                f"pip install 'splitft[{name}]' (or leave {name!r} out of log.to)"
            )
    return names


def scalars(record: dict[str, Any], cut_rank: int) -> dict[str, float]:
    """A round's line of metrics.jsonl as trackers' tags (what is present)."""
    out: dict[str, float] = {}

    def put(tag: str, key: str) -> None:
        if record.get(key) is not None:
            out[tag] = float(record[key])

    for tag, key in (
        ("train/loss", "train_loss"),
        ("train/token_acc", "train_token_acc"),
        ("eval/loss", "eval_loss"),
        ("eval/ppl", "eval_ppl"),
        ("eval/token_acc", "eval_token_acc"),
        ("eval/exact_match", "exact_match"),
        ("eval/mc_accuracy", "mc_accuracy"),
        ("comm/bytes_up", "bytes_up"),
        ("comm/bytes_down", "bytes_down"),
        ("time/sim_round_s", "sim_round_s"),
        ("time/sim_s", "sim_time_s"),
        ("time/wall_round_s", "wall_round_s"),
        ("time/wall_s", "elapsed_s"),
        ("server/busy_s", "server_busy_s"),
    ):
        put(tag, key)
    busy, span = record.get("server_busy_s"), record.get("sim_round_s")
    if busy is not None and span:
        out["server/busy_share"] = busy / span
    if "clients" in record:
        out["clients/trained"] = float(len(record["clients"]))
        out["clients/failed"] = float(len(record.get("failed", [])))
    for cid, k in record.get("cuts", {}).items():
        out[f"cut/client_{cid}"] = float(k)
        out[f"cut_rank/client_{cid}"] = float(cut_rank)
    for cid, t in record.get("timing", {}).items():
        out[f"round_s/client_{cid}"] = float(t["finish_s"])
    for cid, mb in record.get("memory_mb", {}).items():
        out[f"memory_mb/client_{cid}"] = float(mb)
    return out


class TensorBoard:
    """Event files under ``RUN_DIR/tensorboard`` (``tensorboard --logdir``)."""

    def __init__(self, folder: Path, start: float, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: points at this step or later from an earlier session
        # of the run (killed after logging, before its checkpoint) are hidden
        self.writer = SummaryWriter(str(folder), purge_step=purge_step)
        self.start = start

    def log(self, scalars: dict[str, float], step: int, sim_s: float) -> None:
        when = self.start + sim_s  # the Relative axis: simulated seconds
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step, walltime=when)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    """A W&B run under ``RUN_DIR/wandb`` (offline unless ``log.wandb_mode``
    says online: ``wandb sync RUN_DIR/wandb/offline-run-*`` uploads it)."""

    def __init__(self, run_cfg: RunConfig, run_id: str) -> None:
        import wandb

        settings = wandb.Settings(silent=True, console="off", x_disable_stats=True)
        self.run = wandb.init(
            project=run_cfg.log.project,
            name=run_cfg.name,
            id=run_id,
            resume="allow",
            dir=str(run_cfg.run_dir),
            mode=run_cfg.log.wandb_mode,
            config=to_dict(run_cfg),
            settings=settings,
        )
        self.run.define_metric("round")
        self.run.define_metric("sim_time_s")
        self.run.define_metric("*", step_metric="round")

    def log(self, scalars: dict[str, float], step: int, sim_s: float) -> None:
        self.run.log({**scalars, "round": step, "sim_time_s": sim_s}, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackio:
    """A Trackio run in its local store (``$TRACKIO_DIR``, by default under
    the Hugging Face cache; ``trackio show --project PROJECT`` opens it)."""

    def __init__(self, run_cfg: RunConfig, run_id: str) -> None:
        import trackio

        quiet = io.StringIO()  # its banner; one log line says where it went
        with contextlib.redirect_stdout(quiet):
            self.run = trackio.init(
                project=run_cfg.log.project,
                name=f"{run_cfg.name}-{run_id}",
                config=to_dict(run_cfg),
                resume="allow",
                embed=False,
                auto_log_cpu=False,
                auto_log_gpu=False,
            )
        log.info(
            "trackio: run %s in project %s (trackio show --project %s)",
            self.run.name,
            run_cfg.log.project,
            run_cfg.log.project,
        )

    def log(self, scalars: dict[str, float], step: int, sim_s: float) -> None:
        self.run.log({**scalars, "round": step, "sim_time_s": sim_s}, step=step)

    def close(self) -> None:
        import trackio

        # trackio.finish, not the run's own: it also forgets the current run,
        # which trackio would otherwise finish again (aloud) at exit
        with contextlib.redirect_stdout(io.StringIO()):
            trackio.finish()


class Trackers:
    """The run's trackers as one: each round once, in round order."""

    def __init__(self, trackers: list[Tracker], cut_rank: int) -> None:
        self.trackers = trackers
        self.cut_rank = cut_rank
        self.logged = -1  # the last round given to them
        self.seconds = 0.0  # wall time spent in the trackers (summary.json)

    @classmethod
    def open(cls, run_cfg: RunConfig, names: list[str], resume_round: int) -> Trackers:
        """Open ``names`` for the run in ``run_cfg.run_dir``; ``resume_round``
        is the round of the checkpoint this session starts from (0: none)."""
        folder = run_cfg.run_dir
        path = folder / IDENTITY
        if resume_round and path.is_file():
            identity = json.loads(path.read_text())
        else:  # a fresh run, or a resume before any checkpoint (both round 0)
            identity = {"id": secrets.token_hex(4), "start": time.time()}
            runs.write_json(path, identity)
        made = {
            "tensorboard": lambda: TensorBoard(
                folder / "tensorboard",
                identity["start"],
                resume_round + 1 if resume_round else None,
            ),
            "wandb": lambda: WandB(run_cfg, identity["id"]),
            "trackio": lambda: Trackio(run_cfg, identity["id"]),
        }
        t0 = time.perf_counter()
        trackers = cls([made[n]() for n in names], run_cfg.lora.cut_rank)
        trackers.logged = resume_round if resume_round else -1
        trackers.seconds = time.perf_counter() - t0
        return trackers

    def log_rounds(self, records: list[dict[str, Any]]) -> None:
        """Give the trackers every round record they have not had yet."""
        t0 = time.perf_counter()
        for record in records:
            rnd = record["round"]
            if rnd <= self.logged:
                continue
            values = scalars(record, self.cut_rank)
            for tracker in self.trackers:
                tracker.log(values, rnd, record.get("sim_time_s", 0.0))
            self.logged = rnd
        self.seconds += time.perf_counter() - t0

    def close(self) -> None:
        """End every tracker's session (once; a second call does nothing)."""
        closing, self.trackers = self.trackers, []
        t0 = time.perf_counter()
        for tracker in closing:
            try:
                tracker.close()
            except Exception as e:  # noqa: BLE001 - the run's outputs are written
                log.warning("closing a tracker failed: %s", e)
        self.seconds += time.perf_counter() - t0
