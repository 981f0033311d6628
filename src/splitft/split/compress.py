"""Compression of the activations and their gradients on the wire.

``transport.compression`` (the client's smashed data) and
``transport.grad_compression`` (the server's gradients), each one of:

- ``none``: the tensor as computed (fp32 on CPU);
- ``bf16``: bfloat16, half the bytes;
- ``int8``: one int8 per value and one fp32 scale per token (its absmax over
  the hidden size / 127), so a (B, T, H) tensor costs B*T*(H + 4) bytes
  against 4*B*T*H: 0.252 of fp32 at H = 576, the scales included.

Everything else on the wire (adapters, labels, masks) stays lossless.
"""

from __future__ import annotations

import torch

from splitft.config import COMPRESSION as CODECS


def compress(t: torch.Tensor, how: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(values, scale)`` to send for ``t`` (B, T, H); scale only for int8."""
    if how == "none":
        return t, None
    if how == "bf16":
        return t.to(torch.bfloat16), None
    if how == "int8":
        t = t.float()
        scale = t.abs().amax(dim=-1, keepdim=True) / 127.0  # (B, T, 1)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(t / safe).clamp_(-127, 127).to(torch.int8)
        return q, scale
    raise ValueError(f"compression {how!r} is not allowed: one of {CODECS}")


def decompress(
    values: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """The tensor :func:`compress` sent, in ``dtype``."""
    if values.dtype == torch.int8:
        return values.to(dtype) * scale.to(dtype)
    return values.to(dtype)
