"""In-process transport: real serialisation, no socket."""

from __future__ import annotations

from splitft.split.errors import Malformed
from splitft.split.messages import Ack, decode, encode
from splitft.transport.base import Handler, Traffic


class InProcessTransport:
    """Serialises each message exactly as on a wire and hands it to the server.

    The round trip through bytes keeps simulation honest: what is counted is
    what is sent, and nothing reaches the other side by reference.
    """

    def __init__(self, server: Handler, traffic: Traffic | None = None) -> None:
        self.server = server
        self.traffic = traffic or Traffic()

    def call(self, msg):
        data = encode(msg)
        self.traffic.record("up", msg.kind, len(data))
        try:
            request = decode(data, self.server.device)
        except Malformed as e:  # as the network transport answers it
            cid = getattr(msg, "client_id", -1)
            return Ack(cid, error=f"Malformed: {e}", code=e.code)
        reply = self.server.handle(request)
        data = encode(reply)
        self.traffic.record("down", reply.kind, len(data))
        return decode(data)
