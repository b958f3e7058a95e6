"""Gradient health on the device: history, metrics, the spike guard, per-tensor norms.

Every step below is checked for what it records and, where the design says so, for not
reading the host (a TorchDispatchMode that fails on ``aten._local_scalar_dense``, the op
behind ``.item()``, ``bool()`` and ``tolist()``), for skipping bit for bit, and for giving
under ``torch.compile`` what it gives eagerly.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from conftest import FailOnHostReads, gpu, on_device
from recipes import GuardPort

import gradclip
from gradclip.step_state import COUNTER_NAMES

# ---------------------------------------------------------------------------------------
# The harness: gradients of a chosen global norm, step after step
# ---------------------------------------------------------------------------------------

SHAPES = [(7,), (3, 2), (4,)]


def make_params():
    return [torch.nn.Parameter(torch.full(s, 0.5)) for s in SHAPES]


def set_grads(params, norm: float, gen: torch.Generator, scale: float = 1.0):
    """Random gradients whose global norm is ``norm`` (times ``scale``, a GradScaler's)."""
    raw = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    total = float(torch.cat([r.flatten() for r in raw]).norm())
    for p, r in zip(params, raw):
        p.grad = (r * (norm / total) * scale).float().to(p.device)


def norm_sequence(n: int, spikes=(), seed: int = 0, factor: float = 20.0) -> list[float]:
    rng = np.random.default_rng(seed)
    norms = 1.0 + 0.1 * rng.standard_normal(n)
    for i in spikes:
        norms[i] *= factor
    return [float(x) for x in norms]


INNER = {"sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
         "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.01),
         "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=0.01, fused=True)}
SCALERS = {None: None,
           "gradclip": lambda: gradclip.GradScaler("cpu", init_scale=1024.0, growth_interval=10_000),
           "torch": lambda: torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=10_000)}


def scale_of(scaler) -> float:
    """The scale a loss would be multiplied by this step (``scale()`` sets the scaler up)."""
    if scaler is None:
        return 1.0
    return float(scaler.scale(torch.ones(())))


def run(opt, params, norms, *, scaler=None, seed=0, each=None):
    gen = torch.Generator().manual_seed(seed)
    for i, norm in enumerate(norms):
        set_grads(params, norm, gen, scale_of(scaler))
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
        if each is not None:
            each(i)




@pytest.fixture
def device_decides(monkeypatch):
    """The reference backend decides "nothing to scale" on the host for CPU tensors (no
    device to wait for); make it decide on the device, as for GPU tensors, so that the
    mode sees only what the wrapper itself does."""
    from gradclip.backends import reference

    monkeypatch.setattr(reference, "_decides_on_host", lambda device: False)


# ---------------------------------------------------------------------------------------
# History and metrics
# ---------------------------------------------------------------------------------------


def test_history_holds_the_last_norms_oldest_first():
    params = make_params()
    opt = gradclip.ClippedOptimizer(INNER["sgd"](params), max_norm=1.0, history=8)
    seen = []
    run(opt, params, norm_sequence(5), each=lambda i: seen.append(opt.last_norm.item()))
    assert opt.norm_history().tolist() == seen
    run(opt, params, norm_sequence(6, seed=1), each=lambda i: seen.append(opt.last_norm.item()))
    assert opt.norm_history().tolist() == seen[-8:]
    assert opt.norm_history().dtype == torch.float32


def test_without_history_the_history_is_empty_and_stats_list_the_clip_counters():
    params = make_params()
    opt = gradclip.ClippedOptimizer(INNER["sgd"](params))
    run(opt, params, norm_sequence(3))
    assert opt.norm_history().numel() == 0
    assert list(opt.stats()) == ["steps", "clipped_steps", "nonfinite_steps"]
    assert math.isnan(opt.metrics()["mean"].item())


def test_metrics_are_device_tensors_consistent_with_stats():
    params = make_params()
    guard = gradclip.SpikeGuard(factor=3.0, window=10, action="flag")
    opt = gradclip.ClippedOptimizer(INNER["sgd"](params), max_norm=1.05, spike_guard=guard,
                                    vanishing=0.5)
    norms = norm_sequence(30, spikes=[15, 22]) + [0.2, math.inf]
    run(opt, params, norms)
    metrics = opt.metrics()
    assert set(metrics) == {"norm", "clip_coef", "max_norm", "mean", "std", *COUNTER_NAMES}
    assert all(v.dim() == 0 and v.device == params[0].device for v in metrics.values())
    stats = opt.stats()
    assert stats == {name: int(metrics[name]) for name in COUNTER_NAMES}
    port = GuardPort(3.0, 10, action="flag")
    flags = [port.judge(g)["spike"] for g in norms]
    accepted = port.accepted["norm"]
    assert stats["spike_steps"] == sum(flags) == 2 and stats["skipped_steps"] == 0
    assert stats["vanishing_steps"] == 1 and stats["nonfinite_steps"] == 1
    assert stats["clipped_steps"] == sum(1 for g in norms if math.isfinite(g) and 1.05 / (g + 1e-6) < 1)
    window = np.array(accepted[-10:])
    assert metrics["mean"].item() == pytest.approx(window.mean(), rel=1e-5)
    assert metrics["std"].item() == pytest.approx(window.std(), rel=1e-4)
    assert metrics["max_norm"].item() == pytest.approx(1.05)


def test_clip_coef_is_the_factor_the_gradients_were_scaled_by():
    params = make_params()
    opt = gradclip.ClippedOptimizer(torch.optim.SGD(params, lr=0.0), max_norm=0.5)
    gen = torch.Generator().manual_seed(0)
    set_grads(params, 2.0, gen)
    before = [p.grad.clone() for p in params]
    opt.step()
    coef = opt.metrics()["clip_coef"]
    for p, b in zip(params, before):
        torch.testing.assert_close(p.grad, b * coef)
    assert coef.item() == pytest.approx(0.25, rel=1e-5)


def test_health_state_round_trips_through_the_state_dict():
    def build():
        params = make_params()
        guard = gradclip.SpikeGuard(window=6, action="skip")
        return params, gradclip.ClippedOptimizer(INNER["adamw"](params), history=16,
                                                 spike_guard=guard)

    norms = norm_sequence(40, spikes=[12, 30])
    params, whole = build()
    run(whole, params, norms)
    params_a, first = build()
    run(first, params_a, norms[:20])
    params_b, resumed = build()
    with torch.no_grad():
        for p, q in zip(params_b, params_a):
            p.copy_(q)
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    gen_state = torch.Generator().manual_seed(0)
    for norm in norms[:20]:  # the same random gradients as the first 20 steps drew
        set_grads(make_params(), norm, gen_state)
    for norm in norms[20:]:
        set_grads(params_b, norm, gen_state)
        resumed.step()
    assert resumed.stats() == whole.stats()
    assert torch.equal(resumed.norm_history(), whole.norm_history())
    for name, value in whole.metrics().items():
        torch.testing.assert_close(resumed.metrics()[name], value, equal_nan=True)
    # An optimizer built without a guard keeps none: the saved windows are dropped, named.
    with pytest.warns(UserWarning, match="spike guard's windows"):
        gradclip.ClippedOptimizer(INNER["adamw"](make_params()), history=16).load_state_dict(
            first.state_dict())


# ---------------------------------------------------------------------------------------
# No host synchronisation
# ---------------------------------------------------------------------------------------

# Inner optimizers that do not read the host themselves (torch's non-fused Adam reads its
# step count on the CPU).
SYNC_FREE = {
    "history_metrics_flag": dict(inner="sgd", history=32,
                                 spike_guard=gradclip.SpikeGuard(window=4, action="flag")),
    "guard_clip": dict(inner="sgd", spike_guard=gradclip.SpikeGuard(window=4, action="clip")),
    "skip_fused": dict(inner="adamw_fused", spike_guard=gradclip.SpikeGuard(window=4)),
    "skip_fused_gradclip_scaler": dict(inner="adamw_fused", scaler="gradclip",
                                       spike_guard=gradclip.SpikeGuard(window=4)),
    "zclip": dict(inner="adamw_fused", max_norm=lambda: gradclip.ZClip(warmup_steps=3),
                  history=16),
    "autoclip": dict(inner="sgd", max_norm=lambda: gradclip.AutoClip(25.0, history=8)),
}


@pytest.mark.parametrize("case", list(SYNC_FREE))
def test_steps_never_read_the_host(case, device_decides):
    settings = dict(SYNC_FREE[case])
    inner, scaler_kind = settings.pop("inner"), settings.pop("scaler", None)
    if callable(settings.get("max_norm")):
        settings["max_norm"] = settings["max_norm"]()
    if "spike_guard" in settings:
        settings["spike_guard"] = copy.deepcopy(settings["spike_guard"])
    params = make_params()
    opt = gradclip.ClippedOptimizer(INNER[inner](params), **settings)
    scaler = None if scaler_kind is None else SCALERS[scaler_kind]()
    norms = norm_sequence(14, spikes=[9, 12])
    run(opt, params, norms[:2], scaler=scaler)  # lazy optimizer state, backend loading
    gen = torch.Generator().manual_seed(1)
    for norm in norms[2:]:
        set_grads(params, norm, gen, scale_of(scaler))
        with FailOnHostReads():
            if scaler is None:
                opt.step()
            else:
                scaler.step(opt)
                scaler.update()
            metrics = opt.metrics()
    assert metrics["steps"].item() == len(norms)
    if "spike_guard" in settings:
        assert opt.stats()["spike_steps"] == 2


# ---------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


COMPILED = {
    "zclip_guard_clip_history_tensor_norms": dict(
        inner="adamw", max_norm=lambda: gradclip.ZClip(warmup_steps=3), history=16,
        track_tensor_norms=True, spike_guard=lambda: gradclip.SpikeGuard(window=4, action="clip")),
    "autoclip_guard_skip_fused": dict(
        inner="adamw_fused", max_norm=lambda: gradclip.AutoClip(50.0, history=8),
        spike_guard=lambda: gradclip.SpikeGuard(window=4, action="skip")),
    "flag_history": dict(inner="sgd", history=16,
                         spike_guard=lambda: gradclip.SpikeGuard(window=4, action="flag")),
}


def compiled_or_eager(case, compile_step):
    settings = {k: v() if callable(v) and k != "inner" else v for k, v in COMPILED[case].items()}
    params = make_params()
    opt = gradclip.ClippedOptimizer(INNER[settings.pop("inner")](params), **settings)
    step = torch.compile(opt.step) if compile_step else opt.step
    gen = torch.Generator().manual_seed(0)
    for norm in norm_sequence(10, spikes=[6, 8]):
        set_grads(params, norm, gen)
        step()
    tensor_norms = opt.tensor_norms() if opt.track_tensor_norms else None
    return ({k: v.item() for k, v in opt.metrics().items()}, opt.norm_history(), tensor_norms,
            [p.detach().clone() for p in params])


@pytest.mark.slow
@pytest.mark.parametrize("case", list(COMPILED))
def test_compiled_steps_give_the_metrics_of_eager_steps(case, fresh_dynamo):
    metrics, history, tensor_norms, params = compiled_or_eager(case, True)
    ref_metrics, ref_history, ref_tensor_norms, ref_params = compiled_or_eager(case, False)
    assert metrics.keys() == ref_metrics.keys()
    for name in metrics:
        assert metrics[name] == pytest.approx(ref_metrics[name], rel=1e-5, nan_ok=True), name
    assert metrics["spike_steps"] == 2
    torch.testing.assert_close(history, ref_history, rtol=1e-5, atol=0)
    if tensor_norms is not None:
        torch.testing.assert_close(tensor_norms, ref_tensor_norms, rtol=1e-5, atol=0)
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------
# Per-tensor norms
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("scaler_kind", [None, "gradclip"])
def test_tensor_norms_are_the_pre_clip_norms_by_name(scaler_kind):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1, bias=False))
    frozen = model[0].bias
    opt = gradclip.ClippedOptimizer(INNER["sgd"](list(model.parameters())), max_norm=0.01,
                                    track_tensor_norms=True)
    scaler = None if scaler_kind is None else SCALERS[scaler_kind]()
    loss = model(torch.randn(5, 4)).square().sum()
    (loss if scaler is None else scaler.scale(loss)).backward()
    frozen.grad = None
    expected = {name: float(p.grad.norm()) / (1.0 if scaler is None else scaler.get_scale())
                for name, p in model.named_parameters() if p.grad is not None}
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)
    named = opt.tensor_norms(model.named_parameters())
    assert set(named) == {"0.weight", "0.bias", "1.weight"}
    assert math.isnan(named["0.bias"].item())
    for name, value in expected.items():
        assert named[name].item() == pytest.approx(value, rel=1e-5)
    assert opt.tensor_norms().shape == (3,)


