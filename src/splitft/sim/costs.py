"""What split training costs: measured on the real model, predicted per round.

:func:`probe` times the real model on this machine: client and server
forward/backward against the cut layer, saved activations per block, and the
exact wire size of each message kind. :class:`CostModel` turns that into
seconds and bytes for any cut (linear in the token slots a batch holds,
padding included, in the number of blocks, and for the head and the loss in
the labelled tokens: the head runs only where labels are).
:func:`predict_round` runs the simulated clock on modelled clients to predict
a round, and
:class:`Estimator` keeps the planner's beliefs (each client's speed and
links, the server's speed), corrected by every round's observations with an
exponentially weighted moving average.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig

from splitft import lora, runs
from splitft.config import LoraSettings, TrainConfig
from splitft.models.arch import spec_for
from splitft.models.parts import WeightStore, client_part, labelled_tokens
from splitft.ranks import truncate_to
from splitft.sim.clock import Outgoing, RoundTiming, simulate_round
from splitft.sim.profiles import Device, ServerDevice
from splitft.split.compress import compress
from splitft.split.messages import (
    ADAPTERS,
    CONTROL,
    GRADIENTS,
    SMASHED,
    Gradient,
    RoundPlan,
    RoundRequest,
    SmashedData,
    decode,
    encode,
)
from splitft.split.server import SplitServer


@dataclass
class CostModel:
    """Seconds (on the probed machine) and bytes of the split workload.

    Times are forward + backward per token slot (a batch of B rows padded to
    T tokens has B*T slots), or for the head and the loss per labelled token
    (a position whose next token has a label); memory is bytes; wire sizes
    are encoded bytes.
    """

    num_layers: int
    hidden_size: int
    embed_s: float  # client: embeddings, per slot
    block_s: float  # one block, per slot (the same code on either side)
    norm_s: float  # final norm (and a request's fixed server work), per slot
    head_s: float  # head and loss, per labelled token
    forward_share: float  # share of a client's step compute in its forward
    embed_bytes: float  # embedding parameters
    block_bytes: float  # one block's parameters
    head_bytes: float  # final norm and an untied head (a k = L client)
    lora_block_bytes: float  # one block's LoRA weights, gradients, AdamW moments
    act_embed: float  # activations saved for backward per slot: embeddings
    act_block: float  # ... per block
    act_norm: float  # ... final norm, per slot
    act_head: float  # ... head and loss, per labelled token
    message_bytes: float  # an encoded message's fixed part
    smashed_slot_bytes: float  # a SmashedData message per slot
    gradient_slot_bytes: float
    adapter_block_bytes: float  # one block's adapter at rank r, encoded
    adapter_cut_bytes: float  # the cut layer's adapter at the cut rank
    load_block_s: float  # reading one block's weights from disk (a re-cut)
    codec_s_per_byte: float  # encoding or decoding a message, per byte
    # the server's requests served one by one over the same requests as one
    # batch (server.batching), measured on two: > 1 where batching is faster
    batch_gain: float = 1.0

    # ------------------------------------------------------------ compute
    # A micro-batch is ``slots`` token slots of which ``labelled`` carry a
    # label. ``tail``: a U-shaped split's tail_layers (0: vanilla), whose
    # blocks, final norm, head and loss run on the client after the server
    def head_seconds(self, slots: float, labelled: float) -> float:
        """The final norm, the head and the loss, forward and backward."""
        return slots * self.norm_s + labelled * self.head_s

    def client_seconds(self, k: int, slots: float, labelled: float) -> float:
        """Client compute of one micro-batch at cut ``k`` (k = L: everything),
        without a U-shaped tail (:meth:`tail_seconds`)."""
        if k >= self.num_layers:
            blocks = slots * (self.embed_s + self.num_layers * self.block_s)
            return blocks + self.head_seconds(slots, labelled)
        return slots * (self.embed_s + k * self.block_s)

    def tail_seconds(self, tail: int, slots: float, labelled: float) -> float:
        """A U-shaped client's tail, forward and backward (0 without one)."""
        if not tail:
            return 0.0
        return slots * tail * self.block_s + self.head_seconds(slots, labelled)

    def server_seconds(
        self, k: int, slots: float, labelled: float, tail: int = 0
    ) -> float:
        """Server compute of one micro-batch of a client with cut ``k``."""
        if k >= self.num_layers:
            return 0.0
        head = 0.0 if tail else self.head_seconds(slots, labelled)
        return slots * (self.num_layers - tail - k) * self.block_s + head

    def batch_seconds(self, work: Iterable[tuple[int, float, float]]) -> float:
        """Server compute of one batch of ``(cut, slots, labelled)`` requests
        (slots padded to the batch's longest row): their serial time over
        :attr:`batch_gain`, a first-order model measured on a batch of two."""
        serial = sum(self.server_seconds(k, s, n) for k, s, n in work)
        return serial / self.batch_gain

    def server_leg_seconds(
        self, leg: str, k: int, slots: float, labelled: float, tail: int
    ) -> float:
        """Server compute on one request of a micro-batch: a vanilla split
        does all of it on the smashed data (``leg`` "smashed"); a U-shaped one
        its forward there and its backward on the tail's gradient ("tail")."""
        work = self.server_seconds(k, slots, labelled, tail)
        if not tail:
            return work if leg == "smashed" else 0.0
        return work * (
            self.forward_share if leg == "smashed" else 1 - self.forward_share
        )

    def client_memory(
        self, k: int, slots: float, labelled: float, tail: int = 0
    ) -> float:
        """Bytes of a client part at cut ``k`` training on ``slots`` token
        slots, ``labelled`` of them with a label. A U-shaped tail adds its
        blocks and the head (for a tied model the embedding the client holds
        anyway: only the final norm)."""
        whole = k >= self.num_layers
        held = k if whole else k + tail  # blocks on the client
        blocks = self.block_bytes + self.lora_block_bytes
        mem = (
            self.embed_bytes
            + held * blocks
            + slots * (self.act_embed + held * self.act_block)
        )
        if whole or tail:
            mem += self.head_bytes + slots * self.act_norm + labelled * self.act_head
        return mem

    # --------------------------------------------------------------- wire
    def adapter_bytes(self, k: int, tail: int = 0) -> float:
        """An encoded RoundPlan / AdapterUpdate of a client with cut ``k``."""
        if k >= self.num_layers:  # no cut layer: every block at rank r
            return self.message_bytes + k * self.adapter_block_bytes
        last = self.adapter_cut_bytes
        blocks = k - 1 + tail
        return self.message_bytes + blocks * self.adapter_block_bytes + last

    def codec_seconds(self, nbytes: float) -> float:
        """Encoding (or decoding) a message of ``nbytes``."""
        return nbytes * self.codec_s_per_byte

    def smashed_bytes(self, slots: float, tail: int = 0) -> float:
        """A SmashedData message; U-shaped, without its labels (int64)."""
        labels = 8 if tail else 0
        return self.message_bytes + slots * (self.smashed_slot_bytes - labels)

    def tail_input_bytes(self, slots: float) -> float:
        """A TailInput: the hidden state alone (no mask, positions or labels)."""
        return self.message_bytes + slots * (self.smashed_slot_bytes - 3 * 8)

    def gradient_bytes(self, slots: float) -> float:
        return self.message_bytes + slots * self.gradient_slot_bytes

    # ---------------------------------------------------------- persistence
    def save(self, path: Path) -> None:
        runs.write_json(path, dataclasses.asdict(self))  # atomic

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        data = json.loads(Path(path).read_text())
        names = {f.name for f in dataclasses.fields(cls)}
        optional = {
            f.name
            for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING
        }
        if not set(data) <= names or names - optional - set(data):
            raise ValueError(
                f"{path}: not a cost model of this SplitFT (fields differ: "
                f"{sorted(set(data) ^ names)[:4]}); one saved before the head "
                "was priced per labelled token cannot be read: drop "
                "sim.cost_model to measure it afresh (a run folder holding "
                "one resumes only with the SplitFT that wrote it)"
            )
        return cls(**data)


