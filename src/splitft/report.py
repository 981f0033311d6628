"""What a run writes and shows: metrics.jsonl, summary.json, the results table."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from splitft.config import RunConfig, to_dict


class MetricsLog:
    """Appends one JSON object per line, each in one write, flushed.

    An append-only log: a crash can cut only its last line short, and a
    resumed run first truncates it to the size its checkpoint recorded
    (:meth:`sync`), so the records after the checkpoint are written once.
    """

    def __init__(self, path: Path, truncate_to: int | None = None) -> None:
        self.path = path
        if truncate_to is not None and path.exists():
            os.truncate(path, truncate_to)
        self._f = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def sync(self) -> int:
        """Flush to disk; returns the log's size (what a checkpoint records)."""
        self._f.flush()
        os.fsync(self._f.fileno())
        return self._f.tell()

    def close(self) -> None:
        self._f.close()


def round_record(
    rnd: int,
    cuts: dict[int, int],
    counted: list[int],
    timing,
    steps: list[dict[str, Any]],
    *,
    round_s: float,
    sim_time_s: float,
    wall_s: float,
    plan: dict[str, Any],
    memory_mb: dict[int, float],
) -> dict[str, Any]:
    """One round's line of metrics.jsonl: who trained at which cut, the train
    loss and accuracy over its tokens, bytes by kind, times, the planner's
    view (``plan``: over budget, replan reason, prediction error, planner
    time) and each client's modelled memory; ``timing`` is the round's
    :class:`~splitft.sim.clock.RoundTiming`."""
    up: dict[str, int] = {}
    down: dict[str, int] = {}
    for t in timing.clients.values():
        for kind, n in t.bytes_up.items():
            up[kind] = up.get(kind, 0) + n
        for kind, n in t.bytes_down.items():
            down[kind] = down.get(kind, 0) + n
    tokens = sum(s["tokens"] for s in steps)

    def per_token(key: str) -> float | None:
        return sum(s[key] * s["tokens"] for s in steps) / tokens if tokens else None

    over, replan = plan.get("over_budget"), plan.get("replan")
    return {
        "type": "round",
        "round": rnd,
        "clients": sorted(cuts),
        "cuts": {str(c): k for c, k in sorted(cuts.items())},
        "counted": counted,
        "failed": sorted(c for c, t in timing.clients.items() if t.failed),
        "over_budget": over,
        "replan": replan,
        "train_loss": per_token("loss"),
        "train_token_acc": per_token("token_acc"),
        "train_tokens": tokens,
        "bytes_up": sum(up.values()),
        "bytes_down": sum(down.values()),
        **{f"up_{k}": v for k, v in sorted(up.items())},
        **{f"down_{k}": v for k, v in sorted(down.items())},
        "sim_round_s": round_s,
        "sim_time_s": sim_time_s,
        "wall_round_s": wall_s,
        "server_busy_s": timing.server_busy,
        **{k: v for k, v in plan.items() if k not in ("over_budget", "replan")},
        "memory_mb": {str(c): mb for c, mb in sorted(memory_mb.items())},
        "timing": timing.record(),
        # the clock's spans (start s, end s, kind, client) from the round's
        # start: the timeline plot and trace.json (a simulated round only)
        **({"spans": _spans(timing.spans)} if timing.spans else {}),
    }


def _spans(spans) -> list[list]:
    """Spans as metrics.jsonl keeps them: times to 0.1 ms."""
    return [[round(a, 4), round(b, 4), kind, cid] for a, b, kind, cid in spans]


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _fmt(record: dict[str, Any], key: str, spec: str = ".4f") -> str:
    value = record.get(key)
    return "-" if value is None else format(value, spec)


def cuts_cell(record: dict[str, Any], clients: list[str]) -> str:
    """Each client's cut this round, in client order ('.' = not selected)."""
    cuts = record.get("cuts") or {}
    return " ".join(str(cuts.get(c, ".")) for c in clients)


