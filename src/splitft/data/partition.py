"""Partitioners that spread the training set over clients.

SplitFT's own is :class:`LengthDirichletPartitioner`: clients differ in *how long*
their samples are, which is what drives a split-learning client's compute and
traffic. :func:`make_partitioner` builds it or one of Flower's by name.
"""

from __future__ import annotations

import logging
import numbers

import datasets
import numpy as np
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    Partitioner,
)

from splitft.config import PARTITION_METHODS

log = logging.getLogger(__name__)


class LengthDirichletPartitioner(Partitioner):
    """Dirichlet partitioner over token-length bins (SplitFT's non-IID split).

    The samples are cut into ``num_bins`` quantile bins of their token length. For
    each bin k, proportions ``p_k ~ Dir(alpha * 1)`` over the clients are drawn and
    client i gets ``floor(p_ki * n_k)`` of the bin's samples, chosen at random
    without replacement. Small ``alpha`` gives clients very different length mixes
    (some mostly short, some mostly long); large ``alpha`` gives each client about
    ``1 / num_partitions`` of every bin.

    Ties: bins are made by *rank*, not by comparing lengths with edges. Samples are
    sorted by length with ties broken by a seeded random permutation, and rank r
    goes to bin ``floor(r * num_bins / n)``. So the bins have equal sizes (within
    one) and none is empty when ``n >= num_bins``, even if most samples share one
    length; tied samples at a bin edge are split at random between the two bins
    rather than by dataset order, which would correlate bins with the task order.

    Floor loss: the floors leave at most ``num_partitions - 1`` samples of each bin
    unassigned, so at least ``n - num_bins * (num_partitions - 1)`` samples are used.

    Join order: each client's indices are shuffled (seeded), so a client reading
    its partition in order does not see bins or tasks in blocks.

    Partitioning is lazy and done once, on the first ``load_partition`` (or
    ``partition_indices``) call; the ``dataset`` is set by the user or by
    ``flwr_datasets.FederatedDataset``.

    Args:
        num_partitions: number of clients, >= 1.
        alpha: Dirichlet concentration, > 0.
        num_bins: number of length-quantile bins, >= 1.
        length_column: integer column holding each sample's token count.
        min_partition_size: every client must get at least this many samples,
            >= 1; the whole draw (all bins) is repeated until it holds.
        max_tries: how many draws to attempt before giving up, >= 1.
        seed: seed of the ``np.random.default_rng`` behind every random choice.

    Raises:
        ValueError: an argument is out of range (the message names it).
    """

    def __init__(
        self,
        num_partitions: int,
        alpha: float,
        num_bins: int = 4,
        length_column: str = "length",
        min_partition_size: int = 1,
        max_tries: int = 100,
        seed: int | None = 42,
    ) -> None:
        super().__init__()
        _check_int("num_partitions", num_partitions, 1)
        _check_int("num_bins", num_bins, 1)
        _check_int("min_partition_size", min_partition_size, 1)
        _check_int("max_tries", max_tries, 1)
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, numbers.Real)
            or not np.isfinite(alpha)
            or alpha <= 0
        ):
            raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
        if not isinstance(length_column, str) or not length_column:
            raise ValueError(
                f"length_column must be a non-empty column name, got {length_column!r}"
            )
        if seed is not None and (
            isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
        ):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        self._num_partitions = int(num_partitions)
        self._alpha = float(alpha)
        self._num_bins = int(num_bins)
        self._length_column = length_column
        self._min_partition_size = int(min_partition_size)
        self._max_tries = int(max_tries)
        self._seed = seed
        # Filled on the first partition_indices() call.
        self._indices: list[list[int]] | None = None
        self._bin_edges: np.ndarray | None = None
        self._bin_sizes: list[int] | None = None

    @property
    def num_partitions(self) -> int:
        """Total number of partitions (clients)."""
        return self._num_partitions

    @property
    def bin_edges(self) -> np.ndarray:
        """Length edges of the bins, shape ``(num_bins + 1,)``, non-decreasing.

        ``bin_edges[k]`` is the shortest length in bin k and ``bin_edges[-1]`` the
        longest overall, so bin k's lengths lie in ``[edges[k], edges[k + 1]]``
        (an empty bin, possible only when ``n < num_bins``, repeats the next edge).

        Raises:
            AttributeError: the partitions have not been computed yet.
        """
        if self._bin_edges is None:
            raise AttributeError(
                "bin_edges is known only after partitioning; call "
                "partition_indices() or load_partition() first"
            )
        return self._bin_edges

    @property
    def bin_sizes(self) -> list[int]:
        """Number of samples in each length bin (equal within one, by rank).

        Raises:
            AttributeError: the partitions have not been computed yet.
        """
        if self._bin_sizes is None:
            raise AttributeError(
                "bin_sizes is known only after partitioning; call "
                "partition_indices() or load_partition() first"
            )
        return self._bin_sizes

    def load_partition(self, partition_id: int) -> datasets.Dataset:
        """Return client ``partition_id``'s samples (partitions all on first call).

        Raises:
            ValueError: ``partition_id`` is not in ``[0, num_partitions)``, or the
                partitioning itself failed (see :meth:`partition_indices`).
        """
        if (
            isinstance(partition_id, bool)
            or not isinstance(partition_id, numbers.Integral)
            or not 0 <= partition_id < self._num_partitions
        ):
            raise ValueError(
                f"partition_id must be an int in [0, {self._num_partitions - 1}] "
                f"(num_partitions={self._num_partitions}), got {partition_id!r}"
            )
        return self.dataset.select(self.partition_indices()[int(partition_id)])

    def partition_indices(self) -> list[list[int]]:
        """Row indices of every client's samples, computed once and cached.

        Raises:
            ValueError: the length column is missing or not integer, or no draw in
                ``max_tries`` gave every client ``min_partition_size`` samples.
        """
        if self._indices is None:
            # A fresh generator per computation: the result depends only on the
            # dataset and the arguments, even if an earlier attempt raised.
            rng = np.random.default_rng(self._seed)
            lengths = self._read_lengths()
            bins = self._rank_bins(lengths, rng)
            self._bin_sizes = [len(members) for members in bins]
            self._indices = self._draw(bins, len(lengths), rng)
        return self._indices

    def _read_lengths(self) -> np.ndarray:
        ds = self.dataset
        col = self._length_column
        if col not in ds.column_names:
            raise ValueError(
                f"length column {col!r} is not in the dataset; its columns are "
                f"{ds.column_names}. Pass length_column= to name the token-count "
                "column."
            )
        feature = ds.features[col]
        if not (
            isinstance(feature, datasets.Value)
            and feature.dtype.startswith(("int", "uint"))
        ):
            raise ValueError(
                f"length column {col!r} must hold integer token counts, got {feature}"
            )
        # Numpy format goes through Arrow and respects any select()/shuffle().
        return ds.with_format("numpy", columns=[col])[:][col].astype(np.int64)

    def _rank_bins(
        self, lengths: np.ndarray, rng: np.random.Generator
    ) -> list[np.ndarray]:
        """Split row indices into equal-size length bins (see the class docstring)."""
        n, b = len(lengths), self._num_bins
        if n == 0:
            self._bin_edges = np.zeros(b + 1, dtype=np.int64)
            return [np.empty(0, dtype=np.int64) for _ in range(b)]
        tie_break = rng.permutation(n)
        # lexsort sorts by the last key first: by length, then by the random key.
        order = np.lexsort((tie_break, lengths))
        sorted_lengths = lengths[order]
        # Rank r goes to bin floor(r * b / n), so bin k starts at ceil(k * n / b).
        starts = [-(-k * n // b) for k in range(b + 1)]
        firsts = [sorted_lengths[min(s, n - 1)] for s in starts[:-1]]
        self._bin_edges = np.array([*firsts, sorted_lengths[-1]], dtype=np.int64)
        return [order[starts[k] : starts[k + 1]] for k in range(b)]

    def _draw(
        self, bins: list[np.ndarray], n: int, rng: np.random.Generator
    ) -> list[list[int]]:
        """Draw the Dirichlet split of every bin, redrawing until sizes suffice."""
        p, need = self._num_partitions, self._min_partition_size
        context = (
            f"num_partitions={p}, alpha={self._alpha}, num_bins={self._num_bins}, "
            f"dataset size {n}"
        )
        advice = (
            "Lower min_partition_size or num_partitions, raise alpha (more even "
            "shares), or use more data."
        )
        if n < p * need:  # no draw can succeed, so do not spend max_tries on it
            raise ValueError(
                f"min_partition_size={need} needs at least {p * need} samples "
                f"for {p} clients ({context}). {advice}"
            )
        for attempt in range(1, self._max_tries + 1):
            parts: list[list[int]] = [[] for _ in range(p)]
            for members in bins:
                shares = rng.dirichlet(np.full(p, self._alpha))
                # The tolerance keeps float error in the shares (a lone client's
                # share can be 1 - 1e-16) from flooring a whole sample away; the
                # cap below keeps the total within the bin.
                counts = np.floor(shares * len(members) + 1e-6).astype(np.int64)
                cuts = np.minimum(np.cumsum(counts), len(members))
                chosen = rng.permutation(members)[: cuts[-1]]
                for client, piece in enumerate(np.split(chosen, cuts[:-1])):
                    parts[client].extend(piece.tolist())
            if min(len(part) for part in parts) >= need:
                for part in parts:
                    rng.shuffle(part)
                log.debug("length-Dirichlet partition found on draw %d", attempt)
                return parts
        raise ValueError(
            f"no draw in max_tries={self._max_tries} gave every client at least "
            f"min_partition_size={need} samples ({context}). {advice}"
        )


class _ShuffledIidPartitioner(IidPartitioner):
    """Flower's IID partitioner over a seeded shuffle of the dataset.

    ``IidPartitioner`` cuts contiguous shards, which is IID only if the rows are
    already shuffled (``FederatedDataset`` does that). SplitFT's train set is
    grouped by task, so without the shuffle each client would get a few tasks.
    """

    def __init__(self, num_partitions: int, min_partition_size: int, seed: int) -> None:
        super().__init__(num_partitions)
        self._min_partition_size = min_partition_size
        self._seed = seed
        self._shuffled: datasets.Dataset | None = None

    def load_partition(self, partition_id: int) -> datasets.Dataset:
        """Return shard ``partition_id`` of the shuffled dataset."""
        if not 0 <= partition_id < self.num_partitions:
            raise ValueError(
                f"partition_id must be in [0, {self.num_partitions - 1}], "
                f"got {partition_id!r}"
            )
        if self._shuffled is None:
            n = self.dataset.num_rows
            if n // self.num_partitions < self._min_partition_size:
                raise ValueError(
                    f"IID split of {n} samples over num_partitions="
                    f"{self.num_partitions} gives some client fewer than "
                    f"min_partition_size={self._min_partition_size} samples; lower "
                    "one of them or use more data."
                )
            self._shuffled = self.dataset.shuffle(seed=self._seed)
        return self._shuffled.shard(
            num_shards=self.num_partitions, index=partition_id, contiguous=True
        )


def make_partitioner(
    method: str,
    num_partitions: int,
    alpha: float,
    num_bins: int,
    min_partition_size: int,
    seed: int,
) -> Partitioner:
    """Build the partitioner a ``partition`` config names.

    Args:
        method: ``"iid"`` (Flower's IID shards of a seeded shuffle),
            ``"length_dirichlet"`` (:class:`LengthDirichletPartitioner`) or
            ``"task_dirichlet"`` (Flower's Dirichlet over the ``task`` column).
        num_partitions: number of clients.
        alpha: Dirichlet concentration (unused by ``"iid"``).
        num_bins: length bins (``"length_dirichlet"`` only).
        min_partition_size: fewest samples a client may get.
        seed: seed for every random choice.

    Returns:
        A partitioner without a dataset; set ``.dataset`` before loading.

    Raises:
        ValueError: unknown ``method`` (the message lists the allowed ones), or an
            argument the chosen partitioner rejects.
    """
    if method == "iid":
        return _ShuffledIidPartitioner(num_partitions, min_partition_size, seed)
    if method == "length_dirichlet":
        return LengthDirichletPartitioner(
            num_partitions,
            alpha,
            num_bins=num_bins,
            min_partition_size=min_partition_size,
            seed=seed,
        )
    if method == "task_dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="task",
            alpha=float(alpha),
            min_partition_size=min_partition_size,
            self_balancing=False,
            seed=seed,
        )
    raise ValueError(
        f"unknown partition method {method!r}; allowed: {', '.join(PARTITION_METHODS)}"
    )


def _check_int(name: str, value: object, minimum: int) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or value < minimum
    ):
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
