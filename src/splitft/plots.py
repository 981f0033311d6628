"""Pictures of a run, drawn from its ``metrics.jsonl``.

``splitft plot RUN_DIR`` writes them under ``RUN_DIR/plots/`` (each file
atomically), and so does the end of every run:

- ``loss.png``: eval loss (and each round's train loss) against simulated
  seconds and against wall seconds;
- ``cuts.png``: the cut layer of every client in every round (clients x
  rounds; blank where a client did not train);
- ``time.png``: where each client's round time went (its compute, the
  uplink, the queue at the server, the server's service, the downlink) in
  the slowest round and the last one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from splitft.config import ConfigError  # noqa: E402
from splitft.runs import write_atomic  # noqa: E402

# RoundTiming's parts of a client's round, in the order they happen
PARTS = (
    ("compute_s", "compute"),
    ("uplink_s", "uplink"),
    ("queued_s", "queued at server"),
    ("served_s", "served"),
    ("downlink_s", "downlink"),
)


def read_rounds(run_dir: Path) -> list[dict[str, Any]]:
    """The run's round records (round 0: the evaluation before training),
    one per round, in order.

    Raises:
        ConfigError: no metrics.jsonl, or no round in it yet.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no metrics.jsonl (not a run folder?)")
    rounds: dict[int, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line a crash cut short; resume truncates it
        if isinstance(record, dict) and record.get("type") == "round":
            rounds[record["round"]] = record  # a resumed run writes a round once
    if not rounds:
        raise ConfigError(f"{path}: no round recorded yet")
    return [rounds[r] for r in sorted(rounds)]


def plot_run(run_dir: Path) -> list[Path]:
    """Write the run's plots under ``run_dir/plots``; returns their paths."""
    run_dir = Path(run_dir)
    rounds = read_rounds(run_dir)
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    written = [
        _save(plot_loss(rounds, run_dir.name), out / "loss.png"),
        _save(plot_cuts(rounds), out / "cuts.png"),
    ]
    if any(r.get("timing") for r in rounds):
        written.append(_save(plot_time(rounds), out / "time.png"))
    return written


def _save(fig, path: Path) -> Path:
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def plot_loss(rounds: list[dict[str, Any]], title: str):
    """Eval and train loss against simulated and wall seconds."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, key, label in (
        (axes[0], "sim_time_s", "simulated seconds"),
        (axes[1], "elapsed_s", "wall seconds"),
    ):
        evals = [r for r in rounds if "eval_loss" in r and key in r]
        trains = [r for r in rounds if "train_loss" in r and key in r]
        if evals:
            ax.plot(
                [r[key] for r in evals],
                [r["eval_loss"] for r in evals],
                "o-",
                label="eval loss",
            )
        if trains:
            ax.plot(
                [r[key] for r in trains],
                [r["train_loss"] for r in trains],
                "s--",
                alpha=0.6,
                label="train loss (the round's steps)",
            )
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{title}: loss")
    fig.tight_layout()
    return fig


def plot_cuts(rounds: list[dict[str, Any]]):
    """Clients x rounds, each cell the client's cut layer in that round."""
    trained = [r for r in rounds if r.get("cuts")]
    clients = sorted({int(c) for r in trained for c in r["cuts"]})
    grid = np.full((len(clients), max(len(trained), 1)), np.nan)
    for j, r in enumerate(trained):
        for c, k in r["cuts"].items():
            grid[clients.index(int(c)), j] = k
    fig, ax = plt.subplots(
        figsize=(max(4.0, 0.6 * grid.shape[1] + 2), max(2.5, 0.4 * len(clients) + 1))
    )
    image = ax.imshow(grid, aspect="auto", cmap="viridis")
    middle = np.nanmean([np.nanmin(grid), np.nanmax(grid)]) if trained else 0.0
    for (i, j), k in np.ndenumerate(grid):
        if not np.isnan(k):  # dark text on the light (high) end of viridis
            color = "k" if k > middle else "w"
            ax.text(j, i, int(k), ha="center", va="center", color=color, fontsize=8)
    ax.set_xticks(range(len(trained)), [str(r["round"]) for r in trained])
    ax.set_yticks(range(len(clients)), [str(c) for c in clients])
    ax.set_xlabel("round")
    ax.set_ylabel("client")
    fig.colorbar(image, ax=ax, label="cut layer (blocks on the client)")
    ax.set_title("cut layer of every client")
    fig.tight_layout()
    return fig


def plot_time(rounds: list[dict[str, Any]]):
    """Each client's round time by part, in the slowest and the last round."""
    timed = [r for r in rounds if r.get("timing")]
    slowest = max(timed, key=lambda r: r.get("sim_round_s", 0.0))
    shown = [slowest] if slowest is timed[-1] else [slowest, timed[-1]]
    fig, axes = plt.subplots(
        len(shown), 1, figsize=(8, 2.2 + 1.6 * len(shown)), squeeze=False
    )
    for ax, r in zip(axes[:, 0], shown, strict=True):
        clients = sorted(r["timing"], key=int)
        left = np.zeros(len(clients))
        for key, label in PARTS:
            width = np.array([r["timing"][c].get(key, 0.0) for c in clients])
            ax.barh(range(len(clients)), width, left=left, label=label)
            left += width
        ax.set_yticks(range(len(clients)), [f"client {c}" for c in clients])
        ax.invert_yaxis()
        which = "slowest" if r is slowest else "last"
        ax.set_title(
            f"round {r['round']} ({which}): {r.get('sim_round_s', 0.0):.1f} "
            "simulated s",
            fontsize=10,
        )
        ax.set_xlabel("simulated seconds (each part's total over the round)")
        ax.grid(axis="x", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, ncol=len(PARTS), loc="upper center")
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return fig
