"""The same federation in one process and on Ray: wall time side by side.

    python benchmarks/ray_scaling.py [--quick] [--clients 8 16] [--actors 1 2]
        [--cut K] [--out runs/bench/ray_scaling]

Runs the default model's federation (configs/demo.yaml's devices and data;
its adaptive planner, or every client at cut ``--cut``; ``--clients``
clients, 2 rounds of 2 local steps, predicted timing so every run plans the
same cuts and trains the same steps) with ``sim.backend=local`` and with
``sim.backend=ray`` and each of ``--actors`` client actors (a local Ray
started by the run, 1 CPU an actor). Each run is a fresh process; a short
local run first probes the cost model, which every timed run reads
(``sim.cost_model``).

Prints, per federation size, each backend's wall time (the whole run: Ray's
start and the actors' loading included; and its rounds alone, summed
``wall_round_s``) and its ratio to the local run's, and checks that the
simulated metrics (losses, simulated times, bytes, cuts) are identical (to a
relative 1e-6: the actors' torch runs on one thread, the local run's on all,
so sums differ in their last bits).
From the local run's measured split of the training work (its steps'
``client_seconds`` and ``server_seconds``) it also prints the bound on the
speed-up with N client actors on N devices: the clients' work divides by N,
the server's (one process, one device) does not: (C + S) / (C / N + S).

About 17 min on 2 CPU cores, 7 with ``--clients 8`` (``--quick``: 8 clients,
1 round of 1 step, about 4 min).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import provenance, write_json  # noqa: E402

from splitft.config import load_config  # noqa: E402
from splitft.federation.simulation import Simulation  # noqa: E402

SAME = ("eval_loss", "train_loss", "sim_time_s", "sim_round_s", "bytes_up", "cuts")


def settings(args, clients: int, backend: str) -> list[str]:
    rounds, steps = (1, 1) if args.quick else (2, 2)
    name = f"c{clients}-{backend}"
    over = [
        f"out_dir={args.out}",
        f"name={name}",
        f"federation.num_clients={clients}",
        f"federation.rounds={rounds}",
        f"federation.local_steps={steps}",
        "sim.timing=predicted",
        "sim.changes=[]",
        "eval.accuracy=false",
        "log.to=[jsonl]",
        "log.plots=false",
    ]
    if args.cut:  # every client at one cut: more of the work on the clients
        over += ["federation.policy=fixed", f"federation.cut_layers=[{args.cut}]"]
    if backend != "local":
        over += ["sim.backend=ray", f"sim.client_actors={backend.split('-')[1]}"]
    return over


def one(args) -> None:
    """One run (``--one CLIENTS:BACKEND``) in this process; its row to ``--row``."""
    clients, backend = args.one.split(":")
    over = settings(args, int(clients), backend)
    over += [f"name={args.name}"] if args.name else []
    over += [f"sim.cost_model={args.costs}"] if args.costs else []
    t0 = time.perf_counter()
    sim = Simulation(load_config(Path("configs/demo.yaml"), over))
    summary = sim.run(table=False)
    total = time.perf_counter() - t0
    rounds = [r for r in summary["rounds"] if r["round"] > 0]
    lines = (sim.run_dir / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(x) for x in lines if '"type": "step"' in x]
    row = {
        "clients": int(clients),
        "backend": backend,
        "actors": 0 if backend == "local" else sim.runner.executor.size,
        "total_s": total,
        "rounds_s": sum(r["wall_round_s"] for r in rounds),
        "client_s": sum(s["client_seconds"] for s in steps),
        "server_s": sum(s["server_seconds"] for s in steps),
        "same": [{k: r.get(k) for k in SAME} for r in summary["rounds"]],
        "run_dir": str(sim.run_dir),
    }
    Path(args.row).write_text(json.dumps(row))


def spawn(args, clients: int, backend: str, costs: str, name: str = "") -> dict:
    row = Path(args.out) / f"row-c{clients}-{name or backend}.json"
    cmd = [sys.executable, __file__, "--one", f"{clients}:{backend}"]
    cmd += ["--row", str(row), "--out", args.out, "--costs", costs]
    cmd += ["--quick"] if args.quick or name else []
    cmd += ["--name", name] if name else []
    cmd += ["--cut", str(args.cut)] if args.cut else []
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    print(f"-- {clients} clients, {backend}", flush=True)
    subprocess.run(cmd, check=True, env=env)
    return json.loads(row.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--clients", type=int, nargs="+")
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--cut", type=int, default=0, help="a fixed cut (0: adaptive)")
    ap.add_argument("--out", default="runs/bench/ray_scaling")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--row", help=argparse.SUPPRESS)
    ap.add_argument("--costs", default="", help=argparse.SUPPRESS)
    ap.add_argument("--name", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return one(args)
    sizes = args.clients or ([8] if args.quick else [8, 16])
    backends = ["local"] + [f"ray-{n}" for n in args.actors]
    results = {"provenance": provenance(), "sizes": {}}
    # the cost model, probed once before the runs timed (a short local run)
    probe = spawn(args, sizes[0], "local", "", name="probe")
    costs = str(Path(probe["run_dir"]) / "costs.json")
    for clients in sizes:
        rows = [spawn(args, clients, backend, costs) for backend in backends]
        results["sizes"][clients] = rows
        report(clients, rows)
    write_json(Path(args.out) / "results.json", results)


def same(a, b, rel: float = 1e-6) -> bool:
    """Equal, floats within ``rel``: the actors run torch on one thread each
    (Ray's OMP_NUM_THREADS), the local run on all, so sums differ in their
    last bits (a relative 1e-7)."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=rel)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(same, a, b))
    return a == b


def report(clients: int, rows: list[dict]) -> None:
    base = rows[0]
    print(f"\n{clients} clients: wall time (whole run | its rounds), vs local")
    for r in rows:
        identical = same(r["same"], base["same"])
        whole, rounds = base["total_s"] / r["total_s"], base["rounds_s"] / r["rounds_s"]
        print(
            f"  {r['backend']:8s} {r['total_s']:8.1f} s ({whole:.2f}x)"
            f" | {r['rounds_s']:8.1f} s ({rounds:.2f}x)"
            f"  simulated metrics identical: {identical}"
        )
    c, s = base["client_s"], base["server_s"]
    print(f"  local training work: clients {c:.1f} s, server {s:.1f} s (measured)")
    for n in (2, 4, 8, 16):
        print(f"  bound with {n:2d} client devices: {(c + s) / (c / n + s):.2f}x")


if __name__ == "__main__":
    main()
