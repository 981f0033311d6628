"""The deployment's round coordination, without sockets: NetworkRounds with
clients in threads calling it through the codec, as the gRPC server would
(tests/transport has the network itself; tests/integration the processes)."""

import threading
import time
from collections import defaultdict

import pytest
import torch
from safetensors.torch import load_file
from simrun import TIMING_FREE, config, make_assets, rounded
from tracked import tensorboard

from splitft.federation.coordinator import Coordinator
from splitft.federation.deployment import NetworkRounds
from splitft.federation.remote import build_client, run_client
from splitft.federation.simulation import Simulation
from splitft.split.messages import SmashedData, decode, encode
from splitft.transport import Traffic


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"))


class Loopback:
    """The network server's stand-in: requests decoded and handled in process,
    with the authenticated peer, bytes counted per client."""

    def __init__(self, handler):
        self.handler = handler
        self.traffic = defaultdict(Traffic)

    def serving(self, up):
        self.up = up

    def stop(self, grace=None):
        pass


class LoopbackTransport:
    """``drop_after`` calls (or at the ``drop_at``-th activations sent) the
    client's process dies."""

    def __init__(self, loop, cid, drop_after=None, drop_at=None):
        self.loop, self.cid, self.traffic = loop, cid, Traffic()
        self.calls, self.drop_after = 0, drop_after
        self.smashed, self.drop_at = 0, drop_at

    def call(self, msg):
        self.calls += 1
        self.smashed += isinstance(msg, SmashedData)
        if self.drop_after is not None and self.calls > self.drop_after:
            raise SystemExit
        if self.drop_at is not None and self.smashed == self.drop_at:
            raise SystemExit
        data = encode(msg)
        self.loop.traffic[self.cid].record("up", msg.kind, len(data))
        self.traffic.record("up", msg.kind, len(data))
        request, handler = decode(data), self.loop.handler
        # as the network server does: the model's work on the coordinator's thread
        reply = handler.run(
            request, lambda: handler.handle(request, peer=self.cid), self.cid
        )
        data = encode(reply)
        self.loop.traffic[self.cid].record("down", reply.kind, len(data))
        self.traffic.record("down", reply.kind, len(data))
        return decode(data)


def deploy(
    cfg,
    drop=None,
    timeout_s=None,
    restart=(),
    drop_at=None,
    memory=None,
    errors=None,
    give_up_s=600.0,
):
    """Run ``cfg`` as a deployment: the coordinator here, each client in a
    thread; ``drop[cid]`` kills that client after so many calls (``drop_at``:
    as it sends that many activations), and a client in ``restart`` then
    starts again (a new process: its model and data order afresh).
    ``memory[cid](coordinator)`` is the memory a client declares; a client's
    exception goes to ``errors[cid]``; a client gives up on a server away
    for ``give_up_s``."""
    drop, drop_at, memory = drop or {}, drop_at or {}, memory or {}
    loop = {}

    def serve(handler):
        loop["server"] = Loopback(handler)
        return loop["server"]

    fed = cfg.federation
    rounds = NetworkRounds(
        serve,
        timeout_s or fed.round_timeout_s,
        fed.min_clients,
        fed.round_retries,
        poll_s=0.01,
    )
    coordinator = Coordinator(cfg, rounds)
    threads = []
    started = threading.Event()

    def client(cid):
        started.wait()
        c, _ = build_client(cfg, cid)
        transport = LoopbackTransport(
            loop["server"], cid, drop.get(cid), drop_at.get(cid)
        )
        declared = int(memory[cid](coordinator)) if cid in memory else 0
        try:
            run_client(
                c, transport, retry_s=0.01, give_up_s=give_up_s, memory_bytes=declared
            )
        except Exception as e:  # noqa: BLE001 - the test looks at it
            if errors is None:
                raise
            errors[cid] = e
        except SystemExit:
            if cid in restart:
                c, _ = build_client(cfg, cid)
                run_client(c, LoopbackTransport(loop["server"], cid), retry_s=0.01)

    for cid in range(fed.num_clients):
        threads.append(threading.Thread(target=client, args=(cid,), daemon=True))
        threads[-1].start()
    original = rounds.setup

    def setup(c):
        lengths = original(c)
        started.set()
        return lengths

    rounds.setup = setup
    summary = coordinator.run(table=False)
    for t in threads:
        t.join(timeout=30)
    return coordinator, summary


