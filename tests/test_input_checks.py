"""Every op checks every input before it writes anything (issue 21, item 5): a bad tensor
late in the list (expanded, of an unsupported dtype, a mismatched AGC pair) raises, and
every earlier gradient is left bitwise as it was, on every backend that runs here."""

from __future__ import annotations

import pytest
import torch
from conftest import on_device

import gradclip
from gradclip.backends import dispatch, resolve


def _params(gen, device, count=4, scale=10.0):
    """Parameters whose gradients all clip (norms well above 1)."""
    params = []
    for i in range(count):
        p = torch.nn.Parameter(torch.randn(3, 5, generator=gen).to(on_device(device)))
        p.grad = (torch.randn(3, 5, generator=gen) * scale).to(p.device)
        params.append(p)
    return params


def _expanded_last(params):
    """The last parameter's gradient an expanded view: its 15 elements are 5 locations."""
    params[-1].grad = params[-1].grad[:1].expand(3, 5)
    return params


CLIPS = {
    "clip_grad_norm_": lambda ps, b: gradclip.clip_grad_norm_(ps, 1.0, backend=b),
    "clip_grad_value_": lambda ps, b: gradclip.clip_grad_value_(ps, 0.1, backend=b),
    "clip_grad_norm_per_tensor_": lambda ps, b: gradclip.clip_grad_norm_per_tensor_(ps, 1.0, backend=b),
    "adaptive_clip_grad_": lambda ps, b: gradclip.adaptive_clip_grad_(ps, 0.01, backend=b),
}


@pytest.mark.parametrize("clip", list(CLIPS))
def test_an_expanded_gradient_last_raises_before_any_write(backend_device, gen, clip):
    name, device = backend_device
    params = _expanded_last(_params(gen, device))
    before = [p.grad.clone() for p in params]
    with pytest.raises(RuntimeError, match="share memory"):
        CLIPS[clip](params, name)
    for p, b in zip(params, before):
        assert torch.equal(p.grad, b), "a gradient was written before the bad one was found"


OPS = {
    "scale_": lambda ts, b: dispatch.scale_(ts, torch.tensor([0.5], device=ts[0].device), backend=b),
    "clip_grads_": lambda ts, b: dispatch.clip_grads_(ts, 2.0, 1.0, backend=b),
    "clamp_": lambda ts, b: dispatch.clamp_(ts, 0.1, backend=b),
    "scale_per_tensor_": lambda ts, b: dispatch.scale_per_tensor_(
        ts, torch.full((len(ts),), 0.5, device=ts[0].device), backend=b),
    "clip_per_tensor_": lambda ts, b: dispatch.clip_per_tensor_(ts, 2.0, 1.0, backend=b),
    "agc_": lambda ts, b: dispatch.agc_([torch.ones_like(t) for t in ts], ts, 0.01, 1e-3, 2.0, backend=b),
}


@pytest.mark.parametrize("op", list(OPS))
def test_each_op_refuses_an_expanded_tensor_on_a_second_part(backend_device, gen, op):
    """A list the dispatcher splits (real and complex tensors): the check covers every
    part before the first is written."""
    name, device = backend_device
    if name != "reference" and op != "clamp_":
        pytest.skip("complex tensors run on the reference backend only")
    tensors = [g.grad for g in _params(gen, device, 3)]
    bad = torch.randn(1, 5, dtype=torch.complex64, generator=gen).to(tensors[0].device).expand(3, 5)
    tensors.append(bad)
    before = [t.clone() for t in tensors[:-1]]
    with pytest.raises((RuntimeError, TypeError), match="share memory|complex"):
        OPS[op](tensors, name)
    assert all(torch.equal(t, b) for t, b in zip(tensors, before))


