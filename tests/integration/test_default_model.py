"""The real default model (SmolLM2-135M-Instruct) and the real BIG-bench data."""

import json

import pytest
import torch

from splitft.config import load_config
from splitft.federation.simulation import Simulation

# two clients at cuts 3 and 11, one round of one step on two tasks
ONE_ROUND = [
    "federation.num_clients=2",
    "federation.rounds=1",
    "federation.local_steps=1",
    "federation.cut_layers=[3, 11]",
    "data.tasks=[addition, dates]",
    "data.eval_size=4",
    "data.max_train_per_task=16",
    "train.batch_size=2",
]


def assert_same_training(a, b):
    """Run folders ``a`` and ``b`` trained the same adapter (to 1e-5) through
    the same cuts and eval losses; returns their summaries."""
    from safetensors.torch import load_file

    ta = load_file(a / "adapter" / "adapter_model.safetensors")
    tb = load_file(b / "adapter" / "adapter_model.safetensors")
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-5, atol=1e-6)
    sa = json.loads((a / "summary.json").read_text())
    sb = json.loads((b / "summary.json").read_text())
    for ra, rb in zip(sa["rounds"], sb["rounds"], strict=True):
        assert ra.get("cuts") == rb.get("cuts")
        assert ra["eval_loss"] == pytest.approx(rb["eval_loss"], rel=1e-6)
    return sa, sb


@pytest.mark.integration
def test_two_clients_different_cuts_one_round(tmp_path):
    cfg = load_config(None, [f"out_dir={tmp_path}", "name=it", *ONE_ROUND])
    summary = Simulation(cfg).run()
    run = tmp_path / "it"
    rounds = [
        json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
    ]
    steps = [r for r in rounds if r["type"] == "step"]
    assert {s["cut_layer"] for s in steps} == {3, 11}
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in steps)
    last = summary["rounds"][-1]
    assert torch.isfinite(torch.tensor(last["eval_loss"]))
    assert last["up_smashed"] > 0 and last["down_gradients"] > 0
    assert (run / "adapter" / "adapter_model.safetensors").exists()
    assert (run / "adapter" / "adapter_config.json").exists()
    assert (run / "config.yaml").exists() and (run / "summary.json").exists()

    import peft
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(summary["model"])
    model = peft.PeftModel.from_pretrained(base, run / "adapter")
    n = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    assert n > 0


@pytest.mark.integration
def test_adaptive_policy_on_heterogeneous_clients(tmp_path):
    """The probe on the real model, a plan within budgets, the clock's numbers."""
    cfg = load_config(
        None,
        [
            f"out_dir={tmp_path}",
            "name=adaptive",
            "federation.num_clients=3",
            "federation.rounds=2",
            "federation.local_steps=2",
            "federation.policy=adaptive",
            "partition.method=length_dirichlet",
            "sim.mix=[workstation, tablet, phone]",
            "sim.server_speed=0.25",  # a busy server: offloading it pays
            "data.tasks=[addition, dates]",
            "data.eval_size=4",
            "data.max_train_per_task=24",
            "train.batch_size=2",
            "eval.accuracy=false",
        ],
    )
    sim = Simulation(cfg)
    summary = sim.run()
    costs = sim.costs
    assert costs.num_layers == 30 and costs.hidden_size == 576
    # measured, so only their sign is a property (which costs more depends on
    # the load of the machine: a CI run beside a benchmark measured a block
    # at 1.3 ms per slot and the head at 0.6 ms per labelled token)
    assert costs.block_s > 0 and costs.head_s > 0 and costs.batch_gain > 0
    assert costs.block_bytes == pytest.approx(14.16e6, rel=0.01)  # fp32 weights
    trained = [r for r in summary["rounds"] if r["round"] > 0]
    for r in trained:
        assert not r["over_budget"] and not r["failed"]
        for cid, k in r["cuts"].items():
            assert 1 <= k <= 29
            worst = 2 * cfg.data.max_length
            mem = costs.client_memory(k, worst, worst)
            budget = {"0": 4000e6, "1": 600e6, "2": 300e6}[cid]
            assert mem <= budget
        assert r["sim_round_s"] > 0 and 0 <= r["prediction_error"] < 1.0
    # the workstation takes more blocks than the phone
    assert trained[0]["cuts"]["0"] > trained[0]["cuts"]["2"]


