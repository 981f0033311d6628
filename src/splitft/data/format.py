"""Turn prompt/answer pairs into token ids with loss only on the answer."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from splitft.data.bigbench import Example, fetch_bigbench, load_task, split_examples

IGNORE_INDEX = -100  # label value that torch's cross-entropy skips

_FEATURES = datasets.Features(
    {
        "input_ids": datasets.List(datasets.Value("int64")),
        "labels": datasets.List(datasets.Value("int64")),
        "task": datasets.Value("string"),
        "prompt": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "length": datasets.Value("int64"),
    }
)


def encode_example(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    answer: str,
    max_length: int,
    system: str | None = None,
) -> dict[str, list[int]]:
    """Tokenize one exchange; labels are ``-100`` on the prompt, ids on the answer.

    With a chat template the answer part is everything the template renders after
    the generation prompt, so the end-of-turn token(s) are learned too. Without
    one the text is ``prompt + "\\n" + answer + eos``. Prompt and answer are
    tokenized separately, exactly as the model sees them at generation time.
    Too long: the prompt loses tokens on the left; an answer longer than
    ``max_length`` on its own keeps only its head (and no prompt).

    Raises:
        ValueError: the template is not prefix-stable, or no answer token fits.
    """
    prompt_text, answer_text = _render(tokenizer, prompt, answer, system)
    prompt_ids = _tokenize(tokenizer, prompt_text)
    answer_ids = _tokenize(tokenizer, answer_text)
    if not answer_ids or max_length < 1:
        raise ValueError(
            f"no answer token fits (answer {answer!r}, max_length {max_length})"
        )
    answer_ids = answer_ids[:max_length]
    keep = max_length - len(answer_ids)
    prompt_ids = prompt_ids[max(0, len(prompt_ids) - keep) :] if keep else []
    return {
        "input_ids": prompt_ids + answer_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids,
    }


def collate(batch: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encoded examples into int64 ``(B, T)`` tensors.

    Returns ``input_ids``, ``labels`` (``-100`` on padding), ``attention_mask``
    and ``position_ids`` (``arange`` per row; padded positions are masked anyway).
    """
    width = max(len(row["input_ids"]) for row in batch)
    shape = (len(batch), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.int64)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.int64)
    attention_mask = torch.zeros(shape, dtype=torch.int64)
    for i, row in enumerate(batch):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.as_tensor(row["input_ids"], dtype=torch.int64)
        labels[i, :n] = torch.as_tensor(row["labels"], dtype=torch.int64)
        attention_mask[i, :n] = 1
    position_ids = torch.arange(width, dtype=torch.int64).expand(shape).clone()
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
    }


def build_datasets(
    tasks: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    cache_dir: Path,
    max_length: int,
    eval_size: int,
    seed: int,
    max_train_per_task: int | None,
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Fetch, load, split and encode BIG-bench tasks.

    Args:
        max_train_per_task: keep at most this many train examples per task; the
            kept ones are the first of the task's seeded shuffle, so deterministic.

    Returns:
        ``(train, eval)`` datasets with columns input_ids, labels, task, prompt,
        answer and length (token count).
    """
    if max_train_per_task is not None and max_train_per_task < 0:
        raise ValueError(f"max_train_per_task must be >= 0, got {max_train_per_task}")
    fetch_bigbench(tasks, cache_dir)
    train: list[Example] = []
    held: list[Example] = []
    for task in tasks:
        task_train, task_eval = split_examples(
            load_task(task, cache_dir), eval_size, seed
        )
        train += task_train[:max_train_per_task]  # [:None] keeps all
        held += task_eval
    return (
        _to_dataset(train, tokenizer, max_length),
        _to_dataset(held, tokenizer, max_length),
    )


def _render(
    tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str, system: str | None
) -> tuple[str, str]:
    """Return the prompt text and the answer text that follows it."""
    if not tokenizer.chat_template:
        head = f"{system}\n" if system else ""
        return f"{head}{prompt}\n", answer + (tokenizer.eos_token or "")
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    # tokenize=False: transformers 5 may return a BatchEncoding otherwise.
    prompt_text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    full_text = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": answer}], tokenize=False
    )
    if not full_text.startswith(prompt_text):
        raise ValueError(
            "chat template is not prefix-stable: the rendered conversation does not "
            "start with the rendered generation prompt, so the prompt tokens cannot "
            "be masked reliably"
        )
    return prompt_text, full_text[len(prompt_text) :]


def _tokenize(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # The template already wrote any BOS/special tokens into the text.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _to_dataset(
    examples: list[Example], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> datasets.Dataset:
    columns: dict[str, list] = {name: [] for name in _FEATURES}
    for ex in examples:
        enc = encode_example(tokenizer, ex.prompt, ex.answer, max_length)
        columns["input_ids"].append(enc["input_ids"])
        columns["labels"].append(enc["labels"])
        columns["task"].append(ex.task)
        columns["prompt"].append(ex.prompt)
        columns["answer"].append(ex.answer)
        columns["length"].append(len(enc["input_ids"]))
    return datasets.Dataset.from_dict(columns, features=_FEATURES)
