"""The order in which a client draws its training rows: seeded, resumable.

Each client shuffles its rows once an epoch with its own seeded generator
and cuts the shuffle into batches. The order is a function of the seed
alone, so the server's plan (how many batches a client drew before the
round) is all a client needs to resume where an uninterrupted run would be.
"""

from __future__ import annotations

import numpy as np


class BatchOrder:
    """Epochs of seeded shuffles, cut into batches; resumable at any batch.

    The order is a function of the seed alone: :meth:`seek` puts it at the
    n-th batch (the server's plan says how many this client drew before the
    round), so a client that restarted, or a round the server runs again,
    draws the batches an uninterrupted run would.
    """

    def __init__(self, n: int, batch_size: int, rng: np.random.Generator) -> None:
        self.n, self.batch_size, self.rng = n, batch_size, rng
        # a last batch smaller than batch_size is dropped, unless it is the only one
        self.stop = n - n % batch_size if n >= batch_size else n
        self.per_epoch = -(-self.stop // batch_size)
        self._seed = rng.bit_generator.state
        self.drawn = 0
        self._new_epoch()

    def _new_epoch(self) -> None:
        self._epoch_rng = self.rng.bit_generator.state
        self.order = self.rng.permutation(self.n)
        self.pos = 0

    def next(self) -> np.ndarray:
        if self.pos >= self.stop:
            self._new_epoch()
        rows = self.order[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        self.drawn += 1
        return rows

    def seek(self, drawn: int) -> None:
        """Go to where the order is after ``drawn`` batches."""
        if drawn == self.drawn:
            return
        epochs, rest = divmod(drawn, self.per_epoch)
        self.rng.bit_generator.state = self._seed
        for _ in range(epochs):
            self.rng.permutation(self.n)
        self._new_epoch()
        self.pos, self.drawn = rest * self.batch_size, drawn

    def state_dict(self) -> dict:
        return {"rng": self._epoch_rng, "pos": self.pos, "drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self._new_epoch()
        self.pos = state["pos"]
        self.drawn = state.get("drawn", 0)
