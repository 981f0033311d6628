"""The server's share of one micro-batch, per topology: one leg, chosen once.

- :class:`Vanilla`: the server ends the model. Smashed data in, blocks
  ``[k, L)``, the head and the loss, the gradient of the smashed data out;
  with ``server.batching`` many clients' micro-batches run as one batch
  (:mod:`splitft.split.engine`).
- :class:`UShaped`: the server holds the middle blocks ``[k, L - tail)``.
  Smashed data in, the middle's output out (:class:`TailInput`); the client
  runs the tail, the head and the loss and sends back the gradient at the
  middle's output (:class:`TailGradient`), which the server carries down to
  the first cut.

A leg is a part of its :class:`~splitft.split.server.SplitServer`: it reads
the client's plan there, starts each micro-batch with :func:`received` (the
request's checks, the client's adapter, the smashed data as a leaf) and ends
it with :func:`stepped` (optimizer step, next expected micro-batch, the
reply's gradient). The server checks who sends a request and whether it is a
retry before a leg sees it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from splitft import runs
from splitft.models.parts import (
    labelled_tokens,
    loss_share,
    middle_part,
    server_part,
)
from splitft.split import engine, guards, optim
from splitft.split.compress import compress, decompress
from splitft.split.errors import Malformed, OutOfOrder
from splitft.split.messages import Gradient, SmashedData, TailGradient, TailInput

if TYPE_CHECKING:
    from splitft.split.server import SplitServer


def _no_tail_awaited(cid: int, next_: tuple[int, int]) -> OutOfOrder:
    step, micro = next_
    return OutOfOrder(
        f"client {cid}: no forward awaits a TailGradient; expected "
        f"SmashedData of step {step} micro {micro}"
    )


def received(s: SplitServer, msg: SmashedData, activate: bool = True) -> torch.Tensor:
    """Check a micro-batch before it touches the model (:mod:`guards`),
    switch to its client's adapter (``activate``; a batch switches to all
    of its clients' at once) and return its smashed data as a leaf
    ``(B, T, H)`` in the server's precision (a client may compute in
    another)."""
    planned = s.planned[msg.client_id]
    pending = planned.pending[:2] if planned.pending is not None else None
    guards.check_smashed(
        msg, s.limits, planned.cut, len(planned.lrs), planned.next, pending
    )
    if activate:
        s.adapters.activate((s.adapters.name_of(msg.client_id),))
    hidden = decompress(msg.hidden, msg.hidden_scale, s.store.dtype)
    return hidden.detach().requires_grad_(True)


def stepped(
    s: SplitServer,
    cid: int,
    step: int,
    micro: int,
    hidden: torch.Tensor,
    optimize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """After a micro-batch's backward: the optimizer step after the step's
    last micro-batch (``optimize``: a batch on a shared adapter stepped
    it already), the (step, micro) the client sends next, and the
    gradient of its smashed data as the reply carries it (in the server's
    precision unless compressed; the client casts it to its own)."""
    planned = s.planned[cid]
    last = micro == s.train.grad_accum - 1  # = num_micro (check_smashed)
    if last and optimize:
        optimizer = s.optimizer_of(cid)
        assert optimizer is not None  # a split client's plan made it
        optim.step(optimizer, planned.lrs[step], s.train.max_grad_norm)
    if last and s.shared_side:
        s.shared.served[cid] = planned.cut
    planned.served(step, micro, s.train.grad_accum)
    runs.fault("server_step")
    grad = hidden.grad if hidden.grad is not None else torch.zeros_like(hidden)
    return compress(grad, s.grad_compression)


def choose(s: SplitServer, tail_layers: int, batching: bool, grad_accum: int):
    """The server's leg (U-shaped with a client tail, else vanilla), after
    checking that the server's settings go together."""
    L = s.num_layers
    if not 0 <= tail_layers < L - 1:
        raise ValueError(f"tail_layers={tail_layers} not in [0, {L - 2}]")
    if tail_layers and s.shared_side:
        raise ValueError("a U-shaped split needs server_side='per_client'")
    if batching and tail_layers:
        raise ValueError("batching serves a vanilla split only (tail_layers=0)")
    if batching and s.shared_side and grad_accum > 1:
        raise ValueError("batching on a shared adapter needs train.grad_accum=1")
    return UShaped(s, tail_layers) if tail_layers else Vanilla(s)


