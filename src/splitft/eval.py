"""Held-out evaluation of the global model (all aggregated adapters merged in).

Loss, perplexity and next-token accuracy on response tokens, and task accuracy:
exact match of greedy generation, and multiple choice by log-likelihood.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from splitft import lora, runs
from splitft.config import RunConfig
from splitft.data import collate
from splitft.data.federated import TOKENS
from splitft.data.format import encode_example, pad_token_id, render_prompt
from splitft.models.parts import ModelPart, WeightStore, full_part


def _labelled_logits(
    part: ModelPart, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits only where a shifted label exists: ``(N, V)``, targets ``(N,)``
    and the ``(B, T-1)`` mask that chose them (:meth:`ModelPart.head_at_labels`:
    with a 49k vocabulary the full head is most of an eval forward's cost)."""
    # the full part's decoder ends with the final norm
    final = part.client_forward(
        batch["input_ids"], batch["attention_mask"], batch["position_ids"]
    )
    return part.head_at_labels(final, batch["labels"])


def _batches(part: ModelPart, rows: Sequence[dict], batch_size: int, pad: int):
    device = next(part.model.parameters()).device
    for i in range(0, len(rows), batch_size):
        b = collate(rows[i : i + batch_size], pad)
        yield {k: v.to(device) for k, v in b.items()}


@torch.no_grad()
def evaluate(
    part: ModelPart, examples: Sequence[dict], batch_size: int, pad_token_id: int
) -> dict[str, float]:
    """Token-weighted loss, perplexity and next-token accuracy on response tokens.

    Labels are shifted exactly as the loss shifts them: the logits at position
    t predict the label at t + 1.
    """
    part.model.eval()
    loss_sum, tokens, correct = 0.0, 0, 0
    for b in _batches(part, examples, batch_size, pad_token_id):
        logits, target, _ = _labelled_logits(part, b)
        loss_sum += float(
            torch.nn.functional.cross_entropy(logits, target, reduction="sum")
        )
        tokens += len(target)
        correct += int((logits.argmax(-1) == target).sum())
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
    pad = pad_token_id(tokenizer)
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
def sequence_loglik(
    part: ModelPart, rows: Sequence[dict], batch_size: int, pad_token_id: int
) -> list[float]:
    """Summed log-likelihood of the labelled tokens of each encoded row.

    Rows are batched in order of length so little compute goes to padding.
    """
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    ordered = [rows[j] for j in order]
    out = [0.0] * len(rows)
    done = 0
    for b in _batches(part, ordered, batch_size, pad_token_id):
        logits, target, mask = _labelled_logits(part, b)
        picked = torch.log_softmax(logits, -1).gather(-1, target[:, None])[:, 0]
        row_of = mask.nonzero()[:, 0]  # which row of the batch each token is in
        sums = torch.zeros(len(mask)).index_add_(0, row_of.cpu(), picked.cpu())
        for k, ll in enumerate(sums.tolist()):
            out[order[done + k]] = ll
        done += len(mask)
    return out


def multiple_choice(
    part: ModelPart,
    tokenizer,
    records: Sequence[dict],
    max_length: int,
    batch_size: int,
) -> list[bool]:
    """For records with choices: is the most likely choice the correct one?

    Each choice is scored as the assistant's answer to the prompt (summed
    log-likelihood of its tokens and the end-of-turn), as BIG-bench scores
    multiple choice.
    """
    pad = pad_token_id(tokenizer)
    rows, owner = [], []
    for n, r in enumerate(records):
        for choice in r["choices"]:
            rows.append(encode_example(tokenizer, r["prompt"], choice, max_length))
            owner.append(n)
    scores = sequence_loglik(part, rows, batch_size, pad)
    best: dict[int, tuple[float, int]] = {}
    for n, choice_idx, ll in zip(owner, _positions(owner), scores, strict=True):
        if n not in best or ll > best[n][0]:
            best[n] = (ll, choice_idx)
    return [best[n][1] == r["correct"] for n, r in enumerate(records)]


def _positions(owner: list[int]) -> list[int]:
    """The index of each row within its record's choices."""
    seen: dict[int, int] = {}
    out = []
    for n in owner:
        out.append(seen.get(n, 0))
        seen[n] = out[-1] + 1
    return out


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
        ``{task: {"n": ..., "exact_match": ..., "mc_accuracy": ... (if any)}}``
    """
    hits = exact_match(part, tokenizer, records, max_new_tokens, batch_size)
    with_choices = [r for r in records if r.get("choices")]
    mc = multiple_choice(part, tokenizer, with_choices, max_length, batch_size * 2)
    out: dict[str, dict[str, list]] = {}
    for r, hit in zip(records, hits, strict=True):
        out.setdefault(r["task"], {"exact_match": [], "mc_accuracy": []})
        out[r["task"]]["exact_match"].append(hit)
    for r, right in zip(with_choices, mc, strict=True):
        out[r["task"]]["mc_accuracy"].append(right)
    return {
        task: {
            "n": len(s["exact_match"]),
            **{k: sum(v) / len(v) for k, v in s.items() if v},
        }
        for task, s in out.items()
    }


def first_per_task(held_out, limit: int) -> list[dict]:
    """The first ``limit`` held-out examples of each task (the split is seeded)."""
    seen: dict[str, int] = {}
    keep = []
    for row in held_out.to_list():
        if seen.get(row["task"], 0) < limit:
            seen[row["task"]] = seen.get(row["task"], 0) + 1
            keep.append(row)
    return keep


class GlobalEvaluator:
    """The unsplit model with the global adapter loaded: the held-out loss
    every time, task accuracy (exact match, multiple choice) when due."""

    def __init__(
        self,
        store: WeightStore,
        model_config,
        cfg: RunConfig,
        tokenizer,
        held_out,
    ) -> None:
        self.cfg, self.tokenizer = cfg, tokenizer
        self.pad_id = pad_token_id(tokenizer)
        self.examples = held_out.select_columns(TOKENS).to_list()
        columns = ["task", "prompt", "answer", "choices", "correct"]
        self.accuracy_examples = first_per_task(
            held_out.select_columns(columns), cfg.eval.accuracy_examples
        )
        self.part = full_part(store, model_config)
        L = model_config.num_hidden_layers
        ranks = lora.layer_ranks(range(L), cfg.lora, cut=False)
        lora.inject(self.part.model, self.part.spec, cfg.lora, ranks)

    def accuracy_due(self, rnd: int) -> bool:
        """Task accuracy after round ``rnd`` (0: the base model): first, last
        and every ``eval.accuracy_every`` rounds."""
        e, last = self.cfg.eval, self.cfg.federation.rounds
        if not e.accuracy:
            return False
        return rnd in (0, last) or (
            e.accuracy_every > 0 and rnd % e.accuracy_every == 0
        )

    def __call__(self, global_state, accuracy: bool) -> dict:
        runs.fault("eval")
        lora.load_adapter_state(self.part.model, global_state)
        bs = self.cfg.train.batch_size * 2
        result: dict = evaluate(self.part, self.examples, bs, self.pad_id)
        if accuracy:
            per_task = task_accuracy(
                self.part,
                self.tokenizer,
                self.accuracy_examples,
                self.cfg.eval.max_new_tokens,
                self.cfg.data.max_length,
                bs,
            )
            result["task_accuracy"] = per_task
            for metric in ("exact_match", "mc_accuracy"):
                values = [t[metric] for t in per_task.values() if metric in t]
                if values:  # macro average over the tasks that have it
                    result[metric] = sum(values) / len(values)
        return result
