"""The server refuses what a client on the network must not do, by class.

Each class of refusal (splitft.split.errors) is covered by several inputs;
after every refusal the server answers the next good request as before.
"""

import pytest
import torch
from tiny import make_tiny, token_rows

from splitft import lora
from splitft.config import LoraSettings, TrainConfig
from splitft.federation.coordinator import RoundFailed, aggregate_round
from splitft.models.parts import WeightStore
from splitft.split.client import SplitClient, drive
from splitft.split.messages import (
    Ack,
    AdapterUpdate,
    Gradient,
    Join,
    RoundPlan,
    RoundRequest,
    SmashedData,
    decode,
    encode,
)
from splitft.split.server import SplitServer

SETTINGS = LoraSettings(r=4, cut_rank=2, alpha=8.0)
TRAIN = TrainConfig(lr=1e-2, warmup_steps=0, batch_size=2, max_grad_norm=0.0)
T = 6


@pytest.fixture
def world(tmp_path):
    return make_world(tmp_path, TRAIN)


def make_world(tmp_path, train):
    config, _ = make_tiny("llama", tmp_path / "llama")
    store = WeightStore(tmp_path / "llama")
    server = SplitServer(
        store,
        config,
        SETTINGS,
        train,
        {0: 2, 1: 2},
        total_steps=4,
        local_steps=2,
        max_length=8,
        num_samples={0: 8, 1: 8},
        upload_norm_bound=10.0,
    )
    clients = {
        c: SplitClient(c, store, config, SETTINGS, train, token_rows(T=T, seed=c), 0)
        for c in (0, 1)
    }
    return server, clients, config


def smashed(config, cid=0, step=0, micro=0, B=2, t=T, **change):
    fields = dict(
        client_id=cid,
        step=step,
        micro=micro,
        num_micro=1,
        hidden=torch.randn(B, t, config.hidden_size),
        attention_mask=torch.ones(B, t, dtype=torch.long),
        position_ids=torch.arange(t).expand(B, t).clone(),
        labels=torch.randint(0, 50, (B, t)),
        step_tokens=0,
    )
    fields.update(change)
    return SmashedData(**fields)


def refused(reply, code, text=""):
    assert isinstance(reply, Ack) and reply.code == code, reply
    assert text in reply.error
    return reply


def server_state(server, cid=0):
    return {
        k: v.clone()
        for k, v in lora.adapter_state(server.part.model, f"c{cid}").items()
    }


def test_a_client_may_not_act_for_another(world):
    server, _, config = world
    for msg in (
        Join(1, 8),
        RoundRequest(1, 0),
        smashed(config, cid=1),
        AdapterUpdate(1, 0, 8, {}),
    ):
        refused(server.handle(msg, peer=0), "PERMISSION_DENIED", "may not act for")
    refused(server.handle(RoundRequest(7, 0), peer=7), "PERMISSION_DENIED", "unknown")
    assert isinstance(server.handle(RoundRequest(0, 0), peer=0), RoundPlan)


def test_an_impersonation_leaves_the_victims_step_alone(world):
    server, _, config = world
    server.handle(RoundRequest(0, 0), peer=0)
    server.handle(smashed(config), peer=0)  # victim's step 0 done
    refused(server.handle(smashed(config, step=1), peer=1), "PERMISSION_DENIED")
    assert isinstance(server.handle(smashed(config, step=1), peer=0), Gradient)