class Vanilla:
    """The server runs blocks ``[k, L)``, the head and the loss."""

    tail_layers = 0

    def __init__(self, server: SplitServer) -> None:
        self.server = server

    def build_part(self, lowest: int):
        s = self.server
        return server_part(s.store, s.model_config, lowest)

    def check_cut(self, cid: int, k: int) -> None:
        """Any cut in ``[1, L]`` (``L``: the client runs the whole model)."""

    def held(self, k: int) -> str:
        """The blocks a client with cut ``k`` holds, as an error names them."""
        return f"[0, {k})"

    def smashed(self, msg: SmashedData) -> Gradient:
        """One micro-batch: forward from the cut, loss, backward."""
        s = self.server
        t0 = time.perf_counter()
        hidden = received(s, msg)  # (B, T, H)
        cid = msg.client_id
        with s.part.cut_at(s.planned[cid].cut):
            out = s.part.train_loss(
                msg.labels, msg.attention_mask, msg.position_ids, hidden=hidden
            )
        tokens, correct = out.tokens, out.correct
        if out.loss is not None:
            if not torch.isfinite(out.loss):
                raise Malformed("the loss is not finite; step dropped")
            share = loss_share(tokens, msg.step_tokens, msg.num_micro)
            (out.loss * share).backward()
        if s.shared_side:
            s.shared.park(s.part.model, cid, msg.micro, msg.num_micro)
        values, scale = stepped(s, cid, msg.step, msg.micro, hidden)
        return Gradient(
            client_id=cid,
            step=msg.step,
            micro=msg.micro,
            loss=float(out.loss.detach()) if out.loss is not None else 0.0,
            tokens=tokens,
            server_seconds=time.perf_counter() - t0,
            grad=values,
            correct=correct,
            grad_scale=scale,
        )

    def tail_gradient(self, msg: TailGradient) -> Gradient:
        raise _no_tail_awaited(msg.client_id, self.server.planned[msg.client_id].next)

    def batch(self, requests: Sequence[tuple], batch: list[int], replies: list) -> None:
        """Check each request of ``batch`` (indices into ``requests``, pairs
        ``(SmashedData, peer)``), run those that pass as one batch, step the
        optimizers and put each reply at its index in ``replies``."""
        s = self.server
        t0 = time.perf_counter()
        ready: list[tuple[int, SmashedData, tuple, engine.Request]] = []
        for i in batch:
            msg, peer = requests[i]
            try:
                s.admit(msg, peer)
                planned, key, answered = s.retry_of(msg)
                if answered is not None:
                    replies[i] = answered  # a retry: the first answer
                    continue
                hidden = received(s, msg, activate=False)
            except Exception as e:  # noqa: BLE001 - reported to the client
                replies[i] = s.refusal(e, msg.client_id, peer)
                continue
            share = loss_share(
                labelled_tokens(msg.labels), msg.step_tokens, msg.num_micro
            )
            adapter = None if s.shared_side else s.adapters.name_of(msg.client_id)
            request = engine.Request(
                hidden,
                msg.attention_mask,
                msg.position_ids,
                msg.labels,
                planned.cut,
                share,
                adapter,
            )
            ready.append((i, msg, key, request))
        if not ready:
            return
        names = {s.adapters.name_of(m.client_id) for _, m, _, _ in ready}
        s.adapters.activate(tuple(sorted(names)))
        try:
            results = engine.run(s.part, [r for *_, r in ready])
        except Exception as e:  # noqa: BLE001 - a fault of the batch, not a request
            for i, msg, _, _ in ready:
                replies[i] = s.refusal(e, msg.client_id, requests[i][1])
            return
        done = []
        for (i, msg, key, request), res in zip(ready, results, strict=True):
            if res.finite:
                done.append((i, msg, key, request, res))
            else:
                error = Malformed("the loss is not finite; step dropped")
                replies[i] = s.refusal(error, msg.client_id, requests[i][1], False)
        if s.shared_side and done:  # one step on the batch's mean gradient
            lrs = [s.planned[msg.client_id].lrs[msg.step] for _, msg, *_ in done]
            s.shared.step_batch(s.part.model, lrs)
        wall = time.perf_counter() - t0
        # each reply's share of the batch's wall time: the slots the stream
        # gave its request times the blocks they ran through
        work = [res.slots * (s.end - r.cut) for *_, r, res in done]
        for (i, msg, key, request, res), w in zip(done, work, strict=True):
            cid = msg.client_id
            try:
                values, scale = stepped(
                    s, cid, msg.step, msg.micro, request.hidden, not s.shared_side
                )
            except Exception as e:  # noqa: BLE001 - reported to the client
                replies[i] = s.refusal(e, cid, requests[i][1])
                continue
            reply = Gradient(
                client_id=cid,
                step=msg.step,
                micro=msg.micro,
                loss=res.loss if res.loss is not None else 0.0,
                tokens=res.tokens,
                server_seconds=wall * w / max(sum(work), 1),  # its share of the batch
                grad=values,
                correct=res.correct,
                grad_scale=scale,
            )
            s.planned[cid].last = (key, reply)
            replies[i] = reply


