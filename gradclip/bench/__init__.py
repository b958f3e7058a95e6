"""Benchmarks of gradient clipping: ``python -m gradclip bench`` (:mod:`gradclip.bench.cli`).

One of each: :mod:`.workloads` (what is timed), :mod:`.paths` (what each backend runs in each
mode), :mod:`.timing` (how it is timed), :mod:`.oracle` (what is correct: the float64 oracle
that ``--check`` and the tests use), :mod:`.check` (``--check``), :mod:`.cpu_section`
(``--cpu-section``) and :mod:`.report` (tables, JSON, markdown, plots).
"""
