import statistics

import pytest

from sparseinfer import kernels

# Bytes each bandwidth probe reads: 8x the L3 of the machines we run on, ~10 ms.
PROBE_BYTES = 256 << 20


class Bandwidth:
    """Read-bandwidth probes over a run. This VM's bandwidth jumps between ~32 and ~55 GB/s for seconds to
    minutes at a time; the median of the first `warmup` probes is the run's sustained figure."""

    def __init__(self, warmup: int = 15):
        self.probes: list[float] = []
        self.warmup = warmup

    def _measure(self) -> float:
        self.probes.append(kernels.measure_read_bandwidth(nbytes=PROBE_BYTES, repeats=1))
        return self.probes[-1]

    def at_start(self) -> float:
        # Lazily, so that `make test` (benchmarks disabled, no probe wanted) does not pay for it.
        while len(self.probes) < self.warmup:
            self._measure()
        return statistics.median(self.probes[: self.warmup])

    def probe(self) -> float:
        self.at_start()
        return self._measure()


@pytest.fixture(scope="session")
def bandwidth():
    return Bandwidth()


@pytest.fixture(scope="session")
def read_bandwidth(bandwidth):
    """The machine's sustained read bandwidth (GB/s) at the start of the run, with the kernels' thread count."""
    return bandwidth.at_start()
