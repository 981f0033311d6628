"""The U-shaped split at the model level: client blocks [0, k), server blocks
[k, L - m), client blocks [L - m, L) with the final norm, the head and the
loss, chained through the wire format, compute what the unsplit PEFT model
computes: loss, logits and every LoRA gradient (each architecture, several
(k, m)). Only activations and their gradients cross; no labels, no token ids.
"""

import pytest
import torch
from test_split_step import SETTINGS, assert_same_step, peft_reference

from splitft import lora
from splitft.models.parts import WeightStore, client_part, middle_part, server_part
from splitft.split.messages import Gradient, decode, encode


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
    out = tail.server_forward(t_in, mask, pos, b["labels"])
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
