"""How clients reach the server: one interface, in process and over gRPC
(``network.py``); the simulated clock drives clients itself (``sim/clocked.py``)."""

from splitft.transport.base import Traffic, Transport


def __getattr__(name: str):
    # lazily, so that ``splitft health`` (transport/health.py) loads no torch
    if name == "InProcessTransport":
        from splitft.transport.inproc import InProcessTransport

        return InProcessTransport
    raise AttributeError(f"module 'splitft.transport' has no attribute {name!r}")


__all__ = ["InProcessTransport", "Traffic", "Transport"]
