"""The pure request checks of split/guards.py, without a server."""

import re

import pytest
import torch

from splitft.split import guards
from splitft.split.errors import Malformed, OutOfOrder, TooLarge
from splitft.split.messages import AdapterUpdate, Join, SmashedData

LIMITS = guards.Limits(
    num_layers=4,
    hidden_size=8,
    vocab_size=50,
    batch_size=2,
    max_length=16,
    context=32,
    grad_accum=1,
    tail_layers=0,
)


def smashed(B=2, T=5, **kw):
    fields = dict(
        client_id=0,
        step=0,
        micro=0,
        num_micro=1,
        hidden=torch.zeros(B, T, 8),
        attention_mask=None,
        position_ids=torch.arange(T).expand(B, T),
        labels=torch.full((B, T), -100),
    )
    fields.update(kw)
    return SmashedData(**fields)


def check(msg, cut=2, steps=2, expected=(0, 0), pending=None, limits=LIMITS):
    guards.check_smashed(msg, limits, cut, steps, expected, pending)


def test_a_well_formed_micro_batch_passes():
    check(smashed())


@pytest.mark.parametrize(
    "msg, error, words",
    [
        (smashed(hidden=torch.zeros(2, 5, 7)), Malformed, "(B, T, 8)"),
        (smashed(B=3, T=5), TooLarge, "train.batch_size"),
        (smashed(T=17), TooLarge, "at most 16"),
        (smashed(labels=None), Malformed, "labels are missing"),
        (smashed(labels=torch.full((2, 5), 50)), Malformed, "token ids in [0, 50)"),
        (smashed(position_ids=torch.full((2, 5), 32)), Malformed, "[0, 32)"),
        (smashed(attention_mask=torch.full((2, 5), 2)), Malformed, "0 or 1"),
        (smashed(step=2), Malformed, "step 2 not in [0, 2)"),
        (smashed(num_micro=2), Malformed, "train.grad_accum is 1"),
        (smashed(step=1), OutOfOrder, "expected step 0 micro 0"),
        (smashed(hidden=torch.full((2, 5, 8), float("nan"))), Malformed, "non-finite"),
    ],
)
def test_each_fault_is_refused_by_class_with_what_is_allowed(msg, error, words):
    with pytest.raises(error, match=re.escape(words)):
        check(msg)


def test_a_u_shaped_server_refuses_labels_and_an_awaited_tail():
    u = guards.Limits(**{**LIMITS.__dict__, "tail_layers": 1})
    with pytest.raises(Malformed, match="labels must stay on the client"):
        check(smashed(), limits=u)
    with pytest.raises(OutOfOrder, match="TailGradient of step 0 micro 0"):
        check(smashed(labels=None), limits=u, pending=(0, 0))
    with pytest.raises(OutOfOrder, match="trains locally"):
        check(smashed(), cut=4)


def test_joins_uploads_and_norms():
    guards.check_join(Join(0, 10), None, 10)
    with pytest.raises(Malformed, match="num_samples must be a whole number > 0"):
        guards.check_join(Join(0, 0), None, 10)
    with pytest.raises(OutOfOrder, match="cannot change to 11"):
        guards.check_join(Join(0, 11), 10, 100)
    key = "model.layers.0.self_attn.q_proj.lora_A.weight"
    global_state = {key: torch.ones(4, 8)}
    up = AdapterUpdate(0, 0, 5, {key: torch.ones(2, 8)})
    guards.check_upload(up, {key: 2}, global_state, "[0, 1)", 5)
    with pytest.raises(Malformed, match=r"shape \(2, 8\), not \(3, 8\)"):
        guards.check_upload(up, {key: 3}, global_state, "[0, 1)", 5)
    with pytest.raises(Malformed, match="more than the 4 it declared"):
        guards.check_upload(up, {key: 2}, global_state, "[0, 1)", 4)
    with pytest.raises(Malformed, match="missing"):
        guards.check_upload(AdapterUpdate(0, 0, 5, {}), {key: 2}, global_state, "", 5)
    with pytest.raises(OutOfOrder, match="has not joined this run"):
        guards.check_upload(up, {key: 2}, global_state, "[0, 1)", None)
    guards.check_norm(0, up.adapter, {key: 2}, global_state, 1.0)  # equal norms
    big = {key: torch.full((2, 8), 3.0)}
    with pytest.raises(Malformed, match="upload_norm_bound=2.0"):
        guards.check_norm(0, big, {key: 2}, global_state, 2.0)
    guards.check_norm(0, big, {key: 2}, global_state, 0.0)  # 0: no bound


@pytest.mark.parametrize(
    ("n", "error", "words"),
    [
        (0, Malformed, "whole number > 0"),
        (-3, Malformed, "whole number > 0"),
        (True, Malformed, "whole number > 0"),
        (2.5, Malformed, "whole number > 0"),
        (float("inf"), Malformed, "whole number > 0"),
        (101, TooLarge, "federation.max_samples_per_client=100"),
        (10**18, TooLarge, "federation.max_samples_per_client=100"),
        (10**400, TooLarge, "federation.max_samples_per_client=100"),
    ],
)
def test_a_join_declares_a_bounded_whole_number_of_samples(n, error, words):
    with pytest.raises(error, match=re.escape(words)):
        guards.check_join(Join(0, n), None, 100)


@pytest.mark.parametrize("n", [0, -1, True, 1e308, 10**400, 9])
def test_an_upload_weighs_at_most_what_its_client_declared(n):
    key = "model.layers.0.self_attn.q_proj.lora_A.weight"
    up = AdapterUpdate(0, 0, n, {key: torch.ones(2, 8)})
    with pytest.raises(Malformed, match="num_samples"):
        guards.check_upload(up, {key: 2}, {key: torch.ones(4, 8)}, "[0, 1)", 8)
