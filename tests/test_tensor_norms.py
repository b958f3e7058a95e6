"""gradclip.tensor_norms and the per-tensor norm op (norm_stats_per_tensor): every backend
that runs here against the float64 oracle, with mixed dtypes, empty and 0-d tensors,
and tensors that span many chunks (the interpreter's chunks are 64 elements)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DTYPE_MIXES, on_device, random_tensors
from reference import assert_stats_match, norm_rtol

import gradclip
from gradclip.backends import dispatch

NORM_TYPES = [2.0, 1.0, math.inf, 3.5]
SHAPES = [(), (0,), (7,), (33, 5), (0, 3), (2, 3, 4), (300,)]
GPU_SHAPES = [(1 << 16,), (3, 100_003), (257, 4099)]


def expected_norms(tensors: list[torch.Tensor], norm_type: float, scale: float = 1.0) -> list[float]:
    """Each tensor's norm (times ``scale``) in float64, from its definition (0 when empty)."""
    return [0.0 if t.numel() == 0 else
            float(torch.linalg.vector_norm(t.detach().reshape(-1).cpu().double() * scale, norm_type))
            for t in tensors]


def assert_norms_match(norms: torch.Tensor, tensors: list[torch.Tensor], norm_type: float,
                       scale: float = 1.0) -> None:
    wants = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    assert norms.dtype == wants and norms.shape == (len(tensors),)
    assert norms.device == tensors[0].device
    rtol = norm_rtol(tensors)
    for i, (got, want) in enumerate(zip(norms.tolist(), expected_norms(tensors, norm_type, scale))):
        assert math.isclose(got, want, rel_tol=rtol, abs_tol=1e-30), f"tensor {i}: {got} != {want}"


def _tensors(gen, device, mix):
    shapes = SHAPES + (GPU_SHAPES if device == "cuda" else [])
    dtypes = [mix[i % len(mix)] for i in range(len(shapes))]
    return random_tensors(gen, shapes, dtypes, on_device(device))


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("mix", list(DTYPE_MIXES))
def test_tensor_norms_match_float64_oracle(backend_device, gen, mix, norm_type):
    name, device = backend_device
    tensors = _tensors(gen, device, DTYPE_MIXES[mix])
    assert_norms_match(gradclip.tensor_norms(tensors, norm_type, backend=name), tensors, norm_type)


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_global_stats_come_with_the_norms(backend_device, gen, norm_type):
    name, device = backend_device
    tensors = _tensors(gen, device, DTYPE_MIXES["mixed"])
    stats, norms = dispatch.norm_stats_per_tensor(tensors, norm_type, 1.0, backend=name)
    assert_stats_match(stats, tensors, norm_type, 1.0)
    assert_norms_match(norms, tensors, norm_type)


def test_norms_of_unscaled_values_under_amp(backend_device, gen):
    name, device = backend_device
    tensors = _tensors(gen, device, DTYPE_MIXES["mixed16-32"])
    inv_scale = torch.tensor([2.0 ** -10], device=on_device(device))
    stats, norms = dispatch.norm_stats_per_tensor(tensors, 2.0, 1.0, inv_scale, backend=name)
    assert_stats_match(stats, tensors, 2.0, 1.0, inv_scale=2.0 ** -10)
    assert_norms_match(norms, tensors, 2.0, scale=2.0 ** -10)


def test_only_the_tensor_holding_nan_or_inf_is_nonfinite(backend_device, gen):
    name, device = backend_device
    tensors = random_tensors(gen, [(5,), (70,), (3, 3), (4,)], torch.float32, on_device(device))
    tensors[1][65] = math.nan
    tensors[2][1, 1] = math.inf
    norms = gradclip.tensor_norms(tensors, backend=name).tolist()
    assert math.isnan(norms[1]) and norms[2] == math.inf
    assert math.isfinite(norms[0]) and math.isfinite(norms[3])


def test_norms_are_bitwise_repeatable(backend_device, gen):
    name, device = backend_device
    tensors = _tensors(gen, device, DTYPE_MIXES["mixed"])
    first = gradclip.tensor_norms(tensors, backend=name)
    assert torch.equal(first, gradclip.tensor_norms(tensors, backend=name))


def test_one_tensor_and_generators_are_taken(gen):
    t = random_tensors(gen, [(4, 4)], torch.float32)[0]
    assert gradclip.tensor_norms(t).shape == (1,)
    assert torch.equal(gradclip.tensor_norms(x for x in [t, t]), gradclip.tensor_norms([t, t]))


def test_no_tensors_give_an_empty_vector():
    norms = gradclip.tensor_norms([])
    assert norms.shape == (0,) and norms.dtype == torch.float32


@pytest.mark.parametrize("norm_type", [0.0, -1.0, math.nan])
def test_bad_norm_type_is_a_value_error(norm_type):
    with pytest.raises(ValueError, match="norm_type"):
        gradclip.tensor_norms([torch.ones(3)], norm_type)


def test_complex_tensors_take_the_norm_of_their_modulus(gen):
    z = torch.randn(6, dtype=torch.complex64, generator=gen)
    norms = gradclip.tensor_norms([z, torch.ones(4)])
    assert math.isclose(norms[0].item(), float(z.abs().double().norm()), rel_tol=2e-5)
    assert norms[1].item() == 2.0