@pytest.mark.parametrize(
    ("change", "code", "text"),
    [
        (dict(B=3), "RESOURCE_EXHAUSTED", "train.batch_size"),
        (dict(t=9), "RESOURCE_EXHAUSTED", "at most 8"),
        (dict(t=100_000, B=1), "RESOURCE_EXHAUSTED", "at most 8"),
        (dict(labels=torch.full((2, T), 10_000)), "INVALID_ARGUMENT", "labels"),
        (dict(labels=torch.full((2, T), -5)), "INVALID_ARGUMENT", "labels"),
        (dict(position_ids=torch.full((2, T), -1)), "INVALID_ARGUMENT", "position"),
        (dict(position_ids=torch.full((2, T), 10**9)), "INVALID_ARGUMENT", "position"),
        (dict(attention_mask=torch.full((2, T), 7)), "INVALID_ARGUMENT", "attention"),
        (dict(num_micro=3), "INVALID_ARGUMENT", "grad_accum"),
        (dict(step_tokens=10**6), "INVALID_ARGUMENT", "step_tokens"),
        (dict(step_tokens=-1), "INVALID_ARGUMENT", "step_tokens"),
        (dict(step=9), "INVALID_ARGUMENT", "step 9 not in"),
        (dict(step=1), "FAILED_PRECONDITION", "expected step 0 micro 0"),
    ],
)
def test_a_bad_micro_batch_is_refused_before_the_model(world, change, code, text):
    server, _, config = world
    server.handle(RoundRequest(0, 0))
    before = server_state(server)
    refused(server.handle(smashed(config, **change)), code, text)
    after = server_state(server)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(server.handle(smashed(config)), Gradient)  # carries on


def test_steps_before_the_plan_or_out_of_order(world):
    server, _, config = world
    refused(server.handle(smashed(config)), "FAILED_PRECONDITION", "RoundRequest")
    server.handle(RoundRequest(0, 0))
    assert isinstance(server.handle(smashed(config)), Gradient)
    server.handle(smashed(config, step=1))
    refused(server.handle(smashed(config)), "FAILED_PRECONDITION", "upload next")
    refused(server.handle(smashed(config, step=2)), "INVALID_ARGUMENT", "step 2 not in")


def test_a_retried_step_is_answered_again_not_applied_twice(world):
    server, _, config = world
    server.handle(RoundRequest(0, 0))
    msg = smashed(config)
    first = server.handle(msg)
    after_one = server_state(server)
    again = server.handle(msg)  # the reply was lost; the client sends it again
    assert again is first
    assert all(torch.equal(after_one[k], v) for k, v in server_state(server).items())
    assert isinstance(server.handle(smashed(config, step=1)), Gradient)


def test_old_and_closed_rounds_cannot_be_replayed(world):
    server, clients, _ = world
    server.open_round(0, {0: 2, 1: 2})
    for c in clients.values():
        drive(c.round_protocol(0), server.handle)
    aggregate_round(server)
    server.open_round(1, {0: 2})
    refused(server.handle(RoundRequest(0, 0)), "FAILED_PRECONDITION", "not open")
    refused(server.handle(RoundRequest(1, 1)), "FAILED_PRECONDITION", "not in this")
    refused(server.handle(RoundRequest(0, 5)), "FAILED_PRECONDITION", "not in [0, 2)")
    stale = lora.select_layers(server.global_state, server.spec, range(2))
    refused(server.handle(AdapterUpdate(0, 0, 8, stale)), "FAILED_PRECONDITION")


def run_steps(server, client, round=0):
    """A client's plan and steps, stopping before its upload."""
    protocol = client.round_protocol(round)
    request = next(protocol)
    while not isinstance(request, AdapterUpdate):
        request = protocol.send(server.handle(request))
    return request


@pytest.mark.parametrize(
    ("spoil", "text"),
    [
        (lambda a: {k: v.double() for k, v in a.items()}, "torch.float64"),
        (lambda a: {k: v.half() for k, v in a.items()}, "torch.float16"),
        (lambda a: {k: v * 1e4 for k, v in a.items()}, "upload_norm_bound"),
        (lambda a: {k: v.fill_(float("nan")) for k, v in a.items()}, "non-finite"),
        (lambda a: dict(list(a.items())[1:]), "missing"),
        (lambda a: {**a, "model.layers.9.x.lora_A.weight": torch.zeros(2, 2)}, "unexp"),
    ],
)
def test_a_bad_upload_is_refused_and_the_round_goes_on(world, spoil, text):
    server, clients, _ = world
    upload = run_steps(server, clients[0])
    good = {k: v.clone() for k, v in upload.adapter.items()}
    bad = AdapterUpdate(0, 0, upload.num_samples, spoil(upload.adapter))
    refused(server.handle(bad), "INVALID_ARGUMENT", text)
    assert server.updates == {}
    assert server.handle(AdapterUpdate(0, 0, upload.num_samples, good)).code == ""
    assert aggregate_round(server) == [0]