def settings(*extra):
    return [
        "federation.num_clients=3",
        "federation.rounds=2",
        "federation.cut_layers=[1, 2, 3]",
        *extra,
    ]


def test_a_deployment_trains_the_simulations_adapter(assets, tmp_path):
    sim = Simulation(config(assets, tmp_path, "name=sim", *settings()))
    simulated = sim.run(table=False)
    dep_cfg = config(assets, tmp_path, "name=dep", "log.to=[tensorboard]", *settings())
    dep, summary = deploy(dep_cfg)
    a = load_file(tmp_path / "sim" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "dep" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    for x, y in zip(sim.rounds, dep.rounds, strict=True):
        assert x["eval_loss"] == pytest.approx(y["eval_loss"], rel=1e-5)
        if x["round"] > 0:
            assert x["counted"] == y["counted"] == [0, 1, 2]
            assert x["train_tokens"] == y["train_tokens"]
            same = set(x) - TIMING_FREE - {"sim_round_s", "sim_time_s", "timing"}
            same -= {"predicted_round_s", "prediction_error", "memory_mb"}
            same -= {k for k in x if k.startswith(("up_", "down_", "bytes_"))}
            assert rounded({k: x[k] for k in same}, 5) == rounded(
                {k: y[k] for k in same}, 5
            )
    # bytes: the same messages, counted at the transport (plus Join and polls)
    assert summary["bytes"]["up_smashed"] == simulated["bytes"]["up_smashed"]
    # the deployed server logs its rounds to the trackers as a simulation does
    board = tensorboard(dep_cfg.run_dir)
    assert [step for step, _, _ in board["eval/loss"]] == [0, 1, 2]
    for (_, value, _), record in zip(board["eval/loss"], dep.rounds, strict=True):
        assert value == pytest.approx(record["eval_loss"], rel=1e-6)
    assert [step for step, _, _ in board["comm/bytes_up"]] == [1, 2]


@pytest.mark.parametrize("side", ["per_client", "shared"])
def test_a_batching_deployment_trains_as_the_serial_one(assets, tmp_path, side):
    """The coordinator's thread runs the micro-batches waiting for it as one
    batch: per-client adapters learn exactly what the serial server learns; a
    shared one steps once per batch (docs/server.md) and still learns."""
    base = settings(f"federation.server_side={side}")
    _, serial = deploy(config(assets, tmp_path, f"name=s-{side}", *base))
    dep, batched = deploy(
        config(
            assets,
            tmp_path,
            f"name=b-{side}",
            *base,
            "server.batching=true",
            "server.batch_window_ms=20",
        )
    )
    a = load_file(tmp_path / f"s-{side}" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / f"b-{side}" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    if side == "per_client":  # to fp32 rounding, which AdamW can enlarge
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    else:
        assert any(not torch.equal(a[k], b[k]) for k in a)  # other updates
        assert all(torch.isfinite(t).all() for t in b.values())
    assert batched["bytes"]["up_smashed"] == serial["bytes"]["up_smashed"]
    rounds = [r for r in dep.rounds if r["round"] > 0]
    assert len(rounds) == 2 and all(r["counted"] == [0, 1, 2] for r in rounds)


def test_a_client_that_dies_is_left_out_and_the_run_finishes(assets, tmp_path):
    cfg = config(assets, tmp_path, "name=drop", *settings("federation.min_clients=2"))
    dep, _ = deploy(cfg, drop={2: 3}, timeout_s=3.0)  # dies in its first round
    trained = [r for r in dep.rounds if r["round"] > 0]
    assert [r["counted"] for r in trained] == [[0, 1], [0, 1]]
    assert all(r["failed"] == [2] for r in trained)
    assert (tmp_path / "drop" / "adapter" / "adapter_model.safetensors").is_file()


def test_too_few_clients_stop_the_run_with_a_clear_error(assets, tmp_path):
    from splitft.federation.deployment import RoundFailed

    cfg = config(
        assets,
        tmp_path,
        "name=few",
        *settings("federation.min_clients=3", "federation.round_retries=1"),
    )
    with pytest.raises(RoundFailed, match="federation.min_clients=3"):
        deploy(cfg, drop={2: 1}, timeout_s=1.0)


def test_a_client_killed_mid_round_rejoins(assets, tmp_path):
    cfg = config(assets, tmp_path, "name=back", *settings())
    dep, _ = deploy(cfg, drop={1: 3}, restart={1}, timeout_s=60.0)
    trained = [r for r in dep.rounds if r["round"] > 0]
    # it died after its plan and first step, came back within the round, and
    # the round counted its second attempt
    assert [r["counted"] for r in trained] == [[0, 1, 2], [0, 1, 2]]
    assert all(r["failed"] == [] for r in trained)


def test_a_client_restarted_in_a_later_round_draws_the_simulations_batches(
    assets, tmp_path
):
    sim = Simulation(config(assets, tmp_path, "name=sim", *settings()))
    sim.run(table=False)
    cfg = config(assets, tmp_path, "name=later", *settings())
    # client 1 dies as it sends round 2's first activations (2 steps a round);
    # the new process is told by its plan how many batches it drew before
    deploy(cfg, drop_at={1: 3}, restart={1}, timeout_s=60.0)
    a = load_file(tmp_path / "sim" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "later" / "adapter" / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def _memory_for(k):
    def need(coordinator):
        while getattr(coordinator, "strategy", None) is None:  # still setting up
            time.sleep(0.01)
        return coordinator.strategy.estimator.world.memory(0, k)

    return need


def test_the_planner_keeps_a_client_within_the_memory_it_declared(assets, tmp_path):
    cfg = config(assets, tmp_path, "name=mem", *settings("federation.policy=adaptive"))
    # client 0 (a workstation in sim.mix) says it can hold one block, not two
    between = _memory_for(1)
    dep, _ = deploy(cfg, memory={0: lambda c: between(c) + 1})
    world = dep.strategy.estimator.world
    assert world.devices[0].memory == int(between(dep)) + 1
    assert world.deepest_fit(0, 3) == 1
    trained = [r for r in dep.rounds if r["round"] > 0]
    assert [r["cuts"]["0"] for r in trained] == [1, 1]


def test_a_client_whose_join_the_server_lost_joins_again(assets, tmp_path, monkeypatch):
    """A server restarted before its first checkpoint holds no Join: a
    client's upload is refused (it has not joined this run), and the client
    joins again and trains the round, as if nothing had happened."""
    from splitft.split.server import SplitServer

    end_round = SplitServer.end_round

    def forgetting(self, new):
        who = end_round(self, new)
        self.declared.pop(0, None)  # as a server restarted now would have
        return who

    monkeypatch.setattr(SplitServer, "end_round", forgetting)
    dep, _ = deploy(config(assets, tmp_path, "name=lost", *settings()))
    trained = [r for r in dep.rounds if r["round"] > 0]
    assert [r["counted"] for r in trained] == [[0, 1, 2], [0, 1, 2]]


def test_a_client_that_declares_too_little_memory_is_refused(assets, tmp_path):
    from splitft.federation.remote import JoinRefused

    cfg = config(assets, tmp_path, "name=small", *settings())
    errors = {}
    deploy(
        cfg,
        memory={2: lambda c: _memory_for(1)(c) / 2},
        errors=errors,
        timeout_s=1.0,
    )
    assert isinstance(errors[2], JoinRefused)
    assert "--memory-mb" in str(errors[2]) and "federation.k_min=1" in str(errors[2])


def test_a_client_trains_on_its_own_file(assets, tmp_path):
    own = tmp_path / "mine.jsonl"
    own.write_text(
        "".join(f'{{"instruction": "Say {i}.", "output": "{i}"}}\n' for i in range(9))
    )
    cfg = config(assets, tmp_path, "name=own", *settings())
    client, _ = build_client(cfg, 2, data=own)
    assert client.client_id == 2
    assert client.num_samples == 9  # all of it: the server holds the eval set


def test_a_u_shaped_deployment_trains_the_simulations_adapter(assets, tmp_path):
    """The extra leg runs over the transport as in the simulation: the same
    adapter, and no labels in any message (the server refuses them)."""
    u = settings(
        "federation.topology=u_shaped",
        "federation.tail_layers=1",
        "federation.cut_layers=[1, 2, 2]",
    )
    sim = Simulation(config(assets, tmp_path, "name=usim", *u))
    simulated = sim.run(table=False)
    dep, summary = deploy(config(assets, tmp_path, "name=udep", *u))
    a = load_file(tmp_path / "usim" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "udep" / "adapter" / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    for x, y in zip(sim.rounds[1:], dep.rounds[1:], strict=True):
        assert x["counted"] == y["counted"] == [0, 1, 2]
        assert x["eval_loss"] == pytest.approx(y["eval_loss"], rel=1e-5)
    for key in ("up_smashed", "down_smashed", "up_gradients", "down_gradients"):
        assert summary["bytes"][key] == simulated["bytes"][key] > 0, key


def test_an_interrupt_in_a_server_step_stops_the_run_and_tells_the_clients(
    assets, tmp_path, monkeypatch
):
    """SIGTERM while the coordinator's thread runs a client's micro-batch: the
    interrupt is not that request's error; it stops the run (status
    interrupted), and every client hears why and waits for the server."""
    import signal

    from splitft import runs
    from splitft.interrupts import Interrupted
    from splitft.split.server import SplitServer

    steps = []
    original = SplitServer.handle

    def handle(self, msg, peer=None):
        if isinstance(msg, SmashedData):
            steps.append(msg.client_id)
            if len(steps) == 3:  # as the signal handler raises it, mid-step
                raise Interrupted(signal.SIGTERM)
        return original(self, msg, peer)

    monkeypatch.setattr(SplitServer, "handle", handle)
    cfg = config(assets, tmp_path, "name=stop", *settings())
    errors = {}
    with pytest.raises(Interrupted):
        deploy(cfg, errors=errors, give_up_s=0.5)
    assert runs.read_status(tmp_path / "stop")["state"] == "interrupted"
    until = time.monotonic() + 60
    while len(errors) < 3 and time.monotonic() < until:  # they wait 0.5 s
        time.sleep(0.05)
    assert sorted(errors) == [0, 1, 2]
    for e in errors.values():
        assert "the server was interrupted (SIGTERM)" in str(e), e


@pytest.mark.parametrize(
    "extra",
    [
        ("client.base_dtype=nf4", "client.checkpointing=blocks"),
        (  # the client's tail is quantized too
            "client.base_dtype=int8",
            "federation.topology=u_shaped",
            "federation.tail_layers=1",
            "federation.cut_layers=[1, 2, 2]",
        ),
    ],
    ids=["nf4", "int8-u-shaped"],
)
def test_deployed_quantized_clients_train_the_simulations_adapter(
    assets, tmp_path, extra
):
    """client.base_dtype: a deployed client quantizes its own blocks at load
    (its own store, not the server's) and trains what the simulation does
    (a float32 client would not: it computes in another precision)."""
    sim = Simulation(config(assets, tmp_path, "name=qsim", *settings(*extra)))
    sim.run(table=False)
    cfg = config(assets, tmp_path, "name=qdep", *settings(*extra))
    client, _ = build_client(cfg, 0)
    assert client.store.base == cfg.client.base_dtype != "float32"
    deploy(cfg)
    a = load_file(tmp_path / "qsim" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "qdep" / "adapter" / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
