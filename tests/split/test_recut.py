"""Cuts that move between rounds, the shared server-side adapter, local clients."""

import peft
import pytest
import torch
from tiny import batch, token_rows
from transformers import AutoModelForCausalLM

from splitft import lora
from splitft.config import LoraSettings, TrainConfig
from splitft.federation.coordinator import aggregate_round
from splitft.models.parts import WeightStore
from splitft.ranks import rank_of, truncate_to
from splitft.split.client import ServerRefused, SplitClient
from splitft.split.messages import AdapterUpdate, Join, RoundRequest, SmashedData
from splitft.split.server import SHARED, SplitServer
from splitft.transport import InProcessTransport

FULL = LoraSettings(r=4, cut_rank=4, alpha=8.0)  # cut_rank == r: re-cuts lose nothing
CUT = LoraSettings(r=4, cut_rank=2, alpha=8.0)
TRAIN = TrainConfig(lr=1e-2, warmup_steps=0, batch_size=2, max_grad_norm=0.0)


def federation(folder, config, cuts, settings=FULL, rounds=3, **kw):
    store = WeightStore(folder)
    server = SplitServer(
        store,
        config,
        settings,
        TRAIN,
        cuts,
        total_steps=2 * rounds,
        local_steps=2,
        **kw,
    )
    clients = {
        c: SplitClient(
            c, store, config, settings, TRAIN, token_rows(seed=c), 0, num_samples=10 + c
        )
        for c in cuts
    }
    return server, clients, InProcessTransport(server)


def split_logits(server, client, b):
    """Logits of the split model as the client and the server hold it now."""
    k = client.cut_layer
    with torch.no_grad():
        h = client.part.client_forward(
            b["input_ids"], b["attention_mask"], b["position_ids"]
        )
        peft.functional.set_adapter(server.part.model, server.adapters.name_of(0))
        with server.part.cut_at(k):
            return server.part.logits_from_hidden(
                h, b["attention_mask"], b["position_ids"]
            ).logits


def global_logits(server, folder, config, tmp_path, b):
    out = lora.export_peft(
        server.global_state, config, FULL, tmp_path / "adapter", str(folder)
    )
    base = AutoModelForCausalLM.from_pretrained(folder)
    model = peft.PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        return model(**{k: v for k, v in b.items() if k != "labels"}).logits


@pytest.mark.parametrize("server_side", ["per_client", "shared"])
@pytest.mark.parametrize("first, second", [(1, 3), (3, 1), (2, 4)])
def test_recut_leaves_the_global_model_unchanged(
    tiny, tmp_path, server_side, first, second
):
    """With cut_rank == r, moving a cut only moves adapters between the sides."""
    _, folder, config, _ = tiny
    if second == 4 and config.num_hidden_layers != 4:
        pytest.skip("k = L needs the 4-layer tiny model")
    server, clients, transport = federation(
        folder, config, {0: first}, server_side=server_side
    )
    clients[0].run_round(transport, 0)
    aggregate_round(server)  # a trained, non-trivial global adapter
    b = batch()
    reference = global_logits(server, folder, config, tmp_path, b)

    server.open_round(1, {0: second})
    plan = clients[0].start_round(transport, 1)
    assert plan.cut_layer == second == clients[0].cut_layer
    if second == config.num_hidden_layers:  # the client now holds everything
        with torch.no_grad():
            logits = (
                clients[0]
                .part.model(**{k: v for k, v in b.items() if k != "labels"})
                .logits
            )
    else:
        assert server.part.layers.start <= second
        logits = split_logits(server, clients[0], b)
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)


def test_recut_round_trains_and_aggregates_over_the_new_layers(tiny):
    _, folder, config, _ = tiny
    server, clients, transport = federation(folder, config, {0: 3, 1: 1}, CUT)
    for c in clients.values():
        c.run_round(transport, 0)
    aggregate_round(server)
    server.open_round(1, {0: 1, 1: 2})  # client 0 moves down: the part grows
    assert server.part.layers.start == 1
    for c in clients.values():
        steps = c.run_round(transport, 1)
        assert all(torch.isfinite(torch.tensor(s["loss"])) for s in steps)
    # client 0's server-side copy now covers [1, L) exactly
    held = {lora.layer_of(k, server.spec) for k in server.updates[0][0]}
    assert held == set(range(config.num_hidden_layers))
    assert aggregate_round(server) == [0, 1]


