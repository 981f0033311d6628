"""What watching a run costs it: the demo with and without trackers and plots.

    python benchmarks/logging_overhead.py [--quick] [--repeats N]
        [--out runs/bench/logging_overhead] [--images DIR]

Runs the demo (configs/demo.yaml: 4 clients, 4 rounds of 4 local steps, the
adaptive planner) with the same seed and data, on predicted timing (so every
run plans the same cuts and trains the same steps: their final losses must
agree), as:

- ``none``: metrics.jsonl only (``log.to=[jsonl]``, ``log.plots=false``), the
  baseline;
- ``default``: what a run does out of the box: TensorBoard (installed) and the
  plots at the end;
- ``all``: TensorBoard, W&B (offline) and Trackio, and the plots.

Each run is a fresh process (in one process, the same run ran 1.4x slower
the second time: 176 s, then 241 s); the first run probes the cost model and
every later one reads it from the first's folder (``sim.cost_model``); the
methods' order rotates with each of ``--repeats`` repeats. Prints each
method's wall time (the runs' ``elapsed_s``: training and evaluation; median
over the repeats) and its ratio to the baseline's, and the seconds the run
itself counted in its trackers and its plots (summary.json's ``logging_s``)
as a share of its wall time: the first is what a user sees, the second is
the overhead without the run-to-run noise. W&B writes in a helper process
(wandb-core): its CPU seconds are printed too. ``--images DIR`` copies the
default run's loss.png and timeline.png there (the README's pictures).

About 10 min a repeat on 2 CPU cores (``--quick``: 2 rounds of 2 steps).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import provenance, write_json  # noqa: E402

from splitft.config import load_config  # noqa: E402
from splitft.federation.simulation import Simulation  # noqa: E402

METHODS = {
    "none": ["log.to=[jsonl]", "log.plots=false"],
    "default": [],
    "all": ["log.to=[tensorboard, wandb, trackio]"],
}


def one(args) -> None:
    """One run (``--one METHOD``), in this process; its row to ``--row``."""
    method, rep, out = args.one, args.rep, args.out
    overrides = [f"out_dir={out}", f"name={method}-{rep}", "sim.timing=predicted"]
    overrides += [f"sim.cost_model={args.costs}"] if args.costs else []
    overrides += METHODS[method]
    if args.quick:
        overrides += ["federation.rounds=2", "federation.local_steps=2"]
    cfg = load_config(Path("configs/demo.yaml"), overrides)
    sim = Simulation(cfg)
    summary = sim.run(table=False)
    spent = summary["logging_s"]
    row = {
        "method": method,
        "repeat": rep,
        "wall_s": sim.rounds[-1]["elapsed_s"],
        "trackers_s": spent["trackers"],
        "plots_s": spent["plots"],
        "final_eval_loss": sim.rounds[-1]["eval_loss"],
        "wandb_core_cpu_s": helper_cpu_s(),
        "run_dir": str(cfg.run_dir),
    }
    write_json(args.row, row)


def run(args, method: str, rep: int, costs: str) -> dict:
    row = args.out / f"row-{method}-{rep}.json"
    cmd = [sys.executable, __file__, "--one", method, "--rep", str(rep)]
    cmd += ["--out", str(args.out), "--row", str(row), "--costs", costs]
    subprocess.run(cmd + (["--quick"] if args.quick else []), check=True)
    return json.loads(row.read_text())


def helper_cpu_s() -> float:
    """CPU seconds of this process's wandb-core helpers (from /proc)."""
    total, tick = 0.0, os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        if "wandb" in name and int(fields[1]) == os.getpid():
            total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/logging_overhead"))
    ap.add_argument("--images", type=Path, default=None)
    ap.add_argument("--one", choices=list(METHODS), help=argparse.SUPPRESS)
    ap.add_argument("--rep", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--row", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--costs", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return one(args)
    out = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    prov = provenance()
    rows, costs = [], ""  # the first run probes; the others read its cost model
    for rep in range(args.repeats):
        order = list(METHODS)[rep % 3 :] + list(METHODS)[: rep % 3]
        for method in order:
            row = run(args, method, rep, costs)
            rows.append(row)
            costs = costs or str(Path(row["run_dir"]) / "costs.json")
            print(
                f"{method:8s} rep {rep}: wall {row['wall_s']:.1f} s, trackers "
                f"{row['trackers_s']:.2f} s, plots {row['plots_s']:.2f} s",
                flush=True,
            )
    base = statistics.median(r["wall_s"] for r in rows if r["method"] == "none")
    summary = {}
    print(f"\n{'method':8s} {'wall s':>8s} {'vs none':>8s} {'logging s':>10s} share")
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        wall = statistics.median(r["wall_s"] for r in mine)
        spent = statistics.median(r["trackers_s"] + r["plots_s"] for r in mine)
        summary[method] = {
            "wall_s": wall,
            "wall_vs_none": wall / base,
            "logging_s": spent,
            "logging_share": spent / wall,
            "trackers_s": statistics.median(r["trackers_s"] for r in mine),
            "plots_s": statistics.median(r["plots_s"] for r in mine),
        }
        s = summary[method]
        print(
            f"{method:8s} {wall:8.1f} {s['wall_vs_none']:8.3f} {spent:10.2f} "
            f"{100 * s['logging_share']:.2f} %"
        )
    losses = sorted({round(r["final_eval_loss"], 6) for r in rows})
    print(f"final eval loss of every run: {losses} (one value: the same training)")
    helper = max(r["wandb_core_cpu_s"] for r in rows if r["method"] == "all")
    print(f"wandb-core helper process: {helper:.2f} CPU s in a run (at most)")
    if args.images is not None:
        default = Path(next(r["run_dir"] for r in rows if r["method"] == "default"))
        args.images.mkdir(parents=True, exist_ok=True)
        for name, to in (
            ("loss.png", "demo_loss.png"),
            ("timeline.png", "demo_timeline.png"),
        ):
            shutil.copy(default / "plots" / name, args.images / to)
            print(f"copied {default / 'plots' / name} -> {args.images / to}")
    write_json(
        out / "results.json",
        {
            "provenance": prov,
            "quick": args.quick,
            "rows": rows,
            "summary": summary,
            "final_eval_losses": losses,
            "wandb_core_cpu_s": helper,
        },
    )


if __name__ == "__main__":
    main()
