"""The U-shaped split at the model level: client blocks [0, k), server blocks
[k, L - m), client blocks [L - m, L) with the final norm, the head and the
loss, chained through the wire format, compute what the unsplit PEFT model
computes: loss, logits and every LoRA gradient (each architecture, several
(k, m)). Only activations and their gradients cross; no labels, no token ids.
"""

import dataclasses
import math

import pytest
import torch
from test_split_step import SETTINGS, assert_same_step, peft_reference
from tiny import token_rows

from splitft import lora
from splitft.config import ConfigError, TrainConfig, load_config
from splitft.federation.coordinator import aggregate_round
from splitft.models.parts import WeightStore, client_part, middle_part, server_part
from splitft.split.client import SplitClient
from splitft.split.messages import (
    Gradient,
    RoundRequest,
    SmashedData,
    TailGradient,
    TailInput,
    decode,
    encode,
)
from splitft.split.server import SplitServer
from splitft.transport import InProcessTransport


def wire(t: torch.Tensor) -> torch.Tensor:
    """A tensor as the other side receives it: encoded, decoded, detached."""
    msg = Gradient(0, 0, 0, 0.0, 0, 0.0, t.detach())
    return decode(encode(msg)).grad


def u_step(store, config, k, m, state, b):
    L = config.num_hidden_layers
    head, body = client_part(store, config, k), middle_part(store, config, k, L - m)
    tail = server_part(store, config, L - m)  # on the client: it has the labels
    for part, cut in ((head, True), (body, False), (tail, False)):
        ranks = lora.layer_ranks(part.layers, SETTINGS, cut)
        lora.inject(part.model, part.spec, SETTINGS, ranks)
        lora.load_adapter_state(
            part.model, lora.select_layers(state, part.spec, part.layers)
        )
    mask, pos = b["attention_mask"], b["position_ids"]
    # client: embeddings and blocks [0, k)
    h1 = head.client_forward(b["input_ids"], mask, pos)
    # server: blocks [k, L - m), on what crossed the wire
    s_in = wire(h1).requires_grad_(True)
    s_out = body.middle_forward(s_in, mask, pos)
    # client: blocks [L - m, L), norm, head and loss
    t_in = wire(s_out).requires_grad_(True)
    out = tail.logits_from_hidden(t_in, mask, pos, b["labels"])
    out.loss.backward()
    s_out.backward(wire(t_in.grad))  # server: backward to k
    h1.backward(wire(s_in.grad))  # client: backward to the embeddings
    grads = {}
    for part in (head, body, tail):
        for key, p in lora._lora_params(part.model, "default").items():
            grads[key] = p.grad
    return out.loss.detach(), out.logits.detach(), grads


@pytest.mark.parametrize("k,m", [(1, 1), (1, 2), (2, 1)])
def test_u_shaped_step_matches_unsplit_peft(tiny, k, m):
    arch, folder, config, _ = tiny
    state, b, ref_out, ref_grads = peft_reference(folder, config, k)
    loss, logits, grads = u_step(WeightStore(folder), config, k, m, state, b)
    assert_same_step(loss, logits, grads, ref_out, ref_grads)


def test_a_u_shaped_split_needs_blocks_on_the_server(tiny):
    _, folder, config, _ = tiny
    L = config.num_hidden_layers
    for k, end in ((0, 2), (2, 2), (3, 2), (1, L)):
        with pytest.raises(ValueError, match="U-shaped split needs"):
            middle_part(WeightStore(folder), config, k, end)


# ---------------------------------------------------------------- protocol
TRAIN = TrainConfig(lr=1e-2, warmup_steps=0, batch_size=2, grad_accum=2)
TRAIN_NOCLIP = dataclasses.replace(TRAIN, max_grad_norm=0.0)


class Recording(InProcessTransport):
    """The in-process transport, keeping every message decoded on each side."""

    def __init__(self, server) -> None:
        super().__init__(server)
        self.wire = []

    def call(self, msg):
        self.wire.append(decode(encode(msg)))
        reply = super().call(msg)
        self.wire.append(reply)
        return reply