def test_open_round_refuses_unknown_clients_and_bad_cuts(tiny):
    _, folder, config, _ = tiny
    server, clients, transport = federation(folder, config, {0: 1, 1: 2})
    L = config.num_hidden_layers
    with pytest.raises(ValueError, match=r"unknown clients \[5\]"):
        server.open_round(0, {5: 1})
    with pytest.raises(ValueError, match=rf"cut layer {L + 1} not in \[1, {L}\]"):
        server.open_round(0, {0: L + 1})
    server.open_round(0, {0: 1})  # client 1 sits this round out
    reply = transport.call(RoundRequest(1, 0))
    assert "client 1 is not in this round" in reply.error
    with pytest.raises(ServerRefused, match="not in this round"):
        clients[1].run_round(transport, 0)
    assert len(clients[0].run_round(transport, 0)) == 2


def test_shared_equals_per_client_for_one_client(tiny):
    _, folder, config, _ = tiny
    runs = {}
    for side in ("per_client", "shared"):
        server, clients, transport = federation(
            folder, config, {0: 2}, CUT, server_side=side
        )
        losses = []
        for rnd in range(2):
            losses += [s["loss"] for s in clients[0].run_round(transport, rnd)]
            aggregate_round(server)
        runs[side] = losses, server.global_state
    (l1, g1), (l2, g2) = runs["per_client"], runs["shared"]
    assert l1 == pytest.approx(l2, abs=1e-6)
    for key in g1:
        torch.testing.assert_close(g1[key], g2[key], atol=1e-6, rtol=0)


def test_shared_adapter_sees_earlier_clients_updates(tiny):
    """In shared mode a client's step runs on what earlier steps made of it."""
    _, folder, config, _ = tiny
    first_loss = {}
    for side in ("per_client", "shared"):
        server, clients, transport = federation(
            folder, config, {0: 1, 1: 1}, CUT, server_side=side
        )
        clients[0].run_round(transport, 0)
        first_loss[side] = clients[1].run_round(transport, 0)[0]["loss"]
    assert first_loss["shared"] != pytest.approx(first_loss["per_client"], abs=1e-6)


def test_shared_layers_count_with_the_samples_of_the_clients_that_trained_them(tiny):
    _, folder, config, _ = tiny
    server, clients, transport = federation(
        folder, config, {0: 1, 1: 3}, CUT, server_side="shared"
    )
    for c in clients.values():
        c.run_round(transport, 0)
    shared = lora.adapter_state(server.part.model, SHARED)
    client = {cid: dict(state) for cid, (state, _) in server.updates.items()}
    n = {cid: w for cid, (_, w) in server.updates.items()}  # 10 and 11
    aggregate_round(server)
    g = server.global_state
    spec = server.spec
    for key, value in g.items():
        layer = lora.layer_of(key, spec)
        if layer == 0:  # client side for both
            holders = [(client[0][key], n[0]), (client[1][key], n[1])]
        elif layer < 3:  # client 1 below its cut; shared, trained by client 0
            holders = [(client[1][key], n[1]), (shared[key], n[0])]
        else:  # shared only, trained by both
            holders = [(shared[key], n[0] + n[1])]
        dim = 0 if ".lora_A." in key else 1
        for c in range(CUT.r):  # every rank component: mean over who holds it
            parts = [(t.narrow(dim, c, 1), w) for t, w in holders if t.shape[dim] > c]
            want = sum(t * w for t, w in parts) / sum(w for _, w in parts)
            torch.testing.assert_close(value.narrow(dim, c, 1), want, atol=1e-6, rtol=0)


