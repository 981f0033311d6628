"""One client floods the server: how long do the others wait?

    python benchmarks/fairness.py [--quick] [--out DIR]

A real gRPC server with TLS on 127.0.0.1 (splitft.transport.network, as
`splitft server` builds it: ``num_clients + 8`` worker threads for 3
clients) in front of a handler that stands for the split server: a request
holds the one model for ``--step-ms`` (the model is one, so requests take
turns), and a long poll (``RoundRequest(round=-1)``) holds its worker for
``--poll-s`` as the deployment's does. Client 1 sends requests one after
another and times each; client 0 floods: ``--flood`` threads send long polls
as fast as they are answered (or refused).

Measured side by side in one run: client 1's latency on an idle server and
under the flood, with ``server.max_calls_per_client`` at its default (8) and
unbounded (what the server did before the bound). Printed: median and 95th
percentile of client 1's latency and their ratio to the idle server's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import provenance, write_json  # noqa: E402

from splitft.config import ServerConfig  # noqa: E402
from splitft.split.messages import Ack, Join, RoundRequest, Wait  # noqa: E402
from splitft.transport.network import NetworkServer, NetworkTransport  # noqa: E402
from splitft.transport.security import (  # noqa: E402
    load_token_hashes,
    make_certs,
    read_token,
)

CLIENTS = 3
UNBOUNDED = 10**6


class StandIn:
    """The split server as the transport sees it: one model, long polls."""

    device = "cpu"

    def __init__(self, step_s: float, poll_s: float) -> None:
        self.step_s, self.poll_s = step_s, poll_s
        self.model = threading.Lock()

    def handle(self, msg, peer=None):
        if isinstance(msg, RoundRequest) and msg.round == -1:
            time.sleep(self.poll_s)  # a long poll: no round for this client
            return Wait(msg.client_id, 0, 0.0)
        with self.model:
            time.sleep(self.step_s)
        return Ack(msg.client_id)


def measure(certs: Path, args, max_calls: int, flood: int) -> list[float]:
    """Client 1's latencies (seconds), with ``flood`` threads of client 0."""
    server = NetworkServer(
        StandIn(args.step_ms / 1e3, args.poll_s),
        "127.0.0.1:0",
        tls=((certs / "server.pem").read_bytes(), (certs / "server.key").read_bytes()),
        token_hashes=load_token_hashes(certs / "tokens.json"),
        max_message_bytes=4 * 2**20,
        workers=CLIENTS + 8,
        max_calls_per_client=max_calls,
    )
    server.start()
    address, ca = f"127.0.0.1:{server.port}", (certs / "ca.pem").read_bytes()

    def link(cid: int) -> NetworkTransport:
        token = read_token(certs / "clients" / f"client-{cid}.token")
        return NetworkTransport(address, cid, token, ca_cert=ca, timeout_s=60.0)

    stop = threading.Event()

    def flooder() -> None:
        with link(0) as t:
            while not stop.is_set():
                t.call(RoundRequest(0, -1))  # answered or RESOURCE_EXHAUSTED

    threads = [threading.Thread(target=flooder, daemon=True) for _ in range(flood)]
    for t in threads:
        t.start()
    time.sleep(2 * args.poll_s if flood else 0.0)  # the flood is in full swing
    latencies = []
    with link(1) as me:
        me.call(Join(1, 1))  # warm the connection
        for _ in range(args.requests):
            t0 = time.perf_counter()
            reply = me.call(Join(1, 1))
            latencies.append(time.perf_counter() - t0)
            assert isinstance(reply, Ack) and not reply.code, reply
    stop.set()
    for t in threads:
        t.join(timeout=10 * args.poll_s)
    server.stop(grace=0)
    return latencies


def summary(latencies: list[float]) -> dict:
    ordered = sorted(latencies)
    return {
        "median_ms": 1e3 * statistics.median(ordered),
        "p95_ms": 1e3 * ordered[int(0.95 * (len(ordered) - 1))],
        "n": len(ordered),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests")
    ap.add_argument("--flood", type=int, default=64, help="client 0's threads")
    ap.add_argument("--step-ms", type=float, default=20.0)
    ap.add_argument("--poll-s", type=float, default=2.0)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--out", default="runs/bench/fairness")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.flood = 10, 32
    bound = ServerConfig().max_calls_per_client
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        certs = Path(tmp)
        make_certs(certs, "localhost", clients=CLIENTS)
        for name, max_calls, flood in [
            ("idle", bound, 0),
            (f"flood, bound {bound}", bound, args.flood),
            ("flood, unbounded", UNBOUNDED, args.flood),
        ]:
            rows[name] = summary(measure(certs, args, max_calls, flood))
            print(f"{name}: {rows[name]}", flush=True)
    idle = rows["idle"]
    print(f"\n{'client 1':<22}{'median ms':>11}{'p95 ms':>9}{'x idle':>8}")
    for name, r in rows.items():
        ratio = r["median_ms"] / idle["median_ms"]
        r["median_vs_idle"] = ratio
        print(f"{name:<22}{r['median_ms']:>11.1f}{r['p95_ms']:>9.1f}{ratio:>8.2f}")
    write_json(
        Path(args.out) / ("results-quick.json" if args.quick else "results.json"),
        {"provenance": provenance(), "settings": vars(args), "rows": rows},
    )


if __name__ == "__main__":
    main()
