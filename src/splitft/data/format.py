"""Turn examples and conversations into token ids, with loss only where it teaches.

Single exchanges (BIG-bench, Alpaca-style files) learn the answer; conversations
(chat files) learn the assistant turns. Either can learn every token instead
(``loss_on="all"``). Sequences longer than ``max_length`` are truncated, never
packed: one example per row.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from splitft.data.bigbench import Example, fetch_bigbench, load_task, split_examples
from splitft.data.generated import generate
from splitft.data.local import FORMATS, Conversation, check_messages, load_local

IGNORE_INDEX = -100  # label value that torch's cross-entropy skips
LOSS_ON = ("response", "all")  # encode_example and build_datasets
CONVERSATION_LOSS_ON = ("assistant", "all")  # encode_conversation

_FEATURES = datasets.Features(
    {
        "input_ids": datasets.List(datasets.Value("int64")),
        "labels": datasets.List(datasets.Value("int64")),
        "task": datasets.Value("string"),
        "prompt": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "length": datasets.Value("int64"),
        "choices": datasets.List(datasets.Value("string")),
        "correct": datasets.Value("int64"),
    }
)


def render_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt: str, system: str | None = None
) -> str:
    """The text the model reads before it answers ``prompt``.

    The chat template with the generation prompt, or ``prompt + "\\n"`` without a
    template. :func:`encode_example` tokenizes exactly this text as its prompt,
    so generating or scoring choices after it matches training.
    """
    if not tokenizer.chat_template:
        head = f"{system}\n" if system else ""
        return f"{head}{prompt}\n"
    return _apply(tokenizer, _prompt_messages(prompt, system), generation=True)


def encode_example(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    answer: str,
    max_length: int,
    system: str | None = None,
    loss_on: str = "response",
) -> dict[str, list[int]]:
    """Tokenize one exchange; labels are ``-100`` on the prompt, ids on the answer.

    With a chat template the answer part is everything the template renders after
    the generation prompt, so the end-of-turn token(s) are learned too. Without
    one the text is ``prompt + "\\n" + answer + eos``. Prompt and answer are
    tokenized separately, exactly as the model sees them at generation time.
    Too long: the prompt loses tokens on the left; an answer longer than
    ``max_length`` on its own keeps only its head (and no prompt).

    Args:
        loss_on: ``"response"`` (labels on the answer only) or ``"all"`` (labels
            on every token; the ids and truncation are the same).

    Raises:
        ValueError: bad ``loss_on``, the template is not prefix-stable, or no
            answer token fits.
    """
    _check_loss_on(loss_on, LOSS_ON)
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
    input_ids = prompt_ids + answer_ids
    if loss_on == "all":
        return {"input_ids": input_ids, "labels": list(input_ids)}
    return {
        "input_ids": input_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids,
    }


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[dict[str, str]],
    max_length: int,
    loss_on: str = "assistant",
) -> dict[str, list[int]]:
    """Tokenize a multi-turn conversation; labels on the assistant turns.

    With a chat template, an assistant turn is the text the template adds after
    the generation prompt for ``messages[:i]`` up to the end of
    ``messages[:i + 1]``, so its end-of-turn token(s) are learned. Without one
    the text is ``"role: content\\n"`` per message plus eos; an assistant turn
    learns ``" content\\n"`` after its ``"assistant:"`` header, and the final
    eos is learned when the conversation ends with an assistant turn. Pieces are
    tokenized one by one, as the model sees them when it generates each turn.
    An assistant message that opens the conversation answers nothing (and a
    template cannot render an empty prompt), so it is context, not learned.
    Too long: the oldest tokens are dropped (the tail is kept).

    Args:
        messages: ``{"role": "system"|"user"|"assistant", "content": str}``
            dicts, at least one from the assistant.
        loss_on: ``"assistant"`` (labels on assistant turns only) or ``"all"``.

    Raises:
        ValueError: bad ``loss_on`` or messages, the template is not
            prefix-stable, or no labelled token survives truncation.
    """
    _check_loss_on(loss_on, CONVERSATION_LOSS_ON)
    try:
        check_messages(messages)
    except ValueError as err:
        raise ValueError(f"messages: {err}") from None
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    input_ids: list[int] = []
    labels: list[int] = []
    for text, learn in _conversation_pieces(tokenizer, messages):
        ids = _tokenize(tokenizer, text)
        input_ids += ids
        labels += ids if learn or loss_on == "all" else [IGNORE_INDEX] * len(ids)
    if all(label == IGNORE_INDEX for label in labels):
        raise ValueError(
            "no assistant turn to learn: an assistant message that opens the "
            "conversation is context"
        )
    total = len(input_ids)
    input_ids, labels = input_ids[-max_length:], labels[-max_length:]
    if all(label == IGNORE_INDEX for label in labels):
        raise ValueError(
            f"no assistant token fits: the last {len(labels)} of {total} tokens "
            f"(max_length {max_length}) hold no assistant turn"
        )
    return {"input_ids": input_ids, "labels": labels}


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id to pad with: the pad token, else end-of-sequence, else 0.

    Padded positions are masked and carry no label, so the value only has to
    be a valid id.
    """
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return tid
    return 0


