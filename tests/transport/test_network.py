"""The gRPC transport on 127.0.0.1 with TLS, against a stand-in handler."""

import threading
import time

import grpc
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from splitft.config import ConfigError
from splitft.split.errors import Malformed
from splitft.split.messages import (
    Ack,
    RoundPlan,
    RoundRequest,
    SmashedData,
    decode,
    encode,
)
from splitft.transport.network import (
    METHOD,
    NetworkServer,
    NetworkTransport,
    ServerUnreachable,
    TlsFailed,
    TransportFailed,
    pack,
    tls_failure,
    unpack,
)
from splitft.transport.security import load_token_hashes, make_certs, read_token


class Echo:
    """Answers a RoundRequest with a plan carrying a tensor; records peers."""

    device = "cpu"

    def __init__(self, refuse="", sleep=0.0):
        self.seen, self.refuse, self.sleep = [], refuse, sleep

    def handle(self, msg, peer=None):
        self.seen.append((type(msg).__name__, peer))
        time.sleep(self.sleep)
        if self.refuse:
            return Ack(msg.client_id, error="no, because", code=self.refuse)
        adapter = {"model.layers.0.q.lora_A.weight": torch.arange(12.0).view(3, 4)}
        return RoundPlan(msg.client_id, msg.round, 2, [1e-3], adapter)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    root = tmp_path_factory.mktemp("certs")
    make_certs(root, "localhost", clients=2)
    return root


def serve(certs, handler, limit=8 * 2**20, tls=True, address="127.0.0.1:0"):
    server = NetworkServer(
        handler,
        address,
        tls=((certs / "server.pem").read_bytes(), (certs / "server.key").read_bytes())
        if tls
        else None,
        token_hashes=load_token_hashes(certs / "tokens.json"),
        max_message_bytes=limit,
        insecure=not tls,
    )
    server.start()
    return server


def connect(certs, port, cid=0, token=None, ca=None, **kw):
    token = token or read_token(certs / "clients" / f"client-{cid}.token")
    ca = (certs / "ca.pem").read_bytes() if ca is None else ca
    kw = {"timeout_s": 5.0, "retries": 1, "backoff_s": 0.05, **kw}
    return NetworkTransport(f"127.0.0.1:{port}", cid, token, ca_cert=ca or None, **kw)


def test_a_message_crosses_tls_as_in_process(certs):
    handler = Echo()
    server = serve(certs, handler)
    try:
        with connect(certs, server.port, cid=1) as link:
            reply = link.call(RoundRequest(1, 0))
        expected = handler.handle(RoundRequest(1, 0), peer=1)
        assert isinstance(reply, RoundPlan) and reply.lrs == [1e-3]
        assert torch.equal(
            reply.adapter["model.layers.0.q.lora_A.weight"],
            expected.adapter["model.layers.0.q.lora_A.weight"],
        )
        assert handler.seen[0] == ("RoundRequest", 1)  # the authenticated peer
        up, down = len(encode(RoundRequest(1, 0))), len(encode(expected))
        assert link.traffic.snapshot() == {"up_control": up, "down_adapters": down}
        assert server.traffic[1].snapshot() == link.traffic.snapshot()
    finally:
        server.stop()


@pytest.mark.parametrize("who", ["wrong token", "unknown id", "another's token"])
def test_without_the_right_token_nothing_reaches_the_handler(certs, who):
    handler = Echo()
    server = serve(certs, handler)
    other = read_token(certs / "clients" / "client-1.token")
    kw = {
        "wrong token": dict(cid=0, token="nope"),
        "unknown id": dict(cid=5, token=other),
        "another's token": dict(cid=0, token=other),
    }[who]
    try:
        with connect(certs, server.port, **kw) as link:
            reply = link.call(RoundRequest(kw["cid"], 0))
        assert isinstance(reply, Ack) and reply.code == "UNAUTHENTICATED"
        assert handler.seen == []
    finally:
        server.stop()


