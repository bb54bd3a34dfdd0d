"""Fixtures for every test path (tests/ and bench/)."""

import pytest


@pytest.fixture(scope="session", autouse=True)
def pack_cache_of_the_run(tmp_path_factory):
    """Loads keep their packed layers in a directory of this run, not in the user's cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SPARSEINFER_PACK_CACHE", str(tmp_path_factory.mktemp("packed")))
    yield
    mp.undo()
