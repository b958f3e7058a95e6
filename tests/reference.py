"""The test oracle: :mod:`gradclip.oracle` (the op contract computed in float64 from its
definition, shared with ``python -m gradclip bench --check``) and assertions built on it."""

from __future__ import annotations

from torch import Tensor

from gradclip.oracle import (
    EPS,
    close_or_both_nan,
    expected_stats,
    flat_float64,
    norm_rtol,
    stats_mismatches,
    storage_rtol,
)

__all__ = ["EPS", "assert_close_or_both_nan", "assert_stats_match", "expected_stats",
           "flat_float64", "norm_rtol", "storage_rtol"]


def assert_close_or_both_nan(actual: float, expected: float, rtol: float, what: str) -> None:
    assert close_or_both_nan(actual, expected, rtol), (
        f"{what}: got {actual!r}, expected {expected!r} (rtol {rtol})")


def assert_stats_match(stats: Tensor, tensors: list[Tensor], norm_type: float, max_norm: float,
                       inv_scale: float | None = None, rtol: float | None = None) -> None:
    """``stats`` of a backend against :func:`expected_stats`: shape, dtype, device, values
    (``rtol`` defaults to :func:`norm_rtol`)."""
    problems = stats_mismatches(stats, tensors, norm_type, max_norm, inv_scale, rtol)
    assert not problems, "; ".join(problems)
