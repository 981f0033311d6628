"""decode is a validating parser: any bytes give a message or Malformed."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from splitft.split.errors import Malformed
from splitft.split.messages import (
    MESSAGES,
    Ack,
    AdapterUpdate,
    Gradient,
    Join,
    RoundPlan,
    RoundRequest,
    SmashedData,
    Stop,
    Wait,
    decode,
    encode,
    step_report,
)

B, T, H = 2, 3, 4
GOOD = [
    Join(0, 8, 1000),
    RoundRequest(1, -1),
    RoundPlan(0, 1, 2, [1e-3, 5e-4], {"a.lora_A.weight": torch.ones(2, 4)}),
    Wait(0, 3, 0.5),
    Stop(0, "done"),
    Stop(1, "the server was interrupted (SIGTERM)", resumes=True),
    SmashedData(
        0,
        0,
        0,
        1,
        torch.randn(B, T, H),
        None,
        torch.zeros(B, T, dtype=torch.long),
        torch.full((B, T), -100),
    ),
    Gradient(0, 0, 0, 1.5, 3, 0.25, torch.randn(B, T, H), 2),
    AdapterUpdate(
        0,
        1,
        8,
        {"a.lora_B.weight": torch.zeros(4, 2)},
        step_report(
            [
                dict(
                    step=0,
                    loss=1.0,
                    tokens=3,
                    token_acc=0.5,
                    slots=6,
                    lr=1e-3,
                    client_seconds=0.1,
                    server_seconds=0.2,
                )
            ]
        ),
    ),
    Ack(0, "", ""),
]


@pytest.mark.parametrize("msg", GOOD, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(msg):
    back = decode(encode(msg))
    assert type(back) is type(msg)
    assert len(encode(back)) == len(encode(msg))
    for name, value in vars(msg).items():
        got = getattr(back, name)
        if isinstance(value, torch.Tensor):
            assert torch.equal(got, value)
        elif isinstance(value, dict):
            assert all(torch.equal(got[k], v) for k, v in value.items())
        else:
            assert got == value


@pytest.mark.parametrize("msg", GOOD, ids=lambda m: type(m).__name__)
def test_every_truncation_is_malformed(msg):
    data = encode(msg)
    for cut in range(0, len(data), max(1, len(data) // 40)):
        with pytest.raises(Malformed):
            decode(data[:cut])


def crafted(type_name, fields, tensors=None):
    meta = {"type": type_name, "fields": json.dumps(fields)}
    return save(tensors or {}, metadata=meta)


ok_smashed = {
    "hidden": torch.zeros(B, T, H),
    "position_ids": torch.zeros(B, T, dtype=torch.long),
    "labels": torch.zeros(B, T, dtype=torch.long),
}
smashed_fields = {
    "client_id": 0,
    "step": 0,
    "micro": 0,
    "num_micro": 1,
    "attention_mask": None,
    "step_tokens": 0,
}


@pytest.mark.parametrize(
    ("data", "text"),
    [
        (crafted("Nope", {}), "unknown message type"),
        (crafted("RoundRequest", {"client_id": 0}), "missing field 'round'"),
        (crafted("RoundRequest", {"client_id": 0, "round": 0, "x": 1}), "unexpected"),
        (crafted("RoundRequest", {"client_id": True, "round": 0}), "integer"),
        (crafted("RoundRequest", {"client_id": "0", "round": 0}), "integer"),
        (crafted("RoundRequest", {"client_id": 0.0, "round": 0}), "integer"),
        (crafted("RoundRequest", {"client_id": [0], "round": 0}), "integer"),
        (
            crafted("Wait", {"client_id": 0, "round": 0, "retry_after_seconds": 1e999}),
            "finite",
        ),
        (crafted("Stop", {"client_id": 0, "reason": 5}), "string"),
        (
            crafted(
                "RoundPlan",
                {
                    "client_id": 0,
                    "round": 0,
                    "cut_layer": 1,
                    "lrs": [1, "x"],
                    "adapter": {},
                },
            ),
            "finite numbers",
        ),
        (
            crafted(
                "RoundPlan",
                {"client_id": 0, "round": 0, "cut_layer": 1, "lrs": 0.1, "adapter": {}},
            ),
            "finite numbers",
        ),
        (
            crafted(
                "SmashedData",
                smashed_fields,
                {**ok_smashed, "hidden": torch.zeros(B, T, H, dtype=torch.long)},
            ),
            "SmashedData.hidden: dtype torch.int64 not allowed",
        ),
        (
            crafted(
                "SmashedData",
                smashed_fields,
                {**ok_smashed, "labels": torch.zeros(B, T)},
            ),
            "labels: dtype",
        ),
        (
            crafted(
                "SmashedData",
                smashed_fields,
                {**ok_smashed, "position_ids": torch.zeros(B, T, dtype=torch.int8)},
            ),
            "position_ids: dtype",
        ),
        (
            crafted(
                "SmashedData",
                smashed_fields,
                {**ok_smashed, "hidden": torch.zeros(B * T, H)},
            ),
            "3 dimensions",
        ),
        (
            crafted(
                "SmashedData",
                smashed_fields,
                {**ok_smashed, "labels": torch.zeros(B, T, 1, dtype=torch.long)},
            ),
            "2 dimensions",
        ),
        (
            crafted(
                "SmashedData",
                smashed_fields,
                {k: v for k, v in ok_smashed.items() if k != "labels"},
            ),
            "missing field 'labels'",
        ),
        (
            crafted(
                "AdapterUpdate",
                {"client_id": 0, "round": 0, "num_samples": 1, "adapter": {}},
                {"adapter/k": torch.zeros(2, dtype=torch.int32)},
            ),
            "dtype",
        ),
        (
            crafted(
                "AdapterUpdate",
                {"client_id": 0, "round": 0, "num_samples": 1, "adapter": []},
                {"adapter/k": torch.zeros(2)},
            ),
            "tensor dict",
        ),
        (
            crafted(
                "AdapterUpdate",
                {
                    "client_id": 0,
                    "round": 0,
                    "num_samples": 1,
                    "adapter": {},
                    "report": None,
                },
                {"report": torch.zeros(1, 8)},
            ),
            "report: dtype",
        ),
        (
            crafted(
                "Gradient",
                {
                    "client_id": 0,
                    "step": 0,
                    "micro": 0,
                    "loss": 0.0,
                    "tokens": 0,
                    "correct": 0,
                },
                {
                    "grad": torch.zeros(B, T, H),
                    "server_seconds": torch.zeros(2, dtype=torch.float64),
                },
            ),
            "expected a number",
        ),
        (
            crafted("Stop", {"client_id": 0, "reason": "", "resumes": 1}, {}),
            "Stop.resumes: expected true or false",
        ),
        (save({}, metadata={"fields": "{}"}), "no type and fields"),
        (save({}, metadata={"type": "Ack", "fields": "[1]"}), "JSON object"),
        (save({}, metadata={"type": "Ack", "fields": "{bad"}), "not a SplitFT"),
        ((10**9).to_bytes(8, "little") + b"{}", "header length"),
        (b"\x05\x00\x00\x00\x00\x00\x00\x00\xff\xfe\x00\x01\x02", "not a SplitFT"),
        (b"\x00" * 3, "shorter"),
    ],
)
def test_a_bad_field_is_named(data, text):
    with pytest.raises(Malformed, match=None) as err:
        decode(data)
    assert text in str(err.value)
    assert "\n" not in str(err.value)


@settings(max_examples=300)
@given(st.binary(max_size=400))
def test_any_bytes_give_a_message_or_malformed(data):
    try:
        msg = decode(data)
    except Malformed:
        return
    assert type(msg).__name__ in MESSAGES


@settings(max_examples=200)
@given(st.integers(0, len(GOOD) - 1), st.integers(0, 10**6), st.integers(0, 255))
def test_a_flipped_byte_gives_a_message_or_malformed(which, at, value):
    data = bytearray(encode(GOOD[which]))
    data[at % len(data)] = value
    try:
        decode(bytes(data))
    except Malformed:
        pass
