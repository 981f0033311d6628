"""Properties of mixed-rank, layer-wise LoRA aggregation (see docs/aggregation.md)."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from splitft.federation.aggregate import aggregate, holders_by_key
from splitft.ranks import rank_of, slice_rank, truncate_to

R, IN, OUT = 8, 6, 5


def a_key(j: int, gpt2: bool = False) -> str:
    if gpt2:
        return f"transformer.h.{j}.attn.c_attn.lora_A.weight"
    return f"model.layers.{j}.self_attn.q_proj.lora_A.weight"


def b_key(j: int, gpt2: bool = False) -> str:
    return a_key(j, gpt2).replace(".lora_A.", ".lora_B.")


def rand_state(layers, rank: int = R, seed: int = 0, dtype=torch.float32, gpt2=False):
    """A and B of every layer in ``layers`` at ``rank``, random (B nonzero)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for j in layers:
        state[a_key(j, gpt2)] = torch.randn(rank, IN, generator=g).to(dtype)
        state[b_key(j, gpt2)] = torch.randn(OUT, rank, generator=g).to(dtype)
    return state


# -- slicing ---------------------------------------------------------------------


def test_rank_of_and_slice_rank():
    s = rand_state([0])
    a, b = s[a_key(0)], s[b_key(0)]
    assert rank_of(a_key(0), a) == R and rank_of(b_key(0), b) == R
    assert torch.equal(slice_rank(a_key(0), a, 3), a[:3])
    assert torch.equal(slice_rank(b_key(0), b, 3), b[:, :3])
    sliced = slice_rank(a_key(0), a, 3)
    sliced.zero_()  # a copy: training it must not touch the global tensor
    assert a.abs().sum() > 0
    bias = torch.randn(OUT)
    assert torch.equal(slice_rank("model.layers.0.mlp.lora_bias", bias, 3), bias)


def test_slice_rank_errors_name_the_key():
    a = torch.randn(R, IN)
    with pytest.raises(ValueError, match="q_proj.lora_A"):
        slice_rank(a_key(0), a, R + 1)
    with pytest.raises(ValueError, match="q_proj.lora_A"):
        slice_rank(a_key(0), a, 0)
    with pytest.raises(ValueError, match="lora_bias"):
        rank_of("model.layers.0.mlp.lora_bias", torch.randn(OUT))


def test_truncate_to():
    g = rand_state([0, 1])
    got = truncate_to(g, {a_key(1): 4, b_key(1): 4})
    assert set(got) == {a_key(1), b_key(1)}
    assert torch.equal(got[a_key(1)], g[a_key(1)][:4])
    assert torch.equal(got[b_key(1)], g[b_key(1)][:, :4])
    with pytest.raises(KeyError, match="layers.7"):
        truncate_to(g, {a_key(7): 4})


# -- aggregation -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_identical_adapters_are_a_fixed_point(dtype):
    g = rand_state(range(4), dtype=dtype)
    updates = [({k: v.clone() for k, v in g.items()}, w) for w in (3, 5, 7)]
    out = aggregate(g, updates)
    assert set(out) == set(g)
    for k in g:
        assert out[k].dtype == dtype
        assert torch.equal(out[k], g[k]), k


def test_same_rank_is_sample_weighted_mean_of_a_and_b_separately():
    g = rand_state([0], seed=0)
    x, y = rand_state([0], seed=1), rand_state([0], seed=2)
    out = aggregate(g, [(x, 1), (y, 3)])
    for k in g:
        torch.testing.assert_close(out[k], (1 * x[k] + 3 * y[k]) / 4)


def test_disjoint_holders_each_key_from_its_only_holder():
    # client side holds layers 0-1 (cut layer 1 at reduced rank 4), server 2-3
    g = rand_state(range(4), seed=0)
    client = rand_state([0], seed=1) | rand_state([1], rank=4, seed=2)
    server = rand_state([2, 3], seed=3)
    out = aggregate(g, [(client, 10), (server, 30)])
    for j in (0, 2, 3):
        holder = client if j == 0 else server
        for k in (a_key(j), b_key(j)):
            assert torch.equal(out[k], holder[k]), k
    assert torch.equal(out[a_key(1)][:4], client[a_key(1)])
    assert torch.equal(out[a_key(1)][4:], g[a_key(1)][4:])
    assert torch.equal(out[b_key(1)][:, :4], client[b_key(1)])
    assert torch.equal(out[b_key(1)][:, 4:], g[b_key(1)][:, 4:])
    assert holders_by_key([(client, 10), (server, 30)])[a_key(2)] == [1]


def test_key_held_by_nobody_keeps_the_global_value():
    g = rand_state(range(3))
    out = aggregate(g, [(rand_state([0], seed=5), 2)])
    for k in (a_key(2), b_key(2)):
        assert torch.equal(out[k], g[k])
        assert out[k].data_ptr() != g[k].data_ptr()  # a copy, not the input
    empty = aggregate(g, [])  # no updates at all: the global, copied
    assert all(torch.equal(empty[k], g[k]) for k in g)


