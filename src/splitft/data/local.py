"""Local instruction data: Alpaca-style or chat records from JSON, JSONL, CSV, Parquet.

Files are read with Hugging Face ``datasets`` (local builders only, nothing is
fetched from the hub) and validated row by row, so a bad row is reported by file,
row and field instead of failing somewhere inside training. Rows are counted as a
user counts them: from 1, not counting a CSV's header or blank JSON lines. JSON
that ``datasets`` cannot read exactly (mixed types in a column) is re-read with
the standard library.

Two formats:

- ``alpaca``: ``instruction`` (str), optional ``input`` (str), ``output`` (str).
  The prompt is the instruction, plus ``"\\n\\n" + input`` when input is non-empty.
- ``chat``: ``messages``, a list of ``{"role": "system"|"user"|"assistant",
  "content": str}`` with at least one assistant turn. Only ``role`` and
  ``content`` are kept. CSV cells are plain text, so chat data in CSV is refused
  rather than guessing how the list was encoded.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from splitft.config import ConfigError
from splitft.data.bigbench import Example

log = logging.getLogger(__name__)

FORMATS = ("auto", "alpaca", "chat")
ROLES = ("system", "user", "assistant")
# suffix -> datasets builder
SUPPORTED_EXTENSIONS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}
_NEEDS = {
    "alpaca": "'instruction' and 'output' (optional 'input')",
    "chat": "'messages' (a list of {'role', 'content'} objects)",
}


@dataclass(frozen=True)
class Conversation:
    """One multi-turn chat record; ``messages`` hold only ``role`` and ``content``."""

    task: str
    messages: tuple[dict[str, str], ...]


def load_local(
    path: str | Path, data_format: str = "auto", cache_dir: Path | None = None
) -> list[Example] | list[Conversation]:
    """Load and validate a local data file.

    Alpaca rows become :class:`~splitft.data.bigbench.Example` (so they take the
    BIG-bench path through encoding and evaluation unchanged), chat rows become
    :class:`Conversation`; either way ``task`` is the file's stem. Alpaca rows
    with a blank ``output``, and chats with a blank assistant reply, teach
    nothing (or to answer nothing) and are skipped with a warning.

    Args:
        path: a ``.json`` (list of objects, or JSON lines), ``.jsonl``, ``.csv``
            (header row; every cell read as text) or ``.parquet`` file.
        data_format: ``"alpaca"``, ``"chat"`` or ``"auto"`` (detect from columns).
        cache_dir: where ``datasets`` keeps its Arrow copy (its default if None).

    Raises:
        FileNotFoundError: the file does not exist.
        ConfigError: unsupported extension or format, undetectable format, a
            folder, an unreadable or non-UTF-8 file, invalid JSON (names the
            line), a bad row (names the row and field), or no row left.
    """
    path = Path(path)
    if data_format not in FORMATS:
        raise ConfigError(f"data_format must be one of {FORMATS}, got {data_format!r}")
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a data file")
    builder = SUPPORTED_EXTENSIONS.get(path.suffix.lower())
    if builder is None:
        raise ConfigError(
            f"{path}: unsupported file extension {path.suffix!r}; supported: "
            f"{', '.join(SUPPORTED_EXTENSIONS)}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.stat().st_size == 0:
        raise ConfigError(f"{path}: the file is empty")

    try:
        rows = _read_rows(path, builder, cache_dir)
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror or e})") from None
    if not rows:
        raise ConfigError(f"{path}: the file has no rows")
    fmt = data_format
    if fmt == "auto":
        fmt = detect_format(set().union(*(row.keys() for row in rows)), path)
    if fmt == "chat" and builder == "csv":
        raise ConfigError(
            f"{path}: chat data in CSV is not supported (a 'messages' cell would be "
            "text, not a list of messages); use JSON, JSONL or Parquet"
        )
    task = path.stem
    records: list[Example] | list[Conversation]
    if fmt == "chat":
        records = [_conversation(task, row, path, i) for i, row in enumerate(rows)]
        kept = [c for c in records if not _empty_reply(c)]
        skipped = "conversations with an empty assistant reply"
    else:
        records = [_alpaca(task, row, path, i) for i, row in enumerate(rows)]
        kept = [ex for ex in records if ex.answer.strip()]
        skipped = "empty outputs"
    if len(kept) < len(records):
        log.warning("%s: skipped %d %s", path, len(records) - len(kept), skipped)
    if not kept:
        raise ConfigError(
            f"{path}: nothing to learn: every row was skipped ({skipped})"
        )
    return kept


def detect_format(columns: Iterable[str], path: str | Path = "<data>") -> str:
    """Return ``"alpaca"`` or ``"chat"`` from a file's column names.

    Raises:
        ConfigError: both or neither format fits; lists the columns found and
            what each format needs.
    """
    cols = set(columns)
    fits = [
        fmt
        for fmt, ok in (
            ("alpaca", {"instruction", "output"} <= cols),
            ("chat", "messages" in cols),
        )
        if ok
    ]
    if len(fits) == 1:
        return fits[0]
    why = "is ambiguous (fits both formats)" if fits else "matches no format"
    raise ConfigError(
        f"{path}: cannot detect the data format: columns {sorted(cols)} {why}. "
        f"'alpaca' needs {_NEEDS['alpaca']}; 'chat' needs {_NEEDS['chat']}. "
        "Pass data_format='alpaca' or 'chat' to choose."
    )


def check_messages(messages: Any) -> None:
    """Check a chat ``messages`` value: a non-empty list of role/content objects
    with at least one assistant turn.

    Raises:
        ValueError: what is wrong, naming the 0-based message index and key.
    """
    if isinstance(messages, str):
        raise ValueError(
            "is a string, not a list of messages (JSON-encoded text is not parsed)"
        )
    if not isinstance(messages, Sequence) or not messages:
        raise ValueError(
            f"must be a non-empty list of messages, got {type(messages).__name__}"
        )
    for j, msg in enumerate(messages):
        where = f"message {j} (0-based)"
        if not isinstance(msg, dict):
            raise ValueError(f"{where} is not an object: {msg!r}")
        role = msg.get("role")
        if role not in ROLES:
            got = "missing or null" if role is None else repr(role)
            raise ValueError(f"{where}: key 'role' must be one of {ROLES}, got {got}")
        content = msg.get("content")
        if not isinstance(content, str):
            got = "missing or null" if content is None else type(content).__name__
            raise ValueError(f"{where}: key 'content' must be a string, got {got}")
    if not any(msg["role"] == "assistant" for msg in messages):
        raise ValueError("has no assistant message, so there is nothing to learn")


def _read_rows(path: Path, builder: str, cache_dir: Path | None) -> list[dict]:
    kwargs: dict[str, Any] = {}
    if builder == "csv":
        header = _check_csv(path)
        # CSV has no types: read every cell as text, else an answer "007" would
        # arrive as the int 7. Empty cells stay "" rather than NaN.
        string = datasets.Value("string")
        kwargs["features"] = datasets.Features({name: string for name in header})
        kwargs["keep_default_na"] = False
        kwargs["encoding"] = "utf-8-sig"
    try:
        ds = datasets.load_dataset(
            builder,
            data_files=str(path),
            split="train",
            cache_dir=str(cache_dir) if cache_dir is not None else None,
            **kwargs,
        )
    except Exception as err:  # datasets raises many types for unreadable files
        if builder != "json":
            why = " ".join(str(err.__cause__ or err).split())  # the cause, one line
            raise ConfigError(f"{path}: could not read as {builder}: {why}") from err
        return _json_rows(path)  # says which row is bad, or reads what it can
    if builder == "json" and _has_json_feature(ds.features):
        # A column of mixed types comes back as datasets.Json, which turns the
        # string "19" into the int 19: re-read exactly, so errors name the row
        # that is really wrong and valid strings stay strings.
        return _json_rows(path)
    return ds.to_list()


def _check_csv(path: Path) -> list[str]:
    """The header, after checking that every row has a cell per column: pandas
    would fill a short row with empty cells, as if its answer were blank."""
    csv.field_size_limit(2**31 - 1)  # a long answer is not an error (default 128 KiB)
    i = -1
    with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: Excel's BOM
        cells = (row for row in csv.reader(f) if row)  # pandas skips blank lines
        try:
            header = next(cells, [])
            for i, row in enumerate(cells):
                if len(row) != len(header):
                    raise ConfigError(
                        f"{_row(path, i)}: {len(row)} cells, but the header has "
                        f"{len(header)} ({', '.join(header)})"
                    )
        except csv.Error as err:
            raise ConfigError(f"{_row(path, i + 1)}: not valid CSV: {err}") from err
    return header


def _not_utf8(path: Path) -> ConfigError:
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        return ConfigError(
            f"{path}: line {line}: not UTF-8 text (byte {e.start}); save it as UTF-8"
        )
    return ConfigError(f"{path}: not UTF-8 text")


# datasets >= 4.7 reads a column of mixed types as a Json feature; older
# releases have no such type and fail to read the file instead, which takes the
# exact standard-library path too. So look the type up rather than assume it.
_JSON_FEATURE: type | None = getattr(datasets, "Json", None)


def _has_json_feature(feature: Any) -> bool:
    if _JSON_FEATURE is not None and isinstance(feature, _JSON_FEATURE):
        return True
    if isinstance(feature, dict):
        return any(_has_json_feature(f) for f in feature.values())
    inner = getattr(feature, "feature", None)  # List and friends
    return inner is not None and _has_json_feature(inner)


def _json_rows(path: Path) -> list[dict]:
    """Read a JSON list of objects (or one object) or JSON lines, exactly."""
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as whole_err:
        data = []
        # split("\n"), not splitlines(): JSON strings may hold U+2028 and friends
        lines = [(n, ln) for n, ln in enumerate(text.split("\n"), 1) if ln.strip()]
        for n, line in lines:
            try:
                data.append(json.loads(line))
            except json.JSONDecodeError as err:
                if not data:  # most likely one (broken) document, not JSON lines
                    raise _invalid_json(path, whole_err.lineno, whole_err) from None
                raise _invalid_json(path, n, err) from None
    if isinstance(data, dict):
        data = [data]  # as datasets reads a lone object
    if not isinstance(data, list):
        raise ConfigError(f"{path}: expected a list of JSON objects or JSON lines")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise ConfigError(f"{_row(path, i)}: not a JSON object: {row!r:.80}")
    return data


def _invalid_json(path: Path, line: int, err: json.JSONDecodeError) -> ConfigError:
    return ConfigError(
        f"{path}: line {line}, column {err.colno}: not valid JSON: {err.msg}"
    )


def _row(path: Path, i: int) -> str:
    """Where record ``i`` (0-based) is, counted as a user counts rows."""
    header = ", not counting the header" if path.suffix.lower() == ".csv" else ""
    return f"{path}: row {i + 1} (1-based{header})"


def _bad(path: Path, i: int, field: str, why: str) -> ConfigError:
    return ConfigError(f"{_row(path, i)}: field '{field}' {why}")


def _alpaca(task: str, row: dict, path: Path, i: int) -> Example:
    values = {}
    for field in ("instruction", "input", "output"):
        value = row.get(field)
        if value is None and field == "input":
            value = ""
        if not isinstance(value, str):
            why = "is missing or null" if value is None else "is not a string"
            raise _bad(path, i, field, f"{why} (got {value!r:.40})")
        values[field] = value
    if not values["instruction"].strip():
        raise _bad(path, i, "instruction", "is empty")
    prompt = values["instruction"]
    if values["input"].strip():
        prompt += "\n\n" + values["input"]
    return Example(task, prompt, values["output"])


def _conversation(task: str, row: dict, path: Path, i: int) -> Conversation:
    messages = row.get("messages")
    if messages is None:
        raise _bad(path, i, "messages", "is missing or null")
    try:
        check_messages(messages)
    except ValueError as err:
        raise ConfigError(f"{_row(path, i)}: field 'messages': {err}") from None
    kept = tuple({"role": m["role"], "content": m["content"]} for m in messages)
    return Conversation(task, kept)


def _empty_reply(conversation: Conversation) -> bool:
    return any(
        m["role"] == "assistant" and not m["content"].strip()
        for m in conversation.messages
    )