# ------------------------------------------------------------------- probe
def _param_bytes(model: torch.nn.Module, lora_only: bool = False) -> int:
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if ("lora_" in name) != lora_only or p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


class _SavedBytes:
    """Bytes autograd saves for backward, parameters excluded."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen: set[int] = set()
        self.total = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.params and ptr not in self.seen:
            self.seen.add(ptr)
            self.total += t.untyped_storage().nbytes()
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def _typical_time(fn, repeats: int) -> float:
    """The median of ``repeats`` runs after a warm-up; each round's
    measurements correct the model for what it misses anyway."""
    return _typical_times({"fn": fn}, repeats)["fn"]


def _typical_times(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """The median seconds of each function over ``repeats`` turns, after a
    warm-up each. The functions take turns, so a burst of load on the machine
    slows all of them alike instead of one (the cost model takes differences
    of these times)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def _client_work(part, ids, mask, pos) -> dict[str, Callable[[], Any]]:
    """The client part's forward, and its forward and backward."""
    part.model.train()
    return {
        "fwd": lambda: part.client_forward(ids, mask, pos),
        "total": lambda: part.client_forward(ids, mask, pos).sum().backward(),
    }


def _client_sizes(part, ids, mask, pos) -> dict[str, float]:
    """Saved activation bytes of a forward, parameter and LoRA bytes."""
    with _SavedBytes(part.model) as saved:
        part.client_forward(ids, mask, pos)
    return dict(
        saved=saved.total,
        params=_param_bytes(part.model),
        lora=_param_bytes(part.model, lora_only=True),
    )


