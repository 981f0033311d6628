"""A deployed server and its clients stop on SIGTERM or Ctrl-C at any instant,
within seconds, and the run resumes as if never stopped (issue 25).

Real processes on 127.0.0.1 (`splitft server`, `splitft client`, TLS), the
tiny model; the fault points (``SPLITFT_FAULT=point:n:SIGNAL``) signal a
process at an exact instant and print when. Each test prints the seconds
from the signal to the exit (``SPLITFT_STOP_TIMES=FILE`` keeps them). The
10 s bound is the issue's: a process manager's grace period is a deadline
(Kubernetes waits 30 s, then SIGKILL), and before this issue a signalled
server never exited at all.
"""

import signal
import time

import pytest
from deployed import (
    Watched,
    assert_same,
    client,
    finish,
    free_port,
    make_deployment_assets,
    record_stop,
    server,
    signalled_at,
    simulated,
    splitft,
)
from safetensors.torch import load_file

from splitft import runs

GRACE_S = 10.0


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_deployment_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    """The adapter of the run every stopped-and-resumed one must end with."""
    return simulated(assets, tmp_path_factory.mktemp("reference"))


def health(assets, port: int) -> str:
    """What the server's health check says (UNAVAILABLE: no server there)."""
    from splitft.transport.health import channel, health_status

    ca = (assets / "certs" / "ca.pem").read_bytes()
    with channel(f"127.0.0.1:{port}", ca) as link:
        return health_status(link, f"127.0.0.1:{port}", timeout_s=2.0)


def wait_serving(assets, port: int, timeout: float = 120.0) -> None:
    until = time.monotonic() + timeout
    while health(assets, port) != "SERVING":
        assert time.monotonic() < until, "the server never said SERVING"
        time.sleep(0.1)


def adapter(run_dir):
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


# (instant, fault point, signal); no fault point: the test sends the signal
# The instants only a deployed server has (waiting, a long poll, a step a
# client asked for); a signal in the coordinator's own (aggregation,
# evaluation, checkpoint, export), and SIGINT rather than SIGTERM, take the
# path the simulation's command takes (Coordinator.run), which
# tests/test_runs.py signals at those points (kept out of here for CI's
# time: 45 s a case)
SERVER_STOPS = [
    ("waiting-for-clients", None, "SIGTERM"),
    ("long-poll", "poll:3", "SIGTERM"),
    ("server-step", "server_step:5", "SIGTERM"),
]


def health_until_it_ends(assets, port: int, proc) -> list[str]:
    """The health check's answers, each change once, until ``proc`` ends."""
    seen: list[str] = []
    while proc.poll() is None:
        status = health(assets, port)
        if not seen or seen[-1] != status:
            seen.append(status)
        time.sleep(0.05)
    return seen


def health_cli(assets, port: int):
    """`splitft health` against 127.0.0.1:``port``."""
    return splitft(
        "health",
        "--server",
        f"127.0.0.1:{port}",
        "--ca",
        str(assets / "certs" / "ca.pem"),
    )


