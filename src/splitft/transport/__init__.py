"""How clients reach the server: one interface, in-process now, gRPC later."""

from splitft.transport.base import Traffic, Transport
from splitft.transport.inproc import InProcessTransport

__all__ = ["InProcessTransport", "Traffic", "Transport"]