@pytest.mark.integration
def test_an_interrupted_run_resumes_to_the_uninterrupted_adapter(tmp_path):
    """Checkpoint, interrupt and resume (what `splitft run --resume` does) on
    the real model: the same adapter and eval losses as a run that was never
    stopped."""
    import signal

    from splitft import interrupts, runs

    def cfg(name):
        return load_config(
            None,
            [
                f"out_dir={tmp_path}",
                f"name={name}",
                "federation.num_clients=2",
                "federation.rounds=2",
                "federation.local_steps=1",
                "federation.policy=adaptive",
                "federation.server_side=shared",
                "sim.mix=[workstation, phone]",
                "sim.timing=predicted",
                "data.tasks=[addition]",
                "data.eval_size=4",
                "data.max_train_per_task=16",
                "data.max_length=64",
                "train.batch_size=2",
                "eval.accuracy=false",
            ],
        )

    whole = Simulation(cfg("whole"))
    whole.run(table=False)

    def interrupt(record):
        if record["round"] == 1:
            raise interrupts.Interrupted(signal.SIGINT)
        return False

    with pytest.raises(interrupts.Interrupted):
        Simulation(cfg("cut"), whole.costs).run(interrupt, table=False)
    assert runs.read_status(tmp_path / "cut")["state"] == "interrupted"
    resumed = Simulation(cfg("cut"), resume=True)
    resumed.run(table=False)
    assert resumed.start_round == 1
    assert_same_training(tmp_path / "whole", tmp_path / "cut")


@pytest.mark.integration
def test_a_deployment_over_tls_trains_the_simulations_adapter(tmp_path):
    """`splitft server` and two `splitft client` processes on the real model,
    over gRPC with TLS and tokens: the simulation's adapter."""
    import subprocess
    import sys

    from deployed import client_flags, free_port
    from safetensors.torch import load_file

    settings = [
        f"out_dir={tmp_path}",
        "federation.num_clients=2",
        "federation.rounds=1",
        "federation.local_steps=2",
        "federation.cut_layers=[3, 11]",
        "data.tasks=[addition]",
        "data.eval_size=4",
        "data.max_train_per_task=16",
        "data.max_length=64",
        "train.batch_size=2",
        "eval.accuracy=false",
    ]
    Simulation(load_config(None, [*settings, "name=sim"])).run(table=False)
    cli = [sys.executable, "-m", "splitft.cli", "-q"]
    certs = tmp_path / "certs"
    made = subprocess.run(
        [*cli, "certs", str(certs), "--server-name", "localhost", "--clients", "2"],
        capture_output=True,
        text=True,
    )
    assert made.returncode == 0, made.stderr
    port = free_port()
    address = ["--address", f"127.0.0.1:{port}", "--certs", str(certs)]
    procs = [subprocess.Popen([*cli, "server", *settings, "name=net", *address])]
    for cid in range(2):
        flags = client_flags(certs, cid, port)
        procs.append(subprocess.Popen([*cli, "client", *settings, *flags]))
    assert [p.wait(timeout=600) for p in procs] == [0, 0, 0]
    a = load_file(tmp_path / "sim" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "net" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


@pytest.mark.integration
def test_a_u_shaped_round_trains_as_the_vanilla_split_on_smollm2(tmp_path):
    """Labels stay on the clients, and the round computes what the vanilla
    split does (no clipping: each side clips only its own parameters)."""

    def run(name, *extra):
        cfg = load_config(
            None,
            [
                f"out_dir={tmp_path}",
                f"name={name}",
                *ONE_ROUND,
                "train.max_grad_norm=0",
                "eval.accuracy=false",
                *extra,
            ],
        )
        sim = Simulation(cfg)
        return sim, sim.run(table=False)

    _, vanilla = run("vanilla")
    _, ushaped = run("u", "federation.topology=u_shaped", "federation.tail_layers=2")
    a, b = vanilla["rounds"][-1], ushaped["rounds"][-1]
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
    assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-4)
    assert b["eval_loss"] != vanilla["rounds"][0]["eval_loss"]  # it trained
    # the extra leg: activations come down, their gradients go up
    assert b["down_smashed"] > 0 and b["up_gradients"] > 0


