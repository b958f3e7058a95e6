"""ClippedOptimizer trains exactly as torch's `clip_grad_norm_` + `step` loop, and is an Optimizer.

The AMP loops (GradScaler, inf steps, manual unscale_) are in test_amp.py, which reuses
the training harness defined here.
"""

from __future__ import annotations

import copy
import io
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from conftest import BACKEND_DEVICES, gpu, on_device

import gradclip
from gradclip.backends import dispatch
from gradclip.backends.base import clip_coefficient

# ---------------------------------------------------------------------------------------
# The harness: a two-layer model in two parameter groups, fresh random data, and the two
# loops side by side (torch's reference and the wrapper's).
# ---------------------------------------------------------------------------------------

N_STEPS = 10
MAX_NORM = 1.0


class MomentumSGD(torch.optim.Optimizer):
    """A third-party-style optimizer: its own `step`, no torch.optim internals."""

    def __init__(self, params, lr=0.05, beta=0.8):
        super().__init__(params, {"lr": lr, "beta": beta})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("buf", torch.zeros_like(p))
                buf.mul_(group["beta"]).add_(p.grad)
                p.add_(buf, alpha=-group["lr"])
        return loss


OPTIMIZERS = {
    "sgd": lambda groups: torch.optim.SGD(groups, lr=0.1),
    "sgd_momentum": lambda groups: torch.optim.SGD(groups, lr=0.05, momentum=0.9, nesterov=True,
                                                   weight_decay=1e-3),
    "adam": lambda groups: torch.optim.Adam(groups, lr=1e-2),
    "adamw": lambda groups: torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1),
    "rmsprop": lambda groups: torch.optim.RMSprop(groups, lr=1e-2, momentum=0.5),
    "adagrad": lambda groups: torch.optim.Adagrad(groups, lr=0.1),
    "third_party": lambda groups: MomentumSGD(groups),
}
FUSED_OPTIMIZERS = {
    "adam_fused": lambda groups: torch.optim.Adam(groups, lr=1e-2, fused=True),
    "adamw_fused": lambda groups: torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1, fused=True),
    "sgd_fused": lambda groups: torch.optim.SGD(groups, lr=0.05, momentum=0.9, fused=True),
}


def fused_runs_on(device: str) -> bool:
    """torch's fused optimizers run on CUDA, and on the CPU from torch 2.4 on."""
    try:
        p = torch.nn.Parameter(torch.zeros(2, device=device))
        p.grad = torch.ones(2, device=device)
        torch.optim.Adam([p], fused=True).step()
        return True
    except RuntimeError:
        return False


CPU_FUSED = fused_runs_on("cpu")
ALL_OPTIMIZERS = {**OPTIMIZERS, **FUSED_OPTIMIZERS}


def optimizer_params(names):
    """pytest params over optimizer names; fused ones skip on the CPU where torch lacks them."""
    marks = {name: [pytest.mark.skipif(not CPU_FUSED, reason="no fused CPU optimizers in this torch")]
             for name in FUSED_OPTIMIZERS}
    return [pytest.param(name, marks=marks.get(name, []), id=name) for name in names]


def tolerance(device: str, backend: str = "reference") -> dict:
    # On the CPU the torch backend computes what torch computes, in the same order: the
    # loops agree to the last bit or nearly. Other backends reduce in another order, and a
    # fused optimizer divides by 1/coef where torch multiplies by coef: ulp-level drift,
    # which RMSprop's and Adam's division by sqrt(v) magnifies for single elements.
    exact = device == "cpu" and backend == "reference"
    return {"rtol": 1e-6, "atol": 1e-7} if exact else {"rtol": 2e-4, "atol": 2e-5}


def make_params(gen: torch.Generator, device: str = "cpu") -> list[torch.nn.Parameter]:
    shapes = [(16, 6), (16,), (3, 16), (3,)]
    return [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.5).to(on_device(device)))
            for s in shapes]