def test_an_upload_may_not_weigh_more_than_declared(world):
    server, clients, _ = world
    upload = run_steps(server, clients[0])
    too_many = AdapterUpdate(0, 0, 9, upload.adapter)
    refused(server.handle(too_many), "INVALID_ARGUMENT", "more than the 8")
    refused(server.handle(AdapterUpdate(0, 0, 0, upload.adapter)), "INVALID_ARGUMENT")
    assert server.handle(AdapterUpdate(0, 0, 8, upload.adapter)).code == ""
    # and a retried upload is acknowledged again, not counted twice
    assert server.handle(AdapterUpdate(0, 0, 8, upload.adapter)).code == ""
    assert aggregate_round(server) == [0]


def test_an_upload_of_a_client_that_never_joined_is_refused(world):
    server, clients, _ = world
    upload = run_steps(server, clients[0])
    server.declared.pop(0)  # as if it had never sent Join
    refused(server.handle(upload), "FAILED_PRECONDITION", "has not joined this run")
    assert server.updates == {}
    server.handle(Join(0, 8))
    assert server.handle(upload).code == ""


@pytest.mark.parametrize("n", [10**6, 10**18, 10**308, 10**400])
def test_a_join_over_the_bound_is_refused_over_the_wire(tmp_path, n):
    """However large the number, the server answers with what is allowed
    (it once took 1e308 and aggregated inf, and 10**400 ended in INTERNAL)."""
    server, _, _ = make_world(tmp_path, TRAIN)
    server.max_samples = 1000
    join = decode(encode(Join(1, n)))  # JSON carries any integer
    refused(server.handle(join), "RESOURCE_EXHAUSTED", "max_samples_per_client=1000")
    assert server.declared == {0: 8, 1: 8}


def test_a_non_finite_aggregate_never_becomes_the_global_adapter(world):
    server, clients, _ = world
    upload = run_steps(server, clients[0])
    assert server.handle(upload).code == ""
    before = {k: v.clone() for k, v in server.global_state.items()}
    key = next(iter(server.updates[0][0]))
    inf = {k: v.clone() for k, v in server.updates[0][0].items()}
    inf[key] = torch.full_like(inf[key], float("inf"))
    server.updates[0] = (inf, 8.0)  # past every check: defence in depth
    with pytest.raises(RoundFailed, match="not finite"):
        aggregate_round(server)
    for k, v in before.items():
        assert torch.equal(server.global_state[k], v)


def test_join_declares_the_weight_once(world):
    server, _, _ = world
    assert server.handle(Join(0, 8)).code == ""
    refused(server.handle(Join(0, 80)), "FAILED_PRECONDITION", "cannot change")
    refused(server.handle(Join(1, 0)), "INVALID_ARGUMENT", "num_samples")


def test_a_dropped_clients_half_step_leaves_no_gradient(tmp_path):
    train = TrainConfig(lr=1e-2, warmup_steps=0, batch_size=2, grad_accum=2)
    server, _, config = make_world(tmp_path, train)
    server.handle(RoundRequest(0, 0))
    params = lora.adapter_params(server.part.model, "c0")
    server.handle(smashed(config, num_micro=2))  # micro 0 of 2; the client dies
    assert any(p.grad is not None for p in params)
    server.handle(RoundRequest(0, 0))  # it restarts and asks for its plan again
    assert all(p.grad is None for p in params)
    refused(server.handle(smashed(config, micro=1, num_micro=2)), "FAILED_PRECONDITION")
    assert isinstance(server.handle(smashed(config, num_micro=2)), Gradient)
