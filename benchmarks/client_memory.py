"""A client's peak memory and step time at each cut, for each frozen-base
format (``client.base_dtype``) and way of keeping activations
(``client.checkpointing``).

    python benchmarks/client_memory.py [--quick] [--cuts 2 8 15 29] [--steps 3]

Each measurement is a fresh process (as split_overhead.py measures memory):
it builds the default model's client part at cut ``k`` with LoRA, then runs
``--steps`` client steps (forward, a backward from a random gradient of the
smashed data, AdamW) on a ``--batch-size`` x 192-token batch after one
warm-up step, and reports its peak RSS (VmHWM) and the median step time.
A process with no client part gives the interpreter's baseline. The settings
(``base_dtype/checkpointing``) run in turns, ``--repeats`` times, so all see
the same machine; printed: peak RSS above the baseline and the step time,
and their ratios over ``float32/none`` (today's client), per cut.
``--mmap-threshold`` adds ``float32/blocks`` with glibc's
``MALLOC_MMAP_THRESHOLD_`` fixed: large tensors are then mmapped and given
back when freed, where glibc's default (a threshold that rises as memory is
freed) keeps them in a heap that only grows. ``--allocators tcmalloc
jemalloc`` adds float32/none and nf4/blocks in processes that run with that
malloc instead of glibc's (``LD_PRELOAD``), measured above a baseline
process with the same malloc.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import client_setting, provenance, write_json  # noqa: E402

REFERENCE = "float32/none"  # today's client: what the ratios divide by
SETTINGS = [
    "float32/none",
    "float32/blocks",
    "bfloat16/none",
    "bfloat16/blocks",
    "int8/blocks",
    "nf4/none",
    "nf4/blocks",
]


def measure(k: int, setting: str, batch_size: int, steps: int) -> dict:
    """In this (fresh) process: the client part at cut ``k`` with
    ``setting`` (base_dtype/checkpointing), its steps."""
    base, checkpointing = setting.split("/")
    import torch

    from splitft import lora
    from splitft.config import LoraSettings, TrainConfig
    from splitft.models.default import default_model_dir
    from splitft.models.parts import WeightStore, client_part, load_model_config
    from splitft.split import optim

    torch.manual_seed(0)
    times, built_mb = [], 0.0
    if k:
        folder = default_model_dir()
        config = load_model_config(folder)
        settings = LoraSettings()
        part = client_part(WeightStore.for_base(folder, base), config, k)
        ranks = lora.client_layer_ranks(k, config.num_hidden_layers, settings)
        lora.inject(part.model, part.spec, settings, ranks)
        part.model.train()
        part.checkpoint_blocks(checkpointing == "blocks")
        built_mb = _peak_mb()
        train = TrainConfig()
        opt = optim.make_optimizer(lora.adapter_params(part.model), train)
        ids = torch.randint(3, config.vocab_size, (batch_size, 192))
        mask = torch.ones_like(ids)
        pos = torch.arange(192).expand(batch_size, 192)
        for _ in range(steps + 1):  # the first warms up
            t0 = time.perf_counter()
            h = part.client_forward(ids, mask, pos)
            h.backward(torch.randn_like(h))
            optim.step(opt, train.lr, train.max_grad_norm)
            times.append(time.perf_counter() - t0)
    peak_mb = _peak_mb()
    step_s = statistics.median(times[1:]) if times else 0.0
    return {
        "k": k,
        "built_mb": built_mb,
        "setting": setting,
        "peak_mb": peak_mb,
        "step_s": step_s,
    }


def _peak_mb() -> float:
    """This process's peak RSS so far (VmHWM, not ru_maxrss: Linux keeps
    ru_maxrss across exec)."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def in_fresh_process(k: int, setting: str, args, env=None) -> dict:
    cmd = [sys.executable, __file__, "--one", str(k), setting]
    cmd += ["--batch-size", str(args.batch_size), "--steps", str(args.steps)]
    env = {**os.environ, **(env or {})}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


# malloc libraries a process may run with instead of glibc's (LD_PRELOAD by
# name: Debian's libtcmalloc-minimal4 and libjemalloc2)
ALLOCATORS = {
    "tcmalloc": "libtcmalloc_minimal.so.4",
    "jemalloc": "libjemalloc.so.2",
}
FRUGAL = "nf4/blocks"  # the smallest client: what --allocators also runs


