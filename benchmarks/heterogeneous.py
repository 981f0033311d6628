"""Adaptive cut layers against the baselines on simulated heterogeneous clients.

    python benchmarks/heterogeneous.py [--quick] [--out runs/bench/heterogeneous]

SmolLM2-135M-Instruct, the four default BIG-bench tasks, a length-Dirichlet
partition (alpha 0.5). Three device mixes (``MIX``: compute 1:2:4:8,
10-100 Mbit/s, a tablet that holds only 4 blocks and a phone only 2):

- P1: 8 clients on one server (speed ``--speed`` x this machine);
- P2: P1 with client 1 (a laptop, 2x) slowed 4x (to 8x) from the middle round on;
- P3: 16 clients on one server.

Part A needs no training: the clock's predicted round time of the fixed k=2
cut, the best uniform cut that fits every client, the adaptive plan and the
adaptive plan with ``k_max = L`` (clients that can hold the whole model may
train it alone), for server speeds 1-32 and 8-32 clients, beside a lower
bound no plan can beat (see ``lower_bound``) and, for up to 16 clients, the
best plan a slow annealing search finds (a check on the planner; not in
``--quick``). Part B trains every method on the real model with the
same data, partition, seed and token budget (``--rounds`` x ``--local-steps``
per client) and compares simulated time to a target eval loss fixed in advance
(what fixed k=2 reaches at its last round, per server-side mode), the final
eval loss, bytes, memory and planner time.

Every run evaluates each round. A method may run up to ``--extra`` rounds past
the budget, only to reach the target; the final loss is the budget's. The
learning rate is constant (5e-4), so a longer run's first rounds are the same
run. ``--quick`` runs 3 rounds of 2 steps (P3: 2 rounds), the best uniform cut
predicted by the clock instead of a swept grid, no random, splitft,
FedAvg-LoRA, centralized or ``k_max = L`` runs, and the shared server side
only for P1's fixed k=2 and adaptive; it is meant to finish in under 10
minutes on 2 CPU cores. ``--continue`` adds to an ``--out`` folder's
results.json only the methods it lacks (its settings must match).

Simulated time is the clock's. With ``--timing predicted`` (the default) each
step is priced by one cost model (probed once at start-up on the real model,
or a saved one given with ``--costs``), from the tokens it actually processed,
so every method is timed by the same yardstick and the comparison does not
depend on this machine's jitter (two identical rounds measured here differ by
up to 15 %); the training is the same as with ``--timing measured``, which
replays the measured durations (run it with nothing else on the machine).
Writes results.json, loss_vs_time_<P>.png and cuts_<P>.png to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    client_setting,
    merge,
    probe_default,
    provenance,
    run_method,
    time_to_target,
    train_sizes,
    write_json,
)

from splitft.config import DEFAULT_TASKS, SimConfig  # noqa: E402
from splitft.federation import planner  # noqa: E402
from splitft.sim.costs import CostModel  # noqa: E402
from splitft.sim.predict import (  # noqa: E402
    Workload,
    World,
    expected_labelled,
    expected_slots,
    predict_round,
)
from splitft.sim.profiles import MB, ServerDevice, devices_at  # noqa: E402

MIX = ["ws", "laptop", "tablet", "phone"]
BATCH, MAX_LENGTH = 2, 128


# the cost model the devices' memory is sized by: a float32 client keeping
# its activations (``--client`` changes what a client holds, not the devices);
# None: the run's own cost model
DEVICE_COSTS: CostModel | None = None


def fleet(costs: CostModel) -> dict[str, dict]:
    """The device types; the tablet fits 4 blocks and the phone 2 (plus 1 MB)
    of a float32 client that keeps its activations (:data:`DEVICE_COSTS`)."""
    costs = DEVICE_COSTS or costs
    worst = BATCH * MAX_LENGTH

    def fits(k: int) -> float:
        return round(costs.client_memory(k, worst, worst) / MB + 1.0, 1)

    return {
        "ws": dict(
            slowdown=1.0, memory_mb=2000.0, up_mbps=100.0, down_mbps=100.0, rtt_ms=10.0
        ),
        "laptop": dict(
            slowdown=2.0, memory_mb=1000.0, up_mbps=50.0, down_mbps=50.0, rtt_ms=20.0
        ),
        "tablet": dict(
            slowdown=4.0, memory_mb=fits(4), up_mbps=20.0, down_mbps=40.0, rtt_ms=40.0
        ),
        "phone": dict(
            slowdown=8.0, memory_mb=fits(2), up_mbps=10.0, down_mbps=20.0, rtt_ms=60.0
        ),
    }


def world(
    costs: CostModel, n: int, speed: float, size: tuple[float, float], steps: int
) -> World:
    """n clients of the mix on one server, as the planner would see them;
    ``size``: a batch's token slots and labelled tokens."""
    sim = SimConfig(mix=MIX, profiles=fleet(costs))
    devices = devices_at(sim, n, 0)
    slots, labelled = size
    workload = Workload(
        steps,
        1,
        dict.fromkeys(devices, slots),
        dict.fromkeys(devices, labelled),
        BATCH * MAX_LENGTH,
    )
    return World.of(costs, devices, ServerDevice(speed, 1), workload)


