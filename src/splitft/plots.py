"""Pictures of a run, drawn from its ``metrics.jsonl``.

``splitft plot RUN_DIR`` writes them under ``RUN_DIR/plots/`` (each file
atomically), and so does the end of every run:

- ``loss.png``: eval loss (and each round's train loss) against simulated
  seconds and against wall seconds;
- ``cuts.png``: the cut layer of every client in every round (clients x
  rounds; blank where a client did not train);
- ``time.png``: where each client's round time went (its compute, the
  uplink, the queue at the server, the server's service, the downlink) in
  the slowest round and the last one;
- ``timeline.png`` (a simulated run): the same rounds on the clock, one lane
  per client and one for the server, a bar for every span;

and ``RUN_DIR/trace.json``: every span of every round in the Chrome
trace-event format (what PyTorch's profiler exports; open it in
https://ui.perfetto.dev or chrome://tracing), the rounds one after the
other on the simulated clock.
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
    if any(r.get("spans") for r in rounds):
        written.append(_save(plot_timeline(rounds), out / "timeline.png"))
        trace = json.dumps(chrome_trace(rounds))
        written.append(
            write_atomic(
                run_dir / "trace.json", lambda tmp: tmp.write_text(trace, "utf-8")
            )
        )
    return written


def chrome_trace(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The rounds' spans as Chrome trace events (microseconds of simulated
    time; process "clients" with a thread per client, process "server" with
    the spans it served, process "rounds" with one range per round)."""
    events: list[dict[str, Any]] = []
    for pid, name in ((0, "rounds"), (1, "clients"), (2, "server")):
        events.append(
            {"name": "process_name", "ph": "M", "pid": pid, "args": {"name": name}}
        )
    clients = sorted({s[3] for r in rounds for s in r.get("spans", [])})
    for cid in clients:
        events.append(
            {
                "name": "thread_name",
                "ph": "M",
                "pid": 1,
                "tid": cid,
                "args": {"name": f"client {cid}"},
            }
        )
    served = set()
    for r in rounds:
        if not r.get("spans"):
            continue
        start = r["sim_time_s"] - r["sim_round_s"]  # the round on the run's clock
        rnd = r["round"]
        events.append(_event(f"round {rnd}", start, 0.0, r["sim_round_s"], 0, 0, rnd))
        for a, b, kind, cid in r["spans"]:
            events.append(_event(kind, start, a, b, 1, cid, rnd))
            if kind == "served" and (rnd, a, b) not in served:
                served.add((rnd, a, b))  # a batch: once on the server
                events.append(_event("served", start, a, b, 2, 0, rnd, client=cid))
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def _event(name, start, a, b, pid, tid, rnd, **args) -> dict[str, Any]:
    """A complete ("X") trace event from ``a`` to ``b`` seconds after
    ``start``, in microseconds."""
    return {
        "name": name,
        "ph": "X",
        "ts": (start + a) * 1e6,
        "dur": (b - a) * 1e6,
        "pid": pid,
        "tid": tid,
        "args": {"round": rnd, **args},
    }


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


COLORS = {  # one color per part, in both pictures
    "compute": "tab:blue",
    "uplink": "tab:orange",
    "queued": "tab:green",
    "served": "tab:red",
    "downlink": "tab:purple",
}


def _shown(rounds: list[dict[str, Any]], key: str) -> list[tuple[str, dict]]:
    """The slowest round having ``key`` and the last one (once if the same)."""
    have = [r for r in rounds if r.get(key)]
    slowest = max(have, key=lambda r: r.get("sim_round_s", 0.0))
    if slowest is have[-1]:
        return [("slowest and last", slowest)]
    return [("slowest", slowest), ("last", have[-1])]


def plot_timeline(rounds: list[dict[str, Any]]):
    """The slowest and the last round on the clock: a lane per client (its
    spans) and one for the server (what it served, for whom)."""
    shown = _shown(rounds, "spans")
    fig, axes = plt.subplots(
        len(shown), 1, figsize=(10, 2.4 + 1.8 * len(shown)), squeeze=False
    )
    for ax, (which, r) in zip(axes[:, 0], shown, strict=True):
        clients = sorted({s[3] for s in r["spans"]})
        lanes = {cid: i for i, cid in enumerate(clients)}
        server = len(clients)
        for a, b, kind, cid in r["spans"]:
            ax.barh(lanes[cid], b - a, left=a, color=COLORS.get(kind, "grey"))
            if kind == "served":
                ax.barh(server, b - a, left=a, color=COLORS["served"], alpha=0.5)
        lanes = [f"client {c}" for c in clients] + ["server"]
        _round_axes(ax, r, which, lanes, "simulated seconds from the round's start")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLORS.values()]
    fig.legend(handles, list(COLORS), fontsize=8, ncol=len(COLORS), loc="upper center")
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return fig


def plot_time(rounds: list[dict[str, Any]]):
    """Each client's round time by part, in the slowest and the last round."""
    shown = _shown(rounds, "timing")
    fig, axes = plt.subplots(
        len(shown), 1, figsize=(8, 2.2 + 1.6 * len(shown)), squeeze=False
    )
    for ax, (which, r) in zip(axes[:, 0], shown, strict=True):
        clients = sorted(r["timing"], key=int)
        left = np.zeros(len(clients))
        for key, label in PARTS:
            width = np.array([r["timing"][c].get(key, 0.0) for c in clients])
            color = COLORS[key.removesuffix("_s")]
            ax.barh(range(len(clients)), width, left=left, label=label, color=color)
            left += width
        lanes = [f"client {c}" for c in clients]
        _round_axes(
            ax, r, which, lanes, "simulated seconds (each part's total over the round)"
        )
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, ncol=len(PARTS), loc="upper center")
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return fig


def _round_axes(ax, r: dict[str, Any], which: str, lanes: list[str], xlabel: str):
    """A round's panel: its lanes top down, its title and axis label."""
    ax.set_yticks(range(len(lanes)), lanes)
    ax.invert_yaxis()
    ax.set_title(
        f"round {r['round']} ({which}): {r.get('sim_round_s', 0.0):.1f} simulated s",
        fontsize=10,
    )
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