@pytest.mark.parametrize(
    "what, point, sig", SERVER_STOPS, ids=[f"{w}-{s}" for w, _, s in SERVER_STOPS]
)
def test_a_signalled_server_stops_in_seconds_and_resumes_as_if_never_stopped(
    assets, reference, tmp_path, what, point, sig
):
    port = free_port()
    env = {"SPLITFT_FAULT": f"{point}:{sig}"} if point else None
    first = Watched(server(assets, tmp_path, "net", port, env=env))
    clients = []
    if point is None:  # serving, and no client has come
        wait_serving(assets, port)
        done = health_cli(assets, port)  # exits 0 only while SERVING
        assert done.returncode == 0 and "SERVING" in done.stdout, done.stderr
        sent = time.time()
        first.proc.send_signal(signal.Signals[sig])
    else:
        clients = [client(assets, tmp_path, cid, port) for cid in range(3)]
    code, out, ended = first.end()
    took = ended - (sent if point is None else signalled_at(out))
    record_stop(f"server {what}", sig, took)
    assert code == 128 + signal.Signals[sig], out[-3000:]  # 143, 130
    assert took < GRACE_S
    run_dir = tmp_path / "net"
    assert f"splitft: interrupted ({sig});" in out and "Traceback" not in out, out
    status = runs.read_status(run_dir)
    assert status["state"] == "interrupted" and not (run_dir / "lock").exists()
    # the clients heard why and wait for it; the resumed server takes them back
    again = server(assets, tmp_path, "net", port, resume=run_dir)
    if point is None:
        # health while a run runs: NOT_SERVING (setting up) -> SERVING ->
        # NOT_SERVING (stopping) -> the port closes
        wait_serving(assets, port)  # the clients wait for it as well
        clients = [client(assets, tmp_path, cid, port) for cid in range(3)]
        seen = health_until_it_ends(assets, port, again)
        assert seen[-2:] == ["NOT_SERVING", "UNAVAILABLE"], seen
        assert seen[0] == "SERVING" and "SERVING" not in seen[1:], seen
        gone = health_cli(assets, port)
        assert gone.returncode == 1 and "UNAVAILABLE" in gone.stdout
    ends = finish(again, *clients)
    for code, out in ends:
        assert code == 0, out[-3000:]
    if point is not None:
        heard = [out for _, out in ends[1:] if "the server was interrupted" in out]
        assert heard, ends[1][1][-3000:]
    assert runs.read_status(run_dir)["state"] == "complete"
    assert_same(reference, adapter(run_dir))


def test_a_second_ctrl_c_exits_at_once(assets, tmp_path):
    port = free_port()
    env = {"SPLITFT_FAULT": "server_step:5:SIGINT"}
    first = Watched(server(assets, tmp_path, "net", port, env=env))
    clients = [client(assets, tmp_path, cid, port) for cid in range(3)]
    try:
        first.wait_for("splitft-fault: SIGINT")
        time.sleep(0.2)  # it is telling its clients, then closing the port (2 s)
        sent = time.time()
        first.proc.send_signal(signal.SIGINT)
        code, out, ended = first.end()
        record_stop("server second-ctrl-c", "SIGINT", ended - sent)
        assert code == 130, out[-3000:]
        assert "splitft: second interrupt (SIGINT); exiting now" in out
    finally:
        for p in clients:
            p.kill()
            p.wait()


# (instant, signal); the client signalled is client 1 (step) or client 0
# SIGINT takes SIGTERM's path (interrupts.py; the server's SIGINT: test_runs)
CLIENT_STOPS = [("step", "SIGTERM"), ("long-poll", "SIGTERM")]


@pytest.mark.parametrize(
    "what, sig", CLIENT_STOPS, ids=[f"{w}-{s}" for w, s in CLIENT_STOPS]
)
def test_a_signalled_client_stops_in_seconds_and_a_new_one_rejoins(
    assets, reference, tmp_path, what, sig
):
    port = free_port()
    procs = [server(assets, tmp_path, "net", port)]
    if what == "step":  # client 1, in its 3rd step (round 2's first)
        procs += [client(assets, tmp_path, cid, port) for cid in (0, 2)]
        doomed = Watched(
            client(assets, tmp_path, 1, port, env={"SPLITFT_FAULT": f"step:3:{sig}"})
        )
        cid = 1
    else:  # client 0 has trained round 1 and waits in a long poll for round 2,
        # which cannot open before client 2 (not started yet) has trained round 1
        doomed = Watched(client(assets, tmp_path, 0, port))
        procs.append(client(assets, tmp_path, 1, port))
        doomed.wait_for("client 0: trained a round")
        time.sleep(0.5)
        sent = time.time()
        doomed.proc.send_signal(signal.Signals[sig])
        cid = 0
    code, out, ended = doomed.end()
    took = ended - (signalled_at(out) if what == "step" else sent)
    record_stop(f"client {what}", sig, took)
    assert code == 128 + signal.Signals[sig], out[-3000:]
    assert took < GRACE_S
    assert f"splitft: client {cid} interrupted ({sig})" in out, out[-3000:]
    assert "Traceback" not in out, out
    procs.append(client(assets, tmp_path, cid, port))  # started again: rejoins
    if what == "long-poll":
        procs.append(client(assets, tmp_path, 2, port))
    for code, out in finish(*procs):
        assert code == 0, out[-3000:]
    assert_same(reference, adapter(tmp_path / "net"))
