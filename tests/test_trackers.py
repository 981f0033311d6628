"""Metric trackers: TensorBoard, W&B (offline) and Trackio hold the round
records metrics.jsonl holds, once each, across a resume."""

import json
import signal
from pathlib import Path

import pytest
from simrun import config, interrupt_after, make_assets
from tracked import tensorboard, trackio_rows, wandb_history

from splitft import interrupts, trackers
from splitft.config import ConfigError, load_config
from splitft.federation.simulation import Simulation
from splitft.plots import read_rounds

ALL = "log.to=[tensorboard, wandb, trackio]"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("trackers"))


@pytest.fixture(scope="module")
def finished(assets, tmp_path_factory):
    """A finished tiny run logging to every tracker."""
    out = tmp_path_factory.mktemp("runs")
    cfg = config(assets, out, "name=tracked", ALL, "federation.rounds=2")
    Simulation(cfg).run(table=False)
    return cfg.run_dir


def expected(run_dir: Path) -> dict[int, dict[str, float]]:
    rounds = read_rounds(run_dir)
    return {r["round"]: trackers.scalars(r, cut_rank=4) for r in rounds}


# ------------------------------------------------------------------ tests
def test_tensorboard_holds_every_round_of_metrics_jsonl(finished):
    want = expected(finished)
    got = tensorboard(finished)
    for tag in ("train/loss", "eval/loss", "eval/token_acc", "comm/bytes_up"):
        assert tag in got, sorted(got)
    assert "cut/client_0" in got and "server/busy_share" in got
    for tag, points in got.items():
        steps = [s for s, _, _ in points]
        assert steps == sorted(set(steps)), tag
        for step, value, _ in points:
            assert value == pytest.approx(want[step][tag], rel=1e-6), (tag, step)
    # the Relative axis is the simulated time: each point at start + sim_s
    start = json.loads((finished / trackers.IDENTITY).read_text())["start"]
    for step, _, wall in got["eval/loss"]:
        sim_s = read_rounds(finished)[step]["sim_time_s"]
        assert wall - start == pytest.approx(sim_s, abs=1e-3)


def test_wandb_offline_folder_holds_the_history(finished):
    assert list((finished / "wandb").glob("offline-run-*"))
    rows = wandb_history(finished)
    want = expected(finished)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows:
        rnd = row["round"]
        assert row["_step"] == rnd
        assert row["sim_time_s"] == pytest.approx(want[rnd].get("time/sim_s", 0.0))
        for tag, value in want[rnd].items():
            assert row[tag] == pytest.approx(value), (tag, rnd)


def test_trackio_store_holds_the_rounds(finished):
    rows = trackio_rows(finished)
    want = expected(finished)
    assert [step for step, _ in rows] == [0, 1, 2]
    for step, metrics in rows:
        assert metrics["round"] == step
        for tag, value in want[step].items():
            assert metrics[tag] == pytest.approx(value), (tag, step)


def test_a_resumed_run_continues_the_same_curves(assets, tmp_path):
    """Interrupted after round 2's checkpoint, and once more inside round 3
    after its record was made (before its checkpoint): each tracker holds
    rounds 0-4 once, with the resumed run's values."""
    common = (ALL, "federation.rounds=4", "sim.timing=predicted")
    cfg = config(assets, tmp_path, "name=resumed", *common)

    with pytest.raises(interrupts.Interrupted):
        Simulation(cfg).run(interrupt_after(2), table=False)

    class Once(Simulation):  # interrupted between round 3's record and checkpoint
        def checkpoint(self, rnd):
            if rnd == 3:
                raise interrupts.Interrupted(signal.SIGINT)
            return super().checkpoint(rnd)

    with pytest.raises(interrupts.Interrupted):
        Once(cfg, resume=True).run(table=False)
    resumed = Simulation(cfg, resume=True)
    resumed.run(table=False)
    assert resumed.start_round == 2

    want = expected(cfg.run_dir)
    board = tensorboard(cfg.run_dir)
    assert [s for s, _, _ in board["train/loss"]] == [1, 2, 3, 4]
    assert [s for s, _, _ in board["eval/loss"]] == [0, 1, 2, 3, 4]
    for step, value, _ in board["eval/loss"]:
        assert value == pytest.approx(want[step]["eval/loss"], rel=1e-6)
    rows = wandb_history(cfg.run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    assert len(list((cfg.run_dir / "wandb").glob("offline-run-*"))) >= 2
    for row in rows:
        assert row["eval/loss"] == pytest.approx(want[row["round"]]["eval/loss"])
    assert [step for step, _ in trackio_rows(cfg.run_dir)] == [0, 1, 2, 3, 4]


def test_auto_is_tensorboard_when_installed_and_jsonl_is_always_on():
    assert trackers.chosen(["auto"]) == ["tensorboard"]
    assert trackers.chosen(["jsonl"]) == []
    assert trackers.chosen(["wandb", "jsonl", "wandb"]) == ["wandb"]


def test_a_tracker_not_installed_names_its_extra(monkeypatch):
    monkeypatch.setattr(trackers, "installed", lambda name: name != "wandb")
    with pytest.raises(ConfigError, match=r"pip install 'splitft\[wandb\]'"):
        trackers.chosen(["tensorboard", "wandb"])
    monkeypatch.setattr(trackers, "installed", lambda name: False)
    assert trackers.chosen(["auto"]) == []  # auto without TensorBoard: jsonl only


@pytest.mark.parametrize(
    "setting, key",
    [
        ("log.to=[mlflow]", "log.to"),
        ("log.to=tensorboard", "log.to"),
        ("log.wandb_mode=cloud", "log.wandb_mode"),
    ],
)
def test_bad_log_settings_name_the_key(setting, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [setting])


def test_scalars_of_a_round_record():
    record = {
        "round": 3,
        "clients": [0, 2],
        "cuts": {"0": 2, "2": 5},
        "failed": [2],
        "train_loss": 1.5,
        "eval_loss": None,
        "sim_round_s": 4.0,
        "server_busy_s": 1.0,
        "timing": {"0": {"finish_s": 3.5}, "2": {"finish_s": 4.0}},
    }
    got = trackers.scalars(record, cut_rank=4)
    assert got["train/loss"] == 1.5 and "eval/loss" not in got
    assert got["server/busy_share"] == 0.25
    assert got["cut/client_2"] == 5.0 and got["cut_rank/client_2"] == 4.0
    assert got["round_s/client_0"] == 3.5
    assert got["clients/trained"] == 2.0 and got["clients/failed"] == 1.0
