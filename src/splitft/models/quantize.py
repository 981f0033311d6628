"""The client's frozen base in a smaller format (``client.base_dtype``).

- ``float32``: the weights as the model folder stores them (today's client).
- ``bfloat16``: every frozen tensor in bfloat16, computed in bfloat16.
- ``int8``: the blocks' linear layers in 8-bit (LLM.int8's row-wise absmax,
  bitsandbytes ``Linear8bitLt``), the rest (embeddings, norms, a head) in
  bfloat16; computed in bfloat16.
- ``nf4``: the blocks' linear layers in 4-bit NormalFloat with double
  quantization (QLoRA, bitsandbytes ``Linear4bit``), the rest in bfloat16;
  computed in bfloat16.

LoRA weights, their gradients and AdamW's state stay float32 in every format
(:func:`splitft.lora.inject`). As transformers' ``BitsAndBytesConfig`` does, a
weight is cast to the compute dtype, then quantized, once when the part is
built (no second copy of the model); the embeddings and a head stay
unquantized (QLoRA's choice: a lookup and the loss's logits gain little and
lose precision). bitsandbytes is the library QLoRA and PEFT use; it runs on
CPU (its own kernels, 0.48+) and CUDA, and PEFT wraps its layers with LoRA
layers of its own (``peft.tuners.lora.bnb``). Measured against torchao and
HQQ for issue 21: docs/benchmarks.md, client memory.
"""

from __future__ import annotations

import torch
from torch import nn

from splitft.config import BASE_DTYPES

QUANTIZED = ("int8", "nf4")


def compute_dtype(base: str) -> torch.dtype:
    """The dtype a client with ``client.base_dtype=base`` computes in."""
    if base not in BASE_DTYPES:
        raise ValueError(f"base_dtype {base!r} not in {BASE_DTYPES}")
    return torch.float32 if base == "float32" else torch.bfloat16


def quantize_linear(
    weight: torch.Tensor,  # (out, in), as nn.Linear holds it
    bias: torch.Tensor | None,  # (out,)
    base: str,
) -> nn.Module:
    """A frozen bitsandbytes linear layer holding ``weight`` in ``base``
    (``int8`` or ``nf4``) on ``weight``'s device, computing in bfloat16."""
    import bitsandbytes as bnb  # only a quantized client needs it here

    out_features, in_features = weight.shape
    w = weight.detach().to(torch.bfloat16).contiguous()
    with torch.device("meta"):  # no throwaway fp32 weight
        if base == "int8":
            layer = bnb.nn.Linear8bitLt(
                in_features,
                out_features,
                bias=bias is not None,
                has_fp16_weights=False,
                threshold=0.0,
            )
        elif base == "nf4":
            layer = bnb.nn.Linear4bit(
                in_features,
                out_features,
                bias=bias is not None,
                compute_dtype=torch.bfloat16,
                compress_statistics=True,
                quant_type="nf4",
            )
        else:
            raise ValueError(f"base_dtype {base!r} is not quantized: {QUANTIZED}")
    if base == "int8":
        param = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    else:
        param = bnb.nn.Params4bit(
            w,
            requires_grad=False,
            compress_statistics=True,
            quant_type="nf4",
            module=layer,
        )
    layer.weight = param._quantize(w.device)
    if base == "nf4":
        # bitsandbytes repacks a 4-bit weight for its CPU inference kernel on
        # the first no-grad forward in eval mode (in place): a layer shared
        # by several clients' parts keeps one layout
        layer.support_avx512bf16_for_cpu = False
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(torch.bfloat16), requires_grad=False)
    return layer


def is_linear(module: nn.Module) -> bool:
    """A block's dense layer: ``nn.Linear``, or GPT-2's ``Conv1D`` (its
    weight transposed: ``(in, out)``)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def mark_quantized(model: nn.Module, base: str) -> None:
    """What PEFT reads to wrap bitsandbytes layers with its own LoRA layers
    (transformers sets the same flags when it quantizes at load)."""
    model.is_loaded_in_8bit = base == "int8"
    model.is_loaded_in_4bit = base == "nf4"
