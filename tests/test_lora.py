"""Per-layer ranks land on exactly the intended layers, even with 2-digit indices."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from splitft import lora
from splitft.config import LoraSettings

SETTINGS = LoraSettings(r=4, cut_rank=2, alpha=8.0)


@pytest.mark.parametrize(
    "config",
    [
        LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=24,
            num_attention_heads=2,
            num_key_value_heads=1,
        ),
        GPT2Config(vocab_size=32, n_embd=16, n_layer=24, n_head=2, n_positions=16),
    ],
    ids=["llama", "gpt2"],
)
@pytest.mark.parametrize("k", [2, 12, 20])
def test_cut_rank_only_on_layer_k_minus_1(config, k):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    spec = lora.spec_for(config.model_type)
    lora.inject(model, spec, SETTINGS, lora.layer_ranks(range(k), SETTINGS, cut=True))
    seen = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            i = lora.layer_of(name, spec)
            seen.setdefault(i, set()).add(
                (module.r["default"], module.scaling["default"])
            )
    assert sorted(seen) == list(range(k))
    for i, ranks in seen.items():
        rank = SETTINGS.cut_rank if i == k - 1 else SETTINGS.r
        assert ranks == {(rank, SETTINGS.alpha / SETTINGS.r)}, i
