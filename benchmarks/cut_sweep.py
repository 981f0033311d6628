"""The SplitFT paper's Table I on our stack: one cut layer for all, swept.

    python benchmarks/cut_sweep.py [--quick] [--cuts 2 4 6 8 10] [--out DIR]

Everything but the cut is fixed: SmolLM2-135M-Instruct, the four default
BIG-bench tasks, a length-Dirichlet partition over 4 clients on identical
laptops (half this machine's speed, 50 Mbit/s, 20 ms), one server 4x this
machine, LoRA r=8 with cut rank 4, the same seed. For each cut: eval loss
and next-token accuracy after the last round, total and mean round time
(simulated), and the megabytes sent both ways, activations (smashed data and
their gradients) apart from adapters. ``--quick`` runs 2 rounds of 2 steps
instead of 3 of 4. Writes results.json and cut_sweep.png to ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import probe_default, provenance, run_method, write_json  # noqa: E402

from splitft.config import DEFAULT_TASKS  # noqa: E402


def tree(args, out: Path, k: int) -> dict:
    return {
        "name": f"k{k}",
        "out_dir": str(out),
        "seed": 0,
        "data": {"tasks": list(DEFAULT_TASKS), "eval_size": 16},
        "partition": {"method": "length_dirichlet", "alpha": 0.5},
        "train": {"batch_size": 4, "schedule": "cosine", "warmup_steps": 2},
        "federation": {
            "num_clients": 4,
            "rounds": args.rounds,
            "local_steps": args.local_steps,
            "cut_layers": [k],
        },
        "eval": {"every": args.rounds, "accuracy": False},
        "sim": {"mix": ["laptop"], "server_speed": 4.0, "timing": args.timing},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cuts", type=int, nargs="+", default=[2, 4, 6, 8, 10])
    ap.add_argument("--out", default="runs/bench/cut_sweep")
    ap.add_argument(
        "--timing", choices=["predicted", "measured", "live"], default="measured"
    )
    args = ap.parse_args()
    args.rounds, args.local_steps = (2, 2) if args.quick else (3, 4)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    # one probe for every cut, so the sweep differs only in the cut
    costs, _ = probe_default(4, 192, 16, 200)
    rows = []
    for k in args.cuts:
        r = run_method(tree(args, out, k), costs, args.rounds)
        comm = (r["activation_mb_per_round"] + r["adapter_mb_per_round"]) * args.rounds
        rows.append(
            {
                "cut": k,
                "eval_loss": r["final_eval_loss"],
                "token_acc": r["final_token_acc"],
                "total_s": r["sim_time_at_budget_s"],
                "mean_round_s": r["mean_round_s"],
                "comm_mb": comm,
                "activation_mb": r["activation_mb_per_round"] * args.rounds,
                "adapter_mb": r["adapter_mb_per_round"] * args.rounds,
                "client_memory_mb": r["peak_client_memory_mb"],
                "wall_s": r["wall_s"],
            }
        )
        print(f"k={k}: done in {r['wall_s']:.0f} s", flush=True)

    head = (
        f"{'cut':>3} {'eval loss':>9} {'tok acc':>7} {'total s':>8} {'round s':>8} "
        f"{'comm MB':>8} {'activ. MB':>9} {'adapt. MB':>9} {'client MB':>9} "
        f"{'wall s':>7}"
    )
    print(f"\n{args.rounds} rounds x {args.local_steps} steps, 4 clients")
    print(head)
    for r in rows:
        print(
            f"{r['cut']:>3} {r['eval_loss']:>9.4f} {r['token_acc']:>7.3f} "
            f"{r['total_s']:>8.1f} {r['mean_round_s']:>8.2f} {r['comm_mb']:>8.1f} "
            f"{r['activation_mb']:>9.1f} {r['adapter_mb']:>9.1f} "
            f"{r['client_memory_mb']:>9.0f} {r['wall_s']:>7.0f}"
        )
    write_json(
        out / "results.json",
        {
            **provenance(),
            "rounds": args.rounds,
            "local_steps": args.local_steps,
            "costs": costs.__dict__,
            "rows": rows,
            "wall_s": time.perf_counter() - t_start,
        },
    )
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    cuts = [r["cut"] for r in rows]
    a.plot(cuts, [r["activation_mb"] for r in rows], marker="o", label="activations")
    a.plot(cuts, [r["adapter_mb"] for r in rows], marker="o", label="adapters")
    a.plot(cuts, [r["comm_mb"] for r in rows], marker="o", label="total")
    a.set(xlabel="cut layer", ylabel="MB sent (both ways)", title="communication")
    a.legend()
    b.plot(cuts, [r["total_s"] for r in rows], marker="o")
    b.set(xlabel="cut layer", ylabel="simulated seconds", title="total time")
    fig.tight_layout()
    fig.savefig(out / "cut_sweep.png", dpi=110)
    print(f"\nresults.json and cut_sweep.png in {out}/")


if __name__ == "__main__":
    main()