@pytest.mark.parametrize(
    "code", ["PERMISSION_DENIED", "FAILED_PRECONDITION", "INVALID_ARGUMENT"]
)
def test_a_refusal_is_a_grpc_status_and_the_same_ack(certs, code):
    server = serve(certs, Echo(refuse=code))
    try:
        with connect(certs, server.port) as link:
            reply = link.call(RoundRequest(0, 0))
        assert isinstance(reply, Ack) and reply.code == code
        assert reply.error == "no, because"
    finally:
        server.stop()


def raw_call(certs, port, data, cid=0):
    creds = grpc.ssl_channel_credentials((certs / "ca.pem").read_bytes())
    token = read_token(certs / "clients" / f"client-{cid}.token")
    with grpc.secure_channel(f"127.0.0.1:{port}", creds) as channel:
        call = channel.unary_unary(METHOD)
        meta = (("x-splitft-client-id", str(cid)), ("authorization", f"Bearer {token}"))
        return call(data, timeout=5, metadata=meta)


@pytest.mark.parametrize(
    "data",
    [
        b"\x00garbage",
        pack(b"not safetensors"),
        pack(encode(RoundRequest(0, 0))[:-3]),
        pack(encode(RoundRequest(0, 0))) + b"x",
        b"\x0a\xff",
    ],
)
def test_garbage_is_invalid_argument_and_the_server_carries_on(certs, data):
    handler = Echo()
    server = serve(certs, handler)
    try:
        with pytest.raises(grpc.RpcError) as err:
            raw_call(certs, server.port, data)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert handler.seen == []
        reply = decode(
            unpack(raw_call(certs, server.port, pack(encode(RoundRequest(0, 0)))))
        )
        assert isinstance(reply, RoundPlan)
    finally:
        server.stop()


class Keep:
    """Keeps what it receives; acks it, or raises when told to."""

    device = "cpu"

    def __init__(self, fail=0):
        self.msgs, self.fail = [], fail

    def handle(self, msg, peer=None):
        self.msgs.append(msg)
        if self.fail:
            self.fail -= 1
            raise RuntimeError("boom\non two lines")
        return Ack(msg.client_id)


def smashed(cid=0, t=5):
    return SmashedData(
        client_id=cid,
        step=1,
        micro=0,
        num_micro=2,
        hidden=torch.randn(2, t, 8),
        attention_mask=torch.ones(2, t, dtype=torch.long),
        position_ids=torch.arange(t).repeat(2, 1),
        labels=torch.full((2, t), -100),
        step_tokens=7,
    )


def test_tensors_arrive_as_the_in_process_decode_gives_them(certs):
    handler = Keep()
    server = serve(certs, handler)
    msg = smashed()
    try:
        with connect(certs, server.port) as link:
            assert link.call(msg) == Ack(0)
        got, want = handler.msgs[0], decode(encode(msg))
        for name in ("hidden", "attention_mask", "position_ids", "labels"):
            assert torch.equal(getattr(got, name), getattr(want, name))
            assert getattr(got, name).dtype == getattr(want, name).dtype
        assert (got.step, got.num_micro, got.step_tokens) == (1, 2, 7)
        sizes = {"up_smashed": len(encode(msg)), "down_control": len(encode(Ack(0)))}
        assert link.traffic.snapshot() == sizes == server.traffic[0].snapshot()
    finally:
        server.stop()


def test_a_failing_handler_is_internal_and_the_server_carries_on(certs):
    server = serve(certs, Keep(fail=1))
    try:
        with connect(certs, server.port) as link:
            reply = link.call(RoundRequest(0, 0))
            assert reply.code == "INTERNAL"
            assert reply.error == "RuntimeError: boom on two lines"
            assert link.call(RoundRequest(0, 0)) == Ack(0)
    finally:
        server.stop()