def clone_params(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def groups_of(params):
    """Two parameter groups, so that the global norm has to span both."""
    return [{"params": params[:2]}, {"params": params[2:]}]


def make_batches(gen: torch.Generator, n: int = N_STEPS, device: str = "cpu"):
    """Fresh data; the loss weight alternates between small and large so that some steps
    clip and some do not."""
    batches = []
    for i in range(n):
        weight = float(torch.empty(()).uniform_(0.02, 0.1, generator=gen)) if i % 2 else \
            float(torch.empty(()).uniform_(5.0, 20.0, generator=gen))
        x = torch.randn(8, 6, generator=gen).to(on_device(device))
        y = torch.randn(8, 3, generator=gen).to(on_device(device))
        batches.append((x, y, weight))
    return batches


def loss_of(params, batch, autocast_dtype=None):
    w1, b1, w2, b2 = params
    x, y, weight = batch
    with torch.autocast(x.device.type, dtype=autocast_dtype or torch.float32,
                         enabled=autocast_dtype is not None):
        out = torch.tanh(x @ w1.T + b1) @ w2.T + b2
        loss = (out.float() - y).pow(2).mean() * weight
    return loss


def inject_inf(params):
    with torch.no_grad():
        params[0].grad[0, 0] = math.inf


def run_reference(params, opt, batches, *, max_norm=MAX_NORM, scaler=None, scheduler=None,
                  inf_steps=(), autocast_dtype=None, after_step=None):
    """torch's loop: backward, [unscale_], clip_grad_norm_, step, [update]. Returns the
    per-step clip norms and scales."""
    norms, scales = [], []
    for i, batch in enumerate(batches):
        opt.zero_grad()
        loss = loss_of(params, batch, autocast_dtype)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if i in inf_steps:
            inject_inf(params)
        if scaler is not None:
            scaler.unscale_(opt)
        norms.append(torch.nn.utils.clip_grad_norm_(params, max_norm).item())
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
            scales.append(scaler.get_scale())
        else:
            opt.step()
        if scheduler is not None:
            scheduler.step()
        if after_step is not None:
            after_step(i)
    return norms, scales


def run_wrapped(params, opt, batches, *, scaler=None, scheduler=None, inf_steps=(),
                autocast_dtype=None, manual_unscale=False, after_step=None):
    """The same loop with the unscale_ and clip lines removed (unscale_ kept if asked)."""
    norms, scales = [], []
    for i, batch in enumerate(batches):
        opt.zero_grad()
        loss = loss_of(params, batch, autocast_dtype)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if i in inf_steps:
            inject_inf(params)
        if scaler is not None:
            if manual_unscale:
                scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
            scales.append(scaler.get_scale())
        else:
            opt.step()
        norms.append(opt.last_norm.item())
        if scheduler is not None:
            scheduler.step()
        if after_step is not None:
            after_step(i)
    return norms, scales


def assert_params_close(ours, theirs, device="cpu", backend="reference"):
    for i, (p, q) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(p.detach(), q.detach(), **tolerance(device, backend),
                                   msg=lambda m, i=i: f"parameter {i}: {m}")


def expected_counts(norms, max_norm=MAX_NORM):
    """(steps, clipped, nonfinite) from torch's norms, by the rule the wrapper states."""
    clipped = sum(1 for n in norms if math.isfinite(n) and max_norm / (n + 1e-6) < 1)
    return len(norms), clipped, sum(1 for n in norms if not math.isfinite(n))


def lambda_scheduler(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.9 ** step)


# ---------------------------------------------------------------------------------------
# Parity without AMP
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", optimizer_params(ALL_OPTIMIZERS))
def test_training_matches_torch_clip_then_step(wrapper_backend_device, gen, name):
    backend, device = wrapper_backend_device
    if name in FUSED_OPTIMIZERS and device == "cpu" and not CPU_FUSED:
        pytest.skip("no fused CPU optimizers in this torch")
    theirs = make_params(gen, device)
    ours = clone_params(theirs)
    batches = make_batches(gen, device=device)
    ref_opt = ALL_OPTIMIZERS[name](groups_of(theirs))
    opt = gradclip.ClippedOptimizer(ALL_OPTIMIZERS[name](groups_of(ours)), MAX_NORM, backend=backend)
    ref_norms, _ = run_reference(theirs, ref_opt, batches, scheduler=lambda_scheduler(ref_opt))
    norms, _ = run_wrapped(ours, opt, batches, scheduler=lambda_scheduler(opt))

    assert_params_close(ours, theirs, device, backend)
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), rtol=2e-5, atol=0)
    assert tuple(opt.stats().values()) == expected_counts(ref_norms)
    steps, clipped, _ = expected_counts(ref_norms)
    assert 0 < clipped < steps, "the data must make some steps clip and some not"


