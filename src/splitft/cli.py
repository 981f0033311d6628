"""``splitft`` command line: run a federation, prepare assets, list settings."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import typing
from pathlib import Path

from splitft.config import ConfigError, RunConfig, cache_dir, load_config
from splitft.interrupts import Interrupted, interruptible


def _settings(cls: type, prefix: str = "") -> typing.Iterator[tuple[str, str, str]]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _settings(hints[f.name], f"{prefix}{f.name}.")
        else:
            default = f.default_factory() if callable(f.default_factory) else f.default
            yield f"{prefix}{f.name}", repr(default), f.metadata.get("help", "")


def cmd_settings(_: argparse.Namespace) -> int:
    """Print every setting with its default and help."""
    for key, default, help in _settings(RunConfig):
        print(f"{key} = {default}\n    {help}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    """Convert the default model and fetch the data once, so runs start offline."""
    from splitft.data.bigbench import fetch_bigbench
    from splitft.models.default import resolve_model_dir

    cfg = load_config(args.config, args.overrides)
    print(f"model: {resolve_model_dir(cfg.model.path)}")
    if cfg.data.source == "bigbench":
        archive = Path(args.bigbench_archive) if args.bigbench_archive else None
        print(f"data:  {fetch_bigbench(cfg.data.tasks, cache_dir(), archive)}")
    elif cfg.data.source == "generated":
        print(f"data:  generated tasks {', '.join(cfg.data.tasks)} (nothing to fetch)")
    else:
        print(f"data:  {cfg.data.source} (a local file: nothing to fetch)")
    return 0


def cmd_partition(args: argparse.Namespace) -> int:
    """Show how the config spreads the training data over the clients."""
    cfg = load_config(args.config, args.overrides)
    from splitft.data.federated import load_run_data
    from splitft.data.partition_report import (
        partition_stats,
        plot_length_distributions,
        print_partition_table,
    )
    from splitft.models.default import resolve_model_dir
    from splitft.models.parts import load_tokenizer

    tokenizer = load_tokenizer(resolve_model_dir(cfg.model.path))
    data = load_run_data(cfg, tokenizer)
    p = cfg.partition
    title = (
        f"{p.method} partition of {cfg.data.source} over {len(data.partitions)} clients"
    )
    if p.method != "iid":
        title += f" (alpha={p.alpha:g})"
    print_partition_table(partition_stats(data.partitions), title)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    png = plot_length_distributions(
        data.partitions, cfg.run_dir / "partitions.png", title
    )
    print(f"length distributions: {png}")
    return 0


def _resume_config(args: argparse.Namespace):
    """The settings a run folder was started with; it stays where it is."""
    if args.config or args.overrides:
        raise ConfigError(
            "--resume takes no config or overrides: the run continues with the "
            f"settings in {Path(args.resume) / 'config.yaml'}"
        )
    run_dir = Path(args.resume)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--resume {run_dir}: not a run folder (no config.yaml)")
    out_dir, name = str(run_dir.parent), run_dir.name
    return load_config(run_dir / "config.yaml", [f"out_dir={out_dir}", f"name={name}"])


def cmd_run(args: argparse.Namespace) -> int:
    # fail fast, before heavy imports
    cfg = (
        _resume_config(args)
        if args.resume
        else load_config(args.config, args.overrides)
    )
    from splitft import runs
    from splitft.federation.simulation import Simulation

    run_dir = cfg.run_dir
    try:
        Simulation(cfg, resume=bool(args.resume)).run()
    except Interrupted as e:
        print(f"\n{_interrupted(run_dir, str(e))}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        if not runs.disk_full(e):
            raise
        last = runs.checkpoints(run_dir)
        kept = f"the last checkpoint {last[-1]} is intact" if last else "no checkpoint"
        raise ConfigError(
            f"the disk is full writing {e.filename or run_dir} ({kept}); free some "
            f"space, then: splitft run --resume {run_dir}"
        ) from None
    print(f"outputs in {run_dir}/ (adapter: {run_dir / 'adapter'})")
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    """The deployment's server: coordinator, split server and aggregator."""
    cfg = (
        _resume_config(args)
        if args.resume
        else load_config(args.config, args.overrides)
    )
    from splitft.federation.deployment import serve_run

    run_dir = cfg.run_dir
    try:
        serve_run(
            cfg,
            args.address,
            Path(args.certs) if args.certs else None,
            Path(args.tokens) if args.tokens else None,
            insecure=args.insecure,
            allow_insecure_remote=args.allow_insecure_remote,
            resume=bool(args.resume),
        )
    except Interrupted as e:
        print(f"\n{_interrupted(run_dir, str(e), 'server')}", file=sys.stderr)
        return e.exit_code
    print(f"outputs in {run_dir}/ (adapter: {run_dir / 'adapter'})")
    return 0


