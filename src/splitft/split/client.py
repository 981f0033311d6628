"""The client side of the split: embeddings, blocks [0, k) and their LoRA.

The client is written as a protocol: :meth:`SplitClient.round_protocol` is a
generator that yields each request and receives the server's reply, so the
same code runs behind a blocking transport (:func:`drive`, deployment and the
tests) and inside the simulated clock, which decides when each reply arrives.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Sequence
from typing import Protocol as TypingProtocol

import numpy as np
import torch
from transformers import PretrainedConfig

from splitft import lora, runs
from splitft.config import ConfigError, LoraSettings, RunConfig, TrainConfig
from splitft.data import collate
from splitft.data.order import BatchOrder
from splitft.models.parts import (
    ModelPart,
    WeightStore,
    client_part,
    labelled_tokens,
    loss_share,
    server_part,
)
from splitft.split import optim
from splitft.split.compress import compress, decompress
from splitft.split.messages import (
    Ack,
    AdapterUpdate,
    Gradient,
    Join,
    RoundPlan,
    RoundRequest,
    SmashedData,
    Stop,
    TailGradient,
    TailInput,
    Wait,
    step_report,
)

# A client protocol: yields requests, is sent the replies, returns its result.
Protocol = Generator[object, object, object]


class Caller(TypingProtocol):
    """A blocking transport as the client sees one: a request in, its reply
    out (``splitft.transport`` has the in-process and the gRPC ones)."""

    def call(self, msg): ...


class ServerRefused(RuntimeError):
    """The server answered a request with an error (``code``: its class's
    status name, :mod:`splitft.split.errors`)."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class JoinFailed(ServerRefused):
    """The server refused this client's Join (its reason says why)."""


class ServerStopped(RuntimeError):
    """The server answered :class:`Stop` where it would have answered the
    request: it is stopping (the run is over, or it was interrupted:
    ``resumes``)."""

    def __init__(self, stop: Stop) -> None:
        super().__init__(stop.reason)
        self.resumes = stop.resumes


def drive(protocol: Protocol, call: Callable[[object], object]):
    """Run a client protocol against a blocking ``call`` (request -> reply)."""
    try:
        request = next(protocol)
        while True:
            request = protocol.send(call(request))
    except StopIteration as done:
        return done.value


def _to(t: torch.Tensor | None, device) -> torch.Tensor | None:
    return None if t is None else t.to(device)


def _expect(reply, cls):
    if isinstance(reply, Stop):
        raise ServerStopped(reply)
    if isinstance(reply, Ack) and reply.error:
        raise ServerRefused(reply.error, reply.code)
    if not isinstance(reply, cls):
        raise ServerRefused(f"expected {cls.__name__}, got {type(reply).__name__}")
    return reply


def add_noise(hidden: torch.Tensor, scale: float, seed: list[int]) -> torch.Tensor:
    """``hidden`` (B, T, H) plus Gaussian noise of std ``scale`` times each
    token's RMS over H (``privacy.noise``; 0 returns it unchanged), drawn from
    a generator seeded by the integers ``seed``."""
    if scale <= 0:
        return hidden
    state = np.random.SeedSequence(seed).generate_state(1)[0]
    g = torch.Generator().manual_seed(int(state))
    rms = hidden.float().pow(2).mean(-1, keepdim=True).sqrt()  # (B, T, 1)
    z = torch.randn(hidden.shape, generator=g).to(hidden.device)
    return (hidden.float() + scale * rms * z).to(hidden.dtype)


