"""The transport interface and the byte meter every transport feeds."""

from __future__ import annotations

from collections import defaultdict
from typing import Protocol


class Handler(Protocol):
    """The server side: answers one request message with one reply."""

    def handle(self, msg): ...


class Transport(Protocol):
    """A client's connection to the server: request/response, nothing else.

    Simulation and deployment differ only in the transport: the client calls
    ``call`` with a message dataclass and gets the reply dataclass back.
    """

    traffic: Traffic

    def call(self, msg): ...


class Traffic:
    """Bytes sent up (client -> server) and down, by message kind."""

    def __init__(self) -> None:
        self.up: dict[str, int] = defaultdict(int)
        self.down: dict[str, int] = defaultdict(int)

    def record(self, direction: str, kind: str, nbytes: int) -> None:
        getattr(self, direction)[kind] += nbytes

    def snapshot(self) -> dict[str, int]:
        """Flat counters, e.g. ``{"up_smashed": 123, "down_gradients": 456}``."""
        out = {f"up_{k}": v for k, v in self.up.items()}
        out.update({f"down_{k}": v for k, v in self.down.items()})
        return out
