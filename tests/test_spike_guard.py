"""The spike guard (gradclip.SpikeGuard): its verdicts against a plain-Python port of the
documented rule over long runs with regime shifts and NaN bursts, what each action does to
a step (bit-identical skips, clips), the loss watch, and its argument checks.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from conftest import FailOnHostReads
from recipes import GuardPort
from test_health import INNER, SCALERS, make_params, norm_sequence, run, scale_of, set_grads

import gradclip
from gradclip.step_state import COUNTER_NAMES, REGIME, SKIPPED, SPIKE

# ---------------------------------------------------------------------------------------
# The spike detector
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("factor, window, warmup", [(3.0, 20, None), (2.0, 8, 4), (5.0, 50, 10)])
def test_detector_flags_exactly_the_injected_spikes_none_in_warmup(factor, window, warmup):
    spikes = [60, 61, 95, 140]
    in_warmup = [1, 3]  # as large, but before the guard judges anything
    norms = norm_sequence(160, spikes=spikes + in_warmup, seed=7)
    params = make_params()
    guard = gradclip.SpikeGuard(factor, window, warmup, action="flag")
    opt = gradclip.ClippedOptimizer(INNER["sgd"](params), max_norm=math.inf, spike_guard=guard)
    counts = []
    run(opt, params, norms, each=lambda i: counts.append(opt.counters[4].clone()))
    flagged = [i for i, (a, b) in enumerate(zip([torch.tensor(0)] + counts, counts)) if b > a]
    assert flagged == spikes
    port = GuardPort(factor, window, warmup, action="flag")
    assert flagged == [i for i, g in enumerate(norms) if port.judge(g)["spike"]]


def test_spikes_do_not_enter_the_rolling_mean():
    params = make_params()
    opt = gradclip.ClippedOptimizer(INNER["sgd"](params), max_norm=math.inf,
                                    spike_guard=gradclip.SpikeGuard(window=5, action="flag"))
    run(opt, params, [1.0] * 5 + [100.0] * 3)
    assert opt.metrics()["mean"].item() == pytest.approx(1.0, rel=1e-5)
    assert opt.stats()["spike_steps"] == 3


def test_clip_action_clips_a_spike_to_factor_times_the_mean():
    params = make_params()
    opt = gradclip.ClippedOptimizer(torch.optim.SGD(params, lr=0.0), max_norm=math.inf,
                                    spike_guard=gradclip.SpikeGuard(factor=3.0, window=4, action="clip"))
    run(opt, params, [2.0] * 4 + [60.0])
    post = float(torch.cat([p.grad.flatten() for p in params]).norm())
    assert post == pytest.approx(6.0, rel=1e-5)
    assert opt.metrics()["max_norm"].item() == pytest.approx(6.0, rel=1e-6)
    assert opt.stats()["clipped_steps"] == 1 and opt.stats()["spike_steps"] == 1


# ---------------------------------------------------------------------------------------
# Skipping: bit for bit, and the scale untouched
# ---------------------------------------------------------------------------------------


def snapshot(opt, params):
    state = {k: v.clone() if torch.is_tensor(v) else v
             for s in opt.optimizer.state.values() for k, v in s.items()}
    tensors = [p.detach().clone() for p in params]
    tensors += [v for s in opt.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return [t.clone() for t in tensors], state


@pytest.mark.parametrize("inner, scaler_kind", [
    ("adamw_fused", None), ("adamw", None), ("sgd", None),
    ("adamw_fused", "gradclip"), ("adamw", "gradclip"),
    ("adamw_fused", "torch"), ("adamw", "torch")])
def test_a_skipped_step_leaves_parameters_and_state_bit_identical(inner, scaler_kind):
    params = make_params()
    opt = gradclip.ClippedOptimizer(INNER[inner](params), max_norm=1.0,
                                    spike_guard=gradclip.SpikeGuard(window=5, action="skip"))
    scaler = None if scaler_kind is None else SCALERS[scaler_kind]()
    norms = norm_sequence(12, spikes=[8])
    before = {}

    def watch(i):
        if i == 7:
            before["tensors"], _ = snapshot(opt, params)
            before["scale"] = None if scaler is None else scaler.get_scale()
        if i == 8:
            after, _ = snapshot(opt, params)
            assert len(after) == len(before["tensors"]) > len(params)
            for a, b in zip(after, before["tensors"]):
                assert torch.equal(a, b)
            if scaler is not None:
                assert scaler.get_scale() == before["scale"]  # a spike never backs it off

    run(opt, params, norms, scaler=scaler, each=watch)
    assert opt.stats()["skipped_steps"] == opt.stats()["spike_steps"] == 1
    assert before["tensors"][0].shape == params[0].shape
    # The steps after the skip were taken.
    assert not torch.equal(params[0].detach(), before["tensors"][0])


def test_closures_are_refused_with_a_spike_guard():
    params = make_params()
    opt = gradclip.ClippedOptimizer(torch.optim.LBFGS(params), spike_guard=gradclip.SpikeGuard())
    with pytest.raises(RuntimeError, match="closure"):
        opt.step(lambda: sum(p.sum() for p in params))


# ---------------------------------------------------------------------------------------
# Long runs: regime shifts, NaN bursts, spikes in warm-up (issue 20, items 1-3)
# ---------------------------------------------------------------------------------------


def long_run(n: int = 600, seed: int = 3) -> tuple[list[float], list[float]]:
    """Norms and losses of a run with everything a long run meets: isolated spikes, a spike
    in warm-up, a lasting 10x shift of the norm at 200 and back down at 420, a loss spike
    with a normal norm, and a burst of NaN steps."""
    rng = np.random.default_rng(seed)
    norms = 1.0 + 0.1 * rng.standard_normal(n)
    losses = 2.0 + 0.05 * rng.standard_normal(n)
    norms[3] *= 1000.0
    norms[200:420] *= 10.0
    for i in (60, 150, 330, 500):
        norms[i] *= 20.0
    losses[[90, 91, 520]] *= 6.0
    norms[300:304] = math.nan
    return [float(x) for x in norms], [float(x) for x in losses]


def counter_deltas(opt, params, norms, losses=None) -> list[dict]:
    """Run the steps; per step, which guard counters moved."""
    gen = torch.Generator().manual_seed(0)
    deltas, before = [], opt.counters.clone()
    for i, norm in enumerate(norms):
        set_grads(params, norm, gen)
        opt.step(loss=None if losses is None else torch.tensor(losses[i]))
        after = opt.counters.clone()
        moved = (after - before).tolist()
        deltas.append({"spike": moved[SPIKE] == 1, "skip": moved[SKIPPED] == 1,
                       "regime_change": moved[REGIME] == 1})
        before = after
    return deltas


GUARDS = {
    "ratio_skip": dict(window=30, warmup=10),
    "ratio_flag_short": dict(factor=2.5, window=8, warmup=4, action="flag", max_consecutive=3),
    "sigma_skip": dict(factor=None, sigma=6.0, window=40, warmup=10),
    "both_rules_clip": dict(factor=4.0, sigma=5.0, window=25, warmup=5, action="clip"),
    "loss_skip": dict(window=30, warmup=10, watch="loss"),
    "both_signals_flag": dict(window=30, warmup=10, watch="both", action="flag",
                              max_consecutive=8),
}


@pytest.mark.parametrize("name", list(GUARDS))
def test_every_verdict_of_a_long_run_is_the_documented_rules(name):
    norms, losses = long_run()
    params = make_params()
    settings = GUARDS[name]
    opt = gradclip.ClippedOptimizer(torch.optim.SGD(params, lr=0.0), max_norm=math.inf,
                                    spike_guard=gradclip.SpikeGuard(**settings))
    ours = counter_deltas(opt, params, norms, losses)
    port = GuardPort(**settings)
    theirs = [port.judge(g, l) for g, l in zip(norms, losses)]
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a == {k: b[k] for k in a}, f"step {i}: {a} != {b}"
    assert sum(d["spike"] for d in ours) > 0


def test_skip_never_stalls_training_after_a_lasting_shift():
    """Targets scaled by 10 from step 200: the guard skips max_consecutive steps, then takes
    the new level and trains on; without that, it skipped every later step."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=gen)
    true_w = torch.randn(8, 1, generator=gen)
    model = torch.nn.Linear(8, 1)
    opt = gradclip.ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), max_norm=math.inf,
                                    spike_guard=gradclip.SpikeGuard(window=50, warmup=20))
    skipped, run_of_skips, longest = [], 0, 0
    for step in range(700):
        target = x @ true_w * (10.0 if step >= 200 else 1.0)
        loss = torch.nn.functional.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        before = int(opt.counters[SKIPPED])
        opt.step()
        skip = int(opt.counters[SKIPPED]) > before
        run_of_skips = run_of_skips + 1 if skip else 0
        longest = max(longest, run_of_skips)
        if skip:
            skipped.append(step)
    stats = opt.stats()
    assert longest <= 5 and stats["regime_changes"] >= 1
    assert len(skipped) <= 10, skipped
    final = torch.nn.functional.mse_loss(model(x), x @ true_w * 10.0).item()
    assert final < 1e-2, final


