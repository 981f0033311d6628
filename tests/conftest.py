"""Shared fixtures; the tiny models themselves live in ``tiny.py``."""

import pytest
from tiny import ARCHS, make_tiny


@pytest.fixture(params=ARCHS)
def tiny(request, tmp_path):
    config, model = make_tiny(request.param, tmp_path / request.param)
    return request.param, tmp_path / request.param, config, model
