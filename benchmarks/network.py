"""The same federation in process and over loopback gRPC with TLS.

    python benchmarks/network.py [--quick] [--out runs/bench/network]

Runs one config twice, side by side in one run: as a simulation (every client
in this process, messages through the in-process codec) and as a deployment
(`splitft server` and one `splitft client` process per client on 127.0.0.1,
TLS and tokens, each client's traffic through a byte-counting TCP relay in
this process). Prints:

- training tokens per second of each, from the rounds' wall time (training
  and aggregation; evaluation and start-up excluded), and their ratio;
- bytes on the wire (TCP payload through the relay: TLS records, HTTP/2 and
  gRPC framing, handshakes, polls) against the message payloads the
  transport counted, and the overhead.

The default model and data; a few minutes on 2 CPU cores (``--quick``: one
round less). Writes results.json to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

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
        "federation.cut_layers=[2, 4, 6]",
        "federation.round_timeout_s=1800",
    ]


def throughput(rounds: list[dict]) -> tuple[int, float]:
    """Training tokens and the rounds' wall seconds (round 0 is evaluation)."""
    trained = [r for r in rounds if r["round"] > 0]
    return sum(r["train_tokens"] for r in trained), sum(
        r["wall_round_s"] for r in trained
    )


def in_process(args, out: Path) -> dict:
    cfg = load_config(None, [*settings(args, out), "name=inproc"])
    sim = Simulation(cfg)
    sim.run(table=False)
    tokens, wall = throughput(sim.rounds)
    return {"tokens": tokens, "wall_s": wall, "eval_loss": sim.rounds[-1]["eval_loss"]}


def deployed(args, out: Path) -> dict:
    certs = out / "certs"
    make_certs(certs, "localhost", args.clients, overwrite=True)
    port = free_port()
    base = settings(args, out)
    cli = [sys.executable, "-m", "splitft.cli", "-q"]
    server = subprocess.Popen(
        [
            *cli,
            "server",
            *base,
            "name=grpc",
            "--address",
            f"127.0.0.1:{port}",
            "--certs",
            str(certs),
        ]
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
    run = out / "grpc"
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
        "--client-threads", type=int, default=1, help="torch threads per client process"
    )
    args = ap.parse_args()
    args.rounds = args.rounds or (2 if args.quick else 3)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prov = provenance()
    t0 = time.perf_counter()
    local = in_process(args, out)
    net = deployed(args, out)
    rate = {k: r["tokens"] / r["wall_s"] for k, r in (("inproc", local), ("grpc", net))}
    overhead = net["wire_bytes"] / net["payload_bytes"] - 1
    results = {
        **prov,
        "settings": vars(args),
        "in_process": local,
        "grpc_tls": net,
        "tokens_per_s": rate,
        "ratio": rate["grpc"] / rate["inproc"],
        "wire_overhead": overhead,
        "wall_s": time.perf_counter() - t0,
    }
    write_json(out / "results.json", results)
    print(f"\n{'':24}{'in process':>14}{'gRPC + TLS':>14}")
    print(f"{'training tokens':24}{local['tokens']:>14}{net['tokens']:>14}")
    print(f"{'rounds wall s':24}{local['wall_s']:>14.1f}{net['wall_s']:>14.1f}")
    print(f"{'tokens per second':24}{rate['inproc']:>14.1f}{rate['grpc']:>14.1f}")
    print(f"{'final eval loss':24}{local['eval_loss']:>14.4f}{net['eval_loss']:>14.4f}")
    print(
        f"\ngRPC / in process, tokens per second: {results['ratio']:.3f} (goal >= 0.90)"
    )
    print(
        f"bytes on the wire {net['wire_bytes']:,} (up {net['wire_up']:,}, down "
        f"{net['wire_down']:,}) against {net['payload_bytes']:,} of message "
        f"payloads: overhead {100 * overhead:.2f} % (goal <= 2 %)"
    )
    print(f"\n{prov['command']}: {results['wall_s'] / 60:.1f} min; {out}/results.json")


if __name__ == "__main__":
    main()
