"""A run's plots: written at its end, and by ``splitft plot RUN_DIR``."""

import json

import pytest
from simrun import config, make_assets, run

from splitft.cli import main
from splitft.config import ConfigError
from splitft.plots import read_rounds


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run with the plots on (as a user's runs have them)."""
    root = tmp_path_factory.mktemp("plots")
    assets = make_assets(root)
    cfg = config(
        assets, root / "runs", "name=plotted", "log.plots=true", "federation.rounds=2"
    )
    sim, _ = run(cfg)
    return sim.run_dir


def test_a_run_ends_with_its_plots(finished):
    for name in ("loss.png", "cuts.png", "time.png", "timeline.png"):
        png = finished / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert not list((finished / "plots").glob(".*.tmp"))  # written atomically


def test_splitft_plot_draws_a_run_folder_again(finished, capsys):
    for png in (finished / "plots").glob("*.png"):
        png.unlink()
    assert main(["plot", str(finished)]) == 0
    printed = capsys.readouterr().out.split()
    pngs = ("loss.png", "cuts.png", "time.png", "timeline.png")
    assert sorted(printed) == sorted(
        [str(finished / "plots" / n) for n in pngs] + [str(finished / "trace.json")]
    )


def test_the_plots_read_each_round_once(finished, tmp_path):
    """A resumed run truncates its log to the checkpoint, a crash may cut the
    last line: every round is read once, a cut line is skipped."""
    rounds = read_rounds(finished)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    copy = tmp_path / "copy"
    copy.mkdir()
    text = (finished / "metrics.jsonl").read_text()
    again = [json.loads(line) for line in text.splitlines()]
    lines = text + json.dumps(again[-1]) + "\n" + '{"type": "round", "rou'
    (copy / "metrics.jsonl").write_text(lines)
    assert [r["round"] for r in read_rounds(copy)] == [0, 1, 2]


def test_a_folder_that_is_not_a_run_is_named(tmp_path):
    with pytest.raises(ConfigError, match="no metrics.jsonl"):
        read_rounds(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ConfigError, match="no round recorded yet"):
        read_rounds(tmp_path)


def test_the_trace_adds_up_to_each_clients_round_timing(finished):
    """trace.json (Chrome trace events) holds every span of the clock: per
    client and kind they add up to the round's timing in metrics.jsonl, and
    each round's range sits where the round was on the run's clock."""
    trace = json.loads((finished / "trace.json").read_text())
    events = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    for r in read_rounds(finished)[1:]:
        mine = [e for e in events if e["args"]["round"] == r["round"]]
        (whole,) = [e for e in mine if e["pid"] == 0]
        assert whole["ts"] == pytest.approx((r["sim_time_s"] - r["sim_round_s"]) * 1e6)
        for cid, timing in r["timing"].items():
            for kind in ("compute", "uplink", "queued", "served", "downlink"):
                total = sum(
                    e["dur"]
                    for e in mine
                    if e["pid"] == 1 and e["tid"] == int(cid) and e["name"] == kind
                )
                assert total / 1e6 == pytest.approx(timing[f"{kind}_s"], abs=1e-3)
            spans_end = max(
                e["ts"] + e["dur"]
                for e in mine
                if e["pid"] == 1 and e["tid"] == int(cid)
            )
            assert spans_end / 1e6 <= r["sim_time_s"] + 1e-3
        served = [e for e in mine if e["pid"] == 2]
        assert sum(e["dur"] for e in served) / 1e6 == pytest.approx(
            r["server_busy_s"], abs=1e-3
        )
