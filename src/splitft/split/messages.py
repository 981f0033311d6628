"""Wire messages of the split workflow, and their one serialisation.

Every message is a dataclass; tensors travel as safetensors (explicit dtype
and shape in its header), scalar fields as JSON in the safetensors metadata.
The in-process transport and the network transport both send exactly
``encode(msg)``, so byte counts are the same in simulation and deployment.
Only adapters and activations travel, never base weights.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import torch
from safetensors.torch import load, save

# Byte-accounting kinds (metrics.jsonl reports bytes up/down per kind).
SMASHED, GRADIENTS, ADAPTERS, CONTROL = "smashed", "gradients", "adapters", "control"


@dataclass
class Join:
    """Client -> server, first: who it is and what it holds (deployment)."""

    client_id: int
    num_samples: int  # examples held: the most its uploads may weigh
    memory_bytes: int = 0  # its memory budget for the planner (0: not declared)
    kind = CONTROL


@dataclass
class RoundRequest:
    """Client -> server: "I am ready for round ``round``" (-1: whichever is open)."""

    client_id: int
    round: int
    kind = CONTROL


@dataclass
class Wait:
    """Server -> client: no plan for you now; ask again after a while."""

    client_id: int
    round: int  # the round open now, or the next one
    retry_after_seconds: float = 1.0
    kind = CONTROL


@dataclass
class Stop:
    """Server -> client: the run is over, or has no more rounds for this client."""

    client_id: int
    reason: str = ""
    kind = CONTROL


@dataclass
class RoundPlan:
    """Server -> client: cut layer, learning rates and the client's adapters."""

    client_id: int
    round: int
    cut_layer: int
    lrs: list[float]  # one per local optimizer step
    adapter: dict[str, torch.Tensor] = field(default_factory=dict)
    kind = ADAPTERS


@dataclass
class SmashedData:
    """Client -> server: cut-layer activations of one micro-batch."""

    client_id: int
    step: int  # local optimizer step within the round
    micro: int  # micro-batch index within the step
    num_micro: int  # micro-batches per step: the server steps after the last
    hidden: torch.Tensor  # (B, T, H) float
    attention_mask: torch.Tensor | None  # (B, T) int64; None for packed rows
    position_ids: torch.Tensor  # (B, T) int64
    labels: torch.Tensor  # (B, T) int64, -100 where no loss
    step_tokens: int = 0  # labelled tokens in the whole step (0 = weigh equally)
    kind = SMASHED


@dataclass
class Gradient:
    """Server -> client: d loss / d smashed data, plus what the server saw."""

    client_id: int
    step: int
    micro: int
    loss: float  # mean token loss of this micro-batch
    tokens: int  # tokens that carried loss
    server_seconds: float
    grad: torch.Tensor  # (B, T, H), same dtype as the smashed data
    correct: int = 0  # labelled tokens the server's logits predicted right
    kind = GRADIENTS


@dataclass
class AdapterUpdate:
    """Client -> server: the client-side adapters after local training, and
    its step metrics (``report``: one row per step, :data:`REPORT_FIELDS`)."""

    client_id: int
    round: int
    num_samples: int  # aggregation weight
    adapter: dict[str, torch.Tensor] = field(default_factory=dict)
    report: torch.Tensor | None = None  # (steps, len(REPORT_FIELDS)) float64
    kind = ADAPTERS


# A step's metrics as a report row: fixed size, so a message's size never
# depends on how long a step took.
REPORT_FIELDS = (
    "step",
    "loss",
    "tokens",
    "token_acc",
    "slots",
    "lr",
    "client_seconds",
    "server_seconds",
)
_INTEGRAL = {"step", "tokens", "slots"}


def step_report(steps: list[dict]) -> torch.Tensor:
    """Step metrics (as the client logs them) -> a report tensor."""
    rows = [[float(s[f]) for f in REPORT_FIELDS] for s in steps]
    return torch.tensor(rows, dtype=torch.float64).reshape(
        len(steps), len(REPORT_FIELDS)
    )


def report_steps(report: torch.Tensor | None) -> list[dict]:
    """A report tensor -> one metrics dict per step."""
    if report is None:
        return []
    return [
        {
            f: int(v) if f in _INTEGRAL else float(v)
            for f, v in zip(REPORT_FIELDS, row, strict=True)
        }
        for row in report.tolist()
    ]


@dataclass
class Ack:
    """Server -> client: received (or ``error`` says why not)."""

    client_id: int
    error: str = ""
    code: str = ""  # a refusal's gRPC status name (splitft.split.errors)
    kind = CONTROL


MESSAGES = {
    c.__name__: c
    for c in (
        Join,
        RoundRequest,
        RoundPlan,
        Wait,
        Stop,
        SmashedData,
        Gradient,
        AdapterUpdate,
        Ack,
    )
}


def _wire(t: torch.Tensor, seen: set[int]) -> torch.Tensor:
    t = t.detach().contiguous().cpu()
    if t.data_ptr() in seen:  # safetensors refuses tensors that share memory
        t = t.clone()
    seen.add(t.data_ptr())
    return t


def _timed(name: str) -> bool:
    """Measured durations travel as float64 tensors, not JSON text, so that a
    message's size never depends on how long something took."""
    return name.endswith("_seconds")


def encode(msg) -> bytes:
    """Serialise a message: tensors into safetensors, the rest into its metadata."""
    tensors, scalars, seen = {}, {}, set()
    for f in dataclasses.fields(msg):
        value = getattr(msg, f.name)
        if _timed(f.name):
            tensors[f.name] = torch.tensor(float(value), dtype=torch.float64)
        elif isinstance(value, torch.Tensor):
            tensors[f.name] = _wire(value, seen)
        elif isinstance(value, dict):
            for k, v in value.items():
                tensors[f"{f.name}/{k}"] = _wire(v, seen)
            scalars[f.name] = {}
        else:
            scalars[f.name] = value
    meta = {"type": type(msg).__name__, "fields": json.dumps(scalars)}
    return save(tensors, metadata=meta)


def decode(data: bytes, device: torch.device | str = "cpu"):
    """Inverse of :func:`encode`."""
    meta = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]
    cls = MESSAGES[meta["type"]]
    kwargs = json.loads(meta["fields"])
    for name, t in load(data).items():
        t = t.to(device)
        if "/" in name:
            field_name, key = name.split("/", 1)
            kwargs[field_name][key] = t
        elif _timed(name):
            kwargs[name] = float(t)
        else:
            kwargs[name] = t
    return cls(**kwargs)
