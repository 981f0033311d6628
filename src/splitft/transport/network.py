"""The network transport: the same messages as in process, over gRPC.

One unary method, ``/splitft.v1.Split/Call`` (``splitft.proto``): its
``Envelope`` carries ``messages.encode(msg)`` as its one ``bytes`` field, so
a message costs on the wire what it costs in the simulation plus a few bytes
of envelope. The envelope is (de)serialised here by hand (a protobuf message
with one bytes field is a tag byte, a varint length and the bytes), so any
client generated from the ``.proto`` can talk to the server.

The same port serves the standard health service, ``grpc.health.v1.Health``
(from ``grpcio-health-checking``), without a token: NOT_SERVING while the run
sets up, SERVING once it is ready for its first round, NOT_SERVING from the
moment it stops. Load balancers, Kubernetes probes and ``splitft health``
ask it; a client waits for SERVING before it joins.

Identity comes from the connection, not the message (as in Flower's node
authentication): each call carries ``x-splitft-client-id`` and
``authorization: Bearer <token>`` metadata; the server checks the token's
hash, then hands the request to its handler with that client id as ``peer``,
and the handler refuses a request acting for another client. A refusal
travels as a gRPC status (its class's code, :mod:`splitft.split.errors`) and
comes back to the client as the same ``Ack`` the in-process transport gives.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import defaultdict
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from splitft.config import ConfigError
from splitft.split.errors import CODES, Malformed
from splitft.split.messages import Ack, decode, encode
from splitft.transport.base import Traffic
from splitft.transport.health import (
    SERVICE,
    TlsFailed,
    TransportFailed,
    channel,
    channel_options,
    health_status,
    tls_failure,
)
from splitft.transport.security import check_token, is_loopback

log = logging.getLogger(__name__)

METHOD = f"/{SERVICE}/Call"
CLIENT_ID = "x-splitft-client-id"
# statuses a refusal may have (splitft.split.errors); anything else from the
# server is a transport fault
REFUSALS = frozenset(CODES)
RETRIED = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


# ------------------------------------------------------------------ envelope
def pack(payload: bytes) -> bytes:
    """``Envelope { bytes payload = 1; }`` in protobuf's wire format."""
    n, length = len(payload), bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        length.append(byte | (0x80 if n else 0))
        if not n:
            break
    return b"\x0a" + bytes(length) + payload


def unpack(data: bytes) -> bytes:
    """The payload of an Envelope; anything else is :class:`Malformed`.

    Strict: field 1 as bytes, a minimal varint length, nothing after the
    payload (no other or repeated fields), so ``pack(unpack(data)) == data``.
    """
    if not data:
        return b""  # an empty Envelope: payload absent
    if data[0] != 0x0A:
        raise Malformed("not a SplitFT envelope (field 1, bytes, expected)")
    n = shift = 0
    for i, byte in enumerate(data[1:11], start=1):
        n |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            start = i + 1
            break
    else:
        raise Malformed("not a SplitFT envelope (bad length)")
    if start > 2 and data[start - 1] == 0:  # 0x80 0x00 for 0: valid, not minimal
        raise Malformed("not a SplitFT envelope (length not minimally encoded)")
    if len(data) - start != n:
        raise Malformed(
            f"not a SplitFT envelope ({len(data) - start} bytes after a length of {n})"
        )
    return data[start:]


def message_limit(
    hidden_size: int, max_length: int, batch_size: int, adapter_bytes: int
) -> int:
    """The largest message either side may send, with room to spare.

    The largest messages are a micro-batch's activations or gradients
    (B x T x H float32, plus three B x T int64 tensors) and a plan or upload
    that carries the whole adapter; twice the larger of the two, plus 1 MiB
    of headers, and never below gRPC's usual 4 MiB.
    """
    activations = batch_size * max_length * (hidden_size * 4 + 3 * 8)
    return max(2 * max(activations, adapter_bytes) + 2**20, 4 * 2**20)


def _one_line(e: Exception) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]


