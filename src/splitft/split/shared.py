"""The one server-side adapter every client's step trains (SFL-V2).

With ``federation.server_side=shared`` the server holds one LoRA adapter over
its blocks, loaded from the global adapter at a round's first plan and
stepped by every client's step in the order the steps arrive (or, batched,
once per batch: ``docs/server.md``). After the round it takes part in
aggregation as the holder of each layer its clients trained.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from splitft import lora
from splitft.config import TrainConfig
from splitft.models.arch import ArchSpec
from splitft.split import optim

NAME = "shared"  # the adapter's name on the server's model


class SharedAdapter:
    """The shared adapter's round: its optimizer, the gradients each client's
    step parks until its last micro-batch, and the cut each client served at."""

    def __init__(self, train: TrainConfig, spec: ArchSpec) -> None:
        self.train, self.spec = train, spec
        self.round: int | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.parked: dict[int, dict[nn.Parameter, torch.Tensor]] = {}
        self.served: dict[int, int] = {}  # client -> the cut of its steps

    def start(
        self, model: nn.Module, held: Mapping[str, torch.Tensor], rnd: int
    ) -> None:
        """Round ``rnd``'s first plan loads the adapter from the global one
        (``held``: its layers) with a fresh optimizer; later plans keep it."""
        if self.round == rnd:
            return
        lora.load_adapter_state(model, held, NAME)
        params = lora.adapter_params(model, NAME)
        for p in params:
            p.grad = None
        self.optimizer = optim.make_optimizer(params, self.train)
        self.round, self.served = rnd, {}
        self.parked.clear()

    def park(self, model: nn.Module, cid: int, micro: int, num_micro: int) -> None:
        """Keep each client's micro-batch gradients apart.

        Other clients' steps may arrive between this client's micro-batches;
        their gradients must not mix, so each client's sum is parked until its
        last micro-batch, then put back for its optimizer step.
        """
        if num_micro == 1:
            return
        parked = self.parked.setdefault(cid, {})
        for p in lora.adapter_params(model, NAME):
            if p.grad is not None:
                parked[p] = parked[p] + p.grad if p in parked else p.grad
                p.grad = None
        if micro == num_micro - 1:
            for p, g in self.parked.pop(cid).items():
                p.grad = g

    def step_batch(self, model: nn.Module, lrs: Sequence[float]) -> None:
        """A batch: one optimizer step on the mean of its clients' step
        gradients (one larger batch, as MergeSFL merges its workers'
        features), at the mean of their learning rates ``lrs``."""
        for p in lora.adapter_params(model, NAME):
            if p.grad is not None:
                p.grad /= len(lrs)
        assert self.optimizer is not None  # start() made it
        optim.step(self.optimizer, sum(lrs) / len(lrs), self.train.max_grad_norm)

    def holders(
        self, model: nn.Module, weights: Mapping[int, float]
    ) -> list[tuple[dict[str, torch.Tensor], float]]:
        """The adapter as holder of each layer some uploader trained.

        Layer l was trained by every client whose cut is at or below l, so it
        counts with the sum of their sample counts (``weights``: the
        uploaders'), just as their per-client copies would
        (``docs/aggregation.md``).

        Raises:
            RuntimeError: the adapter is not finite (it is never folded into
                the global adapter then).
        """
        weights = {cid: w for cid, w in weights.items() if cid in self.served}
        if not weights:
            return []
        by_weight: dict[float, dict[str, torch.Tensor]] = {}
        for key, t in lora.adapter_state(model, NAME).items():
            layer = lora.layer_of(key, self.spec)
            w = sum(n for cid, n in weights.items() if self.served[cid] <= layer)
            if w > 0:
                by_weight.setdefault(w, {})[key] = t
        bad = [
            k
            for s in by_weight.values()
            for k, t in s.items()
            if not t.isfinite().all()
        ]
        if bad:
            raise RuntimeError(f"shared server adapter is not finite: {bad[:3]}")
        return [(s, w) for w, s in by_weight.items()]

    def end(self) -> None:
        """The round is over (aggregated or abandoned)."""
        self.optimizer, self.round, self.served = None, None, {}
        self.parked.clear()