def test_an_ack_with_a_code_that_is_no_refusal_is_internal(certs):
    server = serve(certs, Echo(refuse="NOT_A_STATUS"))
    try:
        with connect(certs, server.port) as link:
            reply = link.call(RoundRequest(0, 0))
        assert reply == Ack(0, error="no, because", code="INTERNAL")
    finally:
        server.stop()


def test_a_message_over_the_limit_is_resource_exhausted(certs):
    server = serve(certs, Echo(), limit=64 * 1024)
    big = SmashedData(
        0,
        0,
        0,
        1,
        torch.zeros(1, 64, 512),
        None,
        torch.zeros(1, 64, dtype=torch.long),
        torch.zeros(1, 64, dtype=torch.long),
    )
    try:
        with connect(certs, server.port) as link:
            reply = link.call(big)
        assert isinstance(reply, Ack) and reply.code == "RESOURCE_EXHAUSTED"
    finally:
        server.stop()


def test_a_server_signed_by_another_ca_is_not_trusted(certs, tmp_path):
    make_certs(tmp_path, "localhost", clients=1)
    server = serve(certs, Echo())
    try:
        other = (tmp_path / "ca.pem").read_bytes()
        with connect(certs, server.port, ca=other, retries=5) as link:
            with pytest.raises(TlsFailed, match="not signed by --ca"):
                link.call(RoundRequest(0, 0))  # at once: no retry would help
        with connect(certs, server.port, ca=b"") as plaintext:  # no TLS at all
            with pytest.raises(ServerUnreachable):
                plaintext.call(RoundRequest(0, 0))
    finally:
        server.stop()


def test_plaintext_only_on_loopback(certs):
    with pytest.raises(ConfigError, match="not a loopback address"):
        serve(certs, Echo(), tls=False, address="0.0.0.0:0")
    with pytest.raises(ConfigError, match="--insecure"):
        NetworkServer(
            Echo(), "127.0.0.1:0", tls=None, token_hashes={}, max_message_bytes=2**20
        )
    server = serve(certs, Echo(), tls=False)
    try:
        with connect(certs, server.port, ca=b"") as link:
            assert isinstance(link.call(RoundRequest(0, 0)), RoundPlan)
    finally:
        server.stop()


def test_a_server_that_comes_up_late_is_reached_by_retries(certs):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = {}

    def later():
        time.sleep(0.5)
        started["server"] = serve(certs, Echo(), address=f"127.0.0.1:{port}")

    thread = threading.Thread(target=later)
    thread.start()
    try:
        with connect(certs, port, retries=6, backoff_s=0.1) as link:
            assert isinstance(link.call(RoundRequest(0, 0)), RoundPlan)
    finally:
        thread.join()
        started["server"].stop()


def test_a_call_past_its_deadline_is_retried_then_unreachable(certs):
    handler = Echo(sleep=0.5)
    server = serve(certs, handler)
    try:
        with connect(certs, server.port, timeout_s=0.1, retries=1) as link:
            with pytest.raises(ServerUnreachable, match="DEADLINE_EXCEEDED"):
                link.call(RoundRequest(0, 0))
        time.sleep(1.2)  # let the handler's calls finish before the server stops
        assert len(handler.seen) == 2  # sent twice: the server dedups real steps
    finally:
        server.stop()


@given(st.binary(max_size=300))
def test_the_envelope_round_trips(payload):
    assert unpack(pack(payload)) == payload


def test_the_envelope_is_protobufs_wire_format():
    # tag 0x0A (field 1, length-delimited), then the length as a varint:
    # 150 is 0x96 0x01 (the protobuf encoding guide's example)
    assert pack(b"") == b"\x0a\x00"
    assert pack(b"x" * 127)[:2] == b"\x0a\x7f"
    assert pack(b"x" * 150)[:3] == b"\x0a\x96\x01"
    assert pack(b"x" * 2**21)[:5] == b"\x0a\x80\x80\x80\x01"


