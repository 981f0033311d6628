"""Noise on the smashed data (privacy.noise): what the client sends."""

import pytest
import torch
from test_round import SETTINGS, TRAIN
from tiny import ARCHS, make_tiny, token_rows

from splitft.config import ConfigError, load_config
from splitft.models.parts import WeightStore
from splitft.split.client import SplitClient
from splitft.split.messages import SmashedData
from splitft.split.server import SplitServer
from splitft.transport import InProcessTransport


class Recording(InProcessTransport):
    """The in-process transport, keeping every request it carried."""

    def __init__(self, server) -> None:
        super().__init__(server)
        self.sent = []

    def call(self, msg):
        self.sent.append(msg)
        return super().call(msg)


def _sent(folder, config, noise, seed=0):
    """The smashed data of a one-step round at cut 2, and the steps' metrics."""
    store = WeightStore(folder)
    server = SplitServer(store, config, SETTINGS, TRAIN, {0: 2}, 1, 1)
    client = SplitClient(
        0, store, config, SETTINGS, TRAIN, token_rows(seed=0), 0, seed, noise=noise
    )
    transport = Recording(server)
    steps = client.run_round(transport, 0)
    (smashed,) = [m for m in transport.sent if isinstance(m, SmashedData)]
    return smashed.hidden, steps


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    config, _ = make_tiny(ARCHS[0], folder)
    return folder, config


def test_noise_has_the_configured_scale_per_token(llama):
    clean, _ = _sent(*llama, 0.0)
    noisy, steps = _sent(*llama, 0.5)
    rms = clean.pow(2).mean(-1, keepdim=True).sqrt()  # (B, T, 1)
    z = (noisy - clean) / rms
    assert z.mean().abs() < 0.05
    assert z.std() == pytest.approx(0.5, rel=0.1)
    assert torch.isfinite(torch.tensor(steps[0]["loss"]))


def test_noise_is_seeded_so_a_rerun_sends_the_same(llama):
    first, _ = _sent(*llama, 0.3)
    again, _ = _sent(*llama, 0.3)
    other, _ = _sent(*llama, 0.3, seed=1)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_no_noise_sends_the_activations_unchanged(llama):
    a, _ = _sent(*llama, 0.0)
    b, _ = _sent(*llama, 0.0)
    assert torch.equal(a, b)


def test_a_negative_scale_names_the_key():
    with pytest.raises(ConfigError, match=r"privacy.noise=-0.1.*>= 0"):
        load_config(None, ["privacy.noise=-0.1"])