@pytest.mark.parametrize("inner", ["adamw_fused", "adamw"])
def test_a_nonfinite_batch_is_skipped_without_a_scaler(inner):
    """A NaN in one batch's input: with action="skip" that step is skipped (parameters and
    optimizer state as if the batch never came), counted, and kept out of the window."""
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 4, generator=gen), torch.randn(16, 1, generator=gen))
               for _ in range(12)]
    bad = (batches[7][0].clone(), batches[7][1])
    bad[0][3, 1] = math.nan

    def train(with_bad: bool):
        torch.manual_seed(1)
        model = torch.nn.Linear(4, 1)
        # A window longer than the run: nothing is judged a spike, non-finite is enough.
        opt = gradclip.ClippedOptimizer(INNER[inner](list(model.parameters())),
                                        spike_guard=gradclip.SpikeGuard(window=20))
        for i, (x, y) in enumerate(batches):
            if i == 7 and not with_bad:
                continue
            x, y = bad if i == 7 else (x, y)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        return model, opt

    model, opt = train(True)
    clean, clean_opt = train(False)
    for p, q in zip(model.parameters(), clean.parameters()):
        assert torch.equal(p, q)
    for s, t in zip(opt.optimizer.state.values(), clean_opt.optimizer.state.values()):
        for key in s:
            assert torch.equal(s[key], t[key]), key
    stats = opt.stats()
    assert stats["nonfinite_steps"] == 1 and stats["skipped_steps"] == 1
    assert opt.metrics()["mean"].item() == pytest.approx(clean_opt.metrics()["mean"].item())