def federation(folder, config, cuts, tail, train=TRAIN_NOCLIP, steps=2):
    store = WeightStore(folder)
    server = SplitServer(
        store, config, SETTINGS, train, cuts, steps, steps, tail_layers=tail
    )
    clients = {
        c: SplitClient(
            c, store, config, SETTINGS, train, token_rows(seed=c), 0, tail_layers=tail
        )
        for c in cuts
    }
    return server, clients, Recording(server)


def one_round(folder, config, cuts, tail):
    server, clients, transport = federation(folder, config, cuts, tail)
    steps = [s for c in clients.values() for s in c.run_round(transport, 0)]
    assert aggregate_round(server) == sorted(cuts)
    return steps, server.global_state, transport


@pytest.mark.parametrize("cuts,m", [({0: 1, 1: 2}, 1), ({0: 1}, 2)])
def test_a_u_shaped_round_trains_exactly_as_a_vanilla_one(tiny, cuts, m):
    """The same clients, data and seed: every step's loss and the aggregated
    adapter (the tail layers averaged over the clients, not the server's
    copies) are the vanilla split's, itself equal to unsplit PEFT's
    (test_split_step). No clipping: each side clips its own parameters."""
    _, folder, config, _ = tiny
    ref_steps, ref_state, _ = one_round(folder, config, cuts, 0)
    steps, state, _ = one_round(folder, config, cuts, m)
    for ref, got in zip(ref_steps, steps, strict=True):
        assert got["loss"] == pytest.approx(ref["loss"], abs=1e-5)
        assert got["tokens"] == ref["tokens"] and got["token_acc"] == ref["token_acc"]
    before = lora.init_global_adapter(config, SETTINGS, 0)
    for key in ref_state:
        torch.testing.assert_close(state[key], ref_state[key], atol=1e-5, rtol=1e-4)
    L = config.num_hidden_layers
    tail_keys = lora.select_layers(state, lora.spec_for(config.model_type), [L - 1])
    assert all(not torch.equal(t, before[k]) for k, t in tail_keys.items() if "_B" in k)


def test_no_message_of_a_u_shaped_round_carries_labels_or_token_ids(tiny):
    _, folder, config, _ = tiny
    ids = torch.stack([torch.tensor(r["input_ids"]) for r in token_rows(seed=0)])

    def integer_tensors(wire):
        found = {}
        for msg in wire:
            for f in dataclasses.fields(msg):
                t = getattr(msg, f.name)
                if isinstance(t, torch.Tensor) and not t.is_floating_point():
                    found.setdefault(f.name, []).append(t)
        return found

    def shows_ids(tensors):  # any row of any token tensor equal to a token row
        rows = [r for t in tensors for r in t.reshape(-1, t.shape[-1])]
        return any((r[: ids.shape[1]] == ids).all(-1).any() for r in rows)

    *_, vanilla = one_round(folder, config, {0: 1}, 0)
    *_, ushaped = one_round(folder, config, {0: 1}, 1)
    # the check can see labels: in the vanilla split they cross
    assert "labels" in integer_tensors(vanilla.wire)
    found = integer_tensors(ushaped.wire)
    # only the attention mask and the position ids cross, never labels or ids
    assert set(found) <= {"attention_mask", "position_ids", "hidden", "grad"}
    assert all(
        t.dtype == torch.int64
        for n in found
        for t in found[n]
        if n in ("attention_mask", "position_ids")
    )
    assert not shows_ids([t for ts in found.values() for t in ts])
    kinds = {type(m).__name__ for m in ushaped.wire}
    assert {"SmashedData", "TailInput", "TailGradient", "Gradient"} <= kinds
    smashed = [m for m in ushaped.wire if isinstance(m, SmashedData)]
    # nor anything derived from them (step_tokens counts the labelled tokens)
    assert smashed and all(m.labels is None and m.step_tokens == 0 for m in smashed)


