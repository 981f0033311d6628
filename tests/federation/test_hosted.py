"""Clients on hosts (federation/hosted.py): the same rounds as the local
simulation, whoever computes them; a lost host fails only its clients."""

import json

import pytest
import synthetic
from simrun import assert_same_run, config, make_assets, whole_and_interrupted

from splitft import runs
from splitft.federation.coordinator import Coordinator
from splitft.federation.hosted import HostedRounds, HostLost, InProcess
from splitft.federation.simulation import Simulation


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("hosted"))


def hosted(cfg, size=2, executor=InProcess, resume=False):
    rounds = HostedRounds(lambda c: executor(c, size))
    return Coordinator(cfg, rounds, synthetic.costs(num_layers=4), resume=resume)


SETTINGS = {
    "per_client": ("federation.server_side=per_client",),
    # the cut moves (a re-cut on a host built at the old one) and the server
    # learns in one adapter in the clock's order
    "shared-adaptive": ("federation.server_side=shared", "federation.policy=adaptive"),
    "random-batched": (
        "federation.policy=random",
        "federation.clients_per_round=3",
        "server.batching=true",
    ),
}


@pytest.mark.parametrize("settings", SETTINGS.values(), ids=SETTINGS.keys())
def test_hosted_rounds_equal_the_local_simulation(assets, tmp_path, settings):
    common = ("sim.timing=predicted", *settings)
    local = config(assets, tmp_path, "name=local", *common)
    Simulation(local, synthetic.costs(num_layers=4)).run(table=False)
    remote = config(assets, tmp_path, "name=hosted", *common)
    hosted(remote).run(table=False)
    assert_same_run(local.run_dir, remote.run_dir)


def test_a_run_resumes_on_hosts_from_a_local_checkpoint(assets, tmp_path):
    """The checkpoint's clients are the same state, whichever runner wrote it."""
    common = (
        "sim.timing=predicted",
        "federation.rounds=4",
        "federation.policy=adaptive",
    )
    whole, cut = whole_and_interrupted(assets, tmp_path, common, 2)
    resumed = hosted(cut, resume=True)
    resumed.run(table=False)
    assert resumed.start_round == 2
    assert_same_run(whole.run_dir, cut.run_dir)


class LosesAHost(InProcess):
    """Host 1 dies once, in round 2 (the second round), on its first segment."""

    def __init__(self, cfg, size):
        super().__init__(cfg, size)
        self.round, self.lost = -1, False

    def submit(self, host, method, *args):
        if method == "begin":
            self.round = args[1]
        if host == 1 and method == "resume" and self.round == 1 and not self.lost:
            self.lost = True
            self.hosts[host].drop()

            def lost():
                raise HostLost("the actor died")

            return lost
        return super().submit(host, method, *args)


def test_a_lost_host_fails_its_clients_round_and_the_run_goes_on(
    assets, tmp_path, caplog
):
    cfg = config(assets, tmp_path, "sim.timing=predicted")
    hosted(cfg, executor=LosesAHost).run(table=False)
    rounds = json.loads((cfg.run_dir / "summary.json").read_text())["rounds"]
    # client i of a round runs on host i % 2: clients 1 and 3 lost round 2
    failed = {r["round"]: r["failed"] for r in rounds[1:]}
    assert failed == {1: [], 2: [1, 3], 3: []}
    assert rounds[2]["counted"] == [0, 2]  # the others' updates were kept
    assert "its host was lost: the actor died" in caplog.text
    assert runs.read_status(cfg.run_dir)["state"] == "complete"


def test_a_round_short_of_min_clients_runs_again_from_the_same_states(
    assets, tmp_path, caplog
):
    """federation.min_clients=4: round 2 lost two, so it runs again, and the
    run ends as one that lost no host."""
    common = ("sim.timing=predicted", "federation.min_clients=4")
    whole = config(assets, tmp_path, "name=whole", *common)
    hosted(whole).run(table=False)
    again = config(assets, tmp_path, "name=again", *common)
    hosted(again, executor=LosesAHost).run(table=False)
    assert "round 2: 2 of 4 clients uploaded" in caplog.text
    assert_same_run(whole.run_dir, again.run_dir)
