"""The core invariant: split training computes what the unsplit PEFT model does."""

import peft
import pytest
import torch
from tiny import batch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from splitft import lora
from splitft.config import LoraSettings
from splitft.models.parts import WeightStore, client_part, server_part
from splitft.ranks import truncate_to
from splitft.split.messages import Gradient, SmashedData, decode, encode

SETTINGS = LoraSettings(r=4, cut_rank=2, alpha=8.0)


def trained_like_state(config, seed=0):
    """A global adapter with non-zero B, so every LoRA weight gets a gradient."""
    g = torch.Generator().manual_seed(seed)
    state = lora.init_global_adapter(config, SETTINGS, seed)
    return {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in state.items()}


def split_step(store, config, k, state, b, checkpointing=False):
    """One split step exactly as client and server run it, through the wire
    format (``checkpointing``: the client's blocks recompute in backward)."""
    client, server = client_part(store, config, k), server_part(store, config, k)
    L = config.num_hidden_layers
    lora.inject(
        client.model, client.spec, SETTINGS, lora.layer_ranks(range(k), SETTINGS, True)
    )
    lora.inject(
        server.model,
        server.spec,
        SETTINGS,
        lora.layer_ranks(range(k, L), SETTINGS, False),
    )
    for part in (client, server):
        held = lora.select_layers(state, part.spec, part.layers)
        lora.load_adapter_state(part.model, held)
    client.checkpoint_blocks(checkpointing)
    hidden = client.client_forward(
        b["input_ids"], b["attention_mask"], b["position_ids"]
    )
    msg = decode(
        encode(
            SmashedData(
                0,
                0,
                0,
                1,
                hidden.detach(),
                b["attention_mask"],
                b["position_ids"],
                b["labels"],
            )
        )
    )
    h = msg.hidden.requires_grad_(True)
    out = server.logits_from_hidden(h, msg.attention_mask, msg.position_ids, msg.labels)
    out.loss.backward()
    reply = decode(encode(Gradient(0, 0, 0, float(out.loss.detach()), 0, 0.0, h.grad)))
    hidden.backward(reply.grad)
    grads = {}
    for part in (client, server):
        for key, p in lora._lora_params(part.model, "default").items():
            grads[key] = p.grad
    return out.loss.detach(), out.logits.detach(), grads


def peft_reference(folder, config, k, **load):
    """The unsplit PEFT model's step on :func:`batch`, with block ``k - 1`` at
    the cut rank: (adapter state, batch, output, LoRA gradients by key).
    ``load``: how transformers loads the model (a dtype, a quantization)."""
    spec = lora.spec_for(config.model_type)
    global_state = trained_like_state(config)
    # The client's last block runs at the reduced cut rank: the unsplit
    # reference uses the same per-layer ranks.
    ranks = lora.layer_ranks(range(config.num_hidden_layers), SETTINGS, cut=False)
    ranks[k - 1] = SETTINGS.cut_rank
    keyed = {key: ranks[lora.layer_of(key, spec)] for key in global_state}
    state = truncate_to(global_state, keyed)

    ref = AutoModelForCausalLM.from_pretrained(folder, **load).eval()
    for module in ref.modules():  # as quantize_linear: no CPU inference repack
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
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
    return state, b, ref_out, ref_grads


def assert_same_step(loss, logits, grads, ref_out, ref_grads):
    torch.testing.assert_close(loss, ref_out.loss.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, ref_out.logits.detach(), atol=1e-5, rtol=0)
    assert set(grads) == set(ref_grads)
    for key in grads:
        assert grads[key] is not None and grads[key].abs().sum() > 0, key
        torch.testing.assert_close(grads[key], ref_grads[key], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_split_step_matches_unsplit_peft(tiny, k):
    arch, folder, config, _ = tiny
    state, b, ref_out, ref_grads = peft_reference(folder, config, k)
    loss, logits, grads = split_step(WeightStore(folder), config, k, state, b)
    assert_same_step(loss, logits, grads, ref_out, ref_grads)


@pytest.mark.parametrize("k", [1, 3])
def test_a_client_with_checkpointed_blocks_matches_unsplit_peft(tiny, k):
    """client.checkpointing=blocks: the same loss and LoRA gradients."""
    arch, folder, config, _ = tiny
    state, b, ref_out, ref_grads = peft_reference(folder, config, k)
    loss, logits, grads = split_step(
        WeightStore(folder), config, k, state, b, checkpointing=True
    )
    assert_same_step(loss, logits, grads, ref_out, ref_grads)


def test_checkpointing_replays_lora_dropout_and_can_be_undone(tiny):
    """In training mode, with LoRA dropout, checkpointed blocks give exactly
    the gradients saved activations give (the dropout masks are replayed);
    switched off, the blocks are as before."""
    arch, folder, config, _ = tiny
    settings = LoraSettings(r=4, cut_rank=2, alpha=8.0, dropout=0.3)
    b = batch()

    def grads(on):
        part = client_part(WeightStore(folder), config, 3)
        lora.inject(
            part.model, part.spec, settings, lora.layer_ranks(range(3), settings, True)
        )
        g = torch.Generator().manual_seed(0)  # non-zero B: every weight has a grad
        for p in lora._lora_params(part.model, "default").values():
            p.data = torch.randn(p.shape, generator=g) * 0.1
        part.model.train()
        part.checkpoint_blocks(on)
        torch.manual_seed(7)
        h = part.client_forward(b["input_ids"], b["attention_mask"], b["position_ids"])
        (h.float() ** 2).mean().backward()
        out = {k: p.grad for k, p in lora._lora_params(part.model, "default").items()}
        part.checkpoint_blocks(False)
        assert all("forward" not in vars(blk) for blk in part._blocks)
        return out

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], atol=1e-6, rtol=1e-5)


# The unsplit reference of each client.base_dtype: transformers loads the
# model in bfloat16 and, for int8/nf4, quantizes it with bitsandbytes as a
# QLoRA user would (BitsAndBytesConfig); the split parts are built from a
# WeightStore.for_base. Same quantized weights, same bfloat16 compute.
def quantized_load(base):
    config = {
        "bfloat16": None,
        "int8": BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0),
        "nf4": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        ),
    }[base]
    load = {"dtype": torch.bfloat16, "device_map": "cpu"}
    return load if config is None else {**load, "quantization_config": config}


@pytest.mark.parametrize("base", ["bfloat16", "int8", "nf4"])
@pytest.mark.parametrize("k", [1, 3])
def test_split_step_with_a_quantized_base_matches_unsplit_peft(tiny, base, k):
    """client.base_dtype: the split step equals the unsplit PEFT model with
    the same frozen base (the same quantized weights, the same bfloat16
    compute), every architecture; the LoRA weights and their gradients stay
    float32. (Bitwise equal here; asserted to the fp32 tolerance.)"""
    arch, folder, config, _ = tiny
    state, b, ref_out, ref_grads = peft_reference(
        folder, config, k, **quantized_load(base)
    )
    store = WeightStore.for_base(folder, base)
    loss, logits, grads = split_step(store, config, k, state, b)
    assert logits.dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in grads.values())
    assert_same_step(loss, logits, grads, ref_out, ref_grads)