def test_tensor_norms_of_every_backend_match_the_float64_oracle(backend_device, gen):
    """Mixed dtypes, an empty gradient and a parameter without one."""
    backend, device = backend_device
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float32]
    shapes = [(33,), (4, 5), (7,), (3, 3), (0,)]
    params = [torch.nn.Parameter(torch.zeros(s, dtype=d, device=on_device(device)))
              for s, d in zip(shapes, dtypes)]
    params.append(torch.nn.Parameter(torch.zeros(2, device=on_device(device))))
    for p in params[:-1]:
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype).to(p.device)
    opt = gradclip.ClippedOptimizer(torch.optim.SGD(params, lr=0.0), max_norm=0.1,
                                    track_tensor_norms=True, backend=backend)
    oracle = [float(p.grad.double().norm()) for p in params[:-1]]
    opt.step()
    norms = opt.tensor_norms()
    assert norms.dtype == torch.float64 and norms.device == params[0].device  # float64 input
    assert norms[:-1].cpu().tolist() == pytest.approx(oracle, rel=1e-6)
    assert math.isnan(norms[-1].item())


def test_tensor_norms_need_tracking():
    opt = gradclip.ClippedOptimizer(INNER["sgd"](make_params()))
    with pytest.raises(RuntimeError, match="track_tensor_norms=True"):
        opt.tensor_norms()


