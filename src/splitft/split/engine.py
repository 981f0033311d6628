"""Many clients' micro-batches in one forward and one backward of the server.

A batch is every request the server takes at once (``server.batching``).
Its tokens are laid out as one stream cut into rows of ``width`` positions
(:func:`place`): requests sorted by cut, each request's rows one after
another as *segments*, each segment a sequence of its own (its position ids
as the client sent them; the model masks packed sequences by position ids,
``data/packing.py``), so a token attends to its own row's tokens only, as it
would alone. With packing (:data:`PACK`, the default) a segment goes on in
the current row while it fits, so short rows share a row instead of being
padded to the longest; without it each segment has a row of its own (the
padded batch). A segment keeps only the tokens the loss can see: a masked
row's real tokens, and nothing after its last label (later tokens never
reach an earlier one's logits), so neither padding nor label-free tails cost
compute.

Each request's tokens *join* the stream at its own cut: a block only runs on
the tokens of the clients whose cut is at or below it (plus, in the row where
one cut's tokens end and the next's begin, slots that hold zeros until their
owners join: they form sequences of their own and are discarded after every
block). With one adapter per client each LoRA layer applies a client's A and
B to that client's tokens only, as mLoRA does: the frozen base linear runs
once on the whole batch, then each adapter's ``B(A(dropout(x))) * scaling``
on its own contiguous slice of the stream (PEFT's vanilla LoRA forward, slice
by slice; PEFT's own mixed-batch forward, ``adapter_names``, gathers and
scatters rows by index lists, and ``PeftModel`` refuses it in training). The
head and the loss run at the labelled positions only; every request's loss
is the mean over its own labelled tokens and the backward weighs it by its
share of its client's step, so each request gets the loss, the accuracy and
the gradients it would get alone.

A request whose attention mask is not a run of ones then zeros per row, that
labels masked positions, or whose real positions do not count up by one
cannot be written as segments; :func:`group` leaves it to be served alone.
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

PACK = True
"""Pack segments into shared rows (True) or give each its own row, padded to
the longest (False; ``benchmarks/server_throughput.py`` measures both)."""


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


@dataclass
class Result:
    """What the batch gave one request: its mean loss (None without labelled
    tokens or when it is not finite), labelled tokens and correct ones, and
    the slots the batch's stream gave it (its segments and the gaps after
    them: what the blocks ran on for it, as :func:`slots` counts them)."""

    loss: float | None
    tokens: int
    correct: int
    finite: bool = True
    slots: int = 0


def batchable(msg) -> bool:
    """Can this message be written as segments (:func:`kept`)? A vanilla
    micro-batch whose mask, if it has one, is ones then zeros in every row,
    with no label on a masked position and positions counting up by one
    over the real tokens (as ``data/format.collate`` makes them)."""
    if not isinstance(msg, SmashedData):
        return False
    mask = msg.attention_mask
    if mask is None:
        return True
    try:
        real = mask.sum(1, keepdim=True)  # (B, 1)
        T = mask.shape[1]
        ahead = torch.arange(T, device=mask.device)[None, :] < real  # (B, T)
        steps = msg.position_ids[:, 1:] - msg.position_ids[:, :-1]
        return bool(
            (ahead == mask.bool()).all()
            and (msg.labels[~ahead] == -100).all()
            and ((steps == 1) | ~ahead[:, 1:]).all()
        )
    except Exception:  # noqa: BLE001 - malformed: served alone, where the checks refuse it
        return False


def kept(labels: torch.Tensor, attention_mask: torch.Tensor | None) -> list[int]:
    """How many leading tokens of each row the batch keeps: the real ones
    (``attention_mask``), up to the last label; at least one."""
    B, T = labels.shape
    idx = torch.arange(1, T + 1, device=labels.device)
    last = ((labels != -100) * idx).amax(1)  # (B,) 1 + the last label's index
    if attention_mask is None:
        return last.clamp(min=1).tolist()
    real = attention_mask.sum(1)  # (B,) real tokens (ones then zeros)
    return torch.minimum(last, real).clamp(min=1).tolist()


def group(msgs: Sequence) -> tuple[list[list[int]], list[int]]:
    """Which of these requests run as a batch (indices, one micro-batch per
    client at most) and which alone (every other message, a client's second
    micro-batch, and what :func:`batchable` refuses)."""
    batch: list[int] = []
    taken: set[int] = set()
    rest = []
    for i, msg in enumerate(msgs):
        cid = getattr(msg, "client_id", -1)
        if cid not in taken and batchable(msg):
            taken.add(cid)
            batch.append(i)
        else:
            rest.append(i)
    return ([batch] if batch else []), rest


@dataclass
class Placement:
    """Where a batch's segments go (:func:`place`): ``rows`` rows of
    ``width`` slots; ``offsets[j][s]`` is the flat slot of request ``j``'s
    segment ``s``; ``used[r]`` the slots row ``r``'s segments fill (the rest
    is a gap); request ``j`` owns slots ``starts[j]:starts[j + 1]`` (its
    segments and the gaps after them; ``starts[-1] == rows * width``)."""

    width: int
    rows: int
    offsets: list[list[int]]
    used: list[int]
    starts: list[int]


def place(
    segments: Sequence[Sequence[tuple[int, int, int]]], pack: bool | None = None
) -> Placement:
    """Lay requests' segments out in rows, requests in the order given.

    ``segments[j]``: request ``j``'s segments as ``(length, first position,
    last position)``. A segment goes on in the current row when it fits and
    its first position does not continue the row's last one (that would make
    the two one sequence); else it opens a row. ``pack=False`` (default:
    :data:`PACK`): every segment opens a row. The width is the longest
    segment.
    """
    pack = PACK if pack is None else pack
    width = max(n for segs in segments for n, _, _ in segs)
    offsets: list[list[int]] = []
    starts: list[int] = []
    used: list[int] = []
    last = None  # the position of the current row's last token
    for segs in segments:
        mine = []
        for s, (n, first, final) in enumerate(segs):
            fits = pack and bool(used) and used[-1] + n <= width and first != last + 1
            if not fits:
                used.append(0)
            at = (len(used) - 1) * width + used[-1]
            if s == 0:
                starts.append(at)
            mine.append(at)
            used[-1] += n
            last = final
        offsets.append(mine)
    rows = len(used)
    return Placement(width, rows, offsets, used, [0, *starts[1:], rows * width])


def segments(msg) -> list[tuple[int, int, int]]:
    """A request's segments for :func:`place`: per row, the tokens kept
    (:func:`kept`) with their first and last positions."""
    pos = msg.position_ids.tolist()
    ns = kept(msg.labels, msg.attention_mask)
    return [(n, pos[b][0], pos[b][n - 1]) for b, n in enumerate(ns)]


def _lay_out(
    msgs: Sequence, cuts: Sequence[int], pack: bool | None = None
) -> tuple[list[int], list[list[tuple[int, int, int]]], Placement]:
    """The batch's order (requests sorted by cut), each request's segments
    in that order, and where they go: one layout for :func:`run` and
    :func:`slots`."""
    order = sorted(range(len(msgs)), key=lambda i: cuts[i])
    segs = [segments(msgs[i]) for i in order]
    return order, segs, place(segs, pack)


def slots(msgs: Sequence, cuts: Sequence[int], pack: bool | None = None) -> list[int]:
    """The slots each of these requests takes in one batch (its segments and
    the gaps after them), as :func:`run` lays them out: what the batch's
    blocks run on, per request (``pack`` as :func:`place`'s)."""
    order, _, p = _lay_out(msgs, cuts, pack)
    out = [0] * len(msgs)
    for j, i in enumerate(order):
        out[i] = p.starts[j + 1] - p.starts[j]
    return out


def run(part: ModelPart, requests: Sequence[Request]) -> list[Result]:
    """Forward and backward of ``requests`` as one batch through ``part``.

    The gradients land where a request alone would put them: on each
    ``hidden`` leaf and on its adapter's LoRA weights (added to what they
    hold). A request whose loss is not finite is left out of the backward
    (the batch is run again without it, so no non-finite value reaches a
    weight another request trains) and reported with ``finite=False``.
    """
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


@dataclass
class _Stream:
    """A batch laid out by :func:`place`: ``hidden`` ``(rows * width, H)``
    (zeros in the gaps), ``position_ids`` and ``labels`` ``(rows, width)``,
    ``owner`` ``(rows * width,)``: each slot's request by its place in
    ``order`` (the requests sorted by cut)."""

    placement: Placement
    order: list[int]
    hidden: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    owner: torch.Tensor


def _stream(requests: Sequence[Request]) -> _Stream:
    order, segs, p = _lay_out(requests, [r.cut for r in requests])
    ordered = [requests[i] for i in order]
    W, size = p.width, p.rows * p.width
    dev = ordered[0].hidden.device
    index = torch.tensor(
        [
            at + t
            for offs, ss in zip(p.offsets, segs, strict=True)
            for at, (n, _, _) in zip(offs, ss, strict=True)
            for t in range(n)
        ],
        device=dev,
    )  # (N,) the slot of every kept token, in order
    keep = [
        torch.arange(r.hidden.shape[1], device=dev)[None, :]
        < torch.tensor([n for n, _, _ in ss], device=dev)[:, None]
        for r, ss in zip(ordered, segs, strict=True)
    ]  # per request (B, T): the tokens it keeps, row by row
    tokens = torch.cat([r.hidden[k] for r, k in zip(ordered, keep, strict=True)])
    hidden = tokens.new_zeros((size, tokens.shape[-1])).index_copy(0, index, tokens)
    labels = torch.cat([r.labels[k] for r, k in zip(ordered, keep, strict=True)])
    # a segment's first label would be predicted by the token before it in
    # the row, another sequence's: none, as alone it has no predecessor
    lengths = [n for ss in segs for n, _, _ in ss]
    labels[torch.tensor([0, *itertools.accumulate(lengths[:-1])], device=dev)] = -100
    flat_labels = torch.full((size,), -100, dtype=labels.dtype, device=dev)
    flat_labels[index] = labels
    pos = torch.zeros(size, dtype=torch.int64, device=dev)
    for row, u in enumerate(p.used):  # a gap is a sequence of its own
        pos[row * W + u : (row + 1) * W] = torch.arange(W - u, device=dev)
    pos[index] = torch.cat(
        [r.position_ids[k] for r, k in zip(ordered, keep, strict=True)]
    )
    owner = torch.repeat_interleave(
        torch.arange(len(order), device=dev),
        torch.tensor([b - a for a, b in itertools.pairwise(p.starts)], device=dev),
    )
    return _Stream(
        p, order, hidden, pos.view(p.rows, W), flat_labels.view(p.rows, W), owner
    )


def _forward(
    part: ModelPart, requests: Sequence[Request]
) -> tuple[list[Result], torch.Tensor | None]:
    """The batch's forward: each request's result and the weighted loss to
    back-propagate (None: no labelled token in the batch)."""
    s = _stream(requests)
    p, order = s.placement, s.order
    cuts = [requests[i].cut for i in order]
    names = [requests[i].adapter for i in order]
    with _joined(part, p, cuts, s.hidden, names):
        inputs = s.hidden.new_zeros((p.rows, p.width, s.hidden.shape[-1]))
        final = part._blocks_out(None, s.position_ids, inputs_embeds=inputs)
    logits, wanted, chosen = part.head_at_labels(final, s.labels)  # (N, V), (N,)
    # position t predicts the label at t + 1, in the same segment
    who = s.owner.view(p.rows, p.width)[:, :-1][chosen]  # (N,) request of each
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
        count, laid = int(tokens[j]), p.starts[j + 1] - p.starts[j]
        if count == 0:
            results[i] = Result(None, 0, 0, slots=laid)
            continue
        if not finite[j]:
            results[i] = Result(None, count, 0, finite=False, slots=laid)
            continue
        results[i] = Result(
            float(means[j].detach()), count, int(correct[j]), slots=laid
        )
        term = means[j] * requests[i].weight
        total = term if total is None else total + term
    return [results[i] for i in range(len(requests))], total


class _Joining(nn.Module):
    """A block that runs on the stream's first ``after`` slots: the
    ``before`` slots that ran the block below, then ``joining`` (the slots of
    the requests whose cut is this block), in rows of ``width``; the rest of
    the last row is zeros (slots whose owners join later: sequences of their
    own, discarded by the next block)."""

    def __init__(self, block, width: int, before: int, joining, after: int, total: int):
        super().__init__()
        self.block, self.width, self.total = block, width, total
        self.before, self.joining, self.after = before, joining, after

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        H = hidden_states.shape[-1]
        flat = hidden_states.reshape(-1, H)[: self.before]
        if self.joining is not None:
            flat = torch.cat([flat, self.joining]) if self.before else self.joining
        rows = -(-self.after // self.width)
        if rows * self.width > self.after:
            flat = F.pad(flat, (0, 0, 0, rows * self.width - self.after))
        hidden_states = flat.view(rows, self.width, H)
        if rows < self.total:
            args = tuple(_prefix(a, rows, self.total) for a in args)
            kwargs = {k: _prefix(v, rows, self.total) for k, v in kwargs.items()}
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
    p: Placement,
    cuts: Sequence[int],
    hidden: torch.Tensor,
    names: Sequence[str | None],
) -> Iterator[None]:
    """Inside: the part's blocks run the stream with requests joining at
    their cuts, and (per-client adapters) each LoRA layer on its slots'
    adapters."""
    blocks = part._blocks
    size = p.rows * p.width
    joins: dict[int, tuple[int, int]] = {}  # cut -> its requests' slots
    for cut, group in itertools.groupby(range(len(cuts)), key=lambda j: cuts[j]):
        group = list(group)
        joins[cut] = (p.starts[group[0]], p.starts[group[-1] + 1])
    view, done, held = [], 0, {}  # held: layer -> the slots joined there
    for i, block in enumerate(blocks):
        if i < cuts[0]:
            view.append(PassThrough())
            continue
        if i in joins:
            before, done = joins[i]
            joining = hidden[before:done]
            view.append(_Joining(block, p.width, before, joining, done, p.rows))
        elif done < size:
            view.append(_Joining(block, p.width, done, None, done, p.rows))
        else:
            view.append(block)
        held[i] = done
    sizes = [b - a for a, b in itertools.pairwise(p.starts)]
    spec = part.spec
    patched = []
    if len(set(names)) > 1:  # one adapter for all: PEFT's own forward
        for module_name, module in part.model.named_modules():
            if not hasattr(module, "lora_A") or not hasattr(module, "base_layer"):
                continue
            layer = _layer_of(module_name, spec.blocks)
            if layer is None or layer not in held:
                continue
            # every adapter of the batch is active: even a layer whose slots
            # are one client's must apply that client's adapter only
            spans = _spans(names, sizes, held[layer], p.width)
            module.forward = _sliced_lora(module, spans)
            patched.append(module)
    setattr(part.decoder, spec.blocks, nn.ModuleList(view))
    try:
        yield
    finally:
        setattr(part.decoder, spec.blocks, blocks)
        for module in patched:
            del module.forward  # the class's (PEFT's) forward again


def _spans(
    names: Sequence[str | None], sizes: Sequence[int], n: int, width: int
) -> list[tuple[str | None, int, int]]:
    """The slots a block runs on as (adapter, start, stop) runs of one
    adapter: the first ``n`` (joined), then up to the row's end none (slots
    whose owners join later: no adapter of theirs may see a gradient from a
    layer below their cut, not even a zero one, which the optimizer would
    step on)."""
    spans: list[tuple[str | None, int, int]] = []
    start = 0
    for name, count in zip(names, sizes, strict=True):
        stop = min(start + count, n)
        if stop <= start:
            break
        if spans and spans[-1][0] == name:
            spans[-1] = (name, spans[-1][1], stop)
        else:
            spans.append((name, start, stop))
        start = stop
    end = -(-n // width) * width
    if end > n:
        spans.append((None, n, end))
    return spans


def _sliced_lora(module, spans: list[tuple[str | None, int, int]]):
    """A LoRA linear's forward applying each span's adapter to its slots:
    PEFT's vanilla LoRA (``result + B(A(dropout(x))) * scaling``) per slice
    of the flattened ``(rows * width, features)`` input."""

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = module.base_layer(x, *args, **kwargs)
        flat_x = x.reshape(-1, x.shape[-1])
        flat = result.reshape(-1, result.shape[-1])
        deltas = []
        for name, start, stop in spans:
            if name is None or name not in module.lora_A:
                deltas.append(torch.zeros_like(flat[start:stop]))
                continue
            lora_a, lora_b = module.lora_A[name], module.lora_B[name]
            piece = flat_x[start:stop].to(lora_a.weight.dtype)
            out = lora_b(lora_a(module.lora_dropout[name](piece)))
            deltas.append((out * module.scaling[name]).to(result.dtype))
        return result + torch.cat(deltas).view(result.shape)

    return forward


def _layer_of(module_name: str, blocks: str) -> int | None:
    parts = module_name.split(".")
    for a, b in itertools.pairwise(parts):
        if a == blocks and b.isdigit():
            return int(b)
    return None
