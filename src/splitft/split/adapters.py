"""The server's model: one frozen part, the LoRA adapters on it, their optimizers.

With ``federation.server_side=per_client`` each client has its own adapter
(``c<id>``, SFL-V1), loaded from the global adapter when the client is handed
its plan and trained by its own optimizer for the round; with ``shared`` one
adapter (:mod:`splitft.split.shared`, SFL-V2) is trained by every client's
steps. Every adapter covers all the part's blocks, whatever a client's cut: a
client with cut k simply never runs (nor trains) the blocks below k, so a
cut that moves needs no new adapter (injecting one takes PEFT a noticeable
fraction of a second). Only growing the part rebuilds them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping

import torch
from peft.functional import set_adapter

from splitft import lora
from splitft.config import LoraSettings, TrainConfig
from splitft.models.arch import ArchSpec
from splitft.models.parts import ModelPart
from splitft.split import optim, shared

SHARED = shared.NAME  # the adapter name of the shared server-side LoRA


class ServerAdapters:
    """The part for blocks ``[lowest, end)`` with every adapter on it.

    Args:
        build_part: makes the frozen part from a lowest block (the topology's).
        end: the server's last block + 1 (``L``, or ``L - tail`` U-shaped).
    """

    def __init__(
        self,
        build_part: Callable[[int], ModelPart],
        spec: ArchSpec,
        lora_settings: LoraSettings,
        train: TrainConfig,
        shared_side: bool,
        end: int,
    ) -> None:
        self._build_part, self.spec = build_part, spec
        self.lora, self.train = lora_settings, train
        self.shared_side, self.end = shared_side, end
        self.shared = shared.SharedAdapter(train, spec)  # server_side=shared
        self._optim: dict[int, torch.optim.Optimizer] = {}  # per_client
        self.part: ModelPart | None = None
        self._active: tuple[str, ...] | None = None

    @staticmethod
    def _name(cid: int) -> str:
        return f"c{cid}"

    def name_of(self, cid: int) -> str:
        """The adapter ``cid``'s steps train."""
        return SHARED if self.shared_side else self._name(cid)

    def build(self, lowest: int, clients: Iterable[int]) -> None:
        """A new part from block ``lowest`` (at most ``end - 1``) with a fresh
        adapter for each client (or the shared one) on it."""
        lowest = min(lowest, self.end - 1)
        self.part = self._build_part(lowest)
        names = [SHARED] if self.shared_side else map(self._name, clients)
        ranks = lora.layer_ranks(range(lowest, self.end), self.lora, cut=False)
        with warnings.catch_warnings():  # several adapters on one model is the design
            warnings.filterwarnings("ignore", "Already found a `peft_config`")
            for name in names:
                lora.inject(self.part.model, self.spec, self.lora, ranks, name)
        self._active = None

    def activate(self, names: tuple[str, ...]) -> None:
        """Train these adapters. PEFT's ``set_adapter`` walks every module
        of the model (some 40 ms a request on SmolLM2 here) and so does
        ``train()``: each runs only when something changes."""
        model = self.part.model
        if names != self._active:
            set_adapter(model, list(names) if len(names) > 1 else names[0])
            self._active = names
        if not model.training:
            model.train()

    def start(self, cid: int, held: Mapping[str, torch.Tensor], rnd: int) -> None:
        """``cid`` is handed its plan of round ``rnd``: its adapter starts
        from ``held`` (the global adapter's layers on this part) with a fresh
        optimizer (the shared adapter: at the round's first plan only)."""
        if self.shared_side:
            self.shared.start(self.part.model, held, rnd)
            return
        name = self._name(cid)
        lora.load_adapter_state(self.part.model, held, name)
        params = lora.adapter_params(self.part.model, name)
        for p in params:  # a step a dropped client left half-done
            p.grad = None
        self._optim[cid] = optim.make_optimizer(params, self.train)

    def optimizer(self, cid: int) -> torch.optim.Optimizer | None:
        """The optimizer ``cid``'s steps use (None: none was started)."""
        return self.shared.optimizer if self.shared_side else self._optim.get(cid)

    def client_state(self, cid: int, k: int) -> dict[str, torch.Tensor]:
        """``cid``'s own server-side adapter on its blocks ``[k, end)``."""
        state = lora.adapter_state(self.part.model, self._name(cid))
        return lora.select_layers(state, self.spec, range(k, self.end))

    def holders(
        self, weights: Mapping[int, float]
    ) -> list[tuple[dict[str, torch.Tensor], float]]:
        """The shared adapter as holder of the layers the uploaders trained
        (per_client: none; each copy came with its client's upload)."""
        if not self.shared_side:
            return []
        return self.shared.holders(self.part.model, weights)

    def drop(self, cid: int) -> None:
        """Forget ``cid``'s round: its optimizer and parked gradients."""
        self._optim.pop(cid, None)
        self.shared.parked.pop(cid, None)

    def end_round(self) -> None:
        """The round is over (aggregated or abandoned)."""
        self._optim.clear()
        self.shared.end()
