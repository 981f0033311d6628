"""The U-shaped split next to the vanilla one: what keeping the labels costs.

    python benchmarks/u_shaped.py [--quick] [--out runs/bench/u_shaped]

Runs the demo's federation (configs/demo.yaml: 4 clients on a workstation, a
laptop, a tablet and a phone, 4 rounds of 4 local steps) with the cuts fixed
at 8, 6, 4, 2, the same seed and data and one cost model probed once for all
runs, as ``federation.topology=vanilla`` and as ``u_shaped`` with
``tail_layers`` 1 and 2 (the client also runs the last blocks, the final norm,
the head and the loss, so no labels leave it; one more round trip per
micro-batch). Prints, against vanilla:

- bytes per local step by direction and kind (the real encoded messages);
- the simulated round time: as measured (each side's wall time on this
  machine times its device's slowdown, then the simulated network) and as
  the cost model predicts it;
- each client's compute seconds per step on this machine (no slowdown) and
  the server's;
- the client's memory at its cut (cost model: weights, LoRA and AdamW state,
  saved activations at batch_size x max_length) and the parameter bytes of
  its parts as built (a tied head shares the embedding's tensor);
- the final eval loss, exact match and multiple-choice accuracy. The losses
  differ only through gradient clipping, which each side applies to its own
  parameters (tests show equal training without clipping).

About 12 min on 2 CPU cores (``--quick``: 2 rounds, vanilla and tail 1).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import provenance, write_json  # noqa: E402

from splitft.config import load_config  # noqa: E402
from splitft.federation.simulation import Simulation  # noqa: E402

MB = 1e6
SETTINGS = [0, 1, 2]  # tail_layers; 0 = vanilla
QUICK = [0, 1]
CUTS = [8, 6, 4, 2]


def _param_bytes(parts) -> int:
    """Parameter bytes of a client's parts, each tensor counted once."""
    seen, total = set(), 0
    for part in parts:
        for p in part.model.parameters():
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel() * p.element_size()
    return total


def run(args, out: Path, tail: int, costs) -> tuple[dict, object]:
    name = f"tail{tail}" if tail else "vanilla"
    overrides = [
        f"name={name}",
        f"out_dir={out}",
        "federation.policy=fixed",
        f"federation.cut_layers={CUTS}",
    ]
    if tail:
        overrides += ["federation.topology=u_shaped", f"federation.tail_layers={tail}"]
    if args.quick:
        overrides.append("federation.rounds=2")
    cfg = load_config(Path("configs/demo.yaml"), overrides)
    sim = Simulation(cfg, costs)
    summary = sim.run(table=False)
    rounds = [r for r in sim.rounds if r["round"] > 0]
    steps = [
        row
        for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()
        if (row := json.loads(line))["type"] == "step"
    ]
    n_steps = len(steps)
    b = summary["bytes"]
    last = sim.rounds[-1]
    clients = sim.runner.clients
    per_client = {
        cid: {
            "cut": CUTS[cid % len(CUTS)],
            "client_s_per_step": statistics.median(
                s["client_seconds"] for s in steps if s["client"] == cid
            ),
            "server_s_per_step": statistics.median(
                s["server_seconds"] for s in steps if s["client"] == cid
            ),
            "memory_mb": rounds[-1]["memory_mb"][str(cid)],
            "param_mb": _param_bytes(
                [clients[cid].part] + ([clients[cid].tail] if tail else [])
            )
            / MB,
        }
        for cid in sorted(clients)
    }
    row = {
        "tail_layers": tail,
        "steps": n_steps,
        "bytes_per_step": {k: v / n_steps for k, v in sorted(b.items())},
        "all_bytes": sum(b.values()),
        "sim_round_s": statistics.fmean(r["sim_round_s"] for r in rounds),
        "predicted_round_s": statistics.fmean(r["predicted_round_s"] for r in rounds),
        "clients": per_client,
        "eval_loss": last["eval_loss"],
        "exact_match": last.get("exact_match"),
        "mc_accuracy": last.get("mc_accuracy"),
    }
    return row, sim.costs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="runs/bench/u_shaped")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prov = provenance()
    t0 = time.perf_counter()
    rows, costs = [], None
    for tail in QUICK if args.quick else SETTINGS:
        row, costs = run(args, out, tail, costs)  # the first run's probe for all
        rows.append(row)
    base = rows[0]
    for r in rows:
        r["all_ratio"] = r["all_bytes"] / base["all_bytes"]
        r["round_ratio"] = r["sim_round_s"] / base["sim_round_s"]
        r["predicted_ratio"] = r["predicted_round_s"] / base["predicted_round_s"]
        r["eval_loss_change"] = r["eval_loss"] / base["eval_loss"] - 1
    results = {**prov, "cuts": CUTS, "rows": rows, "wall_s": time.perf_counter() - t0}
    write_json(out / "results.json", results)

    print("\nbytes per local step (MB), all clients")
    kinds = sorted({k for r in rows for k in r["bytes_per_step"]})
    print(f"{'topology':>9} " + " ".join(f"{k:>15}" for k in kinds))
    for r in rows:
        name = f"tail {r['tail_layers']}" if r["tail_layers"] else "vanilla"
        print(
            f"{name:>9} "
            + " ".join(f"{r['bytes_per_step'].get(k, 0) / MB:>15.3f}" for k in kinds)
        )
    print(
        f"\n{'topology':>9} {'all bytes':>9} {'round s':>8} {'ratio':>6} "
        f"{'predicted':>9} {'ratio':>6} {'eval loss':>9} {'change':>7} {'EM':>6} "
        f"{'MC':>6}"
    )
    for r in rows:
        name = f"tail {r['tail_layers']}" if r["tail_layers"] else "vanilla"
        em = "-" if r["exact_match"] is None else f"{r['exact_match']:.3f}"
        mc = "-" if r["mc_accuracy"] is None else f"{r['mc_accuracy']:.3f}"
        print(
            f"{name:>9} {r['all_ratio']:>9.3f} {r['sim_round_s']:>8.1f} "
            f"{r['round_ratio']:>6.3f} {r['predicted_round_s']:>9.1f} "
            f"{r['predicted_ratio']:>6.3f} {r['eval_loss']:>9.4f} "
            f"{100 * r['eval_loss_change']:>6.2f}% {em:>6} {mc:>6}"
        )
    print(
        "\nper client (cut): median compute s per step on this machine, client"
        " | server; memory MB (cost model); parameter MB as built"
    )
    for r in rows:
        name = f"tail {r['tail_layers']}" if r["tail_layers"] else "vanilla"
        cells = [
            f"k={c['cut']}: {c['client_s_per_step']:.2f}|{c['server_s_per_step']:.2f}s"
            f" {c['memory_mb']:.0f}MB {c['param_mb']:.0f}MB"
            for c in r["clients"].values()
        ]
        print(f"{name:>9} " + "; ".join(cells))
    print(f"\n{prov['command']}: {results['wall_s'] / 60:.1f} min; {out}/results.json")


if __name__ == "__main__":
    main()