@pytest.mark.parametrize("op", list(OPS))
def test_each_backend_op_refuses_an_expanded_tensor_before_writing(backend_device, gen, op):
    """Called on the backend itself (as torch.library's ops and the CUDA ops are): the
    backend either takes the list and checks it, or returns it (NotImplemented) unwritten."""
    name, device = backend_device
    backend = resolve(name, on_device(device))
    tensors = [p.grad for p in _expanded_last(_params(gen, device))]
    before = [t.clone() for t in tensors]
    call = OPS[op]
    with pytest.raises(RuntimeError, match="share memory"):
        call(tensors, name)
    direct = {"scale_": lambda: backend.scale_(tensors, torch.tensor([0.5], device=tensors[0].device)),
              "clip_grads_": lambda: backend.clip_grads_(tensors, 2.0, 1.0),
              "clamp_": lambda: backend.clamp_(tensors, 0.1),
              "scale_per_tensor_": lambda: backend.scale_per_tensor_(
                  tensors, torch.full((4,), 0.5, device=tensors[0].device)),
              "clip_per_tensor_": lambda: backend.clip_per_tensor_(tensors, 2.0, 1.0),
              "agc_": lambda: backend.agc_([torch.ones_like(t) for t in tensors], tensors, 0.01, 1e-3,
                                           2.0)}[op]
    try:
        result = direct()
    except RuntimeError as error:
        assert "share memory" in str(error)
    else:
        assert result is NotImplemented
    assert all(torch.equal(t, b) for t, b in zip(tensors, before))


@pytest.mark.parametrize("op", ["clip_per_tensor_", "scale_per_tensor_", "clip_grads_", "scale_"])
def test_a_bad_dtype_last_raises_before_any_write(backend_device, gen, op):
    name, device = backend_device
    backend = resolve(name, on_device(device))
    tensors = [p.grad for p in _params(gen, device, 3)]
    tensors.append(torch.ones(4, dtype=torch.int32, device=tensors[0].device))
    before = [t.clone() for t in tensors]
    with pytest.raises(TypeError, match="dtype"):
        OPS[op](tensors, name)
    direct = {"scale_": lambda: backend.scale_(tensors, torch.tensor([0.5], device=tensors[0].device)),
              "clip_grads_": lambda: backend.clip_grads_(tensors, 2.0, 1.0),
              "scale_per_tensor_": lambda: backend.scale_per_tensor_(
                  tensors, torch.full((4,), 0.5, device=tensors[0].device)),
              "clip_per_tensor_": lambda: backend.clip_per_tensor_(tensors, 2.0, 1.0)}[op]
    with pytest.raises((TypeError, RuntimeError)):
        direct()
    assert all(torch.equal(t, b) for t, b in zip(tensors, before))


def test_agc_pair_of_other_shapes_last_raises_before_any_write(backend_device, gen):
    name, device = backend_device
    backend = resolve(name, on_device(device))
    grads = [p.grad for p in _params(gen, device)]
    weights = [torch.ones_like(g) for g in grads]
    weights[-1] = torch.ones(5, 3, device=grads[0].device)
    before = [g.clone() for g in grads]
    with pytest.raises(ValueError, match="shape"):
        dispatch.agc_(weights, grads, 0.01, 1e-3, 2.0, backend=name)
    with pytest.raises((ValueError, RuntimeError), match="shape"):  # RuntimeError: a C++ op
        backend.agc_(weights, grads, 0.01, 1e-3, 2.0)
    with pytest.raises(ValueError, match="one parameter per gradient"):
        dispatch.agc_(weights[:-1], grads, 0.01, 1e-3, 2.0, backend=name)
    assert all(torch.equal(g, b) for g, b in zip(grads, before))


def test_expanded_gradients_are_still_read(backend_device, gen):
    """Reading is fine (torch's norms read them too): only writes refuse them."""
    name, device = backend_device
    grads = [p.grad for p in _expanded_last(_params(gen, device))]
    want = torch.linalg.vector_norm(torch.stack([g.double().norm() for g in grads]))
    stats = dispatch.norm_stats(grads, 2.0, 1.0, backend=name)
    assert float(stats[0]) == pytest.approx(float(want), rel=1e-5)
    norms = dispatch.tensor_norms(grads, 2.0, backend=name)
    assert float(norms[-1]) == pytest.approx(float(grads[-1].double().norm()), rel=1e-5)