def test_a_spike_in_warmup_does_not_hide_the_spikes_after_it():
    """window 100, warmup 10, a 1000x norm at step 3: the 20x norms at steps 40, 60, 99, 101
    and 150 are all flagged (judged against the median while warm-up norms are in the
    window); only 150 was before."""
    spikes = [40, 60, 99, 101, 150]
    norms = norm_sequence(200, spikes=spikes, seed=11)
    norms[3] *= 1000.0
    params = make_params()
    opt = gradclip.ClippedOptimizer(torch.optim.SGD(params, lr=0.0), max_norm=math.inf,
                                    spike_guard=gradclip.SpikeGuard(window=100, warmup=10,
                                                                    action="flag"))
    flagged = [i for i, d in enumerate(counter_deltas(opt, params, norms)) if d["spike"]]
    assert flagged == spikes


@pytest.mark.parametrize("make_rule", [lambda: gradclip.ZClip(warmup_steps=4),
                                       lambda: gradclip.AutoClip(25.0, history=16)],
                         ids=["zclip", "autoclip"])
def test_a_skipped_step_teaches_the_rule_nothing(make_rule):
    """The rule's state after a run with a skipped spike and a skipped NaN step is that of
    the same rule fed only the steps that were taken."""
    norms = norm_sequence(30, spikes=[14, 22], seed=5)
    norms[18] = math.nan
    params = make_params()
    rule = make_rule()
    opt = gradclip.ClippedOptimizer(torch.optim.SGD(params, lr=0.0), max_norm=rule,
                                    spike_guard=gradclip.SpikeGuard(window=6, warmup=4))
    taken = []
    deltas = counter_deltas(opt, params, norms)
    for norm, d in zip(norms, deltas):
        if not d["skip"]:
            taken.append(norm)
    assert len(taken) == len(norms) - 3
    twin = make_rule()
    for norm in taken:
        twin.threshold_(torch.tensor(norm, dtype=torch.float32).to(torch.float64))
    for key, value in rule.state_dict().items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(value, twin.state_dict()[key], rtol=1e-6, atol=0,
                                       msg=key)


