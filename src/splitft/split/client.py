"""The client side of the split: embeddings, blocks [0, k) and their LoRA."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from transformers import PretrainedConfig

from splitft import lora
from splitft.config import LoraSettings, TrainConfig
from splitft.data import collate
from splitft.models.parts import ModelPart, WeightStore, client_part
from splitft.split import optim
from splitft.split.messages import (
    Ack,
    AdapterUpdate,
    Gradient,
    RoundPlan,
    RoundRequest,
    SmashedData,
)
from splitft.transport.base import Transport


class ServerRefused(RuntimeError):
    """The server answered a request with an error."""


def _to(t: torch.Tensor | None, device) -> torch.Tensor | None:
    return None if t is None else t.to(device)


def _expect(reply, cls):
    if isinstance(reply, Ack) and reply.error:
        raise ServerRefused(reply.error)
    if not isinstance(reply, cls):
        raise ServerRefused(f"expected {cls.__name__}, got {type(reply).__name__}")
    return reply


class SplitClient:
    """One data owner. Its examples never leave it; only activations do."""

    def __init__(
        self,
        client_id: int,
        store: WeightStore,
        config: PretrainedConfig,
        lora_settings: LoraSettings,
        train: TrainConfig,
        examples: Sequence[dict],
        pad_token_id: int,
        seed: int = 0,
        num_samples: int | None = None,
    ) -> None:
        if len(examples) == 0:
            raise ValueError(f"client {client_id} has no training examples")
        self.client_id, self.store, self.config = client_id, store, config
        self.lora, self.train = lora_settings, train
        self.examples, self.pad_token_id = examples, pad_token_id
        # aggregation weight: examples held, not rows (packing merges rows)
        self.num_samples = num_samples or len(examples)
        self.part: ModelPart | None = None
        self._batches = self._batch_stream(np.random.default_rng([seed, client_id]))

    @property
    def cut_layer(self) -> int | None:
        return None if self.part is None else self.part.layers.stop

    def _build(self, k: int) -> None:
        """(Re)build the client part for cut ``k``: the server may move the cut."""
        self.part = client_part(self.store, self.config, k)
        ranks = lora.layer_ranks(range(k), self.lora, cut=True)
        lora.inject(self.part.model, self.part.spec, self.lora, ranks)

    def _batch_stream(self, rng: np.random.Generator) -> Iterator[dict]:
        n, bs = len(self.examples), self.train.batch_size
        while True:  # epochs of seeded shuffles
            order = rng.permutation(n)
            for i in range(0, n - n % bs if n >= bs else n, bs):
                rows = [self.examples[j] for j in order[i : i + bs]]
                yield collate(rows, self.pad_token_id)

    def run_round(self, transport: Transport, round: int) -> list[dict]:
        """Fetch the plan, train the local steps through the server, upload.

        Returns:
            One metrics dict per local optimizer step.
        """
        plan = self.start_round(transport, round)
        steps = [
            self.train_step(transport, step, lr, next(self._batches))
            for step, lr in enumerate(plan.lrs)
        ]
        self.finish_round(transport, round)
        return steps

    def start_round(self, transport: Transport, round: int) -> RoundPlan:
        """Ask for the plan; (re)build the part for its cut; load its adapters."""
        plan = _expect(transport.call(RoundRequest(self.client_id, round)), RoundPlan)
        if plan.cut_layer != self.cut_layer:
            self._build(plan.cut_layer)
        device = self.store.device
        adapter = {k: v.to(device) for k, v in plan.adapter.items()}
        lora.load_adapter_state(self.part.model, adapter)
        self._opt = optim.make_optimizer(
            lora.adapter_params(self.part.model), self.train
        )
        self._round = round
        self.part.model.train()
        return plan

    def train_step(
        self, transport: Transport, step: int, lr: float, *micro_batches: dict
    ) -> dict:
        """One optimizer step over ``train.grad_accum`` micro-batches.

        The first micro-batch is given; the others come from the client's
        stream. Returns the step's metrics.
        """
        device = self.store.device
        batches = list(micro_batches)
        while len(batches) < self.train.grad_accum:
            batches.append(next(self._batches))
        loss_sum = tokens = 0
        client_s = server_s = 0.0
        sent_before = transport.traffic.snapshot()
        step_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        for micro, batch in enumerate(batches):
            batch = {k: _to(v, device) for k, v in batch.items()}
            t0 = time.perf_counter()
            hidden = self.part.client_forward(  # (B, T, H)
                batch["input_ids"], batch["attention_mask"], batch["position_ids"]
            )
            client_s += time.perf_counter() - t0
            msg = SmashedData(
                self.client_id,
                step,
                micro,
                len(batches),
                hidden.detach(),
                batch["attention_mask"],
                batch["position_ids"],
                batch["labels"],
                step_tokens,
            )
            reply = _expect(transport.call(msg), Gradient)
            t0 = time.perf_counter()
            hidden.backward(reply.grad.to(device))
            client_s += time.perf_counter() - t0
            loss_sum += reply.loss * reply.tokens
            tokens += reply.tokens
            server_s += reply.server_seconds
        t0 = time.perf_counter()
        optim.step(self._opt, lr, self.train.max_grad_norm)
        client_s += time.perf_counter() - t0
        sent = transport.traffic.snapshot()
        sent = {f"bytes_{k}": v - sent_before.get(k, 0) for k, v in sent.items()}
        return dict(
            round=self._round,
            client=self.client_id,
            step=step,
            cut_layer=self.cut_layer,
            loss=loss_sum / max(tokens, 1),
            tokens=tokens,
            lr=lr,
            client_seconds=client_s,
            server_seconds=server_s,
            **{k: v for k, v in sent.items() if v},
        )

    def finish_round(self, transport: Transport, round: int) -> None:
        """Upload the client-side adapters for aggregation."""
        state = lora.adapter_state(self.part.model)
        update = AdapterUpdate(self.client_id, round, self.num_samples, state)
        _expect(transport.call(update), Ack)
