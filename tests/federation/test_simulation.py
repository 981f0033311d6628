"""The whole simulation on a tiny model and a local data file."""

import dataclasses
import json

import peft
import pytest
import synthetic
import torch
from simrun import TIMING_FREE, config, make_assets, rounded, run
from transformers import AutoModelForCausalLM

from splitft.config import ConfigError
from splitft.federation.simulation import Simulation
from splitft.split.client import ServerRefused


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("sim"))


def test_adaptive_run_plans_cuts_within_budgets_and_exports_peft(assets, tmp_path):
    cfg = config(
        assets,
        tmp_path,
        "name=adaptive",
        "federation.policy=adaptive",
        "sim.profiles={phone: {memory_mb: 140}}",  # the phone holds one block
    )
    sim, summary = run(cfg, synthetic.costs(num_layers=4))
    trained = [r for r in summary["rounds"] if r["round"] > 0]
    assert [r["round"] for r in trained] == [1, 2, 3]
    for r in trained:
        assert set(r["cuts"]) == {"0", "1", "2", "3"}
        assert all(1 <= k <= 3 for k in r["cuts"].values())
        assert r["cuts"]["3"] == 1 and not r["over_budget"]
        assert r["sim_round_s"] > 0 and r["predicted_round_s"] > 0
        assert r["up_smashed"] > 0 and r["down_adapters"] > 0
    times = [r["sim_time_s"] for r in trained]
    assert times == sorted(times) and summary["sim_time_s"] == times[-1]
    assert trained[0]["replan"] == "first plan"
    assert (tmp_path / "adapter" / "costs.json").exists() is False
    assert (sim.run_dir / "costs.json").exists()
    base = AutoModelForCausalLM.from_pretrained(assets / "model")
    peft.PeftModel.from_pretrained(base, sim.run_dir / "adapter")


@pytest.mark.parametrize("side", ["per_client", "shared"])
def test_predicted_timing_makes_runs_repeat_exactly(assets, tmp_path, side):
    common = ("federation.policy=adaptive", "sim.timing=predicted")
    records = []
    for name in ("a", "b"):
        cfg = config(
            assets,
            tmp_path,
            f"name={name}",
            f"federation.server_side={side}",
            *common,
        )
        _, summary = run(cfg, synthetic.costs(num_layers=4))
        records.append(
            [
                rounded({k: v for k, v in r.items() if k not in TIMING_FREE})
                for r in summary["rounds"]
            ]
        )
    for a, b in zip(*records, strict=True):
        assert a == b, {k: (a[k], b.get(k)) for k in a if a[k] != b.get(k)}


def test_a_client_that_slows_down_is_replanned(assets, tmp_path):
    cfg = config(
        assets,
        tmp_path,
        "name=slowed",
        "federation.policy=adaptive",
        "sim.timing=predicted",
        "sim.mix=[laptop]",
        "sim.server_speed=0.5",  # a slow server: deep cuts pay
        "planner.replan_every=0",
        "sim.changes=[{round: 1, client: 0, slowdown: 40}]",
        "federation.rounds=3",
    )
    # tiny batches: make compute, not the network, what the cut changes
    _, summary = run(cfg, synthetic.costs(num_layers=4, block_s=1e-2))
    r1, r2, r3 = (r for r in summary["rounds"] if r["round"] > 0)
    assert r1["cuts"]["0"] == 3
    assert r2["replan"] == "" and r2["cuts"] == r1["cuts"]  # not known yet
    assert r2["prediction_error"] > 0.2
    assert "client 0 took" in r3["replan"]
    assert r3["cuts"]["0"] < r1["cuts"]["0"]


def test_fixed_cuts_over_a_budget_are_reported(assets, tmp_path):
    cfg = config(
        assets,
        tmp_path,
        "name=fixed",
        "federation.cut_layers=[3]",
        "sim.profiles={phone: {memory_mb: 140}}",
        "federation.rounds=1",
    )
    _, summary = run(cfg, synthetic.costs(num_layers=4))
    assert summary["rounds"][1]["over_budget"] == [3]


