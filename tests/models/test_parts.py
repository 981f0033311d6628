import pytest
import torch
from tiny import batch

from splitft.models.arch import UnsupportedArchitecture, spec_for
from splitft.models.parts import WeightStore, client_part, server_part


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
        out = server.server_forward(
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
            out = server.server_forward(h, b["attention_mask"], b["position_ids"])
    torch.testing.assert_close(out.logits, model(**b).logits, atol=1e-5, rtol=0)


def test_unsupported_architecture_lists_supported():
    with pytest.raises(UnsupportedArchitecture, match="gpt2, llama, mistral, qwen2"):
        spec_for("bert")
