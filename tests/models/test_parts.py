import pytest
import torch
from tiny import batch

from splitft import lora
from splitft.config import LoraSettings
from splitft.models.arch import UnsupportedArchitecture, spec_for
from splitft.models.parts import WeightStore, client_part, full_part, server_part


@pytest.mark.parametrize("k", [1, 2, 3])
def test_split_forward_equals_unsplit(tiny, k):
    arch, folder, config, model = tiny
    store = WeightStore(folder)
    client, server = client_part(store, config, k), server_part(store, config, k)
    b = batch()
    with torch.no_grad():
        ref = model(**b)
        h = client.client_forward(
            b["input_ids"], b["attention_mask"], b["position_ids"]
        )
        out = server.logits_from_hidden(
            h, b["attention_mask"], b["position_ids"], b["labels"]
        )
    assert h.shape == (2, 10, config.hidden_size)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)


def test_parts_hold_only_their_blocks(tiny):
    arch, folder, config, _ = tiny
    store = WeightStore(folder)
    spec = spec_for(config.model_type)
    client, server = client_part(store, config, 1), server_part(store, config, 1)
    client_keys = set(client.model.state_dict())
    server_keys = set(server.model.state_dict())
    assert any(k.startswith(spec.block_prefix(0)) for k in client_keys)
    assert not any(
        k.startswith(spec.block_prefix(i)) for k in client_keys for i in (1, 2, 3)
    )
    assert not any(k.startswith(spec.block_prefix(0)) for k in server_keys)
    assert not any(k.startswith(spec.tied_source) for k in server_keys)
    assert "lm_head.weight" not in client_keys and "lm_head.weight" in server_keys


def test_client_memory_grows_with_k(tiny):
    _, folder, config, _ = tiny
    store = WeightStore(folder)
    sizes = [client_part(store, config, k).parameter_bytes() for k in (1, 2, 3, 4)]
    assert sizes == sorted(sizes) and len(set(sizes)) == 4


def test_server_cut_view_skips_lower_blocks(tiny):
    _, folder, config, model = tiny
    store = WeightStore(folder)
    server = server_part(store, config, 1)
    b = batch()
    with torch.no_grad():
        h = client_part(store, config, 2).client_forward(
            b["input_ids"], b["attention_mask"], b["position_ids"]
        )
        with server.cut_at(2):
            out = server.logits_from_hidden(h, b["attention_mask"], b["position_ids"])
    torch.testing.assert_close(out.logits, model(**b).logits, atol=1e-5, rtol=0)


def test_unsupported_architecture_lists_supported():
    with pytest.raises(UnsupportedArchitecture, match="gpt2, llama, mistral, qwen2"):
        spec_for("bert")


def _labels(b: dict, which: str) -> torch.Tensor:
    """The batch's labels: as made (prompt and padding masked), every real
    token, only one, or none."""
    labels = b["labels"].clone()
    if which == "all":
        labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    elif which == "one":
        labels.fill_(-100)
        labels[0, 5] = b["input_ids"][0, 5]
    elif which == "none":
        labels.fill_(-100)
    return labels


def _lora_server(store, config, k):
    """A server part with LoRA whose B is not zero (so A has gradients too)."""
    server = server_part(store, config, k)
    settings = LoraSettings(r=4, cut_rank=2, alpha=8.0)
    ranks = lora.layer_ranks(range(k, config.num_hidden_layers), settings, False)
    lora.inject(server.model, server.spec, settings, ranks)
    g = torch.Generator().manual_seed(3)
    params = lora.adapter_params(server.model)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return server, params


