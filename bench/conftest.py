import pytest

from sparseinfer import kernels


@pytest.fixture(scope="session")
def read_bandwidth():
    """The machine's read bandwidth (GB/s), measured once per run with the kernels' thread count."""
    return kernels.measure_read_bandwidth(nbytes=1 << 30, repeats=5)