@pytest.mark.parametrize("name", optimizer_params(["adamw", "adamw_fused"]))
def test_training_on_the_triton_kernels_matches_torch(gen, name):
    """A smoke test of the wrapper on the Triton kernels (the interpreter here): the rest
    of this file runs on the reference backend, the backends' own suites cover theirs."""
    if ("triton", "cpu") not in BACKEND_DEVICES:
        pytest.skip("the Triton interpreter cannot run here")
    theirs = make_params(gen)
    ours = clone_params(theirs)
    batches = make_batches(gen)
    ref_opt = ALL_OPTIMIZERS[name](groups_of(theirs))
    opt = gradclip.ClippedOptimizer(ALL_OPTIMIZERS[name](groups_of(ours)), MAX_NORM, backend="triton")
    ref_norms, _ = run_reference(theirs, ref_opt, batches)
    norms, _ = run_wrapped(ours, opt, batches)
    assert_params_close(ours, theirs, "cpu", "triton")
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), rtol=2e-5, atol=0)


def test_lbfgs_clips_every_closure_evaluation(gen):
    # The reference clips inside its closure with gradclip's own clip_grad_norm_, whose norm
    # the wrapper reproduces to the last bit: LBFGS on clipped gradients turns a last-bit
    # difference of the norm (torch's CPU clip sums per-tensor norms its own way) into
    # visibly different trajectories within a few evaluations.
    theirs = make_params(gen)
    ours = clone_params(theirs)
    batch = make_batches(gen, 1)[0]
    ref_opt = torch.optim.LBFGS(theirs, lr=0.5, max_iter=5, history_size=4)
    opt = gradclip.ClippedOptimizer(torch.optim.LBFGS(ours, lr=0.5, max_iter=5, history_size=4),
                                    MAX_NORM)
    ref_norms, torch_norms = [], []

    def ref_closure():
        ref_opt.zero_grad()
        loss = loss_of(theirs, batch)
        loss.backward()
        ref_norms.append(gradclip.clip_grad_norm_(theirs, MAX_NORM).item())
        return loss

    def closure():
        opt.zero_grad()
        loss = loss_of(ours, batch)
        loss.backward()
        torch_norms.append(torch.nn.utils.get_total_norm([p.grad for p in ours]).item())
        return loss

    for _ in range(3):
        ref_loss = ref_opt.step(ref_closure)
        loss = opt.step(closure)
        assert loss.item() == ref_loss.item()
        assert opt.last_norm.item() == ref_norms[-1]
        assert opt.last_norm.item() == pytest.approx(torch_norms[-1], rel=2e-5)
    assert len(torch_norms) == len(ref_norms) > 3, "LBFGS evaluates the closure several times a step"
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)
    assert opt.stats() == {"steps": 3, "clipped_steps": 3, "nonfinite_steps": 0}