def uniform_times(w: World) -> dict[int, float]:
    """Predicted round time of every uniform cut that every client can hold."""
    clients = list(w.devices)
    return {
        k: predict_round(dict.fromkeys(clients, k), w).makespan
        for k in range(1, w.costs.num_layers)
        if all(w.fits(c, k) for c in clients)
    }


def lower_bound(w: World) -> float:
    """No split plan's round can be shorter than this.

    Two bounds, the larger one: the slowest client alone on an idle server
    at the quickest cut it can hold, and the server's busy time when every
    client holds as many blocks as its memory allows (the least work any plan
    leaves the server) over its workers.
    """
    top = w.costs.num_layers - 1
    fits = {c: [k for k in range(1, top + 1) if w.fits(c, k)] for c in w.devices}
    alone = max(min(predict_round({c: k}, w).makespan for k in fits[c]) for c in fits)
    deepest = {c: w.deepest_fit(c, top) for c in w.devices}
    server = predict_round(deepest, w).server_busy / w.server.workers
    return max(alone, server)


def anneal(w: World, ranges, start: dict[int, int], seed: int = 0) -> float:
    """The shortest predicted round a slow randomised search finds: simulated
    annealing on single-client moves from ``start`` and from random plans
    (a check on the planner, not part of it)."""
    rng = random.Random(seed)
    score = planner._Scorer(w)
    clients = sorted(ranges)
    best = score(start)[0]
    for restart in range(4):
        if restart:
            cuts = {c: rng.randint(*ranges[c]) for c in clients}
        else:
            cuts = dict(start)
        now = score(cuts)[0]
        temp = 0.2 * now
        for _ in range(4000):
            c = rng.choice(clients)
            trial = {**cuts, c: rng.randint(*ranges[c])}
            t = score(trial)[0]
            if t < now or rng.random() < math.exp((now - t) / temp):
                cuts, now = trial, t
                best = min(best, t)
            temp *= 0.999
    return best


# ---------------------------------------------------------------- part A
def part_a(
    costs: CostModel, size: tuple[float, float], steps: int, check: bool
) -> list[dict]:
    """Predicted round time of fixed k=2, the best fitting uniform cut, adaptive
    and adaptive with k_max = L, and (``check``) an annealing search's best."""
    rows = []
    for n in (8, 16, 32):
        for speed in (1, 2, 4, 8, 16, 32):
            w = world(costs, n, speed, size, steps)
            clients = list(w.devices)
            fixed2 = predict_round(dict.fromkeys(clients, 2), w).makespan
            uniform = uniform_times(w)
            best_k = min(uniform, key=uniform.get)
            plan = planner.fastest(w, clients, 1, costs.num_layers - 1)
            bound = lower_bound(w)
            whole = planner.fastest(w, clients, 1, costs.num_layers)
            search = None
            if check and n <= 16:  # the search's cost grows with the clients
                ranges = planner.feasible(w, clients, 1, costs.num_layers - 1)
                search = anneal(w, ranges, plan.cuts)
            rows.append(
                dict(
                    clients=n,
                    server_speed=speed,
                    fixed2_s=fixed2,
                    best_uniform_k=best_k,
                    best_uniform_s=uniform[best_k],
                    adaptive_s=plan.makespan,
                    adaptive_vs_fixed2=plan.makespan / fixed2,
                    adaptive_vs_uniform=plan.makespan / uniform[best_k],
                    bound_s=bound,
                    bound_vs_fixed2=bound / fixed2,
                    planner_ms=plan.seconds * 1e3,
                    adaptive_cuts=[plan.cuts[c] for c in sorted(plan.cuts)],
                    search_s=search,
                    search_vs_fixed2=search and search / fixed2,
                    whole_s=whole.makespan,
                    whole_vs_fixed2=whole.makespan / fixed2,
                    whole_cuts=[whole.cuts[c] for c in sorted(whole.cuts)],
                )
            )
    return rows