def test_mixed_ranks_are_averaged_per_component_without_dilution():
    g = rand_state([0], seed=0)
    x = rand_state([0], rank=4, seed=1)
    y = rand_state([0], rank=8, seed=2)
    wx, wy = 2.0, 3.0
    out = aggregate(g, [(x, wx), (y, wy)])
    A, B = out[a_key(0)], out[b_key(0)]
    xa, xb, ya, yb = x[a_key(0)], x[b_key(0)], y[a_key(0)], y[b_key(0)]
    torch.testing.assert_close(A[:4], (wx * xa + wy * ya[:4]) / (wx + wy))
    torch.testing.assert_close(B[:, :4], (wx * xb + wy * yb[:, :4]) / (wx + wy))
    # components 4-7 are Y's alone: X's absence is not a zero in the average
    assert torch.equal(A[4:], ya[4:])
    assert torch.equal(B[:, 4:], yb[:, 4:])
    share = truncate_to(out, {a_key(0): 4, b_key(0): 4})
    assert torch.equal(share[a_key(0)], A[:4])
    assert torch.equal(share[b_key(0)], B[:, :4])


def test_exported_global_reproduces_a_single_low_rank_holders_delta_w():
    alpha, cut_rank = 16.0, 4
    scale = alpha / R  # constant across ranks: the holder uses alpha * 4 / 8
    scale_i = (alpha * cut_rank / R) / cut_rank
    assert scale_i == scale
    g = rand_state([0], seed=0)
    g[b_key(0)] = g[b_key(0)].clone()
    g[b_key(0)][:, cut_rank:] = 0  # untrained extra components (PEFT init B = 0)
    holder = rand_state([0], rank=cut_rank, seed=1)
    out = aggregate(g, [(holder, 12)])
    delta_global = scale * out[b_key(0)] @ out[a_key(0)]
    delta_holder = scale_i * holder[b_key(0)] @ holder[a_key(0)]
    torch.testing.assert_close(delta_global, delta_holder)


def test_non_lora_keys_are_averaged_whole():
    key = "model.layers.0.self_attn.q_proj.lora_bias.weight"
    g = {key: torch.zeros(OUT)}
    out = aggregate(
        g, [({key: torch.ones(OUT)}, 1), ({key: torch.full((OUT,), 3.0)}, 1)]
    )
    torch.testing.assert_close(out[key], torch.full((OUT,), 2.0))


def test_gpt2_keys():
    g = rand_state([3], gpt2=True, seed=0)
    x = rand_state([3], rank=4, gpt2=True, seed=1)
    out = aggregate(g, [(x, 1)])
    assert torch.equal(out[a_key(3, True)][:4], x[a_key(3, True)])
    assert torch.equal(out[a_key(3, True)][4:], g[a_key(3, True)][4:])


def test_inputs_are_not_mutated():
    g = rand_state(range(2))
    updates = [(rand_state([0, 1], rank=4, seed=1), 2), (rand_state([1], seed=2), 5)]
    g0, u0 = copy.deepcopy(g), copy.deepcopy(updates)
    aggregate(g, updates)
    assert all(torch.equal(g[k], g0[k]) for k in g)
    for (s, w), (s0, w0) in zip(updates, u0, strict=True):
        assert w == w0 and all(torch.equal(s[k], s0[k]) for k in s0)


@pytest.mark.parametrize("bad", [0, -3, float("nan"), float("inf")])
def test_bad_weight_names_the_update_index(bad):
    g = rand_state([0])
    with pytest.raises(ValueError, match="update 1"):
        aggregate(g, [(rand_state([0]), 1), (rand_state([0]), bad)])


def test_unknown_key_is_named():
    g = rand_state([0])
    with pytest.raises(KeyError, match=r"model\.layers\.5"):
        aggregate(g, [(rand_state([0, 5]), 1)])


def test_wrong_shape_names_key_and_shapes():
    g = rand_state([0])
    bad = rand_state([0])
    bad[a_key(0)] = torch.randn(R, IN + 1)
    bad[b_key(0)] = torch.randn(OUT, R)
    with pytest.raises(ValueError, match=r"lora_A.*\(8, 7\).*\(8, 6\)"):
        aggregate(g, [(bad, 1)])
    too_big = rand_state([0], rank=R + 1)
    with pytest.raises(ValueError, match=r"lora_A.*\(9, 6\)"):
        aggregate(g, [(too_big, 1)])


def test_a_and_b_of_one_module_must_agree_on_rank():
    g = rand_state([0])
    bad = rand_state([0])
    bad[b_key(0)] = torch.randn(OUT, 4)
    with pytest.raises(ValueError, match="update 0.*rank 8.*rank 4"):
        aggregate(g, [(bad, 1)])


# -- property: convexity and weight normalisation ------------------------------------


