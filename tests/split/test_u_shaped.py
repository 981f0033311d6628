"""The U-shaped split at the model level: client blocks [0, k), server blocks
[k, L - m), client blocks [L - m, L) with the final norm, the head and the
loss, chained through the wire format, compute what the unsplit PEFT model
computes: loss, logits and every LoRA gradient (each architecture, several
(k, m)). Only activations and their gradients cross; no labels, no token ids.
"""

import peft
import pytest
import torch
from test_split_step import SETTINGS, trained_like_state
from tiny import batch
from transformers import AutoModelForCausalLM

from splitft import lora
from splitft.federation.aggregate import truncate_to
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
    spec = lora.spec_for(config.model_type)
    L = config.num_hidden_layers
    global_state = trained_like_state(config)
    ranks = lora.layer_ranks(range(L), SETTINGS, cut=False)
    ranks[k - 1] = SETTINGS.cut_rank  # the client's last block before the server
    keyed = {key: ranks[lora.layer_of(key, spec)] for key in global_state}
    state = truncate_to(global_state, keyed)

    ref = AutoModelForCausalLM.from_pretrained(folder).eval()
    ref = peft.get_peft_model(ref, lora.peft_config(spec, SETTINGS, ranks))
    peft.set_peft_model_state_dict(
        ref, {lora.PEFT_PREFIX + key: v for key, v in state.items()}
    )
    b = batch()
    ref_out = ref(**b)
    ref_out.loss.backward()
    ref_grads = {
        n.replace(".default", "").removeprefix(lora.PEFT_PREFIX): p.grad
        for n, p in ref.named_parameters()
        if "lora_" in n
    }

    loss, logits, grads = u_step(WeightStore(folder), config, k, m, state, b)
    torch.testing.assert_close(loss, ref_out.loss.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, ref_out.logits.detach(), atol=1e-5, rtol=0)
    assert set(grads) == set(ref_grads)
    for key in grads:
        assert grads[key] is not None and grads[key].abs().sum() > 0, key
        torch.testing.assert_close(grads[key], ref_grads[key], atol=1e-5, rtol=1e-4)


def test_a_u_shaped_split_needs_blocks_on_the_server(tiny):
    _, folder, config, _ = tiny
    L = config.num_hidden_layers
    for k, end in ((0, 2), (2, 2), (3, 2), (1, L)):
        with pytest.raises(ValueError, match="U-shaped split needs"):
            middle_part(WeightStore(folder), config, k, end)