def _server_at_last_block(
    store: WeightStore,
    model_config: PretrainedConfig,
    settings: LoraSettings,
    smashed: Mapping[str, SmashedData],
    repeats: int,
) -> tuple[SplitServer, dict[str, Callable[[], None]]]:
    """The real server at a one-block cut, and the handling of each of the
    ``smashed`` micro-batches (one step each, all from one plan).

    Through :meth:`SplitServer.handle`, so the time includes what the server
    does around the forward and backward: checks, switching adapters, the
    accuracy count and the optimizer step. Two clients take turns, so every
    request switches the adapter, as the requests of a federation's clients
    interleave on a per-client server.
    """
    L = model_config.num_hidden_layers
    steps = len(smashed) * (repeats + 1)  # per client: an upper bound
    cuts = {0: L - 1, 1: L - 1}
    server = SplitServer(
        store, model_config, settings, TrainConfig(), cuts, steps, steps
    )
    for cid in cuts:
        server.handle(RoundRequest(cid, 0))
    calls = iter(range(2 * steps))

    def serving(msg: SmashedData) -> Callable[[], None]:
        def serve() -> None:
            call = next(calls)
            cid, step = call % 2, call // 2
            reply = server.handle(dataclasses.replace(msg, client_id=cid, step=step))
            if not isinstance(reply, Gradient):
                raise RuntimeError(f"the cost probe's step was refused: {reply.error}")

        return serve

    return server, {name: serving(msg) for name, msg in smashed.items()}


