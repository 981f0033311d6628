"""What the robust aggregation rule costs when nobody attacks: the demo's
federation trained with ``federation.aggregation=mean`` and ``=median`` side
by side.

    python benchmarks/robust_aggregation.py [--quick] [--out DIR]

Both runs use configs/demo.yaml with the cuts fixed at 8, 6, 4, 2 (as
benchmarks/compression.py and privacy.py run it), one cost model and the
predicted clock, so the data, the seed, the cuts and the budget are the same
and the rule is the only difference. Printed: each run's eval loss per round,
and the last round's eval loss, token accuracy, exact match and multiple
choice, with the median's ratio to the mean. ``--quick``: 2 rounds.

The median is coordinate-wise and unweighted (docs/aggregation.md): with
clients of unequal data it gives a small client the vote of a large one,
which is where its cost comes from.
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
from splitft.sim.costs import CostModel  # noqa: E402

RULES = ("mean", "median")
METRICS = ("eval_loss", "eval_token_acc", "exact_match", "mc_accuracy")


def train(args, rule: str, costs: CostModel | None) -> tuple[dict, CostModel]:
    overrides = [
        f"name=agg-{rule}",
        f"out_dir={args.out}",
        "federation.policy=fixed",
        "federation.cut_layers=[8, 6, 4, 2]",
        f"federation.aggregation={rule}",
        "sim.timing=predicted",
    ]
    if args.quick:
        overrides.append("federation.rounds=2")
    t0 = time.perf_counter()
    sim = Simulation(load_config(Path("configs/demo.yaml"), overrides), costs=costs)
    sim.run(table=False)
    last = sim.rounds[-1]
    row = {
        "rule": rule,
        "wall_s": time.perf_counter() - t0,
        "eval_loss_per_round": [r.get("eval_loss") for r in sim.rounds],
        **{m: last.get(m) for m in METRICS},
    }
    return row, sim.costs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 rounds")
    ap.add_argument("--out", default="runs/bench/robust_aggregation")
    args = ap.parse_args()
    rows, costs = [], None
    for rule in RULES:
        row, costs = train(args, rule, costs)  # the first run's probe, shared
        rows.append(row)
        print(f"{rule}: eval loss per round {row['eval_loss_per_round']}")
    mean, median = rows
    print(f"\n{'rule':<8}" + "".join(f"{m:>16}" for m in METRICS) + f"{'wall s':>9}")
    for row in rows:
        cells = "".join(
            f"{row[m]:>16.4f}" if row[m] is not None else f"{'-':>16}" for m in METRICS
        )
        print(f"{row['rule']:<8}{cells}{row['wall_s']:>9.0f}")
    ratio = median["eval_loss"] / mean["eval_loss"]
    print(f"\nmedian / mean, final eval loss: {ratio:.4f}")
    write_json(
        Path(args.out) / ("results-quick.json" if args.quick else "results.json"),
        {"provenance": provenance(), "rows": rows, "eval_loss_ratio": ratio},
    )


if __name__ == "__main__":
    main()
