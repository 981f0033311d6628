"""The server side of the split: one frozen base, LoRA per client or shared.

The server holds blocks ``[lowest cut, L)``, the final norm and the head once,
and the global adapter it aggregates into after each round. Its server-side
LoRA is either one adapter per client, of which the client's blocks ``[k_i, L)``
count
(``per_client``, SFL-V1: every copy is averaged after the round) or one
adapter over all its blocks that every client's step updates in arrival order
(``shared``, SFL-V2). Cuts may change between rounds (:meth:`open_round`):
every adapter covers all the server's blocks, a client with cut k runs and
trains only ``[k, L)`` of it, and the server part grows (and its adapters are
rebuilt) only when a cut moves below its lowest block.
"""

from __future__ import annotations

import threading
import time
import traceback
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from peft.functional import set_adapter
from transformers import PretrainedConfig

from splitft import lora
from splitft.config import SERVER_SIDES, LoraSettings, TrainConfig
from splitft.federation.aggregate import (
    aggregate,
    rank_of,
    slice_rank,
    truncate_to,
)
from splitft.models.arch import spec_for
from splitft.models.parts import WeightStore, count_correct, server_part
from splitft.split import optim
from splitft.split.messages import (
    Ack,
    AdapterUpdate,
    Gradient,
    RoundPlan,
    RoundRequest,
    SmashedData,
)

SHARED = "shared"  # the adapter name of the shared server-side LoRA


class ClientError(RuntimeError):
    """A client sent something the server refused; the server keeps running."""


@dataclass
class _Planned:
    """What the server handed one client for the current round."""

    round: int
    cut: int
    lrs: list[float]


