"""One federated round through the real client, server and transport."""

import peft
import pytest
import torch
from tiny import batch, token_rows
from transformers import AutoModelForCausalLM

from splitft import lora
from splitft.config import LoraSettings, TrainConfig
from splitft.federation.coordinator import aggregate_round
from splitft.models.parts import WeightStore
from splitft.split.client import ServerRefused, SplitClient
from splitft.split.messages import Ack, AdapterUpdate, RoundRequest, SmashedData
from splitft.split.server import SplitServer
from splitft.transport import InProcessTransport

SETTINGS = LoraSettings(r=4, cut_rank=2, alpha=8.0)
TRAIN = TrainConfig(lr=1e-2, warmup_steps=0, batch_size=2, max_grad_norm=0.0)


def federation(folder, config, cuts, steps=2):
    store = WeightStore(folder)
    server = SplitServer(
        store, config, SETTINGS, TRAIN, cuts, total_steps=steps, local_steps=steps
    )
    clients = {
        c: SplitClient(c, store, config, SETTINGS, TRAIN, token_rows(seed=c), 0)
        for c in cuts
    }
    return server, clients, InProcessTransport(server)


@pytest.mark.parametrize("k", [1, 3])
def test_exported_adapter_reproduces_split_model(tiny, tmp_path, k):
    arch, folder, config, _ = tiny
    server, clients, transport = federation(folder, config, {0: k})
    steps = clients[0].run_round(transport, 0)
    assert len(steps) == 2 and all(
        torch.isfinite(torch.tensor(s["loss"])) for s in steps
    )
    aggregate_round(server)
    b = batch()
    with torch.no_grad():
        client = clients[0].part
        h = client.client_forward(
            b["input_ids"], b["attention_mask"], b["position_ids"]
        )
        peft.functional.set_adapter(server.part.model, "c0")
        with server.part.cut_at(k):
            split_logits = server.part.logits_from_hidden(
                h, b["attention_mask"], b["position_ids"]
            ).logits
    out = lora.export_peft(
        server.global_state, config, SETTINGS, tmp_path / "adapter", str(folder)
    )
    base = AutoModelForCausalLM.from_pretrained(folder)
    model = peft.PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        peft_logits = model(**{k: v for k, v in b.items() if k != "labels"}).logits
        base_logits = AutoModelForCausalLM.from_pretrained(folder)(
            input_ids=b["input_ids"], attention_mask=b["attention_mask"]
        ).logits
    torch.testing.assert_close(peft_logits, split_logits, atol=1e-5, rtol=0)
    assert not torch.allclose(peft_logits, base_logits, atol=1e-4)  # it did train


def test_two_clients_different_cuts_round(tiny):
    _, folder, config, _ = tiny
    server, clients, transport = federation(folder, config, {0: 1, 1: 3})
    before = dict(server.global_state)
    for c in clients.values():
        c.run_round(transport, 0)
    assert aggregate_round(server) == [0, 1]
    changed = [k for k in before if not torch.equal(before[k], server.global_state[k])]
    assert changed and all(
        torch.isfinite(v).all() for v in server.global_state.values()
    )
    traffic = transport.traffic.snapshot()
    assert traffic["up_smashed"] > 0 and traffic["down_gradients"] > 0
    assert traffic["up_adapters"] > 0 and traffic["down_adapters"] > 0


def test_misbehaving_client_does_not_take_server_down(tiny):
    _, folder, config, _ = tiny
    server, clients, transport = federation(folder, config, {0: 2})
    H = config.hidden_size
    bad = [
        RoundRequest(client_id=7, round=0),  # unknown client
        SmashedData(
            0,
            0,
            0,
            1,
            torch.zeros(1, 3, H),
            torch.ones(1, 3, dtype=torch.long),
            torch.arange(3)[None],
            torch.ones(1, 3, dtype=torch.long),
        ),  # no plan
        AdapterUpdate(0, 0, 5, {"model.layers.0.nonsense": torch.zeros(1)}),
    ]
    for msg in bad:
        reply = transport.call(msg)
        assert isinstance(reply, Ack) and reply.error
    transport.call(RoundRequest(0, 0))
    wrong = SmashedData(
        0,
        0,
        0,
        1,
        torch.zeros(1, 3, H + 1),
        torch.ones(1, 3, dtype=torch.long),
        torch.arange(3)[None],
        torch.ones(1, 3, dtype=torch.long),
    )
    reply = transport.call(wrong)
    assert "hidden must be" in reply.error
    nan = {
        k: torch.full_like(v, float("nan"))
        for k, v in lora.select_layers(
            server.global_state, server.spec, range(2)
        ).items()
    }
    reply = transport.call(AdapterUpdate(0, 0, 5, nan))
    assert reply.error  # rank mismatch or non-finite: refused either way
    steps = clients[0].run_round(transport, 0)  # and the server still trains
    assert len(steps) == 2


