"""``splitft`` command line: run a federation, prepare assets, list settings."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import typing

from splitft.config import ConfigError, RunConfig, cache_dir, load_config


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
    print(f"data:  {fetch_bigbench(cfg.data.tasks, cache_dir())}")
    return 0


def cmd_partition(args: argparse.Namespace) -> int:
    """Show how the config spreads the training data over the clients."""
    cfg = load_config(args.config, args.overrides)
    from transformers import AutoTokenizer

    from splitft.data.federated import load_run_data
    from splitft.data.partition_report import (
        partition_stats,
        plot_length_distributions,
        print_partition_table,
    )
    from splitft.models.default import resolve_model_dir

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(cfg.model.path))
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


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)  # fail fast, before heavy imports
    from splitft.federation.simulation import Simulation

    Simulation(cfg).run()
    print(f"outputs in {cfg.run_dir}/ (adapter: {cfg.run_dir / 'adapter'})")
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
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a simulated federation")
    _config_args(run)
    run.set_defaults(func=cmd_run)
    prep = sub.add_parser("prepare", help="convert the default model, fetch data")
    _config_args(prep)
    prep.set_defaults(func=cmd_prepare)
    part = sub.add_parser("partition", help="per-client data table and length plot")
    _config_args(part)
    part.set_defaults(func=cmd_partition)
    st = sub.add_parser("settings", help="list every setting, its default and help")
    st.set_defaults(func=cmd_settings)
    return ap


def _split_config_arg(args: argparse.Namespace) -> None:
    """``splitft run a=b`` has no YAML: the first positional is an override."""
    cfg = getattr(args, "config", None)
    if cfg is not None and "=" in cfg and not cfg.endswith((".yaml", ".yml")):
        args.overrides = [cfg, *args.overrides]
        args.config = None


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub at run time
    logging.getLogger("transformers").setLevel(logging.ERROR)
    args = parser().parse_args(argv)
    _split_config_arg(args)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        if os.environ.get("SPLITFT_DEBUG"):
            raise
        print(f"splitft: error: {e}", file=sys.stderr)
        if not isinstance(e, ConfigError):
            print("(SPLITFT_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