@pytest.mark.parametrize(
    "data",
    [
        b"\x12\x01x",  # field 2
        b"\x08\x01",  # field 1 as a varint
        b"\x0a",  # no length
        b"\x0a\x80",  # length cut short
        b"\x0a" + b"\xff" * 10 + b"\x01",  # a length over ten bytes
        b"\x0a\x80\x00",  # 0 in two bytes: not minimal
        b"\x0a\x81\x00x",  # 1 in two bytes
        b"\x0a\x02x",  # shorter than its length
        b"\x0a\x01xy",  # a byte after the payload
        b"\x0a\x01x\x0a\x01y",  # field 1 twice
    ],
)
def test_unpack_refuses_what_is_not_one_envelope(data):
    with pytest.raises(Malformed, match="envelope"):
        unpack(data)


@given(st.binary(max_size=64))
def test_unpack_accepts_envelopes_only(data):
    try:
        payload = unpack(data)
    except Malformed:
        return
    assert pack(payload) == data or data == b""


def test_a_server_name_the_certificate_lacks_names_the_flag(certs):
    server = serve(certs, Echo())
    try:
        kw = dict(server_name="gpu.example.org", retries=5)
        with connect(certs, server.port, **kw) as link:
            with pytest.raises(TlsFailed, match="--server-name NAME"):
                link.call(RoundRequest(0, 0))
        assert issubclass(TlsFailed, ConfigError)  # splitft client: one line, exit 2
    finally:
        server.stop()


# what grpcio 1.85 said, by cause (tests/transport: the real ones above)
HANDSHAKES = {
    "ca": "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:"
    "45909: Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1a00"
    "0064:ECDSA routines:OPENSSL_internal:BAD_SIGNATURE: certificate signature "
    "failure: OK",
    "verify": "failed to connect to all addresses; last error: UNKNOWN: ipv4:1.2.3.4:"
    "1: Ssl handshake failed: SSL_ERROR_SSL: error:1000007d:SSL routines:"
    "OPENSSL_internal:CERTIFICATE_VERIFY_FAILED",
    "name": "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0."
    "1:45909: Custom verification check failed with error: UNAUTHENTICATED: "
    "Hostname Verification Check failed.",
    "plaintext": "failed to connect to all addresses; last error: UNKNOWN: ipv4:127."
    "0.0.1:1: Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:10"
    "00010b:SSL routines:OPENSSL_internal:WRONG_VERSION_NUMBER",
    "down": "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127."
    "0.0.1:1: Connection refused",
    "reset": "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0"
    ".1:1: Ssl handshake failed: SSL_ERROR_SYSCALL: Connection reset by peer",
}


@pytest.mark.parametrize(
    ("cause", "words"),
    [
        ("ca", "--ca"),
        ("verify", "--ca"),
        ("name", "--server-name"),
        ("plaintext", "--insecure"),
        ("down", ""),
        ("reset", ""),  # a passing fault: retried
    ],
)
def test_each_handshake_failure_names_its_flag(cause, words):
    said = tls_failure(HANDSHAKES[cause], "gpu:50051")
    assert (said == "") == (words == "") and words in said


def test_a_status_no_retry_can_mend_ends_the_call_at_once(certs):
    """Only UNAVAILABLE and DEADLINE_EXCEEDED are retried: a server that does
    not serve SplitFT's method answers UNIMPLEMENTED."""
    server = serve(certs, Echo())
    try:
        with connect(certs, server.port, retries=5) as link:
            link._call = link._channel.unary_unary("/not.splitft/Call")
            with pytest.raises(TransportFailed, match="UNIMPLEMENTED"):
                link.call(RoundRequest(0, 0))
    finally:
        server.stop()


class Held(Echo):
    """Holds client 0's calls until released (a flood of long polls)."""

    def __init__(self):
        super().__init__()
        self.release, self.holding = threading.Event(), threading.Semaphore(0)

    def handle(self, msg, peer=None):
        if peer == 0:
            self.holding.release()
            self.release.wait(timeout=60)
        return super().handle(msg, peer)


