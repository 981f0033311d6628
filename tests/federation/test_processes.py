"""The deployment as real processes on 127.0.0.1: `splitft server` and
`splitft client`s over gRPC with TLS and tokens, on the tiny model. (Each run
that kills a process ends with the simulation's adapter, so a plain run is
not repeated here; in process: tests/federation/test_deployment.py.)"""

import json
import signal
import time

import pytest
from deployed import (
    SETTINGS,
    assert_same,
    client,
    finish,
    free_port,
    make_deployment_assets,
    server,
    simulated,
    splitft,
    splitft_all,
)
from safetensors.torch import load_file
from simrun import base_settings


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_deployment_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    """The simulation's adapter, which every deployed run must end with."""
    return simulated(assets, tmp_path_factory.mktemp("reference"))


def test_a_killed_server_resumes_and_ends_as_if_never_stopped(
    assets, reference, tmp_path
):
    port = free_port()
    # the server dies (SIGKILL, no clean-up) at the second round's 3rd step
    first = server(
        assets, tmp_path, "net", port, env={"SPLITFT_FAULT": "server_step:9"}
    )
    clients = [client(assets, tmp_path, cid, port) for cid in range(3)]
    first.wait(timeout=240)
    assert first.returncode == -signal.SIGKILL
    time.sleep(1.0)  # the clients are retrying
    again = server(assets, tmp_path, "net", port, resume=tmp_path / "net")
    for code, out in finish(again, *clients):
        assert code == 0, out
    deployed = load_file(tmp_path / "net" / "adapter" / "adapter_model.safetensors")
    assert_same(reference, deployed)


