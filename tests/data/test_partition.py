"""Partitioners: the length-Dirichlet split, make_partitioner and the report."""

import json
from itertools import combinations

import datasets
import numpy as np
import pytest
from flwr_datasets import FederatedDataset
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from splitft.data.partition import LengthDirichletPartitioner, make_partitioner
from splitft.data.partition_report import (
    partition_stats,
    plot_length_distributions,
    print_partition_table,
    task_mix_text,
)

P, B = 5, 4  # clients and length bins in the fixed-size tests


def mixed_lengths(n: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Half short-task, half long-task lengths, with many ties (a small range)."""
    rng = np.random.default_rng(seed)
    short = rng.integers(8, 40, n // 2)
    long = rng.integers(60, 300, n - n // 2)
    tasks = ["arith/add"] * (n // 2) + ["date"] * (n - n // 2)
    return np.concatenate([short, long]), tasks


def distinct_lengths(n: int, seed: int = 0) -> np.ndarray:
    """Short and long lengths without ties, so bin_edges decide each sample's bin."""
    rng = np.random.default_rng(seed)
    short = rng.choice(np.arange(5, 3000), n // 2, replace=False)
    long = rng.choice(np.arange(3000, 8000), n - n // 2, replace=False)
    return np.concatenate([short, long])


def make_ds(lengths, tasks=None) -> datasets.Dataset:
    tasks = tasks if tasks is not None else ["t"] * len(lengths)
    return datasets.Dataset.from_dict({"length": list(lengths), "task": tasks})


def partition(ds: datasets.Dataset, **kwargs) -> LengthDirichletPartitioner:
    part = LengthDirichletPartitioner(**kwargs)
    part.dataset = ds
    part.partition_indices()
    return part


def client_bin_counts(part: LengthDirichletPartitioner, lengths) -> np.ndarray:
    """(clients, bins) sample counts; needs tie-free lengths (see distinct_lengths)."""
    edges = part.bin_edges
    num_bins = len(edges) - 1
    bin_of = np.clip(np.searchsorted(edges, lengths, side="right") - 1, 0, num_bins - 1)
    return np.array(
        [
            np.bincount(bin_of[idx], minlength=num_bins)
            for idx in part.partition_indices()
        ]
    )


def heterogeneity(alpha: float, seed: int = 0) -> tuple[float, float]:
    """Mean total-variation distance of the clients' bin histograms from uniform
    (the pooled histogram, as bins are equal-sized), and the spread (std) of the
    clients' mean lengths relative to the std of all lengths."""
    lengths = distinct_lengths(4000)
    part = partition(make_ds(lengths), num_partitions=P, alpha=alpha, seed=seed)
    counts = client_bin_counts(part, lengths)
    hist = counts / counts.sum(axis=1, keepdims=True)
    tv = 0.5 * np.abs(hist - 1 / B).sum(axis=1).mean()
    means = [lengths[idx].mean() for idx in part.partition_indices()]
    return float(tv), float(np.std(means) / lengths.std())


def check_partition(indices: list[list[int]], n: int) -> None:
    """Pairwise disjoint, no repeats, every index in [0, n)."""
    flat = [i for idx in indices for i in idx]
    assert len(flat) == len(set(flat))
    for a, b in combinations(indices, 2):
        assert not set(a) & set(b)
    assert all(0 <= i < n for i in flat)


# --- The length-Dirichlet partitioner ----------------------------------------


@pytest.mark.parametrize("alpha", [0.05, 1.0, 1e4])
def test_partitions_are_disjoint_and_cover_all_but_the_floors(alpha):
    lengths, tasks = mixed_lengths(1000)
    part = partition(make_ds(lengths, tasks), num_partitions=P, alpha=alpha, seed=3)
    indices = part.partition_indices()
    assert len(indices) == P
    check_partition(indices, len(lengths))
    # "Cover" here means: every sample is assigned except those the floors drop.
    # Each bin loses the fractional parts floor(p_ki * n_k) leaves, which sum to an
    # integer below num_partitions, so at most B * (P - 1) samples in all
    # (tighter than the n - P * B bound).
    assert sum(map(len, indices)) >= len(lengths) - B * (P - 1)


def test_rank_bins_are_equal_sized_with_monotone_edges():
    lengths, tasks = mixed_lengths(1001)
    part = partition(make_ds(lengths, tasks), num_partitions=3, alpha=1.0, num_bins=6)
    assert sum(part.bin_sizes) == 1001
    assert max(part.bin_sizes) - min(part.bin_sizes) <= 1
    edges = part.bin_edges
    assert len(edges) == 7
    assert np.all(np.diff(edges) >= 0)
    assert edges[0] == lengths.min() and edges[-1] == lengths.max()


def test_heavily_tied_lengths_still_fill_every_bin():
    # 90% of the samples share one length: value-based bins would leave most bins
    # empty; rank bins split the tie evenly.
    lengths = [7] * 180 + list(range(100, 120))
    part = partition(make_ds(lengths), num_partitions=4, alpha=1.0, num_bins=4)
    assert part.bin_sizes == [50, 50, 50, 50]
    assert list(part.bin_edges) == [7, 7, 7, 7, 119]
    check_partition(part.partition_indices(), 200)


def test_fewer_samples_than_bins_leaves_bins_empty_but_works():
    part = partition(make_ds([5, 9, 3]), num_partitions=1, alpha=1.0, num_bins=6)
    assert sorted(part.bin_sizes) == [0, 0, 0, 1, 1, 1]
    assert np.all(np.diff(part.bin_edges) >= 0)
    # A single client gets p = 1 for every bin, so nothing is lost to floors.
    assert sorted(part.partition_indices()[0]) == [0, 1, 2]


def test_same_seed_same_partitions_different_seed_different():
    lengths, tasks = mixed_lengths(600)
    ds = make_ds(lengths, tasks)
    run = [partition(ds, num_partitions=P, alpha=0.5, seed=s) for s in (1, 1, 2)]
    assert run[0].partition_indices() == run[1].partition_indices()
    assert run[0].partition_indices() != run[2].partition_indices()


def test_large_alpha_gives_every_client_an_even_share_of_every_bin():
    lengths = distinct_lengths(4000)
    part = partition(make_ds(lengths), num_partitions=P, alpha=1e4, seed=0)
    counts = client_bin_counts(part, lengths)
    # The edges reproduce the bins: each bin is full up to its floor loss.
    assert np.all(counts.sum(axis=0) <= 1000)
    assert np.all(counts.sum(axis=0) >= 1000 - (P - 1))
    share = counts / np.array(part.bin_sizes)  # client i's share of bin k
    assert np.abs(share - 1 / P).max() < 0.05


def test_small_alpha_gives_clients_clearly_different_length_mixes():
    tv_small, spread_small = heterogeneity(0.05)
    tv_large, spread_large = heterogeneity(1e4)
    # Measured (seed 0): tv 0.68 vs 0.003, mean-length spread 0.99 vs 0.009.
    assert tv_small > 0.3 and tv_small > 50 * tv_large
    assert spread_small > 0.2 and spread_small > 10 * spread_large


def test_impossible_min_partition_size_names_it():
    part = LengthDirichletPartitioner(5, alpha=1.0, min_partition_size=5)
    part.dataset = make_ds(range(10))
    with pytest.raises(ValueError, match="min_partition_size=5") as err:
        part.load_partition(0)
    for detail in ("alpha=1.0", "num_partitions=5", "dataset size 10"):
        assert detail in str(err.value)


def test_min_partition_size_that_draws_keep_missing_gives_up_after_max_tries():
    # Feasible in principle (40 >= 4 * 8) but alpha=0.01 almost never spreads it.
    part = LengthDirichletPartitioner(
        4, alpha=0.01, num_bins=1, min_partition_size=8, max_tries=5, seed=0
    )
    part.dataset = make_ds(range(40))
    with pytest.raises(ValueError, match="max_tries=5.*min_partition_size=8"):
        part.partition_indices()


def test_min_partition_size_is_respected_when_met():
    lengths, tasks = mixed_lengths(400)
    part = partition(
        make_ds(lengths, tasks),
        num_partitions=4,
        alpha=0.5,
        min_partition_size=40,
        seed=0,
    )
    assert min(map(len, part.partition_indices())) >= 40


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_partitions": 0}, "num_partitions"),
        ({"num_partitions": 2.5}, "num_partitions"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": -1.0}, "alpha"),
        ({"alpha": float("inf")}, "alpha"),
        ({"alpha": "1"}, "alpha"),
        ({"num_bins": 0}, "num_bins"),
        ({"min_partition_size": 0}, "min_partition_size"),
        ({"max_tries": 0}, "max_tries"),
        ({"length_column": ""}, "length_column"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    args = {"num_partitions": 3, "alpha": 1.0, **kwargs}
    with pytest.raises(ValueError, match=name):
        LengthDirichletPartitioner(**args)


@pytest.mark.parametrize("bad_id", [-1, 3, 1.0, True])
def test_bad_partition_id_names_the_range(bad_id):
    part = LengthDirichletPartitioner(3, alpha=1.0)
    part.dataset = make_ds(range(30))
    with pytest.raises(ValueError, match=r"partition_id.*\[0, 2\]"):
        part.load_partition(bad_id)


def test_missing_length_column_lists_the_columns():
    part = LengthDirichletPartitioner(2, alpha=1.0, length_column="n_tokens")
    part.dataset = make_ds(range(10))
    with pytest.raises(ValueError, match="'n_tokens'.*'length', 'task'"):
        part.load_partition(0)


def test_non_integer_length_column_is_rejected():
    part = LengthDirichletPartitioner(2, alpha=1.0)
    part.dataset = datasets.Dataset.from_dict({"length": [1.5, 2.0, 3.0, 4.0]})
    with pytest.raises(ValueError, match="integer"):
        part.load_partition(0)


def test_bin_edges_before_partitioning_is_an_attribute_error():
    with pytest.raises(AttributeError, match="partition_indices"):
        _ = LengthDirichletPartitioner(2, alpha=1.0).bin_edges


# --- Inside Flower's machinery ------------------------------------------------


def test_load_partition_after_setting_dataset_returns_the_rows():
    lengths, tasks = mixed_lengths(200)
    ds = make_ds(lengths, tasks)
    part = LengthDirichletPartitioner(4, alpha=1.0, seed=0)
    assert not part.is_dataset_assigned()
    part.dataset = ds
    assert part.num_partitions == 4
    for pid, idx in enumerate(part.partition_indices()):
        got = part.load_partition(pid)
        assert got["length"] == [int(lengths[i]) for i in idx]
    with pytest.raises(ValueError, match="only once"):
        part.dataset = ds


def test_works_through_federated_dataset_on_a_local_file(tmp_path, monkeypatch):
    # Offline: a local JSON file, a temporary cache, and no telemetry thread.
    monkeypatch.setattr("flwr_datasets.federated_dataset.event", lambda *a, **k: None)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    lengths, tasks = mixed_lengths(120)
    path = tmp_path / "train.jsonl"
    path.write_text(
        "\n".join(
            json.dumps({"length": int(n), "task": t})
            for n, t in zip(lengths, tasks, strict=True)
        )
    )
    part = LengthDirichletPartitioner(3, alpha=1.0, seed=0)
    fds = FederatedDataset(
        dataset="json",
        data_files={"train": str(path)},
        partitioners={"train": part},
        cache_dir=str(tmp_path / "cache"),
    )
    sizes = [len(fds.load_partition(i)) for i in range(3)]
    assert sizes == [len(idx) for idx in part.partition_indices()]
    assert sum(sizes) >= 120 - 4 * (3 - 1)  # default num_bins=4
    # FederatedDataset shuffled the rows first; the lengths are the same multiset.
    got = sorted(n for i in range(3) for n in fds.load_partition(i)["length"])
    kept = sorted(
        n for idx in part.partition_indices() for n in part.dataset[idx]["length"]
    )
    assert got == kept


# --- Properties over many shapes -------------------------------------------------


@settings(deadline=None, max_examples=60)
@given(
    n=st.integers(20, 400),
    num_partitions=st.integers(1, 8),
    num_bins=st.integers(1, 6),
    alpha=st.floats(0.05, 100),
    min_size=st.integers(1, 10),
    seed=st.integers(0, 2**31),
)
def test_partition_properties(n, num_partitions, num_bins, alpha, min_size, seed):
    lengths, tasks = mixed_lengths(n, seed=seed % 97)
    ds = make_ds(lengths, tasks)
    args = {
        "num_partitions": num_partitions,
        "alpha": alpha,
        "num_bins": num_bins,
        "min_partition_size": min_size,
        "max_tries": 20,
        "seed": seed,
    }
    try:
        part = partition(ds, **args)
    except ValueError as err:  # the documented failure, and only that one
        assert f"min_partition_size={min_size}" in str(err)
        with pytest.raises(ValueError, match="min_partition_size"):
            partition(ds, **args)  # deterministic: fails again
        return
    indices = part.partition_indices()
    assert len(indices) == num_partitions
    check_partition(indices, n)
    assert min(map(len, indices)) >= min_size
    assert sum(map(len, indices)) >= n - num_bins * (num_partitions - 1)
    assert sum(part.bin_sizes) == n
    assert partition(ds, **args).partition_indices() == indices


# --- make_partitioner -------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "kind"),
    [
        ("iid", IidPartitioner),
        ("length_dirichlet", LengthDirichletPartitioner),
        ("task_dirichlet", DirichletPartitioner),
    ],
)
def test_make_partitioner_builds_working_partitioners(method, kind):
    lengths, _ = mixed_lengths(300)
    tasks = [f"suite/task_{i % 3}" for i in range(300)]
    ds = make_ds(lengths, tasks)
    part = make_partitioner(method, 4, 1.0, 4, 5, 0)
    assert isinstance(part, kind)
    part.dataset = ds
    parts = [part.load_partition(i) for i in range(part.num_partitions)]
    assert len(parts) == 4
    assert all(len(p) >= 5 for p in parts)
    assert set(parts[0].column_names) == {"length", "task"}
    # Same seed, same split: rebuild and compare the first partition's rows.
    again = make_partitioner(method, 4, 1.0, 4, 5, 0)
    again.dataset = ds
    assert again.load_partition(0)["length"] == parts[0]["length"]


def test_iid_shuffles_a_task_grouped_dataset():
    # Our train set is grouped by task; contiguous shards alone would give each
    # client one task.
    tasks = [f"task_{i // 100}" for i in range(400)]
    part = make_partitioner("iid", 4, 1.0, 4, 1, 0)
    part.dataset = make_ds(range(400), tasks)
    for i in range(4):
        assert len(set(part.load_partition(i)["task"])) == 4


def test_unknown_method_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="iid, length_dirichlet, task_dirichlet"):
        make_partitioner("by_size", 4, 1.0, 4, 1, 0)


# --- The report --------------------------------------------------------------------


def test_partition_stats_on_a_hand_made_example():
    parts = [
        datasets.Dataset.from_dict(
            {"length": [10, 20, 60], "task": ["bb/add", "bb/add", "date"]}
        ),
        datasets.Dataset.from_dict({"length": [5], "task": ["date"]}),
    ]
    assert partition_stats(parts) == [
        {
            "client": 0,
            "samples": 3,
            "tokens": 90,
            "mean_len": 30.0,
            "median_len": 20.0,
            "task_mix": {"bb/add": 2, "date": 1},
        },
        {
            "client": 1,
            "samples": 1,
            "tokens": 5,
            "mean_len": 5.0,
            "median_len": 5.0,
            "task_mix": {"date": 1},
        },
    ]
    no_task = partition_stats([datasets.Dataset.from_dict({"length": [4, 6]})])
    assert no_task[0]["task_mix"] == {} and no_task[0]["median_len"] == 5.0


def test_task_mix_text_is_short():
    assert (
        task_mix_text({"a/add": 4, "b/date": 3, "c": 3}) == "add 40%, date 30%, c 30%"
    )
    many = {f"t{i}": 10 - i for i in range(6)}
    assert task_mix_text(many).endswith("+3 more")
    assert task_mix_text({}) == "-"


def test_print_partition_table_shows_every_client():
    stats = partition_stats(
        [
            datasets.Dataset.from_dict({"length": [10, 30], "task": ["bb/add"] * 2}),
            datasets.Dataset.from_dict({"length": [], "task": []}),
        ]
    )
    console = Console(record=True, width=120)
    print_partition_table(stats, "my split", console=console)
    text = console.export_text()
    assert "my split" in text and "add 100%" in text and "20.0" in text


def test_plot_length_distributions_writes_a_png(tmp_path):
    lengths, tasks = mixed_lengths(300)
    part = LengthDirichletPartitioner(6, alpha=0.3, seed=0)
    part.dataset = make_ds(lengths, tasks)
    parts = [part.load_partition(i) for i in range(6)]
    out = plot_length_distributions(parts, tmp_path / "plots" / "len.png", "alpha 0.3")
    assert out == tmp_path / "plots" / "len.png"
    assert out.read_bytes().startswith(b"\x89PNG") and out.stat().st_size > 1000
