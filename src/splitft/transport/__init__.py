"""How clients reach the server: one interface, in process and over gRPC
(``network.py``); the simulated clock drives clients itself (``sim/clocked.py``)."""

from splitft.transport.base import Traffic, Transport
from splitft.transport.inproc import InProcessTransport

__all__ = ["InProcessTransport", "Traffic", "Transport"]
