"""Timing one call, on a GPU or on the CPU: the one timer of the bench.

Every sample times one call and the result is the median of many samples:

- ``graph``: the call is captured once in a CUDA graph and each replay is timed with a pair
  of CUDA events. Device time only: the GPU is kept busy (eviction read, below) while the
  host queues the replay, so launch gaps and Python overhead stay out of the numbers.
- ``eager``: the call itself, as user code makes it. The device is synchronised first and
  events bracket the call, so host overhead (Python, argument packing, launches) counts
  whenever it exceeds the device work.
- ``host``: host time alone: ``HOST_CALLS`` calls queued back to back without a
  synchronisation, timed with ``time.perf_counter_ns`` and divided by their number (the
  device work overlaps; inputs are restored once per sample, not per call). What Python,
  argument packing and launches cost per call: the part of ``eager`` that CUDA graphs remove.
- ``cpu``: ``time.perf_counter_ns`` around the call (no GPU; numbers say nothing about GPUs).

Before each sample a read of a scratch buffer four times the size of the L2 cache evicts the
gradients from it, leaving only clean lines: workloads that fit in L2 (ResNet-50, 2000 x 4096)
are measured from device memory as in training, not hot from the previous repeat, and no
dirty line from earlier work is written back inside a timed call. Calls that change their
inputs (clipping shrinks the gradients, unscaling divides them by the loss scale) get a
``reset`` that restores the inputs before each sample, outside the timed region.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

METHODS = ("graph", "eager", "host")
HOST_CALLS = 20


@dataclass
class Measurement:
    """Summary of the samples of one call, in microseconds."""

    method: str
    median_us: float
    min_us: float
    p10_us: float
    p90_us: float
    samples: int

    def as_dict(self) -> dict:
        return asdict(self)


def summarise(method: str, samples_us: list[float]) -> Measurement:
    ordered = sorted(samples_us)
    n = len(ordered)
    return Measurement(method, statistics.median(ordered), ordered[0],
                       ordered[int(0.1 * (n - 1))], ordered[int(round(0.9 * (n - 1)))], n)


class CacheEvictor:
    """Reads a scratch buffer four times the device's last-level cache."""

    def __init__(self, device: torch.device):
        if device.type == "cuda":
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 << 20
            nbytes = 4 * l2
        else:
            nbytes = 4 * cpu_last_level_cache_bytes()
        self._scratch = torch.ones(nbytes // 4, dtype=torch.float32, device=device)

    def __call__(self) -> None:
        self._scratch.amax()


def cpu_last_level_cache_bytes(default: int = 32 << 20) -> int:
    """The largest CPU cache Linux lists for CPU 0 (sysfs), else ``default``."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip().upper()
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        if text[:-1].isdigit() and text[-1] in units:
            sizes.append(int(text[:-1]) * units[text[-1]])
        elif text.isdigit():
            sizes.append(int(text))
    return max(sizes, default=default)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], *, method: str, device: torch.device,
              repeats: int, warmup: int = 3, reset: Callable[[], None] | None = None,
              evict: Callable[[], None] | None = None, max_seconds: float = 5.0) -> Measurement:
    """Median over ``repeats`` samples of ``fn()`` (fewer if they take over ``max_seconds``;
    never fewer than 5).

    Args:
        fn: the call to time; for ``graph`` it must be capturable (no host synchronisation).
        method: ``"graph"``, ``"eager"``, ``"host"`` or ``"cpu"`` (see the module docstring).
        device: where ``fn`` runs.
        repeats: samples to take; warmup: untimed calls first (compilation, caches, lazy state).
        reset: restores ``fn``'s inputs; run untimed before every call, warm-up included.
        evict: run untimed before each sample (a :class:`CacheEvictor`).
    """
    reset = reset or (lambda: None)
    evict = evict or (lambda: None)
    if method == "cpu":
        return _time_cpu(fn, repeats, warmup, reset, evict, max_seconds)
    if device.type != "cuda":
        raise ValueError(f"method {method!r} needs a CUDA device; use method='cpu' on {device}")
    if method == "host":
        return _time_host(fn, device, repeats, warmup, reset, max_seconds)
    if method == "graph":
        call = capture_graph(fn, warmup, reset)
    elif method == "eager":
        call = fn
        for _ in range(warmup):
            reset()
            fn()
    else:
        raise ValueError(f"method must be one of {METHODS + ('cpu',)}, got {method!r}")
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    deadline = time.perf_counter() + max_seconds
    taken = 0
    for start, end in zip(starts, ends):
        reset()
        evict()
        if method == "eager":
            _sync(device)
        start.record()
        call()
        end.record()
        taken += 1
        if taken >= 5 and time.perf_counter() > deadline:
            break
    _sync(device)
    return summarise(method, [1e3 * s.elapsed_time(e) for s, e in zip(starts[:taken], ends[:taken])])


def capture_graph(fn: Callable[[], object], warmup: int = 3,
                  reset: Callable[[], None] | None = None) -> Callable[[], None]:
    """Capture ``fn`` in a CUDA graph (after ``warmup`` calls); returns the graph's replay."""
    reset = reset or (lambda: None)
    # Warm up on a side stream, as torch.cuda.graphs asks, so that lazy initialisation
    # (compiled kernels, allocator pools, optimizer state) happens before capture.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(max(warmup, 1)):
            reset()
            fn()
    torch.cuda.current_stream().wait_stream(side)
    reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _time_host(fn, device, repeats, warmup, reset, max_seconds) -> Measurement:
    for _ in range(warmup):
        reset()
        fn()
    samples = []
    deadline = time.perf_counter() + max_seconds
    for _ in range(repeats):
        reset()
        _sync(device)
        t0 = time.perf_counter_ns()
        for _ in range(HOST_CALLS):
            fn()
        samples.append((time.perf_counter_ns() - t0) / 1e3 / HOST_CALLS)
        _sync(device)
        if len(samples) >= 5 and time.perf_counter() > deadline:
            break
    return summarise("host", samples)


def _time_cpu(fn, repeats, warmup, reset, evict, max_seconds) -> Measurement:
    for _ in range(warmup):
        reset()
        fn()
    samples = []
    deadline = time.perf_counter() + max_seconds
    for _ in range(repeats):
        reset()
        evict()
        t0 = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - t0) / 1e3)
        if len(samples) >= 5 and time.perf_counter() > deadline:
            break
    return summarise("cpu", samples)


