"""What each client got: per-client numbers, a table and a length plot.

Used to check by eye that a partitioner produced the heterogeneity it promises,
e.g. that a small-alpha ``length_dirichlet`` split gives some clients mostly
short samples and others mostly long ones.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import matplotlib
import numpy as np
from rich.console import Console
from rich.table import Table

matplotlib.use("Agg")  # files only, no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from splitft.runs import write_atomic  # noqa: E402

_MAX_TASKS_SHOWN = 3


def partition_stats(partitions: Sequence[datasets.Dataset]) -> list[dict[str, Any]]:
    """Per-client sample count, token count, lengths and task mix.

    Args:
        partitions: one dataset per client, each with a ``length`` column (token
            count) and optionally a ``task`` column.

    Returns:
        One dict per client with ``client``, ``samples``, ``tokens`` (sum of
        ``length``), ``mean_len`` and ``median_len`` (None for an empty client) and
        ``task_mix`` (task -> count; empty without a ``task`` column).
    """
    stats = []
    for client, part in enumerate(partitions):
        lengths = _lengths(part)
        tasks = Counter(part["task"]) if "task" in part.column_names else Counter()
        stats.append(
            {
                "client": client,
                "samples": len(lengths),
                "tokens": int(lengths.sum()),
                "mean_len": float(lengths.mean()) if len(lengths) else None,
                "median_len": float(np.median(lengths)) if len(lengths) else None,
                "task_mix": dict(tasks.most_common()),
            }
        )
    return stats


def print_partition_table(
    stats: Sequence[dict[str, Any]], title: str, console: Console | None = None
) -> None:
    """Print ``partition_stats`` output as a rich table, one row per client."""
    table = Table(title=title)
    table.add_column("client", justify="right")
    for name in ("samples", "tokens", "mean len", "median len"):
        table.add_column(name, justify="right")
    table.add_column("task mix")
    for row in stats:
        table.add_row(
            str(row["client"]),
            str(row["samples"]),
            str(row["tokens"]),
            _num(row["mean_len"]),
            _num(row["median_len"]),
            task_mix_text(row["task_mix"]),
        )
    (console or Console()).print(table)


def task_mix_text(task_mix: dict[str, int]) -> str:
    """``{"a/add": 4, "b/date": 3, ...}`` -> ``"add 40%, date 30%, ..."``.

    Only the last path component of a task name is shown; past three tasks the
    rest are summed as ``+N more``, so the column stays short.
    """
    total = sum(task_mix.values())
    if not total:
        return "-"
    ranked = sorted(task_mix.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = ranked if len(ranked) <= _MAX_TASKS_SHOWN + 1 else ranked[:_MAX_TASKS_SHOWN]
    parts = [f"{name.rsplit('/', 1)[-1]} {count / total:.0%}" for name, count in shown]
    if len(shown) < len(ranked):
        parts.append(f"+{len(ranked) - len(shown)} more")
    return ", ".join(parts)


def plot_length_distributions(
    partitions: Sequence[datasets.Dataset], path: Path, title: str
) -> Path:
    """Save a PNG of every client's token-length histogram, one row per client.

    Rows share the x axis and the bins, and each draws the pooled distribution of
    all clients in grey behind the client's own, so a client skewed to short or
    long samples stands out at a glance. Each row is scaled to its own peak: the
    point is where a client's lengths lie, and one shared scale would let a tiny
    client with a single sample flatten every other row.

    Returns:
        ``path`` (its parent directory is created if needed).
    """
    path = Path(path)
    per_client = [_lengths(part) for part in partitions]
    pooled = np.concatenate(per_client) if per_client else np.zeros(0, np.int64)
    edges = _shared_bins(pooled)
    rows = max(len(per_client), 1)
    fig, axes = plt.subplots(
        rows, 1, figsize=(8, 1.6 + 0.45 * rows), sharex=True, squeeze=False
    )
    pooled_shape = _peak_scaled(pooled, edges)
    for client, ax in enumerate(axes[:, 0][: len(per_client)]):
        lengths = per_client[client]
        ax.stairs(pooled_shape, edges, fill=True, color="0.85", label="all clients")
        ax.stairs(_peak_scaled(lengths, edges), edges, fill=True, color="C0")
        if len(lengths):
            ax.axvline(np.median(lengths), color="C3", lw=1.5)
        ax.set_ylim(0, 1.1)
        ax.set_yticks([])
        ax.set_ylabel(f"{client}  n={len(lengths)}", rotation=0, ha="right")
        ax.yaxis.set_label_coords(-0.01, 0.2)
        for side in ("top", "right", "left"):
            ax.spines[side].set_visible(False)
    handles = [
        Patch(color="0.85", label="all clients"),
        Patch(color="C0", label="this client (each row scaled to its peak)"),
        Line2D([], [], color="C3", lw=1.5, label="client median"),
    ]
    fig.legend(
        handles=handles,
        loc="upper center",
        ncols=3,
        frameon=False,
        bbox_to_anchor=(0.5, 1 - 0.45 / fig.get_figheight()),
    )
    axes[-1, 0].set_xlabel("tokens per sample")
    fig.supylabel("client")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path


def _lengths(part: datasets.Dataset) -> np.ndarray:
    if "length" not in part.column_names:
        raise ValueError(
            f"partition has no 'length' column; its columns are {part.column_names}"
        )
    if len(part) == 0:
        return np.zeros(0, dtype=np.int64)
    return part.with_format("numpy", columns=["length"])[:]["length"].astype(np.int64)


def _shared_bins(lengths: np.ndarray, max_bins: int = 30) -> np.ndarray:
    """Integer-aligned bin edges covering all lengths, at most ``max_bins`` bins."""
    if not len(lengths):
        return np.array([0.0, 1.0])
    lo, hi = int(lengths.min()), int(lengths.max()) + 1
    width = max(1, -(-(hi - lo) // max_bins))
    return np.arange(lo, hi + width, width, dtype=float)


def _peak_scaled(lengths: np.ndarray, edges: np.ndarray) -> np.ndarray:
    counts, _ = np.histogram(lengths, edges)
    return counts / max(counts.max(), 1)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
