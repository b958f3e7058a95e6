"""ZClip with every option of the authors' code, against a plain-Python port of it.

``tests/test_rules.py`` holds the port (``zclip_port``: the paper's Algorithm 1 and the
options as the reference code's README and docstrings describe them, a float loop) and
the norm sequences; here each combination of ``mode``, ``clip_option``, ``clip_factor``,
``skip_update_on_spike``, ``max_norm`` and ``eps`` is checked against it over 600 steps
with injected spikes, then: no host reads, the compiled rule, checkpoints (old ones too),
the argument checks (AutoClip's beside ZClip's).
"""

from __future__ import annotations

import io
import itertools
import math

import numpy as np
import pytest
import torch
from conftest import FailOnHostReads, gpu
from test_rules import (
    SPIKES,
    assert_same_clips,
    grads_with_norms,
    synthetic_norms,
    thresholds,
    train_with_rule,
    zclip_port,
)

import gradclip
from gradclip import rules
from gradclip.rules import rule_from_state

# ---------------------------------------------------------------------------------------
# The paper's default rule (moved from tests/test_rules.py)
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


# ---------------------------------------------------------------------------------------
# Every option, against the port
# ---------------------------------------------------------------------------------------

# x30 spikes: one in every warm-up, runs of two and three, single ones; x3 outliers, near
# the z-score threshold, so that the modes disagree on them.
BIG_SPIKES = [4, 60, 61, 130, 131, 132, 250, 377, 420, 421, 555, 599]
MODERATE = [90, 200, 310, 470]


def spiky_norms(n: int = 600, seed: int = 11) -> list[float]:
    norms = synthetic_norms(n, [i for i in BIG_SPIKES if i < n], seed=seed)
    for i in MODERATE:
        if i < n:
            norms[i] *= 3.0
    return norms


CLIP_RULES = {
    "zscore_adaptive": {},
    "zscore_adaptive_factor_0.7": {"clip_factor": 0.7},
    "zscore_adaptive_factor_1.5": {"clip_factor": 1.5},
    "zscore_mean": {"clip_option": "mean"},
    "percentile": {"mode": "percentile"},
}
SETTINGS = {
    "defaults": {},
    "fast": {"alpha": 0.9, "z_thresh": 2.0, "warmup_steps": 10, "eps": 1e-3},
}
COMBINATIONS = {
    f"{rule}-{settings}-skip_{skip}-max_norm_{ceiling}":
        {**CLIP_RULES[rule], **SETTINGS[settings], "skip_update_on_spike": skip,
         "max_norm": ceiling}
    for rule, settings, skip, ceiling in itertools.product(CLIP_RULES, SETTINGS, (False, True),
                                                           (None, 3.0))
}


@pytest.mark.parametrize("kwargs", list(COMBINATIONS.values()), ids=list(COMBINATIONS))
def test_every_option_combination_matches_the_reference_port(kwargs):
    norms = spiky_norms()
    rule = gradclip.ZClip(**kwargs)
    final = {}
    expected = zclip_port(norms, **kwargs, final=final)
    ours = thresholds(rule, norms)
    assert_same_clips(ours, expected, rel=1e-12)
    state = rule.state_dict()
    assert float(state["mean"]) == pytest.approx(final["mean"], rel=1e-12)
    assert float(state["var"]) == pytest.approx(final["var"], rel=1e-12)
    warmup = kwargs.get("warmup_steps", 25)
    clipped = {i for i, t in enumerate(ours) if t < norms[i]}
    assert {i for i in BIG_SPIKES if i >= warmup} <= clipped


def test_each_option_changes_the_clips():
    """The options are not ignored: each rule, and skipping the update, clips differently."""
    norms = spiky_norms()
    runs = {(name, skip): tuple(thresholds(gradclip.ZClip(**kwargs, skip_update_on_spike=skip),
                                           norms))
            for name, kwargs in CLIP_RULES.items() for skip in (False, True)}
    assert len(set(runs.values())) == len(runs)


@pytest.mark.parametrize("kwargs", list(CLIP_RULES.values()), ids=list(CLIP_RULES))
def test_zclip_ignores_nonfinite_norms_in_every_mode(kwargs):
    norms = spiky_norms(200)
    with_inf = norms[:5] + [math.nan] + norms[5:80] + [math.inf, -math.inf] + norms[80:]
    ours = thresholds(gradclip.ZClip(**kwargs, skip_update_on_spike=True), with_inf)
    assert ours[5] == ours[81] == ours[82] == math.inf
    kept = ours[:5] + ours[6:81] + ours[83:]
    assert_same_clips(kept, zclip_port(norms, **kwargs, skip_update_on_spike=True), rel=1e-12)


