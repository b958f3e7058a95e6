"""Where features meet: the seams of the clip pipeline (measure, threshold, apply).

Each test here was a defect at a seam between two features (issue 21): a local rule and
error_if_nonfinite, the functional API and local rules, tracking per-tensor norms with
gradless parameters, what a local rule's step reports, and arguments a seam took for
something else. The composition matrix (test_composition.py) checks every feature with
every other; these pin the individual defects.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FailOnHostReads
from test_health import INNER, make_params, set_grads

import gradclip

LOCAL_RULES = {"per_tensor": lambda: gradclip.PerTensor(0.5),
               "agc": lambda: gradclip.AGC(clip_factor=0.01)}


@pytest.mark.parametrize("name", list(LOCAL_RULES))
@pytest.mark.parametrize("inner", ["sgd", "adamw_fused"])
def test_local_rules_honour_error_if_nonfinite(name, inner):
    """An inf gradient raises before anything is written, as with a float max_norm (it
    turned the weights into NaN)."""
    params = make_params()
    opt = gradclip.ClippedOptimizer(INNER[inner](params), max_norm=LOCAL_RULES[name](),
                                    error_if_nonfinite=True)
    set_grads(params, 3.0, torch.Generator().manual_seed(0))
    params[1].grad[0, 0] = math.inf
    weights = [p.detach().clone() for p in params]
    grads = [p.grad.clone() for p in params]
    with pytest.raises(RuntimeError, match="non-finite"):
        opt.step()
    for p, w, g in zip(params, weights, grads):
        assert torch.equal(p.detach(), w) and torch.equal(p.grad, g)


def test_clip_grad_norm_takes_local_rules_as_max_norm(gen):
    """docs/design.md says the functional max_norm takes PerTensor and AGC: it does, and
    returns the global pre-clip norm, clipping as their own functions do."""
    def twins():
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(6, 5), (5,), (3, 6)]]
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 3.0
        copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
        for p, c in zip(params, copies):
            c.grad = p.grad.clone()
        return params, copies

    ours, theirs = twins()
    before = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in ours]))
    norm = gradclip.clip_grad_norm_(ours, gradclip.PerTensor(0.5))
    per_tensor = gradclip.clip_grad_norm_per_tensor_(theirs, 0.5)
    assert norm.item() == pytest.approx(before.item(), rel=1e-6)
    assert norm.item() == pytest.approx(per_tensor.norm().item(), rel=1e-6)
    for p, q in zip(ours, theirs):
        assert torch.equal(p.grad, q.grad)

    ours, theirs = twins()
    norm = gradclip.clip_grad_norm_(ours, gradclip.AGC(clip_factor=0.05))
    assert norm.item() == pytest.approx(gradclip.adaptive_clip_grad_(theirs, 0.05).item(), rel=1e-6)
    for p, q in zip(ours, theirs):
        assert torch.equal(p.grad, q.grad)
    with pytest.raises(ValueError, match="norm_type"):
        gradclip.clip_grad_norm_(ours, gradclip.PerTensor(0.5), norm_type=1.0)


def test_tracking_norms_with_gradless_parameters_builds_no_index_per_step(monkeypatch):
    """track_tensor_norms with a frozen parameter: the slots of the gradients are a device
    index made once per layout, not a host list copied every step (a sync and a failed
    CUDA-graph capture on a GPU)."""
    params = make_params()
    opt = gradclip.ClippedOptimizer(INNER["sgd"](params), max_norm=1.0, track_tensor_norms=True)
    gen = torch.Generator().manual_seed(0)
    made = []
    real_tensor = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(a) or real_tensor(*a, **k))
    for step in range(4):
        set_grads(params, 2.0, gen)
        params[1].grad = None
        opt.step()
    assert len(made) == 1, made
    norms = opt.tensor_norms()
    assert math.isnan(norms[1].item()) and not norms[[0, 2]].isnan().any()


@pytest.mark.parametrize("name", list(LOCAL_RULES))
def test_a_local_rules_step_reports_what_it_clipped(name):
    """clipped_steps counts a step when any gradient (or unit) was clipped; clip_coef is the
    smallest factor; max_norm is the PerTensor's (NaN for AGC: one per unit)."""
    params = make_params()
    rule = LOCAL_RULES[name]()
    opt = gradclip.ClippedOptimizer(torch.optim.SGD(params, lr=0.0), max_norm=rule)
    gen = torch.Generator().manual_seed(0)
    set_grads(params, 1e-4, gen)  # nothing clips
    opt.step()
    set_grads(params, 30.0, gen)  # every tensor clips
    before = [p.grad.clone() for p in params]
    opt.step()
    metrics = {k: v.item() for k, v in opt.metrics().items()}
    assert opt.stats() == {"steps": 2, "clipped_steps": 1, "nonfinite_steps": 0}
    def units(t):  # a tensor for PerTensor; AGC's units: rows, or the whole of a 1-d tensor
        return [t] if name == "per_tensor" or t.ndim <= 1 else list(t)

    factors = [(a.norm() / b.norm()).item() for p, before_p in zip(params, before)
               for a, b in zip(units(p.grad), units(before_p))]
    assert metrics["clip_coef"] == pytest.approx(min(factors), rel=1e-5) and metrics["clip_coef"] < 1
    if name == "per_tensor":
        assert metrics["max_norm"] == 0.5
    else:
        assert math.isnan(metrics["max_norm"])


def test_local_rule_steps_never_read_the_host(monkeypatch):
    from gradclip.backends import reference

    monkeypatch.setattr(reference, "_decides_on_host", lambda device: False)
    params = make_params()
    opt = gradclip.ClippedOptimizer(INNER["adamw_fused"](params), max_norm=gradclip.PerTensor(0.5),
                                    spike_guard=gradclip.SpikeGuard(window=3, warmup=2))
    gen = torch.Generator().manual_seed(0)
    set_grads(params, 2.0, gen)
    opt.step()
    for norm in (2.0, 2.1, 40.0, 2.0):
        set_grads(params, norm, gen)
        with FailOnHostReads():
            opt.step()
    assert opt.stats()["skipped_steps"] == 1


@pytest.mark.parametrize("max_norm", [True, False])
def test_a_bool_max_norm_is_refused(max_norm):
    with pytest.raises(TypeError, match="max_norm"):
        gradclip.clip_grad_norm_(make_params(), max_norm)
    with pytest.raises(TypeError, match="max_norm"):
        gradclip.ClippedOptimizer(INNER["sgd"](make_params()), max_norm=max_norm)


def test_agc_excludes_a_module_given_whole():
    """AGC(exclude=model.fc) means the layer's parameters (it failed at the first step with
    'mat1 and mat2 shapes cannot be multiplied')."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    opt = gradclip.ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0),
                                    max_norm=gradclip.AGC(clip_factor=1e-4, exclude=model[2]))
    model(torch.randn(4, 6)).square().sum().backward()
    head = [p.grad.clone() for p in model[2].parameters()]
    body = [p.grad.clone() for p in model[0].parameters()]
    opt.step()
    for p, g in zip(model[2].parameters(), head):
        assert torch.equal(p.grad, g)
    for p, g in zip(model[0].parameters(), body):
        assert p.grad.norm() < g.norm()


def test_local_rules_refuse_sharded_gradients_at_construction():
    """A local rule clips whole tensors; over a process_group it refuses at once instead of
    clipping each rank's shard by the shard's own norm."""
    with pytest.raises(ValueError, match="sharded"):
        gradclip.ClippedOptimizer(INNER["sgd"](make_params()), max_norm=gradclip.PerTensor(1.0),
                                  process_group=object())
