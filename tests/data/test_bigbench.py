"""BIG-bench fetching, parsing and splitting on a synthetic archive."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from splitft.data import (
    BIGBENCH_TASKS,
    Example,
    bigbench,
    fetch_bigbench,
    load_task,
    split_examples,
)

ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks/"

TASKS = {
    "adding": {
        "task_prefix": "Add the numbers.",
        "examples": [
            {"input": "What is 1 plus 2?", "target": "3"},
            {"input": "What is 2 plus 2?", "target": ["4", "four"]},
            {"input": "", "target": ""},  # real tasks contain such blanks
        ],
    },
    "dates/easy": {
        "examples": [
            {"input": "Tomorrow?", "target_scores": {"x": 0, "01/03/2020": 1}},
            {"input": "Yesterday?", "target_scores": {"01/01/2020": 1.0, "y": 0.0}},
        ],
    },
    "dates/hard": {"examples": [{"input": "q", "target": "a"}]},
    "dates": {"name": "dates", "description": "parent of subtasks"},
}


def write_archive(path: Path, tasks: dict) -> Path:
    """A tar.gz laid out like the bigbench sdist, plus an unrelated member."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        members = {ROOT + t + "/task.json": json.dumps(d) for t, d in tasks.items()}
        members["bigbench-1.0.0/setup.py"] = "print('not a task')"
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    return write_archive(tmp_path / "src" / "bigbench-1.0.0.tar.gz", TASKS)


def test_fetch_extracts_only_requested(archive: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    root = fetch_bigbench(["adding", "dates/easy"], cache, archive=archive)
    assert root == cache / "bigbench"
    files = sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()
    )
    assert files == ["adding/task.json", "dates/easy/task.json"]


