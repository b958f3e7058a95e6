"""Under AMP, `scaler.step(ClippedOptimizer)` trains exactly as torch's
`unscale_` + `clip_grad_norm_` + `step` + `update` loop, with either scaler.

On the CPU the loops run in float32 with `GradScaler("cpu")` (and bfloat16 autocast in
one test); on a GPU in float16 autocast with every backend.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from conftest import gpu
from test_optimizer import (
    ALL_OPTIMIZERS,
    CPU_FUSED,
    FUSED_OPTIMIZERS,
    MAX_NORM,
    N_STEPS,
    clone_params,
    expected_counts,
    groups_of,
    inject_inf,
    lambda_scheduler,
    loss_of,
    make_batches,
    make_params,
    optimizer_params,
    run_reference,
    run_wrapped,
    tolerance,
)

import gradclip
from gradclip.backends import dispatch

INF_STEPS = {3, 7}
SCALERS = {"torch": torch.amp.GradScaler, "gradclip": gradclip.GradScaler}


def init_scale(device: str) -> float:
    # float16 gradients on a GPU overflow at torch's default 2**16 with these losses.
    return 2.0 ** 10 if device == "cuda" else 2.0 ** 16


def make_scaler(kind: str, device: str):
    # A short growth interval so that the runs grow the scale as well as back it off.
    return SCALERS[kind](device, init_scale=init_scale(device), growth_interval=3)


def autocast_dtype_for(device: str):
    return torch.float16 if device == "cuda" else None


def snapshots(params, into):
    def take(step):
        into.append(([p.detach().clone() for p in params],
                     [None if p.grad is None else p.grad.detach().clone() for p in params]))
    return take


def wrapper_sees_skipped_steps(opt, scaler_kind: str) -> bool:
    """torch's scaler skips inf steps of a non-fused optimizer without calling step()."""
    return scaler_kind == "gradclip" or opt._step_supports_amp_scaling


@pytest.mark.parametrize("manual_unscale", [False, True], ids=["auto-unscale", "manual-unscale"])
@pytest.mark.parametrize("scaler_kind", list(SCALERS))
@pytest.mark.parametrize("name", optimizer_params(ALL_OPTIMIZERS))
def test_amp_training_matches_torch_unscale_clip_step(wrapper_backend_device, gen, name, scaler_kind,
                                                       manual_unscale):
    backend, device = wrapper_backend_device
    autocast = autocast_dtype_for(device)
    theirs = make_params(gen, device)
    ours = clone_params(theirs)
    batches = make_batches(gen, device=device)
    ref_opt = ALL_OPTIMIZERS[name](groups_of(theirs))
    opt = gradclip.ClippedOptimizer(ALL_OPTIMIZERS[name](groups_of(ours)), MAX_NORM, backend=backend)
    ref_scaler, scaler = make_scaler("torch", device), make_scaler(scaler_kind, device)
    ref_steps, steps = [], []

    ref_norms, ref_scales = run_reference(
        theirs, ref_opt, batches, scaler=ref_scaler, scheduler=lambda_scheduler(ref_opt),
        inf_steps=INF_STEPS, autocast_dtype=autocast, after_step=snapshots(theirs, ref_steps))
    norms, scales = run_wrapped(
        ours, opt, batches, scaler=scaler, scheduler=lambda_scheduler(opt), inf_steps=INF_STEPS,
        autocast_dtype=autocast, manual_unscale=manual_unscale, after_step=snapshots(ours, steps))

    assert scales == ref_scales, "the scale must back off and grow exactly as torch's"
    pairs = list(zip([init_scale(device)] + ref_scales, ref_scales))
    assert any(b > a for a, b in pairs) and any(b < a for a, b in pairs), \
        "the run must both grow and back off the scale"
    assert_params_close_all(ours, theirs, device, backend)
    # The injected steps, and any that overflowed by themselves (float16 on a GPU).
    skipped = {i for i in range(N_STEPS) if not math.isfinite(ref_norms[i])}
    assert INF_STEPS <= skipped
    finite = [i for i in range(N_STEPS) if i not in skipped]
    for i in finite:
        assert norms[i] == pytest.approx(ref_norms[i], rel=2e-5), f"last_norm at step {i}"
        for g, h in zip(steps[i][1], ref_steps[i][1]):
            torch.testing.assert_close(g, h, **tolerance(device, backend),
                                       msg=lambda m: f"grads after step {i} must be unscaled and clipped: {m}")
    for i in skipped - {0}:
        for p, q in zip(steps[i][0], steps[i - 1][0]):
            assert torch.equal(p, q), f"the inf step {i} must leave the parameters untouched"
        if wrapper_sees_skipped_steps(opt, scaler_kind):
            assert not math.isfinite(norms[i])

    n_steps, clipped, _ = expected_counts([ref_norms[i] for i in finite])
    if wrapper_sees_skipped_steps(opt, scaler_kind):
        assert opt.stats() == {"steps": N_STEPS, "clipped_steps": clipped,
                               "nonfinite_steps": len(skipped)}
    else:
        assert opt.stats() == {"steps": n_steps, "clipped_steps": clipped, "nonfinite_steps": 0}
    assert 0 < clipped < n_steps


