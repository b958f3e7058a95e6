"""The test oracle: the op contract computed in float64 on the CPU, straight from its definition."""

from __future__ import annotations

import math

import torch
from torch import Tensor

EPS = 1e-6


def flat_float64(tensors: list[Tensor]) -> Tensor:
    """All elements of all tensors as one float64 CPU vector."""
    parts = [t.detach().reshape(-1).to(device="cpu", dtype=torch.float64) for t in tensors]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def expected_stats(tensors: list[Tensor], norm_type: float, max_norm: float,
                   inv_scale: float | None = None) -> tuple[float, float, float]:
    """(norm, coef, found_inf) per the contract in gradclip/backends/base.py, in float64."""
    values = flat_float64(tensors)
    found_inf = float(not bool(torch.isfinite(values).all()))
    scale = 1.0 if inv_scale is None else inv_scale
    norm = float(torch.linalg.vector_norm(values * scale, norm_type))
    if values.isnan().any():
        norm = math.nan
    coef = max_norm * (1.0 / (norm + EPS))  # torch's order: reciprocal, then multiply
    coef = coef if math.isnan(coef) else min(1.0, coef)  # torch.clamp keeps NaN
    return norm, scale * coef, found_inf


def norm_rtol(tensors: list[Tensor]) -> float:
    """Tolerance of a float32-accumulated norm (float64 when every input is float64)."""
    if tensors and all(t.dtype == torch.float64 for t in tensors):
        return 1e-12
    return 2e-5


def storage_rtol(dtype: torch.dtype) -> float:
    """Relative tolerance of one rounding to ``dtype`` (a value stored after a multiply)."""
    return {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 8e-3,
            torch.float16: 1e-3}[dtype]


def assert_close_or_both_nan(actual: float, expected: float, rtol: float, what: str) -> None:
    if math.isnan(expected):
        assert math.isnan(actual), f"{what}: expected NaN, got {actual}"
        return
    if math.isinf(expected):
        assert actual == expected, f"{what}: expected {expected}, got {actual}"
        return
    assert math.isclose(actual, expected, rel_tol=rtol, abs_tol=1e-30), (
        f"{what}: got {actual!r}, expected {expected!r} (rtol {rtol})")


def assert_stats_match(stats: Tensor, tensors: list[Tensor], norm_type: float, max_norm: float,
                       inv_scale: float | None = None, rtol: float | None = None) -> None:
    """``stats`` of a backend against :func:`expected_stats`: shape, dtype, device, values
    (``rtol`` defaults to :func:`norm_rtol`)."""
    norm, coef, found = expected_stats(tensors, norm_type, max_norm, inv_scale)
    assert stats.shape == (3,)
    wants64 = any(t.dtype == torch.float64 for t in tensors)
    assert stats.dtype == (torch.float64 if wants64 else torch.float32)
    assert stats.device == tensors[0].device
    got_norm, got_coef, got_found = stats.cpu().tolist()
    rtol = norm_rtol(tensors) if rtol is None else rtol
    assert_close_or_both_nan(got_norm, norm, rtol, "norm")
    assert_close_or_both_nan(got_coef, coef, 2 * rtol, "coef")
    assert got_found == found, f"found_inf: got {got_found}, expected {found}"
