import pytest

from sparseinfer import kernels


@pytest.fixture(params=kernels.available_isas())
def isa(request):
    """Runs a test once per ISA path this CPU supports, then restores the default path."""
    kernels.set_isa(request.param)
    yield request.param
    kernels.set_isa(None)


@pytest.fixture(scope="session", autouse=True)
def pack_cache_of_the_run(tmp_path_factory):
    """Loads keep their packed layers in a directory of this run, not in the user's cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SPARSEINFER_PACK_CACHE", str(tmp_path_factory.mktemp("packed")))
    yield
    mp.undo()