def assert_params_close_all(ours, theirs, device, backend="reference"):
    for i, (p, q) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(p.detach(), q.detach(), **tolerance(device, backend),
                                   msg=lambda m, i=i: f"parameter {i}: {m}")


@pytest.mark.parametrize("scaler_kind", list(SCALERS))
@pytest.mark.parametrize("name", optimizer_params(["adamw", "adamw_fused", "sgd_momentum"]))
def test_bf16_autocast_with_scaler_matches_torch(gen, name, scaler_kind):
    theirs = make_params(gen)
    ours = clone_params(theirs)
    batches = make_batches(gen)
    ref_opt = ALL_OPTIMIZERS[name](theirs)
    opt = gradclip.ClippedOptimizer(ALL_OPTIMIZERS[name](ours), MAX_NORM)
    _, ref_scales = run_reference(theirs, ref_opt, batches, scaler=make_scaler("torch", "cpu"),
                                  inf_steps=INF_STEPS, autocast_dtype=torch.bfloat16)
    _, scales = run_wrapped(ours, opt, batches, scaler=make_scaler(scaler_kind, "cpu"),
                            inf_steps=INF_STEPS, autocast_dtype=torch.bfloat16)
    assert scales == ref_scales
    assert_params_close_all(ours, theirs, "cpu")


@pytest.mark.parametrize("scaler_kind", list(SCALERS))
@pytest.mark.parametrize("name", optimizer_params(["adam", "adam_fused"]))
def test_monitor_mode_under_amp_unscales_but_never_clips(gen, name, scaler_kind):
    theirs = make_params(gen)
    ours = clone_params(theirs)
    batches = make_batches(gen)
    ref_opt = ALL_OPTIMIZERS[name](theirs)
    opt = gradclip.ClippedOptimizer(ALL_OPTIMIZERS[name](ours), math.inf)
    ref_norms, ref_scales = run_reference(theirs, ref_opt, batches, max_norm=math.inf,
                                          scaler=make_scaler("torch", "cpu"), inf_steps=INF_STEPS)
    norms, scales = run_wrapped(ours, opt, batches, scaler=make_scaler(scaler_kind, "cpu"),
                                inf_steps=INF_STEPS)
    assert scales == ref_scales
    assert_params_close_all(ours, theirs, "cpu")
    assert max(ref_norms[i] for i in range(N_STEPS) if i not in INF_STEPS) > 1.0
    assert opt.stats()["clipped_steps"] == 0


@pytest.mark.parametrize("scaler_kind", list(SCALERS))
@pytest.mark.parametrize("name", optimizer_params(["adam", "adam_fused"]))
def test_state_dict_round_trip_under_amp_continues_identically(gen, name, scaler_kind):
    theirs = make_params(gen)
    batches = make_batches(gen, 12)
    ours = clone_params(theirs)
    ref_opt = ALL_OPTIMIZERS[name](groups_of(theirs))
    run_reference(theirs, ref_opt, batches, scaler=make_scaler("torch", "cpu"),
                  scheduler=lambda_scheduler(ref_opt), inf_steps=INF_STEPS)

    opt = gradclip.ClippedOptimizer(ALL_OPTIMIZERS[name](groups_of(ours)), MAX_NORM)
    scaler, sched = make_scaler(scaler_kind, "cpu"), lambda_scheduler(opt)
    run_wrapped(ours, opt, batches[:5], scaler=scaler, scheduler=sched, inf_steps=INF_STEPS)
    buffer = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "scaler": scaler.state_dict(),
                "sched": sched.state_dict(), "params": ours}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)

    resumed = clone_params(saved["params"])
    # Built as the first was: a resumed wrapper keeps the settings it is built with.
    opt2 = gradclip.ClippedOptimizer(ALL_OPTIMIZERS[name](groups_of(resumed)), MAX_NORM)
    scaler2, sched2 = make_scaler(scaler_kind, "cpu"), lambda_scheduler(opt2)
    opt2.load_state_dict(saved["opt"])
    scaler2.load_state_dict(saved["scaler"])
    sched2.load_state_dict(saved["sched"])
    run_wrapped(resumed, opt2, batches[5:], scaler=scaler2, scheduler=sched2,
                inf_steps={i - 5 for i in INF_STEPS if i >= 5})
    assert_params_close_all(resumed, theirs, "cpu")


