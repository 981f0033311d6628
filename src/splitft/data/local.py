"""Local instruction data: Alpaca-style or chat records from JSON, JSONL, CSV, Parquet.

Files are read with Hugging Face ``datasets`` (local builders only, nothing is
fetched from the hub) and validated row by row, so a bad row is reported by file,
0-based row index and field instead of failing somewhere inside training. JSON
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
    with a blank ``output`` teach nothing and are skipped with a warning.

    Args:
        path: a ``.json`` (list of objects, or JSON lines), ``.jsonl``, ``.csv``
            (header row; every cell read as text) or ``.parquet`` file.
        data_format: ``"alpaca"``, ``"chat"`` or ``"auto"`` (detect from columns).
        cache_dir: where ``datasets`` keeps its Arrow copy (its default if None).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unsupported extension or format, undetectable format, an
            unreadable file, or a bad row (names file, 0-based row and field).
    """
    path = Path(path)
    if data_format not in FORMATS:
        raise ValueError(f"data_format must be one of {FORMATS}, got {data_format!r}")
    builder = SUPPORTED_EXTENSIONS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(
            f"{path}: unsupported file extension {path.suffix!r}; supported: "
            f"{', '.join(SUPPORTED_EXTENSIONS)}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty")

    rows = _read_rows(path, builder, cache_dir)
    if not rows:
        raise ValueError(f"{path}: the file has no rows")
    fmt = data_format
    if fmt == "auto":
        fmt = detect_format(set().union(*(row.keys() for row in rows)), path)
    if fmt == "chat" and builder == "csv":
        raise ValueError(
            f"{path}: chat data in CSV is not supported (a 'messages' cell would be "
            "text, not a list of messages); use JSON, JSONL or Parquet"
        )
    task = path.stem
    if fmt == "chat":
        return [_conversation(task, row, path, i) for i, row in enumerate(rows)]
    examples = [_alpaca(task, row, path, i) for i, row in enumerate(rows)]
    kept = [ex for ex in examples if ex.answer.strip()]
    if len(kept) < len(examples):
        log.warning("%s: skipped %d empty outputs", path, len(examples) - len(kept))
    return kept


def detect_format(columns: Iterable[str], path: str | Path = "<data>") -> str:
    """Return ``"alpaca"`` or ``"chat"`` from a file's column names.

    Raises:
        ValueError: both or neither format fits; lists the columns found and
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
    raise ValueError(
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
        # CSV has no types: read every cell as text, else an answer "007" would
        # arrive as the int 7. Empty cells stay "" rather than NaN.
        with path.open(newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        string = datasets.Value("string")
        kwargs["features"] = datasets.Features({name: string for name in header})
        kwargs["keep_default_na"] = False
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
            raise ValueError(f"{path}: could not read as {builder}: {err}") from err
        return _json_rows(path)  # says which row is bad, or reads what it can
    if builder == "json" and _has_json_feature(ds.features):
        # A column of mixed types comes back as datasets.Json, which turns the
        # string "19" into the int 19: re-read exactly, so errors name the row
        # that is really wrong and valid strings stay strings.
        return _json_rows(path)
    return ds.to_list()


def _has_json_feature(feature: Any) -> bool:
    if isinstance(feature, datasets.Json):
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
        for i, line in enumerate(ln for ln in text.splitlines() if ln.strip()):
            try:
                data.append(json.loads(line))
            except json.JSONDecodeError as err:
                if i == 0:  # most likely one (broken) document, not JSON lines
                    raise ValueError(f"{path}: not valid JSON: {whole_err}") from None
                raise ValueError(
                    f"{path}: row {i} (0-based) is not valid JSON: {err}"
                ) from None
    if isinstance(data, dict):
        data = [data]  # as datasets reads a lone object
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of JSON objects or JSON lines")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise ValueError(
                f"{path}: row {i} (0-based) is not a JSON object: {row!r:.80}"
            )
    return data


def _bad(path: Path, row: int, field: str, why: str) -> ValueError:
    return ValueError(f"{path}: row {row} (0-based): field '{field}' {why}")


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
        raise ValueError(
            f"{path}: row {i} (0-based): field 'messages': {err}"
        ) from None
    kept = tuple({"role": m["role"], "content": m["content"]} for m in messages)
    return Conversation(task, kept)
