"""The server side of the split: one frozen base, one LoRA set per client.

The server holds blocks ``[min k, L)``, the final norm and the head once, a
LoRA adapter per client over that client's blocks ``[k_i, L)``, and the
global adapter it aggregates into after each round.
"""

from __future__ import annotations

import threading
import time
import traceback
import warnings
from collections.abc import Mapping

import torch
from peft.functional import set_adapter
from transformers import PretrainedConfig

from splitft import lora
from splitft.config import LoraSettings, TrainConfig
from splitft.federation.aggregate import aggregate, slice_rank, truncate_to
from splitft.models.parts import WeightStore, server_part
from splitft.split import optim
from splitft.split.messages import (
    Ack,
    AdapterUpdate,
    Gradient,
    RoundPlan,
    RoundRequest,
    SmashedData,
)


class ClientError(RuntimeError):
    """A client sent something the server refused; the server keeps running."""


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
    ) -> None:
        self.config, self.lora, self.train = config, lora_settings, train
        self.cut_layers = dict(cut_layers)
        self.total_steps, self.local_steps = total_steps, local_steps
        self.device = store.device
        L = config.num_hidden_layers
        for cid, k in self.cut_layers.items():
            if not 1 <= k < L:
                raise ValueError(f"client {cid}: cut layer {k} not in [1, {L - 1}]")
        # first: it names lora.target_modules if they match nothing
        state = lora.init_global_adapter(config, lora_settings, seed)
        self.global_state = {k: v.to(self.device) for k, v in state.items()}
        self.part = server_part(store, config, min(self.cut_layers.values()))
        self.spec = self.part.spec
        for cid, k in self.cut_layers.items():
            ranks = lora.layer_ranks(range(k, L), lora_settings, cut=False)
            with warnings.catch_warnings():  # one adapter per client is the design
                warnings.filterwarnings("ignore", "Already found a `peft_config`")
                lora.inject(
                    self.part.model, self.spec, lora_settings, ranks, self._name(cid)
                )
        self._optim: dict[int, torch.optim.Optimizer] = {}
        self._lrs: dict[int, list[float]] = {}
        self._round: dict[int, int] = {}
        self.updates: dict[int, tuple[dict[str, torch.Tensor], float]] = {}
        # one shared model: cut_at swaps its block list and set_adapter is
        # global, so requests (e.g. from concurrent network handlers) run one at
        # a time
        self._lock = threading.Lock()

    @staticmethod
    def _name(cid: int) -> str:
        return f"c{cid}"

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
            opt = self._optim.get(getattr(msg, "client_id", None))
            if opt is not None:  # a refused step leaves no gradient behind
                opt.zero_grad(set_to_none=True)
            detail = "".join(traceback.format_exception_only(e)).strip()
            return Ack(client_id=getattr(msg, "client_id", -1), error=detail)

    def client_ranks(self, k: int) -> dict[str, int]:
        """Rank of each adapter key a client with cut ``k`` holds."""
        held = lora.layer_ranks(range(k), self.lora, cut=True)
        return {
            key: held[lora.layer_of(key, self.spec)]
            for key in self.global_state
            if lora.layer_of(key, self.spec) < k
        }

    def _plan(self, req: RoundRequest) -> RoundPlan:
        cid, k = req.client_id, self.cut_layers[req.client_id]
        rounds = self.total_steps // self.local_steps
        if not 0 <= req.round < rounds:
            raise ClientError(f"round {req.round} not in [0, {rounds})")
        name = self._name(cid)
        server_keys = lora.select_layers(
            self.global_state, self.spec, range(k, self.config.num_hidden_layers)
        )
        lora.load_adapter_state(self.part.model, server_keys, name)
        self._optim[cid] = optim.make_optimizer(
            lora.adapter_params(self.part.model, name), self.train
        )
        first = req.round * self.local_steps
        lrs = [
            optim.lr_at(first + s, self.total_steps, self.train)
            for s in range(self.local_steps)
        ]
        self._lrs[cid], self._round[cid] = lrs, req.round
        adapter = truncate_to(self.global_state, self.client_ranks(k))
        return RoundPlan(cid, req.round, k, lrs, adapter)

    def _check_smashed(self, msg: SmashedData) -> None:
        """Refuse a malformed micro-batch before it touches the model."""
        cid = msg.client_id
        if cid not in self._optim:
            raise ClientError(f"client {cid} sent smashed data before RoundRequest")
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
        if not 0 <= msg.step < len(self._lrs[cid]):
            raise ClientError(f"step {msg.step} not in [0, {len(self._lrs[cid])})")
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
        set_adapter(self.part.model, self._name(cid))
        self.part.model.train()
        hidden = msg.hidden.detach().requires_grad_(True)  # (B, T, H)
        tokens = int((msg.labels[:, 1:] != -100).sum())
        with self.part.cut_at(self.cut_layers[cid]):
            out = self.part.server_forward(
                hidden, msg.attention_mask, msg.position_ids, msg.labels
            )
        # Token-weighted over the step, as unsplit training on the whole batch:
        # this micro-batch's mean loss counts by its share of the step's tokens.
        share = tokens / msg.step_tokens if msg.step_tokens > 0 else 1 / msg.num_micro
        if tokens > 0:
            if not torch.isfinite(out.loss):
                self._optim[cid].zero_grad(set_to_none=True)
                raise ClientError("the loss is not finite; step dropped")
            (out.loss * share).backward()
        if msg.micro == msg.num_micro - 1:
            lr = self._lrs[cid][msg.step]
            optim.step(self._optim[cid], lr, self.train.max_grad_norm)
        grad = hidden.grad if hidden.grad is not None else torch.zeros_like(hidden)
        return Gradient(
            client_id=cid,
            step=msg.step,
            micro=msg.micro,
            loss=float(out.loss.detach()) if tokens > 0 else 0.0,
            tokens=tokens,
            server_seconds=time.perf_counter() - t0,
            grad=grad,
        )

    def _receive(self, msg: AdapterUpdate) -> Ack:
        cid, k = msg.client_id, self.cut_layers[msg.client_id]
        if self._round.get(cid) != msg.round or cid not in self._optim:
            raise ClientError(f"client {cid}: no plan of round {msg.round} to answer")
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
        server_side = lora.adapter_state(self.part.model, self._name(cid))
        both = {**msg.adapter, **server_side}
        bad = [key for key, t in both.items() if not torch.isfinite(t).all()]
        if bad:
            raise ClientError(f"client {cid}: non-finite values in {bad[:3]}")
        self.updates[cid] = (both, float(msg.num_samples))
        return Ack(cid)

    def aggregate(self) -> list[int]:
        """Fold this round's updates into the global adapter; returns who counted."""
        with self._lock:
            return self._aggregate()

    def _aggregate(self) -> list[int]:
        who = sorted(self.updates)
        if who:
            self.global_state = aggregate(
                self.global_state, [self.updates[c] for c in who]
            )
        self.updates.clear()
        self._optim.clear()
        return who