@pytest.mark.parametrize("scaler_kind", list(SCALERS))
def test_one_scaler_two_optimizers_backs_off_once_and_skips_only_the_inf_one(gen, scaler_kind):
    theirs = make_params(gen)
    ours = clone_params(theirs)
    batches = make_batches(gen, 6)
    ref_a, ref_b = torch.optim.Adam(theirs[:2], lr=1e-2), torch.optim.SGD(theirs[2:], lr=0.1)
    opt_a = gradclip.ClippedOptimizer(torch.optim.Adam(ours[:2], lr=1e-2), MAX_NORM)
    opt_b = gradclip.ClippedOptimizer(torch.optim.SGD(ours[2:], lr=0.1), MAX_NORM)
    ref_scaler, scaler = make_scaler("torch", "cpu"), make_scaler(scaler_kind, "cpu")
    for i, batch in enumerate(batches):
        before_b = [p.detach().clone() for p in ours[2:]]
        for params, opts, sc, clip in ((theirs, (ref_a, ref_b), ref_scaler, True),
                                       (ours, (opt_a, opt_b), scaler, False)):
            for o in opts:
                o.zero_grad()
            sc.scale(loss_of(params, batch)).backward()
            if i == 2:
                inject_inf(params)  # in the first group only
            for o, part in zip(opts, (params[:2], params[2:])):
                if clip:
                    sc.unscale_(o)
                    torch.nn.utils.clip_grad_norm_(part, MAX_NORM)
                sc.step(o)
            sc.update()
        assert scaler.get_scale() == ref_scaler.get_scale()
        if i == 2:
            assert not all(torch.equal(p, q) for p, q in zip(ours[2:], before_b)), \
                "the optimizer without inf must still step"
    assert_params_close_all(ours, theirs, "cpu")


def test_gradclip_scaler_is_torchs_for_other_optimizers(gen):
    theirs = make_params(gen)
    ours = clone_params(theirs)
    batches = make_batches(gen)
    ref_opt, opt = torch.optim.AdamW(theirs, lr=1e-2), torch.optim.AdamW(ours, lr=1e-2)
    _, ref_scales = run_reference(theirs, ref_opt, batches, scaler=make_scaler("torch", "cpu"),
                                  inf_steps=INF_STEPS)
    scaler = make_scaler("gradclip", "cpu")
    for i, batch in enumerate(batches):
        opt.zero_grad()
        scaler.scale(loss_of(ours, batch)).backward()
        if i in INF_STEPS:
            inject_inf(ours)
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(ours, MAX_NORM)
        scaler.step(opt)
        scaler.update()
        assert scaler.get_scale() == ref_scales[i]
    assert_params_close_all(ours, theirs, "cpu")
    assert isinstance(scaler, torch.amp.GradScaler)
    assert scaler.state_dict().keys() == torch.amp.GradScaler("cpu").state_dict().keys()


@pytest.mark.parametrize("scaler_kind", list(SCALERS))
@pytest.mark.parametrize("name", optimizer_params(["adam", "adam_fused"]))
def test_inf_steps_under_amp_are_skipped_not_raised_with_error_if_nonfinite(gen, name, scaler_kind):
    theirs = make_params(gen)
    ours = clone_params(theirs)
    batches = make_batches(gen)
    ref_opt = ALL_OPTIMIZERS[name](theirs)
    opt = gradclip.ClippedOptimizer(ALL_OPTIMIZERS[name](ours), MAX_NORM, error_if_nonfinite=True)
    _, ref_scales = run_reference(theirs, ref_opt, batches, scaler=make_scaler("torch", "cpu"),
                                  inf_steps=INF_STEPS)
    _, scales = run_wrapped(ours, opt, batches, scaler=make_scaler(scaler_kind, "cpu"),
                            inf_steps=INF_STEPS)
    assert scales == ref_scales
    assert_params_close_all(ours, theirs, "cpu")


