"""Server throughput (issue 19): the split server's training step on the real
default model, side by side in one run, in five modes:

- ``full``: one request at a time, the head and the loss on every position
  (the server before issue 19: the HF forward with labels);
- ``labels``: one at a time, the head only at the labelled positions
  (``ModelPart.train_loss``: today's default server);
- ``batched_full``: all N requests in one batch (``server.batching``,
  ``split/engine.py``), the head on every position;
- ``batched``: one batch, the head at labels (the requests' rows packed into
  shared rows: ``engine.PACK``, the server's layout);
- ``padded``: ``batched`` with each row of its own, padded to the longest
  (the layout before packing);
- ``grouped``: one batch per cut (the requests of clients with the same cut
  together), the head at labels: the alternative to rows joining at their cut.

    python benchmarks/server_throughput.py --out runs/bench/server_throughput
    python benchmarks/server_throughput.py --quick      # N = 1 and 4, 3 repeats
    python benchmarks/server_throughput.py --loss-on all --out runs/bench/st-all
    python benchmarks/server_throughput.py --modes full,labels,padded,batched

N = 1, 2, 4, 8, 16 clients at cuts cycled over 2, 4, 6, 8 each send the
server one micro-batch (2 rows of the default data, drawn per client, with
the answer-only labels of ``data.loss_on=answer``, or with ``--loss-on all``
every token; the same rows in every mode); the real ``SplitServer`` handles
the N requests one after another or batched, each a whole step (forward,
backward, optimizer step). Per ``federation.server_side`` (per_client and
shared) and mode, the median time of the N requests over ``--repeats`` (the
modes take turns, so load on the machine hits them alike) gives token slots
per second; ratios are against ``full`` (today's server before issue 19) and
``labels`` (serial today). ``--modes`` picks some (``full`` and ``labels``
always run). Each mode's first step is checked against
``labels``'s: the same loss, tokens, accuracy and gradient of the smashed data
(a shared adapter batched steps once per batch, so only its first step's
replies compare).

``--dtype bfloat16`` runs the server's frozen base in bf16 (``model.server_dtype``)
and ``--device cuda`` on a GPU; neither was measured for docs/benchmarks.md
(no GPU was lent to the session that built them).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import provenance, train_rows, write_json  # noqa: E402

from splitft.config import LoraSettings, TrainConfig  # noqa: E402
from splitft.data.format import collate  # noqa: E402
from splitft.models.default import default_model_dir  # noqa: E402
from splitft.models.parts import (  # noqa: E402
    ModelPart,
    TrainLoss,
    WeightStore,
    client_part,
    labelled_tokens,
    load_model_config,
)
from splitft.split import engine  # noqa: E402
from splitft.split.messages import Gradient, RoundRequest, SmashedData  # noqa: E402
from splitft.split.server import SplitServer  # noqa: E402

CUTS = (2, 4, 6, 8)
MODES = ("full", "labels", "batched_full", "batched", "padded", "grouped")
BATCHED = ("batched_full", "batched", "padded", "grouped")
ROWS, MAX_LENGTH = 2, 256


def full_head(self, labels, attention_mask, position_ids, *, hidden=None, **_):
    """The server before issue 19: the HF model's forward with labels (the
    head on every position), the accuracy counted on the full logits."""
    out = self.logits_from_hidden(hidden, attention_mask, position_ids, labels)
    target = labels[:, 1:]
    mask = target != -100
    n = int(mask.sum())
    hits = int(((out.logits[:, :-1].detach().argmax(-1) == target) & mask).sum())
    return TrainLoss(out.loss if n else None, n, hits)


def full_logits(self, final, labels):
    """``head_at_labels`` as the head on every position would give it: the
    full ``(B, T, V)`` logits, then the labelled positions picked out."""
    target = labels[:, 1:]
    mask = target != -100
    logits = getattr(self.model, self.spec.head)(final).float()
    return logits[:, :-1][mask], target[mask], mask


@contextlib.contextmanager
def mode(name: str):
    """Run the server's training forward as mode ``name`` does."""
    if name == "padded":
        saved, engine.PACK = engine.PACK, False
        try:
            yield
        finally:
            engine.PACK = saved
        return
    if name not in ("full", "batched_full"):
        yield
        return
    attr, fn = (
        ("train_loss", full_head) if name == "full" else ("head_at_labels", full_logits)
    )
    saved = getattr(ModelPart, attr)
    setattr(ModelPart, attr, fn)
    try:
        yield
    finally:
        setattr(ModelPart, attr, saved)