def print_part_a(rows: list[dict]) -> None:
    print("\nPart A: predicted round time (s) by the clock, no training")
    print(
        "(vs k=2: over fixed k=2's round; search: the best an annealing search "
        "finds, 8-16 clients; k_max=L: adaptive allowed to give a client the "
        "whole model)"
    )
    print(
        f"{'clients':>7} {'speed':>5} {'fixed k=2':>9} {'best unif.':>10} "
        f"{'adaptive':>8} {'vs k=2':>7} {'vs unif.':>8} {'bound':>6} {'vs k=2':>7} "
        f"{'search':>6} {'k_max=L':>7} {'plan ms':>7}  adaptive cuts"
    )
    for r in rows:
        search = r.get("search_vs_fixed2")
        whole = r.get("whole_vs_fixed2")
        print(
            f"{r['clients']:>7} {r['server_speed']:>5} {r['fixed2_s']:>9.2f} "
            f"{r['best_uniform_s']:>7.2f} k={r['best_uniform_k']:<2}"
            f"{r['adaptive_s']:>8.2f} {r['adaptive_vs_fixed2']:>7.2f} "
            f"{r['adaptive_vs_uniform']:>8.2f} {r['bound_s']:>6.2f} "
            f"{r['bound_vs_fixed2']:>7.2f} "
            f"{'-' if search is None else f'{search:.2f}':>6} "
            f"{'-' if whole is None else f'{whole:.2f}':>7} "
            f"{r['planner_ms']:>7.0f}  "
            + " ".join(map(str, r["adaptive_cuts"][:16]))
            + (" ..." if len(r["adaptive_cuts"]) > 16 else "")
        )