def reference(g, updates):
    """Per-component loop, float64: the documented definition, written naively."""
    out = {}
    for k, gt in g.items():
        comp_first = (lambda t: t) if ".lora_A." in k else (lambda t: t.T)
        res = comp_first(gt).to(torch.float64).clone()
        for c in range(res.shape[0]):
            num, den = torch.zeros_like(res[c]), 0.0
            for s, w in updates:
                if k in s and rank_of(k, s[k]) > c:
                    num += w * comp_first(s[k])[c].to(torch.float64)
                    den += w
            if den > 0:
                res[c] = num / den
        out[k] = comp_first(res)
    return out


@st.composite
def scenarios(draw):
    n = draw(st.integers(1, 4))
    layers = range(2)
    updates = []
    for h in range(n):
        held = [j for j in layers if draw(st.booleans())]
        state = {}
        for j in held:
            state |= rand_state([j], rank=draw(st.integers(1, R)), seed=100 * h + j)
        weight = draw(st.floats(0.01, 1000, allow_nan=False, allow_infinity=False))
        updates.append((state, weight))
    factor = draw(st.floats(0.001, 1000))
    return rand_state(layers, seed=999), updates, factor


@settings(deadline=None, max_examples=60)
@given(scenarios())
def test_property_convex_and_normalised(scenario):
    g, updates, factor = scenario
    out = aggregate(g, updates)
    ref = reference(g, updates)
    ones = [({k: torch.ones_like(v) for k, v in s.items()}, w) for s, w in updates]
    out_ones = aggregate(g, ones)
    scaled = aggregate(g, [(s, w * factor) for s, w in updates])
    for k, gt in g.items():
        comp_first = (lambda t: t) if ".lora_A." in k else (lambda t: t.T)
        torch.testing.assert_close(out[k].double(), ref[k], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(scaled[k], out[k], atol=1e-6, rtol=1e-6)
        o, o1, gc = comp_first(out[k]), comp_first(out_ones[k]), comp_first(gt)
        for c in range(R):
            vals = [
                comp_first(s[k])[c]
                for s, _w in updates
                if k in s and rank_of(k, s[k]) > c
            ]
            if not vals:
                assert torch.equal(o[c], gc[c]) and torch.equal(o1[c], gc[c])
                continue
            stack = torch.stack(vals)
            tol = 1e-6 * (1 + stack.abs().max())
            assert (o[c] >= stack.min(0).values - tol).all()
            assert (o[c] <= stack.max(0).values + tol).all()
            # the weights of a component's holders sum to one
            torch.testing.assert_close(o1[c], torch.ones_like(o1[c]))


# -- median (federation.aggregation=median) -----------------------------------


def test_the_median_ignores_one_poisoned_holder_whatever_its_weight():
    g = rand_state([0], seed=0)
    honest = [rand_state([0], seed=s) for s in (1, 2, 3)]
    poison = {k: torch.full_like(v, 1e6) for k, v in honest[0].items()}
    updates = [(h, 1.0) for h in honest] + [(poison, 1e9)]
    out = aggregate(g, updates, "median")
    for k in g:
        stacked = torch.stack([h[k] for h in honest] + [poison[k]])
        torch.testing.assert_close(out[k], stacked.quantile(0.5, dim=0))
        assert out[k].abs().max() < 10  # the poisoned values never win
    mean = aggregate(g, updates)
    assert mean[a_key(0)].abs().max() > 1e5  # the weighted mean is pulled


def test_the_median_votes_per_component_over_its_holders_only():
    g = rand_state([0], seed=0)
    x = rand_state([0], rank=4, seed=1)
    y = rand_state([0], rank=8, seed=2)
    z = rand_state([0], rank=8, seed=3)
    out = aggregate(g, [(x, 1.0), (y, 1.0), (z, 1.0)], "median")
    A, xa, ya, za = out[a_key(0)], x[a_key(0)], y[a_key(0)], z[a_key(0)]
    torch.testing.assert_close(
        A[:4], torch.stack([xa, ya[:4], za[:4]]).median(0).values
    )
    # components 4-7: two holders, the mean of the two (not either one)
    torch.testing.assert_close(A[4:], (ya[4:] + za[4:]) / 2)
    g2 = rand_state([0, 1], seed=0)
    alone = aggregate(g2, [(rand_state([1], seed=4), 1.0)], "median")
    assert torch.equal(alone[a_key(0)], g2[a_key(0)])  # held by nobody: kept


def test_identical_adapters_are_the_median_too():
    g, x = rand_state([0, 1], seed=0), rand_state([0, 1], seed=5)
    out = aggregate(g, [(x, 1.0), (copy.deepcopy(x), 7.0)], "median")
    assert all(torch.equal(out[k], x[k]) for k in x)


def test_an_unknown_rule_is_named():
    with pytest.raises(ValueError, match="'trimmed' is not one of"):
        aggregate(rand_state([0]), [(rand_state([0]), 1.0)], "trimmed")
