"""Shared fixtures; the tiny models themselves live in ``tiny.py``."""

import logging

import pytest
from tiny import ARCHS, make_tiny


@pytest.fixture(autouse=True)
def _splitft_logging():
    """The CLI gives the 'splitft' logger its own handler and stops it
    propagating: a test that runs ``main()`` in process must not hide later
    tests' messages from ``caplog`` (it did on pytest 8.0)."""
    log = logging.getLogger("splitft")
    saved = log.handlers[:], log.level, log.propagate
    yield
    log.handlers[:], log.level, log.propagate = saved


@pytest.fixture(params=ARCHS)
def tiny(request, tmp_path):
    config, model = make_tiny(request.param, tmp_path / request.param)
    return request.param, tmp_path / request.param, config, model
