import statistics

import pytest

from sparseinfer import kernels

# Bytes each bandwidth probe reads: 8x the L3 of the machines we run on, ~10 ms.
PROBE_BYTES = 256 << 20


class Bandwidth:
    """Read-bandwidth probes over a run. This VM's bandwidth jumps between ~32 and ~55 GB/s for seconds to
    minutes at a time; the median of the probes is the sustained figure."""

    def __init__(self, warmup: int = 15):
        self.probes: list[float] = []
        self.warmup = warmup

    def _start(self):
        # Lazily, so that `make test` (benchmarks disabled, no probe wanted) does not pay for it.
        while len(self.probes) < self.warmup:
            self.probes.append(kernels.measure_read_bandwidth(nbytes=PROBE_BYTES, repeats=1))

    def probe(self) -> float:
        self._start()
        gbs = kernels.measure_read_bandwidth(nbytes=PROBE_BYTES, repeats=1)
        self.probes.append(gbs)
        return gbs

    def sustained(self) -> float:
        self._start()
        return statistics.median(self.probes)


@pytest.fixture(scope="session")
def bandwidth():
    return Bandwidth()


@pytest.fixture(scope="session")
def read_bandwidth(bandwidth):
    """The machine's sustained read bandwidth (GB/s) at the start of the run, with the kernels' thread count."""
    return bandwidth.sustained()