# ---------------------------------------------------------------- part B
def base_tree(args, out: Path, profile: str, costs: CostModel) -> dict:
    n = 16 if profile == "P3" else 8
    tree = {
        "out_dir": str(out / profile),
        "seed": args.seed,
        "data": {
            "tasks": list(DEFAULT_TASKS),
            "max_length": MAX_LENGTH,
            "eval_size": args.eval_size,
            "max_train_per_task": args.train_per_task,
        },
        "partition": {"method": "length_dirichlet", "alpha": 0.5},
        "train": {
            "batch_size": BATCH,
            "lr": 5e-4,
            "schedule": "constant",
            "warmup_steps": 2,
        },
        "federation": {
            "num_clients": n,
            "rounds": args.rounds + args.extra,
            "local_steps": args.local_steps,
        },
        "eval": {
            "every": 1,
            "accuracy": False,
            "accuracy_examples": args.accuracy_examples,
            "max_new_tokens": 8,
        },
        "client": dict(
            zip(("base_dtype", "checkpointing"), args.client.split("/"), strict=True)
        ),
        "sim": {
            "mix": MIX,
            "profiles": fleet(costs),
            "server_speed": args.speed,
            "server_workers": 1,
            "timing": args.timing,
        },
    }
    if profile == "P2":  # a laptop slows down 4x from the middle round on
        change = {"round": args.rounds // 2, "client": 1, "slowdown": 8.0}
        tree["sim"]["changes"] = [change]
    return tree


# the adaptive policy allowed to give a client the whole model (k = L), and the
# planner settings that keep a run's round-0 plan
WHOLE = "adaptive (k_max=L)"
KEEP = {"planner": {"replan_every": 0, "replan_miss": 0.0}}
BATCHED = "(server batching)"  # --batching's methods: server.batching=true


def methods(args, profile: str, best_uniform: int) -> list[tuple[str, str, dict]]:
    """(method, server side, settings) in the order they run; fixed k=2 first."""
    adaptive = {"federation": {"policy": "adaptive"}}

    def cut(k: int) -> dict:
        return {"federation": {"cut_layers": [k]}}

    top = args.num_layers - 1
    grid = [best_uniform] if args.quick else (args.grid or [1, 2, 4, 8, 16, top])
    out: list[tuple[str, str, dict]] = []
    for side in args.sides:
        out.append(("fixed k=2", side, cut(2)))
        if profile == "P1":
            out += [(f"uniform k={k}", side, cut(k)) for k in grid if k != 2]
            for policy in ("random", "splitft"):
                out.append((policy, side, {"federation": {"policy": policy}}))
            out.append(("adaptive", side, adaptive))
        elif profile == "P2":
            out.append(("adaptive (round-0 plan)", side, merge(adaptive, KEEP)))
            out.append(("adaptive", side, adaptive))
        else:
            if best_uniform != 2:
                out.append((f"uniform k={best_uniform}", side, cut(best_uniform)))
            out.append(("adaptive", side, adaptive))
        if side == "per_client" and not args.quick:  # clients may hold it all
            whole = merge(adaptive, {"federation": {"k_max": args.num_layers}})
            if profile == "P2":
                out.append((f"{WHOLE[:-1]}, round-0 plan)", side, merge(whole, KEEP)))
            out.append((WHOLE, side, whole))
    if getattr(args, "batching", False) and "per_client" in args.sides:
        # the same training (a per-client batch gives each client what it gets
        # alone), timed by a server that batches the requests waiting for it
        on = {"server": {"batching": True}}
        out.append((f"fixed k=2 {BATCHED}", "per_client", merge(cut(2), on)))
        out.append((f"adaptive {BATCHED}", "per_client", merge(adaptive, on)))
    if profile == "P1" and "per_client" in args.sides:
        out.append(("FedAvg-LoRA", "per_client", cut(args.num_layers)))
        out.append(("centralized", "per_client", {}))
    if args.quick:  # fewer baselines; the shared side only for P1's two headliners
        keep = {"fixed k=2", "adaptive", "adaptive (round-0 plan)"}
        keep.add(f"uniform k={best_uniform}")
        out = [
            (name, side, extra)
            for name, side, extra in out
            if name in keep
            and (
                side == "per_client"
                or (profile == "P1" and name in ("fixed k=2", "adaptive"))
            )
        ]
    return out


def centralized(tree: dict, args) -> dict:
    """One machine (the server) with all the data: the quality bound."""
    n = tree["federation"]["num_clients"]
    return merge(
        tree,
        {
            "partition": {"method": "iid"},
            "federation": {
                "num_clients": 1,
                "local_steps": n * args.local_steps,  # the same tokens per round
                "cut_layers": [args.num_layers],
            },
            "sim": {
                "mix": ["server"],
                "profiles": {
                    "server": dict(
                        slowdown=1 / args.speed,
                        memory_mb=0.0,
                        up_mbps=1e6,
                        down_mbps=1e6,
                        rtt_ms=0.0,
                    )
                },
                "changes": [],
            },
        },
    )


def run_profile(
    args,
    out: Path,
    profile: str,
    costs: CostModel,
    best_uniform: int,
    done: dict | None,
    prov: dict,
    save,
):
    """Every method on one profile; ``done`` (an earlier results.json's entry
    for it) supplies the rows already measured, which are not run again;
    ``save`` gets the rows so far after each method; ``prov`` is this run's
    provenance, recorded on every row it measures."""
    if args.quick and profile == "P3":  # 16 clients: two rounds keep it short
        args = argparse.Namespace(**{**vars(args), "rounds": 2})
    tree = base_tree(args, out, profile, costs)
    targets: dict[str, float] = dict((done or {}).get("targets", {}))
    rows = list((done or {}).get("methods", []))
    have = {(r["method"], r["server_side"]) for r in rows}
    for name, side, extra in methods(args, profile, best_uniform):
        if (name, side) in have:
            continue
        if args.methods and name not in args.methods and name != "fixed k=2":
            continue  # fixed k=2 always runs: it sets the target
        run_tree = (
            centralized(tree, args) if name == "centralized" else merge(tree, extra)
        )
        slug = "".join(c for c in name.replace(" ", "_") if c not in "=(),")
        run_tree = merge(
            run_tree, {"name": f"{slug}-{side}", "federation": {"server_side": side}}
        )
        target = targets.get(side, targets.get("per_client"))
        if name == "fixed k=2":  # the target comes from its budget's last round
            run_tree["federation"]["rounds"] = args.rounds
            target = None
        t0 = time.perf_counter()
        result = run_method(
            run_tree, costs, args.rounds, target, accuracy=args.accuracy
        )
        if name == "fixed k=2":
            targets[side] = result["final_eval_loss"]
        rows.append({"method": name, "server_side": side, **result, **prov})
        save({"targets": targets, "methods": rows})
        print(
            f"[{profile}] {name:<32} {side:<10} final eval loss "
            f"{result['final_eval_loss']:.4f}  ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    result = {"targets": targets, "methods": rows}
    compare(result)
    return result


def compare(result: dict) -> None:
    """Time to target and its ratio to fixed k=2, for every method alike.

    The target is fixed k=2's eval loss at its last budget round, per server
    side (centralized and FedAvg-LoRA use the per-client one); every method's
    time is when its own curve first reaches it, fixed k=2's included.
    """
    targets = result["targets"]
    rows = result["methods"]
    for r in rows:
        r["target_eval_loss"] = targets[r["server_side"]]
        r["time_to_target_s"] = time_to_target(r["curve"], r["target_eval_loss"])
    base = {r["server_side"]: r for r in rows if r["method"] == "fixed k=2"}
    for r in rows:
        ref = base[r["server_side"]]
        t, t0 = r["time_to_target_s"], ref["time_to_target_s"]
        r["time_vs_fixed2"] = None if t is None or not t0 else t / t0
        r["round_time_vs_fixed2"] = r["mean_round_s"] / ref["mean_round_s"]


def best_uniform(
    costs: CostModel, n: int, speed: float, size: tuple[float, float], steps: int
):
    """The uniform cut every client can hold with the shortest predicted round."""
    times = uniform_times(world(costs, n, speed, size, steps))
    return min(times, key=times.get)


# -------------------------------------------------------------- report
COLUMNS = (
    ("method", "{:<32}", "method"),
    ("side", "{:<10}", "server_side"),
    ("to target s", "{:>11}", "time_to_target_s"),
    ("vs k=2", "{:>6}", "time_vs_fixed2"),
    ("round s", "{:>7}", "mean_round_s"),
    ("vs k=2", "{:>6}", "round_time_vs_fixed2"),
    ("eval loss", "{:>9}", "final_eval_loss"),
    ("tok acc", "{:>7}", "final_token_acc"),
    ("EM", "{:>5}", "exact_match"),
    ("MC", "{:>5}", "mc_accuracy"),
    ("act MB/rd", "{:>9}", "activation_mb_per_round"),
    ("adp MB/rd", "{:>9}", "adapter_mb_per_round"),
    ("peak MB", "{:>7}", "peak_client_memory_mb"),
    ("over budget", "{:<12}", "over_budget"),
    ("plan ms", "{:>7}", "planner_ms_per_round"),
    ("pred err", "{:>8}", "prediction_error"),
)
DIGITS = {
    "time_to_target_s": 1,
    "time_vs_fixed2": 2,
    "mean_round_s": 2,
    "round_time_vs_fixed2": 2,
    "final_eval_loss": 4,
    "final_token_acc": 3,
    "exact_match": 3,
    "mc_accuracy": 3,
    "activation_mb_per_round": 1,
    "adapter_mb_per_round": 1,
    "peak_client_memory_mb": 0,
    "planner_ms_per_round": 1,
    "prediction_error": 3,
}


def _cell(row: dict, key: str) -> str:
    v = row.get(key)
    if v is None:
        return "-"
    if key == "over_budget":
        return ",".join(map(str, v)) or "none"
    if key in DIGITS:
        return f"{v:.{DIGITS[key]}f}"
    return str(v)


def print_profile(profile: str, result: dict) -> None:
    targets = ", ".join(f"{k} {v:.4f}" for k, v in result["targets"].items())
    print(f"\n{profile}: target eval loss (fixed k=2 at its last round): {targets}")
    print(" ".join(fmt.format(head) for head, fmt, _ in COLUMNS))
    for row in result["methods"]:
        print(" ".join(fmt.format(_cell(row, key)) for _, fmt, key in COLUMNS))


def goals(results: dict) -> list[str]:
    """The issue's goals, each with the measured ratio and whether it holds,
    for the adaptive policy and, where it ran, its k_max=L variant."""
    lines = []
    ours = ("adaptive", WHOLE)

    def ratio(a, b):
        return None if a is None or b is None else a / b

    def line(text, value, bound):
        if value is None:
            lines.append(f"{text}: not measured (target not reached)")
        else:
            ok = "met" if value <= bound else "MISSED"
            lines.append(f"{text}: {value:.3f} (goal <= {bound}) {ok}")

    def uniform(r):
        return r["method"].startswith("uniform") or r["method"] == "fixed k=2"

    p1 = results["profiles"].get("P1")
    for side in ("per_client", "shared") if p1 else ():
        rows = [r for r in p1["methods"] if r["server_side"] == side]
        get = {r["method"]: r for r in rows}
        fitting = [r for r in rows if uniform(r) and not r["over_budget"]]
        reached = [r for r in fitting if r["time_to_target_s"] is not None]
        others = [
            r["final_eval_loss"]
            for r in rows
            if not r["method"].startswith("adaptive") and r["method"] != "centralized"
        ]
        for name in (n for n in ours if n in get):
            me = get[name]
            t = me["time_to_target_s"]
            line(
                f"P1 {side}: {name} / fixed k=2 time to target",
                ratio(t, get["fixed k=2"]["time_to_target_s"]),
                0.70,
            )
            lines.append(
                f"  (mean round time, {name} / fixed k=2: "
                f"{me['round_time_vs_fixed2']:.3f})"
            )
            if reached:
                best = min(reached, key=lambda r: r["time_to_target_s"])
                line(
                    f"P1 {side}: {name} / best uniform cut that fits "
                    f"({best['method']})",
                    ratio(t, best["time_to_target_s"]),
                    0.85,
                )
            quickest = min(fitting, key=lambda r: r["mean_round_s"])
            lines.append(
                f"  (mean round time, {name} / quickest uniform cut that fits, "
                f"{quickest['method']}: "
                f"{me['mean_round_s'] / quickest['mean_round_s']:.3f})"
            )
            line(
                f"P1 {side}: {name} final eval loss / best federated baseline",
                ratio(me["final_eval_loss"], min(others)),
                1.01,
            )
    central = [r for r in (p1 or {}).get("methods", []) if r["method"] == "centralized"]
    adaptive = [
        r
        for r in (p1 or {}).get("methods", [])
        if r["method"] == "adaptive" and r["server_side"] == "per_client"
    ]
    if central and adaptive:
        line(
            "P1: adaptive (per_client) final eval loss / centralized",
            ratio(adaptive[0]["final_eval_loss"], central[0]["final_eval_loss"]),
            1.01,
        )
    p2 = results["profiles"].get("P2")
    for side in ("per_client", "shared") if p2 else ():
        get = {r["method"]: r for r in p2["methods"] if r["server_side"] == side}
        for name in (n for n in ours if n in get):
            kept = (
                f"{name[:-1]}, round-0 plan)"
                if name == WHOLE
                else f"{name} (round-0 plan)"
            )
            if kept not in get:  # not run (--methods)
                continue
            line(
                f"P2 {side}: {name} / its round-0 plan kept, time to target",
                ratio(get[name]["time_to_target_s"], get[kept]["time_to_target_s"]),
                0.80,
            )
    over = [
        f"{p} {r['method']} {r['server_side']}"
        for p, res in results["profiles"].items()
        for r in res["methods"]
        if r["method"].startswith("adaptive") and r["over_budget"]
    ]
    lines.append("adaptive over a memory budget: " + (", ".join(over) or "never"))
    return lines


def plot(results: dict, out: Path) -> None:
    for profile, res in results["profiles"].items():
        sides = sorted({r["server_side"] for r in res["methods"]})
        fig, axes = plt.subplots(
            1, len(sides), figsize=(6.5 * len(sides), 4.5), squeeze=False
        )
        for ax, side in zip(axes[0], sides, strict=True):
            for r in res["methods"]:
                if r["server_side"] != side and r["method"] not in (
                    "centralized",
                    "FedAvg-LoRA",
                ):
                    continue
                pts = [
                    (c["sim_time_s"], c["eval_loss"])
                    for c in r["curve"]
                    if c["eval_loss"] is not None
                ]
                style = "-" if r["method"].startswith("adaptive") else "--"
                ax.plot(*zip(*pts, strict=True), style, marker=".", label=r["method"])
            ax.axhline(
                res["targets"][side], color="grey", lw=0.8, ls=":", label="target"
            )
            ax.set(
                title=f"{profile}, server side {side}",
                xlabel="simulated time (s)",
                ylabel="eval loss",
            )
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"loss_vs_time_{profile}.png", dpi=110)
        plt.close(fig)

        moving = [
            r
            for r in res["methods"]
            if r["method"].startswith("adaptive")
            or r["method"] in ("random", "splitft")
        ]
        if not moving:
            continue
        fig, axes = plt.subplots(
            1, len(moving), figsize=(4 * len(moving), 3.6), squeeze=False
        )
        for ax, r in zip(axes[0], moving, strict=True):
            clients = sorted(r["cuts"][0], key=int)
            for c in clients:
                ys = [cuts.get(c) for cuts in r["cuts"]]
                ax.plot(
                    range(1, len(ys) + 1),
                    ys,
                    marker=".",
                    label=f"{c} {MIX[int(c) % 4]}",
                )
            ax.set(
                title=f"{r['method']} ({r['server_side']})",
                xlabel="round",
                ylabel="cut layer",
                ylim=(0, results["costs"]["num_layers"] + 1),
            )
        axes[0][0].legend(fontsize=6, ncol=2)
        fig.tight_layout()
        fig.savefig(out / f"cuts_{profile}.png", dpi=110)
        plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="runs/bench/heterogeneous")
    ap.add_argument("--profiles", nargs="+", default=["P1", "P2", "P3"])
    ap.add_argument("--speed", type=float, default=1.0, help="server speed")
    ap.add_argument(
        "--timing",
        choices=["predicted", "measured", "live"],
        default="predicted",
        help="sim.timing: how the clock times each step (see docs/policies.md)",
    )
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--local-steps", type=int, default=None)
    ap.add_argument("--extra", type=int, default=None, help="rounds past the budget")
    ap.add_argument(
        "--grid", type=int, nargs="+", help="uniform cuts on P1 (full: 1 2 4 8 16 L-1)"
    )
    ap.add_argument(
        "--sides",
        nargs="+",
        choices=["per_client", "shared"],
        default=["per_client", "shared"],
        help="federation.server_side modes to run",
    )
    ap.add_argument(
        "--accuracy", action="store_true", help="task accuracy at the budget"
    )
    ap.add_argument(
        "--seed", type=int, default=0, help="data, partition, LoRA init, order"
    )
    ap.add_argument(
        "--methods",
        nargs="+",
        metavar="NAME",
        help="run only these methods, named as in the tables (fixed k=2 always "
        "runs: it sets the target)",
    )
    ap.add_argument(
        "--costs",
        metavar="JSON",
        help="use a saved cost model (a run's costs.json) instead of probing",
    )
    ap.add_argument(
        "--client",
        type=client_setting,
        default="float32/none",
        metavar="BASE/CKPT",
        help="every method's clients: client.base_dtype/client.checkpointing "
        "(the devices' memory stays sized by a float32/none client)",
    )
    ap.add_argument(
        "--batching",
        action="store_true",
        help="also run fixed k=2 and adaptive on the per-client side with "
        "server.batching=true (same training, the batching server's timing)",
    )
    ap.add_argument(
        "--report", metavar="RESULTS", help="re-render a results.json, run nothing"
    )
    ap.add_argument(
        "--continue",
        dest="resume",
        action="store_true",
        help="keep the methods already in --out's results.json (same settings "
        "required) and run only the missing ones",
    )
    args = ap.parse_args()
    if args.report:
        report(Path(args.report))
        return
    quick = dict(rounds=3, local_steps=2, extra=1, eval_size=8, train_per_task=100)
    full = dict(rounds=6, local_steps=4, extra=2, eval_size=16, train_per_task=200)
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.accuracy_examples = 12
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    prov = provenance()  # the tree as it is now, before anything can change it
    earlier = previous(out / "results.json", args) if args.resume else None
    data = (MAX_LENGTH, args.eval_size, args.train_per_task, args.seed)
    if earlier:  # the yardstick the kept rows were measured with
        costs, sizes = CostModel(**earlier["costs"]), train_sizes(*data)
    elif args.costs:  # another run's probe: the same yardstick across runs
        costs, sizes = CostModel.load(args.costs), train_sizes(*data)
    else:
        costs, sizes = probe_default(BATCH, *data)
    base, ckpt = args.client.split("/")
    if args.client != "float32/none":  # the clients' own prices; the same devices
        global DEVICE_COSTS
        DEVICE_COSTS = CostModel(**earlier["device_costs"]) if earlier else costs
        if not earlier:
            costs, _ = probe_default(BATCH, *data, base=base)
        costs = dataclasses.replace(costs, client_checkpointing=ckpt == "blocks")
    args.num_layers = costs.num_layers
    slots = expected_slots([n for n, _ in sizes], BATCH)
    size = (slots, expected_labelled([n for _, n in sizes], BATCH))
    bests = {
        p: best_uniform(
            costs, 16 if p == "P3" else 8, args.speed, size, args.local_steps
        )
        for p in args.profiles
    }
    check_methods(args, bests)
    print(
        f"cost model: {costs.block_s * 1e6:.1f} us per block and token slot, "
        f"head {costs.head_s * 1e6:.0f} us per labelled token; {slots:.0f} token "
        f"slots per batch, {size[1]:.0f} labelled"
    )
    results = {
        **prov,
        "settings": {k: v for k, v in vars(args).items()},
        "fleet": fleet(costs),
        "costs": costs.__dict__,
        "device_costs": (DEVICE_COSTS or costs).__dict__,
        "slots": slots,
        "labelled": size[1],
        "part_a": part_a(costs, size, args.local_steps, check=not args.quick),
        "profiles": {},
    }
    if earlier:  # its provenance stays; this run's is recorded beside it
        continued = earlier.get("continued", []) + [prov]
        results = {**earlier, "part_a": results["part_a"], "continued": continued}
        results["profiles"] = dict(earlier["profiles"])
    print_part_a(results["part_a"])
    for profile in args.profiles:

        def save(partial: dict, profile: str = profile) -> None:
            results["profiles"][profile] = partial  # what is done survives a crash
            write_json(out / "results.json", results)

        done = results["profiles"].get(profile)
        results["profiles"][profile] = run_profile(
            args, out, profile, costs, bests[profile], done, prov, save
        )
        write_json(out / "results.json", results)
        print_profile(profile, results["profiles"][profile])
    results["wall_s"] = (earlier or {}).get("wall_s", 0) + time.perf_counter() - t_start
    write_json(out / "results.json", results)
    report(out / "results.json")