def cmd_client(args: argparse.Namespace) -> int:
    """One deployed client, next to its data."""
    cfg = load_config(args.config, args.overrides)
    from splitft.federation.remote import client_main

    try:
        client_main(
            cfg,
            args.server,
            args.client_id,
            Path(args.token_file),
            Path(args.ca) if args.ca else None,
            server_name=args.server_name,
            insecure=args.insecure,
            data=Path(args.data) if args.data else None,
            memory_mb=args.memory_mb,
            wait_for_server_s=args.wait_for_server,
        )
    except Interrupted as e:
        print(
            f"\nsplitft: client {args.client_id} interrupted ({e}); the server "
            "leaves it out of this round; start it again to rejoin the run",
            file=sys.stderr,
        )
        return e.exit_code
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    """A server's health check (grpc.health.v1): exit 0 if SERVING."""
    from splitft.transport.health import channel, health_status, read_file

    if not args.insecure and not args.ca:
        raise ConfigError(
            "--ca FILE is required (the CA from `splitft certs`), or --insecure"
        )
    ca = None if args.insecure else read_file(Path(args.ca))
    with channel(args.server, ca, args.server_name) as link:
        status = health_status(link, args.server, args.timeout)
    print(f"{args.server}: {status}")
    return 0 if status == "SERVING" else 1


def cmd_certs(args: argparse.Namespace) -> int:
    """A CA, a server certificate and one token per client."""
    from splitft.transport.security import make_certs

    paths = make_certs(
        Path(args.out_dir), args.server_name, args.clients, overwrite=args.force
    )
    out = Path(args.out_dir)
    print(f"certificates and tokens in {out}/:")
    print(f"  server: --certs {out} (server.pem, server.key, tokens.json: hashes only)")
    print(
        f"  client i: --ca {out / 'ca.pem'} --token-file {out}/clients/client-<i>.token"
    )
    del paths
    return 0


def _interrupted(run_dir: Path, signal_name: str, command: str = "run") -> str:
    from splitft import runs

    last = runs.checkpoints(run_dir)
    where = (
        f"last checkpoint {last[-1]}" if last else "no round finished, no checkpoint"
    )
    return (
        f"splitft: interrupted ({signal_name}); {where}; resume with: "
        f"splitft {command} --resume {run_dir}"
        + (" --address HOST:PORT --certs DIR" if command == "server" else "")
    )


