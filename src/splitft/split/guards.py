"""The server's checks of what a request carries, before it touches the model.

Pure functions: each looks at one request and what the server expects, and
raises one of the refusals of :mod:`splitft.split.errors` (the class names
the gRPC code) with a message that says what was wrong and what is allowed.
The server's state machine (:mod:`splitft.split.server`) calls them; nothing
here changes any state.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from splitft.ranks import slice_rank
from splitft.split.errors import Malformed, OutOfOrder, TooLarge
from splitft.split.messages import REPORT_FIELDS, AdapterUpdate, Join, SmashedData


@dataclass(frozen=True)
class Limits:
    """What a request may carry on this server."""

    num_layers: int
    hidden_size: int
    vocab_size: int
    batch_size: int  # train.batch_size: rows a micro-batch may hold
    max_length: int  # tokens a row may hold (data.max_length, within the context)
    context: int  # the model's positions
    grad_accum: int  # micro-batches a step has
    tail_layers: int  # a U-shaped split's client tail (0: vanilla)

    @classmethod
    def of(cls, model_config, train, max_length: int | None, tail_layers: int):
        """The model's and the config's bounds (``max_length`` None: the
        model's context)."""
        context = getattr(model_config, "max_position_embeddings", None) or 2**31 - 1
        return cls(
            num_layers=model_config.num_hidden_layers,
            hidden_size=model_config.hidden_size,
            vocab_size=model_config.vocab_size,
            batch_size=train.batch_size,
            max_length=min(max_length or context, context),
            context=context,
            grad_accum=train.grad_accum,
            tail_layers=tail_layers,
        )


def within(t: torch.Tensor, low: int, high: int) -> bool:
    return bool(((t >= low) & (t < high)).all())


def check_smashed(
    msg: SmashedData,
    limits: Limits,
    cut: int,
    steps: int,
    expected: tuple[int, int],
    pending: tuple[int, int] | None,
) -> None:
    """A micro-batch's shapes, its bounds (the config's batch size and
    ``data.max_length``), the ranges of its token-level tensors, and its place
    in the client's round: ``steps`` in the round, the (step, micro) expected
    next, and the (step, micro) whose TailGradient is awaited (U-shaped)."""
    cid = msg.client_id
    if cut >= limits.num_layers:
        raise OutOfOrder(f"client {cid} trains locally: no smashed data")
    H = limits.hidden_size
    if msg.hidden.ndim != 3 or msg.hidden.shape[-1] != H:
        raise Malformed(f"hidden must be (B, T, {H}), got {tuple(msg.hidden.shape)}")
    B, T = shape = tuple(msg.hidden.shape[:2])
    if B < 1 or T < 1:
        raise Malformed(f"hidden is empty: {tuple(msg.hidden.shape)}")
    if B > limits.batch_size:
        raise TooLarge(f"{B} rows: train.batch_size is {limits.batch_size}")
    if T > limits.max_length:
        raise TooLarge(f"{T} tokens a row: at most {limits.max_length} here")
    for name in ("attention_mask", "position_ids", "labels"):
        t = getattr(msg, name)
        if t is not None and tuple(t.shape) != shape:
            raise Malformed(f"{name} must be {shape} like hidden, got {tuple(t.shape)}")
    if msg.position_ids is None:
        raise Malformed("position_ids are missing")
    if not within(msg.position_ids, 0, limits.context):
        raise Malformed(f"position_ids must be in [0, {limits.context})")
    mask = msg.attention_mask
    if mask is not None and not ((mask == 0) | (mask == 1)).all():
        raise Malformed("attention_mask must be 0 or 1")
    _check_labels(msg.labels, limits)
    if not 0 <= msg.step < steps:
        raise Malformed(f"step {msg.step} not in [0, {steps})")
    if msg.num_micro != limits.grad_accum:
        raise Malformed(
            f"num_micro={msg.num_micro}: train.grad_accum is {limits.grad_accum} here"
        )
    if not 0 <= msg.micro < msg.num_micro:
        raise Malformed(f"micro {msg.micro} not in [0, num_micro={msg.num_micro})")
    if not 0 <= msg.step_tokens <= B * T * msg.num_micro:
        raise Malformed(f"step_tokens {msg.step_tokens} not in [0, B*T*num_micro]")
    if pending is not None:
        step, micro = pending
        raise OutOfOrder(
            f"expected the TailGradient of step {step} micro {micro}, got "
            f"SmashedData of step {msg.step} micro {msg.micro}"
        )
    if (msg.step, msg.micro) != expected:
        step, micro = expected
        if step >= steps:
            raise OutOfOrder(f"client {cid} has run all its steps: upload next")
        raise OutOfOrder(
            f"expected step {step} micro {micro}, got step {msg.step} micro {msg.micro}"
        )
    if not torch.isfinite(msg.hidden).all():
        raise Malformed("hidden has non-finite values")


def _check_labels(labels: torch.Tensor | None, limits: Limits) -> None:
    """Labels travel to a vanilla server (it computes the loss), never to a
    U-shaped one."""
    V = limits.vocab_size
    if limits.tail_layers:
        if labels is not None:
            raise Malformed(
                "labels must stay on the client in a U-shaped split "
                "(federation.topology='u_shaped'); send labels=None"
            )
        return
    if labels is None:
        raise Malformed(
            "labels are missing: this server computes the loss "
            "(federation.topology='vanilla')"
        )
    if not ((labels == -100) | ((labels >= 0) & (labels < V))).all():
        raise Malformed(f"labels must be -100 or token ids in [0, {V})")


def check_join(msg: Join, known: int | None, max_samples: int) -> None:
    """A Join's declared examples (a whole number in ``[1, max_samples]``,
    fixed for the run: what the client's uploads may weigh in aggregation)
    and memory."""
    n = msg.num_samples
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise Malformed(f"num_samples must be a whole number > 0, got {n!r}")
    if n > max_samples:
        raise TooLarge(
            f"client {msg.client_id}: num_samples={n} is over "
            f"federation.max_samples_per_client={max_samples} on this server"
        )
    if msg.memory_bytes < 0:
        raise Malformed(f"memory_bytes must be >= 0, got {msg.memory_bytes}")
    if known is not None and known != msg.num_samples:
        raise OutOfOrder(
            f"client {msg.client_id} joined with num_samples={known}; it "
            f"cannot change to {msg.num_samples} within a run"
        )


def check_upload(
    msg: AdapterUpdate,
    ranks: Mapping[str, int],
    global_state: Mapping[str, torch.Tensor],
    held: str,
    declared: int | None,
) -> None:
    """An upload's keys (exactly the client's layers, ``held`` names them),
    shapes (its ranks) and dtype (the global adapter's), and its weight: at
    most what the client ``declared`` when it joined (None: it did not, and
    an upload of a client that never joined is refused)."""
    cid = msg.client_id
    missing, extra = set(ranks) - set(msg.adapter), set(msg.adapter) - set(ranks)
    if missing or extra:
        raise Malformed(
            f"client {cid}: adapter keys differ from its layers {held}: "
            f"missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}"
        )
    for key, t in msg.adapter.items():
        reference = global_state[key]
        want = tuple(slice_rank(key, reference, ranks[key]).shape)
        if tuple(t.shape) != want:
            raise Malformed(
                f"client {cid}: {key} has shape {tuple(t.shape)}, not {want}"
            )
        if t.dtype != reference.dtype:
            raise Malformed(
                f"client {cid}: {key} is {t.dtype}, the global adapter "
                f"{reference.dtype}"
            )
    n = msg.num_samples
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise Malformed(f"client {cid}: num_samples must be a whole number > 0")
    if declared is None:
        raise OutOfOrder(
            f"client {cid} has not joined this run: send Join (num_samples) "
            "before uploading"
        )
    if msg.num_samples > declared:
        raise Malformed(
            f"client {cid}: num_samples={msg.num_samples}, more than the "
            f"{declared} it declared"
        )


def check_report(msg: AdapterUpdate, steps: int) -> None:
    """An upload's step report: at most ``steps`` rows of its fields, finite."""
    report, cid = msg.report, msg.client_id
    if report is None:
        return
    cols = len(REPORT_FIELDS)
    if report.ndim != 2 or report.shape[1] != cols or report.shape[0] > steps:
        raise Malformed(
            f"client {cid}: report must be (<= {steps}, {cols}), got "
            f"{tuple(report.shape)}"
        )
    if not torch.isfinite(report).all():
        raise Malformed(f"client {cid}: report has non-finite values")


def check_finite(cid: int, state: Mapping[str, torch.Tensor]) -> None:
    bad = [key for key, t in state.items() if not torch.isfinite(t).all()]
    if bad:
        raise Malformed(f"client {cid}: non-finite values in {bad[:3]}")


def check_norm(
    cid: int,
    adapter: Mapping[str, torch.Tensor],
    ranks: Mapping[str, int],
    global_state: Mapping[str, torch.Tensor],
    bound: float,
) -> None:
    """An upload may not be ``bound`` times the norm of the global adapter on
    the same layers (``federation.upload_norm_bound``; 0: no bound)."""
    if bound <= 0:
        return
    norm = sum(float(t.float().pow(2).sum()) for t in adapter.values()) ** 0.5
    ref = (
        sum(
            float(slice_rank(k, global_state[k], ranks[k]).float().pow(2).sum())
            for k in adapter
        )
        ** 0.5
    )
    if norm > bound * ref:
        raise Malformed(
            f"client {cid}: adapter norm {norm:.3g} is over "
            f"federation.upload_norm_bound={bound} times the "
            f"global adapter's {ref:.3g} on the same layers"
        )
