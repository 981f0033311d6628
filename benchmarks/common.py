"""What the benchmarks share: the base settings, running one method, reading it."""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from copy import deepcopy
from pathlib import Path
from typing import Any

import numpy as np
from transformers import AutoTokenizer

from splitft import runs
from splitft.config import (
    BASE_DTYPES,
    CHECKPOINTING,
    DEFAULT_TASKS,
    LoraSettings,
    RunConfig,
    cache_dir,
    from_dict,
)
from splitft.data import build_datasets
from splitft.data.federated import TOKENS
from splitft.federation.simulation import Simulation
from splitft.models.default import default_model_dir
from splitft.models.parts import WeightStore, load_model_config
from splitft.sim.costs import CostModel
from splitft.sim.predict import row_size
from splitft.sim.probe import probe
from splitft.sim.profiles import MB


def merge(base: dict, extra: dict) -> dict:
    """Nested dict update (``extra`` wins), a new dict."""
    out = deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = deepcopy(value)
    return out


def config(tree: dict) -> RunConfig:
    return from_dict(RunConfig, tree)


def train_rows(
    max_length: int, eval_size: int, train_per_task: int, seed: int = 0
) -> list[dict]:
    """The default data's training examples, encoded (``input_ids``, ``labels``)."""
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    train, _ = build_datasets(
        DEFAULT_TASKS,
        tokenizer,
        cache_dir(),
        max_length,
        eval_size,
        seed,
        train_per_task,
    )
    return train.select_columns(TOKENS).to_list()


def train_sizes(
    max_length: int, eval_size: int, train_per_task: int, seed: int = 0
) -> list[tuple[int, int]]:
    """(tokens, labelled tokens) of each of the default data's training examples."""
    rows = train_rows(max_length, eval_size, train_per_task, seed)
    return [row_size(row) for row in rows]


def client_setting(text: str) -> str:
    """An argparse type: ``client.base_dtype/client.checkpointing``, e.g.
    ``nf4/blocks``, returned as given once both halves are allowed."""
    base, _, ckpt = text.partition("/")
    if base not in BASE_DTYPES or ckpt not in CHECKPOINTING:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not allowed: BASE/CKPT with BASE in {BASE_DTYPES} and "
            f"CKPT in {CHECKPOINTING}"
        )
    return text


def probe_default(
    batch_size: int,
    max_length: int,
    eval_size: int,
    train_per_task: int,
    seed: int = 0,
    base: str = "float32",
) -> tuple[CostModel, list[tuple[int, int]]]:
    """Probe the default model at the default data's mean length, once for a
    whole benchmark (every method then starts from the same beliefs);
    ``base``: the clients' client.base_dtype."""
    sizes = train_sizes(max_length, eval_size, train_per_task, seed)
    folder = default_model_dir()
    costs = probe(
        WeightStore(folder),
        load_model_config(folder),
        LoraSettings(),
        batch_size,
        int(np.mean([n for n, _ in sizes])),
        batching=True,  # the batch gain too (docs/benchmarks.md reports it)
        client_store=WeightStore.for_base(folder, base),
    )
    return costs, sizes


def time_to_target(rounds: list[dict], target: float) -> float | None:
    """Simulated seconds at which the eval loss first reaches ``target``.

    Linear in (simulated time, eval loss) between the two evaluations around
    the crossing; ``None`` if no evaluation reached it.
    """
    points = [(r["sim_time_s"], r["eval_loss"]) for r in rounds if "eval_loss" in r]
    for (t0, l0), (t1, l1) in zip(points, points[1:], strict=False):
        if l1 <= target:
            return t1 if l0 == l1 else t0 + (t1 - t0) * (l0 - target) / (l0 - l1)
    return None


def run_method(
    tree: dict,
    costs: CostModel,
    budget_rounds: int,
    target: float | None = None,
    accuracy: bool = False,
) -> dict[str, Any]:
    """One run; stops at the target once the round budget is spent.

    Runs ``tree``'s rounds at most, evaluating every round. After round
    ``budget_rounds`` (the same token budget as every method), it goes on
    only until the eval loss reaches ``target``: time to target may need a
    round more than the budget, the final loss is read at the budget.
    """
    cfg = config(tree)
    sim = Simulation(cfg, costs)
    extra: dict[str, Any] = {}

    def stop(record: dict) -> bool:
        if record["round"] == budget_rounds:
            extra["final"] = dict(record)
            if accuracy:
                acc = sim.evaluate_global(accuracy=True)
                extra["final"].update(acc)
        if record["round"] < budget_rounds:
            return False
        return target is None or record.get("eval_loss", float("inf")) <= target

    t0 = time.perf_counter()
    summary = sim.run(stop=stop, table=False)
    wall = time.perf_counter() - t0
    return summarise(summary, extra.get("final", summary["rounds"][-1]), wall, target)


def summarise(
    summary: dict, final: dict, wall: float, target: float | None
) -> dict[str, Any]:
    """The numbers a method is compared on."""
    rounds = [r for r in summary["rounds"] if r["round"] > 0]
    budget = [r for r in rounds if r["round"] <= final["round"]]
    n = len(budget)
    activations = sum(
        r.get("up_smashed", 0) + r.get("down_gradients", 0) for r in budget
    )
    adapters = sum(r.get("up_adapters", 0) + r.get("down_adapters", 0) for r in budget)
    peak = max(max(r["memory_mb"].values()) for r in budget)
    return {
        "run_dir": str(Path(summary["adapter"]).parent),
        "rounds_run": len(rounds),
        "final_round": final["round"],
        "final_eval_loss": final.get("eval_loss"),
        "final_token_acc": final.get("eval_token_acc"),
        "exact_match": final.get("exact_match"),
        "mc_accuracy": final.get("mc_accuracy"),
        "sim_time_at_budget_s": final["sim_time_s"],
        "mean_round_s": final["sim_time_s"] / n,
        "time_to_target_s": None if target is None else time_to_target(rounds, target),
        "activation_mb_per_round": activations / n / MB,
        "adapter_mb_per_round": adapters / n / MB,
        "peak_client_memory_mb": peak,
        "over_budget": sorted({c for r in budget for c in r["over_budget"]}),
        "planner_ms_per_round": 1e3 * sum(r["planner_s"] for r in budget) / n,
        "prediction_error": sum(r["prediction_error"] for r in budget) / n,
        "wall_s": wall,
        "curve": [
            {
                "round": r["round"],
                "sim_time_s": r["sim_time_s"],
                "eval_loss": r.get("eval_loss"),
            }
            for r in summary["rounds"]
        ],
        "cuts": [r.get("cuts", {}) for r in rounds],
    }


def provenance() -> dict[str, str]:
    """What made a result: the command, the commit (``+dirty`` if the tree
    had changes) and when, so results can be compared across commits."""
    here = Path(__file__).parent

    def git(*args: str) -> str:
        try:
            out = subprocess.run(
                ["git", *args], cwd=here, capture_output=True, text=True, check=True
            )
        except (OSError, subprocess.CalledProcessError):
            return ""
        return out.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    return {
        "command": "python " + shlex.join(sys.argv),
        "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def write_json(path: Path, data: Any) -> None:
    """Atomically (splitft.runs.write_json): a crash leaves the old file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    runs.write_json(path, data)