def test_closure_is_clipped_for_single_evaluation_optimizers(gen):
    theirs = make_params(gen)
    ours = clone_params(theirs)
    batches = make_batches(gen)
    ref_opt = torch.optim.SGD(theirs, lr=0.1)
    opt = gradclip.ClippedOptimizer(torch.optim.SGD(ours, lr=0.1), MAX_NORM)
    for batch in batches:
        def ref_closure():
            ref_opt.zero_grad()
            loss = loss_of(theirs, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(theirs, MAX_NORM)
            return loss

        def closure():
            opt.zero_grad()
            loss = loss_of(ours, batch)
            loss.backward()
            return loss

        ref_opt.step(ref_closure)
        opt.step(closure)
    assert_params_close(ours, theirs)


def test_bf16_autocast_without_scaler_matches_torch(gen):
    theirs = make_params(gen)
    ours = clone_params(theirs)
    batches = make_batches(gen)
    ref_opt = torch.optim.AdamW(theirs, lr=1e-2)
    opt = gradclip.ClippedOptimizer(torch.optim.AdamW(ours, lr=1e-2), MAX_NORM)
    run_reference(theirs, ref_opt, batches, autocast_dtype=torch.bfloat16)
    run_wrapped(ours, opt, batches, autocast_dtype=torch.bfloat16)
    assert_params_close(ours, theirs)


def test_monitor_mode_records_norms_and_never_scales(gen):
    theirs = make_params(gen)
    ours = clone_params(theirs)
    batches = make_batches(gen)
    ref_opt = torch.optim.SGD(theirs, lr=0.01)
    opt = gradclip.ClippedOptimizer(torch.optim.SGD(ours, lr=0.01), math.inf)
    grads_seen = []

    def keep_grads(step):
        grads_seen.append([p.grad.clone() for p in ours])

    norms, _ = run_wrapped(ours, opt, batches, after_step=keep_grads)
    expected_norms = []
    for batch, grads in zip(batches, grads_seen):
        ref_opt.zero_grad()
        loss_of(theirs, batch).backward()
        expected_norms.append(torch.nn.utils.get_total_norm([p.grad for p in theirs]).item())
        for p, g in zip(theirs, grads):
            assert torch.equal(p.grad, g), "monitor mode must leave the gradients bitwise as they were"
        ref_opt.step()
    assert_params_close(ours, theirs)
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(expected_norms), rtol=2e-5, atol=0)
    assert max(expected_norms) > 1.0
    assert opt.stats() == {"steps": N_STEPS, "clipped_steps": 0, "nonfinite_steps": 0}


def test_state_dict_round_trip_continues_identically(gen):
    theirs = make_params(gen)
    batches = make_batches(gen, 12)
    ours = clone_params(theirs)
    ref_opt = torch.optim.Adam(groups_of(theirs), lr=1e-2)
    ref_sched = lambda_scheduler(ref_opt)
    run_reference(theirs, ref_opt, batches, scheduler=ref_sched)

    opt = gradclip.ClippedOptimizer(torch.optim.Adam(groups_of(ours), lr=1e-2), MAX_NORM)
    sched = lambda_scheduler(opt)
    run_wrapped(ours, opt, batches[:5], scheduler=sched)
    buffer = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict(), "params": ours}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)

    resumed = clone_params(saved["params"])
    # The inner optimizer's hyperparameters come from the checkpoint, as in torch; the
    # wrapper's settings are those it is built with (docs/optimizer.md, "Resuming").
    opt2 = gradclip.ClippedOptimizer(torch.optim.Adam(groups_of(resumed), lr=1.0), MAX_NORM)
    sched2 = lambda_scheduler(opt2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # everything fits: nothing dropped, nothing said
        opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    assert opt2.max_norm == MAX_NORM and opt2.stats() == opt.stats()
    run_wrapped(resumed, opt2, batches[5:], scheduler=sched2)

    assert_params_close(resumed, theirs)
    assert opt2.stats()["steps"] == len(batches)


def test_state_dict_is_the_inner_one_plus_the_wrappers(gen):
    params = make_params(gen)
    opt = gradclip.ClippedOptimizer(torch.optim.Adam(params), max_norm=2.5, norm_type=1.0,
                                    error_if_nonfinite=True)
    run_wrapped(params, opt, make_batches(gen, 2))
    state_dict = opt.state_dict()
    inner = opt.optimizer.state_dict()
    assert state_dict.keys() == inner.keys() | {"gradclip"}
    assert state_dict["param_groups"] == inner["param_groups"]
    own = state_dict["gradclip"]
    assert (own["max_norm"], own["norm_type"], own["error_if_nonfinite"]) == (2.5, 1.0, True)
    assert own["counters"].tolist()[0] == 2 and own["counters"] is not opt.counters

    plain = torch.optim.Adam(clone_params(params))
    plain.load_state_dict(state_dict)  # a plain optimizer ignores the wrapper's entry
    other = gradclip.ClippedOptimizer(torch.optim.Adam(clone_params(params)), max_norm=7.0)
    other.load_state_dict(inner)  # a plain state dict keeps the wrapper's settings
    assert other.max_norm == 7.0 and other.stats()["steps"] == 0


def test_counters_and_last_norm_need_no_sync_until_asked(gen):
    params = make_params(gen)
    opt = gradclip.ClippedOptimizer(torch.optim.SGD(params, lr=0.01), MAX_NORM)
    assert opt.last_norm.item() == 0.0  # torch's norm of nothing, until a step measures one
    assert opt.stats() == {"steps": 0, "clipped_steps": 0, "nonfinite_steps": 0}
    norms, _ = run_wrapped(params, opt, make_batches(gen))
    assert isinstance(opt.last_norm, torch.Tensor) and opt.last_norm.dim() == 0
    assert opt.last_norm.dtype == torch.float32
    assert opt.counters.dtype == torch.int64 and opt.counters.device == params[0].device
    assert tuple(opt.stats().values()) == expected_counts(norms)


def test_nonfinite_norm_without_scaler_counts_and_scales_like_torch(gen):
    theirs = make_params(gen)
    ours = clone_params(theirs)
    batches = make_batches(gen, 3)
    ref_opt = torch.optim.SGD(theirs, lr=0.1)
    opt = gradclip.ClippedOptimizer(torch.optim.SGD(ours, lr=0.1), MAX_NORM)
    run_reference(theirs, ref_opt, batches, inf_steps={2})
    run_wrapped(ours, opt, batches, inf_steps={2})
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.detach(), q.detach(), equal_nan=True, **tolerance("cpu"))
    assert opt.stats()["nonfinite_steps"] == 1


