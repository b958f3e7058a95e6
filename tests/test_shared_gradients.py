"""The same gradient twice in one list (a parameter listed twice, two parameters sharing
one ``.grad``), on every backend that runs here (issue 21, item 4).

Per-tensor clipping and AGC clip each distinct gradient once, as timm's loop does; the
global-norm clip keeps torch's semantics (the gradient counts twice in the norm and is
multiplied once per entry, as ``torch.nn.utils.clip_grad_norm_`` does on the CPU). Tensors
that overlap in memory without being the same are refused by the per-tensor ops before
anything is written. The GPU run adds the CUDA backend, whose kernels must not race on a
shared gradient.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import on_device

import gradclip
from gradclip.backends import dispatch


def _param(values: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.ones_like(values))


def test_per_tensor_clip_clips_a_parameter_listed_twice_once(backend_device):
    name, device = backend_device
    w = _param(torch.empty(4, device=on_device(device)))
    w.grad = torch.full((4,), 25.0, device=w.device)  # norm 50
    norms = gradclip.clip_grad_norm_per_tensor_([w, w], 1.0, backend=name)
    assert norms.tolist() == [50.0, 50.0], "a norm per entry, both taken before clipping"
    assert math.isclose(float(w.grad.norm()), 1.0, rel_tol=1e-5), "clipped once, to max_norm"


def test_per_tensor_clip_of_parameters_sharing_one_grad(backend_device, gen):
    name, device = backend_device
    dev = on_device(device)
    shared = (torch.randn(3, 5, generator=gen) * 10).to(dev)
    a, b, c = (torch.nn.Parameter(torch.zeros(3, 5, device=dev)) for _ in range(3))
    a.grad = b.grad = shared
    c.grad = (torch.randn(3, 5, generator=gen) * 10).to(dev)
    expected = [(g.double() * min(1.0, 2.0 / (float(g.double().norm()) + 1e-6))).float()
                for g in (shared, c.grad)]
    gradclip.clip_grad_norm_per_tensor_([a, c, b], 2.0, backend=name)
    torch.testing.assert_close(a.grad, expected[0], rtol=2e-6, atol=0)
    torch.testing.assert_close(c.grad, expected[1], rtol=2e-6, atol=0)
    assert b.grad is a.grad


def test_scale_per_tensor_scales_a_tensor_listed_twice_by_its_first_factor(backend_device, gen):
    name, device = backend_device
    dev = on_device(device)
    t, u = (torch.randn(40, generator=gen).to(dev) for _ in range(2))
    t_before, u_before = t.clone(), u.clone()
    dispatch.scale_per_tensor_([t, u, t], torch.tensor([0.5, 0.25, 0.125], device=dev), backend=name)
    assert torch.equal(t, t_before * 0.5) and torch.equal(u, u_before * 0.25)


def test_agc_clips_a_parameter_listed_twice_once_as_timm(backend_device, gen):
    agc = pytest.importorskip("timm.utils.agc")
    name, device = backend_device
    weights = torch.randn(6, 5, generator=gen)
    grads = torch.randn(6, 5, generator=gen)
    ours = torch.nn.Parameter(weights.clone().to(on_device(device)))
    ours.grad = grads.clone().to(ours.device)
    theirs = torch.nn.Parameter(weights.clone())
    theirs.grad = grads.clone()
    norm = gradclip.adaptive_clip_grad_([ours, ours], 0.01, 1e-3, backend=name)
    agc.adaptive_clip_grad([theirs, theirs], 0.01, 1e-3)
    torch.testing.assert_close(ours.grad.cpu(), theirs.grad, rtol=1e-5, atol=0)
    # The norm of the gradients before clipping, each distinct gradient once.
    assert math.isclose(float(norm), float(grads.double().norm()), rel_tol=1e-5)


def test_agc_rows_of_a_shared_grad_are_scaled_once(backend_device):
    """The numbers of the issue: rows of norm 2 against weights of norm 2 clip to 0.02."""
    name, device = backend_device
    dev = on_device(device)
    w, v = torch.nn.Parameter(torch.ones(2, 4, device=dev)), torch.nn.Parameter(torch.ones(2, 4, device=dev))
    w.grad = v.grad = torch.ones(2, 4, device=dev)
    norm = gradclip.adaptive_clip_grad_([w, v], 0.01, backend=name)
    torch.testing.assert_close(w.grad.cpu(), torch.full((2, 4), 0.01), rtol=1e-6, atol=0)
    assert math.isclose(float(norm), math.sqrt(8.0), rel_tol=1e-6)


@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.bfloat16, torch.float32, torch.float16)],
                         ids=["fp32", "mixed"])
def test_global_clip_of_a_parameter_listed_twice_is_torchs(backend_device, gen, dtypes):
    """torch counts it twice in the norm and multiplies it once per entry; so do we, on every
    backend (the fused kernels hand such a list to the reference: theirs would race)."""
    name, device = backend_device
    grads = [(torch.randn(50, generator=gen) * 3).to(dtypes[i % len(dtypes)]) for i in range(3)]
    ours = [torch.nn.Parameter(torch.zeros_like(g, device=on_device(device))) for g in grads]
    theirs = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for o, t, g in zip(ours, theirs, grads):
        o.grad, t.grad = g.clone().to(o.device), g.clone()
    norm = gradclip.clip_grad_norm_([ours[0], ours[1], ours[0], ours[2]], 1.0, backend=name)
    torch_norm = torch.nn.utils.clip_grad_norm_([theirs[0], theirs[1], theirs[0], theirs[2]], 1.0)
    # torch rounds a 16-bit tensor's norm to its dtype (so its factor is off by up to one
    # bfloat16 ulp, 2**-8, relative); gradclip keeps float32 (documented). The tensor listed
    # twice is multiplied twice, and each product is rounded: up to 2**-8 * 2 + 2**-9 apart.
    rtol = 1e-5 if dtypes == (torch.float32,) else 2e-2
    assert math.isclose(float(norm), float(torch_norm), rel_tol=rtol)
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o.grad.cpu(), t.grad, rtol=rtol, atol=0)


def test_scale_multiplies_each_entry_in_turn(backend_device, gen):
    name, device = backend_device
    t = torch.randn(100, generator=gen).to(on_device(device))
    want = t.clone()
    torch._foreach_mul_([want, want], torch.tensor(0.3))
    dispatch.scale_([t, t], torch.tensor([0.3], device=t.device), backend=name)
    assert torch.equal(t.cpu(), want.cpu())


def test_views_of_one_tensor_are_one_tensor(backend_device, gen):
    """``g`` and ``g.view(-1)`` hold the same elements: clipped once too."""
    name, device = backend_device
    g = (torch.randn(4, 6, generator=gen) * 10).to(on_device(device))
    want = g.double() * min(1.0, 1.0 / (float(g.double().norm()) + 1e-6))
    dispatch.clip_per_tensor_([g, g.view(-1)], 2.0, 1.0, backend=name)
    torch.testing.assert_close(g.double(), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("op", ["clip_per_tensor_", "scale_per_tensor_", "agc_"])
def test_per_tensor_ops_refuse_overlapping_tensors_before_writing(backend_device, gen, op):
    name, device = backend_device
    storage = (torch.randn(300, generator=gen) * 10).to(on_device(device))
    alone = (torch.randn(50, generator=gen) * 10).to(storage.device)
    tensors = [alone, storage[:200], storage[100:]]
    before = [t.clone() for t in tensors]
    call = {"clip_per_tensor_": lambda: dispatch.clip_per_tensor_(tensors, 2.0, 1.0, backend=name),
            "scale_per_tensor_": lambda: dispatch.scale_per_tensor_(
                tensors, torch.full((3,), 0.5, device=storage.device), backend=name),
            "agc_": lambda: dispatch.agc_([torch.ones_like(t) for t in tensors], tensors, 0.01, 1e-3,
                                          2.0, backend=name)}[op]
    with pytest.raises(RuntimeError, match=r"\[1\] and .*\[2\] overlap in memory"):
        call()
    assert all(torch.equal(t, b) for t, b in zip(tensors, before))


def test_global_clip_of_overlapping_views_is_torchs(backend_device, gen):
    name, device = backend_device
    storage = torch.randn(300, generator=gen) * 10
    theirs = storage.clone()
    ours = storage.to(on_device(device))
    # What torch.nn.utils.clip_grad_norm_ does with these as gradients, on the CPU.
    norm = torch.nn.utils.get_total_norm([theirs[:200], theirs[100:]])
    torch._foreach_mul_([theirs[:200], theirs[100:]], torch.clamp(1.0 / (norm + 1e-6), max=1.0))
    stats = dispatch.clip_grads_([ours[:200], ours[100:]], 2.0, 1.0, backend=name)
    assert math.isclose(float(stats[0]), float(norm), rel_tol=1e-5)
    torch.testing.assert_close(ours.cpu(), theirs, rtol=1e-5, atol=0)