def collate(batch: list[dict], pad_token_id: int) -> dict[str, torch.Tensor | None]:
    """Right-pad encoded examples into int64 ``(B, T)`` tensors.

    Returns ``input_ids``, ``labels`` (``-100`` on padding), ``attention_mask``
    and ``position_ids`` (``arange`` per row; padded positions are masked anyway).
    Packed rows (with their own ``position_ids``, see ``packing.py``) get
    ``attention_mask=None``: the padding then restarts at position 0 and forms
    a block of its own, and the model masks by the position ids.
    """
    packed = "position_ids" in batch[0]
    width = max(len(row["input_ids"]) for row in batch)
    shape = (len(batch), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.int64)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.int64)
    attention_mask = torch.zeros(shape, dtype=torch.int64)
    position_ids = torch.arange(width, dtype=torch.int64).expand(shape).clone()
    for i, row in enumerate(batch):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.as_tensor(row["input_ids"], dtype=torch.int64)
        labels[i, :n] = torch.as_tensor(row["labels"], dtype=torch.int64)
        attention_mask[i, :n] = 1
        if packed:
            position_ids[i, :n] = torch.as_tensor(
                row["position_ids"], dtype=torch.int64
            )
            position_ids[i, n:] = torch.arange(width - n)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": None if packed else attention_mask,
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
    *,
    source: str | Path = "generated",
    data_format: str = "auto",
    loss_on: str = "response",
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Load, split and encode generated tasks, BIG-bench tasks or one local file.

    A local file is one task named after its stem, split exactly like a
    generated or BIG-bench task (``split_examples``: seeded shuffle,
    ``eval_size`` held out, at most half). Alpaca rows are encoded with
    :func:`encode_example`, chat rows with :func:`encode_conversation`.

    Args:
        tasks: generated or BIG-bench task names; ignored for a local ``source``.
        cache_dir: BIG-bench cache; local files keep their Arrow copy in
            ``cache_dir/datasets``.
        max_train_per_task: tasks only (not a local file): keep at most this
            many train examples per task, the first of the task's seeded
            shuffle (deterministic).
        source: ``"generated"`` (:mod:`splitft.data.generated`), ``"bigbench"``
            or the path of a ``.json``/``.jsonl``/``.csv``/``.parquet`` file
            (see :func:`~splitft.data.local.load_local`).
        data_format: local files only: ``"alpaca"``, ``"chat"`` or ``"auto"``.
        loss_on: ``"response"`` (answer / assistant turns) or ``"all"`` tokens.

    Returns:
        ``(train, eval)`` datasets with columns input_ids, labels, task, prompt,
        answer, length (token count), choices (``[]`` when none) and correct
        (index into choices, ``-1`` when none). For a chat record ``answer`` is
        the last assistant turn's content and ``prompt`` what precedes it: the
        user message's content when that is all, else the earlier turns as
        ``role: content`` lines. ``render_prompt(prompt)`` thus reproduces the
        training context exactly only for a lone user turn (no system message);
        otherwise exact-match evaluation sees that transcript as one user turn.

    Raises:
        ValueError: a bad argument, file or record (see the loaders).
        FileNotFoundError: the local file does not exist.
    """
    if max_train_per_task is not None and max_train_per_task < 0:
        raise ValueError(f"max_train_per_task must be >= 0, got {max_train_per_task}")
    _check_loss_on(loss_on, LOSS_ON)
    if data_format not in FORMATS:
        raise ValueError(f"data_format must be one of {FORMATS}, got {data_format!r}")
    groups: list[list[Example] | list[Conversation]]  # one list per task
    tasked = str(source) in ("generated", "bigbench")  # not the user's own file
    if str(source) == "generated":
        groups = [generate(task) for task in tasks]
    elif str(source) == "bigbench":
        fetch_bigbench(tasks, cache_dir)
        groups = [load_task(task, cache_dir) for task in tasks]
    else:
        groups = [load_local(source, data_format, Path(cache_dir) / "datasets")]
    train: list[Example | Conversation] = []
    held: list[Example | Conversation] = []
    for records in groups:
        # split_examples only reads .task, so conversations split by the same
        # seeded rule as BIG-bench examples.
        task_train, task_eval = split_examples(records, eval_size, seed)
        if tasked:  # a local file is the user's whole data set
            task_train = task_train[:max_train_per_task]  # [:None] keeps all
        train += task_train
        held += task_eval
    return (
        _to_dataset(train, tokenizer, max_length, loss_on),
        _to_dataset(held, tokenizer, max_length, loss_on),
    )


def _check_loss_on(loss_on: str, allowed: tuple[str, ...]) -> None:
    if loss_on not in allowed:
        raise ValueError(f"loss_on must be one of {allowed}, got {loss_on!r}")


def _apply(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[dict[str, str]],
    generation: bool = False,
) -> str:
    # tokenize=False: transformers 5 may return a BatchEncoding otherwise.
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=generation
    )


def _prompt_messages(prompt: str, system: str | None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": prompt}]


def _render(
    tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str, system: str | None
) -> tuple[str, str]:
    """Return the prompt text and the answer text that follows it."""
    prompt_text = render_prompt(tokenizer, prompt, system)
    if not tokenizer.chat_template:
        return prompt_text, answer + (tokenizer.eos_token or "")
    full_text = _apply(
        tokenizer,
        [*_prompt_messages(prompt, system), {"role": "assistant", "content": answer}],
    )
    if not full_text.startswith(prompt_text):
        raise ValueError(
            "chat template is not prefix-stable: the rendered conversation does not "
            "start with the rendered generation prompt, so the prompt tokens cannot "
            "be masked reliably"
        )
    return prompt_text, full_text[len(prompt_text) :]


def _conversation_pieces(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]]
) -> list[tuple[str, bool]]:
    """Cut the rendered conversation into ``(text, is_assistant_turn)`` pieces."""
    if not tokenizer.chat_template:
        pieces = []
        for i, m in enumerate(messages):
            if m["role"] == "assistant" and i > 0:
                # The space goes with the answer: BPE vocabularies hold " word".
                pieces += [("assistant:", False), (f" {m['content']}\n", True)]
            else:
                pieces.append((f"{m['role']}: {m['content']}\n", False))
        ends_with_answer = len(messages) > 1 and messages[-1]["role"] == "assistant"
        return [*pieces, (tokenizer.eos_token or "", ends_with_answer)]

    full = _apply(tokenizer, messages)
    pieces = []
    done = 0  # characters of ``full`` already cut into pieces
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i == 0:
            continue
        start = _apply(tokenizer, messages[:i], generation=True)
        end = _apply(tokenizer, messages[: i + 1])
        if not (
            full.startswith(start)
            and full.startswith(end)
            and done <= len(start) <= len(end)
        ):
            raise ValueError(
                f"chat template is not prefix-stable at message {i}: rendering the "
                "conversation up to that turn is not a prefix of the whole, so the "
                "assistant tokens cannot be located reliably"
            )
        pieces += [
            (full[done : len(start)], False),
            (full[len(start) : len(end)], True),
        ]
        done = len(end)
    return [*pieces, (full[done:], False)]


def _chat_prompt_answer(messages: Sequence[dict[str, str]]) -> tuple[str, str]:
    """The context before the last assistant turn as one prompt, and that turn."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    context = messages[:last]
    if len(context) == 1 and context[0]["role"] == "user":
        prompt = context[0]["content"]
    else:
        prompt = "\n".join(f"{m['role']}: {m['content']}" for m in context)
    return prompt, messages[last]["content"]


