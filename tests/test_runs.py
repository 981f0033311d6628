"""Durable runs: atomic outputs, one live run per folder, checkpoints, resume."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import synthetic
import torch
from simrun import (
    adapter_of,
    assert_same_run,
    base_settings,
    config,
    make_assets,
    whole_and_interrupted,
)

from splitft import lora, runs
from splitft.cli import main
from splitft.config import load_config
from splitft.federation.simulation import Simulation


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("runs"))


# ------------------------------------------------------------ atomic writes
def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = runs.write_text(tmp_path / "summary.json", "old\n")

    def half_then_full(tmp):
        tmp.write_text("new but cut sh")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as e:
        runs.write_atomic(path, half_then_full)
    assert runs.disk_full(e.value)
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_failed_folder_write_leaves_the_old_folder(tmp_path):
    target = tmp_path / "adapter"
    with runs.atomic_folder(target) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(RuntimeError), runs.atomic_folder(target) as tmp:
        (tmp / "a.txt").write_text("2")
        raise RuntimeError("killed")
    assert (target / "a.txt").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_recover_puts_back_a_folder_moved_aside_mid_swap(tmp_path):
    (tmp_path / ".adapter.old").mkdir()  # killed between the two renames
    (tmp_path / ".adapter.old" / "w").write_text("complete")
    (tmp_path / ".adapter.x1.tmp").mkdir()
    (tmp_path / ".summary.json.y.tmp").write_text("{")
    runs.recover(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert (tmp_path / "adapter" / "w").read_text() == "complete"


def test_export_onto_a_full_disk_keeps_the_previous_outputs(
    assets, tmp_path, monkeypatch
):
    cfg = config(assets, tmp_path, "name=full", "federation.rounds=1")
    Simulation(cfg, synthetic.costs(num_layers=4)).run(table=False)
    before = adapter_of(cfg.run_dir)
    summary = (cfg.run_dir / "summary.json").read_bytes()
    sim = Simulation(cfg, synthetic.costs(num_layers=4), resume=True)

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)  # part of the weights, then
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(lora, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        sim.run(table=False)  # round 1 is done: straight to the export
    after = adapter_of(cfg.run_dir)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert (cfg.run_dir / "summary.json").read_bytes() == summary
    assert not list(cfg.run_dir.glob(".*"))  # no temporaries left
    assert runs.read_status(cfg.run_dir)["state"] == "failed"
    assert runs.checkpoints(cfg.run_dir)  # and the checkpoint is intact


def test_an_unwritable_out_dir_is_found_before_the_model_loads(assets, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cfg = config(assets, tmp_path, f"out_dir={blocker}")
    with pytest.raises(runs.RunError, match="cannot write here"):
        Simulation(cfg).setup()


# ----------------------------------------------------------------- locks
def test_a_second_live_run_of_a_name_is_refused_and_a_stale_lock_taken(
    assets, tmp_path, caplog
):
    cfg = config(assets, tmp_path, "name=busy", "federation.rounds=1")
    cfg.run_dir.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (cfg.run_dir / "lock").write_text(
            json.dumps({"pid": sleeper.pid, "host": os.uname().nodename})
        )
        with pytest.raises(runs.RunError, match=f"in use by process {sleeper.pid}"):
            Simulation(cfg, synthetic.costs(num_layers=4)).setup()
        assert (cfg.run_dir / "lock").exists()  # and nothing was moved
    finally:
        sleeper.kill()
        sleeper.wait()
    # the holder is gone: its lock is stale, and the run goes ahead
    Simulation(cfg, synthetic.costs(num_layers=4)).run(table=False)
    assert "stale lock" in caplog.text
    assert runs.read_status(cfg.run_dir)["state"] == "complete"
    assert not (cfg.run_dir / "lock").exists()


# ---------------------------------------------------------------- resume
@pytest.mark.parametrize(
    "settings",
    [
        ("federation.server_side=per_client",),
        ("federation.server_side=shared", "federation.policy=adaptive"),
        ("federation.policy=random", "federation.clients_per_round=3"),
    ],
    ids=["fixed-per_client", "adaptive-shared", "random-selection"],
)
def test_interrupted_and_resumed_equals_uninterrupted(assets, tmp_path, settings):
    common = ("sim.timing=predicted", "federation.rounds=4", *settings)
    whole, cut = whole_and_interrupted(assets, tmp_path, common, 2)
    status = runs.read_status(cut.run_dir)
    assert status["state"] == "interrupted" and status["round"] == 2
    assert not (cut.run_dir / "adapter").exists()
    resumed = Simulation(cut, resume=True)  # the cost model comes from the folder
    resumed.run(table=False)
    assert resumed.start_round == 2
    assert_same_run(whole.run_dir, cut.run_dir)
    assert [p.name for p in runs.checkpoints(cut.run_dir)] == [
        "round-0003",
        "round-0004",
    ]  # checkpoint.keep = 2


# ------------------------------------------------------- kill -9, for real
def _cli(tmp_path, assets, *args, fault=None, name="k"):
    env = {**os.environ, "SPLITFT_FAULT": fault or ""}
    cmd = [sys.executable, "-m", "splitft.cli", "run", *args]
    if "--resume" not in args:
        cmd += [
            *base_settings(assets, tmp_path),
            f"name={name}",
            "federation.num_clients=3",
            "federation.rounds=3",
            "federation.local_steps=2",
            "federation.policy=adaptive",
            "sim.mix=[workstation, laptop, phone]",
            "sim.timing=predicted",
            f"sim.cost_model={tmp_path / 'costs.json'}",
        ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def uninterrupted(assets, tmp_path_factory):
    """The run every killed-and-resumed one must end equal to."""
    root = tmp_path_factory.mktemp("whole")
    synthetic.costs(num_layers=4).save(root / "costs.json")
    whole = _cli(root, assets, name="whole")
    assert whole.returncode == 0, whole.stderr
    return root / "whole"


# a kill in a round, mid-checkpoint and in the export (one during evaluation,
# which writes nothing, leaves what a kill in a round leaves; its SIGTERM is
# below)
@pytest.mark.parametrize(
    "fault",
    ["step:5", "checkpoint:2", "export:1"],
    ids=["during-a-round", "during-a-checkpoint", "export"],
)
def test_kill_9_then_resume_ends_like_an_uninterrupted_run(
    assets, uninterrupted, tmp_path, fault
):
    synthetic.costs(num_layers=4).save(tmp_path / "costs.json")
    killed = _cli(tmp_path, assets, fault=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run_dir = tmp_path / "k"
    assert not (run_dir / "summary.json").exists()
    assert runs.read_status(run_dir)["state"] == "running"  # as the kill left it
    status = subprocess.run(
        [sys.executable, "-m", "splitft.cli", "status", str(run_dir)],
        capture_output=True,
        text=True,
    )
    assert "stopped (killed; resumable)" in status.stdout
    resumed = _cli(tmp_path, assets, "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert runs.read_status(run_dir)["state"] == "complete"
    assert_same_run(uninterrupted, run_dir)


# (fault point, signal, the last checkpoint it leaves): Ctrl-C in a round,
# SIGTERM in aggregation, during evaluation, mid-checkpoint (the write
# finishes first) and during the export (the two signals take one path:
# tests/test_interrupts.py; a deployed server's own instants:
# tests/federation/test_stopping.py)
STOPS = [
    ("step:9", "SIGINT", 1),
    ("aggregate:2", "SIGTERM", 1),
    ("eval:3", "SIGTERM", 1),
    ("checkpoint:2", "SIGTERM", 2),
    ("export:1", "SIGTERM", 3),
]


@pytest.mark.parametrize(
    "point, sig, last", STOPS, ids=[f"{p.split(':')[0]}-{s}" for p, s, _ in STOPS]
)
def test_a_signal_ends_the_run_in_seconds_with_one_line_saying_how_to_resume(
    assets, uninterrupted, tmp_path, point, sig, last
):
    from deployed import record_stop, signalled_at

    synthetic.costs(num_layers=4).save(tmp_path / "costs.json")
    stopped = _cli(tmp_path, assets, fault=f"{point}:{sig}")
    took = time.time() - signalled_at(stopped.stderr)
    record_stop(f"run {point.split(':')[0]}", sig, took)
    assert stopped.returncode == 128 + signal.Signals[sig]  # 130, 143
    assert took < 10.0  # the bound: a hang, not a speed (see test_stopping)
    lines = [line for line in stopped.stderr.splitlines() if "splitft:" in line]
    run_dir = tmp_path / "k"
    assert lines == [
        f"splitft: interrupted ({sig}); last checkpoint "
        f"{run_dir / 'checkpoints' / f'round-{last:04d}'}; resume with: "
        f"splitft run --resume {run_dir}"
    ]
    assert "Traceback" not in stopped.stderr
    status = runs.read_status(run_dir)
    assert status["state"] == "interrupted" and status["round"] == last
    assert not (run_dir / "lock").exists()
    resumed = _cli(tmp_path, assets, "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(uninterrupted, run_dir)


def test_resume_of_a_folder_that_is_not_a_run_is_one_line(tmp_path, capsys):
    assert main(["run", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not a run folder (no config.yaml)" in err and "Traceback" not in err
    assert main(["run", "--resume", str(tmp_path), "train.lr=1"]) == 2
    assert "--resume takes no config or overrides" in capsys.readouterr().err


def test_numbers_from_the_command_line_reach_the_run(tmp_path):
    cfg = load_config(None, ["train.lr=1e-3", f"out_dir={tmp_path}"])
    assert cfg.train.lr == 0.001
