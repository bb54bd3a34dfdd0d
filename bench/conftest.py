import statistics
from pathlib import Path

import pytest

from sparseinfer import kernels


class Bandwidth:
    """Read-bandwidth probes over a run. This VM's bandwidth jumps between ~32 and ~55 GB/s for seconds to
    minutes at a time; the median of the first `warmup` probes is the run's sustained figure."""

    def __init__(self, warmup: int = 15):
        self.probes: list[float] = []
        self.warmup = warmup
        self._probe = None

    def _measure(self) -> float:
        # One buffer for the run (several times the last-level cache): allocating and touching it per probe
        # would cost more than the probe.
        if self._probe is None:
            self._probe = kernels.BandwidthProbe()
        self.probes.append(self._probe.measure(repeats=1))
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


def cpu_details() -> dict:
    """What the CPU's brand string leaves out (a VM's is often just "Intel(R) Xeon(R) Processor"): family and
    model numbers, and the last-level cache, which decides whether a decoding step's bytes come from DRAM."""
    out = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("cpu family", "model") and key.replace(" ", "_") not in out:
                out[key.replace(" ", "_")] = int(value)
        for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
            if (index / "level").read_text().strip() == "3":
                size = (index / "size").read_text().strip()
                out["l3_mib"] = int(size.rstrip("K")) / 1024 if size.endswith("K") else size
    except (OSError, ValueError):
        pass
    return out
