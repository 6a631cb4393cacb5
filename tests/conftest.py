"""Shared pytest fixtures."""

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The shipped speech data: $ALLINONE_DATA, default <repo>/../shared/data; skip if absent."""
    root = Path(os.environ.get("ALLINONE_DATA", REPO.parent / "shared" / "data"))
    if not root.is_dir():
        pytest.skip(f"shipped data not found at {root} (set ALLINONE_DATA)")
    return root


@pytest.fixture
def one_thread():
    """Run a test with one torch thread (opt in with ``pytest.mark.usefixtures``): tiny models
    are fastest so, and two threads per xdist worker on a busy 2-core machine can be 100x
    slower (OpenMP threads waiting on each other)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _restore_allinone_logger():
    """Undo what ``setup_logging`` does to the "allinone" logger inside a test (file handlers,
    ``propagate = False``), so later tests in the same process still see records in caplog."""
    import logging

    logger = logging.getLogger("allinone")
    handlers, propagate, level = list(logger.handlers), logger.propagate, logger.level
    yield
    for h in logger.handlers:
        if h not in handlers:
            h.close()
    logger.handlers[:] = handlers
    logger.propagate, logger.level = propagate, level
