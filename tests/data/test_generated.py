"""The generated tasks: the default data, the same on every machine."""

import datetime

import pytest

from splitft.config import BIGBENCH_TASKS, GENERATED_TASKS, ConfigError, DataConfig
from splitft.data.generated import generate


@pytest.mark.parametrize("task", GENERATED_TASKS)
def test_a_task_is_the_same_every_time_and_its_answers_are_right(task):
    examples = generate(task)
    assert examples == generate(task)  # seeded by the name, not the run
    assert len(examples) >= 900
    assert len({ex.prompt for ex in examples}) == len(examples)
    for ex in examples:
        assert ex.task == task and ex.answer.strip()
        if ex.choices:
            assert len(set(ex.choices)) == len(ex.choices) >= 2
            assert ex.choices[ex.correct] == ex.answer


def test_the_answers_are_computed_not_copied():
    for ex in generate("addition", 50):
        a, b = ex.prompt.removeprefix("What is ").removesuffix("?").split(" plus ")
        assert int(ex.answer) == int(a) + int(b)
    for ex in generate("subtraction", 50):
        a, b = ex.prompt.removeprefix("What is ").removesuffix("?").split(" minus ")
        assert int(ex.answer) == int(a) - int(b)
    for ex in generate("dates", 50):
        words = ex.prompt.split()
        today = datetime.datetime.strptime(words[2].rstrip("."), "%m/%d/%Y")
        days = int(words[7]) * (1 if words[9] == "after" else -1)
        answer = datetime.datetime.strptime(ex.answer, "%m/%d/%Y")
        assert answer - today == datetime.timedelta(days=days)
    for ex in generate("sorting", 50):
        words = ex.prompt.split(": ", 1)[1].split(", ")
        assert ex.answer == ", ".join(sorted(words))


def test_the_tasks_differ_in_length():
    mean = {
        t: sum(len(ex.prompt) for ex in generate(t, 200)) / 200 for t in GENERATED_TASKS
    }
    assert mean["sorting"] > 1.5 * mean["addition"]


def test_an_unknown_task_is_named_with_the_allowed_ones():
    with pytest.raises(ValueError, match=r"data.tasks: 'multiplication'.*addition"):
        generate("multiplication")
    with pytest.raises(ConfigError, match=r"data.tasks=\['multiplication'\]"):
        DataConfig(tasks=["multiplication"])


def test_each_source_has_its_default_tasks():
    assert DataConfig().source == "generated"
    assert DataConfig().tasks == list(GENERATED_TASKS)
    assert DataConfig(source="bigbench").tasks == list(BIGBENCH_TASKS)
    assert DataConfig(source="bigbench", tasks=["qa_wikidata"]).tasks == ["qa_wikidata"]
