"""Measure the cost model on the real model, on this machine.

:func:`probe` times the real model: client and server forward/backward
against the cut layer (the server through the real :class:`SplitServer`,
one request at a time and as a batch), saved activations per block, and the
exact wire size of each message kind.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from transformers import PretrainedConfig

from splitft import lora, runs
from splitft.config import LoraSettings, TrainConfig
from splitft.models.arch import spec_for
from splitft.models.parts import WeightStore, client_part, labelled_tokens
from splitft.ranks import truncate_to
from splitft.sim.costs import CostModel
from splitft.split.compress import compress
from splitft.split.messages import (
    Gradient,
    RoundPlan,
    RoundRequest,
    SmashedData,
    decode,
    encode,
)
from splitft.split.server import SplitServer

log = logging.getLogger(__name__)


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


# measurements of the probe's work before it keeps one where more work did
# not take longer (see probe)
MEASURES = 3


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
    """Saved activation bytes of a forward (and of one with checkpointed
    blocks: ``client.checkpointing``), parameter and LoRA bytes."""
    with _SavedBytes(part.model) as saved:
        part.client_forward(ids, mask, pos)
    part.checkpoint_blocks(True)
    with _SavedBytes(part.model) as kept:
        part.client_forward(ids, mask, pos)
    part.checkpoint_blocks(False)
    return dict(
        saved=saved.total,
        saved_ckpt=kept.total,
        params=_param_bytes(part.model),
        lora=_param_bytes(part.model, lora_only=True),
    )


def _server_at_last_block(
    store: WeightStore,
    model_config: PretrainedConfig,
    settings: LoraSettings,
    smashed: Mapping[str, SmashedData],
    turns: int,
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
    steps = len(smashed) * turns  # per client: an upper bound
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
    turns: int,
) -> Callable[[], None]:
    """Two clients' ``msg`` as one batch on a batching server at a one-block
    cut (``server.batching``), a step each time it is called."""
    L = model_config.num_hidden_layers
    steps = turns
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
    # in the server's format, as the server casts what it receives
    hidden = smashed.hidden.detach().to(server.store.dtype).requires_grad_(True)
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
    batching: bool = False,
    client_store: WeightStore | None = None,
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
    Where more work measured no slower (the deeper client part, the fully
    labelled step: load on the machine), everything is measured again with
    more turns, at most :data:`MEASURES` times in all.
    ``compression`` (smashed data, gradients) sizes their messages.
    ``batching``: also time two requests as one batch on a batching server
    (``batch_gain``; without it 1.0, which only a batching server reads).
    ``client_store``: the clients' frozen base (``client.base_dtype``) when
    it is not ``store``'s: the client parts are then measured in it too, for
    the clients' embeddings, blocks (``client_block_s``) and memory.
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

    own = client_store is not None and client_store.base != store.base
    sides = {"": store, "c": client_store} if own else {"": store}
    parts, work = {}, {}
    for side, source in sides.items():
        for k in (ka, kb):
            part = client_part(source, model_config, k)
            lora.inject(
                part.model, part.spec, settings, lora.client_layer_ranks(k, L, settings)
            )
            parts[f"{side}{k}"] = part
            for name, fn in _client_work(part, ids, mask, pos).items():
                work[f"{side}{k}/{name}"] = fn
    hidden = torch.randn(batch_size, seq_len, model_config.hidden_size, generator=g)
    # every token labelled, and the second half of each row: the head's cost
    # per labelled token is the difference, the rest is paid per slot
    half = ids.masked_fill(pos < seq_len // 2, -100)
    smashed = {
        name: SmashedData(0, 0, 0, 1, hidden.to(device), mask, pos, labels, 0)
        for name, labels in (("all", ids), ("half", half))
    }
    labelled = {name: labelled_tokens(m.labels) for name, m in smashed.items()}
    # the servers' plans hold every turn the measurements below may take
    turns = sum(1 + a * repeats for a in range(1, MEASURES + 1))
    server, serve = _server_at_last_block(store, model_config, settings, smashed, turns)
    work.update({f"server/{name}": fn for name, fn in serve.items()})
    if batching:
        work["server/batch"] = _batched_at_last_block(
            store, model_config, settings, smashed["all"], turns
        )
    # more work must take longer: the costs are differences of these times,
    # and a burst of load can turn one over (a head measured as free); such a
    # measurement is taken again, with more turns, at most twice
    longer = [(f"{ka}/total", f"{kb}/total"), ("server/half", "server/all")]
    if own:
        longer.append((f"c{ka}/total", f"c{kb}/total"))
    for attempt in range(1, MEASURES + 1):
        with runs.faults_off():  # the probe's server steps are not the run's
            seconds = _typical_times(work, attempt * repeats)  # in turns
        over = [f"{b} <= {a}" for a, b in longer if seconds[b] <= seconds[a]]
        if not over:
            break
        log.warning(
            "cost probe: more work measured no slower (%s: the machine is busy)%s",
            ", ".join(over),
            "; measuring again" if attempt < MEASURES else "; kept as measured",
        )
    client = {
        key: {
            "fwd": seconds[f"{key}/fwd"],
            "total": seconds[f"{key}/total"],
            **_client_sizes(part, ids, mask, pos),
        }
        for key, part in parts.items()
    }
    last = {
        name: {"total": seconds[f"server/{name}"], **_server_sizes(server, msg)}
        for name, msg in smashed.items()
    }
    extra = labelled["all"] - labelled["half"]  # labelled tokens
    batch_gain = (
        2 * seconds["server/all"] / seconds["server/batch"] if batching else 1.0
    )

    dk = kb - ka
    # the server's format gives the server's block (and the norm and head
    # after it); the clients' own format, when they have one, their compute
    # and memory
    sa, sb = client[f"{ka}"], client[f"{kb}"]
    a, b = (client[f"c{ka}"], client[f"c{kb}"]) if own else (sa, sb)
    block_s = max(sb["total"] - sa["total"], 0.0) / dk / slots
    forward_share = (sa["fwd"] + sb["fwd"]) / (sa["total"] + sb["total"])
    client_block_s = max(b["total"] - a["total"], 0.0) / dk / slots if own else 0.0
    embed_s = max(a["total"] / slots - ka * (client_block_s or block_s), 0.0)
    head_s = max(last["all"]["total"] - last["half"]["total"], 0.0) / extra
    norm_s = max(
        (last["all"]["total"] - labelled["all"] * head_s) / slots - block_s, 0.0
    )
    block_bytes = (b["params"] - a["params"]) / dk
    embed_bytes = a["params"] - ka * block_bytes
    act_block = (b["saved"] - a["saved"]) / dk / slots
    act_block_ckpt = max(b["saved_ckpt"] - a["saved_ckpt"], 0.0) / dk / slots
    act_embed = max(a["saved"] / slots - ka * act_block, 0.0)
    act_head = max(last["all"]["saved"] - last["half"]["saved"], 0.0) / extra
    server_act_block = (sb["saved"] - sa["saved"]) / dk / slots
    act_norm = max(
        (last["all"]["saved"] - labelled["all"] * act_head) / slots - server_act_block,
        0.0,
    )
    tied = bool(getattr(model_config, "tie_word_embeddings", False))
    # the head in the server's format (a client's in bf16 or int8/nf4 is no
    # larger: conservative)
    server_block = (sb["params"] - sa["params"]) / dk
    server_embed = sa["params"] - ka * server_block
    head_bytes = max(
        last["all"]["params"] - server_block - (server_embed if tied else 0), 0.0
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
        client_block_s=client_block_s,
        client_base=client_store.base if own else store.base,
        server_base=store.base,
        norm_s=norm_s,
        head_s=head_s,
        forward_share=forward_share,
        embed_bytes=embed_bytes,
        block_bytes=block_bytes,
        head_bytes=head_bytes,
        lora_block_bytes=lora_block_bytes,
        act_embed=act_embed,
        act_block=act_block,
        act_block_ckpt=act_block_ckpt,
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