class UShaped:
    """The server runs blocks ``[k, L - tail_layers)``; the client the rest."""

    def __init__(self, server: SplitServer, tail_layers: int) -> None:
        self.server, self.tail_layers = server, tail_layers

    def build_part(self, lowest: int):
        s = self.server
        return middle_part(s.store, s.model_config, lowest, s.end)

    def check_cut(self, cid: int, k: int) -> None:
        s = self.server
        if k >= s.end:
            raise ValueError(
                f"client {cid}: cut layer {k} not in [1, {s.end - 1}]: a "
                f"U-shaped split keeps blocks [{s.end}, {s.num_layers}) on the "
                f"client (tail_layers={self.tail_layers}) and at least one on "
                "the server"
            )

    def held(self, k: int) -> str:
        s = self.server
        tail = f" and [{s.end}, {s.num_layers})" if k < s.num_layers else ""
        return f"[0, {k})" + tail

    def smashed(self, msg: SmashedData) -> TailInput:
        """First leg: blocks [k, L - tail_layers) forward; the graph waits
        for the client's :class:`TailGradient`."""
        s = self.server
        t0 = time.perf_counter()
        hidden = received(s, msg)  # (B, T, H)
        planned = s.planned[msg.client_id]
        with s.part.cut_at(planned.cut):
            out = s.part.middle_forward(hidden, msg.attention_mask, msg.position_ids)
        planned.pending = (msg.step, msg.micro, hidden, out)
        values, scale = compress(out.detach(), s.compression)
        return TailInput(
            client_id=msg.client_id,
            step=msg.step,
            micro=msg.micro,
            server_seconds=time.perf_counter() - t0,
            hidden=values,
            hidden_scale=scale,
        )

    def tail_gradient(self, msg: TailGradient) -> Gradient:
        """Second leg: the client's gradient back through blocks
        [k, L - tail_layers); the reply is the gradient at the first cut."""
        s = self.server
        t0 = time.perf_counter()
        cid = msg.client_id
        planned = s.planned[cid]
        if planned.pending is None:
            raise _no_tail_awaited(cid, planned.next)
        step, micro, hidden, out = planned.pending
        if (msg.step, msg.micro) != (step, micro):
            raise OutOfOrder(
                f"expected the TailGradient of step {step} micro {micro}, got "
                f"step {msg.step} micro {msg.micro}"
            )
        if tuple(msg.grad.shape) != tuple(out.shape):
            raise Malformed(
                f"grad must be {tuple(out.shape)} like the TailInput, got "
                f"{tuple(msg.grad.shape)}"
            )
        grad = decompress(msg.grad, msg.grad_scale, out.dtype)
        if not torch.isfinite(grad).all():
            raise Malformed("grad has non-finite values")
        # other clients' forwards since this one's switched the active adapter,
        # and PEFT leaves an inactive adapter's weights requires_grad=False:
        # autograd would then drop their gradients
        s.adapters.activate((s.adapters.name_of(cid),))
        if grad.any():  # a micro-batch without loss: no gradient, as in vanilla
            out.backward(grad)
        planned.pending = None
        values, scale = stepped(s, cid, step, micro, hidden)
        return Gradient(
            client_id=cid,
            step=step,
            micro=micro,
            loss=0.0,  # the client computed it
            tokens=0,
            server_seconds=time.perf_counter() - t0,
            grad=values,
            grad_scale=scale,
        )