def run_at_cuts_8_and_11(tmp_path, name, *extra) -> Simulation:
    """One round of two SmolLM2 clients at cuts 8 and 11, in ``tmp_path/name``."""
    cfg = load_config(
        None,
        [
            f"out_dir={tmp_path}",
            f"name={name}",
            *ONE_ROUND,
            "federation.cut_layers=[8, 11]",
            "eval.accuracy=false",
            *extra,
        ],
    )
    sim = Simulation(cfg)
    sim.run(table=False)
    return sim


@pytest.mark.integration
def test_a_checkpointing_client_trains_as_one_that_keeps_its_activations(tmp_path):
    """client.checkpointing=blocks on SmolLM2: the same round (losses and
    adapter), and the probe prices the checkpointed blocks' memory lower."""
    from safetensors.torch import load_file

    def run(name, *extra):
        sim = run_at_cuts_8_and_11(tmp_path, name, *extra)
        adapter = load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")
        return sim, adapter

    plain, a = run("plain")
    kept, b = run(
        "kept",
        "client.checkpointing=blocks",
        f"sim.cost_model={tmp_path / 'plain' / 'costs.json'}",
    )

    def losses(sim):
        return [r["train_loss"] for r in sim.rounds if r["round"] > 0]

    assert losses(kept) == pytest.approx(losses(plain), abs=1e-5)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
    c = kept.costs
    assert c.client_checkpointing and c.act_block_ckpt == 4 * 576
    worst = 2 * 256
    assert c.client_memory(8, worst, worst) < plain.costs.client_memory(8, worst, worst)


@pytest.mark.integration
def test_nf4_clients_train_smollm2_as_float32_ones_do(tmp_path):
    """client.base_dtype=nf4 (+ checkpointing) on SmolLM2: the clients' blocks
    in 4 bits, one round's losses near the float32 clients', and the probe
    prices their memory lower."""
    plain = run_at_cuts_8_and_11(tmp_path, "plain")
    nf4 = run_at_cuts_8_and_11(
        tmp_path, "nf4", "client.base_dtype=nf4", "client.checkpointing=blocks"
    )

    def losses(sim):
        return [r["train_loss"] for r in sim.rounds if r["round"] > 0]

    assert losses(nf4) == pytest.approx(losses(plain), rel=5e-2)
    assert nf4.rounds[-1]["eval_loss"] == pytest.approx(
        plain.rounds[-1]["eval_loss"], rel=2e-2
    )
    a, b = plain.costs, nf4.costs
    assert b.client_base == "nf4" and a.client_base == "float32"
    # a block's weights: 14.2 MB in float32; nf4 packs 2 weights a byte (plus
    # the norms in bf16 and the scales)
    assert b.block_bytes < 0.15 * a.block_bytes
    worst = 2 * 256
    assert b.client_memory(11, worst, worst) < 0.5 * a.client_memory(11, worst, worst)