def check_methods(args, bests: dict[str, int]) -> None:
    """Refuse ``--methods`` names no profile has, listing the ones it has."""
    if not args.methods:
        return
    known = [
        name
        for p, best in bests.items()
        for name, _side, _extra in methods(args, p, best)
    ]
    unknown = [m for m in args.methods if m not in known]
    if unknown:
        raise SystemExit(
            f"--methods: no method named {', '.join(map(repr, unknown))} on "
            f"{' '.join(args.profiles)}; the methods are: "
            + ", ".join(dict.fromkeys(known))
        )


# settings that change what a method measures: a continued run must match them
SAME = (
    "quick",
    "speed",
    "timing",
    "rounds",
    "local_steps",
    "extra",
    "accuracy",
    "costs",
    "eval_size",
    "train_per_task",
    "seed",
    "client",
)


def previous(path: Path, args) -> dict | None:
    """The results.json ``--continue`` adds to (None if there is none yet).

    Raises:
        SystemExit: its settings differ from this run's, naming them.
    """
    if not path.exists():
        return None
    earlier = json.loads(path.read_text())
    old = earlier["settings"]
    now = vars(args)
    # what runs made before the setting existed used
    before = {"seed": 0, "client": "float32/none"}
    differ = [
        f"{k}: {old.get(k, before.get(k))!r} there, {now[k]!r} now"
        for k in SAME
        if old.get(k, before.get(k)) != now[k]
    ]
    if differ:
        raise SystemExit(
            f"--continue: {path} was made with other settings ("
            + "; ".join(differ)
            + ")"
        )
    return earlier


def report(path: Path) -> None:
    """Tables, goals and plots from a results.json (written back with them)."""
    results = json.loads(path.read_text())
    for res in results["profiles"].values():
        compare(res)
    results["goals"] = goals(results)
    write_json(path, results)
    plot(results, path.parent)
    print_part_a(results["part_a"])
    for profile, res in results["profiles"].items():
        print_profile(profile, res)
    print("\ngoals:")
    for g in results["goals"]:
        print("  " + g)
    wall = results.get("wall_s")  # absent while a run is still going
    took = f"{wall / 60:.1f} min" if wall else "unfinished"
    print(f"\n{results['command']}: {took}; {path.parent}/")


if __name__ == "__main__":
    main()
