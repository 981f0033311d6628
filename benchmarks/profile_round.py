"""Where the time of one split round goes (cProfile).

    python benchmarks/profile_round.py [--cut 8] [--steps 3] [--batch-size 8]

One client and the server in this process, the in-process transport, the
default model. A warm-up round runs first; the second round is profiled and
the cumulative seconds of the parts that are not the model are printed.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

from transformers import AutoTokenizer

from splitft.config import DEFAULT_TASKS, LoraSettings, TrainConfig, cache_dir
from splitft.data import build_datasets
from splitft.federation.coordinator import aggregate_round  # noqa: E402
from splitft.models.default import default_model_dir
from splitft.models.parts import WeightStore, load_model_config
from splitft.split.client import SplitClient
from splitft.split.server import SplitServer
from splitft.transport import InProcessTransport

PARTS = {
    "encode messages": ("messages.py", "encode"),
    "decode messages": ("messages.py", "decode"),
    "optimizer steps (client + server)": ("optim.py", "step"),
    "aggregation": ("aggregate.py", "aggregate"),
    "autograd backward": ("graph.py", "_engine_run_backward"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cut", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    folder = default_model_dir()
    config, tok = load_model_config(folder), AutoTokenizer.from_pretrained(folder)
    train_set, _ = build_datasets(DEFAULT_TASKS, tok, cache_dir(), 192, 4, 0, 64)
    rows = train_set.select_columns(["input_ids", "labels"]).to_list()
    lora_cfg = LoraSettings()
    train = TrainConfig(batch_size=args.batch_size, warmup_steps=0)
    store = WeightStore(folder)
    server = SplitServer(
        store,
        config,
        lora_cfg,
        train,
        {0: args.cut},
        total_steps=2 * args.steps,
        local_steps=args.steps,
    )
    client = SplitClient(0, store, config, lora_cfg, train, rows, tok.pad_token_id)
    transport = InProcessTransport(server)
    client.run_round(transport, 0)  # warm-up
    aggregate_round(server)

    profile = cProfile.Profile()
    t0 = time.perf_counter()
    profile.enable()
    client.run_round(transport, 1)
    aggregate_round(server)
    profile.disable()
    total = time.perf_counter() - t0

    stats = pstats.Stats(
        profile
    ).stats  # {(file, line, name): (cc, nc, tt, ct, callers)}
    print(
        f"round of {args.steps} steps x {args.batch_size} examples, cut {args.cut}: "
        f"{total:.2f} s"
    )
    for label, (file, name) in PARTS.items():
        seconds = sum(
            v[3] for k, v in stats.items() if k[0].endswith(file) and k[2] == name
        )
        print(f"  {label:<36} {seconds:7.3f} s  {100 * seconds / total:5.1f} %")


if __name__ == "__main__":
    main()