def test_a_failing_client_does_not_stop_the_round(assets, tmp_path):
    cfg = config(assets, tmp_path, "name=failing", "federation.rounds=1")
    sim = Simulation(cfg, synthetic.costs(num_layers=4))
    sim.setup()

    def refuse(*args, **kwargs):
        raise ServerRefused("client 2 lost its data")
        yield  # a protocol step that never gets to send anything

    sim.clients[2]._step = refuse
    sim.train()
    record = sim.rounds[1]
    assert record["failed"] == [2] and record["counted"] == [0, 1, 3]
    assert record["timing"]["2"]["failed"] == "client 2 lost its data"


def test_local_clients_and_centralized_run(assets, tmp_path):
    """k = L for everyone is FedAvg: no activations leave the clients."""
    cfg = config(
        assets,
        tmp_path,
        "name=fedavg",
        "federation.cut_layers=[4]",
        "federation.rounds=1",
    )
    _, summary = run(cfg, synthetic.costs(num_layers=4))
    r = summary["rounds"][1]
    assert "up_smashed" not in r and r["up_adapters"] > 0
    assert r["eval_loss"] < summary["rounds"][0]["eval_loss"]


def test_measured_timing_keeps_the_shared_adapters_update_order(assets, tmp_path):
    """The default clock runs in the modelled order: learning repeats exactly,
    even with a shared server-side adapter; only the simulated times vary."""
    losses, times = [], []
    for name in ("a", "b"):
        cfg = config(
            assets,
            tmp_path,
            f"name={name}",
            "federation.server_side=shared",
            "sim.timing=measured",
        )
        _, summary = run(cfg, synthetic.costs(num_layers=4))
        trained = [r for r in summary["rounds"] if r["round"] > 0]
        losses.append(rounded([(r["train_loss"], r["eval_loss"]) for r in trained]))
        times.append([r["sim_round_s"] for r in trained])
    assert losses[0] == losses[1]
    assert all(t > 0 for t in times[0] + times[1])


@pytest.mark.parametrize("policy", ["adaptive", "splitft", "random"])
def test_partial_participation(assets, tmp_path, policy):
    cfg = config(
        assets,
        tmp_path,
        f"name=partial-{policy}",
        f"federation.policy={policy}",
        "federation.clients_per_round=2",
        "sim.timing=predicted",
        "federation.rounds=3",
    )
    _, summary = run(cfg, synthetic.costs(num_layers=4))
    trained = [r for r in summary["rounds"] if r["round"] > 0]
    for r in trained:
        assert len(r["cuts"]) == 2 and r["counted"] == r["clients"]
    sets = [tuple(r["clients"]) for r in trained]
    if policy == "adaptive":
        changed = [
            r["replan"]
            for a, b, r in zip(sets, sets[1:], trained[1:], strict=False)
            if a != b
        ]
        assert changed and all(changed)  # a new set of clients is re-planned


def test_a_round_where_every_client_fails(assets, tmp_path):
    cfg = config(assets, tmp_path, "name=allfail", "federation.rounds=2")
    sim = Simulation(cfg, synthetic.costs(num_layers=4))
    sim.setup()
    real = {cid: c._step for cid, c in sim.clients.items()}

    def refuse(*args, **kwargs):
        raise ServerRefused("no network")
        yield

    for c in sim.clients.values():
        c._step = refuse
    sim.train(stop=lambda record: True)  # one round
    record = sim.rounds[1]
    assert record["failed"] == [0, 1, 2, 3] and record["counted"] == []
    assert record["train_loss"] is None and sim.server.drift == {}
    for cid, c in sim.clients.items():  # they come back
        c._step = real[cid]
    planned = sim.strategy.configure_round(1, sim_devices(sim, 1))
    result = sim.run_round(planned, sim_devices(sim, 1))
    assert not any(t.failed for t in result.timing.clients.values())


def sim_devices(sim, rnd):
    from splitft.sim.profiles import devices_at

    return devices_at(sim.cfg.sim, sim.cfg.federation.num_clients, rnd)


def test_a_shrinking_memory_budget_moves_the_cut_at_once(assets, tmp_path):
    cfg = config(
        assets,
        tmp_path,
        "name=shrink",
        "federation.policy=adaptive",
        "sim.timing=predicted",
        "sim.mix=[workstation]",
        "sim.server_speed=0.5",
        "planner.replan_every=0",
        "planner.replan_miss=0",
        "sim.changes=[{round: 2, client: 0, memory_mb: 140}]",
        "federation.rounds=3",
    )
    _, summary = run(cfg, synthetic.costs(num_layers=4, block_s=1e-2))
    r1, r2, r3 = (r for r in summary["rounds"] if r["round"] > 0)
    assert r1["cuts"]["0"] > 1 and r2["cuts"] == r1["cuts"]
    assert r3["replan"] == "cut no longer fits the memory of clients [0]"
    assert r3["cuts"]["0"] == 1 and not r3["over_budget"]


