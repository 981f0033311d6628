"""The server's batched step: several clients' micro-batches in one pass give
each request what it would get alone (loss, accuracy, gradients)."""

import copy

import pytest
import torch

from splitft import lora
from splitft.config import ConfigError, LoraSettings, TrainConfig, load_config
from splitft.models.parts import WeightStore
from splitft.split.messages import Ack, Gradient, RoundRequest, SmashedData
from splitft.split.server import SHARED, SplitServer

SETTINGS = LoraSettings(r=4, cut_rank=2, alpha=8.0)
CUTS = {0: 1, 1: 3, 2: 2}  # three clients at three cuts
LENGTHS = {0: 6, 1: 10, 2: 9}  # rows of different lengths


def server(folder, config, side="per_client", accum=2, batching=True, lr=1e-2):
    train = TrainConfig(
        lr=lr, warmup_steps=0, batch_size=2, grad_accum=accum, max_grad_norm=0.0
    )
    s = SplitServer(
        WeightStore(folder),
        config,
        SETTINGS,
        train,
        CUTS,
        total_steps=4,
        local_steps=4,
        server_side=side,
        batching=batching,
    )
    for cid in CUTS:
        s.handle(RoundRequest(cid, 0))
    # the B factors of LoRA start at zero: give them values, or the server's
    # blocks would pass the gradient through unchanged
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in s.part.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return s


def smashed(config, cid, masked=True, micro=0, accum=2, seed=0):
    """A micro-batch of client ``cid``: two rows, the second one shorter."""
    g = torch.Generator().manual_seed(100 * seed + cid)
    B, T, H = 2, LENGTHS[cid], config.hidden_size
    labels = torch.randint(0, config.vocab_size, (B, T), generator=g)
    labels[:, :3] = -100
    if masked:
        mask = torch.ones(B, T, dtype=torch.long)
        mask[1, T - 2 :] = 0
        labels[mask == 0] = -100
        pos = torch.arange(T).expand(B, T).clone()
    else:  # packed: two examples in row 0, positions restarting
        mask, cut = None, T // 2
        pos = torch.cat([torch.arange(cut), torch.arange(T - cut)]).expand(B, T)
        pos = pos.clone()
        labels[0, cut] = -100
    return SmashedData(
        client_id=cid,
        step=0,
        micro=micro,
        num_micro=accum,
        hidden=torch.randn(B, T, H, generator=g),
        attention_mask=mask,
        position_ids=pos,
        labels=labels,
    )


def grads(s, name):
    return {
        n: p.grad.clone()
        for n, p in s.part.model.named_parameters()
        if f".{name}.weight" in n and p.grad is not None
    }


def assert_same_reply(a, b):
    assert isinstance(a, Gradient) and isinstance(b, Gradient), (a, b)
    assert a.tokens == b.tokens and a.correct == b.correct
    assert a.loss == pytest.approx(b.loss, abs=1e-5)
    torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("masked", [True, False], ids=["masked", "packed"])
def test_a_batch_of_clients_at_three_cuts_equals_their_requests_one_by_one(
    tiny, masked
):
    arch, folder, config, _ = tiny
    one, many = server(folder, config), server(folder, config)
    msgs = [smashed(config, cid, masked) for cid in CUTS]
    alone = [one.handle(copy.deepcopy(m)) for m in msgs]
    together = many.handle_many([(m, None) for m in msgs])
    for a, b in zip(alone, together, strict=True):
        assert_same_reply(a, b)
    for cid in CUTS:  # each adapter got its own rows' gradient only
        want, got = grads(one, f"c{cid}"), grads(many, f"c{cid}")
        assert want and set(want) == set(got)
        for n in want:
            torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=1e-4)


def test_a_batch_does_not_depend_on_who_shares_it(tiny):
    arch, folder, config, _ = tiny
    a, b = server(folder, config), server(folder, config)
    msgs = [smashed(config, cid) for cid in CUTS]
    alone = a.handle_many([(msgs[0], None)])[0]
    shared = b.handle_many([(m, None) for m in reversed(msgs)])[-1]
    assert_same_reply(alone, shared)