def test_error_if_nonfinite_raises_before_touching_anything(gen):
    params = make_params(gen)
    opt = gradclip.ClippedOptimizer(torch.optim.SGD(params, lr=0.1), MAX_NORM, error_if_nonfinite=True)
    run_wrapped(params, opt, make_batches(gen, 2))
    before = [p.detach().clone() for p in params]
    loss_of(params, make_batches(gen, 1)[0]).backward()
    inject_inf(params)
    grads = [p.grad.clone() for p in params]
    with pytest.raises(RuntimeError, match="non-finite"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads) if g.isfinite().all())


def test_error_if_nonfinite_holds_in_monitor_mode(gen):
    params = make_params(gen)
    opt = gradclip.ClippedOptimizer(torch.optim.SGD(params, lr=0.1), math.inf, error_if_nonfinite=True)
    loss_of(params, make_batches(gen, 1)[0]).backward()
    inject_inf(params)
    with pytest.raises(RuntimeError, match="non-finite"):
        opt.step()


@pytest.mark.parametrize("norm_type", [1.0, 3.0, math.inf])
def test_norm_type_matches_torch(gen, norm_type):
    theirs = make_params(gen)
    ours = clone_params(theirs)
    batches = make_batches(gen)
    ref_opt = torch.optim.Adam(theirs, lr=1e-2)
    opt = gradclip.ClippedOptimizer(torch.optim.Adam(ours, lr=1e-2), MAX_NORM, norm_type)
    for batch in batches:
        for ps, o in ((theirs, ref_opt), (ours, opt)):
            o.zero_grad()
            loss_of(ps, batch).backward()
        torch.nn.utils.clip_grad_norm_(theirs, MAX_NORM, norm_type)
        ref_opt.step()
        opt.step()
    assert_params_close(ours, theirs)


def test_max_norm_can_be_changed_between_steps(gen):
    theirs = make_params(gen)
    ours = clone_params(theirs)
    batches = make_batches(gen, 4)
    ref_opt = torch.optim.SGD(theirs, lr=0.1)
    opt = gradclip.ClippedOptimizer(torch.optim.SGD(ours, lr=0.1), MAX_NORM)
    run_reference(theirs, ref_opt, batches[:2])
    run_wrapped(ours, opt, batches[:2])
    opt.max_norm = 0.25
    run_reference(theirs, ref_opt, batches[2:], max_norm=0.25)
    run_wrapped(ours, opt, batches[2:])
    assert_params_close(ours, theirs)
    with pytest.raises(ValueError, match="max_norm"):
        opt.max_norm = -1.0