def test_client_raises_on_refusal(tiny):
    _, folder, config, _ = tiny
    server, clients, transport = federation(folder, config, {0: 2})
    server.cut_layers.pop(0)  # the server no longer knows this client
    with pytest.raises(ServerRefused, match="unknown client_id 0"):
        clients[0].run_round(transport, 0)


def test_round_with_packed_rows(tiny):
    from splitft.data.packing import pack

    _, folder, config, _ = tiny
    store = WeightStore(folder)
    server = SplitServer(
        store, config, SETTINGS, TRAIN, {0: 2}, total_steps=2, local_steps=2
    )
    rows = pack(token_rows(n=12, T=6), max_length=20)
    client = SplitClient(0, store, config, SETTINGS, TRAIN, rows, 0)
    transport = InProcessTransport(server)
    steps = client.run_round(transport, 0)
    assert len(steps) == 2 and all(s["tokens"] > 0 for s in steps)
    assert aggregate_round(server) == [0]


def test_server_refuses_bad_steps_and_keeps_a_clean_state(tiny):
    _, folder, config, _ = tiny
    server, clients, transport = federation(folder, config, {0: 2})
    H = config.hidden_size
    ones = torch.ones(1, 3, dtype=torch.long)

    def smashed(hidden, step=0, micro=0, num_micro=1, labels=ones):
        return SmashedData(
            0, step, micro, num_micro, hidden, ones, torch.arange(3)[None], labels
        )

    assert "round -3 not in" in transport.call(RoundRequest(0, -3)).error
    transport.call(RoundRequest(0, 0))
    before = lora.adapter_state(server.part.model, "c0")
    nan = torch.full((1, 3, H), float("nan"))
    cases = {
        "non-finite": smashed(nan),
        "step 5 not in": smashed(torch.zeros(1, 3, H), step=5),
        "micro 1 not in": smashed(torch.zeros(1, 3, H), micro=1),
        "labels must be (1, 3)": smashed(
            torch.zeros(1, 3, H), labels=torch.ones(1, 4, dtype=torch.long)
        ),
        "dtype torch.float32 not allowed": smashed(
            torch.zeros(1, 3, H), labels=torch.ones(1, 3)
        ),
    }
    for expected, msg in cases.items():
        assert expected in transport.call(msg).error
    after = lora.adapter_state(server.part.model, "c0")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in lora.adapter_params(server.part.model, "c0"))
    # a stale or wrongly shaped upload is refused at receive, not at aggregation
    good = lora.select_layers(server.global_state, server.spec, range(2))
    assert "no plan of round 4" in transport.call(AdapterUpdate(0, 4, 5, good)).error
    early = transport.call(AdapterUpdate(0, 0, 5, good))  # before its steps
    assert early.code == "FAILED_PRECONDITION" and "steps first" in early.error
    assert aggregate_round(server) == []


def test_unknown_target_modules_name_the_setting(tiny):
    _, folder, config, _ = tiny
    with pytest.raises(
        ValueError, match=r"lora.target_modules \['nope'\] match nothing"
    ):
        SplitServer(
            WeightStore(folder),
            config,
            LoraSettings(target_modules=["nope"]),
            TRAIN,
            {0: 1},
            total_steps=1,
            local_steps=1,
        )


def test_concurrent_clients_are_served_one_request_at_a_time(tiny):
    import threading

    _, folder, config, _ = tiny
    server, clients, _ = federation(folder, config, {0: 1, 1: 3})
    results, errors = {}, []

    def run(cid):
        try:
            results[cid] = clients[cid].run_round(InProcessTransport(server), 0)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sorted(results) == [0, 1]
    assert aggregate_round(server) == [0, 1]


def test_plans_say_how_many_batches_each_client_drew_before(tiny):
    _, folder, config, _ = tiny
    cuts = {0: 1, 1: 2}
    _, clients, _ = federation(folder, config, cuts)
    store = WeightStore(folder)
    server = SplitServer(
        store, config, SETTINGS, TRAIN, cuts, total_steps=6, local_steps=2
    )
    transport = InProcessTransport(server)

    def train(cid, r):  # 2 steps of 1 micro-batch
        plan = clients[cid].start_round(transport, r)
        clients[cid].train_step(transport, 0, 1e-3)
        clients[cid].train_step(transport, 1, 1e-3)
        clients[cid].finish_round(transport, r)
        return plan.batches_drawn

    plans = []
    for r in range(3):
        server.open_round(r, cuts)
        plans.append(train(0, r))
        if r == 1:  # run again (too few uploads): the same batches again
            server.close_round(keep=[0])
            server.abandon_round()
            server.open_round(r, cuts)
            plans.append(train(0, r))
        if r == 2:  # client 1 takes its plan, then misses the deadline
            assert clients[1].start_round(transport, r).batches_drawn == 0
        server.close_round(keep=[0])
        aggregate_round(server)
    assert plans == [0, 2, 2, 4]
    # a client left out after taking its plan drew its batches all the same
    assert server.batches_drawn == {0: 6, 1: 2}
    assert server.state_dict()["batches_drawn"] == {0: 6, 1: 2}