# ---------------------------------------------------------------------------------------
# The loss watch (issue 20, item 8)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("scaler_kind", [None, "gradclip", "torch"])
def test_the_loss_reaches_the_guard_through_step_and_both_scalers(scaler_kind):
    """Loss spikes with ordinary norms: watch="loss" flags exactly them, whether the loss
    comes to opt.step(loss=...) or scaler.step(opt, loss=...)."""
    norms = norm_sequence(40, seed=2)
    losses = [3.0 + 0.01 * (i % 5) for i in range(40)]
    for i in (25, 33):
        losses[i] *= 10.0
    params = make_params()
    opt = gradclip.ClippedOptimizer(INNER["sgd"](params), max_norm=math.inf,
                                    spike_guard=gradclip.SpikeGuard(window=10, watch="loss",
                                                                    action="flag"))
    scaler = None if scaler_kind is None else SCALERS[scaler_kind]()
    gen = torch.Generator().manual_seed(0)
    flagged = []
    for i, (norm, loss) in enumerate(zip(norms, losses)):
        set_grads(params, norm, gen, scale_of(scaler))
        before = int(opt.counters[SPIKE])
        if scaler is None:
            opt.step(loss=torch.tensor(loss))
        else:
            scaler.step(opt, loss=torch.tensor(loss))
            scaler.update()
        if int(opt.counters[SPIKE]) > before:
            flagged.append(i)
    assert flagged == [25, 33]


def test_a_guard_watching_the_loss_needs_it():
    params = make_params()
    opt = gradclip.ClippedOptimizer(INNER["sgd"](params),
                                    spike_guard=gradclip.SpikeGuard(watch="both"))
    set_grads(params, 1.0, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="loss=loss"):
        opt.step()
    with pytest.raises(ValueError, match="one element"):
        opt.step(loss=torch.ones(3))


SYNC_FREE_GUARDS = {
    "both_sigma_skip_fused": dict(watch="both", factor=None, sigma=4.0, window=6, warmup=3),
    "loss_flag": dict(watch="loss", window=6, warmup=3, action="flag"),
    "norm_clip": dict(window=6, warmup=3, action="clip", max_consecutive=2),
}


@pytest.mark.parametrize("name", list(SYNC_FREE_GUARDS))
def test_guarded_steps_never_read_the_host(name, monkeypatch):
    from gradclip.backends import reference

    monkeypatch.setattr(reference, "_decides_on_host", lambda device: False)
    params = make_params()
    opt = gradclip.ClippedOptimizer(INNER["adamw_fused"](params), max_norm=1.0,
                                    spike_guard=gradclip.SpikeGuard(**SYNC_FREE_GUARDS[name]))
    norms = norm_sequence(16, spikes=[9, 10, 11, 12])
    gen = torch.Generator().manual_seed(0)
    for i, norm in enumerate(norms):
        set_grads(params, norm, gen)
        loss = torch.tensor(2.0 if i != 13 else 50.0)
        if i < 2:
            opt.step(loss=loss)  # lazy optimizer state, backend loading
            continue
        with FailOnHostReads():
            opt.step(loss=loss)
    assert opt.stats()["spike_steps"] >= 1