class SplitServer:
    """Answers clients' messages; see :meth:`handle`."""

    def __init__(
        self,
        store: WeightStore,
        config: PretrainedConfig,
        lora_settings: LoraSettings,
        train: TrainConfig,
        cut_layers: Mapping[int, int],
        total_steps: int,
        local_steps: int,
        seed: int = 0,
        server_side: str = "per_client",
    ) -> None:
        if server_side not in SERVER_SIDES:
            raise ValueError(f"server_side {server_side!r} not in {SERVER_SIDES}")
        self.store, self.config = store, config
        self.lora, self.train, self.server_side = lora_settings, train, server_side
        self.num_layers = config.num_hidden_layers
        self.cut_layers: dict[int, int] = {}
        self._check_cuts(cut_layers)
        self.cut_layers.update(cut_layers)
        self.total_steps, self.local_steps = total_steps, local_steps
        self.device = store.device
        self.spec = spec_for(config.model_type)
        # first: it names lora.target_modules if they match nothing
        state = lora.init_global_adapter(config, lora_settings, seed)
        self.global_state = {k: v.to(self.device) for k, v in state.items()}
        self._build_part(min(self.cut_layers.values()))
        self._open: set[int] | None = None  # this round's clients (None: any)
        self._planned: dict[int, _Planned] = {}
        self._optim: dict[int, torch.optim.Optimizer] = {}  # per_client
        self._shared_round: int | None = None
        self._shared_grads: dict[int, dict[torch.nn.Parameter, torch.Tensor]] = {}
        self._served: dict[int, int] = {}  # shared: client -> cut of its steps
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

    def _build_part(self, lowest: int) -> None:
        """The server part for blocks ``[lowest, L)`` with every adapter on it.

        Each adapter covers all the part's blocks, whatever a client's cut: a
        client with cut k simply never runs (nor trains) the blocks below k,
        so a cut that moves needs no new adapter (injecting one takes PEFT a
        noticeable fraction of a second). Only growing the part rebuilds them.
        """
        lowest = min(lowest, self.num_layers - 1)
        self.part = server_part(self.store, self.config, lowest)
        names = (
            [SHARED] if self.server_side == SHARED else map(self._name, self.cut_layers)
        )
        ranks = lora.layer_ranks(range(lowest, self.num_layers), self.lora, cut=False)
        with warnings.catch_warnings():  # several adapters on one model is the design
            warnings.filterwarnings("ignore", "Already found a `peft_config`")
            for name in names:
                lora.inject(self.part.model, self.spec, self.lora, ranks, name)

    def open_round(self, round: int, cuts: Mapping[int, int]) -> None:
        """Start ``round`` with these clients at these cuts (between rounds only).

        A cut below the server part's lowest block rebuilds the part (it only
        holds frozen weights; adapters are loaded from the global state when a
        client asks for its plan).

        Raises:
            ValueError: an unknown client or a cut outside ``[1, L]``.
        """
        with self._lock:
            if self.updates or self._planned:
                raise ValueError(
                    "the previous round is still open: aggregate() it first"
                )
            unknown = sorted(set(cuts) - set(self.cut_layers))
            if unknown:
                raise ValueError(f"unknown clients {unknown}")
            self._check_cuts(cuts)
            self.cut_layers.update(cuts)
            split = [k for k in cuts.values() if k < self.num_layers]
            if split and min(split) < self.part.layers.start:
                self._build_part(min(split))
            self._open = set(cuts)

    @staticmethod
    def _name(cid: int) -> str:
        return f"c{cid}"

    def _adapter_of(self, cid: int) -> str:
        return SHARED if self.server_side == SHARED else self._name(cid)

    # ------------------------------------------------------------ requests
    def handle(self, msg):
        """One request in, one reply out; a bad request never stops the server."""
        with self._lock:
            return self._handle(msg)

    def _handle(self, msg):
        try:
            if msg.client_id not in self.cut_layers:
                raise ClientError(f"unknown client_id {msg.client_id}")
            if isinstance(msg, RoundRequest):
                return self._plan(msg)
            if isinstance(msg, SmashedData):
                return self._forward(msg)
            if isinstance(msg, AdapterUpdate):
                return self._receive(msg)
            raise ClientError(f"unexpected message {type(msg).__name__}")
        except Exception as e:  # noqa: BLE001 - reported to the client, not raised
            self._drop_gradients(getattr(msg, "client_id", None))
            detail = "".join(traceback.format_exception_only(e)).strip()
            return Ack(client_id=getattr(msg, "client_id", -1), error=detail)

    def _drop_gradients(self, cid) -> None:
        """A refused step leaves no gradient behind."""
        self._shared_grads.pop(cid, None)
        opt = self._optimizer(cid)
        if opt is not None:
            opt.zero_grad(set_to_none=True)

    def _optimizer(self, cid) -> torch.optim.Optimizer | None:
        """The optimizer a client's steps use (None: it has none this round)."""
        if cid not in self._planned:
            return None
        return self._optim.get(SHARED if self.server_side == SHARED else cid)

    def client_ranks(self, k: int) -> dict[str, int]:
        """Rank of each adapter key a client with cut ``k`` holds."""
        return lora.client_key_ranks(
            self.global_state, self.spec, k, self.num_layers, self.lora
        )

    def _server_keys(self, k: int) -> dict[str, torch.Tensor]:
        layers = range(k, self.num_layers)
        return lora.select_layers(self.global_state, self.spec, layers)

    def _plan(self, req: RoundRequest) -> RoundPlan:
        cid, k = req.client_id, self.cut_layers[req.client_id]
        rounds = self.total_steps // self.local_steps
        if not 0 <= req.round < rounds:
            raise ClientError(f"round {req.round} not in [0, {rounds})")
        if self._open is not None and cid not in self._open:
            raise ClientError(f"client {cid} is not in this round")
        if k < self.num_layers:
            if k < self.part.layers.start:  # open_round grows the part first
                raise ClientError(f"cut {k} below the server's blocks")
            if self.server_side == SHARED:
                self._start_shared(req.round)
            else:
                name = self._name(cid)
                held = self._server_keys(self.part.layers.start)
                lora.load_adapter_state(self.part.model, held, name)
                self._optim[cid] = optim.make_optimizer(
                    lora.adapter_params(self.part.model, name), self.train
                )
        first = req.round * self.local_steps
        lrs = [
            optim.lr_at(first + s, self.total_steps, self.train)
            for s in range(self.local_steps)
        ]
        self._planned[cid] = _Planned(req.round, k, lrs)
        adapter = truncate_to(self.global_state, self.client_ranks(k))
        return RoundPlan(cid, req.round, k, lrs, adapter)

    def _start_shared(self, round: int) -> None:
        """The first plan of a round loads the shared adapter from the global one."""
        if self._shared_round == round:
            return
        held = self._server_keys(self.part.layers.start)
        lora.load_adapter_state(self.part.model, held, SHARED)
        self._optim[SHARED] = optim.make_optimizer(
            lora.adapter_params(self.part.model, SHARED), self.train
        )
        self._shared_round, self._served = round, {}
        self._shared_grads.clear()

    def _check_smashed(self, msg: SmashedData) -> None:
        """Refuse a malformed micro-batch before it touches the model."""
        cid = msg.client_id
        planned = self._planned.get(cid)
        if planned is None:
            raise ClientError(f"client {cid} sent smashed data before RoundRequest")
        if planned.cut >= self.num_layers:
            raise ClientError(f"client {cid} trains locally: no smashed data")
        H = self.config.hidden_size
        if msg.hidden.ndim != 3 or msg.hidden.shape[-1] != H:
            raise ClientError(
                f"hidden must be (B, T, {H}), got {tuple(msg.hidden.shape)}"
            )
        shape = tuple(msg.hidden.shape[:2])
        for name in ("attention_mask", "position_ids", "labels"):
            t = getattr(msg, name)
            if t is not None and tuple(t.shape) != shape:
                raise ClientError(
                    f"{name} must be {shape} like hidden, got {tuple(t.shape)}"
                )
        if not 0 <= msg.step < len(planned.lrs):
            raise ClientError(f"step {msg.step} not in [0, {len(planned.lrs)})")
        if not 0 <= msg.micro < msg.num_micro:
            raise ClientError(
                f"micro {msg.micro} not in [0, num_micro={msg.num_micro})"
            )
        if not torch.isfinite(msg.hidden).all():
            raise ClientError("hidden has non-finite values")

    def _forward(self, msg: SmashedData) -> Gradient:
        t0 = time.perf_counter()
        self._check_smashed(msg)
        cid = msg.client_id
        k = self._planned[cid].cut
        set_adapter(self.part.model, self._adapter_of(cid))
        self.part.model.train()
        hidden = msg.hidden.detach().requires_grad_(True)  # (B, T, H)
        with self.part.cut_at(k):
            out = self.part.server_forward(
                hidden, msg.attention_mask, msg.position_ids, msg.labels
            )
        tokens, correct = count_correct(out.logits.detach(), msg.labels)
        # Token-weighted over the step, as unsplit training on the whole batch:
        # this micro-batch's mean loss counts by its share of the step's tokens.
        share = tokens / msg.step_tokens if msg.step_tokens > 0 else 1 / msg.num_micro
        if tokens > 0:
            if not torch.isfinite(out.loss):
                raise ClientError("the loss is not finite; step dropped")
            (out.loss * share).backward()
        self._accumulate(cid, msg)
        if msg.micro == msg.num_micro - 1:
            lr = self._planned[cid].lrs[msg.step]
            optimizer = self._optimizer(cid)
            assert optimizer is not None  # a split client's plan made it
            optim.step(optimizer, lr, self.train.max_grad_norm)
            if self.server_side == SHARED:
                self._served[cid] = k
        grad = hidden.grad if hidden.grad is not None else torch.zeros_like(hidden)
        return Gradient(
            client_id=cid,
            step=msg.step,
            micro=msg.micro,
            loss=float(out.loss.detach()) if tokens > 0 else 0.0,
            tokens=tokens,
            server_seconds=time.perf_counter() - t0,
            grad=grad,
            correct=correct,
        )

    def _accumulate(self, cid: int, msg: SmashedData) -> None:
        """Shared adapter: keep each client's micro-batch gradients apart.

        Other clients' steps may arrive between this client's micro-batches;
        their gradients must not mix, so each client's sum is parked until its
        last micro-batch, then put back for its optimizer step.
        """
        if self.server_side != SHARED or msg.num_micro == 1:
            return
        params = lora.adapter_params(self.part.model, SHARED)
        parked = self._shared_grads.setdefault(cid, {})
        for p in params:
            if p.grad is not None:
                parked[p] = parked[p] + p.grad if p in parked else p.grad
                p.grad = None
        if msg.micro == msg.num_micro - 1:
            for p, g in self._shared_grads.pop(cid).items():
                p.grad = g

    def _receive(self, msg: AdapterUpdate) -> Ack:
        cid, L = msg.client_id, self.num_layers
        planned = self._planned.get(cid)
        if planned is None or planned.round != msg.round:
            raise ClientError(f"client {cid}: no plan of round {msg.round} to answer")
        k = planned.cut
        expected = self.client_ranks(k)
        missing, extra = (
            set(expected) - set(msg.adapter),
            set(msg.adapter) - set(expected),
        )
        if missing or extra:
            raise ClientError(
                f"client {cid}: adapter keys differ from its layers [0, {k}): "
                f"missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}"
            )
        for key, t in msg.adapter.items():
            want = tuple(slice_rank(key, self.global_state[key], expected[key]).shape)
            if tuple(t.shape) != want:
                raise ClientError(
                    f"client {cid}: {key} has shape {tuple(t.shape)}, not {want}"
                )
        if msg.num_samples <= 0:
            raise ClientError(f"client {cid}: num_samples must be > 0")
        state = dict(msg.adapter)
        if self.server_side != SHARED and k < self.num_layers:
            # this client's server-side copy: exactly its blocks [k, L)
            server_side = lora.adapter_state(self.part.model, self._name(cid))
            state.update(lora.select_layers(server_side, self.spec, range(k, L)))
        bad = [key for key, t in state.items() if not torch.isfinite(t).all()]
        if bad:
            raise ClientError(f"client {cid}: non-finite values in {bad[:3]}")
        self.updates[cid] = (state, float(msg.num_samples))
        self._client_keys[cid] = set(msg.adapter)
        return Ack(cid)

    # ---------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        """Between rounds: cuts, the server part's lowest block and the last
        drift (the global adapter is saved on its own, as safetensors)."""
        with self._lock:
            if self.updates or self._planned:
                raise ValueError("a round is open: checkpoint between rounds")
            return {
                "cut_layers": dict(self.cut_layers),
                "lowest": self.part.layers.start,
                "drift": dict(self.drift),
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
            if state["lowest"] != self.part.layers.start:
                self._build_part(state["lowest"])

    # --------------------------------------------------------- aggregation
    def _drift(self, cid: int, new: Mapping[str, torch.Tensor]) -> float:
        """How far a client's own layers ended from the aggregate, relative to
        how far the aggregate moved: ``|theta_i - new| / |new - old|`` over the
        client-side keys (each at the client's rank)."""
        state = self.updates[cid][0]
        far = moved = 0.0
        for key in self._client_keys[cid]:
            t = state[key]
            rank = rank_of(key, t)
            after = slice_rank(key, new[key], rank)
            before = slice_rank(key, self.global_state[key], rank)
            far += float((t - after).pow(2).sum())
            moved += float((after - before).pow(2).sum())
        return (far / moved) ** 0.5 if moved > 0 else 0.0

    def aggregate(self) -> list[int]:
        """Fold this round's updates into the global adapter; returns who counted."""
        with self._lock:
            return self._aggregate()

    def _shared_updates(self) -> list[tuple[dict[str, torch.Tensor], float]]:
        """The shared adapter as holder of each layer some uploader trained.

        Layer l of the shared adapter was trained by every client whose cut is
        at or below l, so it counts with the sum of their sample counts, just
        as their per-client copies would (``docs/aggregation.md``).
        """
        if self.server_side != SHARED or not self._served:
            return []
        weights = {
            cid: w for cid, (_s, w) in self.updates.items() if cid in self._served
        }
        state = lora.adapter_state(self.part.model, SHARED)
        by_weight: dict[float, dict[str, torch.Tensor]] = {}
        for key, t in state.items():
            layer = lora.layer_of(key, self.spec)
            w = sum(n for cid, n in weights.items() if self._served[cid] <= layer)
            if w > 0:
                by_weight.setdefault(w, {})[key] = t
        bad = [
            k
            for s in by_weight.values()
            for k, t in s.items()
            if not t.isfinite().all()
        ]
        if bad:  # never fold a broken shared state into the global adapter
            raise RuntimeError(f"shared server adapter is not finite: {bad[:3]}")
        return [(s, w) for w, s in by_weight.items()]

    def _aggregate(self) -> list[int]:
        who = sorted(self.updates)
        updates = [self.updates[c] for c in who] + self._shared_updates()
        self.drift = {}
        if updates:
            new = aggregate(self.global_state, updates)
            self.drift = {cid: self._drift(cid, new) for cid in who}
            self.global_state = new
        self.updates.clear()
        self._client_keys.clear()
        self._optim.clear()
        self._planned.clear()
        self._served = {}
        self._shared_round = None
        return who
