"""A client's data order is a function of its seed: it can be put at any batch."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from splitft.data.order import BatchOrder


def order(n, batch_size, seed=0):
    return BatchOrder(n, batch_size, np.random.default_rng([seed, 1]))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 23),
    batch_size=st.integers(1, 6),
    drawn=st.integers(0, 40),
    start=st.integers(0, 40),
)
def test_seek_draws_what_an_uninterrupted_order_draws(n, batch_size, drawn, start):
    straight = order(n, batch_size)
    for _ in range(drawn):
        straight.next()
    expected = [straight.next().tolist() for _ in range(7)]
    resumed = order(n, batch_size)
    for _ in range(start):  # wherever it was: a round run again, or ahead
        resumed.next()
    resumed.seek(drawn)
    assert [resumed.next().tolist() for _ in range(7)] == expected
    assert resumed.drawn == straight.drawn


def test_a_new_order_seeks_to_the_same_place_as_a_checkpointed_one():
    a = order(10, 3)
    for _ in range(5):
        a.next()
    b = order(10, 3)
    b.load_state_dict(a.state_dict())
    c = order(10, 3)
    c.seek(5)
    assert a.next().tolist() == b.next().tolist() == c.next().tolist()
