import pytest

from sparseinfer import kernels


@pytest.fixture(params=kernels.available_isas())
def isa(request):
    """Runs a test once per ISA path this CPU supports, then restores the default path."""
    kernels.set_isa(request.param)
    yield request.param
    kernels.set_isa(None)
