"""Shared fixtures; the tiny models themselves live in ``tiny.py``."""

import logging
import os
import tempfile

import pytest
from tiny import ARCHS, make_tiny

# Trackio reads its store's folder once, at import: the tests' runs log to a
# folder of their own, never to the user's Hugging Face cache
os.environ["TRACKIO_DIR"] = tempfile.mkdtemp(prefix="splitft-trackio-")


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
