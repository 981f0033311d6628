"""The client's channel to a server, what a failed TLS handshake means, and
the server's health check (``grpc.health.v1``).

Apart from :mod:`splitft.transport.network` (the messages and their codec)
so that a probe (``splitft health``) imports grpc and nothing heavier.
"""

from __future__ import annotations

from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitft.config import ConfigError

SERVICE = "splitft.v1.Split"


def channel_options(limit: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
    ]


class TransportFailed(ConfigError):
    """A call failed in a way that waiting would not mend: only UNAVAILABLE
    and DEADLINE_EXCEEDED are retried."""


class TlsFailed(TransportFailed):
    """The TLS handshake failed: a setting to fix, not a server to wait for."""


def tls_failure(details: str, address: str) -> str:
    """What an UNAVAILABLE's details say of a failed handshake, as one line
    naming the flag to fix ("" if the server was simply not there)."""
    text = details.lower()
    if (
        "hostname verification" in text
        or "no match found for server name" in text
        or "not in peer certificate" in text  # grpcio 1.60's wording
    ):
        return (
            f"the server at {address} has a certificate for another name: pass "
            "--server-name NAME, the name given to `splitft certs --server-name`"
        )
    if "handshake failed" not in text:
        return ""
    if "certificate" in text or "verify" in text or "signature" in text:
        return (
            f"the certificate of the server at {address} is not signed by --ca: "
            "pass the ca.pem of the `splitft certs` folder the server's "
            "certificate came from"
        )
    if "wrong_version_number" in text:  # TLS spoken to a plaintext server
        return (
            f"the server at {address} does not speak TLS: was it started with "
            "--insecure? (then the client needs --insecure too)"
        )
    return ""  # a connection reset mid-handshake: passing, retried


def channel(
    address: str,
    ca_cert: bytes | None,
    server_name: str | None = None,
    max_message_bytes: int = 4 * 2**20,
) -> grpc.Channel:
    """A channel to ``address``: TLS verified against ``ca_cert`` (plaintext
    if None), ``server_name`` if the certificate names another host."""
    options = channel_options(max_message_bytes)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    if ca_cert is None:
        return grpc.insecure_channel(address, options=options)
    creds = grpc.ssl_channel_credentials(root_certificates=ca_cert)
    return grpc.secure_channel(address, creds, options=options)


def health_status(link: grpc.Channel, address: str, timeout_s: float = 5.0) -> str:
    """The server's health, as ``grpc.health.v1`` names it (SERVING,
    NOT_SERVING), or the status code of a failed check (UNAVAILABLE: no
    server there; UNIMPLEMENTED: a server without the health service).

    Raises:
        TlsFailed: the TLS handshake failed; the message names the flag.
    """
    stub = health_pb2_grpc.HealthStub(link)
    request = health_pb2.HealthCheckRequest(service=SERVICE)
    try:
        reply = stub.Check(request, timeout=timeout_s)
    except grpc.RpcError as e:
        code, details = e.code(), e.details() or ""
        if code == grpc.StatusCode.UNAVAILABLE and (
            tls := tls_failure(details, address)
        ):
            raise TlsFailed(tls) from None
        return code.name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def read_file(path: Path) -> bytes:
    """A file's bytes (a certificate, a key); unreadable is one ConfigError."""
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror or e})") from None