@pytest.mark.parametrize("kwargs", list(CLIP_RULES.values()), ids=list(CLIP_RULES))
def test_no_option_reads_the_host(kwargs):
    rule = gradclip.ZClip(**kwargs, warmup_steps=5, max_norm=3.0, skip_update_on_spike=True)
    norms = [torch.tensor(g, dtype=torch.float64) for g in spiky_norms(40)]
    with FailOnHostReads():
        out = [rule.threshold_(g) for g in norms]
    assert all(t.dim() == 0 for t in out)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("kwargs", [
    {"mode": "percentile", "skip_update_on_spike": True},
    {"clip_option": "mean", "max_norm": 3.0},
    {"clip_factor": 0.7, "skip_update_on_spike": True, "eps": 1e-3},
], ids=["percentile_skip", "mean_max_norm", "adaptive_factor_skip"])
def test_compiled_rule_clips_as_the_eager_rule(kwargs, fresh_dynamo):
    norms = spiky_norms(120)
    eager = thresholds(gradclip.ZClip(**kwargs, warmup_steps=8), norms)
    rule = gradclip.ZClip(**kwargs, warmup_steps=8)
    # Before torch 2.14 the rule's update runs eagerly inside the graph (rules._TRACEABLE).
    step = torch.compile(rule.threshold_, fullgraph=rules._TRACEABLE)
    compiled = [float(step(torch.tensor(g, dtype=torch.float64))) for g in norms]
    assert [t < g for t, g in zip(compiled, norms)] == [t < g for t, g in zip(eager, norms)]
    assert compiled == pytest.approx(eager, rel=1e-12)


# ---------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------

OPTIONS = {"mode": "percentile", "skip_update_on_spike": True, "max_norm": 3.0, "eps": 1e-4}


def test_options_round_trip_through_the_optimizer_state_dict():
    norms = spiky_norms(60)
    whole, _ = train_with_rule(gradclip.ZClip(warmup_steps=5, **OPTIONS), norms)
    _, first = train_with_rule(gradclip.ZClip(warmup_steps=5, **OPTIONS), norms[:30])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    params = [torch.nn.Parameter(p.detach().clone())
              for p in first.optimizer.param_groups[0]["params"]]
    resumed = gradclip.ClippedOptimizer(torch.optim.SGD(params, lr=0.01), history=64,
                                        max_norm=gradclip.ZClip(warmup_steps=5, **OPTIONS))
    resumed.load_state_dict(torch.load(buffer))
    assert resumed.max_norm.config() == gradclip.ZClip(warmup_steps=5, **OPTIONS).config()
    for a, b in list(grads_with_norms(norms))[30:]:
        params[0].grad, params[1].grad = a.clone(), b.clone()
        resumed.step()
    for p, q in zip(params, whole):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)


# What ZClip.config() held before mode, clip_option, clip_factor and skip_update_on_spike.
OLD_CONFIG_KEYS = ("alpha", "z_thresh", "warmup_steps", "max_norm", "eps")


def as_old_checkpoint(state: dict) -> dict:
    state = dict(state)
    state["config"] = {k: state["config"][k] for k in OLD_CONFIG_KEYS}
    return state


def test_a_checkpoint_saved_before_the_options_still_loads():
    norms = spiky_norms(60)
    rule = gradclip.ZClip(warmup_steps=5)
    thresholds(rule, norms[:30])
    old = as_old_checkpoint(rule.state_dict())
    rest = thresholds(rule, norms[30:])
    same = gradclip.ZClip(warmup_steps=5)
    same.load_state_dict(old)
    assert thresholds(same, norms[30:]) == rest
    rebuilt = rule_from_state(old)
    assert rebuilt.config() == rule.config()
    assert thresholds(rebuilt, norms[30:]) == rest


def test_an_optimizer_checkpoint_saved_before_the_options_still_loads():
    norms = spiky_norms(60)
    whole, _ = train_with_rule(gradclip.ZClip(warmup_steps=5), norms)
    _, first = train_with_rule(gradclip.ZClip(warmup_steps=5), norms[:30])
    state = first.state_dict()
    state["gradclip"]["rule"] = as_old_checkpoint(state["gradclip"]["rule"])
    params = [torch.nn.Parameter(p.detach().clone())
              for p in first.optimizer.param_groups[0]["params"]]
    resumed = gradclip.ClippedOptimizer(torch.optim.SGD(params, lr=0.01),
                                        max_norm=gradclip.ZClip(warmup_steps=5), history=64)
    resumed.load_state_dict(state)
    for a, b in list(grads_with_norms(norms))[30:]:
        params[0].grad, params[1].grad = a.clone(), b.clone()
        resumed.step()
    for p, q in zip(params, whole):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------
