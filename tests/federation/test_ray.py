"""sim.backend=ray: the tiny federation on a local 2-CPU Ray with 2 client
actors equals the local simulation; a killed actor is survived; a Ray run
stopped by SIGTERM (the server in the run's process or in an actor of its
own) resumes to the uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import synthetic
from simrun import assert_same_run, config, make_assets

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


# the signalled run: long enough that round 1's checkpoint is not its last
SIGNALLED = (
    "federation.num_clients=2",
    "federation.rounds=6",
    "federation.cut_layers=[1, 2]",
    "sim.timing=predicted",
)


@pytest.fixture(scope="module")
def uninterrupted(assets, tmp_path_factory):
    """The signalled run's settings run whole, locally: its folder."""
    from simrun import base_settings

    out = tmp_path_factory.mktemp("uninterrupted")
    cfg = load_config(None, [*base_settings(assets, out), "name=whole", *SIGNALLED])
    Simulation(cfg, costs()).run(table=False)
    return cfg.run_dir


@pytest.mark.parametrize(
    "server", [(), ("sim.server_resources={num_cpus: 1}",)], ids=["here", "actor"]
)
def test_sigterm_stops_a_ray_run_and_resume_finishes_it(
    cluster, assets, uninterrupted, tmp_path, server
):
    """A real signal while the run's process waits on the actors (ray.init
    replaces SIGTERM's handler; the run puts splitft's back), the server in
    that process or in an actor of its own (the signal is passed on): exit
    143 with splitft's line, status interrupted at its last checkpoint; the
    resumed run (on Ray again, the server in an actor again where it was)
    ends as the uninterrupted local run."""
    from simrun import base_settings

    synthetic.costs(num_layers=4).save(tmp_path / "costs.json")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, "-m", "splitft.cli", "run"]
    run = subprocess.Popen(
        [
            *cmd,
            *base_settings(assets, tmp_path),
            "name=r",
            *SIGNALLED,
            "sim.backend=ray",
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
    resumed = Simulation(load_config(run_dir / "config.yaml"), resume=True)
    summary = resumed.run(table=False)
    assert summary["client_hosts"] == (1 if server else 2)  # what the CPUs fit
    assert runs.read_status(run_dir)["state"] == "complete"
    assert_same_run(uninterrupted, run_dir)