def test_the_optimizer_steps_per_client_after_its_last_micro_batch(tiny):
    arch, folder, config, _ = tiny
    one, many = server(folder, config), server(folder, config)
    for micro in (0, 1):
        msgs = [smashed(config, cid, micro=micro, seed=micro) for cid in CUTS]
        for m in msgs:
            one.handle(copy.deepcopy(m))
        replies = many.handle_many([(m, None) for m in msgs])
        assert all(isinstance(r, Gradient) for r in replies)
    for cid in CUTS:
        want = lora.adapter_state(one.part.model, f"c{cid}")
        got = lora.adapter_state(many.part.model, f"c{cid}")
        for n in want:
            torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=1e-4)


def test_a_shared_adapter_steps_once_per_batch_on_its_clients_mean_gradient(tiny):
    arch, folder, config, _ = tiny
    # lr ~0: the serial server's adapter does not move between its clients'
    # steps, so each step's gradient is the one the batch sums
    one = server(folder, config, SHARED, accum=1, lr=1e-30)
    many = server(folder, config, SHARED, accum=1, lr=1e-30)
    seen = {"one": [], "many": []}
    for key, s in (("one", one), ("many", many)):
        s.shared.optimizer.register_step_pre_hook(
            lambda opt, *_, key=key: seen[key].append(
                [
                    torch.zeros_like(p) if p.grad is None else p.grad.clone()
                    for g in opt.param_groups
                    for p in g["params"]
                ]
            )
        )
    msgs = [smashed(config, cid, accum=1) for cid in CUTS]
    alone = [one.handle(copy.deepcopy(m)) for m in msgs]
    together = many.handle_many([(m, None) for m in msgs])
    for a, b in zip(alone, together, strict=True):
        assert_same_reply(a, b)
    assert len(seen["one"]) == 3 and len(seen["many"]) == 1
    for i, got in enumerate(seen["many"][0]):
        want = sum(step[i] for step in seen["one"]) / 3
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert many.shared.served == {cid: k for cid, k in CUTS.items()}


def test_a_bad_request_in_a_batch_is_refused_alone(tiny):
    arch, folder, config, _ = tiny
    one, many = server(folder, config), server(folder, config)
    good = [smashed(config, cid) for cid in (0, 2)]
    late = smashed(config, 1, micro=1)  # out of order: micro 0 comes first
    stranger = smashed(config, 0)  # another connection's client
    alone = [one.handle(copy.deepcopy(m)) for m in good]
    replies = many.handle_many([(good[0], 0), (late, 1), (stranger, 2), (good[1], 2)])
    assert_same_reply(alone[0], replies[0])
    assert_same_reply(alone[1], replies[3])
    assert isinstance(replies[1], Ack) and replies[1].error.startswith("OutOfOrder")
    assert isinstance(replies[2], Ack) and replies[2].error.startswith("NotAllowed")
    # the refused client starts its step again; the retry of a request
    # answered gets the same answer, and is not applied twice
    again = many.handle_many([(good[0], None), (smashed(config, 1), None)])
    assert again[0] is replies[0]
    assert isinstance(again[1], Gradient)


def test_a_request_whose_loss_is_not_finite_is_dropped_alone(tiny):
    arch, folder, config, _ = tiny
    one, many = server(folder, config), server(folder, config)
    for s in (one, many):  # client 1's server-side adapter overflows
        with torch.no_grad():
            for n, p in s.part.model.named_parameters():
                if ".lora_B.c1." in n:
                    p.fill_(3e38)
    msgs = [smashed(config, cid) for cid in CUTS]
    alone = [one.handle(copy.deepcopy(m)) for m in msgs]
    assert isinstance(alone[1], Ack) and "not finite" in alone[1].error
    replies = many.handle_many([(m, None) for m in msgs])
    assert isinstance(replies[1], Ack) and "not finite" in replies[1].error
    assert_same_reply(alone[0], replies[0])
    assert_same_reply(alone[2], replies[2])
    for cid in (0, 2):
        got = grads(many, f"c{cid}")
        assert got
        for n, g in got.items():
            assert torch.isfinite(g).all(), n


def test_batching_refuses_what_it_cannot_serve():
    on = "server.batching=true"
    with pytest.raises(ConfigError, match="train.grad_accum=1"):
        load_config(None, [on, "federation.server_side=shared", "train.grad_accum=2"])
    with pytest.raises(ConfigError, match="u_shaped"):
        load_config(None, [on, "federation.topology=u_shaped"])
    with pytest.raises(ConfigError, match="server.max_batch_tokens"):
        load_config(None, ["server.max_batch_tokens=-1"])