def _batched_at_last_block(
    store: WeightStore,
    model_config: PretrainedConfig,
    settings: LoraSettings,
    msg: SmashedData,
    repeats: int,
) -> Callable[[], None]:
    """Two clients' ``msg`` as one batch on a batching server at a one-block
    cut (``server.batching``), a step each time it is called."""
    L = model_config.num_hidden_layers
    steps = repeats + 1
    cuts = {0: L - 1, 1: L - 1}
    server = SplitServer(
        store, model_config, settings, TrainConfig(), cuts, steps, steps, batching=True
    )
    for cid in cuts:
        server.handle(RoundRequest(cid, 0))
    calls = iter(range(steps))

    def serve() -> None:
        step = next(calls)
        batch = [(dataclasses.replace(msg, client_id=c, step=step), None) for c in cuts]
        for reply in server.handle_many(batch):
            if not isinstance(reply, Gradient):
                raise RuntimeError(f"the cost probe's batch was refused: {reply.error}")

    return serve


def _server_sizes(server: SplitServer, smashed: SmashedData) -> dict[str, float]:
    part = server.part
    hidden = smashed.hidden.detach().requires_grad_(True)
    with _SavedBytes(part.model) as saved:
        part.train_loss(
            smashed.labels, smashed.attention_mask, smashed.position_ids, hidden=hidden
        )
    return dict(saved=saved.total, params=_param_bytes(part.model))


