"""The adaptive planner on synthetic fleets: no model, only the cost model."""

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from synthetic import device, world

from splitft.federation import planner
from splitft.sim.predict import predict_round

MIX = [
    device(1.0, 0, 100, 100, name="workstation"),
    device(2.0, 0, 50, 50, name="laptop"),
    device(4.0, 300, 20, 40, name="tablet"),
    device(8.0, 250, 10, 20, name="phone"),
]

fleets = st.lists(
    st.builds(
        device,
        slowdown=st.sampled_from([0.5, 1.0, 2.0, 4.0, 8.0, 16.0]),
        memory_mb=st.sampled_from([0, 250, 300, 450, 800]),
        up=st.sampled_from([5.0, 10.0, 50.0, 100.0, 1000.0]),
        down=st.sampled_from([10.0, 50.0, 100.0, 1000.0]),
        rtt_ms=st.sampled_from([1.0, 20.0, 80.0]),
    ),
    min_size=1,
    max_size=8,
)


def makespan(cuts, w):
    return predict_round(cuts, w).makespan


@settings(max_examples=40, deadline=None)
@given(
    fleet=fleets,
    speed=st.sampled_from([0.5, 1.0, 4.0, 16.0]),
    workers=st.sampled_from([1, 2]),
    k_min=st.sampled_from([1, 2]),
    k_max=st.sampled_from([8, 29]),
)
def test_plan_respects_budgets_bounds_and_beats_every_uniform_cut(
    fleet, speed, workers, k_min, k_max
):
    devices = dict(enumerate(fleet))
    w = world(devices, speed=speed, workers=workers)
    plan = planner.fastest(w, list(devices), k_min, k_max)
    for cid, k in plan.cuts.items():
        assert k_min <= k <= k_max
        worst = w.workload.worst_slots
        assert w.costs.client_memory(k, worst, worst) <= devices[cid].memory
    assert plan.makespan == pytest.approx(makespan(plan.cuts, w))
    for k in range(k_min, k_max + 1):
        if all(w.fits(cid, k) for cid in devices):  # a uniform cut that can run
            assert plan.makespan <= makespan(dict.fromkeys(devices, k), w) * (1 + 1e-9)


@settings(max_examples=25, deadline=None)
@given(
    fleet=st.lists(st.sampled_from(MIX), min_size=2, max_size=3),
    speed=st.sampled_from([0.5, 1.0, 2.0, 8.0]),
    steps=st.sampled_from([1, 3]),
)
def test_plan_is_within_ten_percent_of_exhaustive_search(fleet, speed, steps):
    devices = dict(enumerate(fleet))
    w = world(devices, speed=speed, steps=steps, num_layers=8)
    ranges = planner.feasible(w, list(devices), 1, 7)
    best = min(
        makespan(dict(zip(devices, ks, strict=True)), w)
        for ks in itertools.product(*(range(lo, hi + 1) for lo, hi in ranges.values()))
    )
    plan = planner.fastest(w, list(devices), 1, 7)
    assert plan.makespan <= best * 1.10


def test_binary_search_gives_slow_clients_shallow_and_fast_ones_deep_cuts():
    devices = {0: MIX[0], 1: MIX[0], 2: MIX[3], 3: MIX[3]}
    w = world(devices, speed=2.0)
    plan = planner.fastest(w, list(devices), 1, 29)
    assert min(plan.cuts[0], plan.cuts[1]) > max(plan.cuts[2], plan.cuts[3])
    two = makespan(dict.fromkeys(devices, 2), w)
    assert plan.makespan < 0.9 * two


def test_memory_budget_that_cannot_hold_k_min_is_a_clear_error():
    devices = {0: MIX[0], 1: device(8.0, 120, name="watch")}
    w = world(devices)
    with pytest.raises(
        planner.Infeasible, match=r"client 1 \(watch\).*120 MB.*k_min=1"
    ):
        planner.fastest(w, [0, 1], 1, 29)


def test_settle_keeps_cuts_unless_the_move_pays():
    devices = {c: MIX[c % 4] for c in range(4)}
    w = world(devices, speed=2.0)
    ranges = planner.feasible(w, list(devices), 1, 29)
    target = planner.fastest(w, list(devices), 1, 29)
    nudged = {c: max(lo, target.cuts[c] - 1) for c, (lo, _) in ranges.items()}
    # a one-block difference gains little: with a 50 % bar it stays put
    assert planner.settle(w, nudged, target, ranges, 4, 0.5, 4) == nudged
    # from k = 1 everywhere the move pays, but goes at most max_move blocks
    ones = dict.fromkeys(devices, 1)
    moved = planner.settle(w, ones, target, ranges, 2, 0.0, 4)
    assert moved != ones
    assert all(abs(moved[c] - 1) <= 2 for c in devices)
    # a cut that no longer fits its range is moved into it regardless
    far = {**nudged, 3: 20}
    assert planner.settle(w, far, target, ranges, 4, 0.99, 1)[3] <= ranges[3][1]


def test_settle_relieves_a_slowed_client_at_once_but_deepens_step_by_step():
    devices = {c: MIX[c % 4] for c in range(4)}
    w = world(devices, speed=1.0)
    ranges = planner.feasible(w, list(devices), 1, 29)
    before = planner.fastest(w, list(devices), 1, 29)
    assert before.cuts[0] >= 20  # the workstation holds most of the model
    slowed = world({**devices, 0: device(32.0, 0, 100, 100)}, speed=1.0)
    target = planner.fastest(slowed, list(devices), 1, 29)
    assert target.cuts[0] < before.cuts[0] - 4
    moved = planner.settle(slowed, before.cuts, target, ranges, 4, 0.0, 4)
    assert moved[0] == target.cuts[0]  # giving blocks back is free: no cap
    assert makespan(moved, slowed) < makespan(before.cuts, slowed)
    # the other way (the client recovers) it deepens max_move blocks a round
    back = planner.settle(w, target.cuts, before, ranges, 4, 0.0, 4)
    assert back[0] <= target.cuts[0] + 4


def test_quality_gives_blocks_to_the_server_within_the_budget():
    devices = {c: MIX[c % 2] for c in range(4)}
    w = world(devices, speed=1.0)
    ranges = planner.feasible(w, list(devices), 1, 29)
    plan = planner.fastest(w, list(devices), 1, 29)
    drift = {0: 3.0, 1: 0.1, 2: 0.2, 3: 0.1}
    budget = plan.makespan * 1.10
    out = planner.shallower_for_quality(w, plan.cuts, ranges, drift, budget)
    assert makespan(out, w) <= budget + 1e-9
    assert all(out[c] <= plan.cuts[c] for c in devices)  # only ever shallower
    assert sum(out.values()) < sum(plan.cuts.values())
    # the most drifting of two equal clients (0 and 2 are both workstations)
    assert out[0] <= out[2]
    # no slack: nothing that lengthens the round moves
    same = planner.shallower_for_quality(w, plan.cuts, ranges, drift, plan.makespan)
    assert makespan(same, w) <= plan.makespan + 1e-9
    # all the slack in the world: every client at its shallowest cut
    every = planner.shallower_for_quality(w, plan.cuts, ranges, drift, 1e9)
    assert every == {c: lo for c, (lo, _) in ranges.items()}