# ---------------------------------------------------------------------------------------
# It is an Optimizer
# ---------------------------------------------------------------------------------------


def test_is_an_optimizer_sharing_the_inner_objects(gen):
    inner = torch.optim.AdamW(groups_of(make_params(gen)), lr=1e-3)
    opt = gradclip.ClippedOptimizer(inner)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.optimizer is inner
    assert opt.param_groups is inner.param_groups
    assert opt.state is inner.state
    assert opt.defaults is inner.defaults
    assert (opt.max_norm, opt.norm_type) == (1.0, 2.0)
    assert "AdamW" in repr(opt) and "max_norm=1.0" in repr(opt)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_reaches_every_group(gen, set_to_none):
    params = make_params(gen)
    opt = gradclip.ClippedOptimizer(torch.optim.SGD(groups_of(params), lr=0.1))
    loss_of(params, make_batches(gen, 1)[0]).backward()
    opt.zero_grad(set_to_none=set_to_none)
    for p in params:
        assert p.grad is None if set_to_none else torch.count_nonzero(p.grad) == 0


def test_add_param_group_is_clipped_with_the_rest(gen):
    theirs = make_params(gen)
    ours = clone_params(theirs)
    batches = make_batches(gen)
    ref_opt = torch.optim.SGD(theirs[:2], lr=0.1)
    opt = gradclip.ClippedOptimizer(torch.optim.SGD(ours[:2], lr=0.1), MAX_NORM)
    ref_opt.add_param_group({"params": theirs[2:], "lr": 0.05})
    opt.add_param_group({"params": ours[2:], "lr": 0.05})
    assert len(opt.optimizer.param_groups) == 2
    run_reference(theirs, ref_opt, batches)
    run_wrapped(ours, opt, batches)
    assert_params_close(ours, theirs)


def test_step_hooks_run_once_per_step_on_the_wrapper_and_the_inner(gen):
    params = make_params(gen)
    inner = torch.optim.SGD(params, lr=0.1)
    opt = gradclip.ClippedOptimizer(inner, MAX_NORM)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o)))
    handle = opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o)))
    inner.register_step_pre_hook(lambda o, args, kwargs: calls.append(("inner-pre", o)))

    def pre_hook_sees_unclipped_grads(o, args, kwargs):
        calls.append(("norm-before", torch.nn.utils.get_total_norm([p.grad for p in params]).item()))

    opt.register_step_pre_hook(pre_hook_sees_unclipped_grads)
    run_wrapped(params, opt, make_batches(gen, 2))
    names = [c[0] for c in calls]
    assert names == ["pre", "norm-before", "inner-pre", "post"] * 2
    assert all(c[1] is opt for c in calls if c[0] in ("pre", "post"))
    assert all(c[1] is inner for c in calls if c[0] == "inner-pre")
    handle.remove()
    calls.clear()
    run_wrapped(params, opt, make_batches(gen, 1))
    assert [c[0] for c in calls] == ["pre", "norm-before", "inner-pre"]


def test_state_dict_hooks_run(gen):
    params = make_params(gen)
    opt = gradclip.ClippedOptimizer(torch.optim.SGD(params, lr=0.1))
    seen = []
    opt.register_state_dict_pre_hook(lambda o: seen.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: seen.append("post"))
    opt.register_load_state_dict_pre_hook(lambda o, sd: seen.append("load-pre"))
    opt.register_load_state_dict_post_hook(lambda o: seen.append("load-post"))
    opt.load_state_dict(opt.state_dict())
    assert seen == ["pre", "post", "load-pre", "load-post"]


