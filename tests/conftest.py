"""Shared pytest fixtures."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The shipped speech data: $ALLINONE_DATA, default <repo>/../shared/data; skip if absent."""
    root = Path(os.environ.get("ALLINONE_DATA", REPO.parent / "shared" / "data"))
    if not root.is_dir():
        pytest.skip(f"shipped data not found at {root} (set ALLINONE_DATA)")
    return root