@dataclass
class Ceilings:
    """Memory bandwidth measured on a flat fp32 buffer, in GB/s (1e9 bytes per second)."""

    buffer_bytes: int
    read_gbs: float        # torch.linalg.vector_norm: reads the buffer once
    read_write_gbs: float  # mul_ in place: reads and writes it (bytes counted both ways)
    copy_gbs: float        # copy_ into a second buffer: reads one, writes the other

    def floor_us(self, reads: float, read_writes: float, nbytes: int) -> float:
        """Time to read ``nbytes`` ``reads`` times and read-and-write it ``read_writes`` times."""
        return (reads * nbytes / self.read_gbs + read_writes * 2 * nbytes / self.read_write_gbs) / 1e3


def measure_ceilings(device: torch.device, nbytes: int, *, repeats: int = 10,
                     evict: Callable[[], None] | None = None) -> Ceilings:
    """Read, read/write and copy bandwidth over a flat fp32 buffer of ``nbytes``."""
    method = "graph" if device.type == "cuda" else "cpu"
    buffer = torch.randn(nbytes // 4, device=device)
    read = time_call(lambda: torch.linalg.vector_norm(buffer), method=method, device=device,
                     repeats=repeats, evict=evict)
    rw = time_call(lambda: buffer.mul_(1.0), method=method, device=device,
                   repeats=repeats, evict=evict)
    target = torch.empty_like(buffer)
    copy = time_call(lambda: target.copy_(buffer), method=method, device=device,
                     repeats=repeats, evict=evict)
    size = buffer.numel() * 4
    del buffer, target
    return Ceilings(size, size / read.median_us / 1e3, 2 * size / rw.median_us / 1e3,
                    2 * size / copy.median_us / 1e3)
