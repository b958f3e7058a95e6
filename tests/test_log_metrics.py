"""gradclip.log_metrics: every norm written once, at its own step, to every sink.

Runs of a ``ClippedOptimizer`` (the harness of ``tests/test_health.py``: gradients of a
chosen global norm) logged to TensorBoard and to callables: the steps after the last
multiple of ``every`` (``flush=True``), two sinks, a resumed run, and the steps
``torch.amp.GradScaler`` skips without calling ``opt.step()``.
"""

from __future__ import annotations

import copy
import functools
import io
import math

import numpy as np
import pytest
import torch
from conftest import FailOnHostReads, gpu
from test_health import INNER, SCALERS, make_params, norm_sequence, scale_of, set_grads

import gradclip


@pytest.fixture
def device_decides(monkeypatch):
    """The reference backend decides "nothing to scale" on the host for CPU tensors (no
    device to wait for); make it decide on the device, as for GPU tensors, so that the
    mode sees only what log_metrics itself does."""
    from gradclip.backends import reference

    monkeypatch.setattr(reference, "_decides_on_host", lambda device: False)


# ---------------------------------------------------------------------------------------
# Every norm at its step (moved from tests/test_health.py)
# ---------------------------------------------------------------------------------------


def test_log_metrics_writes_every_norm_at_its_step_and_reads_nothing_between(device_decides):
    params = make_params()
    opt = gradclip.ClippedOptimizer(INNER["sgd"](params), history=16, track_tensor_norms=True)
    written = []
    sink = lambda name, value, step: written.append((name, value, step))  # noqa: E731
    norms = norm_sequence(25)
    gen = torch.Generator().manual_seed(0)
    recorded = []
    for step, norm in enumerate(norms, start=1):
        set_grads(params, norm, gen)
        opt.step()
        recorded.append(opt.last_norm.clone())
        if step % 10:
            with FailOnHostReads():
                assert gradclip.log_metrics(opt, sink, step, every=10) == 0
        else:
            assert gradclip.log_metrics(opt, sink, step, every=10, top_k=2) == 10
    logged = [(s, v) for name, v, s in written if name == "gradclip/norm"]
    assert logged == [(s, r.item()) for s, r in enumerate(recorded[:20], start=1)]
    at_20 = {name: v for name, v, s in written if s == 20 and name != "gradclip/norm"}
    assert at_20["gradclip/steps"] == 20 and "gradclip/mean" in at_20
    assert len([n for n in at_20 if n.startswith("gradclip/tensor_norm/")]) == 2


def test_log_metrics_needs_a_history_as_long_as_every():
    opt = gradclip.ClippedOptimizer(INNER["sgd"](make_params()), history=10)
    with pytest.raises(ValueError, match="history >= every"):
        gradclip.log_metrics(opt, print, 50, every=50)
    with pytest.raises(TypeError, match="sink"):
        gradclip.log_metrics(opt, object(), 10, every=10)