class SplitClient:
    """One data owner. Its examples never leave it; only activations do."""

    @classmethod
    def from_run(
        cls,
        cfg: RunConfig,
        client_id: int,
        store: WeightStore,
        model_config: PretrainedConfig,
        examples: Sequence[dict],
        pad_token_id: int,
        num_samples: int,
    ) -> SplitClient:
        """A client with the run's settings, simulated or deployed."""
        return cls(
            client_id,
            store,
            model_config,
            cfg.lora,
            cfg.train,
            examples,
            pad_token_id,
            seed=cfg.seed,
            num_samples=num_samples,
            compression=cfg.transport.compression,
            noise=cfg.privacy.noise,
            tail_layers=cfg.federation.client_tail,
            grad_compression=cfg.transport.grad_compression,
            checkpointing=cfg.client.checkpointing,
        )

    def __init__(
        self,
        client_id: int,
        store: WeightStore,
        model_config: PretrainedConfig,
        lora_settings: LoraSettings,
        train: TrainConfig,
        examples: Sequence[dict],
        pad_token_id: int,
        seed: int = 0,
        num_samples: int | None = None,
        compression: str = "none",
        noise: float = 0.0,
        tail_layers: int = 0,
        grad_compression: str = "none",
        checkpointing: str = "none",
    ) -> None:
        if len(examples) == 0:
            raise ValueError(f"client {client_id} has no training examples")
        self.client_id, self.store, self.model_config = client_id, store, model_config
        self.lora, self.train = lora_settings, train
        self.examples, self.pad_token_id = examples, pad_token_id
        # aggregation weight: examples held, not rows (packing merges rows)
        self.num_samples = num_samples or len(examples)
        # whether the server has this client's Join (num_samples: what its
        # uploads may weigh); the first plan's request sends it if not, with
        # the memory its part of the model may use (0: not declared)
        self.joined = False
        self.memory_bytes = 0
        self.compression = compression  # of the smashed data it sends
        self.noise, self._seed = noise, seed  # privacy.noise
        # U-shaped (federation.tail_layers > 0): the client also runs blocks
        # [L - tail_layers, L), the final norm, the head and the loss (its
        # ``tail``), so labels never leave it; it compresses the gradient of
        # the tail's input as the server does its gradients
        self.tail_layers, self.grad_compression = tail_layers, grad_compression
        self.checkpointing = checkpointing  # client.checkpointing
        self.part: ModelPart | None = None
        self.tail: ModelPart | None = None
        # (kind, amount, labelled) of the compute done since the owner last
        # cleared it: "forward", "backward", "tail" (its forward and backward)
        # or "local" token slots and how many are labelled, or "load" blocks
        # (the blocks a re-cut added; labelled 0); the cost model prices it
        self.work: list[tuple[str, int, int]] = []
        self.startup_s = 0.0  # building the first part: start-up, not a round
        self.recut_s = 0.0  # rebuilding the part for a moved cut
        self._order = BatchOrder(
            len(examples), train.batch_size, np.random.default_rng([seed, client_id])
        )

    @property
    def cut_layer(self) -> int | None:
        return None if self.part is None else self.part.layers.stop

    @property
    def local(self) -> bool:
        """Holds the whole model (cut L): trains without the server (FedAvg)."""
        return self.part is not None and self.part.has_head

    def _build(self, k: int) -> None:
        """(Re)build the client part for cut ``k``: the server may move the cut."""
        t0, old = time.perf_counter(), self.cut_layer
        self.part = client_part(self.store, self.model_config, k)
        L = self.model_config.num_hidden_layers
        ranks = lora.client_layer_ranks(k, L, self.lora, self.tail_layers)
        front = {i: r for i, r in ranks.items() if i < k}
        lora.inject(self.part.model, self.part.spec, self.lora, front)
        if self.tail_layers and self.tail is None and k < L:
            self.tail = server_part(self.store, self.model_config, L - self.tail_layers)
            back = {i: r for i, r in ranks.items() if i in self.tail.layers}
            lora.inject(self.tail.model, self.tail.spec, self.lora, back)
            self.tail.checkpoint_blocks(self.checkpointing == "blocks")
        self.part.checkpoint_blocks(self.checkpointing == "blocks")
        if old is None:
            self.startup_s += time.perf_counter() - t0
        else:
            self.recut_s += time.perf_counter() - t0
            self.work.append(("load", max(k - old, 0), 0))

    def _next_batch(self) -> dict:
        rows = [self.examples[j] for j in self._order.next()]
        return collate(rows, self.pad_token_id)

    # ------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        """What a checkpoint needs: the data order's position and the cut."""
        return {"order": self._order.state_dict(), "cut": self.cut_layer}

    def load_state_dict(self, state: dict) -> None:
        self._order.load_state_dict(state["order"])
        if state["cut"] is not None and state["cut"] != self.cut_layer:
            self._build(state["cut"])

    # ------------------------------------------------------------ protocol
    def round_protocol(self, rnd: int) -> Protocol:
        """One round: plan, the local steps through the server, upload.

        ``rnd`` -1 asks for whichever round is open (deployment). Returns (as
        the generator's value) one metrics dict per local step, or the
        server's :class:`Wait` or :class:`Stop` if it had no plan for us.
        """
        self.work.clear()  # whoever prices the work reads it as it goes
        plan = yield from self._start(rnd)
        if not isinstance(plan, RoundPlan):
            return plan
        steps = []
        for step, lr in enumerate(plan.lrs):
            batches = [self._next_batch() for _ in range(self.train.grad_accum)]
            steps.append((yield from self._step(step, lr, batches)))
        yield from self._finish(plan.round, steps)
        return steps

    def _start(self, rnd: int) -> Protocol:
        """Join if not yet joined; ask for the plan; (re)build the part for
        its cut; load its adapters."""
        if not self.joined:
            yield from self._join()
        reply = yield RoundRequest(self.client_id, rnd)
        if isinstance(reply, (Wait, Stop)):
            return reply
        plan = _expect(reply, RoundPlan)
        if plan.tail_layers != self.tail_layers:
            mine = f"tail_layers={self.tail_layers}" if self.tail_layers else "vanilla"
            theirs = (
                f"tail_layers={plan.tail_layers}" if plan.tail_layers else "vanilla"
            )
            raise ConfigError(  # asking again would not help: stop the client
                f"the server runs a {theirs} split, this client is configured "
                f"{mine} (federation.topology and federation.tail_layers must "
                "match)"
            )
        self._order.seek(plan.batches_drawn)
        if plan.cut_layer != self.cut_layer:
            self._build(plan.cut_layer)
        device = self.store.device
        adapter = {k: v.to(device) for k, v in plan.adapter.items()}
        params = []
        for part in self._parts():
            held = lora.select_layers(adapter, part.spec, part.layers)
            lora.load_adapter_state(part.model, held)
            params += lora.adapter_params(part.model)
            part.model.train()
        self._opt = optim.make_optimizer(params, self.train)
        self._round = plan.round
        return plan

    def _join(self) -> Protocol:
        """Declare this client's examples (and memory) to the server.

        Raises:
            JoinFailed: the server refused it.
        """
        reply = yield Join(self.client_id, self.num_samples, self.memory_bytes)
        if isinstance(reply, Stop):
            raise ServerStopped(reply)
        if isinstance(reply, Ack) and reply.error:
            raise JoinFailed(reply.error, reply.code)
        _expect(reply, Ack)
        self.joined = True

    def join(self, call: Callable[[object], object]) -> None:
        """Join now, through ``call`` (request -> reply)."""
        drive(self._join(), call)

    def _parts(self) -> list[ModelPart]:
        """The parts this client trains: its front, and its tail if U-shaped."""
        use_tail = self.tail is not None and not self.local
        return [self.part, self.tail] if use_tail else [self.part]

    def _step(self, step: int, lr: float, batches: list[dict]) -> Protocol:
        """One optimizer step over the given micro-batches; returns its metrics."""
        device = self.store.device
        loss_sum = tokens = correct = 0
        client_s = server_s = 0.0
        step_tokens = sum(labelled_tokens(b["labels"]) for b in batches)
        for micro, batch in enumerate(batches):
            batch = {k: _to(v, device) for k, v in batch.items()}
            slots = int(batch["input_ids"].numel())
            t0 = time.perf_counter()
            if self.local:
                n, hits, loss = self._local_micro(batch, step_tokens)
                client_s += time.perf_counter() - t0
                self.work.append(("local", slots, labelled_tokens(batch["labels"])))
            else:
                n, hits, loss, c_s, s_s = yield from self._split_micro(
                    step, micro, len(batches), batch, step_tokens
                )
                client_s, server_s = client_s + c_s, server_s + s_s
            loss_sum += loss * n
            tokens += n
            correct += hits
        t0 = time.perf_counter()
        optim.step(self._opt, lr, self.train.max_grad_norm)
        client_s += time.perf_counter() - t0
        runs.fault("step")
        return dict(
            round=self._round,
            client=self.client_id,
            step=step,
            cut_layer=self.cut_layer,
            loss=loss_sum / max(tokens, 1),
            tokens=tokens,
            token_acc=correct / max(tokens, 1),
            # token slots the blocks ran on (padding included): the cost model's unit
            slots=sum(int(b["input_ids"].numel()) for b in batches),
            lr=lr,
            client_seconds=client_s,
            server_seconds=server_s,
        )

    def _split_micro(
        self, step: int, micro: int, num_micro: int, batch: dict, step_tokens: int
    ) -> Protocol:
        """One micro-batch through the server; returns (tokens, correct, loss,
        client seconds, server seconds)."""
        device = self.store.device
        slots = int(batch["input_ids"].numel())
        labelled = labelled_tokens(batch["labels"])
        mask, pos = batch["attention_mask"], batch["position_ids"]
        t0 = time.perf_counter()
        hidden = self.part.client_forward(batch["input_ids"], mask, pos)  # (B, T, H)
        # privacy.noise: seeded, so a resumed or re-run round sends the same;
        # the backward uses the gradient at the noisy point
        key = [self._seed, self.client_id, self._round, step, micro]
        sent = add_noise(hidden.detach(), self.noise, key)
        values, scale = compress(sent, self.compression)
        client_s, server_s = time.perf_counter() - t0, 0.0
        self.work.append(("forward", slots, labelled))
        reply = yield SmashedData(
            client_id=self.client_id,
            step=step,
            micro=micro,
            num_micro=num_micro,
            hidden=values,
            attention_mask=mask,
            position_ids=pos,
            # U-shaped: nothing label-derived, not even how many there are
            labels=None if self.tail_layers else batch["labels"],
            step_tokens=0 if self.tail_layers else step_tokens,
            hidden_scale=scale,
        )
        if self.tail_layers:  # the head and the loss are here: one more leg
            middle = _expect(reply, TailInput)
            if (middle.step, middle.micro) != (step, micro) or tuple(
                middle.hidden.shape
            ) != tuple(hidden.shape):
                raise ServerRefused(
                    f"expected the TailInput of step {step} micro {micro} shaped "
                    f"{tuple(hidden.shape)}, got step {middle.step} micro "
                    f"{middle.micro} shaped {tuple(middle.hidden.shape)}"
                )
            server_s += middle.server_seconds
            t0 = time.perf_counter()
            n, hits, loss, tail_grad = self._tail_micro(
                middle, batch, step_tokens, num_micro
            )
            values, scale = compress(tail_grad, self.grad_compression)
            client_s += time.perf_counter() - t0
            self.work.append(("tail", slots, labelled))
            reply = yield TailGradient(self.client_id, step, micro, values, scale)
        reply = _expect(reply, Gradient)
        if not self.tail_layers:
            n, hits, loss = reply.tokens, reply.correct, reply.loss
        server_s += reply.server_seconds
        t0 = time.perf_counter()
        grad = decompress(reply.grad, reply.grad_scale, hidden.dtype)
        hidden.backward(grad.to(device))
        client_s += time.perf_counter() - t0
        self.work.append(("backward", slots, labelled))
        return n, hits, loss, client_s, server_s

    def _tail_micro(
        self, middle: TailInput, batch: dict, step_tokens: int, num_micro: int
    ) -> tuple[int, int, float, torch.Tensor]:
        """U-shaped: the tail's forward and backward on the server's output;
        (tokens, correct, loss, d loss / d the tail's input)."""
        device, labels = self.store.device, batch["labels"]
        h = decompress(middle.hidden, middle.hidden_scale, self.store.dtype)
        h = h.to(device)
        h = h.detach().requires_grad_(True)  # (B, T, H)
        out = self.tail.train_loss(
            labels, batch["attention_mask"], batch["position_ids"], hidden=h
        )
        # no labelled token, or a non-finite loss: the micro-batch adds nothing
        # (a zero gradient, which the server does not backpropagate)
        if out.loss is None or not torch.isfinite(out.loss):
            return 0, 0, 0.0, torch.zeros_like(h)
        (out.loss * loss_share(out.tokens, step_tokens, num_micro)).backward()
        return out.tokens, out.correct, float(out.loss.detach()), h.grad

    def _local_micro(
        self, batch: dict[str, torch.Tensor], step_tokens: int
    ) -> tuple[int, int, float]:
        """Forward and backward of the whole model here: (tokens, correct, loss)."""
        out = self.part.train_loss(
            batch["labels"],
            batch["attention_mask"],
            batch["position_ids"],
            input_ids=batch["input_ids"],
        )
        if out.loss is None or not torch.isfinite(out.loss):  # as the server
            return 0, 0, 0.0
        (out.loss * (out.tokens / max(step_tokens, 1))).backward()
        return out.tokens, out.correct, float(out.loss.detach())

    def _finish(self, rnd: int, steps: Sequence[dict] = ()) -> Protocol:
        """Upload the client-side adapters for aggregation, with the steps'
        metrics (the server logs them: it does not see a local client's)."""
        state = {}
        for part in self._parts():
            state.update(lora.adapter_state(part.model))
        report = step_report(list(steps))
        reply = yield AdapterUpdate(
            self.client_id, rnd, self.num_samples, state, report
        )
        _expect(reply, Ack)

    # ----------------------------------------------- blocking conveniences
    def run_round(self, transport: Caller, rnd: int) -> list[dict]:
        """:meth:`round_protocol` over a blocking transport."""
        return drive(self.round_protocol(rnd), transport.call)

    def start_round(self, transport: Caller, rnd: int) -> RoundPlan:
        return drive(self._start(rnd), transport.call)

    def train_step(
        self, transport: Caller, step: int, lr: float, *micro_batches: dict
    ) -> dict:
        """One optimizer step on the given micro-batches (the rest drawn here)."""
        batches = list(micro_batches)
        while len(batches) < self.train.grad_accum:
            batches.append(self._next_batch())
        return drive(self._step(step, lr, batches), transport.call)

    def finish_round(self, transport: Caller, rnd: int) -> None:
        drive(self._finish(rnd), transport.call)
