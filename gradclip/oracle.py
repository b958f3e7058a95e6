"""The float64 oracle: what the op contract of :mod:`gradclip.backends.base` says
``norm_stats`` returns, computed from its definition in float64.

``python -m gradclip bench --check`` and the tests (``tests/reference.py`` re-exports this
module) judge every backend by it: it lives beside both, in neither. It shares no code
with the backends on purpose.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

EPS = 1e-6  # the contract's (and torch's) guard against a zero norm


def flat_float64(tensors: list[Tensor]) -> Tensor:
    """All elements of all tensors as one float64 CPU vector."""
    parts = [t.detach().reshape(-1).to(device="cpu", dtype=torch.float64) for t in tensors]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def expected_stats(tensors: list[Tensor], norm_type: float, max_norm: float,
                   inv_scale: float | None = None) -> tuple[float, float, float]:
    """(norm, coef, found_inf) per the contract, in float64.

    The norm of all elements seen as one vector equals the norm of the per-tensor norms,
    so each tensor is widened to float64 on its own device, one at a time: a 1B-parameter
    list never needs a float64 copy of the whole list on the host.
    """
    scale = 1.0 if inv_scale is None else inv_scale
    norms, found_inf, has_nan = [], False, False
    for t in tensors:
        if t.numel() == 0:
            continue  # adds nothing to any norm (and torch's inf norm refuses it)
        wide = t.detach().reshape(-1).to(torch.float64)
        found_inf = found_inf or not bool(torch.isfinite(wide).all())
        has_nan = has_nan or bool(wide.isnan().any())
        norms.append(float(torch.linalg.vector_norm(wide * scale, norm_type)))
    norm = 0.0
    if norms:
        norm = float(torch.linalg.vector_norm(torch.tensor(norms, dtype=torch.float64), norm_type))
    if has_nan:
        norm = math.nan
    coef = max_norm * (1.0 / (norm + EPS))  # torch's order: reciprocal, then multiply
    coef = coef if math.isnan(coef) else min(1.0, coef)  # torch.clamp keeps NaN
    return norm, scale * coef, float(found_inf)


def norm_rtol(tensors: list[Tensor]) -> float:
    """Tolerance of a float32-accumulated norm (float64 when every input is float64)."""
    if tensors and all(t.dtype == torch.float64 for t in tensors):
        return 1e-12
    return 2e-5


def storage_rtol(dtype: torch.dtype) -> float:
    """Relative tolerance of one rounding to ``dtype`` (a value stored after a multiply)."""
    return {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 8e-3,
            torch.float16: 1e-3}[dtype]


def close_or_both_nan(actual: float, expected: float, rtol: float) -> bool:
    """``actual`` within ``rtol`` of ``expected``; NaN matches NaN and inf matches only itself."""
    if math.isnan(expected):
        return math.isnan(actual)
    if math.isinf(expected):
        return actual == expected
    return math.isclose(actual, expected, rel_tol=rtol, abs_tol=1e-30)


def stats_mismatches(stats: Tensor, tensors: list[Tensor], norm_type: float, max_norm: float,
                     inv_scale: float | None = None, rtol: float | None = None) -> list[str]:
    """What is wrong with a backend's ``stats`` for ``tensors`` (read before any rescale):
    shape, dtype, device and values against :func:`expected_stats`. Empty when it is right.
    ``rtol`` defaults to :func:`norm_rtol`; the coefficient gets twice that."""
    problems = []
    if tuple(stats.shape) != (3,):
        return [f"stats shape {tuple(stats.shape)}, expected (3,)"]
    wants = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    if stats.dtype != wants:
        problems.append(f"stats dtype {stats.dtype}, expected {wants}")
    if tensors and stats.device != tensors[0].device:
        problems.append(f"stats on {stats.device}, expected {tensors[0].device}")
    expected = expected_stats(tensors, norm_type, max_norm, inv_scale)
    rtol = norm_rtol(tensors) if rtol is None else rtol
    return problems + value_mismatches(stats.detach().cpu().tolist(), expected, rtol)


def value_mismatches(got: list[float], expected: tuple[float, float, float], rtol: float) -> list[str]:
    """(norm, coef, found_inf) against :func:`expected_stats`' values: the norm within
    ``rtol``, the coefficient within twice that, found_inf exactly."""
    problems = [f"{name}: got {value!r}, expected {want!r} (rtol {tol})"
                for name, value, want, tol in zip(("norm", "coef"), got, expected, (rtol, 2 * rtol))
                if not close_or_both_nan(value, want, tol)]
    if got[2] != expected[2]:
        problems.append(f"found_inf: got {got[2]}, expected {expected[2]}")
    return problems


def scaled_mismatch(after: Tensor, before: Tensor, coef: float) -> float:
    """Largest error of ``after`` against ``before * coef``, relative to the largest expected
    magnitude, in float64 on the tensors' device (compare with :func:`storage_rtol`)."""
    if before.numel() == 0:
        return 0.0
    expected = before.detach().to(torch.float64) * coef
    error = (after.detach().to(torch.float64) - expected).abs().max()
    return float(error / expected.abs().max().clamp_min(1e-300))
