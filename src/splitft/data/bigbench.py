"""BIG-bench tasks: fetch them from the PyPI source archive, parse, and split.

BIG-bench (Apache-2.0) ships its JSON tasks inside the ``bigbench==1.0.0`` sdist,
a 358 MB tar.gz. We download it once with pip (or take it from a path) and
stream it once to pull out only the ``task.json`` files we need, so the whole
archive is never unpacked. The registry stopped serving that release here
(2026-12-07), so BIG-bench is no longer the default data
(:mod:`splitft.data.generated` is); :class:`Example` and :func:`split_examples`
serve every task source.
"""

from __future__ import annotations

import difflib
import json
import logging
import random
import subprocess
import sys
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ARCHIVE_NAME = "bigbench-1.0.0.tar.gz"
_MEMBER_ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks/"
_MEMBER_FILE = "/task.json"
# pip >= 26.3 refuses this sdist, even with --no-deps, because its metadata names
# a direct-URL dependency (bleurt). An older pip, run straight from its wheel,
# downloads it fine.
_PIP_PIN = "26.2.1"


@dataclass(frozen=True)
class Example:
    """One BIG-bench example.

    ``choices``/``correct`` are set only for tasks with ``target_scores``, so
    multiple-choice scoring stays possible; ``answer`` is always the text to learn.
    """

    task: str
    prompt: str
    answer: str
    choices: tuple[str, ...] = ()
    correct: int = -1


def fetch_bigbench(
    tasks: Sequence[str], cache_dir: Path, archive: Path | None = None
) -> Path:
    """Make sure ``cache_dir/bigbench/<task>/task.json`` exists for every task.

    Args:
        tasks: task names relative to ``benchmark_tasks``, e.g. ``"qa_wikidata"``.
        cache_dir: root of the cache; the archive lives in ``cache_dir/downloads``.
        archive: use this archive instead of the cached (or downloaded) one.

    Returns:
        The ``cache_dir/bigbench`` directory.

    Raises:
        ValueError: a task is not in the archive (close matches are suggested).
        FileNotFoundError: ``archive`` was given but does not exist.
        RuntimeError: the archive could not be downloaded.
    """
    root = Path(cache_dir) / "bigbench"
    missing = {t for t in tasks if not _task_file(root, t).is_file()}
    if not missing:
        return root
    if archive is None:
        archive = Path(cache_dir) / "downloads" / ARCHIVE_NAME
        if not archive.is_file():
            _download_archive(archive.parent)
    elif not Path(archive).is_file():
        raise FileNotFoundError(f"BIG-bench archive not found: {archive}")
    _extract_tasks(Path(archive), missing, root)
    return root


def load_task(task: str, cache_dir: Path) -> list[Example]:
    """Parse an already fetched task into examples.

    The prompt is the raw input with the task's ``task_prefix`` in front. The
    few-shot glue (``example_input_prefix``/``example_output_prefix``, e.g.
    ``"\\nQ: "``/``"\\nA: "``) is dropped: the chat template's roles play that part.
    Examples with an empty answer teach nothing and are skipped with a warning.

    Raises:
        FileNotFoundError: the task was not fetched.
        ValueError: the file or an example is malformed (names file, index, field).
    """
    path = _task_file(Path(cache_dir) / "bigbench", task)
    data = json.loads(path.read_text(encoding="utf-8"))
    raw = data.get("examples") if isinstance(data, dict) else None
    if not isinstance(raw, list):
        raise ValueError(
            f"{path}: no 'examples' list; a task split into subtasks must be named "
            "by its subtask, e.g. 'arithmetic/2_digit_addition'"
        )
    prefix = data.get("task_prefix") or ""
    examples = [_parse_example(task, prefix, ex, path, i) for i, ex in enumerate(raw)]
    kept = [ex for ex in examples if ex.answer.strip()]
    if len(kept) < len(examples):
        log.warning("%s: skipped %d empty examples", task, len(examples) - len(kept))
    return kept


