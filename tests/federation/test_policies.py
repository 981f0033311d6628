"""Cut-layer policies on synthetic fleets: what each one does with what it sees."""

import dataclasses

import numpy as np
from synthetic import device, world

from splitft.config import PlannerConfig
from splitft.federation.policies import PolicyContext, RoundOutcome, make_policy
from splitft.sim.estimator import Estimator
from splitft.sim.predict import predict_round

LAPTOP = device(2.0, 0, 50, 50, name="laptop")
PHONE = device(8.0, 250, 10, 20, name="phone")


def context(devices, policy, speed=1.0, fixed=None, side="per_client", **planner):
    w = world(devices, speed=speed)
    ctx = PolicyContext(
        num_layers=30,
        k_min=1,
        k_max=29,
        fixed=fixed or dict.fromkeys(devices, 2),
        settings=PlannerConfig(**planner),
        server_side=side,
        estimator=Estimator(w, ewma=1.0),
        rng=np.random.default_rng(0),
    )
    return make_policy(policy, ctx), ctx


def steps_of(cuts, slots=256, n=4, acc=None):
    acc = acc or {}
    return [
        dict(client=c, step=s, slots=slots, tokens=100, token_acc=acc.get(c, 0.5))
        for c in cuts
        for s in range(n)
    ]


def play(policy, ctx, rnd, truth, acc=None):
    """Plan a round, 'run' it in the true world, let policy and beliefs observe."""
    cuts = policy.plan(rnd, sorted(truth.devices))
    predicted = predict_round(cuts, ctx.estimator.world)
    timing = predict_round(cuts, truth)
    steps = steps_of(cuts, acc=acc)
    policy.observe(RoundOutcome(rnd, cuts, predicted, timing, steps))
    ctx.estimator.observe(cuts, timing, steps)
    return cuts


def test_adaptive_moves_a_client_that_slowed_down_to_a_shallower_cut():
    devices = {c: LAPTOP for c in range(4)}
    policy, ctx = context(devices, "adaptive", speed=1.0, replan_every=0)
    truth = world(devices, speed=1.0)
    first = play(policy, ctx, 0, truth)
    assert play(policy, ctx, 1, truth) == first  # as predicted: no re-plan
    assert policy.reason == ""
    slowed = dataclasses.replace(truth, compute={**truth.compute, 0: 8 * 2.0})
    play(policy, ctx, 2, slowed)  # client 0 is 8x slower than believed
    assert ctx.estimator.world.compute[0] == 16.0  # ewma=1: the belief moved
    after = policy.plan(3, [0, 1, 2, 3])
    assert "client 0 took" in policy.reason
    assert after[0] < first[0]
    assert predict_round(after, slowed).makespan < predict_round(first, slowed).makespan


def test_adaptive_replans_every_n_rounds_and_never_exceeds_budgets():
    devices = {0: LAPTOP, 1: PHONE, 2: LAPTOP, 3: PHONE}
    policy, ctx = context(devices, "adaptive", speed=2.0, replan_every=2)
    truth = world(devices, speed=2.0)
    reasons = []
    for rnd in range(5):
        cuts = play(policy, ctx, rnd, truth)
        reasons.append(policy.reason)
        for cid, k in cuts.items():
            assert truth.fits(cid, k)
    assert reasons[0] == "first plan" and reasons[2] == reasons[4] == "every 2 rounds"
    assert reasons[1] == reasons[3] == ""


def test_adaptive_on_a_shared_server_side_trades_slack_for_shallower_cuts():
    devices = {0: device(1.0), 1: LAPTOP, 2: PHONE, 3: device(1.0)}
    fast, _ = context(devices, "adaptive")
    shared, ctx = context(devices, "adaptive", side="shared", eps=0.2)
    w = ctx.estimator.world
    by_time, by_learning = fast.plan(0, [0, 1, 2, 3]), shared.plan(0, [0, 1, 2, 3])
    assert sum(by_learning.values()) < sum(by_time.values())
    assert all(by_learning[c] <= by_time[c] for c in devices)
    m = predict_round(by_time, w).makespan
    assert m < predict_round(by_learning, w).makespan <= 1.2 * m + 1e-9
    # a re-plan keeps the shallow cuts: settle alone would move back to by_time
    play(shared, ctx, 0, w)
    shared._due = "test"
    assert shared.plan(1, [0, 1, 2, 3]) == by_learning


def test_fixed_keeps_the_list_even_over_budget():
    devices = {0: LAPTOP, 1: PHONE}
    policy, _ = context(devices, "fixed", fixed={0: 3, 1: 12})
    assert policy.plan(0, [0, 1]) == {0: 3, 1: 12}


def test_random_is_seeded_and_inside_memory_and_bounds():
    devices = {0: LAPTOP, 1: PHONE}
    a, ctx = context(devices, "random")
    b, _ = context(devices, "random")
    plans = [a.plan(r, [0, 1]) for r in range(20)]
    assert plans == [b.plan(r, [0, 1]) for r in range(20)]
    hi = ctx.estimator.world.deepest_fit(1, 29)
    assert {p[1] for p in plans} <= set(range(1, hi + 1))
    assert len({p[0] for p in plans}) > 5


def test_splitft_rule_gives_accurate_clients_more_layers():
    devices = {c: LAPTOP for c in range(3)}
    policy, ctx = context(devices, "splitft", gamma=0.5, max_move=3)
    policy.cuts = dict.fromkeys(devices, 10)  # as if earlier rounds led here
    start = play(policy, ctx, 0, world(devices), acc={0: 0.8, 1: 0.5, 2: 0.2})
    assert start == dict.fromkeys(devices, 10)  # no accuracies yet: no change
    after = policy.plan(1, [0, 1, 2])
    assert after[0] == start[0] + 3  # capped by max_move
    assert after[1] == start[1]
    assert after[2] == start[2] - 3


def test_splitft_initial_cuts_follow_compute_speed():
    devices = {0: device(1.0), 1: device(4.0)}
    policy, _ = context(devices, "splitft")
    cuts = policy.plan(0, [0, 1])
    assert cuts[0] == 29 and cuts[1] < cuts[0]