# ---------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(history=-1), ValueError, "history"),
    (dict(history=2.5), ValueError, "history"),
    (dict(spike_guard=3.0), TypeError, "spike_guard"),
    (dict(vanishing=-1.0), ValueError, "vanishing"),
    (dict(vanishing=2.0, max_norm=1.0), ValueError, "vanishing"),
])
def test_bad_health_settings_raise_naming_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        gradclip.ClippedOptimizer(INNER["sgd"](make_params()), **kwargs)


# ---------------------------------------------------------------------------------------
# The demo's spike-guarded run
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_guarded_run_skips_its_bad_batches_and_takes_the_new_level():
    import argparse

    from gradclip import demo

    text = demo.load_corpus()
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text[:20_000]])
    torch.manual_seed(0)
    initial = demo.CharLSTM(len(chars)).state_dict()
    args = argparse.Namespace(steps=120, seed=0, lr=demo.DEFAULT_LR, max_norm=1.0, backend="auto")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the demo does: a small LSTM only waits on a second thread
    try:
        run = demo.spike_guarded_run(args, ids, initial, len(chars), torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    assert len(run["norm"]) == 60 and len(run["bad"]) == 3 and run["level_from"] == 37
    level = list(range(37, 37 + demo.GUARD_CONSECUTIVE))  # skipped until the level is taken
    assert run["flagged"] == run["skipped"] == sorted(run["bad"] + level)
    assert run["new_level"] == [37 + demo.GUARD_CONSECUTIVE]


# ---------------------------------------------------------------------------------------
# Per-tensor rules (gradclip.PerTensor, gradclip.AGC) in the wrapper
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("make_rule, clip_", [
    (lambda: gradclip.PerTensor(0.3), lambda ps: gradclip.clip_grad_norm_per_tensor_(ps, 0.3)),
    (lambda: gradclip.AGC(clip_factor=0.05), lambda ps: gradclip.adaptive_clip_grad_(ps, 0.05)),
])
def test_per_tensor_rules_clip_as_their_functions_and_record_the_global_norm(make_rule, clip_):
    params, ref = make_params(), make_params()
    opt = gradclip.ClippedOptimizer(INNER["sgd"](params), max_norm=make_rule(), history=8,
                                    spike_guard=gradclip.SpikeGuard(window=3, action="flag"))
    ref_opt = INNER["sgd"](ref)
    gen, ref_gen = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    for norm in norm_sequence(6, spikes=[4]):
        set_grads(params, norm, gen)
        set_grads(ref, norm, ref_gen)
        opt.step()
        global_norm = float(torch.cat([p.grad.flatten() for p in ref]).norm())
        clip_(ref)
        ref_opt.step()
        assert opt.last_norm.item() == pytest.approx(global_norm, rel=1e-5)
    for p, q in zip(params, ref):
        torch.testing.assert_close(p.detach(), q.detach())
    assert opt.stats()["spike_steps"] == 1
    assert isinstance(opt.state_dict()["gradclip"]["rule"], dict)


@pytest.mark.parametrize("make_rule", [lambda: gradclip.PerTensor(0.3),
                                       lambda: gradclip.AGC(clip_factor=0.01)])
@pytest.mark.parametrize("scaler_kind", ["gradclip", "torch"])
@pytest.mark.parametrize("inner", ["sgd", "adamw_fused"])
def test_local_rules_under_a_scaler_unscale_in_their_own_pass(make_rule, scaler_kind, inner):
    """Without scaler.unscale_(opt) (as the README says), a local rule clips the unscaled
    gradients: the same steps as unscale_, then the rule's torch function, then step."""
    def train(manual_unscale):
        params = make_params()
        opt = gradclip.ClippedOptimizer(INNER[inner](params), max_norm=make_rule())
        scaler = SCALERS[scaler_kind]()
        gen = torch.Generator().manual_seed(0)
        for norm in (1.0, 40.0, 2.0):
            set_grads(params, norm, gen, scale_of(scaler))
            if manual_unscale:
                scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
        return params, opt.last_norm.item()

    params, norm = train(False)
    ref_params, ref_norm = train(True)
    assert norm == pytest.approx(ref_norm, rel=1e-6) and norm == pytest.approx(2.0, rel=1e-5)
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)


