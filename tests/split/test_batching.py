"""The server's batched step: several clients' micro-batches in one pass give
each request what it would get alone (loss, accuracy, gradients)."""

import copy

import pytest
import torch

from splitft import lora
from splitft.config import ConfigError, LoraSettings, TrainConfig, load_config
from splitft.models.parts import WeightStore
from splitft.split import engine
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


def smashed(config, cid, masked=True, micro=0, accum=2, seed=0, lengths=LENGTHS):
    """A micro-batch of client ``cid``: two rows, the second one shorter."""
    g = torch.Generator().manual_seed(100 * seed + cid)
    B, T, H = 2, lengths[cid], config.hidden_size
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


def assert_same_adapter_grads(one, many):
    """Each client's adapter got its own rows' gradients only: the same
    tensors on the same set of LoRA weights (none on a layer below its cut)."""
    for cid in CUTS:
        want, got = grads(one, f"c{cid}"), grads(many, f"c{cid}")
        assert want and set(want) == set(got)
        for n in want:
            torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=1e-4)


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
    assert_same_adapter_grads(one, many)


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "padded"])
def test_clients_sharing_rows_get_what_they_get_alone(tiny, pack, monkeypatch):
    """Short rows of clients at different cuts share a row of the stream
    (client 0's two rows and client 2's first), masked and packed requests
    in one batch; padded (a row per segment) too."""
    arch, folder, config, _ = tiny
    monkeypatch.setattr(engine, "PACK", pack)
    # kept tokens (real, up to the last label): client 0 (cut 1) 5 and 1,
    # client 2 (cut 2) 6 and 4, client 1 (cut 3, packed) 12 and 12: row 0
    # holds cut 1's rows and cut 2's first
    lengths = {0: 5, 1: 12, 2: 6}
    one, many = server(folder, config), server(folder, config)
    msgs = [smashed(config, cid, cid != 1, lengths=lengths) for cid in CUTS]
    order = sorted(CUTS, key=CUTS.get)
    laid = engine.place([engine.segments(msgs[cid]) for cid in order])
    assert laid.rows == (4 if pack else 6)
    assert not pack or laid.offsets[:2] == [[0, 5], [6, 12]]
    alone = [one.handle(copy.deepcopy(m)) for m in msgs]
    together = many.handle_many([(m, None) for m in msgs])
    for a, b in zip(alone, together, strict=True):
        assert_same_reply(a, b)
    assert_same_adapter_grads(one, many)
    # each reply's share of the batch's time: the slots the stream gave its
    # request (gaps included) times the blocks they ran through
    cuts = [CUTS[cid] for cid in CUTS]
    work = [
        n * (config.num_hidden_layers - k)
        for n, k in zip(engine.slots(msgs, cuts), cuts, strict=True)
    ]
    seconds = [r.server_seconds for r in together]
    for w, t in zip(work, seconds, strict=True):
        assert t / sum(seconds) == pytest.approx(w / sum(work))


def test_a_request_the_stream_cannot_hold_is_served_alone(tiny):
    """A left-padded mask is not ones then zeros: that request is answered
    alone, the others batched, each as it would be alone."""
    arch, folder, config, _ = tiny
    one, many = server(folder, config), server(folder, config)
    msgs = [smashed(config, cid) for cid in CUTS]
    odd = msgs[1]
    odd.attention_mask = odd.attention_mask.flip(1)
    odd.labels = odd.labels.masked_fill(odd.attention_mask == 0, -100)
    assert not engine.batchable(odd) and engine.batchable(msgs[0])
    assert engine.group(msgs) == ([[0, 2]], [1])
    alone = [one.handle(copy.deepcopy(m)) for m in msgs]
    together = many.handle_many([(m, None) for m in msgs])
    for a, b in zip(alone, together, strict=True):
        assert_same_reply(a, b)


def test_a_malformed_request_is_refused_alone_not_batched(tiny):
    arch, folder, config, _ = tiny
    one, many = server(folder, config), server(folder, config)
    good, bad = smashed(config, 0), smashed(config, 2)
    bad.attention_mask = bad.attention_mask[:, :3]  # not hidden's shape
    assert engine.group([good, bad]) == ([[0]], [1])
    alone = one.handle(copy.deepcopy(good))
    replies = many.handle_many([(good, None), (bad, None)])
    assert_same_reply(alone, replies[0])
    assert isinstance(replies[1], Ack) and replies[1].error.startswith("Malformed")


def test_segments_share_a_row_only_as_separate_sequences():
    # (length, first position, last position) per segment, per request
    laid = engine.place([[(3, 0, 2), (2, 0, 1)], [(4, 0, 3)], [(2, 3, 4), (5, 0, 4)]])
    assert laid.width == 5 and laid.rows == 4
    # the third request's first segment continues position 3 of the row
    # before it (4 tokens, last position 3): it opens a row
    assert laid.offsets == [[0, 3], [5], [10, 15]]
    assert laid.used == [5, 4, 2, 5]
    assert laid.starts == [0, 5, 10, 20]
    padded = engine.place([[(3, 0, 2), (2, 0, 1)], [(4, 0, 3)]], pack=False)
    assert padded.rows == 3 and padded.offsets == [[0, 4], [8]]
    assert padded.starts == [0, 8, 12]


def test_a_request_keeps_its_real_tokens_up_to_its_last_label():
    labels = torch.tensor([[-100, 5, 6, -100, -100], [-100, -100, -100, -100, -100]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    assert engine.kept(labels, mask) == [3, 1]
    assert engine.kept(labels, None) == [3, 1]


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
