"""Packed rows give every example the logits and loss it gets alone."""

import pytest
import torch
from tiny import batch

from splitft.data import collate
from splitft.data.packing import pack
from splitft.models.parts import WeightStore, client_part, server_part


def examples():
    b = batch(B=3, T=7, seed=5)
    lengths = [7, 4, 6]
    return [
        {
            "input_ids": b["input_ids"][i, :n].tolist(),
            "labels": b["input_ids"][i, :n].tolist(),
        }
        for i, n in enumerate(lengths)
    ]


def test_pack_order_positions_and_boundary_labels():
    rows = pack(examples(), max_length=12)
    assert [len(r["input_ids"]) for r in rows] == [11, 6]  # 7+4, then 6
    assert rows[0]["position_ids"] == list(range(7)) + list(range(4))
    assert rows[0]["labels"][0] == -100 and rows[0]["labels"][7] == -100
    with pytest.raises(ValueError, match="max_length=5"):
        pack(examples(), max_length=5)


@pytest.mark.parametrize("k", [1, 3])
def test_packed_split_forward_equals_each_example_alone(tiny, k):
    _, folder, config, model = tiny
    store = WeightStore(folder)
    client, server = client_part(store, config, k), server_part(store, config, k)
    exs = examples()
    b = collate(pack(exs, max_length=12), pad_token_id=0)
    assert b["attention_mask"] is None
    with torch.no_grad():
        h = client.client_forward(b["input_ids"], None, b["position_ids"])
        out = server.logits_from_hidden(h, None, b["position_ids"], b["labels"])
        starts = [(0, 0), (0, 7), (1, 0)]  # (packed row, offset) of each example
        loss_sum = tokens = 0
        for ex, (row, off) in zip(exs, starts, strict=True):
            ids = torch.tensor([ex["input_ids"]])
            alone = model(input_ids=ids, labels=ids)
            n = ids.shape[1]
            torch.testing.assert_close(
                out.logits[row, off : off + n], alone.logits[0], atol=1e-5, rtol=0
            )
            loss_sum += float(alone.loss) * (n - 1)
            tokens += n - 1
    assert float(out.loss) == pytest.approx(loss_sum / tokens, abs=1e-5)