# Argument checks (AutoClip's beside ZClip's)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("make, error, match", [
    (lambda: gradclip.ZClip(warmup_steps=math.nan), ValueError, "warmup_steps must be finite"),
    (lambda: gradclip.ZClip(warmup_steps=math.inf), ValueError, "warmup_steps must be finite"),
    (lambda: gradclip.ZClip(warmup_steps=2.5), ValueError, "warmup_steps must be an integer"),
    (lambda: gradclip.ZClip(warmup_steps=True), TypeError, "warmup_steps must be a real number"),
    (lambda: gradclip.ZClip(alpha=math.nan), ValueError, "alpha must be finite"),
    (lambda: gradclip.ZClip(alpha=True), TypeError, "alpha must be a real number, got bool"),
    (lambda: gradclip.ZClip(alpha="0.9"), TypeError, "alpha must be a real number, got str"),
    (lambda: gradclip.ZClip(z_thresh=math.inf), ValueError, "z_thresh must be finite"),
    (lambda: gradclip.ZClip(z_thresh=math.nan), ValueError, "z_thresh must be finite"),
    (lambda: gradclip.ZClip(z_thresh=True), TypeError, "z_thresh"),
    (lambda: gradclip.ZClip(max_norm=math.inf), ValueError, "max_norm=None for no ceiling"),
    (lambda: gradclip.ZClip(max_norm=math.nan), ValueError, "max_norm must be finite"),
    (lambda: gradclip.ZClip(max_norm=True), TypeError, "max_norm"),
    (lambda: gradclip.ZClip(eps=math.nan), ValueError, "eps must be finite"),
    (lambda: gradclip.ZClip(eps=math.inf), ValueError, "eps must be finite"),
    (lambda: gradclip.ZClip(eps=-1e-6), ValueError, "eps must be >= 0"),
    (lambda: gradclip.ZClip(clip_factor=0.0), ValueError, "clip_factor must be > 0"),
    (lambda: gradclip.ZClip(clip_factor=math.inf), ValueError, "clip_factor must be finite"),
    (lambda: gradclip.ZClip(clip_factor=True), TypeError, "clip_factor"),
    (lambda: gradclip.ZClip(mode="median"), ValueError, "mode must be one of"),
    (lambda: gradclip.ZClip(mode="ZScore"), ValueError, "mode must be one of"),
    (lambda: gradclip.ZClip(clip_option="clip"), ValueError, "clip_option must be one of"),
    (lambda: gradclip.ZClip(skip_update_on_spike=1), TypeError, "skip_update_on_spike"),
    (lambda: gradclip.ZClip(skip_update_on_spike="yes"), TypeError, "skip_update_on_spike"),
    (lambda: gradclip.ZClip(mode="percentile", clip_factor=0.7), ValueError, "clip_factor"),
    (lambda: gradclip.ZClip(mode="percentile", clip_option="mean"), ValueError, "clip_option"),
    (lambda: gradclip.ZClip(clip_option="mean", clip_factor=0.5), ValueError, "clip_factor"),
    (lambda: gradclip.AutoClip(percentile=math.nan), ValueError, "percentile must be finite"),
    (lambda: gradclip.AutoClip(percentile=math.inf), ValueError, "percentile must be finite"),
    (lambda: gradclip.AutoClip(percentile=True), TypeError, "percentile must be a real number"),
    (lambda: gradclip.AutoClip(history=math.inf), ValueError, "history must be finite"),
    (lambda: gradclip.AutoClip(history=math.nan), ValueError, "history must be finite"),
    (lambda: gradclip.AutoClip(history=True), TypeError, "history must be a real number"),
    (lambda: gradclip.AutoClip(history=2.5), ValueError, "history must be an integer"),
])
def test_bad_arguments_raise_naming_the_argument(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_numpy_numbers_are_taken_as_python_numbers():
    zclip = gradclip.ZClip(alpha=np.float64(0.9), z_thresh=np.float32(2.0),
                           warmup_steps=np.int64(10), max_norm=np.float64(3.0),
                           eps=np.float64(1e-3), clip_factor=np.float32(0.5),
                           skip_update_on_spike=np.bool_(True))
    python = gradclip.ZClip(alpha=0.9, z_thresh=2.0, warmup_steps=10, max_norm=3.0, eps=1e-3,
                            clip_factor=0.5, skip_update_on_spike=True)
    autoclip = gradclip.AutoClip(percentile=np.float32(25.0), history=np.int32(8))
    for rule, same in ((zclip, python), (autoclip, gradclip.AutoClip(25.0, history=8))):
        assert rule.config() == same.config()
        assert all(type(v) in (bool, int, float, str, type(None)) for v in rule.config().values())
        norms = spiky_norms(60)
        assert thresholds(rule, norms) == thresholds(same, norms)
    # A whole-valued float is an integer, as before.
    assert gradclip.ZClip(warmup_steps=np.float64(10.0)).warmup_steps == 10


@gpu
@pytest.mark.parametrize("kwargs", list(CLIP_RULES.values()), ids=list(CLIP_RULES))
def test_every_mode_replays_in_a_cuda_graph(kwargs):
    """Captured once, replayed on new norms: the thresholds of eager calls."""
    norms = spiky_norms(80)
    settings = dict(kwargs, warmup_steps=5, skip_update_on_spike=True, max_norm=3.0)
    eager = thresholds(gradclip.ZClip(**settings), norms)
    rule = gradclip.ZClip(**settings).bind("cuda")
    x = torch.tensor(norms[0], dtype=torch.float64, device="cuda")
    replayed = [float(rule.threshold_(x))]  # step 0, eagerly: the warm-up before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = rule.threshold_(x)
    for g in norms[1:]:
        x.fill_(g)
        graph.replay()
        replayed.append(float(out))
    assert replayed == pytest.approx(eager, rel=1e-12)
