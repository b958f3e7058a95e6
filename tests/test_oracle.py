"""The float64 oracle shared by the tests and ``bench --check`` (gradclip/oracle.py):
its per-tensor evaluation agrees with the definition (the norm of one concatenated vector)."""

from __future__ import annotations

import math

import pytest
import torch

from gradclip import oracle


def _definition(tensors, norm_type, max_norm, inv_scale=None):
    """The contract written out on one flat float64 vector."""
    values = oracle.flat_float64(tensors)
    scale = 1.0 if inv_scale is None else inv_scale
    norm = float(torch.linalg.vector_norm(values * scale, norm_type)) if values.numel() else 0.0
    if values.isnan().any():
        norm = math.nan
    coef = max_norm / (norm + 1e-6)
    return norm, scale * (coef if math.isnan(coef) else min(1.0, coef)), float(not torch.isfinite(values).all())


def _mixed(seed=0):
    gen = torch.Generator().manual_seed(seed)
    dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    sizes = [0, 1, 7, 4097, 0, 1000, ()]
    return [(torch.randn(() if n == () else (n,), generator=gen, dtype=torch.float64) * 3)
            .to(dtypes[i % len(dtypes)]) for i, n in enumerate(sizes)]


@pytest.mark.parametrize("norm_type", [0.5, 1.0, 2.0, 3.5, 8.0, math.inf])
@pytest.mark.parametrize("inv_scale", [None, 2.0 ** -16])
@pytest.mark.parametrize("max_norm", [0.1, 1e9, math.inf])
def test_per_tensor_oracle_matches_the_definition(norm_type, inv_scale, max_norm):
    tensors = _mixed()
    got = oracle.expected_stats(tensors, norm_type, max_norm, inv_scale)
    want = _definition(tensors, norm_type, max_norm, inv_scale)
    for a, b in zip(got, want):
        assert math.isclose(a, b, rel_tol=1e-13), (got, want)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_nonfinite_values(bad, norm_type):
    tensors = _mixed()
    tensors[3][-1] = bad
    norm, coef, found = oracle.expected_stats(tensors, norm_type, 1.0)
    assert found == 1.0
    if math.isnan(bad):
        assert math.isnan(norm) and math.isnan(coef)
    else:
        assert norm == math.inf and coef == 0.0


@pytest.mark.parametrize("tensors", [[], [torch.zeros(0)], [torch.zeros(0), torch.zeros(0, 3)]])
def test_nothing_to_read_has_norm_zero(tensors):
    assert oracle.expected_stats(tensors, math.inf, 1.0) == (0.0, 1.0, 0.0)


def test_mismatches_name_what_is_wrong():
    tensors = [torch.ones(4), torch.ones(5, dtype=torch.bfloat16)]
    norm, coef, found = oracle.expected_stats(tensors, 2.0, 1.0)
    right = torch.tensor([norm, coef, found], dtype=torch.float32)
    assert oracle.stats_mismatches(right, tensors, 2.0, 1.0) == []
    wrong = right.clone()
    wrong[0] *= 1.001
    wrong[2] = 1.0
    problems = oracle.stats_mismatches(wrong, tensors, 2.0, 1.0)
    assert [p.split(":")[0] for p in problems] == ["norm", "found_inf"]
    assert oracle.stats_mismatches(right.double(), tensors, 2.0, 1.0) == [
        "stats dtype torch.float64, expected torch.float32"]
    assert oracle.stats_mismatches(right[:2], tensors, 2.0, 1.0) == ["stats shape (2,), expected (3,)"]


def test_scaled_mismatch_is_relative_to_the_largest_value():
    before = torch.tensor([1.0, -2.0, 4.0])
    assert oracle.scaled_mismatch(before * 0.5, before, 0.5) == 0.0
    after = before * 0.5
    after[0] += 0.02
    assert oracle.scaled_mismatch(after, before, 0.5) == pytest.approx(0.01)
    assert oracle.scaled_mismatch(torch.zeros(0), torch.zeros(0), 0.5) == 0.0
