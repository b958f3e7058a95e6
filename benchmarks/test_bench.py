"""The bench CLI's measurements as a pytest-benchmark suite (GPU only).

    pytest benchmarks/ --benchmark-only                      everything
    pytest benchmarks/ --benchmark-only -k "llama and clip"  a selection

Each test is one (workload, dtype, mode, backend, timing) row of ``python -m gradclip bench``:
the same gradients (:mod:`gradclip.bench.workloads`), the same paths
(:mod:`gradclip.bench.paths`). pytest-benchmark times each round on the host with a device
synchronisation after the call (graph: a replay; eager: the call itself), restoring the
gradients and evicting the L2 before each round, untimed. ``extra_info`` carries the CUDA-event
median from :func:`gradclip.bench.timing.time_call` (the figure the CLI reports), the floor
and the % of floor; tests of one workload, dtype, mode and timing share a group, so the
comparison table puts the backends side by side.
"""

from __future__ import annotations

import pytest
import torch

from gradclip.bench.paths import BACKEND_NAMES, MODES, Unsupported, cases
from gradclip.bench.report import derive
from gradclip.bench.timing import capture_graph, time_call
from gradclip.bench.workloads import WORKLOADS

ROUNDS, WARMUP = 20, 3
CASES = list(cases(WORKLOADS, ("fp32", "bf16"), MODES,
                   [b for b in BACKEND_NAMES if b != "reference"], ("graph", "eager")))


@pytest.mark.parametrize("workload, dtype, mode, backend_name, method", CASES,
                         ids=["-".join(c) for c in CASES])
def test_clip_path(benchmark, bench_env, workload, dtype, mode, backend_name, method):
    backend = bench_env.backend(backend_name)
    if backend.skipped:
        pytest.skip(f"{backend_name}: {backend.skipped}")
    if method == "graph" and not backend.graph_ok(mode):
        pytest.skip(f"{backend_name} {mode}: the host reads the clip factor, not capturable")
    buffers = bench_env.buffers(workload, dtype)
    buffers.load(MODES[mode])
    try:
        fn = backend.path(buffers, mode)
    except Unsupported as why:
        pytest.skip(str(why))
    reset = buffers.reset() or (lambda: None)
    events = time_call(fn, method=method, device=bench_env.device, repeats=ROUNDS, warmup=WARMUP,
                       reset=reset, evict=bench_env.evict)
    call = capture_graph(fn, WARMUP, reset) if method == "graph" else fn

    def setup():
        reset()
        bench_env.evict()
        torch.cuda.synchronize()

    def target():
        call()
        torch.cuda.synchronize()

    benchmark.group = f"{workload} {dtype} {mode} {method}"
    benchmark.pedantic(target, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    row = {"median_us": events.median_us}
    derive(row, backend.passes(mode), MODES[mode].floor_passes, buffers.nbytes, bench_env.ceilings)
    benchmark.extra_info.update(median_us_cuda_events=events.median_us, **row)