def test_fetch_uses_cache_and_default_archive_location(archive: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    (cache / "downloads").mkdir(parents=True)
    cached_archive = archive.rename(cache / "downloads" / archive.name)
    fetch_bigbench(["adding"], cache)
    cached_archive.unlink()  # cached tasks must not need the archive again
    fetch_bigbench(["adding"], cache)
    assert load_task("adding", cache)


def test_fetch_downloads_missing_archive(monkeypatch, tmp_path: Path):
    """No archive in the cache: pip (a pinned one, run from its wheel) gets it."""
    commands: list[list[str]] = []

    def fake_run(cmd: list[str], check: bool) -> None:
        commands.append(cmd)
        if "bigbench==1.0.0" in cmd:
            write_archive(Path(cmd[-1]) / "bigbench-1.0.0.tar.gz", TASKS)

    monkeypatch.setattr(bigbench.subprocess, "run", fake_run)
    fetch_bigbench(["adding"], tmp_path)
    assert load_task("adding", tmp_path)
    assert commands[0][-3:] == ["pip==26.2.1", "-d", str(tmp_path / "downloads")]
    assert commands[1][1].endswith("pip-26.2.1-py3-none-any.whl/pip")
    assert commands[1][2:] == [
        "download", "--no-deps", "--no-binary", ":all:", "bigbench==1.0.0",
        "-d", str(tmp_path / "downloads"),
    ]  # fmt: skip


def test_missing_explicit_archive(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        fetch_bigbench(["adding"], tmp_path, archive=tmp_path / "nope.tar.gz")


def test_unknown_task_names_it_and_suggests(archive: Path, tmp_path: Path):
    with pytest.raises(ValueError, match=r"'addng'.*did you mean 'adding'"):
        fetch_bigbench(["adding", "addng"], tmp_path, archive=archive)


@pytest.mark.parametrize("name", ["../adding", "/adding", "dates//easy", ""])
def test_invalid_task_name(name: str, tmp_path: Path):
    with pytest.raises(ValueError, match="invalid BIG-bench task name"):
        fetch_bigbench([name], tmp_path, archive=tmp_path / "unused.tar.gz")


def test_load_target_task(archive: Path, tmp_path: Path):
    fetch_bigbench(["adding"], tmp_path, archive=archive)
    assert load_task("adding", tmp_path) == [  # the blank example is skipped
        Example("adding", "Add the numbers.\nWhat is 1 plus 2?", "3"),
        Example("adding", "Add the numbers.\nWhat is 2 plus 2?", "4"),
    ]


def test_load_target_scores_task(archive: Path, tmp_path: Path):
    fetch_bigbench(["dates/easy"], tmp_path, archive=archive)
    first, second = load_task("dates/easy", tmp_path)
    assert first == Example(
        "dates/easy", "Tomorrow?", "01/03/2020", ("x", "01/03/2020"), 1
    )
    assert (second.answer, second.choices, second.correct) == (
        "01/01/2020",
        ("01/01/2020", "y"),
        0,
    )


def test_parent_task_without_examples(archive: Path, tmp_path: Path):
    fetch_bigbench(["dates"], tmp_path, archive=archive)
    with pytest.raises(ValueError, match="subtask"):
        load_task("dates", tmp_path)


@pytest.mark.parametrize(
    ("example", "field"),
    [
        ({"target": "3"}, "input"),
        ({"input": "q"}, "target"),
        ({"input": "q", "target": 3}, "target"),
        ({"input": "q", "target": []}, "target"),
        ({"input": "q", "target_scores": {}}, "target_scores"),
        ({"input": "q", "target_scores": {"a": "high"}}, "target_scores"),
    ],
)
def test_malformed_example_names_file_index_field(example, field, tmp_path: Path):
    bad = {"examples": [{"input": "ok", "target": "ok"}, example]}
    archive = write_archive(tmp_path / "bad.tar.gz", {"broken": bad})
    fetch_bigbench(["broken"], tmp_path, archive=archive)
    with pytest.raises(
        ValueError, match=rf"broken.task\.json: example 1: field '{field}'"
    ):
        load_task("broken", tmp_path)


def make_examples(task: str, n: int) -> list[Example]:
    return [Example(task, f"{task} q{i}", f"a{i}") for i in range(n)]


def test_split_is_deterministic_disjoint_and_per_task_stable():
    a, b = make_examples("a", 40), make_examples("b", 10)
    train, held = split_examples(a + b, eval_size=8, seed=1)
    assert (train, held) == split_examples(a + b, eval_size=8, seed=1)
    assert sorted(train + held, key=lambda e: e.prompt) == sorted(
        a + b, key=lambda e: e.prompt
    )
    assert not set(train) & set(held)
    assert [e.task for e in held].count("a") == 8
    assert [e.task for e in held].count("b") == 5  # capped at half of 10

    # Adding a task (and reordering) leaves task "a" untouched.
    more_train, more_held = split_examples(b + make_examples("c", 7) + a, 8, seed=1)
    assert [e for e in more_train if e.task == "a"] == [
        e for e in train if e.task == "a"
    ]
    assert [e for e in more_held if e.task == "a"] == [e for e in held if e.task == "a"]
    assert split_examples(a, 8, seed=2)[1] != held[:8]


@given(n=st.integers(0, 60), eval_size=st.integers(0, 80), seed=st.integers(0, 9))
def test_split_sizes(n: int, eval_size: int, seed: int):
    train, held = split_examples(make_examples("t", n), eval_size, seed)
    assert len(held) == min(eval_size, n // 2)
    assert len(train) + len(held) == n


def test_negative_eval_size():
    with pytest.raises(ValueError):
        split_examples(make_examples("t", 4), -1, 0)


@pytest.mark.integration
def test_default_tasks_from_real_archive():
    cache = Path(os.environ.get("SPLITFT_CACHE", "~/.cache/splitft")).expanduser()
    extracted = all(
        (cache / "bigbench" / t / "task.json").is_file() for t in BIGBENCH_TASKS
    )
    if not extracted and not (cache / "downloads" / "bigbench-1.0.0.tar.gz").is_file():
        pytest.skip(f"no BIG-bench archive or extracted tasks under {cache}")
    fetch_bigbench(BIGBENCH_TASKS, cache)
    for task in BIGBENCH_TASKS:
        assert len(load_task(task, cache)) >= 50, task


def test_split_never_trains_on_a_held_out_prompt():
    from splitft.data.bigbench import Example, split_examples

    exs = [Example("t", f"q{i % 5}", str(i)) for i in range(40)]  # 5 prompts x 8
    train, held = split_examples(exs, eval_size=2, seed=0)
    assert len(held) == 2
    assert not {e.prompt for e in train} & {e.prompt for e in held}
    assert len(train) == 40 - 8 * len({h.prompt for h in held})