def results_table(rounds: list[dict[str, Any]], title: str) -> Table:
    """One row per round (round 0 = the base model before training)."""
    table = Table(
        title=title,
        caption="cuts: each client's cut layer, client 0 first ('.' = not this "
        "round); sim time: simulated seconds; wall s: this machine's",
    )
    clients = sorted(
        {c for r in rounds for c in (r.get("cuts") or {})}, key=lambda c: int(c)
    )
    for col in (
        "round",
        "cuts",
        "train loss",
        "eval loss",
        "token acc",
        "exact match",
        "MC acc",
        "bytes up",
        "bytes down",
        "sim time s",
        "wall s",
    ):
        table.add_column(col, justify="right")
    for r in rounds:
        table.add_row(
            str(r["round"]),
            cuts_cell(r, clients) if r.get("cuts") else "-",
            _fmt(r, "train_loss"),
            _fmt(r, "eval_loss"),
            _fmt(r, "eval_token_acc", ".3f"),
            _fmt(r, "exact_match", ".3f"),
            _fmt(r, "mc_accuracy", ".3f"),
            human_bytes(r.get("bytes_up", 0)),
            human_bytes(r.get("bytes_down", 0)),
            _fmt(r, "sim_time_s", ".1f"),
            _fmt(r, "elapsed_s", ".1f"),
        )
    return table


def print_table(rounds: list[dict[str, Any]], title: str) -> None:
    console = Console()
    if console.width < 120:  # not a terminal (a log, CI): do not squeeze columns
        console = Console(width=120)
    console.print(results_table(rounds, title))
    scored = [r for r in rounds if "task_accuracy" in r]
    if len(scored) >= 2:
        console.print(accuracy_table(scored[0], scored[-1], "task accuracy"))


def run_summary(
    cfg: RunConfig,
    model_dir: Path,
    rounds: list[dict[str, Any]],
    traffic: Mapping[int, dict[str, int]],
    sim_time: float,
    data_info: dict[str, Any],
    adapter_dir: Path,
) -> dict[str, Any]:
    """What ``summary.json`` says of a finished run: its settings, each
    round's record, the cuts, the bytes each client moved (``traffic``: per
    client, per kind) and in all, and how far the planner's predictions were
    off on average."""
    totals: dict[str, int] = {}
    for snapshot in traffic.values():
        for k, v in snapshot.items():
            totals[k] = totals.get(k, 0) + v
    trained = [r for r in rounds if r["round"] > 0]
    errors = [r["prediction_error"] for r in trained]
    return {
        "run": cfg.name,
        "model": str(model_dir),
        "policy": cfg.federation.policy,
        "server_side": cfg.federation.server_side,
        "cut_layers": {str(r["round"]): r["cuts"] for r in trained},
        "sim_time_s": sim_time,
        "prediction_error_mean": sum(errors) / len(errors) if errors else None,
        "data": data_info,
        "rounds": rounds,
        "bytes": totals,
        "bytes_per_client": {str(c): s for c, s in traffic.items()},
        "adapter": str(adapter_dir),
        "config": to_dict(cfg),
    }


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    from splitft.runs import write_json

    write_json(path, summary)


def accuracy_table(first: dict[str, Any], last: dict[str, Any], title: str) -> Table:
    """Per task: the base model (round 0) and the fine-tuned model side by side."""
    table = Table(title=title)
    for col in (
        "task",
        "n",
        "exact match base",
        "exact match tuned",
        "MC base",
        "MC tuned",
    ):
        table.add_column(col, justify="right")
    a, b = first.get("task_accuracy", {}), last.get("task_accuracy", {})
    for task in sorted(set(a) | set(b)):
        x, y = a.get(task, {}), b.get(task, {})
        table.add_row(
            task,
            str(y.get("n", x.get("n", "-"))),
            _fmt(x, "exact_match", ".3f"),
            _fmt(y, "exact_match", ".3f"),
            _fmt(x, "mc_accuracy", ".3f"),
            _fmt(y, "mc_accuracy", ".3f"),
        )
    return table
