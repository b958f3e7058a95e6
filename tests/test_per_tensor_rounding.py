"""The same factor gives the same bits on every backend (issue 21, item 9).

A per-tensor or unit-wise rescale multiplies a tensor that is not float64 in float32 by its
factor rounded to float32 and rounds the product once to the tensor's dtype (float64
tensors: in float64; ``gradclip/backends/base.py``). Checked bitwise, against that
definition and against the reference backend, over fp16, bf16, fp32 and mixed lists. The
norms of the clips below are exact in any summation order (rows of equal magnitudes), so
every backend computes the very same factors, and only the rounding of the rescale is
left to compare.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DTYPE_MIXES, on_device, random_tensors

import gradclip
from gradclip.backends import dispatch
from gradclip.backends.base import clip_coefficient

MIXES = ["fp16", "bf16", "fp32", "mixed", "mixed16-32"]
SHAPES = [(), (1,), (7,), (33, 5), (0,), (150,), (4, 3, 3)]


def _defined(t: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """The contract's rescale of ``t`` by one factor, from its definition."""
    compute = torch.float64 if t.dtype == torch.float64 else torch.float32
    return (t.to(compute) * factor.to(compute).item()).to(t.dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.detach().cpu().reshape(-1).view(ints[t.element_size()])


def _assert_same_bits(got: list[torch.Tensor], want: list[torch.Tensor], what: str) -> None:
    for i, (g, w) in enumerate(zip(got, want)):
        differ = int((_bits(g) != _bits(w)).sum())
        assert differ == 0, f"{what}: tensor {i} ({g.dtype}) differs in {differ} of {g.numel()} elements"


@pytest.mark.parametrize("coef_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mix", MIXES)
def test_scale_per_tensor_rounds_as_defined(backend_device, gen, mix, coef_dtype):
    name, device = backend_device
    dtypes = DTYPE_MIXES[mix]
    tensors = random_tensors(gen, SHAPES, [dtypes[i % len(dtypes)] for i in range(len(SHAPES))],
                             on_device(device), scale=3.0)
    coefs = (torch.rand(len(tensors), generator=gen, dtype=torch.float64) * 0.9 + 0.05).to(coef_dtype)
    want = [_defined(t.cpu(), c) for t, c in zip(tensors, coefs)]
    dispatch.scale_per_tensor_(tensors, coefs.to(tensors[0].device), backend=name)
    _assert_same_bits(tensors, want, f"{name} scale_per_tensor_")


def _equal_magnitude_rows(gen, shape, dtype, device, scale):
    """Rows of +-v, v random per row with 8 significant bits (a bfloat16), rows of a square
    number of elements: each row's and each tensor's 2-norm (sqrt(n) * v) is exact in float32
    whatever the order of the sum, so every backend's factor is equal."""
    rows = shape[0] if len(shape) > 1 else 1
    width = max(1, int(torch.tensor(shape).prod()) // rows) if len(shape) else 1
    magnitude = ((torch.rand(rows, 1, generator=gen) + 1.0) * scale).bfloat16().double()
    signs = torch.where(torch.rand(rows, width, generator=gen) < 0.5, -1.0, 1.0).double()
    return (magnitude * signs).reshape(shape).to(dtype).to(device)


@pytest.mark.parametrize("mix", MIXES)
def test_agc_factors_round_alike_on_every_backend(backend_device, gen, mix):
    name, device = backend_device
    dtypes = DTYPE_MIXES[mix]
    shapes = [(16, 4), (4,), (), (8, 2, 2), (32, 4)]
    dev = on_device(device)
    params = []
    for i, shape in enumerate(shapes):
        dtype = dtypes[i % len(dtypes)]
        p = torch.nn.Parameter(torch.full(shape, 0.25, dtype=dtype, device=dev))
        p.grad = _equal_magnitude_rows(gen, shape, dtype, dev, scale=0.5)
        params.append(p)
    before = [p.grad.clone() for p in params]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for c, p in zip(copies, params):
        c.grad = p.grad.clone()
    gradclip.adaptive_clip_grad_(params, 0.01, 1e-3, backend=name)
    gradclip.adaptive_clip_grad_(copies, 0.01, 1e-3, backend="reference")
    assert all(not torch.equal(p.grad, b) for p, b in zip(params, before)), "every unit clips"
    _assert_same_bits([p.grad for p in params], [c.grad for c in copies], f"{name} agc against reference")


@pytest.mark.parametrize("mix", MIXES)
def test_per_tensor_clip_rounds_alike_on_every_backend(backend_device, gen, mix):
    name, device = backend_device
    dtypes = DTYPE_MIXES[mix]
    dev = on_device(device)
    grads = [_equal_magnitude_rows(gen, (n,), dtypes[i % len(dtypes)], dev, scale=2.0)
             for i, n in enumerate([4, 16, 1, 64, 4, 16] * 4)]
    before = [g.detach().cpu().clone() for g in grads]
    reference = [g.clone() for g in grads]
    norms = dispatch.clip_per_tensor_(grads, 2.0, 1.0, backend=name)
    reference_norms = dispatch.clip_per_tensor_(reference, 2.0, 1.0, backend="reference")
    assert torch.equal(norms.cpu(), reference_norms.cpu()), "exact norms: equal on every backend"
    coefs = clip_coefficient(reference_norms.cpu(), 1.0)
    assert bool((coefs < 1).all()), "every tensor clips: every rescale is compared"
    _assert_same_bits(grads, [_defined(b, c) for b, c in zip(before, coefs)], f"{name} clip_per_tensor_")
    _assert_same_bits(grads, reference, f"{name} clip_per_tensor_ against reference")
