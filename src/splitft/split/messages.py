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
import math
from dataclasses import dataclass, field

import torch
from safetensors.torch import load, save

from splitft.split.errors import Malformed

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
    """Server -> client: the run is over, or has no more rounds for this
    client; ``resumes``: the server stopped for now (interrupted) and goes on
    from its last checkpoint when restarted, so a client may wait for it."""

    client_id: int
    reason: str = ""
    resumes: bool = False
    kind = CONTROL


@dataclass
class RoundPlan:
    """Server -> client: cut layer, learning rates and the client's adapters."""

    client_id: int
    round: int
    cut_layer: int
    lrs: list[float]  # one per local optimizer step
    adapter: dict[str, torch.Tensor] = field(default_factory=dict)
    # batches the client drew in earlier rounds: where its data order resumes
    batches_drawn: int = 0
    # federation.tail_layers of a U-shaped split (0: vanilla); the client checks
    # it against its own configuration
    tail_layers: int = 0
    kind = ADAPTERS


@dataclass
class SmashedData:
    """Client -> server: cut-layer activations of one micro-batch."""

    client_id: int
    step: int  # local optimizer step within the round
    micro: int  # micro-batch index within the step
    num_micro: int  # micro-batches per step: the server steps after the last
    hidden: torch.Tensor  # (B, T, H) float, or int8 with hidden_scale
    attention_mask: torch.Tensor | None  # (B, T) int64; None for packed rows
    position_ids: torch.Tensor  # (B, T) int64
    # (B, T) int64, -100 where no loss; None in a U-shaped split (the client
    # computes the loss)
    labels: torch.Tensor | None
    step_tokens: int = 0  # labelled tokens in the whole step (0 = weigh equally)
    hidden_scale: torch.Tensor | None = None  # (B, T, 1) fp32 for int8 hidden
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
    grad: torch.Tensor  # (B, T, H) float, or int8 with grad_scale
    correct: int = 0  # labelled tokens the server's logits predicted right
    grad_scale: torch.Tensor | None = None  # (B, T, 1) fp32 for an int8 grad
    kind = GRADIENTS


@dataclass
class TailInput:
    """Server -> client, U-shaped split: the hidden state after the server's
    last block (L - tail_layers), the input of the client's tail."""

    client_id: int
    step: int
    micro: int
    server_seconds: float
    hidden: torch.Tensor  # (B, T, H) float, or int8 with hidden_scale
    hidden_scale: torch.Tensor | None = None
    kind = SMASHED


@dataclass
class TailGradient:
    """Client -> server, U-shaped split: d loss / d :class:`TailInput`; the
    server answers with the :class:`Gradient` at the first cut."""

    client_id: int
    step: int
    micro: int
    grad: torch.Tensor  # (B, T, H) float, or int8 with grad_scale
    grad_scale: torch.Tensor | None = None
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
        TailInput,
        TailGradient,
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


MAX_HEADER = 1 << 20  # bytes of safetensors header: far above any real message's
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
# tensor fields: allowed dtypes and number of dimensions
TENSORS = {
    "hidden": ((*FLOATS, torch.int8), 3),
    "grad": ((*FLOATS, torch.int8), 3),
    "hidden_scale": ((torch.float32,), 3),
    "grad_scale": ((torch.float32,), 3),
    "attention_mask": ((torch.int64,), 2),
    "position_ids": ((torch.int64,), 2),
    "labels": ((torch.int64,), 2),
    "report": ((torch.float64,), 2),
}


def decode(data: bytes, device: torch.device | str = "cpu"):
    """Inverse of :func:`encode`, and a validating parser: for any bytes it
    returns a well-typed message or raises :class:`Malformed` (one line).

    Checked: the framing, the message type, every field present (or
    defaulted) and none unknown, ints that are ints (not bools), finite
    floats, strings, the dtypes and dimensions of tensors (activations and
    adapters floating point, token-level tensors int64). What needs the model
    or the config (hidden size, lengths, order) the server checks.
    """
    try:
        return _decode(data, device)
    except Malformed:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors, json, torch on bad bytes
        why = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        raise Malformed(f"not a SplitFT message ({why})") from None


