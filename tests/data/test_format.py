"""Encoding and batching, with a tiny tokenizer trained on the spot."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from splitft.data import build_datasets, collate, encode_example

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
END_OF_TURN = "<|im_end|>\n"


def make_tokenizer(chat_template: str | None = CHATML) -> PreTrainedTokenizerFast:
    """Byte-level BPE, so any text round-trips through decode."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["What is 12 plus 7? 19", "user assistant"], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=chat_template,
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


def test_build_datasets(tokenizer, tmp_path: Path):
    archive = tmp_path / "downloads" / "bigbench-1.0.0.tar.gz"
    archive.parent.mkdir()
    examples = [
        {"input": f"What is {i} plus 7?", "target": str(i + 7)} for i in range(20)
    ]
    root = "bigbench-1.0.0/bigbench/benchmark_tasks/"
    with tarfile.open(archive, "w:gz") as tar:
        for task in ("add", "more/add"):
            data = json.dumps({"name": task, "examples": examples}).encode()
            info = tarfile.TarInfo(root + task + "/task.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

    train, held = build_datasets(
        ["add", "more/add"],
        tokenizer,
        tmp_path,
        max_length=32,
        eval_size=3,
        seed=0,
        max_train_per_task=5,
    )
    assert len(train) == 10 and len(held) == 6
    assert set(train.column_names) == {
        "input_ids",
        "labels",
        "task",
        "prompt",
        "answer",
        "length",
    }
    row = held[0]
    assert row["length"] == len(row["input_ids"]) == len(row["labels"])
    assert answer_part(tokenizer, row) == row["answer"] + END_OF_TURN
    assert not set(train["prompt"][:5]) & set(held["prompt"][:3])
