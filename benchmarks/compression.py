"""Compression of the smashed data and gradients: bytes against what it costs.

    python benchmarks/compression.py [--quick] [--out runs/bench/compression]

Runs the demo's federation (configs/demo.yaml: 4 clients on 4 kinds of device,
4 rounds of 4 local steps, the same seed and data) once per setting of
``transport.compression`` (the clients' smashed data) and
``transport.grad_compression`` (the server's gradients), with the cuts fixed
(8, 6, 4, 2: the adaptive policy would plan on the smaller messages and
change the cuts, which changes what is learned). Prints, against fp32 (none,
none): the bytes of activations and gradients per step (the real encoded
message sizes, scales included), all bytes, and the final eval loss, exact
match and multiple-choice accuracy. Goals (issue 9): int8 at or below 0.27 of
fp32's bytes with at most 1 % eval-loss cost; bf16 with no measurable cost.

About 25 min on 2 CPU cores (``--quick``: 2 rounds, three settings).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import provenance, write_json  # noqa: E402

from splitft.config import load_config  # noqa: E402
from splitft.federation.simulation import Simulation  # noqa: E402

SETTINGS = [  # (smashed data, gradients)
    ("none", "none"),
    ("bf16", "bf16"),
    ("int8", "int8"),
    ("int8", "none"),
    ("none", "int8"),
]
QUICK = SETTINGS[:3]


def run(args, out: Path, up: str, down: str) -> dict:
    name = f"{up}-{down}"
    overrides = [
        f"name={name}",
        f"out_dir={out}",
        "federation.policy=fixed",
        "federation.cut_layers=[8, 6, 4, 2]",
        f"transport.compression={up}",
        f"transport.grad_compression={down}",
    ]
    if args.quick:
        overrides.append("federation.rounds=2")
    cfg = load_config(Path("configs/demo.yaml"), overrides)
    sim = Simulation(cfg)
    summary = sim.run(table=False)
    last = sim.rounds[-1]
    steps = (
        sum(len(r.get("counted", [])) for r in sim.rounds) * cfg.federation.local_steps
    )
    b = summary["bytes"]
    return {
        "smashed": up,
        "gradients": down,
        "steps": steps,
        "up_smashed_per_step": b["up_smashed"] / steps,
        "down_gradients_per_step": b["down_gradients"] / steps,
        "activation_bytes": b["up_smashed"] + b["down_gradients"],
        "all_bytes": sum(b.values()),
        "eval_loss": last["eval_loss"],
        "exact_match": last.get("exact_match"),
        "mc_accuracy": last.get("mc_accuracy"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="runs/bench/compression")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prov = provenance()
    t0 = time.perf_counter()
    rows = [
        run(args, out, up, down) for up, down in (QUICK if args.quick else SETTINGS)
    ]
    base = rows[0]
    for r in rows:
        r["activation_ratio"] = r["activation_bytes"] / base["activation_bytes"]
        r["all_ratio"] = r["all_bytes"] / base["all_bytes"]
        r["eval_loss_cost"] = r["eval_loss"] / base["eval_loss"] - 1
    results = {**prov, "rows": rows, "wall_s": time.perf_counter() - t0}
    write_json(out / "results.json", results)
    print(
        f"\n{'smashed':>8} {'grads':>6} {'up/step':>10} {'down/step':>10} "
        f"{'act. ratio':>10} {'all ratio':>9} {'eval loss':>9} {'cost':>7} "
        f"{'EM':>6} {'MC':>6}"
    )
    for r in rows:
        em = "-" if r["exact_match"] is None else f"{r['exact_match']:.3f}"
        mc = "-" if r["mc_accuracy"] is None else f"{r['mc_accuracy']:.3f}"
        print(
            f"{r['smashed']:>8} {r['gradients']:>6} "
            f"{r['up_smashed_per_step'] / 1e6:>8.3f}MB "
            f"{r['down_gradients_per_step'] / 1e6:>8.3f}MB "
            f"{r['activation_ratio']:>10.3f} {r['all_ratio']:>9.3f} "
            f"{r['eval_loss']:>9.4f} {100 * r['eval_loss_cost']:>6.2f}% {em:>6} {mc:>6}"
        )
    print(
        "\ngoals: int8 at or below 0.27 of fp32's activation bytes with at most "
        "1 % eval-loss cost; bf16 with no measurable cost"
    )
    print(f"\n{prov['command']}: {results['wall_s'] / 60:.1f} min; {out}/results.json")


if __name__ == "__main__":
    main()