def requests(
    store, model_config, rows, n: int, seed: int, every_token: bool = False
) -> list[SmashedData]:
    """One micro-batch per client, its smashed data from the real client part;
    ``every_token``: every real token labelled (``data.loss_on=all``)."""
    rng = np.random.default_rng(seed)
    parts = {k: client_part(store, model_config, k) for k in set(CUTS)}
    out = []
    for cid in range(n):
        k = CUTS[cid % len(CUTS)]
        picked = [rows[i] for i in rng.choice(len(rows), ROWS, replace=False)]
        b = {key: v.to(store.device) for key, v in collate(picked, 0).items()}
        if every_token:
            b["labels"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
        with torch.no_grad():
            hidden = parts[k].client_forward(
                b["input_ids"], b["attention_mask"], b["position_ids"]
            )
        out.append(
            SmashedData(
                client_id=cid,
                step=0,
                micro=0,
                num_micro=1,
                hidden=hidden,
                attention_mask=b["attention_mask"],
                position_ids=b["position_ids"],
                labels=b["labels"],
                step_tokens=labelled_tokens(b["labels"]),
            )
        )
    return out


def server_for(
    store, model_config, msgs, steps: int, side: str, batching=False
) -> SplitServer:
    cuts = {m.client_id: CUTS[m.client_id % len(CUTS)] for m in msgs}
    server = SplitServer(
        store,
        model_config,
        LoraSettings(),
        TrainConfig(batch_size=ROWS),
        cuts,
        steps,
        steps,
        server_side=side,
        batching=batching,
    )
    for cid in cuts:
        server.handle(RoundRequest(cid, 0))
    return server


def serve(
    server: SplitServer, msgs: list[SmashedData], step: int, name: str = "labels"
) -> list[Gradient]:
    msgs = [dataclasses.replace(m, step=step) for m in msgs]
    if name in ("batched", "batched_full", "padded"):
        replies = server.handle_many([(m, None) for m in msgs])
    elif name == "grouped":
        cuts = {m.client_id: server.cut_layers[m.client_id] for m in msgs}
        by_cut: dict[int, list[int]] = {}
        for i, m in enumerate(msgs):
            by_cut.setdefault(cuts[m.client_id], []).append(i)
        replies = [None] * len(msgs)
        for idx in by_cut.values():
            got = server.handle_many([(msgs[i], None) for i in idx])
            for i, r in zip(idx, got, strict=True):
                replies[i] = r
    else:
        replies = [server.handle(m) for m in msgs]
    for reply in replies:
        if not isinstance(reply, Gradient):
            raise RuntimeError(f"refused: {reply.error}")
    return replies


def same_step(store, model_config, msgs, side: str, modes=MODES) -> dict:
    """Every mode's first step on fresh servers against ``labels``'s: equal
    up to fp32 rounding? A shared adapter moves after every serial step, so
    there only the first request's reply compares."""
    got = {}
    for name in modes:
        with mode(name):
            server = server_for(store, model_config, msgs, 1, side, name in BATCHED)
            got[name] = serve(server, msgs, 0, name)
    out = {}
    for name in modes:
        a, b = got[name], got["labels"]
        if side == "shared":
            a, b = a[:1], b[:1]
        pairs = list(zip(a, b, strict=True))
        out[name] = {
            "max_grad_diff": max(
                float((x.grad - y.grad).abs().max()) for x, y in pairs
            ),
            "max_loss_diff": max(abs(x.loss - y.loss) for x, y in pairs),
            "same_counts": all(
                (x.tokens, x.correct) == (y.tokens, y.correct) for x, y in pairs
            ),
        }
    return out


def measure(store, model_config, msgs, side: str, repeats: int, modes=MODES) -> dict:
    steps = 2 * (repeats + 1)
    servers = {
        m: server_for(store, model_config, msgs, steps, side, m in BATCHED)
        for m in modes
    }
    times: dict[str, list[float]] = {m: [] for m in modes}
    step = 0
    for turn in range(repeats + 1):  # turn 0 warms up
        for name in modes if turn % 2 == 0 else modes[::-1]:
            with mode(name):
                t0 = time.perf_counter()
                serve(servers[name], msgs, step, name)
                seconds = time.perf_counter() - t0
            if turn:
                times[name].append(seconds)
        step += 1
    slots = sum(m.hidden.shape[0] * m.hidden.shape[1] for m in msgs)
    labelled = sum(labelled_tokens(m.labels) for m in msgs)
    cuts = [CUTS[m.client_id % len(CUTS)] for m in msgs]
    row = {
        "clients": len(msgs),
        "slots": slots,
        "labelled": labelled,
        # what one batch's blocks run on: rows packed, or one each, padded
        "packed_slots": sum(engine.slots(msgs, cuts)),
        "padded_slots": sum(engine.slots(msgs, cuts, pack=False)),
    }
    for name in modes:
        t = statistics.median(times[name])
        row[name] = {"seconds": t, "slots_per_s": slots / t, "all_s": times[name]}
    row["speedup"] = row["full"]["seconds"] / row["labels"]["seconds"]
    for name in [m for m in modes if m in BATCHED]:  # against serial, old server
        row[name]["vs_labels"] = row["labels"]["seconds"] / row[name]["seconds"]
        row[name]["vs_full"] = row["full"]["seconds"] / row[name]["seconds"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/bench/server_throughput"))
    ap.add_argument("--clients", default="1,2,4,8,16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sides", default="per_client,shared")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: as is)")
    ap.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="the server's frozen base (model.server_dtype); clients stay float32",
    )
    ap.add_argument(
        "--modes",
        default=",".join(MODES),
        help=f"which of {', '.join(MODES)} (full and labels always run)",
    )
    ap.add_argument("--quick", action="store_true", help="N = 1, 4; 3 repeats")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--loss-on",
        choices=("answer", "all"),
        default="answer",
        help="labels as data.loss_on: the answers (default) or every token",
    )
    args = ap.parse_args()
    if args.quick:
        args.clients, args.repeats = "1,4", 3
    asked = set(args.modes.split(","))
    if asked - set(MODES):
        ap.error(f"--modes: {', '.join(sorted(asked - set(MODES)))} not in {MODES}")
    modes = tuple(m for m in MODES if m in asked | {"full", "labels"})
    batched = [m for m in modes if m in BATCHED]
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = default_model_dir()
    store = WeightStore(folder, device=args.device)  # the clients'
    dtype = getattr(torch, args.dtype)
    server_store = WeightStore(folder, dtype=dtype, device=args.device)
    model_config = load_model_config(folder)
    rows = train_rows(MAX_LENGTH, 32, 200, args.seed)
    results = {
        **provenance(),
        "settings": {**vars(args), "out": str(args.out)},
        "device": args.device,
        "threads": torch.get_num_threads(),
        "rows_per_client": ROWS,
        "cuts": CUTS,
        "runs": [],
    }
    t_start = time.perf_counter()
    every = args.loss_on == "all"
    for side in args.sides.split(","):
        for n in (int(x) for x in args.clients.split(",")):
            msgs = requests(store, model_config, rows, n, args.seed, every)
            row = {
                "server_side": side,
                **measure(server_store, model_config, msgs, side, args.repeats, modes),
            }
            row["check"] = same_step(server_store, model_config, msgs, side, modes)
            results["runs"].append(row)
            worst = max(c["max_grad_diff"] for c in row["check"].values())
            print(
                f"{side:>10} N={n:>2}: {row['slots']:>5} slots (a batch: packed "
                f"{row['packed_slots']}, padded {row['padded_slots']}), "
                f"{row['labelled']:>4} labelled; full head "
                f"{row['full']['seconds']:.3f} s, at labels "
                f"{row['labels']['seconds']:.3f} s ({row['speedup']:.2f}x); "
                + "; ".join(
                    f"{m} {row[m]['seconds']:.3f} s ({row[m]['vs_labels']:.2f}x "
                    f"serial at labels, {row[m]['vs_full']:.2f}x full)"
                    for m in batched
                )
                + f"; worst grad diff {worst:.1e}",
                flush=True,
            )
            write_json(args.out / "results.json", results)
    results["wall_s"] = time.perf_counter() - t_start
    write_json(args.out / "results.json", results)
    print(f"wrote {args.out / 'results.json'} ({results['wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
