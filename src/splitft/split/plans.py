"""Where one client is in its round, as the server tracks it.

The server hands a client a plan (its cut and one learning rate per local
step) and then expects its micro-batches in order: step 0 micro 0, micro 1,
..., step 1 micro 0, ..., then its upload. A :class:`Planned` is that state
machine; a request that was already answered (a client retrying after a lost
reply) is recognised by its :func:`key_of` and gets the first answer again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from splitft.split.messages import SmashedData, TailGradient


@dataclass
class Planned:
    """What the server handed one client for the current round, and where the
    client is in it: the next (step, micro) it must send, then its upload."""

    round: int
    cut: int
    lrs: list[float]
    next: tuple[int, int] = (0, 0)
    last: tuple[tuple, object] | None = None  # (request key, reply): retries
    # U-shaped: the micro-batch whose TailGradient is awaited, as
    # (step, micro, the smashed data's leaf, the server's output (B, T, H))
    pending: tuple[int, int, torch.Tensor, torch.Tensor] | None = None

    @property
    def steps_done(self) -> bool:
        """Every local step of the plan has been served."""
        return self.next[0] >= len(self.lrs)

    @property
    def uploaded(self) -> bool:
        """The last request answered was the upload (a reply is kept only for
        what succeeded: an upload kept is an upload made)."""
        return self.last is not None and self.last[0][0] == "upload"

    def answered(self, key: tuple) -> Any:
        """The reply already given to the request ``key`` (None: it is new)."""
        return self.last[1] if self.last is not None and self.last[0] == key else None

    def served(self, step: int, micro: int, num_micro: int) -> None:
        """Micro-batch ``(step, micro)`` is done: the next one is expected."""
        last = micro == num_micro - 1
        self.next = (step + 1, 0) if last else (step, micro + 1)

    def restart_step(self) -> None:
        """A refused request: the step it was part of starts again at its
        first micro-batch, and no forward awaits its tail any more."""
        self.pending = None
        if not self.steps_done:
            self.next = (self.next[0], 0)


def key_of(msg, rnd: int) -> tuple:
    """What identifies a request for retries: (kind, round, step, micro)."""
    if isinstance(msg, SmashedData):
        return ("step", rnd, msg.step, msg.micro)
    if isinstance(msg, TailGradient):
        return ("tail", rnd, msg.step, msg.micro)
    return ("upload", msg.round)
