"""Held-out evaluation of the global model (all aggregated adapters merged in)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from splitft.data import collate
from splitft.models.parts import ModelPart


@torch.no_grad()
def evaluate(
    part: ModelPart, examples: Sequence[dict], batch_size: int, pad_token_id: int
) -> dict[str, float]:
    """Token-weighted loss, perplexity and next-token accuracy on response tokens.

    Labels are shifted exactly as the loss shifts them: the logits at position
    t predict the label at t + 1.
    """
    part.model.eval()
    device = next(part.model.parameters()).device
    loss_sum, tokens, correct = 0.0, 0, 0
    for i in range(0, len(examples), batch_size):
        b = {
            k: v.to(device)
            for k, v in collate(examples[i : i + batch_size], pad_token_id).items()
        }
        logits = part.model(
            input_ids=b["input_ids"],
            attention_mask=b["attention_mask"],
            position_ids=b["position_ids"],
            use_cache=False,
        ).logits[:, :-1]  # (B, T-1, V)
        target = b["labels"][:, 1:]  # (B, T-1)
        mask = target != -100
        loss = torch.nn.functional.cross_entropy(
            logits[mask].float(), target[mask], reduction="sum"
        )
        loss_sum += float(loss)
        tokens += int(mask.sum())
        correct += int((logits.argmax(-1)[mask] == target[mask]).sum())
    mean = loss_sum / max(tokens, 1)
    return {
        "eval_loss": mean,
        "eval_ppl": math.exp(min(mean, 50.0)),
        "eval_token_acc": correct / max(tokens, 1),
        "eval_tokens": tokens,
    }