def same_length_data(tmp_path):
    """Questions whose rows all tokenise to one length."""
    same = tmp_path / "same.jsonl"
    same.write_text(
        "".join(
            json.dumps({"instruction": f"What is {a} plus {b}?", "output": str(a + b)})
            + "\n"
            for a in range(1, 5)
            for b in range(1, 5)
        )
    )
    return same


def test_prediction_matches_when_the_model_is_the_clock(tmp_path, assets):
    """Predicted timing, declared beliefs, rows of one length: the planner's
    prediction is the round's time up to message headers the linear byte model
    does not follow exactly."""
    same = same_length_data(tmp_path)
    cfg = config(
        assets,
        tmp_path,
        "name=exact",
        f"data.source={same}",
        "data.eval_size=4",
        "partition.min_partition_size=2",
        "sim.timing=predicted",
        "federation.cut_layers=[1, 2, 3, 4]",
        "federation.rounds=2",
    )
    _, summary = run(cfg)  # the tiny model's own probe: its real message sizes
    for r in summary["rounds"][1:]:
        assert r["prediction_error"] < 0.02


def test_cost_model_reuse_and_the_live_clock(assets, tmp_path):
    first = config(assets, tmp_path, "name=first", "federation.rounds=1")
    sim, _ = run(first)  # probes the tiny model
    again = config(
        assets,
        tmp_path,
        "name=again",
        "federation.rounds=1",
        "sim.timing=live",
        f"sim.cost_model={sim.run_dir / 'costs.json'}",
    )
    sim2, summary = run(again)
    assert sim2.costs == sim.costs
    assert summary["rounds"][1]["sim_round_s"] > 0
    # its client memory and time are float32 clients': not an nf4 run's
    nf4 = config(
        assets,
        tmp_path,
        "name=nf4",
        "client.base_dtype=nf4",
        f"sim.cost_model={sim.run_dir / 'costs.json'}",
    )
    with pytest.raises(ConfigError, match="base_dtype='float32', this run's is 'nf4'"):
        run(nf4)


def test_settings_the_model_or_machine_cannot_meet_stop_before_loading(
    assets, tmp_path
):
    long = config(assets, tmp_path, "data.max_length=100000")
    with pytest.raises(ConfigError, match=r"data.max_length=100000 .* at most \d+"):
        Simulation(long).setup()
    if not torch.cuda.is_available():
        gpu = config(assets, tmp_path, "model.device=cuda")
        with pytest.raises(ConfigError, match="model.device='cuda' is not allowed"):
            Simulation(gpu).setup()
    assert not (tmp_path / "default").exists()  # nothing written


def test_adaptive_may_give_clients_the_whole_model(assets, tmp_path):
    """With k_max = L a client that can hold the model trains it alone when
    that shortens the round; it is re-cut into a split client when it slows."""
    cfg = config(
        assets,
        tmp_path,
        "name=whole",
        "federation.policy=adaptive",
        "federation.k_max=4",
        "sim.timing=predicted",
        "sim.mix=[laptop]",
        "sim.server_speed=0.25",  # a slow server: clients that need none pay
        "planner.replan_every=0",
        "sim.changes=[{round: 1, client: 0, slowdown: 40}]",
        "federation.rounds=3",
    )
    sim, summary = run(cfg, synthetic.costs(num_layers=4, block_s=1e-2))
    r1, r2, r3 = (r for r in summary["rounds"] if r["round"] > 0)
    assert r1["cuts"]["0"] == 4 and 4 in r2["cuts"].values()
    assert r1["timing"]["0"]["served_s"] == 0  # it needs no server time
    assert "client 0 took" in r3["replan"]
    assert r3["cuts"]["0"] < 4 and r3["timing"]["0"]["served_s"] > 0
    assert r3["eval_loss"] < summary["rounds"][0]["eval_loss"]
    base = AutoModelForCausalLM.from_pretrained(assets / "model")
    peft.PeftModel.from_pretrained(base, sim.run_dir / "adapter")