def test_plaintext_on_a_public_address_is_refused(assets, tmp_path, capsys):
    from splitft.cli import main

    settings = [*base_settings(assets, tmp_path), "name=open", *SETTINGS]
    code = main(
        [
            "server",
            *settings,
            "--address",
            "0.0.0.0:50999",
            "--insecure",
            "--tokens",
            str(assets / "certs" / "tokens.json"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "--insecure on 0.0.0.0, which is not a loopback address" in err


def test_a_killed_client_that_comes_back_is_counted(assets, reference, tmp_path):
    port = free_port()
    procs = [server(assets, tmp_path, "net", port)]
    procs += [client(assets, tmp_path, cid, port) for cid in (0, 2)]
    # client 1 dies (SIGKILL) after its 3rd step (2 a round: round 2's
    # first); a new process takes its place (in process, a death in round 1
    # and in a later round: tests/federation/test_deployment.py)
    env = {"SPLITFT_FAULT": "step:3"}
    doomed = client(assets, tmp_path, 1, port, env=env)
    doomed.wait(timeout=240)
    assert doomed.returncode == -signal.SIGKILL
    procs.append(client(assets, tmp_path, 1, port))
    for code, out in finish(*procs):
        assert code == 0, out
    rounds = [
        json.loads(line)
        for line in (tmp_path / "net" / "metrics.jsonl").read_text().splitlines()
    ]
    trained = [r for r in rounds if r["type"] == "round" and r["round"] > 0]
    assert [r["counted"] for r in trained] == [[0, 1, 2], [0, 1, 2]]
    # it came back within the round and drew that round's batches again, the
    # new process from where its plan said the old one had got to
    deployed = load_file(tmp_path / "net" / "adapter" / "adapter_model.safetensors")
    assert_same(reference, deployed)


def test_a_live_server_refuses_impostors_and_malformed_tensors_and_carries_on(
    assets, tmp_path
):
    """Over the network a client cannot act for another (its token names
    who it is), and malformed tensors are refused one by one; the server
    then trains on a well-formed step."""
    import grpc
    import torch

    from splitft.split.messages import (
        Gradient,
        RoundPlan,
        RoundRequest,
        SmashedData,
        encode,
    )
    from splitft.transport.network import METHOD, NetworkTransport, pack
    from splitft.transport.security import read_token

    port = free_port()
    proc = server(assets, tmp_path, "net", port)
    certs = assets / "certs"
    token = read_token(certs / "clients" / "client-0.token")
    ca = (certs / "ca.pem").read_bytes()
    kw = dict(ca_cert=ca, retries=8, backoff_s=0.5)
    try:
        with NetworkTransport(f"127.0.0.1:{port}", 0, token, **kw) as link:
            reply = link.call(RoundRequest(1, -1))  # authenticated as 0, acting as 1
            assert reply.code == "PERMISSION_DENIED", reply
            wrong = NetworkTransport(f"127.0.0.1:{port}", 1, token, **kw)
            assert wrong.call(RoundRequest(1, -1)).code == "UNAUTHENTICATED"
            wrong.close()
            plan = link.call(RoundRequest(0, -1))
            while not isinstance(plan, RoundPlan):  # the base model is evaluated
                time.sleep(0.2)
                plan = link.call(RoundRequest(0, -1))

            def step(hidden, t=4):
                ids = torch.arange(t).expand(2, t).clone()
                return SmashedData(0, 0, 0, 1, hidden, None, ids, ids)

            H = 32  # the tiny model's hidden size
            cases = {
                "hidden must be (B, T, 32)": step(torch.zeros(2, 4, H + 1)),
                "non-finite": step(torch.full((2, 4, H), float("nan"))),
                "at most 32": step(torch.zeros(2, 40, H), t=40),
                "dtype torch.int64": step(torch.zeros(2, 4, H, dtype=torch.long)),
            }
            for text, msg in cases.items():
                reply = link.call(msg)
                assert reply.code in ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED")
                assert text in reply.error, reply.error
            creds = grpc.ssl_channel_credentials(ca)
            meta = (("x-splitft-client-id", "0"), ("authorization", f"Bearer {token}"))
            with grpc.secure_channel(f"127.0.0.1:{port}", creds) as channel:
                call = channel.unary_unary(METHOD)
                with pytest.raises(grpc.RpcError) as err:  # truncated bytes
                    call(pack(encode(step(torch.zeros(2, 4, H)))[:-100]), metadata=meta)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            # and the step itself, well formed, is trained on
            assert isinstance(link.call(step(torch.zeros(2, 4, H))), Gradient)
    finally:
        proc.kill()
        proc.wait()


def _server_args(assets, tmp_path, certs, *extra) -> list[str]:
    settings = [*base_settings(assets, tmp_path), "name=bad", *SETTINGS]
    where = ["--address", f"127.0.0.1:{free_port()}", "--certs", str(certs)]
    return ["server", *settings, *where, *extra]


def test_a_server_with_bad_certs_or_tokens_stops_naming_the_file(assets, tmp_path):
    import shutil

    def copy(name):
        folder = tmp_path / name
        shutil.copytree(assets / "certs", folder)
        return folder

    empty = copy("empty")
    (empty / "tokens.json").write_text("{}")
    few = copy("few")
    tokens = json.loads((few / "tokens.json").read_text())
    (few / "tokens.json").write_text(json.dumps({"0": tokens["0"]}))
    other = tmp_path / "other"
    made = splitft("certs", str(other), "--server-name", "x", "--clients", "3")
    assert made.returncode == 0, made.stderr
    mismatched = copy("mismatched")
    shutil.copy(other / "server.key", mismatched / "server.key")
    cases = [
        (empty, "tokens.json: no client tokens in it"),
        (few, "tokens.json: no token for client(s) [1, 2]"),
        (mismatched, "server.key is not the key of"),
    ]
    ends = splitft_all(*(_server_args(assets, tmp_path, c) for c, _ in cases))
    for done, (_, words) in zip(ends, cases, strict=True):
        assert done.returncode == 2, done.stderr
        last = done.stderr.strip().splitlines()[-1]
        assert words in last and "Traceback" not in done.stderr, done.stderr


def test_a_client_refused_for_who_it_is_stops_at_once_naming_the_flag(assets, tmp_path):
    """A wrong token, a token of another id, a CA that did not sign the
    server's certificate, a server name the certificate lacks: `splitft
    client` ends with one line (exit 2) instead of retrying for its 600 s."""
    port = free_port()
    proc = server(assets, tmp_path, "net", port)
    certs = assets / "certs"
    other = tmp_path / "other"
    made = splitft("certs", str(other), "--server-name", "x", "--clients", "3")
    assert made.returncode == 0, made.stderr
    common = [
        *base_settings(assets, tmp_path),
        *SETTINGS,
        "--server",
        f"127.0.0.1:{port}",
    ]

    def run(cid, token, ca, *extra):
        return [
            "client",
            *common,
            "--client-id",
            str(cid),
            "--token-file",
            str(token),
            "--ca",
            str(ca),
            *extra,
        ]

    token = certs / "clients" / "client-0.token"
    cases = [
        (
            run(0, other / "clients" / "client-0.token", certs / "ca.pem"),
            "--token-file",
        ),
        (run(1, token, certs / "ca.pem"), "--token-file"),
        (run(0, token, other / "ca.pem"), "not signed by --ca"),
        (
            run(0, token, certs / "ca.pem", "--server-name", "gpu.example.org"),
            "--server-name",
        ),
    ]
    try:
        ends = splitft_all(*(args for args, _ in cases))
        for done, (_, words) in zip(ends, cases, strict=True):
            assert done.returncode == 2, done.stderr
            last = done.stderr.strip().splitlines()[-1]
            assert words in last and "Traceback" not in done.stderr, done.stderr
    finally:
        proc.kill()
        proc.wait()
