"""sim.backend=ray's pure parts: the pool's size, the actors' options, and
the one line a missing Ray gives (no Ray needed)."""

import builtins

import pytest

from splitft.config import ConfigError, load_config
from splitft.federation import raybackend


def test_the_pool_is_what_fits_per_resource_at_most_a_round():
    cluster = {"CPU": 8.0, "GPU": 2.0, "memory": 1e10}
    assert raybackend.pool_size({"num_cpus": 1}, cluster, 16) == 8
    assert raybackend.pool_size({"num_cpus": 1}, cluster, 4) == 4
    assert raybackend.pool_size({"num_cpus": 1, "num_gpus": 0.25}, cluster, 16) == 8
    assert raybackend.pool_size({"num_cpus": 2, "num_gpus": 0.5}, cluster, 16) == 4
    assert raybackend.pool_size({"num_cpus": 0.5, "num_gpus": 0}, cluster, 99) == 16
    with pytest.raises(ConfigError, match=r"sim.client_resources=.*fits no actor"):
        raybackend.pool_size({"num_gpus": 1}, {"CPU": 2.0}, 4)


def test_resources_become_ray_actor_options():
    sim = load_config(None, ["sim.actor_restarts=2"]).sim
    options = raybackend.actor_options(
        sim, {"num_gpus": 0.5, "memory": 1e9, "fast_disk": 1}
    )
    assert options == {
        "num_gpus": 0.5,
        "memory": 1e9,
        "resources": {"fast_disk": 1},
        "num_cpus": 1.0,
        "max_restarts": 2,
        "max_task_retries": 0,
    }


def test_bad_ray_settings_name_the_key():
    with pytest.raises(ConfigError, match="sim.backend='dask' is not allowed"):
        load_config(None, ["sim.backend=dask"])
    with pytest.raises(ConfigError, match="sim.server_resources.num_gpus=-1.0"):
        load_config(None, ["sim.server_resources={num_gpus: -1}"])
    with pytest.raises(ConfigError, match="sim.client_actors=-1"):
        load_config(None, ["sim.client_actors=-1"])


def test_without_ray_the_run_says_which_extra_to_install(monkeypatch):
    real = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(ConfigError, match=r"pip install 'splitft\[ray\]'"):
        raybackend._ray()