def settings(args) -> dict[str, tuple[str, dict, str]]:
    """name -> (base_dtype/checkpointing, environment of the process, the
    allocator whose baseline it is measured above)."""
    out = {name: (name, {}, "glibc") for name in args.settings}
    if args.mmap_threshold:  # glibc: allocations above it are mmapped and
        # returned at free, instead of kept by the heap (RSS falls, page
        # faults rise)
        env = {"MALLOC_MMAP_THRESHOLD_": str(args.mmap_threshold)}
        out["float32/blocks+mmap"] = ("float32/blocks", env, "glibc")
    for name in args.allocators:
        env = {"LD_PRELOAD": ALLOCATORS[name]}
        for setting in (REFERENCE, FRUGAL):
            out[f"{setting}+{name}"] = (setting, env, name)
    return out


def main(args) -> None:
    runs = settings(args)
    rows: dict[tuple[int, str], list[dict]] = {}
    baselines: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for alloc in {"glibc", *args.allocators}:
            env = {"LD_PRELOAD": ALLOCATORS[alloc]} if alloc != "glibc" else {}
            m = in_fresh_process(0, REFERENCE, args, env)
            baselines.setdefault(alloc, []).append(m["peak_mb"])
        for k in args.cuts:
            for name, (setting, env, _) in runs.items():
                m = in_fresh_process(k, setting, args, env)
                rows.setdefault((k, name), []).append(m)
                print(
                    f"  k={k:<3} {name:<22} peak {m['peak_mb']:8.1f} MB "
                    f"step {m['step_s']:6.2f} s",
                    flush=True,
                )
    base = {alloc: statistics.median(mbs) for alloc, mbs in baselines.items()}
    print(
        "\ninterpreter baseline (no client part): "
        + ", ".join(f"{a} {mb:.0f} MB" for a, mb in sorted(base.items()))
        + " peak RSS"
    )
    print(
        f"{'k':>4} {'setting':<22} {'MB':>7} {'MB ratio':>9} {'step s':>7} "
        f"{'s ratio':>8}"
    )
    table = []
    for k in args.cuts:
        mb = {
            n: statistics.median(m["peak_mb"] for m in rows[(k, n)]) - base[alloc]
            for n, (_, _, alloc) in runs.items()
        }
        sec = {n: statistics.median(m["step_s"] for m in rows[(k, n)]) for n in runs}
        for n in runs:
            row = {
                "k": k,
                "setting": n,
                "above_baseline_mb": mb[n],
                "step_s": sec[n],
                "mb_ratio": mb[n] / mb[REFERENCE],
                "step_ratio": sec[n] / sec[REFERENCE],
            }
            table.append(row)
            print(
                f"{k:>4} {n:<22} {mb[n]:7.0f} {row['mb_ratio']:9.2f} "
                f"{sec[n]:7.2f} {row['step_ratio']:8.2f}"
            )
    print(
        f"MB: peak RSS above the baseline; ratios: over {REFERENCE} (today's "
        "client; medians of --repeats fresh processes)"
    )
    if args.out:
        write_json(
            Path(args.out) / "client_memory.json",
            {
                "provenance": provenance(),
                "args": vars(args),
                "baseline_mb": base,
                "rows": table,
            },
        )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cuts", type=int, nargs="+", default=[2, 8, 15, 29])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="timed steps a process")
    ap.add_argument("--repeats", type=int, default=1, help="fresh processes each")
    ap.add_argument(
        "--settings",
        nargs="+",
        type=client_setting,
        default=SETTINGS,
        metavar="BASE/CKPT",
        help="client.base_dtype/client.checkpointing pairs (float32/none is "
        "always measured: the ratios' reference)",
    )
    ap.add_argument(
        "--mmap-threshold",
        type=int,
        default=0,
        metavar="BYTES",
        help="also float32/blocks with glibc's MALLOC_MMAP_THRESHOLD_ at this "
        "(0: not; 131072 is glibc's initial threshold)",
    )
    ap.add_argument(
        "--allocators",
        nargs="*",
        default=[],
        choices=sorted(ALLOCATORS),
        help=f"also {REFERENCE} and {FRUGAL} with this malloc (LD_PRELOAD; "
        "apt install libtcmalloc-minimal4 / libjemalloc2)",
    )
    ap.add_argument(
        "--quick", action="store_true", help="cuts 2 15, 2 steps, 4 settings"
    )
    ap.add_argument("--out", help="also write client_memory.json here")
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(measure(int(a.one[0]), a.one[1], a.batch_size, a.steps)))
    else:
        if a.quick:
            a.cuts, a.steps = [2, 15], 2
            a.settings = [REFERENCE, "float32/blocks", "bfloat16/blocks", "nf4/blocks"]
        if REFERENCE not in a.settings:
            a.settings = [REFERENCE, *a.settings]
        main(a)