@pytest.mark.integration
def test_a_ray_run_of_smollm2_trains_the_local_runs_adapter(
    tmp_path, monkeypatch, request
):
    """sim.backend=ray on the real model: two client actors (a local Ray the
    run starts and stops), the local simulation's adapter and losses."""
    pytest.importorskip("ray")

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    # the actors' torch runs on one thread (Ray's OMP_NUM_THREADS for 1 CPU);
    # on more, sums differ in their last bits, and Adam's first step (g/|g|)
    # turns that into up to 5e-5 on a weight whose gradient is near 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))

    def cfg(name, *more):
        return load_config(
            None,
            [
                f"out_dir={tmp_path}",
                f"name={name}",
                *ONE_ROUND,
                "federation.server_side=shared",
                "sim.timing=predicted",
                "eval.accuracy=false",
                *more,
            ],
        )

    local = Simulation(cfg("local"))
    local.run(table=False)
    Simulation(cfg("ray", "sim.backend=ray"), local.costs).run(table=False)
    sa, sb = assert_same_training(tmp_path / "local", tmp_path / "ray")
    assert sb["client_hosts"] == 2
    for ra, rb in zip(sa["rounds"], sb["rounds"], strict=True):
        assert ra["sim_time_s"] == pytest.approx(rb["sim_time_s"], rel=1e-9)


@pytest.mark.integration
def test_a_batch_of_smollm2_clients_gets_what_each_gets_alone():
    """server.batching on the real model and data: three clients at cuts 2, 5
    and 8, their rows packed into the stream's shared rows, each get the
    loss, accuracy and smashed-data gradient its request alone gets, and
    each adapter the same gradients."""
    import copy

    from transformers import AutoTokenizer

    from splitft.config import DEFAULT_TASKS, LoraSettings, TrainConfig, cache_dir
    from splitft.data import build_datasets
    from splitft.data.federated import TOKENS
    from splitft.data.format import collate
    from splitft.models.default import default_model_dir
    from splitft.models.parts import (
        WeightStore,
        client_part,
        labelled_tokens,
        load_model_config,
    )
    from splitft.split import engine
    from splitft.split.messages import RoundRequest, SmashedData
    from splitft.split.server import SplitServer

    folder = default_model_dir()
    store, config = WeightStore(folder), load_model_config(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    train, _ = build_datasets(DEFAULT_TASKS, tokenizer, cache_dir(), 256, 8, 0, 8)
    rows = sorted(
        train.select_columns(TOKENS).to_list(), key=lambda r: len(r["labels"])
    )
    # short rows and long ones: the short share rows of the stream
    picked = {0: rows[:2], 1: [rows[-1], rows[len(rows) // 2]], 2: rows[2:4]}
    cuts = {0: 2, 1: 5, 2: 8}
    msgs = []
    for cid, k in cuts.items():
        b = collate(picked[cid], 0)
        with torch.no_grad():
            hidden = client_part(store, config, k).client_forward(
                b["input_ids"], b["attention_mask"], b["position_ids"]
            )
        msgs.append(
            SmashedData(
                cid, 0, 0, 1, hidden, b["attention_mask"], b["position_ids"],
                b["labels"], labelled_tokens(b["labels"]),
            )
        )  # fmt: skip
    laid = engine.place([engine.segments(m) for m in msgs])
    assert laid.rows < 6  # some rows share a row of the stream

    def server(batching):
        s = SplitServer(
            store, config, LoraSettings(), TrainConfig(batch_size=2), cuts, 1, 1,
            batching=batching,
        )  # fmt: skip
        for cid in cuts:
            s.handle(RoundRequest(cid, 0))
        return s

    one, many = server(False), server(True)
    alone = [one.handle(copy.deepcopy(m)) for m in msgs]
    together = many.handle_many([(m, None) for m in msgs])
    for a, b in zip(alone, together, strict=True):
        assert (a.tokens, a.correct) == (b.tokens, b.correct)
        assert a.loss == pytest.approx(b.loss, abs=1e-5)
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)
    for cid in cuts:
        name = one.adapters.name_of(cid)
        want = {
            n: p.grad for n, p in one.part.model.named_parameters() if f".{name}." in n
        }
        got = dict(many.part.model.named_parameters())
        assert want
        for n, g in want.items():
            torch.testing.assert_close(got[n].grad, g, atol=1e-5, rtol=1e-4)
