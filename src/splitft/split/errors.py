"""Why the server refuses a request: one class per kind of refusal.

Each class carries the gRPC status name the network transport answers with
(``grpc.StatusCode[...]``); in process the refusal travels as an
:class:`~splitft.split.messages.Ack` whose ``code`` is that name, so a client
sees the same thing behind either transport. Everything else that goes wrong
while handling a request is ``INTERNAL``.
"""

from __future__ import annotations


class Refused(RuntimeError):
    """A request the server refused; the server and the other clients carry on."""

    code = "INTERNAL"


class Malformed(Refused):
    """The bytes are not a message, or a field has the wrong type, shape,
    dtype or range."""

    code = "INVALID_ARGUMENT"


class OutOfOrder(Refused):
    """A valid message at the wrong time: before its plan, a step or
    micro-batch out of order, an old round, a round not open."""

    code = "FAILED_PRECONDITION"


class NotAllowed(Refused):
    """An authenticated client acting for another client id, or an unknown one."""

    code = "PERMISSION_DENIED"


class TooLarge(Refused):
    """Over a bound from the model and the config: sequence length, batch
    rows, message size."""

    code = "RESOURCE_EXHAUSTED"


class Unauthenticated(Refused):
    """No token, or a wrong one."""

    code = "UNAUTHENTICATED"


CODES = {
    c.code: c
    for c in (Refused, Malformed, OutOfOrder, NotAllowed, TooLarge, Unauthenticated)
}