def split_examples(
    examples: Iterable[Example], eval_size: int, seed: int
) -> tuple[list[Example], list[Example]]:
    """Hold out ``eval_size`` examples per task (at most half of each task).

    Each task is shuffled with its own ``Random(f"{seed}:{task}")``, so adding or
    removing a task never changes another task's split.

    Returns:
        ``(train, eval)``, grouped by task in first-seen order, each task shuffled;
        training examples whose prompt is held out are dropped.
    """
    if eval_size < 0:
        raise ValueError(f"eval_size must be >= 0, got {eval_size}")
    by_task: dict[str, list[Example]] = {}
    for ex in examples:
        by_task.setdefault(ex.task, []).append(ex)
    train: list[Example] = []
    held: list[Example] = []
    for task, items in by_task.items():
        items = list(items)
        random.Random(f"{seed}:{task}").shuffle(items)
        k = min(eval_size, len(items) // 2)
        held += items[:k]
        # a prompt that is held out never also appears in training (some
        # tasks repeat a prompt, e.g. qa_wikidata)
        seen = {_prompt_key(ex) for ex in items[:k]}
        train += [ex for ex in items[k:] if _prompt_key(ex) not in seen]
    return train, held


def _prompt_key(record) -> str:
    """What the model is asked: the prompt, or a chat's turns before the answer."""
    prompt = getattr(record, "prompt", None)
    return prompt if prompt is not None else repr(record.messages[:-1])


def _task_file(root: Path, task: str) -> Path:
    parts = task.split("/")
    if not task or task.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid BIG-bench task name: {task!r}")
    return root.joinpath(*parts, "task.json")


def _parse_example(task: str, prefix: str, ex: Any, path: Path, index: int) -> Example:
    def bad(field: str, why: str) -> ValueError:
        return ValueError(f"{path}: example {index}: field '{field}' {why}")

    if not isinstance(ex, dict):
        raise bad("<example>", "is not a JSON object")
    text = ex.get("input")
    if not isinstance(text, str):
        raise bad("input", "is missing or not a string")
    prompt = f"{prefix.rstrip()}\n{text}" if prefix.strip() else text

    choices: tuple[str, ...] = ()
    correct = -1
    scores = ex.get("target_scores")
    if scores is not None:
        if not isinstance(scores, dict) or not scores:
            raise bad("target_scores", "is not a non-empty object")
        values = list(scores.values())
        if not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in values
        ):
            raise bad("target_scores", "has a non-numeric score")
        choices = tuple(scores)
        correct = values.index(max(values))  # first best on ties

    target = ex.get("target")
    if isinstance(target, list):
        if not target or not all(isinstance(t, str) for t in target):
            raise bad("target", "is not a non-empty list of strings")
        target = target[0]  # other entries are alternative references
    if target is None and choices:
        target = choices[correct]
    if not isinstance(target, str):
        raise bad("target", "is missing (and no 'target_scores') or not a string")
    return Example(task, prompt, target, choices, correct)


def _download_archive(downloads: Path) -> None:
    """Download the bigbench sdist into ``downloads`` with a pinned pip."""
    downloads.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s (358 MB) into %s", ARCHIVE_NAME, downloads)
    pip = [sys.executable, "-m", "pip"]
    _pip_download(pip, downloads, "--only-binary", ":all:", f"pip=={_PIP_PIN}")
    # A pip wheel runs in place: python pip-X-py3-none-any.whl/pip ...
    old_pip = downloads / f"pip-{_PIP_PIN}-py3-none-any.whl" / "pip"
    args = ("--no-binary", ":all:", "bigbench==1.0.0")
    _pip_download([sys.executable, str(old_pip)], downloads, *args)
    if not (downloads / ARCHIVE_NAME).is_file():
        raise RuntimeError(f"pip finished but {downloads / ARCHIVE_NAME} is missing")


def _pip_download(pip: list[str], dest: Path, *args: str) -> None:
    cmd = [*pip, "download", "--no-deps", *args, "-d", str(dest)]
    try:
        subprocess.run(cmd, check=True)
    except (OSError, subprocess.CalledProcessError) as err:
        raise RuntimeError(
            f"could not download {ARCHIVE_NAME} ({err}); the registry may no "
            "longer serve bigbench==1.0.0 (it did not on 2026-12-07). Put the "
            f"archive in {dest} by hand, or pass it with `splitft prepare "
            "--bigbench-archive FILE`; or use the default data.source=generated"
        ) from err


def _extract_tasks(archive: Path, tasks: set[str], root: Path) -> None:
    """Copy the wanted task.json files out of ``archive`` in one streaming pass."""
    wanted = {_MEMBER_ROOT + t + _MEMBER_FILE: t for t in tasks}
    seen: list[str] = []  # every task in the archive, for suggestions
    with tarfile.open(archive, mode="r|gz") as tar:
        for member in tar:
            name = member.name
            if name.startswith(_MEMBER_ROOT) and name.endswith(_MEMBER_FILE):
                seen.append(name[len(_MEMBER_ROOT) : -len(_MEMBER_FILE)])
            task = wanted.pop(name, None)
            if task is None or not member.isfile():
                continue
            source = tar.extractfile(member)
            assert source is not None  # regular file
            # Write to the path built from the task name, never the member's
            # own path, and atomically so a half-written file is never "cached".
            dest = _task_file(root, task)
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_suffix(".json.part")
            tmp.write_bytes(source.read())
            tmp.replace(dest)
            if not wanted:
                return  # streaming mode: stop before reading the rest
    unknown = sorted(wanted.values())
    hints = {t: difflib.get_close_matches(t, seen, n=3, cutoff=0.5) for t in unknown}
    detail = "; ".join(
        f"{t!r} (did you mean {', '.join(map(repr, h))}?)" if h else repr(t)
        for t, h in hints.items()
    )
    raise ValueError(f"unknown BIG-bench task(s) in {archive.name}: {detail}")
