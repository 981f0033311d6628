"""The server side of the split: one frozen base, LoRA per client or shared.

The server holds blocks ``[lowest cut, L)``, the final norm and the head once,
and the global adapter it aggregates into after each round. Its server-side
LoRA is either one adapter per client, of which the client's blocks
``[k_i, L)`` count (``per_client``, SFL-V1: every copy is averaged after the
round) or one adapter over all its blocks that every client's step updates in
arrival order (``shared``, SFL-V2, :mod:`splitft.split.shared`). Cuts may
change between rounds (:meth:`open_round`): every adapter covers all the
server's blocks, a client with cut k runs and trains only ``[k, L)`` of it,
and the server part grows (and its adapters are rebuilt) only when a cut
moves below its lowest block.

This module is the server's dispatch and its per-client state machine
(:mod:`splitft.split.plans`); what a micro-batch does on the model is the
topology's leg (:mod:`splitft.split.legs`: vanilla, with its batched step,
or U-shaped), and every check of a request is a pure function in
:mod:`splitft.split.guards`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import PretrainedConfig

from splitft import lora
from splitft.config import SERVER_SIDES, LoraSettings, TrainConfig
from splitft.models.arch import spec_for
from splitft.models.parts import ModelPart, WeightStore
from splitft.ranks import drift, truncate_to
from splitft.split import engine, guards, legs, optim
from splitft.split.adapters import SHARED, ServerAdapters
from splitft.split.errors import Malformed, NotAllowed, OutOfOrder, Refused
from splitft.split.messages import (
    Ack,
    AdapterUpdate,
    Join,
    RoundPlan,
    RoundRequest,
    SmashedData,
    TailGradient,
)
from splitft.split.plans import Planned, key_of

log = logging.getLogger(__name__)


class SplitServer:
    """Answers clients' messages; see :meth:`handle`."""

    def __init__(
        self,
        store: WeightStore,
        model_config: PretrainedConfig,
        lora_settings: LoraSettings,
        train: TrainConfig,
        cut_layers: Mapping[int, int],
        total_steps: int,
        local_steps: int,
        seed: int = 0,
        server_side: str = "per_client",
        max_length: int | None = None,
        num_samples: Mapping[int, int] | None = None,
        upload_norm_bound: float = 0.0,
        grad_compression: str = "none",
        tail_layers: int = 0,
        compression: str = "none",
        batching: bool = False,
        max_samples: int = 2**31 - 1,
    ) -> None:
        if server_side not in SERVER_SIDES:
            raise ValueError(f"server_side {server_side!r} not in {SERVER_SIDES}")
        self.store, self.model_config = store, model_config
        self.lora, self.train, self.server_side = lora_settings, train, server_side
        self.shared_side = server_side == SHARED
        self.num_layers = model_config.num_hidden_layers
        # U-shaped (tail_layers > 0): the server's blocks end at L - tail_layers,
        # and the clients run the rest, the head and the loss
        self.tail_layers = tail_layers
        self.end = self.num_layers - tail_layers
        # handle_many runs the vanilla split's micro-batches as one batch
        self.batching = batching
        self.leg = legs.choose(self, tail_layers, batching, train.grad_accum)
        self.cut_layers: dict[int, int] = {}
        self._check_cuts(cut_layers)
        self.cut_layers.update(cut_layers)
        self.total_steps, self.local_steps = total_steps, local_steps
        # bounds on what a request may carry
        self.limits = guards.Limits.of(model_config, train, max_length, tail_layers)
        # the most samples each client may weigh in aggregation (Join sets it)
        self.declared: dict[int, int] = dict(num_samples or {})
        # the most a Join may declare (federation.max_samples_per_client): an
        # upload's weight is at most its client's declaration, so aggregation
        # weights stay bounded
        self.max_samples = max_samples
        self.upload_norm_bound = upload_norm_bound
        self.grad_compression = grad_compression  # of the gradients it returns
        self.compression = compression  # of a U-shaped split's TailInput
        self._round: int | None = None  # the round open_round opened
        self.device = store.device
        self.spec = spec_for(model_config.model_type)
        # first: it names lora.target_modules if they match nothing
        state = lora.init_global_adapter(model_config, lora_settings, seed)
        self.global_state = {k: v.to(self.device) for k, v in state.items()}
        self.adapters = ServerAdapters(
            self.leg.build_part,
            self.spec,
            lora_settings,
            train,
            self.shared_side,
            self.end,
        )
        self.adapters.build(min(self.cut_layers.values()), self.cut_layers)
        self._open: set[int] | None = None  # this round's clients (None: any)
        self.planned: dict[int, Planned] = {}
        # batches each client drew in the rounds aggregated so far (its data
        # order resumes there), and who was handed a plan in this round
        self.batches_drawn: dict[int, int] = {}
        self._drawing: set[int] = set()
        self.updates: dict[int, tuple[dict[str, torch.Tensor], float]] = {}
        self._client_keys: dict[int, set[str]] = {}  # what each update held client-side
        self.drift: dict[int, float] = {}  # of the last aggregation, per client
        # one shared model: cut_at swaps its block list and set_adapter is
        # global, so requests (e.g. from concurrent network handlers) run one at
        # a time
        self._lock = threading.Lock()

    # ------------------------------------------------------------ the model
    def _check_cuts(self, cuts: Mapping[int, int]) -> None:
        L = self.num_layers
        for cid, k in cuts.items():
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= L:
                raise ValueError(f"client {cid}: cut layer {k!r} not in [1, {L}]")
            self.leg.check_cut(cid, k)

    @property
    def part(self) -> ModelPart:
        """The frozen blocks the server runs, with every adapter on them."""
        return self.adapters.part

    @property
    def shared(self):
        """The shared server-side adapter (``server_side=shared``)."""
        return self.adapters.shared

    def open_round(self, rnd: int, cuts: Mapping[int, int]) -> None:
        """Start round ``rnd`` with these clients at these cuts (between rounds only).

        A cut below the server part's lowest block rebuilds the part (it only
        holds frozen weights; adapters are loaded from the global state when a
        client asks for its plan).

        Raises:
            ValueError: an unknown client or a cut outside ``[1, L]``.
        """
        with self._lock:
            if self.updates or self.planned:
                raise ValueError(
                    "the previous round is still open: end it first "
                    "(coordinator.aggregate_round)"
                )
            unknown = sorted(set(cuts) - set(self.cut_layers))
            if unknown:
                raise ValueError(f"unknown clients {unknown}")
            self._check_cuts(cuts)
            self.cut_layers.update(cuts)
            split = [k for k in cuts.values() if k < self.num_layers]
            if split and min(split) < self.part.layers.start:
                self.adapters.build(min(split), self.cut_layers)
            self._open = set(cuts)
            self._round = rnd

    def close_round(self, keep) -> None:
        """No more plans this round; drop the clients not in ``keep`` (they
        missed its deadline): their steps and uploads are refused from now on
        and they are left out of its aggregation."""
        with self._lock:
            self._open = set()
            for cid in set(self.planned) - set(keep):
                self.planned.pop(cid, None)
                self.updates.pop(cid, None)
                self._client_keys.pop(cid, None)
                self.adapters.drop(cid)

    def abandon_round(self) -> None:
        """Forget the round without aggregating it (it is to be run again)."""
        self.close_round([])
        with self._lock:
            self._drawing.clear()  # a round run again draws the same batches
            self.adapters.end_round()

    # ------------------------------------------------------------ requests
    def handle(self, msg, peer: int | None = None):
        """One request in, one reply out; a bad request never stops the server.

        ``peer`` is the client id the transport authenticated (None in
        process): a request acting for another client is refused. Each
        refusal is an :class:`Ack` whose ``code`` names its class
        (:mod:`splitft.split.errors`); anything else that fails is
        ``INTERNAL``, logged, and the server carries on.
        """
        with self._lock:
            return self._handle(msg, peer)

    def _handle(self, msg, peer: int | None):
        cid = getattr(msg, "client_id", -1)
        try:
            self.admit(msg, peer)
            if isinstance(msg, Join):
                return self._join(msg)
            if isinstance(msg, RoundRequest):
                return self._plan(msg)
            if isinstance(msg, SmashedData):
                return self._answer(msg, self.leg.smashed)
            if isinstance(msg, TailGradient):
                return self._answer(msg, self.leg.tail_gradient)
            if isinstance(msg, AdapterUpdate):
                return self._answer(msg, self._receive)
            raise Malformed(f"unexpected message {type(msg).__name__}")
        except Exception as e:  # noqa: BLE001 - reported to the client, not raised
            return self.refusal(e, cid, peer)

    def admit(self, msg, peer: int | None) -> None:
        """The checks every request passes first: who sends it."""
        cid = getattr(msg, "client_id", -1)
        if peer is not None and cid != peer:
            raise NotAllowed(
                f"this connection is client {peer}; it may not act for client {cid}"
            )
        if cid not in self.cut_layers:
            raise NotAllowed(f"unknown client_id {cid}")

    def refusal(self, e: Exception, cid: int, peer: int | None, grads=True) -> Ack:
        """The reply to a request that failed with ``e``: its step is dropped
        (``grads``: with the gradients it left) and the client told why."""
        refused = isinstance(e, Refused)
        if not refused:
            log.warning("request from client %s failed", cid, exc_info=e)
        if peer is None or cid == peer:  # never touch another client's state
            self._drop_step(cid, grads)
        code = e.code if refused else "INTERNAL"
        return Ack(client_id=cid, error=f"{type(e).__name__}: {e}", code=code)

    def _answer(self, msg, run):
        """Run a step or an upload once: a retried request (the same client,
        round, step and micro-batch as the last one answered) gets the first
        answer again and is never applied twice."""
        planned, key, answered = self.retry_of(msg)
        if answered is not None:
            return answered
        reply = run(msg)
        planned.last = (key, reply)
        return reply

    def retry_of(self, msg) -> tuple[Planned, tuple, Any]:
        """The client's plan, the request's key for retries, and the answer
        it already got (None: it is new)."""
        planned = self.planned.get(msg.client_id)
        if planned is None:
            raise OutOfOrder(
                f"client {msg.client_id} has no plan for the open round: send "
                "RoundRequest first"
            )
        key = key_of(msg, planned.round)
        return planned, key, planned.answered(key)

    def _drop_step(self, cid, grads: bool = True) -> None:
        """A refused request leaves no gradient behind (``grads``: none is
        left to clear), and the step it was part of starts again at its first
        micro-batch."""
        self.shared.parked.pop(cid, None)
        opt = self.optimizer_of(cid)
        if opt is not None and grads:
            opt.zero_grad(set_to_none=True)
        planned = self.planned.get(cid)
        if planned is not None:
            planned.restart_step()

    def _join(self, msg: Join) -> Ack:
        """A client declares how many examples it holds: the most its uploads
        may weigh in aggregation."""
        guards.check_join(msg, self.declared.get(msg.client_id), self.max_samples)
        self.declared[msg.client_id] = msg.num_samples
        return Ack(msg.client_id)

    def optimizer_of(self, cid) -> torch.optim.Optimizer | None:
        """The optimizer a client's steps use (None: it has none this round)."""
        return self.adapters.optimizer(cid) if cid in self.planned else None

    def client_ranks(self, k: int) -> dict[str, int]:
        """Rank of each adapter key a client with cut ``k`` holds."""
        return lora.client_key_ranks(
            self.global_state,
            self.spec,
            k,
            self.num_layers,
            self.lora,
            self.tail_layers,
        )

    def _server_keys(self, k: int) -> dict[str, torch.Tensor]:
        layers = range(k, self.end)
        return lora.select_layers(self.global_state, self.spec, layers)

    def _plan(self, req: RoundRequest) -> RoundPlan:
        cid, k = req.client_id, self.cut_layers[req.client_id]
        rounds = self.total_steps // self.local_steps
        if not 0 <= req.round < rounds:
            raise OutOfOrder(f"round {req.round} not in [0, {rounds})")
        if self._round is not None and req.round != self._round:
            raise OutOfOrder(f"round {req.round} is not open (round {self._round} is)")
        if self._open is not None and cid not in self._open:
            raise OutOfOrder(f"client {cid} is not in this round")
        done = self.planned.get(cid)
        if done is not None and done.round == req.round and done.uploaded:
            raise OutOfOrder(f"client {cid} already uploaded round {req.round}")
        if k < self.num_layers:
            if k < self.part.layers.start:  # open_round grows the part first
                raise OutOfOrder(f"cut {k} below the server's blocks")
            held = self._server_keys(self.part.layers.start)
            self.adapters.start(cid, held, req.round)
        first = req.round * self.local_steps
        lrs = [
            optim.lr_at(first + s, self.total_steps, self.train)
            for s in range(self.local_steps)
        ]
        self.planned[cid] = Planned(req.round, k, lrs)
        self._drawing.add(cid)
        adapter = truncate_to(self.global_state, self.client_ranks(k))
        drawn = self.batches_drawn.get(cid, 0)
        return RoundPlan(cid, req.round, k, lrs, adapter, drawn, self.tail_layers)

    # ------------------------------------------------------------ batches
    def handle_many(self, requests: Sequence[tuple[Any, int | None]]) -> list:
        """Answer several ``(request, peer)`` pairs, replies in their order.

        With ``batching``, the vanilla split's micro-batches among them (one
        per client) run as one batch (:mod:`splitft.split.engine`): one
        forward and one backward of the frozen base, each request getting the
        loss, accuracy and gradients it would get alone. Every other request,
        and every request without batching, is answered as :meth:`handle`
        answers it. Each request is checked, retried and refused alone: one
        bad request never spoils the others.
        """
        with self._lock:
            replies: list = [None] * len(requests)
            msgs = [msg for msg, _peer in requests]
            batches, rest = (
                engine.group(msgs) if self.batching else ([], range(len(msgs)))
            )
            for batch in batches:
                self.leg.batch(requests, batch, replies)
            for i in rest:
                replies[i] = self._handle(*requests[i])
            return replies

    def _receive(self, msg: AdapterUpdate) -> Ack:
        """Check an upload against the client's plan, then keep it for
        aggregation: its keys, shapes and dtype are those of its layers, its
        values finite and its norm within ``upload_norm_bound`` times the
        global adapter's on the same layers, its weight at most what the
        client declared."""
        cid, L = msg.client_id, self.num_layers
        planned = self.planned[cid]
        if planned.round != msg.round:
            raise OutOfOrder(f"client {cid}: no plan of round {msg.round} to answer")
        k = planned.cut
        if k < L and not planned.steps_done:
            raise OutOfOrder(
                f"client {cid} uploads after step {planned.next[0]} of "
                f"{len(planned.lrs)}: finish the round's steps first"
            )
        expected = self.client_ranks(k)
        guards.check_upload(
            msg, expected, self.global_state, self.leg.held(k), self.declared.get(cid)
        )
        state = dict(msg.adapter)
        if not self.shared_side and k < L:
            # this client's server-side copy: exactly its blocks [k, end)
            state.update(self.adapters.client_state(cid, k))
        guards.check_finite(cid, state)
        guards.check_norm(
            cid, msg.adapter, expected, self.global_state, self.upload_norm_bound
        )
        guards.check_report(msg, len(planned.lrs))
        self.updates[cid] = (state, float(msg.num_samples))
        self._client_keys[cid] = set(msg.adapter)
        return Ack(cid)

    # ---------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        """Between rounds: cuts, the server part's lowest block, the last
        drift and the batches each client drew (the global adapter is saved
        on its own, as safetensors)."""
        with self._lock:
            if self.updates or self.planned:
                raise ValueError("a round is open: checkpoint between rounds")
            return {
                "cut_layers": dict(self.cut_layers),
                "lowest": self.part.layers.start,
                "drift": dict(self.drift),
                "batches_drawn": dict(self.batches_drawn),
                "declared": dict(self.declared),
            }

    def load_state_dict(
        self, state: dict, global_state: Mapping[str, torch.Tensor]
    ) -> None:
        with self._lock:
            if set(global_state) != set(self.global_state):
                raise ValueError("the checkpoint's adapter is not this model's")
            self.global_state = {k: v.to(self.device) for k, v in global_state.items()}
            self.cut_layers.update(state["cut_layers"])
            self.drift = dict(state["drift"])
            self.batches_drawn = dict(state.get("batches_drawn", {}))
            # a resumed server remembers who joined (their uploads count)
            self.declared.update(state.get("declared", {}))
            if state["lowest"] != self.part.layers.start:
                self.adapters.build(state["lowest"], self.cut_layers)

    # --------------------------------------------------------- aggregation
    def round_updates(self) -> list[tuple[dict[str, torch.Tensor], float]]:
        """What this round's aggregation folds into the global adapter: each
        upload (with its client's server-side copy) and its weight, then the
        shared adapter as holder of the layers its clients trained."""
        with self._lock:
            weights = {cid: w for cid, (_s, w) in self.updates.items()}
            listed = [self.updates[c] for c in sorted(self.updates)]
            return listed + self.adapters.holders(weights)

    def end_round(self, new: Mapping[str, torch.Tensor] | None) -> list[int]:
        """Close the round with ``new`` as the global adapter (None: nothing
        to fold in, it stays); returns who counted. Each client's drift is
        measured against ``new`` first."""
        with self._lock:
            who = sorted(self.updates)
            self.drift = {}
            if new is not None:
                self.drift = {
                    cid: drift(
                        self.updates[cid][0],
                        self._client_keys[cid],
                        new,
                        self.global_state,
                    )
                    for cid in who
                }
                self.global_state = dict(new)
            self._clear_round()
            return who

    def _clear_round(self) -> None:
        self.updates.clear()
        self._client_keys.clear()
        self.planned.clear()
        per_round = self.local_steps * self.train.grad_accum
        for cid in self._drawing:  # dropped clients drew them too
            self.batches_drawn[cid] = self.batches_drawn.get(cid, 0) + per_round
        self._drawing.clear()
        self.adapters.end_round()