def test_local_client_trains_the_whole_model_and_mixes_with_split_ones(tiny, tmp_path):
    _, folder, config, _ = tiny
    L = config.num_hidden_layers
    server, clients, transport = federation(folder, config, {0: L, 1: 2}, CUT)
    steps = clients[0].run_round(transport, 0)
    assert clients[0].local and all(s["server_seconds"] == 0 for s in steps)
    assert transport.traffic.up.get("smashed", 0) == 0  # no activations left it
    clients[1].run_round(transport, 0)
    # the local client holds every layer at rank r: no cut layer, no cut rank
    held = server.updates[0][0]
    assert {lora.layer_of(k, server.spec) for k in held} == set(range(L))
    assert {rank_of(k, t) for k, t in held.items()} == {CUT.r}
    assert aggregate_round(server) == [0, 1]


def test_local_step_equals_plain_peft_training(tiny):
    """A client with k = L computes exactly plain PEFT's loss and gradients."""
    _, folder, config, model = tiny
    L = config.num_hidden_layers
    server, clients, transport = federation(folder, config, {0: L}, CUT)
    client = clients[0]
    client.start_round(transport, 0)
    b = batch()
    ref = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(folder),
        lora.peft_config(server.spec, CUT, dict.fromkeys(range(L), CUT.r)),
    )
    ref.config.use_cache = False
    lora.load_adapter_state(
        ref.base_model.model, truncate(server.global_state, server, L)
    )
    ref.train()
    ref_out = ref(**b)
    ref_out.loss.backward()
    n, _, loss = client._local_micro(b, int((b["labels"][:, 1:] != -100).sum()))
    assert loss == pytest.approx(float(ref_out.loss), abs=1e-6)
    ref_grads = {
        k: p.grad for k, p in lora._lora_params(ref.base_model.model, "default").items()
    }
    for k, p in lora._lora_params(client.part.model, "default").items():
        torch.testing.assert_close(p.grad, ref_grads[k], atol=1e-6, rtol=0)


def truncate(state, server, k):
    return truncate_to(state, server.client_ranks(k))


@pytest.mark.parametrize("server_side", ["per_client", "shared"])
def test_a_refused_local_client_does_not_crash_the_server(tiny, server_side):
    """A k = L client has no server optimizer; refusing it must still answer."""
    _, folder, config, _ = tiny
    L = config.num_hidden_layers
    server, clients, transport = federation(
        folder, config, {0: L}, CUT, server_side=server_side
    )
    transport.call(Join(0, 5))
    transport.call(RoundRequest(0, 0))
    nan = {
        k: torch.full_like(v, float("nan"))
        for k, v in truncate(server.global_state, server, L).items()
    }
    reply = transport.call(AdapterUpdate(0, 0, 5, nan))
    assert "non-finite" in reply.error
    assert aggregate_round(server) == []


def test_shared_gradients_of_interleaved_clients_do_not_mix(tiny):
    """With grad_accum 2, A's step uses A's micro-batches only, whatever
    arrives in between."""
    _, folder, config, _ = tiny
    train = TrainConfig(lr=1e-2, warmup_steps=0, batch_size=2, grad_accum=2)
    store = WeightStore(folder)
    H = config.hidden_size

    def micro(cid, m, seed):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, 90, (2, 6), generator=g)
        return SmashedData(
            cid,
            0,
            m,
            2,
            torch.randn(2, 6, H, generator=g),
            torch.ones_like(ids),
            torch.arange(6).expand(2, 6),
            ids,
            20,
        )

    def after_a(order):
        server = SplitServer(
            store, config, CUT, train, {0: 1, 1: 1}, 2, 2, server_side="shared"
        )
        server.handle(RoundRequest(0, 0))
        server.handle(RoundRequest(1, 0))
        for cid, m in order:
            reply = server.handle(micro(cid, m, seed=10 * cid + m))
            assert not getattr(reply, "error", "")
        return lora.adapter_state(server.part.model, SHARED)

    alone = after_a([(0, 0), (0, 1)])
    mixed = after_a([(0, 0), (1, 0), (0, 1)])  # B's first micro-batch in between
    for key in alone:
        torch.testing.assert_close(mixed[key], alone[key], atol=1e-7, rtol=0)