@pytest.mark.parametrize("make_scheduler", [
    pytest.param(lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5), id="StepLR"),
    pytest.param(lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1 / (1 + s)), id="LambdaLR"),
    pytest.param(lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=N_STEPS + 1),
                 id="OneCycleLR"),
])
def test_lr_schedulers_drive_the_inner_optimizer_without_warnings(gen, make_scheduler):
    theirs = make_params(gen)
    ours = clone_params(theirs)
    batches = make_batches(gen)
    ref_opt = torch.optim.SGD(theirs, lr=0.1, momentum=0.9)
    opt = gradclip.ClippedOptimizer(torch.optim.SGD(ours, lr=0.1, momentum=0.9), MAX_NORM)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ref_sched, sched = make_scheduler(ref_opt), make_scheduler(opt)
        run_reference(theirs, ref_opt, batches, scheduler=ref_sched)
        run_wrapped(ours, opt, batches, scheduler=sched)
    assert getattr(opt, "_opt_called", False), "the scheduler's step tracking saw the step"
    assert opt.optimizer.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]
    assert sched.get_last_lr() == ref_sched.get_last_lr()
    assert_params_close(ours, theirs)


def test_scheduler_warns_when_stepped_before_the_optimizer(gen):
    opt = gradclip.ClippedOptimizer(torch.optim.SGD(make_params(gen), lr=0.1))
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    with pytest.warns(UserWarning, match="before `optimizer.step\\(\\)`"):
        sched.step()


