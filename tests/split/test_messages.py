import torch

from splitft.split.messages import ADAPTERS, RoundPlan, SmashedData, decode, encode


def test_round_trip_keeps_dtype_shape_and_fields():
    msg = SmashedData(
        3,
        1,
        0,
        2,
        torch.randn(2, 5, 8, dtype=torch.bfloat16),
        torch.ones(2, 5, dtype=torch.long),
        torch.arange(5).expand(2, 5),
        torch.full((2, 5), -100),
    )
    back = decode(encode(msg))
    assert isinstance(back, SmashedData) and back.client_id == 3 and back.num_micro == 2
    assert back.hidden.dtype == torch.bfloat16 and back.hidden.shape == (2, 5, 8)
    assert torch.equal(back.hidden, msg.hidden) and torch.equal(back.labels, msg.labels)


def test_adapter_dict_and_byte_count():
    a = {"model.layers.0.q.lora_A.weight": torch.randn(4, 16)}
    data = encode(RoundPlan(0, 2, 5, [1e-3, 5e-4], a))
    back = decode(data)
    assert back.lrs == [1e-3, 5e-4] and back.cut_layer == 5 and back.kind == ADAPTERS
    assert torch.equal(
        back.adapter["model.layers.0.q.lora_A.weight"],
        a["model.layers.0.q.lora_A.weight"],
    )
    # the payload dominates: 64 float32 values plus a small header
    assert 4 * 64 < len(data) < 4 * 64 + 1024


def test_a_measured_duration_never_changes_a_messages_size():
    from splitft.split.messages import Gradient

    sizes = {
        len(encode(Gradient(0, 0, 0, 1.25, 3, seconds, torch.zeros(1, 2, 4))))
        for seconds in (0.0, 0.1, 1 / 3, 123.456789, 1e-9)
    }
    assert len(sizes) == 1
    back = decode(encode(Gradient(0, 0, 0, 1.25, 3, 1 / 3, torch.zeros(1, 2, 4))))
    assert back.server_seconds == 1 / 3 and isinstance(back.server_seconds, float)
