"""The data of one run: encoded train and held-out sets, split over clients."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

import datasets

from splitft.config import RunConfig, cache_dir
from splitft.data.format import build_datasets
from splitft.data.packing import pack
from splitft.data.partition import make_partitioner

TOKENS = ["input_ids", "labels"]  # the columns training and the loss need


def client_rows(cfg: RunConfig, partition: datasets.Dataset) -> list[dict]:
    """A client's training rows: its partition's tokens, packed if configured."""
    rows = partition.select_columns(TOKENS).to_list()
    return pack(rows, cfg.data.max_length) if cfg.data.packing else rows


@dataclass
class RunData:
    train: datasets.Dataset
    held_out: datasets.Dataset
    partitions: list[datasets.Dataset]  # one per client, from the partitioner
    info: dict[str, Any]  # what summary.json records to rebuild and check the data


def fingerprint(*sets: datasets.Dataset) -> str:
    """sha256 of the token ids and labels, in order: same data, same hash."""
    h = hashlib.sha256()
    for ds in sets:
        for row in ds.select_columns(["input_ids", "labels"]):
            h.update(json.dumps([row["input_ids"], row["labels"]]).encode())
    return h.hexdigest()


def load_run_data(cfg: RunConfig, tokenizer) -> RunData:
    """Build the data set the config names and partition it over the clients."""
    d = cfg.data
    train, held_out = build_datasets(
        d.tasks,
        tokenizer,
        cache_dir(),
        d.max_length,
        d.eval_size,
        cfg.seed,
        d.max_train_per_task or None,
        source=d.source,
        data_format=d.format,
        loss_on=d.loss_on,
    )
    p = cfg.partition
    partitioner = make_partitioner(
        p.method,
        cfg.federation.num_clients,
        p.alpha,
        p.num_bins,
        p.min_partition_size,
        cfg.seed,
    )
    partitioner.dataset = train
    partitions = [
        partitioner.load_partition(i) for i in range(partitioner.num_partitions)
    ]
    train_tasks, eval_tasks = Counter(train["task"]), Counter(held_out["task"])
    info = {
        "source": d.source,
        "train_examples": len(train),
        "eval_examples": len(held_out),
        "per_task": {
            t: {"train": train_tasks[t], "eval": eval_tasks[t]}
            for t in sorted(set(train_tasks) | set(eval_tasks))
        },
        "partition_sizes": [len(part) for part in partitions],
        "sha256": fingerprint(train, held_out),
    }
    return RunData(train, held_out, partitions, info)
