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
