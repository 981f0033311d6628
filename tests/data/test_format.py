"""Encoding and batching, with a tiny tokenizer trained on the spot."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from tiny import CHATML, COLUMNS, END_OF_TURN, make_tokenizer
from transformers import PreTrainedTokenizerFast

from splitft.data import (
    build_datasets,
    collate,
    encode_conversation,
    encode_example,
    render_prompt,
)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def answer_part(tokenizer: PreTrainedTokenizerFast, enc: dict) -> str:
    kept = [
        i
        for i, label in zip(enc["input_ids"], enc["labels"], strict=True)
        if label != -100
    ]
    return tokenizer.decode(kept)


def labelled_spans(tokenizer: PreTrainedTokenizerFast, enc: dict) -> list[str]:
    """Decode each run of consecutive labelled tokens on its own."""
    spans: list[list[int]] = []
    previous = -100
    for i, label in zip(enc["input_ids"], enc["labels"], strict=True):
        if label != -100:
            assert label == i  # a label is the token itself, shifted by the loss
            if previous == -100:
                spans.append([])
            spans[-1].append(i)
        previous = label
    return [tokenizer.decode(span) for span in spans]


def test_prompt_masked_and_answer_learned(tokenizer):
    enc = encode_example(tokenizer, "What is 12 plus 7?", "19", max_length=64)
    assert len(enc["input_ids"]) == len(enc["labels"])
    assert answer_part(tokenizer, enc) == "19" + END_OF_TURN
    full = tokenizer.decode(enc["input_ids"])
    assert full == tokenizer.apply_chat_template(
        [
            {"role": "user", "content": "What is 12 plus 7?"},
            {"role": "assistant", "content": "19"},
        ],
        tokenize=False,
    )
    # Labels form one contiguous tail: masked prompt, then the answer.
    first = enc["labels"].index(next(x for x in enc["labels"] if x != -100))
    assert all(x == -100 for x in enc["labels"][:first])
    assert enc["labels"][first:] == enc["input_ids"][first:]


def test_system_message_is_masked(tokenizer):
    enc = encode_example(tokenizer, "q", "a", max_length=64, system="be brief")
    assert "be brief" in tokenizer.decode(enc["input_ids"])
    assert answer_part(tokenizer, enc) == "a" + END_OF_TURN


def test_left_truncation_keeps_answer(tokenizer):
    prompt = "What is 12 plus 7? " * 20
    full = encode_example(tokenizer, prompt, "19", max_length=10_000)
    enc = encode_example(tokenizer, prompt, "19", max_length=16)
    assert len(enc["input_ids"]) == 16
    assert answer_part(tokenizer, enc) == "19" + END_OF_TURN
    assert enc["input_ids"] == full["input_ids"][-16:]


def test_long_answer_keeps_its_head(tokenizer):
    enc = encode_example(tokenizer, "q", "What is 12 plus 7? " * 10, max_length=5)
    assert len(enc["input_ids"]) == 5
    assert all(label != -100 for label in enc["labels"])
    assert tokenizer.decode(enc["input_ids"]).startswith("What")


def test_no_answer_token_raises(tokenizer):
    with pytest.raises(ValueError, match="no answer token"):
        encode_example(tokenizer, "q", "19", max_length=0)


def test_without_chat_template():
    tok = make_tokenizer(chat_template=None)
    enc = encode_example(tok, "What is 12 plus 7?", "19", max_length=64)
    assert tok.decode(enc["input_ids"]) == "What is 12 plus 7?\n19<|im_end|>"
    assert answer_part(tok, enc) == "19<|im_end|>"


def test_template_not_prefix_stable_raises():
    # Renders the generation prompt differently from a finished conversation.
    template = (
        "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>{% endif %}"
    )
    with pytest.raises(ValueError, match="prefix-stable"):
        encode_example(make_tokenizer(template), "q", "a", max_length=64)


def test_collate_pads_right():
    batch = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": [8], "labels": [8]},
    ]
    out = collate(batch, pad_token_id=0)
    assert set(out) == {"input_ids", "labels", "attention_mask", "position_ids"}
    for t in out.values():
        assert t.shape == (2, 3) and t.dtype == torch.int64
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["position_ids"][0].tolist() == [0, 1, 2]
    assert out["position_ids"][1, 0] == 0


def write_bigbench(tmp_path: Path, tasks: tuple[str, ...]) -> None:
    archive = tmp_path / "downloads" / "bigbench-1.0.0.tar.gz"
    archive.parent.mkdir()
    examples = [
        {
            "input": f"What is {i} plus 7?",
            "target": str(i + 7),
            "target_scores": {"0": 0, str(i + 7): 1},
        }
        for i in range(20)
    ]
    root = "bigbench-1.0.0/bigbench/benchmark_tasks/"
    with tarfile.open(archive, "w:gz") as tar:
        for task in tasks:
            data = json.dumps({"name": task, "examples": examples}).encode()
            info = tarfile.TarInfo(root + task + "/task.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_build_datasets(tokenizer, tmp_path: Path):
    write_bigbench(tmp_path, ("add", "more/add"))
    train, held = build_datasets(
        ["add", "more/add"],
        tokenizer,
        tmp_path,
        max_length=32,
        eval_size=3,
        seed=0,
        max_train_per_task=5,
        source="bigbench",
    )
    assert len(train) == 10 and len(held) == 6
    assert set(train.column_names) == COLUMNS
    row = held[0]
    assert row["length"] == len(row["input_ids"]) == len(row["labels"])
    assert answer_part(tokenizer, row) == row["answer"] + END_OF_TURN
    assert row["choices"] == ["0", row["answer"]] and row["correct"] == 1
    assert not set(train["prompt"][:5]) & set(held["prompt"][:3])


def test_build_datasets_of_generated_tasks(tokenizer, tmp_path: Path):
    train, held = build_datasets(
        ["addition", "sorting"], tokenizer, tmp_path, 64, 3, 0, 5
    )
    assert len(train) == 10 and len(held) == 6
    assert set(train["task"]) == {"addition", "sorting"}
    assert not (tmp_path / "bigbench").exists()  # nothing fetched


def test_build_datasets_loss_on_all(tokenizer, tmp_path: Path):
    write_bigbench(tmp_path, ("add",))
    args = (["add"], tokenizer, tmp_path, 32, 3, 0, None)
    response, _ = build_datasets(*args, source="bigbench")
    everything, _ = build_datasets(*args, source="bigbench", loss_on="all")
    assert everything["input_ids"] == response["input_ids"]
    assert everything["labels"] == everything["input_ids"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss_on": "assistant"}, r"loss_on must be one of \('response', 'all'\)"),
        ({"data_format": "sharegpt"}, r"data_format must be one of .*'alpaca'"),
    ],
)
def test_build_datasets_rejects_bad_options(tokenizer, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_datasets(["add"], tokenizer, tmp_path, 32, 3, 0, None, **kwargs)


# render_prompt: the evaluator generates after it, so it must be the exact prefix.


@pytest.mark.parametrize("template", [CHATML, None])
@pytest.mark.parametrize("system", [None, "be brief"])
def test_render_prompt_is_the_prefix_encode_example_uses(template, system):
    tok = make_tokenizer(template)
    text = render_prompt(tok, "What is 12 plus 7?", system=system)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    enc = encode_example(tok, "What is 12 plus 7?", "19", 64, system=system)
    n = len(ids)
    assert enc["input_ids"][:n] == ids
    assert set(enc["labels"][:n]) == {-100}
    assert -100 not in enc["labels"][n:]


def test_render_prompt_text():
    assert render_prompt(make_tokenizer(None), "q") == "q\n"
    assert render_prompt(make_tokenizer(), "q") == (
        "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
    )


# loss_on


def test_loss_on_all_labels_every_token(tokenizer):
    response = encode_example(tokenizer, "What is 12 plus 7?", "19", 64)
    everything = encode_example(
        tokenizer, "What is 12 plus 7?", "19", 64, loss_on="all"
    )
    assert everything["input_ids"] == response["input_ids"]
    assert everything["labels"] == everything["input_ids"]


def test_loss_on_is_validated(tokenizer):
    with pytest.raises(
        ValueError, match=r"loss_on must be one of \('response', 'all'\)"
    ):
        encode_example(tokenizer, "q", "a", 64, loss_on="assistant")
    with pytest.raises(
        ValueError, match=r"loss_on must be one of \('assistant', 'all'\)"
    ):
        encode_conversation(tokenizer, CHAT, 64, loss_on="response")


# encode_conversation

CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "What is 12 plus 7?"},
    {"role": "assistant", "content": "19"},
    {"role": "user", "content": "plus 1?"},
    {"role": "assistant", "content": "20"},
]


def test_conversation_learns_only_assistant_turns(tokenizer):
    enc = encode_conversation(tokenizer, CHAT, max_length=200)
    assert len(enc["input_ids"]) == len(enc["labels"])
    assert tokenizer.decode(enc["input_ids"]) == tokenizer.apply_chat_template(
        CHAT, tokenize=False
    )
    assert labelled_spans(tokenizer, enc) == ["19" + END_OF_TURN, "20" + END_OF_TURN]


def test_conversation_loss_on_all(tokenizer):
    assistant = encode_conversation(tokenizer, CHAT, max_length=200)
    everything = encode_conversation(tokenizer, CHAT, max_length=200, loss_on="all")
    assert everything["input_ids"] == assistant["input_ids"]
    assert everything["labels"] == everything["input_ids"]


@pytest.mark.parametrize("system", [None, "be brief"])
def test_single_turn_conversation_matches_encode_example(tokenizer, system):
    messages = [{"role": "system", "content": system}] if system else []
    messages += [
        {"role": "user", "content": "What is 12 plus 7?"},
        {"role": "assistant", "content": "19"},
    ]
    assert encode_conversation(tokenizer, messages, 64) == encode_example(
        tokenizer, "What is 12 plus 7?", "19", 64, system=system
    )


def test_conversation_without_chat_template():
    tok = make_tokenizer(chat_template=None)
    enc = encode_conversation(tok, CHAT, max_length=200)
    assert tok.decode(enc["input_ids"]) == (
        "system: be brief\nuser: What is 12 plus 7?\nassistant: 19\n"
        "user: plus 1?\nassistant: 20\n<|im_end|>"
    )
    assert labelled_spans(tok, enc) == [" 19\n", " 20\n<|im_end|>"]


@pytest.mark.parametrize("template", [CHATML, None])
def test_opening_assistant_message_is_context(template):
    tok = make_tokenizer(template)
    messages = [
        {"role": "assistant", "content": "Hi, ask me a sum."},
        {"role": "user", "content": "12 plus 7?"},
        {"role": "assistant", "content": "19"},
    ]
    spans = labelled_spans(tok, encode_conversation(tok, messages, 200))
    assert len(spans) == 1 and "19" in spans[0] and "Hi" not in spans[0]
    with pytest.raises(ValueError, match="no assistant turn to learn"):
        encode_conversation(tok, messages[:1], 200)


def test_conversation_truncation_keeps_the_tail(tokenizer):
    full = encode_conversation(tokenizer, CHAT, max_length=10_000)
    enc = encode_conversation(tokenizer, CHAT, max_length=12)
    assert enc["input_ids"] == full["input_ids"][-12:]
    assert enc["labels"] == full["labels"][-12:]
    assert labelled_spans(tokenizer, enc)[-1] == "20" + END_OF_TURN


def test_conversation_truncation_never_leaves_no_loss_token(tokenizer):
    messages = [*CHAT, {"role": "user", "content": "What is 12 plus 7? " * 20}]
    with pytest.raises(ValueError, match="no assistant token fits"):
        encode_conversation(tokenizer, messages, max_length=16)


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([{"role": "user", "content": "q"}], "no assistant message"),
        (
            [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}],
            r"message 1 \(0-based\): key 'role'",
        ),
        (
            [{"role": "user", "content": "q"}, {"role": "assistant"}],
            r"message 1 \(0-based\): key 'content' .* missing",
        ),
        ("hello", "is a string"),
    ],
)
def test_bad_messages_raise(tokenizer, messages, message):
    with pytest.raises(ValueError, match=message):
        encode_conversation(tokenizer, messages, 64)


def test_conversation_template_not_prefix_stable_raises():
    # Drops earlier assistant turns, as some reasoning templates do.
    template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(ValueError, match="prefix-stable at message 2"):
        encode_conversation(make_tokenizer(template), CHAT, 200)
