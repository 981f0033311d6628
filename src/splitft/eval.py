"""Held-out evaluation of the global model (all aggregated adapters merged in).

Loss, perplexity and next-token accuracy on response tokens, and task accuracy:
exact match of greedy generation, and multiple choice by log-likelihood.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from splitft.data import collate
from splitft.data.format import encode_example, render_prompt
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


def normalize_answer(text: str) -> str:
    """Case, surrounding blanks and a final full stop do not count."""
    return text.strip().lower().rstrip(".").strip()


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r) :] = torch.tensor(r)
        mask[i, T - len(r) :] = 1
    return ids, mask


@torch.no_grad()
def exact_match(
    part: ModelPart,
    tokenizer,
    records: Sequence[dict],
    max_new_tokens: int,
    batch_size: int,
) -> list[bool]:
    """Greedy-generate an answer to each prompt; is it the reference answer?"""
    part.model.eval()
    device = next(part.model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    hits = []
    for i in range(0, len(records), batch_size):
        chunk = records[i : i + batch_size]
        prompts = [
            tokenizer(render_prompt(tokenizer, r["prompt"]), add_special_tokens=False)[
                "input_ids"
            ]
            for r in chunk
        ]
        ids, mask = _left_pad(prompts, pad)
        out = part.model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )[:, ids.shape[1] :]
        for r, gen in zip(chunk, out, strict=True):
            text = tokenizer.decode(gen, skip_special_tokens=True)
            hits.append(normalize_answer(text) == normalize_answer(r["answer"]))
    return hits


@torch.no_grad()
def choice_loglik(
    part: ModelPart,
    tokenizer,
    prompt: str,
    choices: Sequence[str],
    max_length: int,
    pad_token_id: int,
) -> torch.Tensor:
    """Summed log-likelihood of each choice as the answer to ``prompt``: ``(C,)``."""
    rows = [encode_example(tokenizer, prompt, c, max_length) for c in choices]
    device = next(part.model.parameters()).device
    b = {k: v.to(device) for k, v in collate(rows, pad_token_id).items()}
    logits = part.model(
        input_ids=b["input_ids"],
        attention_mask=b["attention_mask"],
        position_ids=b["position_ids"],
        use_cache=False,
    ).logits[:, :-1]  # (C, T-1, V)
    target = b["labels"][:, 1:]  # (C, T-1)
    mask = target != -100
    logp = torch.log_softmax(logits.float(), -1)
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


def task_accuracy(
    part: ModelPart,
    tokenizer,
    records: Sequence[dict],
    max_new_tokens: int,
    max_length: int,
    batch_size: int,
) -> dict[str, dict[str, float]]:
    """Per task: exact match of greedy generation, and multiple-choice accuracy
    by log-likelihood where the examples have choices.

    Returns:
        ``{task: {"exact_match": ..., "mc_accuracy": ... (if any), "n": ...}}``
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    hits = exact_match(part, tokenizer, records, max_new_tokens, batch_size)
    out: dict[str, dict[str, list]] = {}
    for r, hit in zip(records, hits, strict=True):
        scores = out.setdefault(r["task"], {"exact_match": [], "mc_accuracy": []})
        scores["exact_match"].append(hit)
        if r.get("choices"):
            ll = choice_loglik(
                part, tokenizer, r["prompt"], r["choices"], max_length, pad
            )
            scores["mc_accuracy"].append(int(ll.argmax()) == r["correct"])
    return {
        task: {
            "n": len(s["exact_match"]),
            **{k: sum(v) / len(v) for k, v in s.items() if v},
        }
        for task, s in out.items()
    }