@pytest.mark.parametrize("which", ["as_made", "all", "one", "none"])
@pytest.mark.parametrize("k", [1, 2])
def test_train_loss_equals_the_full_head(tiny, k, which):
    """The head and loss at the labelled positions only (issue 19) give the HF
    loss, the same LoRA and smashed-data gradients and the same accuracy."""
    _, folder, config, _ = tiny
    store = WeightStore(folder)
    b = batch()
    labels = _labels(b, which)
    with torch.no_grad():
        h = client_part(store, config, k).client_forward(
            b["input_ids"], b["attention_mask"], b["position_ids"]
        )
    server, params = _lora_server(store, config, k)
    server.model.train()

    def grads(run):
        hidden = h.clone().requires_grad_(True)
        loss, tokens, correct = run(hidden)
        if loss is not None:
            loss.backward()
        out = [hidden.grad] + [p.grad for p in params]
        out = [torch.zeros(1) if g is None else g.clone() for g in out]
        for p in params:
            p.grad = None
        return loss, tokens, correct, out

    def full(hidden):
        out = server.logits_from_hidden(
            hidden, b["attention_mask"], b["position_ids"], labels
        )
        target = labels[:, 1:]
        mask = target != -100
        hits = (out.logits[:, :-1].argmax(-1) == target) & mask
        n = int(mask.sum())
        return (out.loss if n else None), n, int(hits.sum())

    def at_labels(hidden):
        out = server.train_loss(
            labels, b["attention_mask"], b["position_ids"], hidden=hidden
        )
        return out.loss, out.tokens, out.correct

    ref_loss, ref_n, ref_hits, ref_grads = grads(full)
    loss, n, hits, got = grads(at_labels)
    assert (n, hits) == (ref_n, ref_hits)
    assert n == {"none": 0, "one": 1}.get(which, n)
    if which == "none":
        assert loss is None
    else:
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0)
    assert len(got) == len(ref_grads) > 1
    for g, ref in zip(got, ref_grads, strict=True):
        torch.testing.assert_close(g, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("which", ["as_made", "all"])
def test_train_loss_from_token_ids_equals_the_hf_loss(tiny, which):
    """A client holding the whole model (k = L) trains through train_loss on
    its token ids: the HF model's loss, LoRA gradients and accuracy."""
    _, folder, config, _ = tiny
    store = WeightStore(folder)
    part = full_part(store, config)
    settings = LoraSettings(r=4, cut_rank=2, alpha=8.0)
    L = config.num_hidden_layers
    lora.inject(
        part.model, part.spec, settings, lora.layer_ranks(range(L), settings, False)
    )
    params = lora.adapter_params(part.model)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    part.model.train()
    b = batch()
    labels = _labels(b, which)
    inputs = (b["attention_mask"], b["position_ids"])

    ref = part.model(
        input_ids=b["input_ids"],
        labels=labels,
        attention_mask=inputs[0],
        position_ids=inputs[1],
        use_cache=False,
    )
    ref.loss.backward()
    ref_grads = [p.grad.clone() for p in params]
    target = labels[:, 1:]
    hits = int(((ref.logits[:, :-1].argmax(-1) == target) & (target != -100)).sum())
    for p in params:
        p.grad = None
    out = part.train_loss(labels, *inputs, input_ids=b["input_ids"])
    out.loss.backward()
    assert (out.tokens, out.correct) == (int((target != -100).sum()), hits)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)
    for p, want in zip(params, ref_grads, strict=True):
        torch.testing.assert_close(p.grad, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("base", ["int8", "nf4"])
def test_a_quantized_store_quantizes_the_blocks_once_for_every_part(tiny, base):
    """client.base_dtype=int8/nf4: the blocks' dense layers are quantized when
    a part first needs them and shared by every part of the store (a
    simulation's clients hold them once); the embeddings and norms are
    bfloat16; a block is a quarter (int8) or less (nf4) of float32."""
    arch, folder, config, _ = tiny
    store = WeightStore.for_base(folder, base)
    assert store.base == base and store.dtype == torch.bfloat16
    a, b = client_part(store, config, 2), client_part(store, config, 3)
    plain = client_part(WeightStore(folder), config, 2)
    spec = a.spec
    blocks_a = getattr(a.decoder, spec.blocks)
    blocks_b = getattr(b.decoder, spec.blocks)
    quantized = [
        (name, m)
        for name, m in blocks_a[0].named_modules()
        if type(m).__module__.startswith("bitsandbytes")
    ]
    assert quantized  # every dense layer of the block
    for name, m in quantized:
        assert blocks_b[0].get_submodule(name) is m
        assert m.weight.dtype in (torch.int8, torch.uint8)
    embed = getattr(a.decoder, spec.embeddings[0]).weight
    assert embed.dtype == torch.bfloat16
    block_bytes = sum(p.numel() * p.element_size() for p in blocks_a[0].parameters())
    plain_bytes = sum(
        p.numel() * p.element_size()
        for p in getattr(plain.decoder, spec.blocks)[0].parameters()
    )
    assert block_bytes < 0.35 * plain_bytes
    # the server's parts of a float32 store are untouched: float32 = as stored
    same = WeightStore.for_base(folder, "float32")
    assert same.base == "float32" and same.quantize is None
    assert same.dtype == torch.float32


def test_a_store_refuses_an_unknown_quantization(tiny):
    _, folder, _, _ = tiny
    with pytest.raises(ValueError, match="quantize='fp8' not in"):
        WeightStore(folder, quantize="fp8")