@pytest.mark.parametrize("scaler_kind", list(SCALERS))
def test_disabled_scaler_just_clips(gen, scaler_kind):
    theirs = make_params(gen)
    ours = clone_params(theirs)
    batches = make_batches(gen)
    ref_opt = torch.optim.SGD(theirs, lr=0.1)
    opt = gradclip.ClippedOptimizer(torch.optim.SGD(ours, lr=0.1), MAX_NORM)
    run_reference(theirs, ref_opt, batches)
    run_wrapped(ours, opt, batches, scaler=SCALERS[scaler_kind]("cpu", enabled=False))
    assert_params_close_all(ours, theirs, "cpu")


@pytest.mark.parametrize("scaler_kind", list(SCALERS))
def test_closure_with_scaler_is_refused_like_torch(gen, scaler_kind):
    params = make_params(gen)
    opt = gradclip.ClippedOptimizer(torch.optim.SGD(params, lr=0.1))
    scaler = make_scaler(scaler_kind, "cpu")
    scaler.scale(loss_of(params, make_batches(gen, 1)[0])).backward()
    with pytest.raises(RuntimeError, match="Closure"):
        scaler.step(opt, closure=lambda: 0.0)


@pytest.mark.parametrize("scaler_kind", list(SCALERS))
def test_unscale_twice_and_step_twice_are_refused_like_torch(gen, scaler_kind):
    params = make_params(gen)
    opt = gradclip.ClippedOptimizer(torch.optim.SGD(params, lr=0.1))
    scaler = make_scaler(scaler_kind, "cpu")
    scaler.scale(loss_of(params, make_batches(gen, 1)[0])).backward()
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="unscale_\\(\\) has already been called"):
        scaler.unscale_(opt)
    scaler.step(opt)
    with pytest.raises(RuntimeError, match="step\\(\\) has already been called"):
        scaler.step(opt)


@pytest.mark.parametrize("scaler_kind", list(SCALERS))
def test_fp16_gradients_are_refused_like_torch(scaler_kind):
    param = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    opt = gradclip.ClippedOptimizer(torch.optim.SGD([param], lr=0.1))
    scaler = make_scaler(scaler_kind, "cpu")
    scaler.scale(torch.ones(()))  # starts the scale
    param.grad = torch.ones(4, dtype=torch.float16)
    with pytest.raises(ValueError, match="FP16"):
        scaler.step(opt)


# ---------------------------------------------------------------------------------------
# The passes each path makes (counted at the dispatch and at torch's unscale kernel)
# ---------------------------------------------------------------------------------------


@pytest.fixture
def calls(monkeypatch):
    counts = {"torch_unscale_or_inf_check": 0, "norm_stats": 0, "clip": 0, "scale_": 0}
    def counting(key, fn):
        def wrapper(*args, **kwargs):
            counts[key] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(torch, "_amp_foreach_non_finite_check_and_unscale_",
                        counting("torch_unscale_or_inf_check", torch._amp_foreach_non_finite_check_and_unscale_))
    monkeypatch.setattr(dispatch, "norm_stats", counting("norm_stats", dispatch.norm_stats))
    monkeypatch.setattr(dispatch, "clip_grads_", counting("clip", dispatch.clip_grads_))
    monkeypatch.setattr(dispatch, "scale_", counting("scale_", dispatch.scale_))
    return counts


@pytest.mark.parametrize("scaler_kind, name, expected", [
    # one read, the factor handed to the fused step: nothing unscaled or written by us
    ("gradclip", "adamw_fused", {"torch_unscale_or_inf_check": 0, "norm_stats": 1, "clip": 0, "scale_": 0}),
    # one read for norm and inf flag, then one read/write with inv_scale * coef
    ("gradclip", "adamw", {"torch_unscale_or_inf_check": 0, "norm_stats": 0, "clip": 1, "scale_": 0}),
    # torch's inf check, then our read; the fused step unscales
    ("torch", "adamw_fused", {"torch_unscale_or_inf_check": 1, "norm_stats": 1, "clip": 0, "scale_": 0}),
    # torch's unscale, then our clip of unscaled gradients (read, write only when clipping)
    ("torch", "adamw", {"torch_unscale_or_inf_check": 1, "norm_stats": 0, "clip": 1, "scale_": 0}),
])
def test_each_amp_path_makes_the_passes_it_states(gen, calls, scaler_kind, name, expected):
    if name in FUSED_OPTIMIZERS and not CPU_FUSED:
        pytest.skip("no fused CPU optimizers in this torch")
    params = make_params(gen)
    opt = gradclip.ClippedOptimizer(ALL_OPTIMIZERS[name](params), MAX_NORM)
    scaler = make_scaler(scaler_kind, "cpu")
    scaler.scale(loss_of(params, make_batches(gen, 1)[0])).backward()
    counted = dict(calls)
    scaler.step(opt)
    scaler.update()
    assert {k: calls[k] - counted[k] for k in calls} == expected


