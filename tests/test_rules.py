"""ZClip, AutoClip and suggest_max_norm: the papers' algorithms, on the device.

Each rule is checked against a plain-Python port of its paper's algorithm (ZClip: Kumar et
al. 2025, the reference code's default ``zscore`` mode with ``adaptive_scaling``; AutoClip:
Seetharaman et al. 2020) on synthetic norm sequences with injected spikes, then end to end
through ``clip_grad_norm_`` and ``ClippedOptimizer``.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pytest
import torch
from conftest import gpu

import gradclip
from gradclip.rules import rule_from_state

# ---------------------------------------------------------------------------------------
# Plain-Python ports of the papers' algorithms (floats, lists, numpy.percentile)
# ---------------------------------------------------------------------------------------


def zclip_port(norms, alpha=0.97, z_thresh=2.5, warmup_steps=25, max_norm=None, eps=1e-6):
    """ZClip's per-step clip value (None: not clipped), as in the paper's Algorithm 1."""
    buffer, mean, var, out = [], None, None, []
    for g in norms:
        if mean is None:
            buffer.append(g)
            if len(buffer) == warmup_steps:
                mean = sum(buffer) / len(buffer)
                var = sum((x - mean) ** 2 for x in buffer) / len(buffer)
            out.append(max_norm)
            continue
        std = var ** 0.5
        z = (g - mean) / (std + eps)
        clip = mean + (z_thresh * std) / (z / z_thresh) if z > z_thresh else None
        fed = g if clip is None else clip
        mean = alpha * mean + (1 - alpha) * fed
        var = alpha * var + (1 - alpha) * (fed - mean) ** 2
        if max_norm is not None:
            clip = max_norm if clip is None else min(clip, max_norm)
        out.append(clip)
    return out


def autoclip_port(norms, percentile=10.0, history=None):
    """AutoClip's per-step clip value: the percentile of the history, this norm included
    (the paper keeps every norm; ``history`` bounds it to the last ones)."""
    seen, out = [], []
    for g in norms:
        seen.append(g)
        window = seen if history is None else seen[-history:]
        out.append(float(np.percentile(window, percentile)))
    return out


def synthetic_norms(n, spikes, seed=0, base=2.0):
    """A drifting, noisy norm sequence with a spike (x30) at each of ``spikes``."""
    rng = np.random.default_rng(seed)
    norms = base * np.exp(0.15 * rng.standard_normal(n)) * np.linspace(1.0, 0.6, n)
    for i in spikes:
        norms[i] *= 30.0
    return [float(x) for x in norms]


def thresholds(rule, norms):
    return [float(rule.threshold_(torch.tensor(g, dtype=torch.float64))) for g in norms]


def assert_same_clips(ours, theirs, rel=1e-9):
    assert len(ours) == len(theirs)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        if b is None:
            assert a == math.inf, f"step {step}: clipped to {a}, the port does not clip"
        else:
            assert math.isclose(a, b, rel_tol=rel), f"step {step}: {a} != {b}"


SPIKES = [40, 41, 90, 150]

# ---------------------------------------------------------------------------------------
# ZClip
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{}, {"alpha": 0.9, "z_thresh": 2.0, "warmup_steps": 10},
                                    {"max_norm": 2.5}])
def test_zclip_thresholds_match_the_papers_algorithm(kwargs):
    norms = synthetic_norms(200, SPIKES)
    ours = thresholds(gradclip.ZClip(**kwargs), norms)
    assert_same_clips(ours, zclip_port(norms, **kwargs))
    clipped = {i for i, t in enumerate(ours) if t < norms[i]}
    assert set(SPIKES) <= clipped


def test_zclip_clips_no_step_of_its_warmup_without_a_ceiling():
    norms = synthetic_norms(30, [3, 7])
    ours = thresholds(gradclip.ZClip(warmup_steps=25), norms)
    assert all(t == math.inf for t in ours[:25])


def test_zclip_ignores_nonfinite_norms():
    norms = synthetic_norms(80, [50])
    with_inf = norms[:60] + [math.inf, math.nan] + norms[60:]
    rule = gradclip.ZClip()
    ours = thresholds(rule, with_inf)
    assert ours[60] == ours[61] == math.inf
    assert_same_clips(ours[:60] + ours[62:], zclip_port(norms))


# ---------------------------------------------------------------------------------------
# AutoClip
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("percentile, history", [(10.0, 1000), (10.0, 37), (90.0, 16), (0.0, 5),
                                                 (100.0, 8), (50.0, 1)])
def test_autoclip_thresholds_match_the_papers_algorithm(percentile, history):
    norms = synthetic_norms(150, SPIKES[:3], seed=1)
    ours = thresholds(gradclip.AutoClip(percentile, history), norms)
    assert_same_clips(ours, autoclip_port(norms, percentile, history), rel=1e-12)


def test_autoclip_with_a_history_longer_than_the_run_is_the_paper_rule():
    norms = synthetic_norms(120, SPIKES[:2], seed=2)
    ours = thresholds(gradclip.AutoClip(10.0, history=1000), norms)
    assert_same_clips(ours, autoclip_port(norms, 10.0, history=None), rel=1e-12)
    clipped = {i for i, t in enumerate(ours) if t < norms[i]}
    assert set(SPIKES[:2]) <= clipped


def test_autoclip_ignores_nonfinite_norms():
    rule = gradclip.AutoClip(50.0, history=10)
    assert thresholds(rule, [math.nan]) == [math.inf]
    assert thresholds(rule, [1.0, math.inf, 3.0]) == [1.0, 1.0, 2.0]


# ---------------------------------------------------------------------------------------
# End to end: clip_grad_norm_ and ClippedOptimizer
# ---------------------------------------------------------------------------------------


def grads_with_norms(norms, seed=0):
    """One gradient per step whose global norm (two tensors) is the given norm."""
    gen = torch.Generator().manual_seed(seed)
    for g in norms:
        a, b = torch.randn(7, generator=gen), torch.randn(3, 2, generator=gen)
        scale = g / float(torch.cat([a, b.flatten()]).norm())
        yield a * scale, b * scale


@pytest.mark.parametrize("make_rule, port", [
    (lambda: gradclip.ZClip(warmup_steps=10), lambda n: zclip_port(n, warmup_steps=10)),
    (lambda: gradclip.AutoClip(25.0, history=20), lambda n: autoclip_port(n, 25.0, 20)),
])
def test_clip_grad_norm_takes_a_rule_as_max_norm(make_rule, port):
    norms = synthetic_norms(60, [20, 45], seed=3)
    rule = make_rule()
    params = [torch.nn.Parameter(torch.zeros(7)), torch.nn.Parameter(torch.zeros(3, 2))]
    for step, ((a, b), clip) in enumerate(zip(grads_with_norms(norms), port(norms))):
        params[0].grad, params[1].grad = a.clone(), b.clone()
        before = gradclip.clip_grad_norm_(params, max_norm=rule)
        factor = 1.0 if clip is None else min(1.0, clip / (float(before) + 1e-6))
        expected = [a * factor, b * factor]
        for p, e in zip(params, expected):
            torch.testing.assert_close(p.grad, e, rtol=1e-6, atol=1e-7,
                                       msg=lambda m: f"step {step}: {m}")


def train_with_rule(rule, norms, state=None):
    params = [torch.nn.Parameter(torch.ones(7)), torch.nn.Parameter(torch.ones(3, 2))]
    opt = gradclip.ClippedOptimizer(torch.optim.SGD(params, lr=0.01), max_norm=rule, history=64)
    if state is not None:
        opt.load_state_dict(state)
    for a, b in grads_with_norms(norms):
        params[0].grad, params[1].grad = a.clone(), b.clone()
        opt.step()
    return params, opt


def test_clipped_optimizer_takes_a_rule_and_counts_its_clips():
    norms = synthetic_norms(80, [30, 60], seed=4)
    clips = zclip_port(norms, warmup_steps=10)
    params, opt = train_with_rule(gradclip.ZClip(warmup_steps=10), norms)
    expected = [torch.ones(7), torch.ones(3, 2)]
    for (a, b), clip, g in zip(grads_with_norms(norms), clips, norms):
        factor = 1.0 if clip is None else min(1.0, clip / (g + 1e-6))
        expected[0] -= 0.01 * a * factor
        expected[1] -= 0.01 * b * factor
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-6)
    assert opt.stats()["clipped_steps"] == sum(c is not None for c in clips)
    last = clips[-1]
    assert opt.metrics()["max_norm"].item() == pytest.approx(math.inf if last is None else last)


@pytest.mark.parametrize("make_rule", [lambda: gradclip.ZClip(warmup_steps=5),
                                       lambda: gradclip.AutoClip(10.0, history=12)])
def test_rule_state_round_trips_through_the_optimizer_state_dict(make_rule):
    norms = synthetic_norms(40, [25], seed=5)
    whole, _ = train_with_rule(make_rule(), norms)
    _, first = train_with_rule(make_rule(), norms[:20])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)
    # A fresh optimizer built with a fresh rule of the same kind gets the rule's state back.
    params = [torch.nn.Parameter(p.detach().clone()) for p in first.optimizer.param_groups[0]["params"]]
    resumed = gradclip.ClippedOptimizer(torch.optim.SGD(params, lr=0.01), max_norm=make_rule(),
                                        history=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # it all fits: nothing dropped
        resumed.load_state_dict(state)
    assert type(resumed.max_norm) is type(first.max_norm)
    assert resumed.max_norm.config() == first.max_norm.config()
    rest = list(grads_with_norms(norms))[20:]
    for a, b in rest:
        params[0].grad, params[1].grad = a.clone(), b.clone()
        resumed.step()
    for p, q in zip(params, whole):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)


@gpu
def test_a_rule_checkpointed_on_the_gpu_is_loaded_onto_the_parameters_device():
    rule = gradclip.ZClip(warmup_steps=2)
    for g in (1.0, 2.0, 3.0):
        rule.threshold_(torch.tensor(g, device="cuda"))
    state = rule.state_dict()
    opt = gradclip.ClippedOptimizer(torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1))
    own = opt.state_dict()
    own["gradclip"].update(rule_type="ZClip", rule=state)
    opt.load_state_dict(own)
    assert opt.max_norm.device == torch.device("cpu")
    assert torch.equal(opt.max_norm.state_dict()["mean"], state["mean"].cpu())


def test_rule_state_dict_restores_a_rule_of_its_own():
    rule = gradclip.AutoClip(20.0, history=6)
    thresholds(rule, [1.0, 2.0, 3.0])
    again = rule_from_state(rule.state_dict())
    assert thresholds(again, [4.0]) == thresholds(rule, [4.0])
    with pytest.raises(ValueError, match="settings"):
        gradclip.AutoClip(30.0, history=6).load_state_dict(rule.state_dict())
    with pytest.raises(ValueError, match="AutoClip"):
        gradclip.ZClip().load_state_dict(rule.state_dict())


@pytest.mark.parametrize("make, match", [
    (lambda: gradclip.ZClip(alpha=1.0), "alpha"),
    (lambda: gradclip.ZClip(z_thresh=0), "z_thresh"),
    (lambda: gradclip.ZClip(warmup_steps=0), "warmup_steps"),
    (lambda: gradclip.ZClip(max_norm=-1.0), "max_norm"),
    (lambda: gradclip.AutoClip(percentile=101), "percentile"),
    (lambda: gradclip.AutoClip(history=0), "history"),
    (lambda: gradclip.SpikeGuard(factor=1.0), "factor"),
    (lambda: gradclip.SpikeGuard(window=0), "window"),
    (lambda: gradclip.SpikeGuard(warmup=0), "warmup"),
    (lambda: gradclip.SpikeGuard(action="drop"), "action"),
])
def test_bad_settings_raise_value_errors_naming_them(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_a_rule_is_the_state_of_one_device():
    rule = gradclip.ZClip().bind("cpu")
    with pytest.raises(RuntimeError, match="one rule per device"):
        rule.bind("meta")


# ---------------------------------------------------------------------------------------
# suggest_max_norm
# ---------------------------------------------------------------------------------------


def test_suggest_max_norm_is_the_documented_percentile():
    norms = synthetic_norms(300, [100, 200], seed=6)
    norms[0:5] = [50.0] * 5  # the first steps' large norms, skipped
    with_nonfinite = norms + [math.inf, math.nan]
    suggested = gradclip.suggest_max_norm(torch.tensor(with_nonfinite, dtype=torch.float64))
    kept = norms[int(len(with_nonfinite) * 0.1):]
    assert suggested == pytest.approx(float(np.percentile(kept, 90)), rel=1e-12)
    assert np.median(kept) < suggested < max(kept)
    assert gradclip.suggest_max_norm(norms, percentile=75, skip_first=0) == pytest.approx(
        float(np.percentile(norms, 75)), rel=1e-12)


def test_suggest_max_norm_refuses_what_it_cannot_judge():
    with pytest.raises(ValueError, match="finite"):
        gradclip.suggest_max_norm([math.nan, math.inf], skip_first=0)
    with pytest.raises(ValueError, match="percentile"):
        gradclip.suggest_max_norm([1.0, 2.0], percentile=40)


@gpu
@pytest.mark.parametrize("make_rule", [lambda: gradclip.ZClip(warmup_steps=3),
                                       lambda: gradclip.AutoClip(25.0, history=8)])
def test_a_rule_clip_replays_in_a_cuda_graph(make_rule):
    """Captured once, replayed on new gradients: the same clips as eager calls."""
    norms = synthetic_norms(12, [9], seed=8)
    grads = [tuple(g.cuda() for g in pair) for pair in grads_with_norms(norms)]
    eager_rule, graph_rule = make_rule(), make_rule()
    eager = [torch.nn.Parameter(torch.zeros(7, device="cuda")),
             torch.nn.Parameter(torch.zeros(3, 2, device="cuda"))]
    captured = [torch.nn.Parameter(torch.zeros(7, device="cuda")),
                torch.nn.Parameter(torch.zeros(3, 2, device="cuda"))]
    for p, g in zip(captured, grads[0]):
        p.grad = g.clone()
    gradclip.clip_grad_norm_(captured, max_norm=graph_rule, backend="cuda")  # warm-up: step 0
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gradclip.clip_grad_norm_(captured, max_norm=graph_rule, backend="cuda")
    for step, pair in enumerate(grads):
        for p, g in zip(eager, pair):
            p.grad = g.clone()
        gradclip.clip_grad_norm_(eager, max_norm=eager_rule, backend="cuda")
        if step:
            for p, g in zip(captured, pair):
                p.grad.copy_(g)
            graph.replay()
        for p, q in zip(captured, eager):
            torch.testing.assert_close(p.grad, q.grad, msg=lambda m: f"step {step}: {m}")