def test_tensorboard_sink_writes_one_scalar_per_step(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    params = make_params()
    opt = gradclip.ClippedOptimizer(INNER["sgd"](params), history=32,
                                    spike_guard=gradclip.SpikeGuard(window=5, action="flag"))
    writer = SummaryWriter(str(tmp_path))
    recorded = []
    gen = torch.Generator().manual_seed(0)
    for step, norm in enumerate(norm_sequence(30, spikes=[17]), start=1):
        set_grads(params, norm, gen)
        opt.step()
        recorded.append(opt.last_norm.item())
        gradclip.log_metrics(opt, writer, step, every=10)
    writer.close()
    assert list(tmp_path.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    norms = events.Scalars("gradclip/norm")
    assert [e.step for e in norms] == list(range(1, 31))
    assert [e.value for e in norms] == pytest.approx(recorded, rel=1e-6)
    assert [(e.step, e.value) for e in events.Scalars("gradclip/spike_steps")] == [
        (10, 0.0), (20, 1.0), (30, 1.0)]


# ---------------------------------------------------------------------------------------
# Logs that lose nothing
# ---------------------------------------------------------------------------------------


class Records:
    """A sink: what it was given, by name; ``norms()`` as {step: [values]}."""

    def __init__(self):
        self.rows = []

    def __call__(self, name, value, step):
        self.rows.append((name, value, step))

    def norms(self) -> dict[int, list[float]]:
        out = {}
        for name, value, step in self.rows:
            if name == "gradclip/norm":
                out.setdefault(step, []).append(value)
        return out


def train(opt, params, norms, first_step, sinks, every, *, scaler=None, seed=0, flush=True):
    """Steps ``first_step``, ... with gradients of ``norms``, log_metrics after each (and a
    flush at the end); returns {step: norm recorded by that step}."""
    gen = torch.Generator().manual_seed(seed)
    recorded = {}
    step = first_step - 1
    for step, norm in enumerate(norms, start=first_step):
        set_grads(params, norm, gen, scale_of(scaler))
        before = int(opt.counters[0])
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
        if int(opt.counters[0]) > before:  # the optimizer saw this step
            recorded[step] = opt.last_norm.item()
        for sink in sinks:
            gradclip.log_metrics(opt, sink, step, every=every)
    if flush:
        for sink in sinks:
            gradclip.log_metrics(opt, sink, step, every=every, flush=True)
    return recorded


def assert_each_once_at_its_step(logged: dict[int, list[float]], recorded: dict[int, float]):
    assert sorted(logged) == sorted(recorded)
    for step, values in logged.items():
        assert len(values) == 1, f"step {step} written {len(values)} times"
        assert values[0] == recorded[step] or (math.isnan(values[0]) and math.isnan(recorded[step]))


def test_flush_writes_the_steps_after_the_last_multiple_of_every():
    params = make_params()
    opt = gradclip.ClippedOptimizer(INNER["sgd"](params), history=32)
    sink = Records()
    recorded = train(opt, params, norm_sequence(107), 1, [sink], every=20, flush=False)
    assert max(sink.norms()) == 100
    assert gradclip.log_metrics(opt, sink, 107, every=20, flush=True) == 7
    assert_each_once_at_its_step(sink.norms(), recorded)
    assert ("gradclip/steps", 107.0, 107) in sink.rows
    # Nothing new: a second flush, or one at a step that just wrote, writes nothing twice.
    assert gradclip.log_metrics(opt, sink, 107, every=20, flush=True) == 0
    assert len([row for row in sink.rows if row[2] == 107]) == 1 + len(gradclip.health._METRICS)


def test_two_sinks_each_get_every_norm(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    params = make_params()
    opt = gradclip.ClippedOptimizer(INNER["sgd"](params), history=32)
    writer, wandb_like = SummaryWriter(str(tmp_path)), Records()
    gen = torch.Generator().manual_seed(0)
    recorded = {}
    for step, norm in enumerate(norm_sequence(45), start=1):
        set_grads(params, norm, gen)
        opt.step()
        recorded[step] = opt.last_norm.item()
        gradclip.log_metrics(opt, writer, step, every=10)
        # W&B's idiom: a lambda written in the loop, a new object at every call.
        gradclip.log_metrics(opt, lambda n, v, s: wandb_like(n, v, s), step, every=10)
    gradclip.log_metrics(opt, writer, step, every=10, flush=True)
    gradclip.log_metrics(opt, lambda n, v, s: wandb_like(n, v, s), step, every=10, flush=True)
    writer.close()
    assert_each_once_at_its_step(wandb_like.norms(), recorded)
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tensorboard = events.Scalars("gradclip/norm")
    assert [e.step for e in tensorboard] == list(range(1, 46))
    assert [e.value for e in tensorboard] == pytest.approx(list(recorded.values()), rel=1e-6)


def test_a_sink_is_the_same_object_method_or_function():
    """Sinks built anew at each call are one sink when they write to the same place; two
    sinks built by the same factory are two."""
    params = make_params()
    opt = gradclip.ClippedOptimizer(INNER["sgd"](params), history=16)

    def sink_to(records):
        return lambda n, v, s: records(n, v, s)

    a, b, c, d, e = Records(), Records(), Records(), Records(), Records()
    gen = torch.Generator().manual_seed(0)
    recorded = {}
    for step, norm in enumerate(norm_sequence(12), start=1):
        set_grads(params, norm, gen)
        loss = torch.tensor(float(step))  # new at every step, read by the last sink
        opt.step()
        recorded[step] = opt.last_norm.item()
        gradclip.log_metrics(opt, sink_to(a), step, every=4)
        gradclip.log_metrics(opt, sink_to(b), step, every=4)
        gradclip.log_metrics(opt, functools.partial(Records.__call__, c), step, every=4)
        gradclip.log_metrics(opt, d.__call__, step, every=4)
        gradclip.log_metrics(opt, lambda n, v, s: e(n, v, s) if loss.numel() else None, step,
                             every=4)
    for sink in (a, b, c, d, e):
        assert_each_once_at_its_step(sink.norms(), recorded)


def checkpointed_run(total, every, cut, history=64, drop_logged=False):
    """A run logged to one list, saved at step ``cut`` and resumed in a new optimizer (a
    new process, as far as log_metrics knows): the rows, and each step's norm."""
    norms = norm_sequence(total, seed=3)
    sink = Records()
    params = make_params()
    opt = gradclip.ClippedOptimizer(INNER["adamw"](params), history=history)
    recorded = train(opt, params, norms[:cut], 1, [sink], every, seed=0, flush=False)
    buffer = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "params": [p.detach() for p in params]}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    if drop_logged:  # a checkpoint from before the count was saved
        del saved["opt"]["gradclip"]["logged"]
    resumed_params = [torch.nn.Parameter(p.clone()) for p in saved["params"]]
    resumed = gradclip.ClippedOptimizer(INNER["adamw"](resumed_params), history=history)
    resumed.load_state_dict(saved["opt"])
    recorded.update(train(resumed, resumed_params, norms[cut:], cut + 1, [sink], every, seed=1))
    return sink, recorded


@pytest.mark.parametrize("cut", [50, 60])
def test_a_resumed_run_writes_no_step_twice(cut):
    sink, recorded = checkpointed_run(107, every=20, cut=cut)
    assert_each_once_at_its_step(sink.norms(), recorded)


def test_a_checkpoint_without_the_count_loses_nothing():
    """Saved before the count existed: the history is written again, nothing is lost."""
    sink, recorded = checkpointed_run(70, every=20, cut=50, drop_logged=True)
    logged = sink.norms()
    assert sorted(logged) == sorted(recorded)
    assert all(values[0] == recorded[step] for step, values in logged.items())


@pytest.mark.parametrize("inner", ["sgd", "adamw_fused"])
@pytest.mark.parametrize("scaler_kind", ["torch", "gradclip"])
def test_under_a_grad_scaler_each_norm_is_written_at_its_own_step(scaler_kind, inner):
    """torch.amp.GradScaler skips an inf step of a non-fused optimizer without calling
    opt.step(): that step records no norm, and every other keeps its own step."""
    params = make_params()
    opt = gradclip.ClippedOptimizer(INNER[inner](params), history=32)
    scaler = SCALERS[scaler_kind]()
    norms = norm_sequence(47, seed=5)
    for i in (4, 12, 13, 30):
        norms[i] = math.inf
    sink = Records()
    recorded = train(opt, params, norms, 1, [sink], every=10, scaler=scaler)
    skips_calls = scaler_kind == "torch" and inner == "sgd"
    assert len(recorded) == 47 - 4 * skips_calls
    assert_each_once_at_its_step(sink.norms(), recorded)


def test_between_writes_log_metrics_only_counts_on_the_device(device_decides):
    """A torch.amp.GradScaler run with skipped steps: still no host read between writes."""
    params = make_params()
    opt = gradclip.ClippedOptimizer(INNER["sgd"](params), history=16)
    scaler = SCALERS["torch"]()
    sink = Records()
    gen = torch.Generator().manual_seed(0)
    for step, norm in enumerate(norm_sequence(20), start=1):
        set_grads(params, math.inf if step in (3, 4) else norm, gen, scale_of(scaler))
        scaler.step(opt)
        scaler.update()
        if step % 10:
            with FailOnHostReads():
                gradclip.log_metrics(opt, sink, step, every=10)
        else:
            gradclip.log_metrics(opt, sink, step, every=10)
    assert sorted(sink.norms()) == [s for s in range(1, 21) if s not in (3, 4)]


def test_log_metrics_takes_numpy_integers_and_refuses_bad_arguments():
    params = make_params()
    opt = gradclip.ClippedOptimizer(INNER["sgd"](params), history=16)
    sink = Records()
    train(opt, params, norm_sequence(10), 1, [], every=5, flush=False)
    assert gradclip.log_metrics(opt, sink, np.int64(10), every=np.int32(5)) == 10
    for kwargs, error, match in [(dict(every=True), TypeError, "every"),
                                 (dict(every=0), ValueError, "every"),
                                 (dict(every=2.5), ValueError, "every"),
                                 (dict(step=-1), ValueError, "step"),
                                 (dict(step=1.5), ValueError, "step"),
                                 (dict(flush=1), TypeError, "flush")]:
        args = {"step": 10, "every": 5, **kwargs}
        with pytest.raises(error, match=match):
            gradclip.log_metrics(opt, sink, args.pop("step"), **args)


def test_a_copied_optimizer_keeps_the_count():
    params = make_params()
    opt = gradclip.ClippedOptimizer(INNER["sgd"](params), history=16)
    sink = Records()
    train(opt, params, norm_sequence(10), 1, [sink], every=5, flush=False)
    twin = copy.deepcopy(opt)
    assert twin.state_dict()["gradclip"]["logged"] == 10
    assert gradclip.log_metrics(twin, Records(), 10, every=5, flush=True) == 0


@gpu
def test_between_writes_log_metrics_never_synchronises_on_the_gpu():
    params = [torch.nn.Parameter(p.detach().cuda()) for p in make_params()]
    opt = gradclip.ClippedOptimizer(torch.optim.AdamW(params, lr=0.01, fused=True), history=16)
    sink = Records()
    gen = torch.Generator().manual_seed(0)
    for step, norm in enumerate(norm_sequence(20), start=1):
        set_grads(params, norm, gen)
        torch.cuda.synchronize()
        if step % 10 and step > 2:  # after the first steps' lazy set-up
            torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
            gradclip.log_metrics(opt, sink, step, every=10)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert sorted(sink.norms()) == list(range(1, 21))