def _tokenize(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # The template already wrote any BOS/special tokens into the text.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _to_dataset(
    records: Sequence[Example | Conversation],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    loss_on: str,
) -> datasets.Dataset:
    columns: dict[str, list] = {name: [] for name in _FEATURES}
    for rec in records:
        choices, correct = (), -1
        if isinstance(rec, Conversation):
            prompt, answer = _chat_prompt_answer(rec.messages)
        else:
            prompt, answer = rec.prompt, rec.answer
            choices, correct = rec.choices, rec.correct
        try:
            enc = _encode_record(rec, tokenizer, max_length, loss_on)
        except ValueError as err:
            # Name the example: after the seeded shuffle a row index means little.
            raise ValueError(
                f"task {rec.task!r}, prompt {prompt!r:.60}: {err}"
            ) from err
        columns["input_ids"].append(enc["input_ids"])
        columns["labels"].append(enc["labels"])
        columns["task"].append(rec.task)
        columns["prompt"].append(prompt)
        columns["answer"].append(answer)
        columns["length"].append(len(enc["input_ids"]))
        columns["choices"].append(list(choices))
        columns["correct"].append(correct)
    return datasets.Dataset.from_dict(columns, features=_FEATURES)


def _encode_record(
    rec: Example | Conversation,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    loss_on: str,
) -> dict[str, list[int]]:
    if isinstance(rec, Conversation):
        chat_loss = "assistant" if loss_on == "response" else loss_on
        return encode_conversation(tokenizer, rec.messages, max_length, chat_loss)
    return encode_example(
        tokenizer, rec.prompt, rec.answer, max_length, loss_on=loss_on
    )