def _decode(data: bytes, device):
    if len(data) < 8:
        raise Malformed("not a SplitFT message: shorter than its header length")
    n = int.from_bytes(data[:8], "little")
    if n > MAX_HEADER or 8 + n > len(data):
        raise Malformed(f"not a SplitFT message: header length {n} of {len(data)}")
    header = json.loads(data[8 : 8 + n])
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or "type" not in meta or "fields" not in meta:
        raise Malformed("not a SplitFT message: no type and fields in its metadata")
    cls = MESSAGES.get(meta["type"])
    if cls is None:
        raise Malformed(f"unknown message type {str(meta['type'])[:40]!r}")
    kwargs = json.loads(meta["fields"])
    if not isinstance(kwargs, dict):
        raise Malformed(f"{cls.__name__}: fields must be a JSON object")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, t in load(data).items():
        base, _, key = name.partition("/")
        if base not in fields:
            raise Malformed(f"{cls.__name__}: unexpected field {base!r}")
        if key:
            if not isinstance(kwargs.get(base), dict):
                raise Malformed(f"{cls.__name__}.{base}: not a tensor dict")
            kwargs[base][key] = t
        elif _timed(name):
            if t.ndim != 0:
                raise Malformed(f"{cls.__name__}.{name}: expected a number")
            kwargs[name] = float(t)
        else:
            kwargs[name] = t
    for name in kwargs:
        if name not in fields:
            raise Malformed(f"{cls.__name__}: unexpected field {name!r}")
    for name, f in fields.items():
        if name not in kwargs:
            if (
                f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING
            ):
                raise Malformed(f"{cls.__name__}: missing field {name!r}")
            continue
        kwargs[name] = _checked(f"{cls.__name__}.{name}", f.type, kwargs[name], device)
    msg = cls(**kwargs)
    for values, scale in (("hidden", "hidden_scale"), ("grad", "grad_scale")):
        if hasattr(msg, scale):
            _check_scaled(
                cls.__name__, values, getattr(msg, values), scale, getattr(msg, scale)
            )
    return msg


def _check_scaled(where, name, values, scale_name, scale) -> None:
    """An int8 tensor comes with one finite, non-negative scale per token;
    a float one with none."""
    if values.dtype != torch.int8:
        if scale is not None:
            raise Malformed(f"{where}.{scale_name}: only with an int8 {name}")
        return
    want = (*values.shape[:-1], 1)
    if scale is None or tuple(scale.shape) != want:
        got = None if scale is None else tuple(scale.shape)
        raise Malformed(f"{where}.{scale_name}: an int8 {name} needs {want}, got {got}")
    if not (torch.isfinite(scale).all() and (scale >= 0).all()):
        raise Malformed(f"{where}.{scale_name}: scales must be finite and >= 0")


def _checked(where: str, kind: str, value, device):
    """One field's value, checked against its annotation."""
    if kind == "int":
        if type(value) is not int:
            raise Malformed(f"{where}: expected an integer, got {type(value).__name__}")
        return value
    if kind == "bool":
        if type(value) is not bool:
            raise Malformed(f"{where}: expected true or false")
        return value
    if kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or not math.isfinite(value):
            raise Malformed(f"{where}: expected a finite number")
        return float(value)
    if kind == "str":
        if not isinstance(value, str):
            raise Malformed(f"{where}: expected a string")
        return value
    if kind == "list[float]":
        ok = isinstance(value, list) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in value
        )
        if not ok:
            raise Malformed(f"{where}: expected a list of finite numbers")
        return [float(v) for v in value]
    if kind == "dict[str, torch.Tensor]":
        if not isinstance(value, dict) or not all(
            isinstance(t, torch.Tensor) for t in value.values()
        ):
            raise Malformed(f"{where}: expected tensors by name")
        for key, t in value.items():
            if t.dtype not in FLOATS:
                raise Malformed(f"{where}[{key[:80]!r}]: dtype {t.dtype} not allowed")
        return {k: t.to(device) for k, t in value.items()}
    if kind in ("torch.Tensor", "torch.Tensor | None"):
        if value is None and kind.endswith("None"):
            return None
        if not isinstance(value, torch.Tensor):
            raise Malformed(f"{where}: expected a tensor")
        dtypes, ndim = TENSORS[where.split(".")[-1]]
        if value.dtype not in dtypes:
            allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
            raise Malformed(f"{where}: dtype {value.dtype} not allowed ({allowed})")
        if value.ndim != ndim:
            raise Malformed(f"{where}: expected {ndim} dimensions, got {value.ndim}")
        return value.to(device)
    raise Malformed(f"{where}: no check for {kind}")  # a new field type: add it
