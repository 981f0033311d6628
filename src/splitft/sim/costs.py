"""What split training costs, in seconds and bytes, for any cut.

:class:`CostModel` turns what the probe (:mod:`splitft.sim.probe`) measured
on the real model into seconds and bytes for any cut: linear in the token
slots a batch holds (padding included), in the number of blocks, and for the
head and the loss in the labelled tokens (the head runs only where labels
are). Predictions of a round are :mod:`splitft.sim.predict`; the planner's
running beliefs :mod:`splitft.sim.estimator`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from splitft import runs


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
    # activations a checkpointed block saves per slot (its input; 0: not
    # probed, then the fp32 hidden state)
    act_block_ckpt: float = 0.0
    # the run's client.checkpointing=blocks, which the client's prices follow
    # (set from the config, not measured)
    client_checkpointing: bool = False
    # a client's block per slot in its own format (client.base_dtype) when it
    # is not the server's (0: block_s); the memory fields above are measured
    # in the client's format
    client_block_s: float = 0.0
    client_base: str = "float32"  # the client.base_dtype the probe measured
    server_base: str = "float32"  # the model.server_dtype the probe measured

    @property
    def client_block(self) -> float:
        """A block's forward and backward per slot on a client."""
        return self.client_block_s or self.block_s

    # ------------------------------------------------------------ compute
    # A micro-batch is ``slots`` token slots of which ``labelled`` carry a
    # label. ``tail``: a U-shaped split's tail_layers (0: vanilla), whose
    # blocks, final norm, head and loss run on the client after the server
    def head_seconds(self, slots: float, labelled: float) -> float:
        """The final norm, the head and the loss, forward and backward."""
        return slots * self.norm_s + labelled * self.head_s

    def client_seconds(
        self, k: int, slots: float, labelled: float, recompute: bool = True
    ) -> float:
        """Client compute of one micro-batch at cut ``k`` (k = L: everything),
        without a U-shaped tail (:meth:`tail_seconds`); ``recompute``: with
        the checkpointed blocks' second forward (:meth:`recompute_seconds`)."""
        blocks = min(k, self.num_layers)
        again = self.recompute_seconds(blocks, slots) if recompute else 0.0
        if k >= self.num_layers:
            blocks_s = slots * (self.embed_s + self.num_layers * self.client_block)
            return blocks_s + self.head_seconds(slots, labelled) + again
        return slots * (self.embed_s + k * self.client_block) + again

    def recompute_seconds(self, blocks: int, slots: float) -> float:
        """``client.checkpointing=blocks``: the forward of the client's
        ``blocks`` run again in the backward pass (0 without checkpointing)."""
        if not self.client_checkpointing:
            return 0.0
        return slots * blocks * self.client_block * self.forward_share

    def tail_seconds(self, tail: int, slots: float, labelled: float) -> float:
        """A U-shaped client's tail, forward and backward (0 without one)."""
        if not tail:
            return 0.0
        head = self.head_seconds(slots, labelled)
        blocks = slots * tail * self.client_block
        return blocks + head + self.recompute_seconds(tail, slots)

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
        (each request's slots as the batch lays them out,
        :func:`splitft.split.engine.slots`): their serial time over
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
        if self.client_checkpointing:  # each keeps its input; one at a time
            kept = self.act_block_ckpt or self.hidden_size * 4.0
            saved = held * kept + self.act_block  # the block being recomputed
        else:
            saved = held * self.act_block
        mem = self.embed_bytes + held * blocks + slots * (self.act_embed + saved)
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