# -------------------------------------------------------------------- server
class NetworkServer:
    """Serves a handler (``handle(msg, peer)``; ``device``) over gRPC.

    The token is checked in the servicer, before the payload is parsed (one
    method, so an interceptor would add a layer and no safety); an unknown id
    and a wrong token get the same ``UNAUTHENTICATED``. :attr:`traffic` counts
    payload bytes per authenticated client as received and sent: a request
    the client repeated after a lost answer is counted each time it arrives,
    a refusal (a status, no payload) counts its request only.

    Args:
        handler: answers each authenticated request; if it has
            ``run(msg, fn)``, each request is ``run(msg, handle)`` (it may
            run ``handle`` on another thread and return its result).
        address: ``HOST:PORT`` (port 0: any free port; see :attr:`port`).
        tls: the server's certificate chain and private key (PEM); None only
            with ``insecure``.
        token_hashes: client id -> SHA-256 of its token.
        max_message_bytes: the largest request or reply.
        insecure: plaintext, on a loopback address unless
            ``allow_insecure_remote``.
        workers: the threads that serve calls (a long poll holds one).
        max_calls_per_client: calls one client may have in flight; more get
            ``RESOURCE_EXHAUSTED`` at once, so one client cannot hold every
            worker (``workers`` should exceed it).
    """

    def __init__(
        self,
        handler,
        address: str,
        *,
        tls: tuple[bytes, bytes] | None,
        token_hashes: dict[int, bytes],
        max_message_bytes: int,
        insecure: bool = False,
        allow_insecure_remote: bool = False,
        workers: int = 8,
        max_calls_per_client: int = 8,
    ) -> None:
        host = address.rpartition(":")[0].strip("[]")
        if tls is None and not insecure:
            raise ConfigError("a server without TLS certificates needs --insecure")
        if tls is None and not allow_insecure_remote and not is_loopback(host):
            raise ConfigError(
                f"plaintext on {host}, which is not a loopback address, needs "
                "--allow-insecure-remote"
            )
        self.handler, self.address = handler, address
        self.hashes = token_hashes
        self.traffic: dict[int, Traffic] = defaultdict(Traffic)
        self._lock = threading.Lock()
        self.max_calls = max_calls_per_client
        self._in_flight: dict[int, int] = defaultdict(int)
        # how a request is run: the handler may take it to another thread
        self._run = getattr(handler, "run", None) or (lambda msg, fn, peer: fn())
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers),
            options=channel_options(max_message_bytes),
        )
        rpc = grpc.unary_unary_rpc_method_handler(
            self._call, request_deserializer=None, response_serializer=None
        )
        service = grpc.method_handlers_generic_handler(SERVICE, {"Call": rpc})
        self._server.add_generic_rpc_handlers((service,))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        self.serving(False)
        if tls is None:
            self.port = self._server.add_insecure_port(address)
        else:
            creds = grpc.ssl_server_credentials([(tls[1], tls[0])])
            self.port = self._server.add_secure_port(address, creds)
        if not self.port:
            raise ConfigError(
                f"cannot listen on {address} (in use, or not this host's)"
            )

    def start(self) -> None:
        self._server.start()

    def serving(self, up: bool) -> None:
        """What health checks hear, for the server ("") and ``splitft.v1.Split``:
        SERVING or NOT_SERVING."""
        status = health_pb2.HealthCheckResponse
        for name in ("", SERVICE):
            self.health.set(name, status.SERVING if up else status.NOT_SERVING)

    def stop(self, grace: float | None = None) -> None:
        self.health.enter_graceful_shutdown()  # NOT_SERVING until the port closes
        self._server.stop(grace).wait()

    def _peer(self, context) -> int:
        meta = dict(context.invocation_metadata())
        raw, auth = meta.get(CLIENT_ID, ""), meta.get("authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else ""
        cid = int(raw) if raw.isdigit() and len(raw) < 10 else -1
        if not check_token(self.hashes, cid, token):
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED, "unknown client id or wrong token"
            )
        return cid

    def _call(self, request: bytes, context) -> bytes:
        peer = self._peer(context)
        with self._lock:
            if self._in_flight[peer] >= self.max_calls:
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"client {peer} has {self.max_calls} calls in flight "
                    f"(server.max_calls_per_client={self.max_calls}); wait for "
                    "their answers",
                )
            self._in_flight[peer] += 1
        try:
            return self._serve(request, context, peer)
        finally:
            with self._lock:
                self._in_flight[peer] -= 1

    def _serve(self, request: bytes, context, peer: int) -> bytes:
        try:
            payload = unpack(request)
            msg = decode(payload, getattr(self.handler, "device", "cpu"))
        except Malformed as e:  # unpack and decode raise nothing else
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"Malformed: {e}")
        with self._lock:
            self.traffic[peer].record("up", msg.kind, len(payload))
        try:
            reply = self._run(msg, lambda: self.handler.handle(msg, peer=peer), peer)
            out = encode(reply)
        except Exception as e:  # noqa: BLE001 - one request fails, not the server
            log.warning("request from client %d failed", peer, exc_info=True)
            context.abort(grpc.StatusCode.INTERNAL, _one_line(e))
        if isinstance(reply, Ack) and reply.code:
            # a code outside the refusals would be a handler bug: INTERNAL
            code = reply.code if reply.code in REFUSALS else "INTERNAL"
            context.abort(grpc.StatusCode[code], reply.error or reply.code)
        with self._lock:
            self.traffic[peer].record("down", reply.kind, len(out))
        return pack(out)


# -------------------------------------------------------------------- client
class ServerUnreachable(ConnectionError):
    """The server did not answer, after every retry."""