def test_the_guards_clip_cannot_be_combined_with_a_per_tensor_rule():
    with pytest.raises(ValueError, match="per-tensor"):
        gradclip.ClippedOptimizer(INNER["sgd"](make_params()), max_norm=gradclip.PerTensor(1.0),
                                  spike_guard=gradclip.SpikeGuard(action="clip"))


def test_deepcopy_keeps_the_rule_the_guard_and_their_state_together():
    params = make_params()
    opt = gradclip.ClippedOptimizer(INNER["sgd"](params), max_norm=gradclip.ZClip(warmup_steps=3),
                                    history=8, spike_guard=gradclip.SpikeGuard(window=3, action="clip"))
    run(opt, params, norm_sequence(6))
    clone = copy.deepcopy(opt)
    run(opt, params, norm_sequence(3, spikes=[1], seed=1))
    cparams = [p for g in clone.param_groups for p in g["params"]]
    run(clone, cparams, norm_sequence(3, spikes=[1], seed=1))
    assert clone.stats() == opt.stats()
    assert torch.equal(clone.norm_history(), opt.norm_history())
    assert clone.max_norm is not opt.max_norm and clone.spike_guard is not opt.spike_guard
    with pytest.raises(ValueError, match="another ClippedOptimizer"):
        opt.max_norm = clone.max_norm  # the copy's rule follows the copy


