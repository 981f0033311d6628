"""A bfloat16 server: the frozen base in bf16, LoRA, optimizer and loss fp32."""

import copy

import pytest
import torch
from test_batching import CUTS, SETTINGS, smashed

from splitft import lora
from splitft.config import ConfigError, TrainConfig, load_config
from splitft.models.parts import WeightStore
from splitft.split.messages import Gradient, RoundRequest
from splitft.split.server import SplitServer


def server(folder, config, dtype, batching=False):
    train = TrainConfig(lr=1e-2, warmup_steps=0, batch_size=2, max_grad_norm=0.0)
    s = SplitServer(
        WeightStore(folder, dtype=dtype),
        config,
        SETTINGS,
        train,
        CUTS,
        total_steps=2,
        local_steps=2,
        batching=batching,
    )
    for cid in CUTS:
        s.handle(RoundRequest(cid, 0))
    return s


def cosine(a, b):
    a, b = a.float().flatten(), b.float().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def test_a_bf16_server_computes_the_fp32_step_to_bf16_precision(tiny):
    arch, folder, config, _ = tiny
    fp32 = server(folder, config, torch.float32)
    bf16 = server(folder, config, torch.bfloat16)
    base = [p for n, p in bf16.part.model.named_parameters() if "lora_" not in n]
    assert base and all(p.dtype == torch.bfloat16 for p in base)
    for cid in CUTS:
        msg = smashed(config, cid, accum=1)
        want, got = fp32.handle(copy.deepcopy(msg)), bf16.handle(copy.deepcopy(msg))
        assert isinstance(got, Gradient), got
        assert got.grad.dtype == torch.bfloat16  # the client casts it to its own
        assert (got.tokens, got.loss) == (want.tokens, pytest.approx(want.loss, 2e-2))
        assert cosine(got.grad, want.grad) > 0.99
    # adapters, their optimizer state and what goes into aggregation: fp32
    for cid in CUTS:
        state = lora.adapter_state(bf16.part.model, f"c{cid}")
        assert state and all(t.dtype == torch.float32 for t in state.values())
        for group in bf16.adapters.optimizer(cid).param_groups:
            for p in group["params"]:
                assert p.dtype == torch.float32
                moments = bf16.adapters.optimizer(cid).state[p]
                assert all(
                    t.dtype == torch.float32
                    for k, t in moments.items()
                    if k != "step" and isinstance(t, torch.Tensor)
                )


def test_a_bf16_server_batches_as_it_serves_one_by_one(tiny):
    arch, folder, config, _ = tiny
    one = server(folder, config, torch.bfloat16)
    many = server(folder, config, torch.bfloat16, batching=True)
    msgs = [smashed(config, cid, accum=1) for cid in CUTS]
    alone = [one.handle(copy.deepcopy(m)) for m in msgs]
    together = many.handle_many([(m, None) for m in msgs])
    for a, b in zip(alone, together, strict=True):
        assert isinstance(b, Gradient) and b.tokens == a.tokens
        assert b.loss == pytest.approx(a.loss, rel=2e-2)
        assert cosine(a.grad, b.grad) > 0.99


def test_the_server_dtype_setting_names_its_values():
    assert load_config(None, ["model.server_dtype=bfloat16"]).model.server_dtype
    with pytest.raises(ConfigError, match="model.server_dtype"):
        load_config(None, ["model.server_dtype=float16"])