class NetworkTransport:
    """A client's connection to the server (the :class:`Transport` protocol).

    Every call has a deadline; one that meets ``UNAVAILABLE`` or
    ``DEADLINE_EXCEEDED`` is sent again after an exponential, jittered
    backoff (the server answers a repeated request from its first result,
    so every call is safe to repeat), then :class:`ServerUnreachable`. A
    failed TLS handshake (a CA that did not sign the server's certificate, a
    server name it does not hold) is :class:`TlsFailed` at once: waiting
    would not fix it.
    Refusals come back as ``Ack(error, code)``, as in process. Bytes are
    payload bytes (``len(encode(msg))``, as in process), counted once per
    call however often it was sent; a refused call counts its request only.
    """

    def __init__(
        self,
        address: str,
        client_id: int,
        token: str,
        *,
        ca_cert: bytes | None,
        server_name: str | None = None,
        max_message_bytes: int = 4 * 2**20,
        timeout_s: float = 120.0,
        retries: int = 5,
        backoff_s: float = 0.5,
    ) -> None:
        self.address, self.client_id = address, client_id
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.traffic = Traffic()
        self._channel = channel(address, ca_cert, server_name, max_message_bytes)
        self._call = self._channel.unary_unary(METHOD)
        self._metadata = (
            (CLIENT_ID, str(client_id)),
            ("authorization", f"Bearer {token}"),
        )

    def call(self, msg: Any):
        payload = encode(msg)
        request = pack(payload)
        for attempt in range(self.retries + 1):
            try:
                reply = self._call(
                    request, timeout=self.timeout_s, metadata=self._metadata
                )
                break
            except grpc.RpcError as e:
                code = e.code()
                if code.name in REFUSALS:
                    self.traffic.record("up", msg.kind, len(payload))
                    cid = getattr(msg, "client_id", self.client_id)
                    return Ack(cid, error=e.details() or code.name, code=code.name)
                if code == grpc.StatusCode.UNAVAILABLE and (
                    tls := tls_failure(e.details() or "", self.address)
                ):
                    raise TlsFailed(f"client {self.client_id}: {tls}") from None
                if code not in RETRIED:  # a fault no retry would mend
                    raise TransportFailed(
                        f"client {self.client_id}: the server at {self.address} "
                        f"answered {code.name}: {e.details()}; is it a SplitFT "
                        "server of this version?"
                    ) from None
                if attempt == self.retries:
                    raise ServerUnreachable(
                        f"server {self.address}: {code.name}: {e.details()}"
                    ) from None
                delay = self.backoff_s * 2**attempt * (0.5 + random.random())
                # at most 4 s between tries: a server back from a restart
                # keeps its port open for its clients a few seconds only
                time.sleep(min(delay, 4.0))
        data = unpack(reply)
        self.traffic.record("up", msg.kind, len(payload))
        answer = decode(data)
        self.traffic.record("down", answer.kind, len(data))
        return answer

    def wait_for_server(
        self, timeout_s: float, poll_s: float = 1.0, setting_up: bool = False
    ) -> None:
        """Return once the server's health check says SERVING (or, with
        ``setting_up``, once it answers at all: its port is open), asking
        every ``poll_s``; at once from a server without the health service.

        Raises:
            ServerUnreachable: not so within ``timeout_s``.
            TlsFailed: the handshake failed (at once: waiting would not help).
        """
        up = {"SERVING", "UNIMPLEMENTED"} | ({"NOT_SERVING"} if setting_up else set())
        until, said = time.monotonic() + timeout_s, ""
        while True:
            try:
                status = health_status(self._channel, self.address, min(5.0, timeout_s))
            except TlsFailed as e:
                raise TlsFailed(f"client {self.client_id}: {e}") from None
            if status in up:
                return
            if time.monotonic() >= until:
                raise ServerUnreachable(
                    f"server {self.address}: not SERVING after {timeout_s:g} s "
                    f"(its health check: {status})"
                )
            if status != said:
                log.info(
                    "client %d: waiting for the server at %s (%s)",
                    self.client_id,
                    self.address,
                    status,
                )
                said = status
            time.sleep(poll_s)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> NetworkTransport:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_address(address: str, insecure: bool, allow_insecure_remote: bool) -> str:
    """``HOST:PORT`` as given; plaintext only on loopback unless allowed."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(
            f"--address {address!r} is not allowed: HOST:PORT, e.g. 0.0.0.0:50051"
        )
    if insecure and not allow_insecure_remote and not is_loopback(host.strip("[]")):
        raise ConfigError(
            f"--insecure on {host}, which is not a loopback address: clients' "
            "activations and tokens would cross the network in plaintext; use "
            "TLS (--certs), or --allow-insecure-remote if you really mean it"
        )
    return address