def test_deepcopy_and_pickle_keep_settings_and_state(gen):
    params = make_params(gen)
    opt = gradclip.ClippedOptimizer(torch.optim.Adam(params, lr=1e-2), max_norm=0.5)
    opt.register_step_post_hook(lambda *a: None)
    run_wrapped(params, opt, make_batches(gen, 3))
    clone = copy.deepcopy(opt)
    assert clone.max_norm == 0.5 and clone.stats() == opt.stats()
    assert len(clone.optimizer.state) == len(opt.optimizer.state)
    buffer = io.BytesIO()
    torch.save(opt, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.max_norm == 0.5 and loaded.stats() == opt.stats()
    run_wrapped(list(loaded.optimizer.param_groups[0]["params"]), loaded, make_batches(gen, 1))


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("not_an_optimizer", [
    pytest.param(lambda ps: torch.nn.Linear(2, 2), id="module"),
    pytest.param(lambda ps: ps, id="parameter-list"),
    pytest.param(lambda ps: None, id="None"),
])
def test_non_optimizer_raises_type_error(gen, not_an_optimizer):
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        gradclip.ClippedOptimizer(not_an_optimizer(make_params(gen)))


def test_wrapping_twice_raises_type_error(gen):
    opt = gradclip.ClippedOptimizer(torch.optim.SGD(make_params(gen), lr=0.1))
    with pytest.raises(TypeError, match="already a ClippedOptimizer"):
        gradclip.ClippedOptimizer(opt)


@pytest.mark.parametrize("max_norm", [0.0, 0, -1.0, math.nan, -math.inf])
def test_bad_max_norm_raises_value_error(gen, max_norm):
    with pytest.raises(ValueError, match="max_norm"):
        gradclip.ClippedOptimizer(torch.optim.SGD(make_params(gen), lr=0.1), max_norm=max_norm)


@pytest.mark.parametrize("norm_type", [0.0, -2.0, math.nan])
def test_bad_norm_type_raises_value_error(gen, norm_type):
    with pytest.raises(ValueError, match="norm_type"):
        gradclip.ClippedOptimizer(torch.optim.SGD(make_params(gen), lr=0.1), norm_type=norm_type)


def test_bad_backend_raises_value_error(gen):
    with pytest.raises(ValueError, match="backend"):
        gradclip.ClippedOptimizer(torch.optim.SGD(make_params(gen), lr=0.1), backend="nope")


def test_max_norm_of_the_wrong_type_raises_type_error(gen):
    with pytest.raises(TypeError, match="max_norm"):
        gradclip.ClippedOptimizer(torch.optim.SGD(make_params(gen), lr=0.1), max_norm="big")


def test_no_gradients_is_a_plain_step(gen):
    params = make_params(gen)
    opt = gradclip.ClippedOptimizer(torch.optim.SGD(params, lr=0.1))
    opt.step()
    assert opt.last_norm.item() == 0.0 and opt.stats()["steps"] == 1


def test_a_step_without_gradients_reports_norm_zero_not_the_previous_one(gen):
    params = make_params(gen)
    opt = gradclip.ClippedOptimizer(torch.optim.SGD(params, lr=0.1), MAX_NORM)
    loss_of(params, make_batches(gen, 1)[0]).backward()
    opt.step()
    assert opt.last_norm.item() > 0
    opt.zero_grad()
    opt.step()  # no parameter has a gradient: torch's clip of nothing returns 0
    assert opt.last_norm.item() == 0.0
    assert opt.stats()["steps"] == 2


# ---------------------------------------------------------------------------------------
# GPU: no host synchronisation on the non-AMP path
# ---------------------------------------------------------------------------------------


@gpu
@pytest.mark.parametrize("name", ["sgd_momentum", "adamw", "adamw_fused"])
def test_step_without_scaler_never_syncs(gen, name):
    params = make_params(gen, "cuda")
    opt = gradclip.ClippedOptimizer(ALL_OPTIMIZERS[name](groups_of(params)), MAX_NORM)
    batches = make_batches(gen, 3, "cuda")
    run_wrapped(params, opt, batches[:1])  # warm-up: lazy state, backend loading
    for batch in batches[1:]:
        opt.zero_grad()
        loss_of(params, batch).backward()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
            norm = opt.last_norm
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert norm.is_cuda
    assert opt.stats()["steps"] == 3



# ---------------------------------------------------------------------------------------
# What a step costs besides the clip itself
# ---------------------------------------------------------------------------------------


class _NoStep(torch.optim.Optimizer):
    def __init__(self, params):
        super().__init__(params, {})

    def step(self, closure=None):
        return None


def test_a_step_adds_six_small_ops_to_the_clip(monkeypatch):
    """Besides the backend's clip, a step records its norm and counts itself with the six
    small ops docs/design.md lists (the profiler counts them): no list building on the
    device, no clip coefficient recomputed from the norm."""
    from torch.profiler import profile

    params = [torch.nn.Parameter(torch.randn(10)) for _ in range(50)]
    for p in params:
        p.grad = torch.randn(10)
    stats = torch.tensor([3.0, 1 / 3.0, 0.0])
    monkeypatch.setattr(dispatch, "clip_grads_", lambda *args, **kwargs: stats)  # the clip: no ops
    opt = gradclip.ClippedOptimizer(_NoStep(params), max_norm=1.0)
    opt.step()
    with profile() as prof:
        opt.step()
    ops = [e.name for e in prof.events() if e.name.startswith("aten::")
           and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))]
    assert ops == ["aten::slice", "aten::copy_", "aten::bucketize", "aten::index_select",
                   "aten::select", "aten::add_"], ops
    assert opt.stats() == {"steps": 2, "clipped_steps": 2, "nonfinite_steps": 0}
    assert opt.last_norm.item() == 3.0


@pytest.mark.parametrize("max_norm", [1.0, 0.3, 2.5e-3, 1e4, 7e-6, 1e-6, 1.000005e-6, 3e38])
def test_clipped_steps_are_exactly_those_the_rescale_changed(max_norm):
    """The counter's threshold is the largest norm whose coefficient is exactly 1."""
    from gradclip.step_state import largest_unclipped_norm

    for dtype in (torch.float32, torch.float64):
        bound = torch.tensor(largest_unclipped_norm(max_norm, dtype), dtype=dtype)
        above = torch.nextafter(bound, torch.tensor(math.inf, dtype=dtype))
        assert clip_coefficient(bound, max_norm).item() == 1.0
        assert clip_coefficient(above, max_norm).item() < 1.0
    # Found in constant time, whatever max_norm is (stepping one float at a time from 0
    # took minutes near 1e-6, so that the constructor seemed to hang).
    opt = gradclip.ClippedOptimizer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))]),
                                    max_norm=max_norm, vanishing=0.0)
    assert opt.metrics()["max_norm"].item() == pytest.approx(max_norm, rel=1e-6)
