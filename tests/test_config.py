from pathlib import Path

import pytest

from splitft.cli import main
from splitft.config import ConfigError, load_config


def test_defaults_yaml_then_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("federation:\n  rounds: 7\n  num_clients: 3\ntrain:\n  lr: 1\n")
    cfg = load_config(path, ["federation.rounds=2", "lora.cut_rank=2"])
    assert cfg.federation.rounds == 2 and cfg.federation.num_clients == 3
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.lora.cut_rank == 2 and cfg.lora.r == 8


@pytest.mark.parametrize(
    "override, message",
    [
        ("federation.nope=1", "unknown key 'federation.nope'; allowed: num_clients"),
        (
            "lora.cut_rank=9",
            "lora.cut_rank=9 is not allowed: an integer in [1, lora.r=8]",
        ),
        ("train.schedule=step", "train.schedule='step' is not allowed"),
        ("train.batch_size=two", "train.batch_size='two' is not allowed: an integer"),
        ("federation.cut_layers=3", "federation.cut_layers=3 is not allowed: a list"),
        (
            "federation.aggregation=trimmed",
            "federation.aggregation='trimmed' is not allowed: ('mean', 'median')",
        ),
        (
            "federation.max_samples_per_client=-1",
            "federation.max_samples_per_client=-1 is not allowed: >= 0",
        ),
        ("data.tasks=[addition, squares]", "data.tasks=['squares'] is not allowed"),
        (
            "client.checkpointing=layers",
            "client.checkpointing='layers' is not allowed: ('none', 'blocks')",
        ),
        (
            "client.base_dtype=fp16",
            "client.base_dtype='fp16' is not allowed: ('float32', 'bfloat16', 'int8', "
            "'nf4')",
        ),
        ("rounds", "must look like section.key=value"),
    ],
)
def test_bad_settings_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_cli_reports_config_errors(capsys):
    assert main(["run", "federation.rounds=0"]) == 2
    assert "federation.rounds=0 is not allowed" in capsys.readouterr().err


@pytest.mark.parametrize(
    "raw, value", [("1e-3", 1e-3), ("5E-4", 5e-4), ("1e3", 1000.0), ("2", 2.0)]
)
def test_numbers_as_users_write_them(tmp_path, raw, value):
    cli = load_config(None, [f"train.lr={raw}"])
    path = tmp_path / "c.yaml"
    path.write_text(f"train:\n  lr: {raw}\n")
    assert cli.train.lr == load_config(path).train.lr == value
    assert isinstance(cli.train.lr, float)


def test_integral_numbers_fit_integer_settings():
    cfg = load_config(None, ["federation.rounds=1e1", "federation.local_steps=3.0"])
    assert cfg.federation.rounds == 10 and isinstance(cfg.federation.rounds, int)
    with pytest.raises(ConfigError, match=r"federation.rounds=2.5 is not allowed"):
        load_config(None, ["federation.rounds=2.5"])
    with pytest.raises(ConfigError, match="an integer"):
        load_config(None, ["federation.rounds=true"])


@pytest.mark.parametrize("raw", ["inf", ".inf", "-inf", "nan", ".NaN", "1e999"])
def test_non_finite_numbers_are_refused_naming_the_setting(raw):
    with pytest.raises(ConfigError, match=r"train.lr=.* is not allowed: a finite"):
        load_config(None, [f"train.lr={raw}"])


@pytest.mark.parametrize(
    "name", ["../x", "a/b", "/abs", ".", "..", "a b", "runs\\x", "naïve"]
)
def test_run_names_that_are_not_one_plain_folder_name_are_refused(name):
    with pytest.raises(ConfigError, match=r"^name=.* is not allowed: one folder"):
        load_config(None, [f"name={name}"])


def test_plain_run_names_pass():
    for name in ("exp-1", "a_b.c", "...", "v1.2"):
        assert load_config(None, [f"name={name}"]).run_dir.name == name


@pytest.mark.parametrize(
    "content, message",
    [
        (b"train:\n  lr: [1\n", r"c.yaml: line \d+, column \d+: "),
        (b"train:\n  lr: \xff\xfe\n", "c.yaml: not UTF-8 text"),
        (b"- 1\n- 2\n", "c.yaml: the top level must be a mapping"),
    ],
)
def test_unreadable_yaml_is_one_error_naming_the_file(tmp_path, content, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_a_folder_or_a_missing_file_as_the_config(tmp_path, capsys):
    with pytest.raises(ConfigError, match="is a folder, not a YAML file"):
        load_config(tmp_path)
    assert main(["run", str(tmp_path / "none.yaml")]) == 2
    err = capsys.readouterr().err
    assert "none.yaml: no such file" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
)
def test_each_shipped_config_loads_and_names_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first == f"# splitft run configs/{path.name}"
    cfg = load_config(path, [])
    assert cfg.name == path.stem