def probe(
    store: WeightStore,
    model_config: PretrainedConfig,
    settings: LoraSettings,
    batch_size: int,
    seq_len: int,
    repeats: int = 5,
    compression: tuple[str, str] = ("none", "none"),
) -> CostModel:
    """Measure the cost model on this machine with a synthetic batch.

    Builds client parts at cuts 1 and ``kb`` (5 when the model has enough
    blocks) and a real :class:`SplitServer` holding the last block, times
    their forward and backward (median of ``repeats`` after a warm-up; the
    server's whole handling of a micro-batch), counts the activations autograd
    saves and encodes one message of each kind. A block costs the same on
    either side (the same code on the same machine), so the block time comes
    from the client's parts, and the server's one-block time gives the final
    norm's and the head's (with the server's overheads, which do not grow
    with the cut). The server runs twice, with every token labelled and with
    half of them: the difference is the head and the loss per labelled token.
    ``compression`` (smashed data, gradients) sizes their messages.
    """
    L = model_config.num_hidden_layers
    if L < 3:
        raise ValueError(f"the cost probe needs a model of >= 3 blocks, not {L}")
    ka, kb = 1, min(5, L - 1)
    # the head's share needs labelled and unlabelled positions: >= 4 tokens
    seq_len = max(seq_len, 4)
    device = store.device
    g = torch.Generator().manual_seed(0)
    vocab = model_config.vocab_size
    ids = torch.randint(3, vocab, (batch_size, seq_len), generator=g).to(device)
    mask = torch.ones_like(ids)
    pos = torch.arange(seq_len, device=device).expand(batch_size, seq_len)
    slots = batch_size * seq_len

    parts, work = {}, {}
    for k in (ka, kb):
        part = client_part(store, model_config, k)
        lora.inject(
            part.model, part.spec, settings, lora.client_layer_ranks(k, L, settings)
        )
        parts[k] = part
        for name, fn in _client_work(part, ids, mask, pos).items():
            work[f"{k}/{name}"] = fn
    hidden = torch.randn(batch_size, seq_len, model_config.hidden_size, generator=g)
    # every token labelled, and the second half of each row: the head's cost
    # per labelled token is the difference, the rest is paid per slot
    half = ids.masked_fill(pos < seq_len // 2, -100)
    smashed = {
        name: SmashedData(0, 0, 0, 1, hidden.to(device), mask, pos, labels, 0)
        for name, labels in (("all", ids), ("half", half))
    }
    labelled = {name: labelled_tokens(m.labels) for name, m in smashed.items()}
    server, serve = _server_at_last_block(
        store, model_config, settings, smashed, repeats
    )
    work.update({f"server/{name}": fn for name, fn in serve.items()})
    work["server/batch"] = _batched_at_last_block(
        store, model_config, settings, smashed["all"], repeats
    )
    with runs.faults_off():  # the probe's server steps are not the run's
        seconds = _typical_times(work, repeats)  # in turns: load hits all alike
    client = {
        k: {
            "fwd": seconds[f"{k}/fwd"],
            "total": seconds[f"{k}/total"],
            **_client_sizes(parts[k], ids, mask, pos),
        }
        for k in (ka, kb)
    }
    last = {
        name: {"total": seconds[f"server/{name}"], **_server_sizes(server, msg)}
        for name, msg in smashed.items()
    }
    extra = labelled["all"] - labelled["half"]  # labelled tokens
    batch_gain = 2 * seconds["server/all"] / seconds["server/batch"]

    dk = kb - ka
    a, b = client[ka], client[kb]
    block_s = max(b["total"] - a["total"], 0.0) / dk / slots
    embed_s = max(a["total"] / slots - ka * block_s, 0.0)
    forward_share = (a["fwd"] + b["fwd"]) / (a["total"] + b["total"])
    head_s = max(last["all"]["total"] - last["half"]["total"], 0.0) / extra
    norm_s = max(
        (last["all"]["total"] - labelled["all"] * head_s) / slots - block_s, 0.0
    )
    block_bytes = (b["params"] - a["params"]) / dk
    embed_bytes = a["params"] - ka * block_bytes
    act_block = (b["saved"] - a["saved"]) / dk / slots
    act_embed = max(a["saved"] / slots - ka * act_block, 0.0)
    act_head = max(last["all"]["saved"] - last["half"]["saved"], 0.0) / extra
    act_norm = max(
        (last["all"]["saved"] - labelled["all"] * act_head) / slots - act_block, 0.0
    )
    tied = bool(getattr(model_config, "tie_word_embeddings", False))
    head_bytes = max(
        last["all"]["params"] - block_bytes - (embed_bytes if tied else 0), 0.0
    )
    # LoRA bytes: (k-1) blocks at r and one at the cut rank; 4 copies with AdamW
    lora_block_bytes = 4 * (b["lora"] - a["lora"]) / dk

    state = lora.init_global_adapter(model_config, settings, 0)
    spec = spec_for(model_config.model_type)

    def plan_bytes(k: int) -> int:
        ranks = lora.client_key_ranks(state, spec, k, L, settings)
        return len(encode(RoundPlan(0, 0, k, [0.0], truncate_to(state, ranks))))

    message = len(encode(RoundRequest(0, 0)))
    adapter_block = plan_bytes(2) - plan_bytes(1)
    big = RoundPlan(0, 0, L - 1, [0.0], state)
    data = encode(big)
    codec = _typical_time(lambda: decode(encode(big)), repeats) / 2 / len(data)
    adapter_cut = adapter_block * settings.cut_rank / settings.r
    hidden = torch.zeros(batch_size, seq_len, model_config.hidden_size)
    up, up_scale = compress(hidden, compression[0])
    smashed = encode(
        SmashedData(0, 0, 0, 1, up, mask.cpu(), pos.cpu(), ids.cpu(), 0, up_scale)
    )
    down, down_scale = compress(hidden, compression[1])
    gradient = encode(Gradient(0, 0, 0, 0.0, 0, 0.0, down, 0, down_scale))

    fresh = WeightStore(store.folder, device="cpu")
    prefix = spec.block_prefix(0)
    keys = [k for k in fresh._files if k.startswith(prefix)]
    t0 = time.perf_counter()
    for key in keys:
        fresh.get(key)
    load_block_s = time.perf_counter() - t0

    return CostModel(
        num_layers=L,
        hidden_size=model_config.hidden_size,
        embed_s=embed_s,
        block_s=block_s,
        norm_s=norm_s,
        head_s=head_s,
        forward_share=forward_share,
        embed_bytes=embed_bytes,
        block_bytes=block_bytes,
        head_bytes=head_bytes,
        lora_block_bytes=lora_block_bytes,
        act_embed=act_embed,
        act_block=act_block,
        act_norm=act_norm,
        act_head=act_head,
        message_bytes=message,
        smashed_slot_bytes=(len(smashed) - message) / slots,
        gradient_slot_bytes=(len(gradient) - message) / slots,
        adapter_block_bytes=adapter_block,
        adapter_cut_bytes=adapter_cut,
        load_block_s=load_block_s,
        codec_s_per_byte=codec,
        batch_gain=batch_gain,
    )


# -------------------------------------------------------------- prediction
@dataclass
class Workload:
    """What every client does in a round, in the cost model's units."""

    local_steps: int
    grad_accum: int
    slots: dict[int, float]  # expected token slots per micro-batch, per client
    labelled: dict[int, float]  # ... of them labelled (where the head runs)
    # batch_size x max_length: memory is planned for it, every slot labelled
    # (an answer can fill a row, as every token does with data.loss_on=all)
    worst_slots: int


@dataclass
class World:
    """Everything a round's time depends on besides the cuts."""

    costs: CostModel
    devices: dict[int, Device]
    server: ServerDevice
    workload: Workload
    compute: dict[int, float]  # per client: device seconds per modelled second
    server_factor: float  # server seconds per modelled second
    tail: int = 0  # federation.tail_layers of a U-shaped split (0: vanilla)

    @classmethod
    def of(
        cls,
        costs: CostModel,
        devices: Mapping[int, Device],
        server: ServerDevice,
        workload: Workload,
        tail: int = 0,
    ) -> World:
        """The world as declared: slowdowns and speeds taken at their word."""
        compute = {cid: d.slowdown for cid, d in devices.items()}
        return cls(
            costs, dict(devices), server, workload, compute, 1 / server.speed, tail
        )

    def memory(self, cid: int, k: int) -> float:
        worst = self.workload.worst_slots
        return self.costs.client_memory(k, worst, worst, self.tail)

    def fits(self, cid: int, k: int) -> bool:
        return self.memory(cid, k) <= self.devices[cid].memory

    def deepest_fit(self, cid: int, hi: int) -> int:
        """The largest cut <= ``hi`` within the client's memory (0 if none)."""
        for k in range(hi, 0, -1):
            if self.fits(cid, k):
                return k
        return 0


class _ModelledClient:
    """A client whose every duration and size comes from the cost model."""

    def __init__(self, cid: int, k: int, world: World) -> None:
        self._steps = self._run(cid, k, world)

    @staticmethod
    def _run(cid: int, k: int, world: World):
        """Yields (device seconds before the request, the request).

        Each piece of work is priced as the real client does it: decoding the
        reply it got, computing, encoding the request it sends.
        """
        c, w, f, tail = world.costs, world.workload, world.compute[cid], world.tail
        slots, labelled = w.slots[cid], w.labelled[cid]
        micro_s = f * c.client_seconds(k, slots, labelled)
        adapters = c.adapter_bytes(k, tail)
        smashed, gradient = c.smashed_bytes(slots, tail), c.gradient_bytes(slots)
        tail_s = f * c.tail_seconds(tail, slots, labelled)
        tail_in = c.tail_input_bytes(slots)

        def codec(nbytes: float) -> float:
            return f * c.codec_seconds(nbytes)

        upload = Outgoing(("upload", k, 0.0, 0.0), adapters, ADAPTERS)
        yield (
            codec(c.message_bytes),
            Outgoing(("plan", k, 0.0, 0.0), c.message_bytes, CONTROL),
        )
        n = w.local_steps * w.grad_accum
        if k >= c.num_layers:  # trains alone, then uploads
            yield codec(adapters) + n * micro_s + codec(adapters), upload
            return
        fwd = c.forward_share * micro_s
        for i in range(n):
            if i == 0:  # decode the plan, then this forward
                before = codec(adapters)
            else:  # decode the gradient, the previous backward, then this forward
                before = codec(gradient) + micro_s - fwd
            yield (
                before + fwd + codec(smashed),
                Outgoing(
                    ("smashed", k, slots, labelled),
                    smashed,
                    SMASHED,
                    0 if tail else max(round(slots), 1),  # vanilla: may be batched
                ),
            )
            if tail:  # decode the server's output, run the tail, send its gradient
                yield (
                    codec(tail_in) + tail_s + codec(gradient),
                    Outgoing(("tail", k, slots, labelled), gradient, GRADIENTS),
                )
        yield codec(gradient) + micro_s - fwd + codec(adapters), upload

    def resume(self, reply: Any) -> tuple[float, Outgoing | None]:
        try:
            return next(self._steps)
        except StopIteration:
            return 0.0, None


def modelled_serve(world: World):
    """The server of a modelled round: service times from the cost model."""
    c, tail = world.costs, world.tail

    def serve(
        cid: int, request: tuple[str, int, float, float]
    ) -> tuple[float, Outgoing]:
        """Decode the request, do the work, encode the reply."""
        kind, k, slots, labelled = request
        g = world.server_factor
        if kind == "plan":
            nbytes = c.adapter_bytes(k, tail)
            seconds = c.codec_seconds(c.message_bytes + nbytes)
            return g * seconds, Outgoing(None, nbytes, ADAPTERS)
        if kind in ("smashed", "tail"):
            work = c.server_leg_seconds(kind, k, slots, labelled, tail)
            if kind == "smashed" and tail:  # U-shaped: the forward, then the tail's
                nbytes = c.tail_input_bytes(slots)
                wire = c.codec_seconds(c.smashed_bytes(slots, tail) + nbytes)
                return g * (work + wire), Outgoing(None, nbytes, SMASHED)
            nbytes = c.gradient_bytes(slots)
            received = c.smashed_bytes(slots) if kind == "smashed" else nbytes
            seconds = work + c.codec_seconds(received + nbytes)
            return g * seconds, Outgoing(None, nbytes, GRADIENTS)
        seconds = c.codec_seconds(c.adapter_bytes(k, tail) + c.message_bytes)
        return g * seconds, Outgoing(None, c.message_bytes, CONTROL)

    return serve


def modelled_serve_many(world: World):
    """The server of a modelled round taking a batch of micro-batches (their
    expected slots: the planner does not price the padding to the longest)."""
    c = world.costs

    def serve_many(items: list) -> tuple[float, list[Outgoing]]:
        work = [(k, slots, labelled) for _, (_kind, k, slots, labelled) in items]
        wire = sum(c.smashed_bytes(s) + c.gradient_bytes(s) for _, s, _ in work)
        seconds = c.batch_seconds(work) + c.codec_seconds(wire)
        replies = [Outgoing(None, c.gradient_bytes(s), GRADIENTS) for _, s, _ in work]
        return world.server_factor * seconds, replies

    return serve_many


def predict_round(cuts: Mapping[int, int], world: World) -> RoundTiming:
    """The simulated clock run on modelled clients: no model, no training."""
    processes = {cid: _ModelledClient(cid, k, world) for cid, k in cuts.items()}
    devices = {cid: world.devices[cid] for cid in cuts}
    return simulate_round(
        processes,
        devices,
        modelled_serve(world),
        world.server.workers,
        world.server.batching,
        modelled_serve_many(world),
    )


# --------------------------------------------------------------- beliefs
class Estimator:
    """The planner's beliefs about the federation, refreshed every round.

    Starts from the declared profiles (in a deployment: each client's own
    probe); after each round, each client's compute factor, its uplink and
    downlink and the server's factor move towards what the round showed, by
    ``ewma``; a value that moved by more than a factor ``1 + jump`` is taken
    as a change, not noise, and replaces the belief. Memory budgets are
    declared by the clients, not learned.
    """

    def __init__(self, world: World, ewma: float, jump: float = 0.0) -> None:
        self.world = world
        self.ewma, self.jump = ewma, jump

    def _blend(self, old: float, new: float) -> float:
        if self.jump and not old / (1 + self.jump) <= new <= old * (1 + self.jump):
            return new
        return (1 - self.ewma) * old + self.ewma * new

    def state_dict(self) -> dict:
        """The beliefs (the cost model itself is saved beside the run)."""
        w = self.world
        return {
            "devices": {c: dataclasses.asdict(d) for c, d in w.devices.items()},
            "compute": dict(w.compute),
            "server_factor": w.server_factor,
            "slots": dict(w.workload.slots),
            "labelled": dict(w.workload.labelled),
        }

    def load_state_dict(self, state: dict) -> None:
        w = self.world
        w.devices.update({c: Device(**d) for c, d in state["devices"].items()})
        w.compute.update(state["compute"])
        w.server_factor = state["server_factor"]
        w.workload.slots.update(state["slots"])
        w.workload.labelled.update(state["labelled"])

    def declare_memory(self, devices: Mapping[int, Device]) -> None:
        """Clients report their current memory budgets (known, not estimated)."""
        for cid, dev in devices.items():
            old = self.world.devices[cid]
            self.world.devices[cid] = dataclasses.replace(old, memory=dev.memory)

    def observe(
        self,
        cuts: Mapping[int, int],
        timing: RoundTiming,
        steps: Iterable[dict],
        recut: Mapping[int, float] | None = None,
    ) -> None:
        """Fold one round's timings and step records into the beliefs.

        What the cost model alone predicts for the round (the clock on unit
        factors, at the token slots the clients actually had) is set against
        what the round took: the ratios are the new compute and server factors.
        ``recut`` holds each client's device seconds spent moving its cut this
        round: one-off work the compute factor must not learn.
        """
        recut = recut or {}
        w = self.world.workload
        slots: dict[int, list[float]] = {}
        labelled: dict[int, list[float]] = {}
        for s in steps:
            slots.setdefault(s["client"], []).append(s["slots"] / w.grad_accum)
            labelled.setdefault(s["client"], []).append(s["tokens"] / w.grad_accum)
        ok = [c for c, t in timing.clients.items() if not t.failed and c in slots]
        if not ok:
            return
        for cid in ok:
            w.slots[cid] = self._blend(w.slots[cid], statistics.fmean(slots[cid]))
            w.labelled[cid] = self._blend(
                w.labelled[cid], statistics.fmean(labelled[cid])
            )
        unit = World(
            self.world.costs,
            self.world.devices,
            self.world.server,
            dataclasses.replace(w),
            dict.fromkeys(ok, 1.0),
            1.0,
            self.world.tail,
        )
        model = predict_round({cid: cuts[cid] for cid in ok}, unit)
        for cid in ok:
            t, m = timing.clients[cid], model.clients[cid]
            if m.compute > 0:
                ratio = max(t.compute - recut.get(cid, 0.0), 0.0) / m.compute
                self.world.compute[cid] = self._blend(self.world.compute[cid], ratio)
            dev = self.world.devices[cid]
            half_rtts = t.messages * dev.rtt / 2
            up, down = dev.up_bps, dev.down_bps
            if t.uplink > half_rtts:
                seen = 8 * sum(t.bytes_up.values()) / (t.uplink - half_rtts)
                up = self._blend(up, seen)
            if t.downlink > half_rtts:
                seen = 8 * sum(t.bytes_down.values()) / (t.downlink - half_rtts)
                down = self._blend(down, seen)
            self.world.devices[cid] = dataclasses.replace(dev, up_bps=up, down_bps=down)
        served = sum(timing.clients[c].served for c in ok)
        modelled = sum(model.clients[c].served for c in ok)
        if modelled > 0:
            self.world.server_factor = self._blend(
                self.world.server_factor, served / modelled
            )
