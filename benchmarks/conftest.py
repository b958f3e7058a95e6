"""Shared state of the pytest-benchmark suite: one device, its ceilings, the backends, and
the gradients of one workload at a time (a llama-1B-like fp32 set is 3.8 GB)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytest_benchmark", reason="the benchmark suite needs pytest-benchmark")

from gradclip.bench.paths import Buffers, release, select_backends  # noqa: E402
from gradclip.bench.timing import CacheEvictor, measure_ceilings  # noqa: E402
from gradclip.bench.workloads import get_workload  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class BenchEnv:
    def __init__(self, device: torch.device):
        self.device = device
        self.evict = CacheEvictor(device)
        self.ceilings = measure_ceilings(device, 4 << 30, evict=self.evict)
        self._backends = {}
        self._buffers: Buffers | None = None

    def backend(self, name: str):
        if name not in self._backends:
            self._backends[name], = select_backends([name], self.device)
        return self._backends[name]

    def buffers(self, workload_key: str, dtype: str) -> Buffers:
        w, d = get_workload(workload_key), DTYPES[dtype]
        if self._buffers is None or (self._buffers.workload, self._buffers.dtype) != (w, d):
            self._buffers = None
            release()
            self._buffers = Buffers(w, d, self.device)
        return self._buffers


@pytest.fixture(scope="session")
def bench_env() -> BenchEnv:
    if not torch.cuda.is_available():
        pytest.skip("the benchmarks time CUDA devices; no CUDA device here")
    return BenchEnv(torch.device("cuda"))
