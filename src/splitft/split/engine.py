"""Many clients' micro-batches in one forward and one backward of the server.

A batch is every request the server takes at once (``server.batching``):
their rows are right-padded to the longest request, sorted by cut, and each
client's rows *join* the batch at its own cut, so a block only ever runs on
the rows of the clients whose cut is at or below it (no block runs on a row
before its client's cut). With one adapter per client each LoRA layer applies
a client's A and B to that client's rows only, as mLoRA does: the frozen
base linear runs once on the whole batch, then each adapter's
``B(A(dropout(x))) * scaling`` on its own contiguous slice of rows (PEFT's
vanilla LoRA forward, slice by slice; PEFT's own mixed-batch forward,
``adapter_names``, gathers and scatters rows by index lists, and
``PeftModel`` refuses it in training). The head and the loss run at the
labelled positions only; every request's loss is the mean over its own
labelled tokens and the backward weighs it by its share of its client's
step, so each request gets the loss, the accuracy and the gradients it would
get alone.

Padding keeps every row independent of the rows it shares a batch with: a
request with an attention mask is padded with mask 0 (and continuing
positions); a packed request (no mask: the model masks by position ids,
``data/packing.py``) is padded with positions restarting at 0, a block of its
own. The two kinds are never mixed in one batch (:func:`batch_key`): a 2-D
mask turns the model's packed-sequence masking off.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from splitft.models.arch import PassThrough
from splitft.models.parts import ModelPart
from splitft.split.messages import SmashedData


@dataclass
class Request:
    """One client's micro-batch, checked and ready.

    Attributes:
        hidden: the smashed data ``(B, T, H)``, a leaf that requires grad (its
            ``.grad`` is what goes back to the client).
        weight: what the request's mean loss weighs in the backward (its share
            of its client's step, :func:`splitft.models.parts.loss_share`).
        adapter: the LoRA adapter its rows use (None: the active one, e.g. a
            shared adapter every row uses).
    """

    hidden: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor
    labels: torch.Tensor
    cut: int
    weight: float
    adapter: str | None = None

    @property
    def slots(self) -> int:
        return self.hidden.shape[0] * self.hidden.shape[1]


@dataclass
class Result:
    """What the batch gave one request: its mean loss (None without labelled
    tokens or when it is not finite), labelled tokens and correct ones."""

    loss: float | None
    tokens: int
    correct: int
    finite: bool = True


def batch_key(attention_mask: torch.Tensor | None) -> bool:
    """Requests that may share a batch have the same key (a mask or none)."""
    return attention_mask is None


def group(msgs: Sequence) -> tuple[list[list[int]], list[int]]:
    """Which of these requests run as batches (indices, each batch one
    client's micro-batch at most, masked and packed apart) and which alone
    (every other message, and a client's second micro-batch)."""
    batches: dict[bool, list[int]] = {}
    taken: set[int] = set()
    rest = []
    for i, msg in enumerate(msgs):
        cid = getattr(msg, "client_id", -1)
        if isinstance(msg, SmashedData) and cid not in taken:
            taken.add(cid)
            batches.setdefault(batch_key(msg.attention_mask), []).append(i)
        else:
            rest.append(i)
    return list(batches.values()), rest


def run(part: ModelPart, requests: Sequence[Request]) -> list[Result]:
    """Forward and backward of ``requests`` as one batch through ``part``.

    The gradients land where a request alone would put them: on each
    ``hidden`` leaf and on its adapter's LoRA weights (added to what they
    hold). A request whose loss is not finite is left out of the backward
    (the batch is run again without it, so no non-finite value reaches a
    weight another request trains) and reported with ``finite=False``.
    """
    keys = {batch_key(r.attention_mask) for r in requests}
    if len(keys) > 1:
        raise ValueError("requests with and without an attention mask in one batch")
    live = list(range(len(requests)))
    while True:
        results, total = _forward(part, [requests[i] for i in live])
        bad = [i for i, res in zip(live, results, strict=True) if not res.finite]
        if not bad:
            break
        live = [i for i in live if i not in bad]
        if not live:
            break
    out = {i: Result(None, 0, 0, finite=False) for i in range(len(requests))}
    out.update(zip(live, results, strict=True) if live else ())
    if live and total is not None:
        total.backward()
    return [out[i] for i in range(len(requests))]


def _forward(
    part: ModelPart, requests: Sequence[Request]
) -> tuple[list[Result], torch.Tensor | None]:
    """The batch's forward: each request's result and the weighted loss to
    back-propagate (None: no labelled token in the batch)."""
    order = sorted(range(len(requests)), key=lambda i: requests[i].cut)
    width = max(r.hidden.shape[1] for r in requests)
    packed = requests[0].attention_mask is None
    padded = [_pad(requests[i], width, packed) for i in order]
    hidden = [p[0] for p in padded]
    mask = None if packed else torch.cat([p[1] for p in padded])
    pos = torch.cat([p[2] for p in padded])
    labels = torch.cat([p[3] for p in padded])
    rows = [requests[i].hidden.shape[0] for i in order]
    owner = torch.repeat_interleave(
        torch.arange(len(order), device=pos.device),
        torch.tensor(rows, device=pos.device),
    )  # (B,) the position in ``order`` of each row's request
    cuts = [requests[i].cut for i in order]
    names = [requests[i].adapter for i in order]
    with _joined(part, cuts, hidden, rows, names):
        inputs = torch.zeros(
            (sum(rows), width, hidden[0].shape[-1]),
            dtype=hidden[0].dtype,
            device=hidden[0].device,
        )
        final = part._blocks_out(mask, pos, inputs_embeds=inputs)  # (B, W, H)
    logits, wanted, chosen = part.head_at_labels(final, labels)  # (N, V), (N,)
    who = owner[:, None].expand(chosen.shape)[chosen]  # (N,) request of each token
    n = len(order)
    tokens = torch.bincount(who, minlength=n)
    ce = F.cross_entropy(logits, wanted, reduction="none")  # (N,)
    sums = torch.zeros(n, dtype=ce.dtype, device=ce.device).index_add(0, who, ce)
    hits = (logits.detach().argmax(-1) == wanted).to(torch.int64)
    correct = torch.zeros(n, dtype=torch.int64, device=ce.device).index_add(
        0, who, hits
    )
    means = sums / tokens.clamp(min=1)
    finite = torch.isfinite(means.detach()).tolist()
    results: dict[int, Result] = {}
    total = None
    for j, i in enumerate(order):
        count = int(tokens[j])
        if count == 0:
            results[i] = Result(None, 0, 0)
            continue
        if not finite[j]:
            results[i] = Result(None, count, 0, finite=False)
            continue
        results[i] = Result(float(means[j].detach()), count, int(correct[j]))
        term = means[j] * requests[i].weight
        total = term if total is None else total + term
    return [results[i] for i in range(len(requests))], total


def _pad(r: Request, width: int, packed: bool):
    """One request's tensors right-padded to ``width`` positions."""
    B, T = r.hidden.shape[:2]
    extra = width - T
    hidden = F.pad(r.hidden, (0, 0, 0, extra)) if extra else r.hidden
    labels = F.pad(r.labels, (0, extra), value=-100) if extra else r.labels
    pos, mask = r.position_ids, r.attention_mask
    if extra:
        dev = pos.device
        if packed:  # the padding is a sequence of its own (positions from 0)
            more = torch.arange(extra, device=dev)
        else:
            more = torch.arange(T, width, device=dev)
        pos = torch.cat([pos, more.expand(B, extra).to(pos.dtype)], dim=1)
        if mask is not None:
            mask = F.pad(mask, (0, extra), value=0)
    return hidden, mask, pos, labels


class _Rows(nn.Module):
    """A block that first lets rows join the batch, then runs on the rows
    that have joined (a prefix of the batch: rows are sorted by cut)."""

    def __init__(self, block, before: int, joining, after: int, total: int):
        super().__init__()
        self.block, self.before, self.after, self.total = block, before, after, total
        self.joining = joining  # (rows, W, H) joining here, or None

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if self.joining is not None:
            kept = hidden_states[: self.before]
            hidden_states = (
                torch.cat([kept, self.joining]) if self.before else (self.joining)
            )
        if self.after < self.total:
            args = tuple(_prefix(a, self.after, self.total) for a in args)
            kwargs = {k: _prefix(v, self.after, self.total) for k, v in kwargs.items()}
        return self.block(hidden_states, *args, **kwargs)


def _prefix(value, n: int, total: int):
    """The first ``n`` rows of a per-row tensor the decoder hands each block
    (masks, rotary embeddings, position ids: dimension 0 is the batch)."""
    if isinstance(value, torch.Tensor):
        per_row = value.ndim >= 2 and value.shape[0] == total
        return value[:n] if per_row else value
    if isinstance(value, (tuple, list)):
        return type(value)(_prefix(v, n, total) for v in value)
    return value


@contextlib.contextmanager
def _joined(
    part: ModelPart,
    cuts: Sequence[int],
    hidden: Sequence[torch.Tensor],
    rows: Sequence[int],
    names: Sequence[str | None],
) -> Iterator[None]:
    """Inside: the part's blocks run the batch with rows joining at their
    cuts, and (per-client adapters) each LoRA layer on its rows' adapters."""
    blocks = part._blocks
    total = sum(rows)
    joins: dict[int, tuple[torch.Tensor, int, int]] = {}  # cut -> (rows, before, after)
    seen = 0
    for cut, group in itertools.groupby(range(len(cuts)), key=lambda j: cuts[j]):
        group = list(group)
        joining = torch.cat([hidden[j] for j in group])
        count = sum(rows[j] for j in group)
        joins[cut] = (joining, seen, seen + count)
        seen += count
    lowest, last = cuts[0], cuts[-1]
    view, active, held = [], 0, {}  # held: layer -> rows it runs on
    for i, block in enumerate(blocks):
        if i < lowest:
            view.append(PassThrough())
            continue
        if i in joins:
            joining, before, active = joins[i]
            view.append(_Rows(block, before, joining, active, total))
        elif i <= last:
            view.append(_Rows(block, active, None, active, total))
        else:
            view.append(block)
        held[i] = active
    spec = part.spec
    patched = []
    if len(set(names)) > 1:  # one adapter for all: PEFT's own forward
        for module_name, module in part.model.named_modules():
            if not hasattr(module, "lora_A") or not hasattr(module, "base_layer"):
                continue
            layer = _layer_of(module_name, spec.blocks)
            if layer is None or layer not in held:
                continue
            # every adapter of the batch is active: even a layer whose rows
            # are one client's must apply that client's adapter only
            module.forward = _sliced_lora(module, _spans(names, rows, held[layer]))
            patched.append(module)
    setattr(part.decoder, spec.blocks, nn.ModuleList(view))
    try:
        yield
    finally:
        setattr(part.decoder, spec.blocks, blocks)
        for module in patched:
            del module.forward  # the class's (PEFT's) forward again


def _spans(
    names: Sequence[str | None], rows: Sequence[int], n: int
) -> list[tuple[str | None, int, int]]:
    """The first ``n`` rows as (adapter, start, stop) runs of one adapter."""
    spans: list[tuple[str | None, int, int]] = []
    start = 0
    for name, count in zip(names, rows, strict=True):
        stop = min(start + count, n)
        if stop <= start:
            break
        if spans and spans[-1][0] == name:
            spans[-1] = (name, spans[-1][1], stop)
        else:
            spans.append((name, start, stop))
        start = stop
    return spans


def _sliced_lora(module, spans: list[tuple[str | None, int, int]]):
    """A LoRA linear's forward applying each span's adapter to its rows:
    PEFT's vanilla LoRA (``result + B(A(dropout(x))) * scaling``) per slice."""

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = module.base_layer(x, *args, **kwargs)
        deltas = []
        for name, start, stop in spans:
            piece = x[start:stop]
            if name is None or name not in module.lora_A:
                deltas.append(torch.zeros_like(result[start:stop]))
                continue
            lora_a, lora_b = module.lora_A[name], module.lora_B[name]
            piece = piece.to(lora_a.weight.dtype)
            out = lora_b(lora_a(module.lora_dropout[name](piece)))
            deltas.append((out * module.scaling[name]).to(result.dtype))
        return result + torch.cat(deltas)

    return forward


def _layer_of(module_name: str, blocks: str) -> int | None:
    parts = module_name.split(".")
    for a, b in itertools.pairwise(parts):
        if a == blocks and b.isdigit():
            return int(b)
    return None
