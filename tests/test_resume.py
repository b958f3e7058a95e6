"""Resuming from a checkpoint does what the user means (issue 20, item 7).

The policy (docs/optimizer.md, "Resuming"): the settings an optimizer is built with win;
the saved state that fits them is restored; what does not is dropped with one warning
naming it. Each test makes a move people make between a run and its resumption.
"""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from test_health import INNER, make_params, norm_sequence, run

import gradclip

NORMS = norm_sequence(40, spikes=[25, 33], seed=9)


def saved_run(**settings) -> dict:
    """The state dict after 30 steps of an optimizer built with ``settings``, through
    torch.save and torch.load as a user's checkpoint goes."""
    params = make_params()
    opt = gradclip.ClippedOptimizer(INNER["adamw"](params), **settings)
    run(opt, params, NORMS[:30])
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer)


def resume(state: dict, **settings):
    """A fresh optimizer built with ``settings``, loaded from ``state``; the warnings said."""
    opt = gradclip.ClippedOptimizer(INNER["adamw"](make_params()), **settings)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        opt.load_state_dict(state)
    return opt, [str(w.message) for w in said if "gradclip" in str(w.message)]


def guard(**kwargs) -> gradclip.SpikeGuard:
    return gradclip.SpikeGuard(**{"window": 10, "warmup": 5, "action": "flag", **kwargs})


def test_same_settings_resume_silently_and_continue_as_one_run():
    settings = lambda: dict(max_norm=gradclip.ZClip(warmup_steps=5), history=64,  # noqa: E731
                            spike_guard=guard())
    whole_params = make_params()
    whole = gradclip.ClippedOptimizer(INNER["adamw"](whole_params), **settings())
    run(whole, whole_params, NORMS)
    opt, said = resume(saved_run(**settings()), **settings())
    assert said == []
    params = [p for g in opt.param_groups for p in g["params"]]
    with torch.no_grad():
        for p, q in zip(params, make_params()):
            p.copy_(q)
    gen_state = torch.Generator().manual_seed(0)
    from test_health import set_grads
    for norm in NORMS[:30]:
        set_grads(make_params(), norm, gen_state)  # the same draws as the first 30 steps
    for norm in NORMS[30:]:
        set_grads(params, norm, gen_state)
        opt.step()
    assert opt.stats() == whole.stats()
    assert torch.equal(opt.norm_history(), whole.norm_history())


def test_adding_a_guard_starts_it_fresh_and_keeps_the_counters():
    opt, said = resume(saved_run(history=16), history=16, spike_guard=guard())
    assert said == [] and opt.stats()["steps"] == 30
    assert opt.spike_guard.norm_window()[0].count.item() == 0  # a new guard warms up


def test_changing_the_factor_keeps_the_window():
    state = saved_run(spike_guard=guard(factor=3.0))
    opt, said = resume(state, spike_guard=guard(factor=5.0))
    assert said == [] and opt.spike_guard.factor == 5.0
    windows, _ = opt.spike_guard.norm_window()
    saved = state["gradclip"]["guard"]["windows"]
    assert torch.equal(windows.values, saved["values"]) and windows.count.item() == 29  # 25 spiked


def test_changing_the_window_drops_the_window_and_says_so():
    opt, said = resume(saved_run(spike_guard=guard(window=10)), spike_guard=guard(window=20))
    assert len(said) == 1 and "windows (10 values; this guard keeps 20)" in said[0]
    assert opt.spike_guard.window == 20 and opt.stats()["steps"] == 30


@pytest.mark.parametrize("saved_size, new_size", [(16, 64), (64, 8)])
def test_changing_the_history_keeps_what_fits(saved_size, new_size):
    state = saved_run(history=saved_size)
    opt, said = resume(state, history=new_size)
    kept = min(saved_size, new_size, 30)
    history = opt.norm_history()
    assert history.numel() == kept
    assert history.tolist() == pytest.approx(NORMS[30 - kept:30], rel=1e-6)
    if kept < min(saved_size, 30):
        assert len(said) == 1 and f"{min(saved_size, 30) - kept} of the" in said[0]
    else:
        assert said == []


@pytest.mark.parametrize("saved, built, warns", [
    (lambda: gradclip.ZClip(warmup_steps=5), lambda: gradclip.AutoClip(20.0), "ZClip's state"),
    (lambda: gradclip.ZClip(warmup_steps=5), lambda: 1.0, "ZClip's state"),
    (lambda: 1.0, lambda: gradclip.ZClip(warmup_steps=5), None),
    (lambda: gradclip.ZClip(warmup_steps=5), lambda: gradclip.ZClip(warmup_steps=8), "ZClip's state"),
    (lambda: gradclip.ZClip(warmup_steps=5), lambda: gradclip.ZClip(warmup_steps=5, alpha=0.9), None),
    (lambda: gradclip.PerTensor(0.5), lambda: 2.0, None),
])
def test_switching_the_rule_keeps_the_built_one(saved, built, warns):
    """The rule the optimizer is built with stays; a saved rule's learned state is kept when
    it fits (same class and shapes: a changed alpha fits, a changed warm-up does not)."""
    opt, said = resume(saved_run(max_norm=saved()), max_norm=built())
    expected = built()
    assert type(opt.max_norm) is type(expected)
    if isinstance(expected, float):
        assert opt.max_norm == expected
    else:
        assert opt.max_norm.config() == expected.config()
    if warns is None:
        assert said == []
    else:
        assert len(said) == 1 and warns in said[0]


def test_removing_the_guard_drops_its_windows_and_says_so():
    opt, said = resume(saved_run(spike_guard=guard()))
    assert opt.spike_guard is None
    assert len(said) == 1 and "spike guard's windows" in said[0]


def test_the_guard_can_be_assigned_between_steps():
    params = make_params()
    opt = gradclip.ClippedOptimizer(INNER["sgd"](params), max_norm=math.inf)
    run(opt, params, NORMS[:10])
    opt.spike_guard = guard(window=4, warmup=2)
    run(opt, params, NORMS[10:30])
    assert opt.stats()["spike_steps"] == 1  # step 25
    opt.spike_guard = None
    run(opt, params, NORMS[30:])
    assert opt.metrics()["spike_steps"].item() == 1 and opt.stats()["steps"] == 40
    with pytest.raises(TypeError, match="spike_guard"):
        opt.spike_guard = "skip"
