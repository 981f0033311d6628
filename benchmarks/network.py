"""The same federation in process and over loopback gRPC with TLS.

    python benchmarks/network.py [--quick] [--out runs/bench/network]

Runs one config as pairs of runs (``--repeats``, in alternating order), side by
side in one run: as a simulation (every client in this process, messages
through the in-process codec) and as a deployment
(`splitft server` and one `splitft client` process per client on 127.0.0.1,
TLS and tokens, each client's traffic through a byte-counting TCP relay in
this process). Prints:

- training tokens per second of each, from the rounds' wall time (training
  and aggregation; evaluation and start-up excluded), and their ratio, per
  pair and the median over pairs (one pair varies by several per cent on a
  shared 2-core machine);
- bytes on the wire (TCP payload through the relay: TLS records, HTTP/2 and
  gRPC framing, handshakes, polls) against the message payloads the
  transport counted, and the overhead.

The default model and data; about 4 minutes on 2 CPU cores (``--quick``:
one pair, one round less). Writes results.json to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import provenance, write_json  # noqa: E402

from splitft.config import load_config  # noqa: E402
from splitft.federation.simulation import Simulation  # noqa: E402
from splitft.transport.security import make_certs  # noqa: E402


class Relay:
    """A TCP relay that counts the bytes it forwards each way."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.up = self.down = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            try:  # the server may not listen yet: the client retries
                server = socket.create_connection(self.target)
            except OSError:
                conn.close()
                continue
            threading.Thread(
                target=self._pipe, args=(conn, server, "up"), daemon=True
            ).start()
            threading.Thread(
                target=self._pipe, args=(server, conn, "down"), daemon=True
            ).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, way: str) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
                with self._lock:
                    setattr(self, way, getattr(self, way) + len(data))
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._listener.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def settings(args, out: Path) -> list[str]:
    return [
        f"out_dir={out}",
        "model.device=cpu",
        "data.max_length=128",
        "data.eval_size=8",
        "data.max_train_per_task=100",
        "train.batch_size=2",
        "eval.accuracy=false",
        f"eval.every={args.rounds}",
        f"federation.num_clients={args.clients}",
        f"federation.rounds={args.rounds}",
        f"federation.local_steps={args.local_steps}",
        f"federation.cut_layers={[(2, 4, 6)[i % 3] for i in range(args.clients)]}",
        "federation.round_timeout_s=1800",
    ]


def throughput(rounds: list[dict]) -> tuple[int, float]:
    """Training tokens and the rounds' wall seconds (round 0 is evaluation)."""
    trained = [r for r in rounds if r["round"] > 0]
    return sum(r["train_tokens"] for r in trained), sum(
        r["wall_round_s"] for r in trained
    )


def server_steps(run: Path) -> dict[tuple, float]:
    """The server's seconds for each step, by (round, client, step)."""
    steps = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["type"] == "step":
            key = (rec["round"], rec["client"], rec["step"])
            steps[key] = rec["server_seconds"]
    return steps


def in_process(args, out: Path, i: int) -> dict:
    cfg = load_config(None, [*settings(args, out), f"name=inproc-{i}"])
    sim = Simulation(cfg)
    sim.run(table=False)
    tokens, wall = throughput(sim.rounds)
    return {"tokens": tokens, "wall_s": wall, "eval_loss": sim.rounds[-1]["eval_loss"]}