def test_compiled_guarded_steps_give_the_verdicts_of_eager_steps():
    torch._dynamo.reset()
    norms, losses = (values[:120] for values in long_run(seed=4))
    settings = dict(watch="both", sigma=5.0, window=12, warmup=4, max_consecutive=3)

    def train(compiled: bool):
        params = make_params()
        opt = gradclip.ClippedOptimizer(INNER["sgd"](params), max_norm=2.0,
                                        spike_guard=gradclip.SpikeGuard(**settings))
        step = torch.compile(opt.step) if compiled else opt.step
        gen = torch.Generator().manual_seed(0)
        for norm, loss in zip(norms, losses):
            set_grads(params, norm, gen)
            step(loss=torch.tensor(loss))
        return opt.stats(), [p.detach().clone() for p in params]

    try:
        (stats, params), (ref_stats, ref_params) = train(True), train(False)
    finally:
        torch._dynamo.reset()
    assert stats == ref_stats and stats["spike_steps"] > 0
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------
# Arguments (issue 20, item 10)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(window=math.inf), ValueError, "window"),
    (dict(window=True), TypeError, "window"),
    (dict(window=2.5), ValueError, "window"),
    (dict(factor=math.inf), ValueError, "factor"),
    (dict(factor=math.nan), ValueError, "factor"),
    (dict(factor=1.0), ValueError, "factor"),
    (dict(sigma=-1.0), ValueError, "sigma"),
    (dict(warmup=0), ValueError, "warmup"),
    (dict(max_consecutive=0), ValueError, "max_consecutive"),
    (dict(action="drop"), ValueError, "action"),
    (dict(watch="grad"), ValueError, "watch"),
    (dict(action="clip", watch="loss"), ValueError, "norm watched"),
])
def test_bad_guard_settings_raise_naming_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        gradclip.SpikeGuard(**kwargs)


def test_numpy_numbers_are_taken_where_python_ones_are():
    guard = gradclip.SpikeGuard(factor=np.float32(2.5), window=np.int64(12), warmup=np.int32(3),
                                max_consecutive=np.int16(4))
    assert guard.config() == gradclip.SpikeGuard(2.5, 12, 3, max_consecutive=4).config()
    assert type(guard.window) is int and type(guard.factor) is float


@pytest.mark.parametrize("make", [lambda: gradclip.SpikeGuard(),
                                  lambda: gradclip.ZClip(), lambda: gradclip.AutoClip()],
                         ids=["guard", "zclip", "autoclip"])
def test_one_rule_or_guard_for_two_optimizers_raises(make):
    shared = make()
    key = "spike_guard" if isinstance(shared, gradclip.SpikeGuard) else "max_norm"
    gradclip.ClippedOptimizer(INNER["sgd"](make_params()), **{key: shared})
    with pytest.raises(ValueError, match="another ClippedOptimizer"):
        gradclip.ClippedOptimizer(INNER["sgd"](make_params()), **{key: shared})
    gradclip.ClippedOptimizer(INNER["sgd"](make_params()), **{key: copy.deepcopy(shared)})


@pytest.mark.gpu
def test_a_guarded_zclip_step_replays_in_a_cuda_graph():
    """A ClippedOptimizer step with ZClip and a skipping SpikeGuard over a capturable fused
    AdamW reads nothing on the host, so a CUDA graph captures it; its replays train, skip
    and count as the same steps run eagerly."""
    def build():
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in ((64, 32), (32,))]
        inner = torch.optim.AdamW(params, lr=1e-2, fused=True, capturable=True)
        opt = gradclip.ClippedOptimizer(inner, max_norm=gradclip.ZClip(warmup_steps=3),
                                        spike_guard=gradclip.SpikeGuard(window=4, warmup=3))
        for p in params:
            p.grad = torch.zeros_like(p)
        return params, opt

    norms = norm_sequence(14, spikes=[9], seed=3)
    gen = torch.Generator().manual_seed(0)
    draws = []  # each step's gradients, drawn on the CPU, copied into the same GPU tensors
    for norm in norms:
        cpu = make_params()
        set_grads(cpu, norm, gen)
        draws.append(torch.cat([p.grad.flatten() for p in cpu]))

    def load(params, i):
        flat = torch.nn.functional.pad(draws[i], (0, 64 * 32 + 32 - draws[i].numel())).cuda()
        params[0].grad.copy_(flat[:64 * 32].view(64, 32))
        params[1].grad.copy_(flat[64 * 32:])

    eager_params, eager = build()
    for i in range(len(norms)):
        load(eager_params, i)
        eager.step()
    params, opt = build()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(3):  # warm-up: optimizer state, backend tables
            load(params, i)
            opt.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for i in range(3, len(norms)):
        load(params, i)
        graph.replay()
    torch.cuda.synchronize()
    assert opt.stats()["skipped_steps"] == eager.stats()["skipped_steps"] == 1
    for p, q in zip(params, eager_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