def test_compression_settings_reach_the_clients_and_the_server(assets, tmp_path):
    def activation_bytes(name, *extra):
        cfg = config(assets, tmp_path, f"name={name}", "federation.rounds=1", *extra)
        _, summary = run(cfg, synthetic.costs(num_layers=4))
        return summary["bytes"]["up_smashed"], summary["bytes"]["down_gradients"]

    up, down = activation_bytes("fp32")
    up8, down_fp32 = activation_bytes("int8up", "transport.compression=int8")
    up_fp32, down8 = activation_bytes("int8down", "transport.grad_compression=int8")
    assert up8 < 0.5 * up and down8 < 0.5 * down
    assert up_fp32 == pytest.approx(up, rel=0.01)
    assert down_fp32 == pytest.approx(down, rel=0.01)


U_SHAPED = ("federation.topology=u_shaped", "federation.tail_layers=1")


def test_u_shaped_prediction_matches_when_the_model_is_the_clock(tmp_path, assets):
    """The cost model prices the extra leg (TailInput down, TailGradient up,
    the client's tail) as the real clients and server run it."""
    same = same_length_data(tmp_path)
    cfg = config(
        assets,
        tmp_path,
        "name=exact_u",
        f"data.source={same}",
        "data.eval_size=4",
        "partition.min_partition_size=2",
        "sim.timing=predicted",
        "federation.cut_layers=[1, 2]",
        "federation.rounds=2",
        *U_SHAPED,
    )
    _, summary = run(cfg)
    for r in summary["rounds"][1:]:
        assert r["prediction_error"] < 0.02
        # both directions carry activations and gradients; no labels go up
        for key in ("up_smashed", "down_smashed", "up_gradients", "down_gradients"):
            assert r[key] > 0, key


def test_u_shaped_adaptive_run_keeps_a_block_on_the_server(assets, tmp_path):
    cfg = config(
        assets, tmp_path, "name=u_adaptive", "federation.policy=adaptive", *U_SHAPED
    )
    _, summary = run(cfg, synthetic.costs(num_layers=4))
    cuts = [k for r in summary["rounds"][1:] for k in r["cuts"].values()]
    assert cuts and all(1 <= k <= 2 for k in cuts)  # L - 1 - tail_layers = 2
    assert summary["rounds"][-1]["eval_loss"] < summary["rounds"][0]["eval_loss"]


@pytest.mark.parametrize(
    "extra,match",
    [
        (["federation.cut_layers=[3]"], r"cut_layers=\[3\].*\[1, 2\].*tail_layers"),
        (["federation.tail_layers=3"], r"tail_layers=3 is not allowed: in \[1, 2\]"),
        (
            ["federation.policy=adaptive", "federation.k_max=3"],
            r"k_max=3 are not allowed: 1 <= k_min <= k_max <= 2",
        ),
    ],
)
def test_u_shaped_cuts_the_model_cannot_take_name_the_key(
    assets, tmp_path, extra, match
):
    cfg = config(assets, tmp_path, "name=u_bad", *U_SHAPED, *extra)
    with pytest.raises(ConfigError, match=match):
        run(cfg, synthetic.costs(num_layers=4))


@pytest.mark.parametrize("side", ["per_client", "shared"])
def test_a_batching_server_trains_as_the_serial_one(assets, tmp_path, side):
    """Per-client adapters: batching changes when the server works, never
    what it learns. A shared adapter steps once per batch instead of once
    per client step (docs/server.md): it learns, at the same data, and its
    batches show on the clock (one service for the clients waiting)."""
    common = (f"federation.server_side={side}", "sim.timing=predicted")
    summaries = {}
    for batching in ("false", "true"):
        cfg = config(
            assets,
            tmp_path,
            f"name={side}-{batching}",
            f"server.batching={batching}",
            *common,
        )
        # a server on which a batch of two costs what one request does alone
        costs = dataclasses.replace(synthetic.costs(num_layers=4), batch_gain=2.0)
        _, summaries[batching] = run(cfg, costs)
    serial, batched = (summaries[k]["rounds"] for k in ("false", "true"))
    serial, batched = ([r for r in rs if r["round"] > 0] for rs in (serial, batched))
    assert len(serial) == len(batched) == 3
    for a, b in zip(serial, batched, strict=True):
        if side == "per_client":
            assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
            assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5)
        assert b["up_smashed"] == a["up_smashed"] > 0  # the same micro-batches
        # the replies' floats (loss, server seconds) encode in varying lengths
        assert b["down_gradients"] == pytest.approx(a["down_gradients"], rel=1e-3)
        # the clients' micro-batches in fewer, cheaper services
        assert b["server_busy_s"] < a["server_busy_s"]
    assert batched[-1]["eval_loss"] < summaries["true"]["rounds"][0]["eval_loss"]