# ---------------------------------------------------------------------------------------
# GPU: no synchronisation under torch.cuda.set_sync_debug_mode("error")
# ---------------------------------------------------------------------------------------


GPU_INNER = {"adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=0.01, fused=True),
             "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)}


@gpu
@pytest.mark.parametrize("case", list(SYNC_FREE))
def test_steps_never_synchronise_on_the_gpu(case):
    settings = dict(SYNC_FREE[case])
    inner, scaler_kind = settings.pop("inner"), settings.pop("scaler", None)
    if callable(settings.get("max_norm")):
        settings["max_norm"] = settings["max_norm"]()
    if "spike_guard" in settings:
        settings["spike_guard"] = copy.deepcopy(settings["spike_guard"])
    params = [torch.nn.Parameter(torch.full(s, 0.5, device="cuda")) for s in SHAPES]
    opt = gradclip.ClippedOptimizer(GPU_INNER[inner](params), **settings)
    scaler = None
    if scaler_kind == "gradclip":
        scaler = gradclip.GradScaler("cuda", init_scale=1024.0, growth_interval=10_000)
    gen = torch.Generator().manual_seed(0)
    norms = norm_sequence(14, spikes=[9, 12])
    for i, norm in enumerate(norms):
        scale = 1.0 if scaler is None else float(scaler.scale(torch.ones((), device="cuda")))
        set_grads(params, norm, gen, scale)
        torch.cuda.synchronize()
        if i >= 2:
            torch.cuda.set_sync_debug_mode("error")
        try:
            if scaler is None:
                opt.step()
            else:
                scaler.step(opt)
                scaler.update()
            opt.metrics()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert opt.stats()["steps"] == len(norms)