def deployed(args, out: Path, i: int) -> dict:
    certs = out / "certs"
    make_certs(certs, "localhost", args.clients, overwrite=True)
    port = free_port()
    base = settings(args, out)
    cli = [sys.executable, "-m", "splitft.cli", "-q"]
    server_env = dict(os.environ)
    if args.server_threads:
        server_env["OMP_NUM_THREADS"] = str(args.server_threads)
    server = subprocess.Popen(
        [
            *cli,
            "server",
            *base,
            f"name=grpc-{i}",
            "--address",
            f"127.0.0.1:{port}",
            "--certs",
            str(certs),
        ],
        env=server_env,
    )
    time.sleep(1.0)
    relay = Relay(port)
    # each client process computes with one thread: three clients and the
    # server share this machine's cores (on real machines each has its own)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.client_threads)}
    clients = [
        subprocess.Popen(
            [
                *cli,
                "client",
                *base,
                "--server",
                f"127.0.0.1:{relay.port}",
                "--client-id",
                str(cid),
                "--server-name",
                "localhost",
                "--token-file",
                str(certs / "clients" / f"client-{cid}.token"),
                "--ca",
                str(certs / "ca.pem"),
            ],
            env=env,
        )
        for cid in range(args.clients)
    ]
    codes = [p.wait() for p in [server, *clients]]
    relay.close()
    if any(codes):
        raise SystemExit(f"a deployment process failed: exit codes {codes}")
    run = out / f"grpc-{i}"
    summary = json.loads((run / "summary.json").read_text())
    rounds = summary["rounds"]
    payload = sum(
        n for per in summary["transport_bytes"].values() for n in per.values()
    )
    tokens, wall = throughput(rounds)
    return {
        "tokens": tokens,
        "wall_s": wall,
        "eval_loss": rounds[-1]["eval_loss"],
        "payload_bytes": payload,
        "wire_bytes": relay.up + relay.down,
        "wire_up": relay.up,
        "wire_down": relay.down,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="runs/bench/network")
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="pairs of runs, in alternating order (default 3; --quick: 1)",
    )
    ap.add_argument(
        "--client-threads", type=int, default=1, help="torch threads per client process"
    )
    ap.add_argument(
        "--server-threads",
        type=int,
        default=None,
        help="torch threads of the simulation and of the server process "
        "(default: PyTorch's, one per core)",
    )
    args = ap.parse_args()
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.server_threads:
        torch.set_num_threads(args.server_threads)  # the simulation's
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prov = provenance()
    t0 = time.perf_counter()
    pairs = []
    for i in range(args.repeats):
        # alternate which goes first, so neither always meets a warm machine
        if i % 2 == 0:
            local = in_process(args, out, i)
            net = deployed(args, out, i)
        else:
            net = deployed(args, out, i)
            local = in_process(args, out, i)
        local_steps = server_steps(out / f"inproc-{i}")
        grpc_steps = server_steps(out / f"grpc-{i}")
        rate = {
            k: r["tokens"] / r["wall_s"] for k, r in (("inproc", local), ("grpc", net))
        }
        pairs.append(
            {
                "in_process": local,
                "grpc_tls": net,
                "tokens_per_s": rate,
                "ratio": rate["grpc"] / rate["inproc"],
                "wire_overhead": net["wire_bytes"] / net["payload_bytes"] - 1,
                # the same step's server time, deployed over in process
                "server_step_ratio": statistics.median(
                    grpc_steps[k] / local_steps[k] for k in local_steps
                ),
            }
        )
    ratios = [p["ratio"] for p in pairs]
    overheads = [p["wire_overhead"] for p in pairs]
    results = {
        **prov,
        "settings": vars(args),
        "pairs": pairs,
        "ratio_median": statistics.median(ratios),
        "ratio_range": [min(ratios), max(ratios)],
        "wire_overhead_max": max(overheads),
        "wall_s": time.perf_counter() - t0,
    }
    write_json(out / "results.json", results)
    print(f"\n{'':24}{'in process':>14}{'gRPC + TLS':>14}{'ratio':>8}{'wire':>8}")
    for i, p in enumerate(pairs):
        local, net, rate = p["in_process"], p["grpc_tls"], p["tokens_per_s"]
        print(
            f"{f'pair {i + 1}: tokens/s':24}"
            f"{rate['inproc']:>14.2f}{rate['grpc']:>14.2f}"
            f"{p['ratio']:>8.3f}{100 * p['wire_overhead']:>7.2f}%"
        )
        print(f"{'  rounds wall s':24}{local['wall_s']:>14.1f}{net['wall_s']:>14.1f}")
        print(f"{'  server step, median':24}{'':14}{p['server_step_ratio']:>13.2f}x")
        print(
            f"{'  final eval loss':24}{local['eval_loss']:>14.4f}"
            f"{net['eval_loss']:>14.4f}"
        )
    print(
        f"\ngRPC / in process, tokens per second: median {results['ratio_median']:.3f}"
        f" of {len(pairs)} pairs (range {min(ratios):.3f}-{max(ratios):.3f}; "
        "goal >= 0.90)"
    )
    last = pairs[-1]["grpc_tls"]
    print(
        f"bytes on the wire {last['wire_bytes']:,} (up {last['wire_up']:,}, down "
        f"{last['wire_down']:,}) against {last['payload_bytes']:,} of message "
        f"payloads in the last pair: overhead {100 * overheads[-1]:.2f} % "
        f"(largest of all pairs {100 * max(overheads):.2f} %; goal <= 2 %)"
    )
    print(f"\n{prov['command']}: {results['wall_s'] / 60:.1f} min; {out}/results.json")


if __name__ == "__main__":
    main()