def cmd_status(args: argparse.Namespace) -> int:
    """Each run folder's state: running, interrupted, failed or complete."""
    from splitft import runs

    for folder in map(Path, args.runs):
        status = runs.read_status(folder)
        if not status:
            print(f"{folder}: not a run folder (no status.json)")
            continue
        state = status["state"]
        holder = runs.RunLock(folder).holder()
        if state == "running" and not (holder and runs.alive(holder)):
            state = "stopped (killed; resumable)"
        last = runs.checkpoints(folder)
        ck = f", last checkpoint {last[-1].name}" if last else ""
        print(f"{folder}: {state}, round {status.get('round', 0)}{ck}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    """A run folder's plots (loss curves, cuts, where round time went)."""
    from splitft.plots import plot_run

    for path in plot_run(Path(args.run)):
        print(path)
    return 0


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config (optional)")
    p.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. federation.rounds=5"
    )


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="splitft", description="Federated split fine-tuning of LLMs with LoRA."
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="debug messages")
    ap.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a simulated federation")
    _config_args(run)
    run.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue an interrupted run from its last checkpoint",
    )
    run.set_defaults(func=cmd_run)
    server = sub.add_parser(
        "server", help="serve a deployed federation (clients connect over gRPC)"
    )
    _config_args(server)
    server.add_argument(
        "--address", default="0.0.0.0:50051", help="HOST:PORT to listen on"
    )
    server.add_argument(
        "--certs",
        metavar="DIR",
        help="server.pem, server.key, tokens.json (splitft certs)",
    )
    server.add_argument(
        "--tokens", metavar="FILE", help="token hashes (default: DIR/tokens.json)"
    )
    server.add_argument(
        "--insecure", action="store_true", help="plaintext (loopback addresses only)"
    )
    server.add_argument(
        "--allow-insecure-remote",
        action="store_true",
        help="allow --insecure on a non-loopback address",
    )
    server.add_argument(
        "--resume", metavar="RUN_DIR", help="continue from the run's last checkpoint"
    )
    server.set_defaults(func=cmd_server)
    client = sub.add_parser("client", help="run one deployed client on its data")
    _config_args(client)
    client.add_argument("--server", required=True, help="the server's HOST:PORT")
    client.add_argument("--client-id", type=int, required=True)
    client.add_argument("--token-file", required=True, metavar="FILE")
    client.add_argument("--ca", metavar="FILE", help="the CA that signed the server")
    client.add_argument(
        "--server-name", help="the name in the server's certificate (default: host)"
    )
    client.add_argument("--insecure", action="store_true", help="plaintext")
    client.add_argument(
        "--data",
        metavar="FILE",
        help="this client's data file (default: its partition of the config's data)",
    )
    client.add_argument(
        "--memory-mb",
        type=float,
        default=0.0,
        help="memory its part of the model may use, for the server's cut planner "
        "(default: the config's device profile for this client)",
    )
    client.add_argument(
        "--wait-for-server",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="how long to wait for the server's health check to say SERVING, at "
        "start and whenever it is away (it may be restarting)",
    )
    client.set_defaults(func=cmd_client)
    health = sub.add_parser(
        "health",
        help="ask a server's health check (exit 0 if SERVING): for probes",
    )
    health.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT")
    health.add_argument("--ca", metavar="FILE", help="the CA that signed the server")
    health.add_argument(
        "--server-name", help="the name in the server's certificate (default: host)"
    )
    health.add_argument("--insecure", action="store_true", help="plaintext")
    health.add_argument(
        "--timeout", type=float, default=5.0, metavar="SECONDS", help="of the check"
    )
    health.set_defaults(func=cmd_health)
    certs = sub.add_parser("certs", help="make a CA, server certificate, client tokens")
    certs.add_argument("out_dir", metavar="OUT_DIR")
    certs.add_argument("--server-name", required=True, help="DNS name or IP")
    certs.add_argument("--clients", type=int, required=True)
    certs.add_argument("--force", action="store_true", help="overwrite")
    certs.set_defaults(func=cmd_certs)
    status = sub.add_parser("status", help="state of run folders (resumable?)")
    status.add_argument("runs", nargs="+", metavar="RUN_DIR")
    status.set_defaults(func=cmd_status)
    plot = sub.add_parser(
        "plot",
        help="write a run's plots under RUN_DIR/plots (loss, cuts, round time)",
    )
    plot.add_argument("run", metavar="RUN_DIR")
    plot.set_defaults(func=cmd_plot)
    prep = sub.add_parser("prepare", help="convert the default model, fetch data")
    _config_args(prep)
    prep.add_argument(
        "--bigbench-archive",
        metavar="FILE",
        help="data.source=bigbench: take the tasks from this bigbench-1.0.0.tar.gz "
        "instead of downloading it (docs/data.md)",
    )
    prep.set_defaults(func=cmd_prepare)
    part = sub.add_parser("partition", help="per-client data table and length plot")
    _config_args(part)
    part.set_defaults(func=cmd_partition)
    st = sub.add_parser("settings", help="list every setting, its default and help")
    st.set_defaults(func=cmd_settings)
    return ap


def _logging(args: argparse.Namespace) -> None:
    """splitft's messages through rich (INFO; --verbose DEBUG, --quiet WARNING)."""
    from rich.logging import RichHandler

    level = (
        logging.DEBUG
        if args.verbose
        else logging.WARNING
        if args.quiet
        else logging.INFO
    )
    handler = RichHandler(show_path=args.verbose, show_time=args.verbose)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("splitft")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    logging.getLogger("transformers").setLevel(logging.ERROR)


def _split_config_arg(args: argparse.Namespace) -> None:
    """``splitft run a=b`` has no YAML: the first positional is an override."""
    cfg = getattr(args, "config", None)
    if cfg is not None and "=" in cfg and not cfg.endswith((".yaml", ".yml")):
        args.overrides = [cfg, *args.overrides]
        args.config = None


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub at run time
    args = parser().parse_args(argv)
    _logging(args)
    _split_config_arg(args)
    from splitft.runs import RunError

    try:
        with interruptible():  # SIGINT/SIGTERM: Interrupted, wherever we are
            return args.func(args)
    except Interrupted as e:  # a command that does not say more
        print(f"\nsplitft: interrupted ({e})", file=sys.stderr)
        return e.exit_code
    except (ConfigError, RunError, FileNotFoundError, ValueError) as e:
        if os.environ.get("SPLITFT_DEBUG"):
            raise
        print(f"splitft: error: {e}", file=sys.stderr)
        if not isinstance(e, ConfigError):
            print("(SPLITFT_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