def test_one_client_cannot_hold_the_servers_workers(certs):
    """Client 0 floods the server with calls that do not return: past
    max_calls_per_client it gets RESOURCE_EXHAUSTED at once, and client 1 is
    still served while client 0's calls hold their workers."""
    handler = Held()
    server = NetworkServer(
        handler,
        "127.0.0.1:0",
        tls=((certs / "server.pem").read_bytes(), (certs / "server.key").read_bytes()),
        token_hashes=load_token_hashes(certs / "tokens.json"),
        max_message_bytes=8 * 2**20,
        workers=6,
        max_calls_per_client=3,
    )
    server.start()
    flood = [connect(certs, server.port, cid=0, timeout_s=60.0) for _ in range(3)]
    replies = []
    threads = [
        threading.Thread(target=lambda t=t: replies.append(t.call(RoundRequest(0, 0))))
        for t in flood
    ]
    try:
        for t in threads:
            t.start()
        for _ in threads:  # all three are inside the handler, holding workers
            assert handler.holding.acquire(timeout=60)
        with connect(certs, server.port, cid=0) as extra:
            over = extra.call(RoundRequest(0, 0))
        assert over.code == "RESOURCE_EXHAUSTED", over
        assert "server.max_calls_per_client=3" in over.error
        with connect(certs, server.port, cid=1) as other:
            assert isinstance(other.call(RoundRequest(1, 0)), RoundPlan)
        handler.release.set()
        for t in threads:
            t.join(timeout=60)
        with connect(certs, server.port, cid=0) as again:  # its calls came back
            assert isinstance(again.call(RoundRequest(0, 0)), RoundPlan)
    finally:
        handler.release.set()
        for t in threads:
            t.join(timeout=60)
        for t in flood:
            t.close()
        server.stop()
    assert len(replies) == 3 and all(isinstance(r, RoundPlan) for r in replies)


def test_health_is_not_serving_until_ready_and_again_when_stopping(certs):
    """grpc.health.v1 on the same port, TLS, no token: NOT_SERVING once the
    port is open, SERVING when the run is ready, NOT_SERVING when it stops,
    then nothing there (UNAVAILABLE)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from splitft.transport.health import channel, health_status

    server = serve(certs, Echo())
    address = f"127.0.0.1:{server.port}"
    ca = (certs / "ca.pem").read_bytes()
    with channel(address, ca) as link:
        assert health_status(link, address) == "NOT_SERVING"
        server.serving(True)
        assert health_status(link, address) == "SERVING"
        overall = health_pb2_grpc.HealthStub(link).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
        assert overall.status == health_pb2.HealthCheckResponse.SERVING
        server.serving(False)
        assert health_status(link, address) == "NOT_SERVING"
    with channel(address, ca, "gpu.example.org") as link:
        with pytest.raises(TlsFailed, match="--server-name"):
            health_status(link, address)
    server.stop(grace=0)
    with channel(address, ca) as link:
        assert health_status(link, address, timeout_s=1.0) == "UNAVAILABLE"


def test_a_client_waits_for_serving_and_gives_up_naming_what_it_heard(certs):
    server = serve(certs, Echo())
    link = connect(certs, server.port)
    threading.Timer(0.3, server.serving, args=(True,)).start()
    link.wait_for_server(30.0, poll_s=0.05)  # returns once SERVING
    server.serving(False)
    link.wait_for_server(1.0, poll_s=0.05, setting_up=True)  # the port is open
    with pytest.raises(ServerUnreachable, match="health check: NOT_SERVING"):
        link.wait_for_server(0.2, poll_s=0.05)
    server.stop(grace=0)
    with pytest.raises(ServerUnreachable, match="health check: UNAVAILABLE"):
        link.wait_for_server(0.2, poll_s=0.05)
    link.close()
