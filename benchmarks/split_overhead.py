"""Split training against plain PEFT LoRA training of the same model.

    python benchmarks/split_overhead.py [--steps 12] [--batch-size 8] [--cuts 2 8 15]

Tokens per second of split training (one client, in-process transport with
real serialisation, client and server in this process) against plain PEFT
LoRA training of the unsplit model on the same batches, interleaved in one run
so both see the same machine state; printed as ratios. Then the client's peak
memory against the cut layer, each measured in a fresh process that builds
only the client part and runs one forward and backward.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np
import peft
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from splitft import lora
from splitft.config import DEFAULT_TASKS, LoraSettings, TrainConfig, cache_dir
from splitft.data import build_datasets, collate
from splitft.federation.coordinator import aggregate_round
from splitft.models.default import default_model_dir
from splitft.models.parts import WeightStore, client_part, load_model_config
from splitft.split import optim
from splitft.split.client import SplitClient
from splitft.split.server import SplitServer
from splitft.transport import InProcessTransport

# cut_rank == r: both sides then run exactly the same FLOPs as plain PEFT.
LORA = LoraSettings(r=8, cut_rank=8, alpha=16.0)


def examples(tokenizer, n: int) -> list[dict]:
    train, _ = build_datasets(DEFAULT_TASKS, tokenizer, cache_dir(), 192, 4, 0, n)
    return train.select_columns(["input_ids", "labels"]).to_list()


def plain_step(model, opt, batch: dict, train: TrainConfig) -> None:
    model(**batch).loss.backward()
    optim.step(opt, train.lr, train.max_grad_norm)


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def run(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    folder = default_model_dir()
    config, tok = load_model_config(folder), AutoTokenizer.from_pretrained(folder)
    rows = examples(tok, 64)
    train = TrainConfig(batch_size=args.batch_size, warmup_steps=0)
    spec = lora.spec_for(config.model_type)
    L = config.num_hidden_layers
    n_batches = args.steps + 1  # the first batch warms up and is not counted
    rng = np.random.default_rng(0)
    order = rng.permutation(len(rows)).tolist() * 4
    batches = [
        collate(order_rows, tok.pad_token_id)
        for order_rows in (
            [rows[j] for j in order[i * args.batch_size : (i + 1) * args.batch_size]]
            for i in range(n_batches)
        )
    ]

    ref = AutoModelForCausalLM.from_pretrained(folder)
    ref.config.use_cache = False
    ranks = dict.fromkeys(range(L), LORA.r)
    ref = peft.get_peft_model(ref, lora.peft_config(spec, LORA, ranks)).train()
    ref_opt = optim.make_optimizer(
        [p for p in ref.parameters() if p.requires_grad], train
    )

    store = WeightStore(folder)
    split, overhead = {}, {}
    for k in args.cuts:
        server = SplitServer(
            store, config, LORA, train, {0: k}, total_steps=10**6, local_steps=n_batches
        )
        client = SplitClient(0, store, config, LORA, train, rows, tok.pad_token_id)
        transport = InProcessTransport(server)
        overhead[k] = timed(client.start_round, transport, 0)
        split[k] = (server, client, transport)

    # Interleaved per batch: every mode runs the same batch back to back, so
    # drift in the machine's speed hits all modes alike.
    seconds: dict[str, list[float]] = {"plain": [], **{k: [] for k in args.cuts}}
    for i, batch in enumerate(batches):
        seconds["plain"].append(timed(plain_step, ref, ref_opt, batch, train))
        for k, (_, client, transport) in split.items():
            seconds[k].append(timed(client.train_step, transport, i, train.lr, batch))
        print(
            f"batch {i}{' (warm-up)' if i == 0 else ''}: "
            + ", ".join(f"{m}: {v[-1]:.2f} s" for m, v in seconds.items()),
            flush=True,
        )
    for k, (server, client, transport) in split.items():
        overhead[k] += timed(client.finish_round, transport, 0)
        overhead[k] += timed(aggregate_round, server)

    tokens = [int(b["attention_mask"].sum()) for b in batches[1:]]
    plain = seconds["plain"][1:]
    print(
        f"\nthroughput over {args.steps} batches of {args.batch_size} examples "
        f"({sum(tokens)} tokens), each batch run by every mode back to back:"
    )
    print(f"{'mode':>8} {'tok/s':>8} {'split/plain':>12} {'round overhead s':>17}")
    print(f"{'plain':>8} {sum(tokens) / sum(plain):8.1f} {1.0:12.3f} {'-':>17}")
    for k in args.cuts:
        sec = seconds[k][1:]
        ratio = statistics.median(p / s for p, s in zip(plain, sec, strict=True))
        print(
            f"{'k=' + str(k):>8} {sum(tokens) / sum(sec):8.1f} {ratio:12.3f} "
            f"{overhead[k]:17.2f}"
        )
    print("split/plain: median over batches of plain step time / split step time")
    print("round overhead: plan + adapter upload + aggregation, once per round")

    print("\nclient peak memory (fresh process: client part + one forward/backward")
    print(f"on a {args.batch_size} x 192-token batch):")
    print(f"{'k':>4} {'params MB':>10} {'peak RSS MB':>12}")
    for k in [0, *args.cuts]:
        cmd = [sys.executable, __file__, "--client-memory", str(k)]
        cmd += ["--batch-size", str(args.batch_size)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        m = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{k:>4} {m['params_mb']:10.1f} {m['peak_rss_mb']:12.1f}")
    print(
        "(k=0: the same process with no client part built: the Python/torch baseline)"
    )


def client_memory(k: int, batch_size: int) -> None:
    folder = default_model_dir()
    config = load_model_config(folder)
    # memory depends on the batch shape only: a full-length random batch
    ids = torch.randint(3, config.vocab_size, (batch_size, 192))
    b = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "position_ids": torch.arange(192).expand(batch_size, 192),
    }
    params = 0.0
    if k:
        part = client_part(WeightStore(folder), config, k)
        lora.inject(part.model, part.spec, LORA, lora.layer_ranks(range(k), LORA, True))
        h = part.client_forward(b["input_ids"], b["attention_mask"], b["position_ids"])
        h.backward(torch.randn_like(h))
        params = part.parameter_bytes() / 1e6
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child
    # would report its parent's peak.
    status = open("/proc/self/status").read()
    hwm_kib = int(status.split("VmHWM:")[1].split()[0])
    peak = hwm_kib / 1024
    print(json.dumps({"k": k, "params_mb": params, "peak_rss_mb": peak}))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12, help="batches measured")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--cuts", type=int, nargs="+", default=[2, 8, 15])
    ap.add_argument("--client-memory", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.client_memory is not None:
        client_memory(a.client_memory, a.batch_size)
    else:
        run(a)
