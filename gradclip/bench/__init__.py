"""Benchmarks of gradient clipping: workloads, timing, backends' paths, reports.

``python -m gradclip bench`` (:mod:`gradclip.bench.cli`) and the pytest-benchmark suite in
``benchmarks/`` share :mod:`.workloads` (what is timed), :mod:`.paths` (what each backend
runs in each mode) and :mod:`.timing` (how it is timed).
"""
