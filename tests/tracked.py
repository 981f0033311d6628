"""Reading back what a run logged to its trackers, as their own tools would:
TensorBoard's event reader, W&B's transaction log, Trackio's SQLite store."""

import json
import os
import sqlite3
import struct
from pathlib import Path

from splitft import trackers


def tensorboard(run_dir: Path) -> dict[str, list]:
    """tag -> [(step, value, wall time)], as TensorBoard shows them (purged)."""
    from tensorboard.backend.event_processing.event_accumulator import (
        EventAccumulator,
    )

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {
        tag: [(e.step, e.value, e.wall_time) for e in acc.Scalars(tag)]
        for tag in acc.Tags()["scalars"]
    }


def _wandb_records(path: Path):
    """The records of a W&B transaction log (LevelDB's log format: 32 KiB
    blocks of records, each with a crc32, a length and a fragment type)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and n == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind == 1:  # full
            yield chunk
        elif kind == 2:  # first
            buf = chunk
        elif kind == 3:  # middle
            buf += chunk
        elif kind == 4:  # last
            yield buf + chunk


def wandb_history(run_dir: Path) -> list[dict]:
    """Every history row of the run's offline W&B sessions, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for log in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for raw in _wandb_records(log):
            record = pb.Record()
            record.ParseFromString(raw)
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {
                        it.key or "/".join(it.nested_key): json.loads(it.value_json)
                        for it in record.history.item
                    }
                )
    return rows


def trackio_rows(run_dir: Path, project: str = "splitft") -> list[tuple[int, dict]]:
    """(step, metrics) of the run's rows in Trackio's local store."""
    identity = json.loads((run_dir / trackers.IDENTITY).read_text())
    name = f"{run_dir.name}-{identity['id']}"
    db = Path(os.environ["TRACKIO_DIR"]) / f"{project}.db"
    with sqlite3.connect(db) as c:
        got = c.execute(
            "select step, metrics from metrics where run_name = ? order by id", (name,)
        ).fetchall()
    return [(step, json.loads(m)) for step, m in got]
