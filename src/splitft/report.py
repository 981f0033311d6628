"""What a run writes and shows: metrics.jsonl, summary.json, the results table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


class MetricsLog:
    """Appends one JSON object per line; flushed so a crash loses nothing."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _fmt(record: dict[str, Any], key: str, spec: str = ".4f") -> str:
    value = record.get(key)
    return "-" if value is None else format(value, spec)


def results_table(rounds: list[dict[str, Any]], title: str) -> Table:
    """One row per round (round 0 = the base model before training)."""
    table = Table(title=title)
    for col in (
        "round",
        "train loss",
        "eval loss",
        "eval ppl",
        "token acc",
        "bytes up",
        "bytes down",
        "time s",
    ):
        table.add_column(col, justify="right")
    for r in rounds:
        table.add_row(
            str(r["round"]),
            _fmt(r, "train_loss"),
            _fmt(r, "eval_loss"),
            _fmt(r, "eval_ppl", ".2f"),
            _fmt(r, "eval_token_acc", ".3f"),
            human_bytes(r.get("bytes_up", 0)),
            human_bytes(r.get("bytes_down", 0)),
            _fmt(r, "elapsed_s", ".1f"),
        )
    return table


def print_table(rounds: list[dict[str, Any]], title: str) -> None:
    Console().print(results_table(rounds, title))


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    path.write_text(json.dumps(summary, indent=2) + "\n")
