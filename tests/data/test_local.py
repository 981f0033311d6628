"""Local JSON/JSONL/CSV/Parquet files: loading, validation and encoding."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_format import END_OF_TURN, labelled_spans, make_tokenizer
from tiny import COLUMNS
from transformers import PreTrainedTokenizerFast

from splitft.config import ConfigError
from splitft.data import Conversation, Example, build_datasets, load_local, local
from splitft.data.local import detect_format

ALPACA = [
    {"instruction": "Add the numbers.", "input": "12 and 7", "output": "19"},
    {"instruction": "What is 2 plus 2?", "input": "", "output": "4"},
    {"instruction": "Name a prime.", "output": "007"},  # no input; text, not 7
]
CHAT = [
    {
        "messages": [
            {"role": "user", "content": "What is 12 plus 7?"},
            {"role": "assistant", "content": "19"},
        ]
    },
    {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "What is 12 plus 7?"},
            {"role": "assistant", "content": "19"},
            {"role": "user", "content": "plus 1?"},
            {"role": "assistant", "content": "20"},
        ]
    },
]

USER = {"role": "user", "content": "q"}
ASSISTANT = {"role": "assistant", "content": "a"}


def write(path: Path, rows: list[dict]) -> Path:
    """Write rows in the format the suffix names (CSV: the union of the keys)."""
    if path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".csv":
        fields = list(dict.fromkeys(k for r in rows for k in r))
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fields)
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("")
    return path


def load(path: Path, **kwargs):
    # A per-test Arrow cache keeps ~/.cache out of the tests.
    return load_local(path, cache_dir=path.parent / "cache", **kwargs)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


# Loading both formats


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_alpaca_in_every_file_type(tmp_path, suffix):
    records = load(write(tmp_path / f"sums{suffix}", ALPACA))
    assert records == [
        Example("sums", "Add the numbers.\n\n12 and 7", "19"),
        Example("sums", "What is 2 plus 2?", "4"),
        Example("sums", "Name a prime.", "007"),
    ]


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
def test_chat_in_every_file_type(tmp_path, suffix):
    records = load(write(tmp_path / f"talk{suffix}", CHAT))
    assert records == [Conversation("talk", tuple(row["messages"])) for row in CHAT]


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_json_loads_where_datasets_has_no_json_type(tmp_path, monkeypatch, suffix):
    """datasets < 4.7 has no ``datasets.Json`` (issue 18): loading must not need it.

    With the type gone, any use of ``datasets.Json`` raises AttributeError.
    """
    monkeypatch.delattr(datasets, "Json", raising=False)
    monkeypatch.setattr(local, "_JSON_FEATURE", None)  # as imported from such a release
    sums = load(write(tmp_path / f"sums{suffix}", ALPACA))
    assert [(r.prompt, r.answer) for r in sums][::2] == [
        ("Add the numbers.\n\n12 and 7", "19"),
        ("Name a prime.", "007"),
    ]
    talk = load(write(tmp_path / f"talk{suffix}", CHAT))
    assert talk == [Conversation("talk", tuple(row["messages"])) for row in CHAT]


def test_chat_keeps_only_role_and_content(tmp_path):
    user, assistant = CHAT[0]["messages"]
    # Messages of different shapes come back from datasets as Json values.
    rows = [*CHAT, {"messages": [{**user, "name": "x"}, assistant]}]
    records = load(write(tmp_path / "talk.jsonl", rows))
    assert records[-1].messages == ({**user}, {**assistant})
    assert records[-1].messages[1]["content"] == "19"


def test_blank_output_is_skipped(tmp_path, caplog):
    rows = [*ALPACA, {"instruction": "Say nothing.", "output": "  "}]
    with caplog.at_level(logging.WARNING):
        records = load(write(tmp_path / "sums.jsonl", rows))
    assert len(records) == len(ALPACA)
    assert "skipped 1 empty outputs" in caplog.text


def test_blank_assistant_reply_is_skipped(tmp_path, caplog):
    blank = {"role": "assistant", "content": " "}
    rows = [*CHAT, {"messages": [*CHAT[1]["messages"][:3], USER, blank]}]
    with caplog.at_level(logging.WARNING):
        records = load(write(tmp_path / "talk.jsonl", rows))
    assert records == [Conversation("talk", tuple(row["messages"])) for row in CHAT]
    assert "skipped 1 conversations with an empty assistant reply" in caplog.text


@pytest.mark.parametrize(
    ("rows", "why"),
    [
        ([{"instruction": "q", "output": ""}], "empty outputs"),
        (
            [{"messages": [USER, {"role": "assistant", "content": ""}]}],
            "conversations with an empty assistant reply",
        ),
    ],
)
def test_nothing_left_after_skipping(tmp_path, rows, why):
    path = write(tmp_path / "sums.jsonl", rows)
    with pytest.raises(ConfigError) as err:
        load(path)
    assert str(err.value) == f"{path}: nothing to learn: every row was skipped ({why})"


# Format detection


def test_detect_format():
    assert detect_format(["instruction", "input", "output"]) == "alpaca"
    assert detect_format(["messages", "id"]) == "chat"


@pytest.mark.parametrize(
    ("columns", "why"),
    [
        (["instruction", "output", "messages"], "ambiguous"),
        (["prompt", "completion"], "matches no format"),
    ],
)
def test_detect_format_explains(columns, why):
    with pytest.raises(ValueError) as err:
        detect_format(columns, "data.jsonl")
    text = str(err.value)
    assert text.startswith("data.jsonl: ") and why in text
    assert str(sorted(columns)) in text  # what was found
    assert "'alpaca' needs 'instruction' and 'output'" in text  # what each needs
    assert "'chat' needs 'messages'" in text


def test_explicit_format_settles_ambiguity(tmp_path):
    rows = [{**CHAT[0], "instruction": "i", "output": "o"}]
    path = write(tmp_path / "both.jsonl", rows)
    with pytest.raises(ValueError, match="ambiguous"):
        load(path)
    assert isinstance(load(path, data_format="chat")[0], Conversation)
    assert isinstance(load(path, data_format="alpaca")[0], Example)


# Errors name the file, the row (counted from 1) and the field


@pytest.mark.parametrize(
    ("rows", "bad"),
    [
        (
            [ALPACA[0], {"instruction": "q"}],
            "row 2 (1-based): field 'output' is missing or null",
        ),
        (
            [ALPACA[0], {"instruction": "q", "output": None}],
            "row 2 (1-based): field 'output' is missing or null",
        ),
        (
            [{"input": "x", "output": "a"}],
            "row 1 (1-based): field 'instruction' is missing or null",
        ),
        (  # mixed types: datasets alone would report row 1's "19" as an int
            [ALPACA[0], ALPACA[1], {"instruction": "q", "output": 19}],
            "row 3 (1-based): field 'output' is not a string (got 19)",
        ),
        (
            [{"instruction": "q", "input": ["x"], "output": "a"}],
            "row 1 (1-based): field 'input' is not a string",
        ),
        (
            [ALPACA[0], {"instruction": " ", "output": "a"}],
            "row 2 (1-based): field 'instruction' is empty",
        ),
    ],
)
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_alpaca_errors_name_file_row_field(tmp_path, rows, bad, suffix):
    path = write(tmp_path / f"sums{suffix}", rows)
    with pytest.raises(ConfigError) as err:
        load(path, data_format="alpaca")
    assert str(err.value).startswith(f"{path}: ")
    assert bad in str(err.value)


def test_parquet_mistyped_column(tmp_path):
    path = tmp_path / "sums.parquet"
    pq.write_table(pa.table({"instruction": ["q"], "output": [19]}), path)
    with pytest.raises(ConfigError) as err:
        load(path)
    assert str(err.value) == (
        f"{path}: row 1 (1-based): field 'output' is not a string (got 19)"
    )


def _chat_row(*messages: object) -> dict:
    return {"messages": list(messages)}


@pytest.mark.parametrize(
    ("bad_row", "bad"),
    [
        (
            _chat_row(USER, {"role": "bot", "content": "a"}),
            "field 'messages': message 1 (0-based): key 'role' must be one of "
            "('system', 'user', 'assistant'), got 'bot'",
        ),
        (
            _chat_row(USER, {"role": "assistant"}),
            "field 'messages': message 1 (0-based): key 'content' must be a string, "
            "got missing or null",
        ),
        (  # mixed types: datasets alone would report row 1's "19" as an int
            _chat_row({"role": "user", "content": ["q"]}, ASSISTANT),
            "field 'messages': message 0 (0-based): key 'content' must be a string, "
            "got list",
        ),
        (_chat_row(USER), "field 'messages': has no assistant message"),
        (_chat_row(), "field 'messages': must be a non-empty list"),
        ({"messages": "user: q"}, "field 'messages': is a string"),
        ({"id": 3}, "field 'messages' is missing or null"),
    ],
)
def test_chat_errors_name_file_row_field(tmp_path, bad_row, bad):
    path = write(tmp_path / "talk.jsonl", [*CHAT, bad_row])
    with pytest.raises(ConfigError) as err:
        load(path)
    assert str(err.value).startswith(f"{path}: row 3 (1-based): ")
    assert bad in str(err.value)


def test_row_that_is_not_an_object(tmp_path):
    path = tmp_path / "sums.jsonl"
    path.write_text(json.dumps(ALPACA[0]) + "\n[1, 2]\n")
    with pytest.raises(
        ConfigError, match=r"sums.jsonl: row 2 \(1-based\): not a JSON object"
    ):
        load(path)


def test_invalid_json_names_the_file_and_line(tmp_path):
    path = tmp_path / "sums.json"
    path.write_text('[\n  {"instruction": "q",\n   "output": not json}\n]\n')
    with pytest.raises(ConfigError) as err:
        load(path)
    assert str(err.value) == (
        f"{path}: line 3, column 14: not valid JSON: Expecting value"
    )


def test_invalid_json_line_names_the_line(tmp_path):
    path = tmp_path / "sums.jsonl"
    good = json.dumps(ALPACA[0])
    path.write_text(f"{good}\n\n{good}\n{{broken\n{good}\n")  # line 2 is blank
    with pytest.raises(ConfigError) as err:
        load(path)
    assert str(err.value).startswith(f"{path}: line 4, column 2: not valid JSON")


@pytest.mark.parametrize(
    ("text", "bad"),
    [
        ("instruction,input,output\nq,x,a\nq,x\n", "2 cells"),  # output missing
        ("instruction,input,output\nq,x,a\n\nq,x,a,b\n", "4 cells"),
    ],
)
def test_csv_row_with_missing_or_extra_cells(tmp_path, text, bad):
    path = tmp_path / "sums.csv"
    path.write_text(text)  # a blank line is skipped, as pandas skips it
    with pytest.raises(ConfigError) as err:
        load(path)
    assert str(err.value) == (
        f"{path}: row 2 (1-based, not counting the header): {bad}, but the "
        "header has 3 (instruction, input, output)"
    )


@pytest.mark.parametrize(
    "prefix", ["\ufeff", "\n"], ids=["byte-order mark", "blank first line"]
)
def test_csv_as_spreadsheets_save_it(tmp_path, prefix):
    path = tmp_path / "sums.csv"
    path.write_text(prefix + "instruction,input,output\nq,x,a\nr,y,b\n")
    rows = load(path)
    assert [r.answer for r in rows] == ["a", "b"]
    assert rows[0].prompt.startswith("q")


def test_csv_cell_longer_than_the_csv_module_default(tmp_path):
    path = tmp_path / "long.csv"
    long = "word " * 40_000  # 200,000 characters: over csv's 131,072 default
    path.write_text(f'instruction,output\nq,"{long}"\n')
    assert load(path)[0].answer == long


def test_csv_empty_cell_is_an_empty_output(tmp_path, caplog):
    path = tmp_path / "sums.csv"
    path.write_text("instruction,input,output\nq,x,a\nq,x,\n")
    with caplog.at_level(logging.WARNING):
        assert len(load(path)) == 1
    assert "skipped 1 empty outputs" in caplog.text


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_non_utf8_file_names_the_line(tmp_path, suffix):
    path = tmp_path / f"sums{suffix}"
    lines = ['{"instruction": "q", "output": "a"}'] * 2
    if suffix == ".csv":
        lines = ["instruction,output", "q,a"]
    text = "\n".join([*lines, lines[-1].replace("q", "caf\xe9")]) + "\n"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ConfigError) as err:
        load(path)
    assert str(err.value).startswith(f"{path}: line 3: not UTF-8 text (byte ")


def test_folder_as_data_file(tmp_path):
    folder = tmp_path / "sums.jsonl"
    folder.mkdir()
    with pytest.raises(ConfigError) as err:
        load(folder)
    assert str(err.value) == f"{folder}: is a folder, not a data file"


def test_chat_in_csv_is_refused(tmp_path):
    path = tmp_path / "talk.csv"
    path.write_text('messages\n"[{""role"": ""user"", ""content"": ""q""}]"\n')
    with pytest.raises(ConfigError, match="chat data in CSV is not supported"):
        load(path)


def test_unsupported_extension_lists_supported(tmp_path):
    path = write(tmp_path / "sums.txt", ALPACA)
    with pytest.raises(ValueError) as err:
        load(path)
    assert "'.txt'" in str(err.value)
    assert ".json, .jsonl, .csv, .parquet" in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load(tmp_path / "nope.jsonl")


@pytest.mark.parametrize(("suffix", "text"), [(".jsonl", ""), (".json", "[]")])
def test_empty_file(tmp_path, suffix, text):
    path = tmp_path / f"sums{suffix}"
    path.write_text(text)
    with pytest.raises(
        ValueError, match=f"sums{suffix}: the file (has no rows|is empty)"
    ):
        load(path)


def test_bad_format_name(tmp_path):
    with pytest.raises(ValueError, match="data_format must be one of"):
        load(write(tmp_path / "sums.jsonl", ALPACA), data_format="sharegpt")


# build_datasets on a local file


def sums(n: int) -> list[dict]:
    return [
        {"instruction": f"What is {i} plus 7?", "input": "", "output": str(i + 7)}
        for i in range(n)
    ]


def build(path: Path, tokenizer, seed=0, max_length=64, max_train=None, **kwargs):
    """build_datasets on one local file, 4 held out; the task list is unused."""
    return build_datasets(
        ["unused"],
        tokenizer,
        path.parent,
        max_length,
        4,
        seed,
        max_train,
        source=str(path),
        **kwargs,
    )


def test_build_datasets_alpaca(tokenizer, tmp_path):
    path = write(tmp_path / "sums.jsonl", sums(20))
    train, held = build(path, tokenizer, max_train=10)
    assert len(train) == 16 and len(held) == 4  # the BIG-bench cap is not applied
    for ds in (train, held):
        assert set(ds.column_names) == COLUMNS
        assert set(ds["task"]) == {"sums"}
        assert ds["choices"] == [[]] * len(ds) and set(ds["correct"]) == {-1}
    row = held[0]
    assert row["length"] == len(row["input_ids"]) == len(row["labels"])
    assert labelled_spans(tokenizer, row) == [row["answer"] + END_OF_TURN]
    assert not set(train["prompt"]) & set(held["prompt"])


def test_build_datasets_split_is_deterministic(tokenizer, tmp_path):
    path = write(tmp_path / "sums.parquet", sums(20))
    first = build(path, tokenizer)
    again = build(path, tokenizer)
    other = build(path, tokenizer, seed=1)
    assert [d["prompt"] for d in first] == [d["prompt"] for d in again]
    assert first[1]["prompt"] != other[1]["prompt"]
    assert len(first[0]) == 16 and len(first[1]) == 4


def test_build_datasets_holds_out_at_most_half(tokenizer, tmp_path):
    train, held = build(write(tmp_path / "sums.csv", sums(5)), tokenizer)
    assert len(train) == 3 and len(held) == 2


def test_build_datasets_chat(tokenizer, tmp_path):
    rows = [CHAT[i % 2] for i in range(8)]
    train, held = build(write(tmp_path / "talk.json", rows), tokenizer)
    # two distinct chats, 4 copies each: no held-out prompt is also trained on
    assert len(held) == 4 and not set(train["prompt"]) & set(held["prompt"])
    assert set(held.column_names) == COLUMNS
    by_turns = {len(labelled_spans(tokenizer, r)): r for r in [*train, *held]}
    single, multi = by_turns[1], by_turns[2]
    # prompt/answer: what precedes the last assistant turn, and that turn.
    assert (single["prompt"], single["answer"]) == ("What is 12 plus 7?", "19")
    assert multi["prompt"] == (
        "system: be brief\nuser: What is 12 plus 7?\nassistant: 19\nuser: plus 1?"
    )
    assert multi["answer"] == "20"
    assert labelled_spans(tokenizer, multi) == ["19" + END_OF_TURN, "20" + END_OF_TURN]
    assert multi["choices"] == [] and multi["correct"] == -1


def test_build_datasets_chat_loss_on_all(tokenizer, tmp_path):
    path = write(tmp_path / "talk.jsonl", CHAT * 2)
    train, _ = build(path, tokenizer, loss_on="all")
    assert all(r["labels"] == r["input_ids"] for r in train)


def test_build_datasets_names_the_example_that_does_not_fit(tokenizer, tmp_path):
    rows = [*CHAT, _chat_row(ASSISTANT, {"role": "user", "content": "q " * 200})]
    path = write(tmp_path / "talk.jsonl", rows)
    with pytest.raises(ValueError, match="task 'talk', prompt .*no assistant"):
        build(path, tokenizer, max_length=8)


def test_build_datasets_missing_file(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        build(tmp_path / "nope.jsonl", tokenizer)