@pytest.mark.parametrize("scaler_kind", list(SCALERS))
def test_manual_unscale_is_not_repeated_by_the_wrapper(gen, calls, scaler_kind):
    params = make_params(gen)
    opt = gradclip.ClippedOptimizer(torch.optim.AdamW(params), MAX_NORM)
    scaler = make_scaler(scaler_kind, "cpu")
    scaler.scale(loss_of(params, make_batches(gen, 1)[0])).backward()
    scaler.unscale_(opt)
    unscaled = [p.grad.clone() for p in params]
    expected = torch.nn.utils.get_total_norm(unscaled)
    scaler.step(opt)
    assert calls["torch_unscale_or_inf_check"] == 1
    assert opt.last_norm.item() == pytest.approx(expected.item(), rel=2e-5)


# ---------------------------------------------------------------------------------------
# GPU: float16 autocast, and no host synchronisation on the fused path
# ---------------------------------------------------------------------------------------


@gpu
@pytest.mark.parametrize("name", ["adam_fused", "adamw_fused", "sgd_fused"])
def test_fused_path_with_gradclip_scaler_never_syncs(gen, name):
    params = make_params(gen, "cuda")
    opt = gradclip.ClippedOptimizer(ALL_OPTIMIZERS[name](groups_of(params)), MAX_NORM)
    scaler = make_scaler("gradclip", "cuda")
    batches = make_batches(gen, 4, "cuda")
    run_wrapped(params, opt, batches[:1], scaler=scaler, autocast_dtype=torch.float16)
    for i, batch in enumerate(batches[1:]):
        opt.zero_grad()
        scaler.scale(loss_of(params, batch, torch.float16)).backward()
        if i == 1:
            inject_inf(params)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            scaler.step(opt)
            scaler.update()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert opt.stats()["nonfinite_steps"] >= 1



@pytest.mark.parametrize("norm_type", [3.5, 8.0])
@pytest.mark.parametrize("scaler_kind, inner", [("gradclip", "sgd"), ("gradclip", "adamw"),
                                                ("torch", "adamw_fused"), ("gradclip", "adamw_fused")])
def test_large_scale_and_high_norm_type_match_torch(scaler_kind, inner, norm_type):
    """The reproducer of the AMP overflow: scale 65536, an 8-norm of ordinary gradients.
    torch's unscale_ + clip_grad_norm_ + step gives norm 1.778 and p = -1 (SGD)."""
    make_inner = {"sgd": lambda ps: torch.optim.SGD(ps, lr=1.0),
                  "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.1),
                  "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=0.1, fused=True)}[inner]
    ours, theirs = torch.nn.Parameter(torch.zeros(100)), torch.nn.Parameter(torch.zeros(100))
    opt = gradclip.ClippedOptimizer(make_inner([ours]), max_norm=10.0, norm_type=norm_type)
    ref_opt = make_inner([theirs])
    scaler, ref_scaler = make_scaler(scaler_kind, "cpu"), make_scaler("torch", "cpu")
    for step in range(3):
        for p, s in ((ours, scaler), (theirs, ref_scaler)):
            s.scale((p.sum() + (step + 1) * 40.0 * p[:3].sum())).backward()
        scaler.step(opt)
        scaler.update()
        ref_scaler.unscale_(ref_opt)
        ref_norm = torch.nn.utils.clip_grad_norm_([theirs], 10.0, norm_type)
        ref_scaler.step(ref_opt)
        ref_scaler.update()
        assert math.isfinite(ref_norm.item())
        assert opt.last_norm.item() == pytest.approx(ref_norm.item(), rel=1e-5)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        opt.zero_grad()
        ref_opt.zero_grad()
    assert opt.stats()["nonfinite_steps"] == 0
    assert scaler.get_scale() == ref_scaler.get_scale()