def test_the_server_refuses_what_a_u_shaped_split_does_not_allow(tiny):
    _, folder, config, _ = tiny
    server, clients, transport = federation(folder, config, {0: 1}, 1, TRAIN)
    H = config.hidden_size
    transport.call(RoundRequest(0, 0))
    mask = torch.ones(2, 5, dtype=torch.long)
    pos = torch.arange(5).expand(2, 5)
    labels = torch.ones(2, 5, dtype=torch.long)
    hidden = torch.zeros(2, 5, H)
    reply = transport.call(SmashedData(0, 0, 0, 2, hidden, mask, pos, labels, 8))
    assert reply.code == "INVALID_ARGUMENT" and "labels must stay" in reply.error
    reply = transport.call(TailGradient(0, 0, 0, hidden))
    assert reply.code == "FAILED_PRECONDITION" and "no forward awaits" in reply.error
    reply = transport.call(SmashedData(0, 0, 0, 2, hidden, mask, pos, None, 8))
    assert isinstance(reply, TailInput) and reply.hidden.shape == (2, 5, H)
    again = transport.call(SmashedData(0, 0, 0, 2, hidden, mask, pos, None, 8))
    assert isinstance(again, TailInput)  # a retry: the first answer again
    reply = transport.call(SmashedData(0, 0, 1, 2, hidden, mask, pos, None, 8))
    assert "expected the TailGradient of step 0 micro 0" in reply.error
    transport.call(RoundRequest(0, 0))  # the refusal dropped the step
    transport.call(SmashedData(0, 0, 0, 2, hidden, mask, pos, None, 8))
    reply = transport.call(TailGradient(0, 0, 0, torch.zeros(2, 4, H)))
    assert "grad must be (2, 5" in reply.error
    # the server is clean: the client's round runs from the start
    steps = clients[0].run_round(transport, 0)
    assert len(steps) == 2 and all(math.isfinite(s["loss"]) for s in steps)


def test_client_and_server_must_agree_on_the_topology(tiny):
    _, folder, config, _ = tiny
    server, _, transport = federation(folder, config, {0: 1}, 1)
    vanilla = SplitClient(
        0, WeightStore(folder), config, SETTINGS, TRAIN, token_rows(), 0
    )
    with pytest.raises(
        ConfigError, match="tail_layers=1 split, this client is configured vanilla"
    ):
        vanilla.run_round(transport, 0)
    L = config.num_hidden_layers
    with pytest.raises(ValueError, match=f"not in \\[1, {L - 2}\\]"):
        SplitServer(
            WeightStore(folder),
            config,
            SETTINGS,
            TRAIN,
            {0: L - 1},
            2,
            2,
            tail_layers=1,
        )
    with pytest.raises(ValueError, match="per_client"):
        SplitServer(
            WeightStore(folder),
            config,
            SETTINGS,
            TRAIN,
            {0: 1},
            2,
            2,
            tail_layers=1,
            server_side="shared",
        )
    with pytest.raises(ConfigError, match="federation.server_side='shared'.*u_shaped"):
        load_config(
            None, ["federation.topology=u_shaped", "federation.server_side=shared"]
        )
    with pytest.raises(ConfigError, match="federation.topology='u'.*vanilla"):
        load_config(None, ["federation.topology=u"])


def test_clients_interleaved_on_the_server_train_as_one_after_another(tiny):
    """The server keeps each client's forward for its TailGradient while other
    clients run theirs: the result does not depend on the interleaving."""
    _, folder, config, _ = tiny
    cuts = {0: 1, 1: 2}
    _, sequential, _ = one_round(folder, config, cuts, 1)
    server, clients, transport = federation(folder, config, cuts, 1)
    protocols = {c: client.round_protocol(0) for c, client in clients.items()}
    requests = {c: next(p) for c, p in protocols.items()}
    while requests:  # one message each in turn
        for c in list(requests):
            try:
                requests[c] = protocols[c].send(transport.call(requests[c]))
            except StopIteration:
                del requests[c]
    aggregate_round(server)
    for key, t in sequential.items():
        torch.testing.assert_close(server.global_state[key], t, atol=1e-6, rtol=1e-5)


def test_a_tied_head_on_the_client_is_its_embedding_not_a_copy(tiny):
    """Holding the head costs a tied model's client no second embedding-sized
    matrix: both parts read the one tensor from the client's weight store."""
    _, folder, config, _ = tiny
    _, clients, transport = federation(folder, config, {0: 1}, 1)
    clients[0].run_round(transport, 0)
    front, tail = clients[0].part, clients[0].tail
    embed = front.decoder.get_input_embeddings().weight
    head = tail.model.get_output_embeddings().weight
    tied = bool(config.tie_word_embeddings)
    assert (head.data_ptr() == embed.data_ptr()) == tied
