"""Per-architecture facts needed to cut a Hugging Face causal LM in two.

Each supported family is described by data, not code: where its blocks live,
which modules belong to the embedding stage, which ones the server must
neutralise because the client already applied them, and the default LoRA
targets. ``parts.py`` does the cutting for all of them the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


class PassThrough(nn.Module):
    """Stands in for a block this side does not hold: returns its input."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


class ZeroPositions(nn.Module):
    """Replaces learned position embeddings on the server: the client added them.

    The zeros are integers, so that adding them leaves the hidden state in
    its own precision (a bfloat16 server's stays bfloat16).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        shape = (*position_ids.shape, self.dim)
        return torch.zeros(shape, dtype=torch.uint8, device=position_ids.device)


@dataclass(frozen=True)
class ArchSpec:
    """How one model family is laid out (attribute names as in transformers)."""

    family: str
    base: str  # attribute of the CausalLM holding the decoder, e.g. "model"
    blocks: str  # attribute of the decoder holding the nn.ModuleList of blocks
    embeddings: tuple[str, ...]  # decoder attributes run before block 0
    final_norm: str  # decoder attribute run after the last block
    head: str = "lm_head"
    # decoder attributes whose buffers are not in the checkpoint: rebuilt
    # on the real device as ``type(module)(config=config)`` after loading
    rebuild: tuple[str, ...] = ()
    # decoder attributes the server replaces because the client applied them
    server_neutral: dict[str, str] = field(default_factory=dict)
    target_modules: tuple[str, ...] = ()
    fan_in_fan_out: bool = False  # GPT-2 stores Linear weights transposed (Conv1D)

    def block_prefix(self, i: int) -> str:
        return f"{self.base}.{self.blocks}.{i}."

    @property
    def tied_source(self) -> str:
        return f"{self.base}.{self.embeddings[0]}.weight"


_LLAMA_LIKE = dict(
    base="model",
    blocks="layers",
    embeddings=("embed_tokens",),
    final_norm="norm",
    rebuild=("rotary_emb",),
    target_modules=(
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ),
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec(family="llama", **_LLAMA_LIKE),
    "mistral": ArchSpec(family="mistral", **_LLAMA_LIKE),
    "qwen2": ArchSpec(family="qwen2", **_LLAMA_LIKE),
    "gpt2": ArchSpec(
        family="gpt2",
        base="transformer",
        blocks="h",
        embeddings=("wte", "wpe"),
        final_norm="ln_f",
        server_neutral={"wpe": "zero_positions", "drop": "identity"},
        target_modules=("c_attn", "c_proj", "c_fc"),
        fan_in_fan_out=True,
    ),
}


class UnsupportedArchitecture(ValueError):
    pass


def spec_for(model_type: str) -> ArchSpec:
    """The layout of ``config.model_type``.

    Raises:
        UnsupportedArchitecture: listing the supported model types.
    """
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedArchitecture(
            f"model_type {model_type!r} is not supported; supported: {supported}"
        ) from None
