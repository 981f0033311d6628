"""sim.backend=ray: the tiny federation on a local 2-CPU Ray with 2 client
actors equals the local simulation; a killed actor is survived; an
interrupted Ray run resumes to the uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import synthetic
from simrun import assert_same_run, config, make_assets, whole_and_interrupted

from splitft import runs
from splitft.config import load_config
from splitft.federation.coordinator import Coordinator
from splitft.federation.hosted import HostedRounds
from splitft.federation.simulation import Simulation

ray = pytest.importorskip("ray")
from splitft.federation.raybackend import RayExecutor  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    """One local Ray for the module (a run uses a Ray already started)."""
    os.environ["RAY_AUTH_MODE"] = "disabled"  # no token file in the home folder
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        logging_level="WARNING",
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("ray"))


def settings(*more):
    return (
        "sim.timing=predicted",
        "federation.rounds=2",
        "sim.client_resources={num_cpus: 1}",
        *more,
    )


def costs():
    return synthetic.costs(num_layers=4)


@pytest.mark.parametrize(
    "server_side",
    ["per_client", "shared"],
)
def test_a_ray_run_equals_the_local_simulation(cluster, assets, tmp_path, server_side):
    common = settings(
        f"federation.server_side={server_side}", "federation.policy=adaptive"
    )
    local = config(assets, tmp_path, "name=local", *common)
    Simulation(local, costs()).run(table=False)
    on_ray = config(assets, tmp_path, "name=ray", "sim.backend=ray", *common)
    Simulation(on_ray, costs()).run(table=False)
    summary = json.loads((on_ray.run_dir / "summary.json").read_text())
    assert summary["client_hosts"] == 2  # 2 CPUs, 1 each
    assert_same_run(local.run_dir, on_ray.run_dir)


class KillsAnActor(RayExecutor):
    """Kills actor 1 (for real: its process ends) as round 2 starts its
    clients' first segments; Ray restarts it for the next round."""

    def submit(self, host, method, *args):
        if method == "begin":
            self.round = args[1]
        if method == "resume" and host == 1 and getattr(self, "round", 0) == 1:
            if not getattr(self, "killed", False):
                self.killed = True
                ray.kill(self.actors[1], no_restart=False)
        return super().submit(host, method, *args)


def test_a_killed_client_actor_is_survived(cluster, assets, tmp_path, caplog):
    cfg = config(assets, tmp_path, *settings("federation.rounds=3"))
    Coordinator(cfg, HostedRounds(KillsAnActor), costs()).run(table=False)
    rounds = json.loads((cfg.run_dir / "summary.json").read_text())["rounds"]
    failed = {r["round"]: r["failed"] for r in rounds[1:]}
    assert failed == {1: [], 2: [1, 3], 3: []}  # host 1 ran clients 1 and 3
    assert rounds[2]["counted"] == [0, 2] and rounds[3]["counted"] == [0, 1, 2, 3]
    assert "its host was lost" in caplog.text
    assert runs.read_status(cfg.run_dir)["state"] == "complete"


def test_an_interrupted_ray_run_resumes_to_the_uninterrupted_one(
    cluster, assets, tmp_path
):
    """With the coordinator and its server in an actor of their own
    (sim.server_resources): the stop reaches the actor, the folder keeps
    round 1's checkpoint, and the resumed run (in an actor again) ends as
    the uninterrupted local one."""
    common = settings("federation.rounds=3", "federation.server_side=shared")
    # the whole run local: a Ray run is the same (the test above); here the
    # server takes 1 of the 2 CPUs, and 1 client actor the other
    on_ray = ("sim.backend=ray", "sim.server_resources={num_cpus: 1}")
    whole, cut = whole_and_interrupted(assets, tmp_path, common, 1, *on_ray)
    assert runs.read_status(cut.run_dir)["state"] == "interrupted"
    resumed = Simulation(cut, resume=True)
    summary = resumed.run(table=False)
    assert summary["client_hosts"] == 1
    assert [r["round"] for r in resumed.rounds] == [0, 1, 2, 3]
    assert_same_run(whole.run_dir, cut.run_dir)


@pytest.mark.parametrize(
    "server", [(), ("sim.server_resources={num_cpus: 1}",)], ids=["here", "actor"]
)
def test_sigterm_stops_a_ray_run_and_resume_finishes_it(
    cluster, assets, tmp_path, server
):
    """A real signal while the run's process waits on the actors (ray.init
    replaces SIGTERM's handler; the run puts splitft's back), the server in
    that process or in an actor of its own (the signal is passed on): exit
    143 with splitft's line, status interrupted at its last checkpoint;
    resume finishes it."""
    from simrun import base_settings

    synthetic.costs(num_layers=4).save(tmp_path / "costs.json")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, "-m", "splitft.cli", "run"]
    run = subprocess.Popen(
        [
            *cmd,
            *base_settings(assets, tmp_path),
            "name=r",
            "federation.num_clients=2",
            "federation.rounds=12",
            "federation.cut_layers=[1, 2]",
            "sim.backend=ray",
            "sim.timing=predicted",
            f"sim.cost_model={tmp_path / 'costs.json'}",
            *server,
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    run_dir = tmp_path / "r"
    first = run_dir / "checkpoints" / "round-0001"
    while not first.exists() and run.poll() is None:
        time.sleep(0.2)
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 143, stderr
    assert "Traceback" not in stderr
    assert "splitft: interrupted (SIGTERM)" in stderr
    status = runs.read_status(run_dir)
    assert status["state"] == "interrupted" and status["round"] >= 1
    Simulation(load_config(run_dir / "config.yaml"), resume=True).run(table=False)
    assert runs.read_status(run_dir)["state"] == "complete"