def test_a_bfloat16_server_trains_what_a_float32_one_does(assets, tmp_path):
    """The server's frozen base in bf16 (its adapters, optimizer and loss in
    fp32, the clients in fp32): the same run to bf16 precision."""
    losses = {}
    for dtype in ("float32", "bfloat16"):
        cfg = config(
            assets,
            tmp_path,
            f"name=dtype-{dtype}",
            f"model.server_dtype={dtype}",
            "federation.rounds=2",
            "sim.timing=predicted",
        )
        _, summary = run(cfg, synthetic.costs(num_layers=4))
        losses[dtype] = [r["eval_loss"] for r in summary["rounds"]]
    assert losses["bfloat16"][-1] < losses["bfloat16"][0]
    for a, b in zip(losses["float32"], losses["bfloat16"], strict=True):
        assert b == pytest.approx(a, rel=1e-2)


@pytest.mark.parametrize("base", ["bfloat16", "int8", "nf4"])
def test_clients_with_a_smaller_frozen_base_train_what_float32_ones_do(
    assets, tmp_path, base
):
    """client.base_dtype: the clients' blocks quantized at load (shared by
    every simulated client; the server stays float32), their LoRA weights
    float32; the run learns and ends near the float32 clients' run; the cost
    probe measures the clients' parts in their format."""
    losses, probed = {}, {}
    for fmt in ("float32", base):
        cfg = config(
            assets,
            tmp_path,
            f"name=base-{fmt}",
            f"client.base_dtype={fmt}",
            "client.checkpointing=blocks",
            "federation.rounds=2",
        )
        sim, summary = run(cfg)
        losses[fmt] = [r["eval_loss"] for r in summary["rounds"]]
        probed[fmt] = sim.costs
        clients = sim.runner.clients.values()
        assert {c.store for c in clients} == {sim.client_store}
        assert sim.client_store.base == fmt and sim.server.store.base == "float32"
        for c in clients:  # LoRA weights (and AdamW's state) in float32
            params = c._opt.param_groups[0]["params"]
            assert all(p.dtype == torch.float32 for p in params)
    assert losses[base][-1] < losses[base][0]
    assert losses[base][-1] == pytest.approx(losses["float32"][-1], rel=5e-2)
    assert probed[base].client_base == base
    assert probed["float32"].client_base == "float32"
    # int8 stores a block's linear weights in a quarter of float32, nf4 in an
    # eighth (plus their scales), bfloat16 in a half
    ratio = probed[base].block_bytes / probed["float32"].block_bytes
    assert ratio < {"bfloat16": 0.51, "int8": 0.35, "nf4": 0.3}[base], ratio
    # a float32 client's blocks are the server's (no separate time); a
    # quantized one's time is measured (not asserted: a timing under load
    # may clamp to 0, which falls back to the server's block time)
    assert probed["float32"].client_block_s == 0


def test_a_bfloat16_server_is_probed_as_it_runs(assets, tmp_path):
    """The cost probe times the server's blocks and head in the server's
    format (the clients' in theirs); a cost model of another server format
    is refused, naming both keys."""
    cfg = config(
        assets,
        tmp_path,
        "name=probe-bf16",
        "model.server_dtype=bfloat16",
        "federation.rounds=1",
    )
    sim, _ = run(cfg)
    assert sim.costs.server_base == "bfloat16" and sim.costs.client_base == "float32"
    again = config(
        assets,
        tmp_path,
        "name=probe-fp32",
        f"sim.cost_model={tmp_path / 'probe-bf16' / 'costs.json'}",
        "federation.rounds=1",
    )
    with pytest.raises(ConfigError, match=r"model\.server_dtype='bfloat16'"):
        run(again)
