"""gradclip.integrations.fabric: with FabricGradientClipping, fabric.clip_gradients clips
with gradclip and trains to the same weights, with the same returned norm, as Fabric's own
clipping: by norm and by value, in 32-true, bf16-mixed and 16-mixed (a GradScaler on the
CPU), one process. Sharded strategies: tests/test_integrations_sharded.py.
"""

from __future__ import annotations

import logging
import math
import re
import types
import warnings
from pathlib import Path

import pytest
import torch

L = pytest.importorskip("lightning")

from lightning.fabric.plugins.precision import MixedPrecision  # noqa: E402
from lightning.fabric.strategies import FSDPStrategy, SingleDeviceStrategy  # noqa: E402

import gradclip  # noqa: E402
import gradclip.functional  # noqa: E402
from gradclip.integrations import FrameworkClipsWarning, _common  # noqa: E402
from gradclip.integrations.fabric import FabricGradientClipping  # noqa: E402
from gradclip.integrations.lightning import FusedGradientClipping  # noqa: E402

STEPS = 4
# Small enough that every step clips, by norm and by value (the tests check that it does).
MAX_NORM = 0.05


class Recorder:
    """Counts calls of gradclip's and torch's clipping functions, keeping their results."""

    def __init__(self, monkeypatch):
        self.calls: dict[str, int] = {}
        self.returned: dict[str, list] = {}
        for owner, name, label in ((gradclip.functional, "clip_grad_norm_", "gradclip norm"),
                                   (gradclip.functional, "clip_grad_value_", "gradclip value"),
                                   (torch.nn.utils, "clip_grad_norm_", "torch norm"),
                                   (torch.nn.utils, "clip_grad_value_", "torch value")):
            self._watch(monkeypatch, owner, name, label)

    def _watch(self, monkeypatch, owner, name, label):
        original = getattr(owner, name)
        self.calls[label], self.returned[label] = 0, []

        def counted(*args, **kwargs):
            self.calls[label] += 1
            result = original(*args, **kwargs)
            self.returned[label].append(result)
            return result

        monkeypatch.setattr(owner, name, counted)

    def reset(self):
        for label in self.calls:
            self.calls[label], self.returned[label] = 0, []


@pytest.fixture
def recorder(monkeypatch):
    monkeypatch.setattr(_common, "_announced", set())
    monkeypatch.setattr(_common, "_warned", set())
    return Recorder(monkeypatch)


def fabric_for(precision: str, callbacks: list, **kwargs) -> L.Fabric:
    if precision == "16-mixed":
        # Fabric turns "16-mixed" into bf16 on the CPU; its fp16 plugin with torch's CPU
        # scaler runs the GPU's code path: scale, unscale, then clip.
        kwargs["plugins"] = [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0**12))]
    else:
        kwargs["precision"] = precision
    return L.Fabric(accelerator="cpu", devices=1, callbacks=callbacks, **kwargs)


def train(precision: str, callbacks: list, clip, setup: str = "setup"):
    """STEPS steps of a small MLP; ``clip(fabric, model, optimizer)`` clips. Returns the
    clip results and the final weights."""
    fabric = fabric_for(precision, callbacks)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if setup == "setup":
        model, optimizer = fabric.setup(model, optimizer)
    else:
        model = fabric.setup_module(model)
        optimizer = fabric.setup_optimizers(optimizer)
    generator = torch.Generator().manual_seed(1)
    results = []
    for _ in range(STEPS):
        x, y = torch.randn(16, 16, generator=generator), 10 * torch.randn(16, 1, generator=generator)
        fabric.backward(torch.nn.functional.mse_loss(model(x).float(), y))
        results.append(clip(fabric, model, optimizer))
        optimizer.step()
        optimizer.zero_grad()
    return results, [p.detach().clone() for p in model.parameters()]


def by_norm(fabric, model, optimizer):
    return fabric.clip_gradients(model, optimizer, max_norm=MAX_NORM)


def by_value(fabric, model, optimizer):
    return fabric.clip_gradients(model, optimizer, clip_val=MAX_NORM)


def assert_same_weights(expected, actual):
    for want, got in zip(expected, actual):
        # The norms may differ in the last bit (another summation order), so may the weights.
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_norm_clipping_matches_fabric(precision, recorder):
    expected_norms, expected = train(precision, [], by_norm)
    assert recorder.calls["torch norm"] == STEPS and recorder.calls["gradclip norm"] == 0
    assert min(n.item() for n in expected_norms) > MAX_NORM, "every step must clip"

    recorder.reset()
    clipping = FabricGradientClipping()
    norms, weights = train(precision, [clipping], by_norm)

    assert recorder.calls["gradclip norm"] == STEPS and recorder.calls["torch norm"] == 0
    assert [n.item() for n in norms] == pytest.approx([n.item() for n in expected_norms], rel=1e-6)
    assert clipping.last_norm.item() == pytest.approx(expected_norms[-1].item(), rel=1e-6)
    assert_same_weights(expected, weights)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_value_clipping_matches_fabric(precision, recorder):
    _, expected = train(precision, [], by_value)
    assert recorder.calls["torch value"] == STEPS
    recorder.reset()
    results, weights = train(precision, [FabricGradientClipping()], by_value)
    assert results == [None] * STEPS
    assert recorder.calls["gradclip value"] == STEPS and recorder.calls["torch value"] == 0
    assert_same_weights(expected, weights)


def test_fabric_without_the_callback_keeps_torch(recorder):
    train("32-true", [], by_norm)
    assert recorder.calls["gradclip norm"] == 0


def test_the_trainer_callback_is_refused_by_fabric():
    refused = "FusedGradientClipping is a lightning.Trainer callback.*FabricGradientClipping"
    with pytest.raises(TypeError, match=refused):
        train("32-true", [FusedGradientClipping()], by_norm)
    with pytest.raises(TypeError, match=refused):
        train("32-true", [FusedGradientClipping()], by_norm, setup="setup_module")


def test_setup_module_installs_at_the_first_step_and_says_so(recorder):
    with pytest.warns(FrameworkClipsWarning, match="clips before the first optimizer step were torch's"):
        train("32-true", [FabricGradientClipping()], by_norm, setup="setup_module")
    assert recorder.calls["torch norm"] == 1 and recorder.calls["gradclip norm"] == STEPS - 1


def test_install_after_setup_module(recorder):
    fabric = fabric_for("32-true", [])
    clipping = FabricGradientClipping()
    model = fabric.setup_module(torch.nn.Linear(4, 4))
    optimizer = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=0.1))
    assert clipping.install(fabric)
    model(torch.randn(2, 4)).sum().backward()
    norm = fabric.clip_gradients(model, optimizer, max_norm=1.0)
    assert recorder.calls["gradclip norm"] == 1 and norm.item() > 0
    clipping.uninstall(fabric)
    fabric.clip_gradients(model, optimizer, max_norm=1.0)
    assert recorder.calls["torch norm"] == 1


def linear_with_grads(callbacks):
    fabric = fabric_for("32-true", callbacks)
    model = torch.nn.Linear(4, 4)
    model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    fabric.backward(model(torch.randn(2, 4)).sum())
    return model, optimizer, fabric


def test_error_if_nonfinite_is_fabrics_default(recorder):
    model, optimizer, fabric = linear_with_grads([FabricGradientClipping()])
    model.weight.grad[0, 0] = math.nan
    before = model.weight.grad.clone()
    with pytest.raises(RuntimeError, match="non-finite"):
        fabric.clip_gradients(model, optimizer, max_norm=1.0)
    assert torch.equal(model.weight.grad.isnan(), before.isnan())
    norm = fabric.clip_gradients(model, optimizer, max_norm=1.0, error_if_nonfinite=False)
    assert math.isnan(norm.item()) and recorder.calls["gradclip norm"] == 2


def test_norm_type_zero_stays_with_torch_and_says_why(recorder):
    model, optimizer, fabric = linear_with_grads([FabricGradientClipping()])
    with pytest.warns(FrameworkClipsWarning, match="norm_type=0"):
        fabric.clip_gradients(model, optimizer, max_norm=1e9, norm_type=0)
    assert recorder.calls["torch norm"] == 1 and recorder.calls["gradclip norm"] == 0


class ClipsItsOwnWay(SingleDeviceStrategy):
    def clip_gradients_value(self, module, optimizer, clip_val):
        raise AssertionError("not called in this test")


def test_strategies_that_clip_their_own_way_are_left_alone(recorder):
    # Fabric's FSDP (v1) strategy runs on GPUs only; the callback sees only its class.
    fsdp = types.SimpleNamespace(strategy=FSDPStrategy())
    with pytest.warns(FrameworkClipsWarning, match="FSDPStrategy overrides clip_gradients_norm.*FSDP v1"):
        assert not FabricGradientClipping().install(fsdp)
    assert "clip_gradients_norm" not in fsdp.strategy.__dict__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not FabricGradientClipping().install(fsdp)  # the same reason: warned once

    fabric = L.Fabric(accelerator="cpu", devices=1, strategy=ClipsItsOwnWay(torch.device("cpu")))
    with pytest.warns(FrameworkClipsWarning, match="ClipsItsOwnWay overrides clip_gradients_value"):
        assert not FabricGradientClipping().install(fabric)


def test_first_clip_logs_one_info_line(caplog, recorder):
    with caplog.at_level(logging.INFO, logger="gradclip"):
        train("32-true", [FabricGradientClipping(backend="reference")], by_norm)
    lines = [r.getMessage() for r in caplog.records if r.name == "gradclip"]
    assert len(lines) == 1, lines
    assert all(word in lines[0] for word in ("gradclip clips", "fabric", "backend reference",
                                             "SingleDeviceStrategy.clip_gradients_norm"))


@pytest.mark.parametrize("backend,error", [("bogus", ValueError), ("cuda", gradclip.BackendUnavailableError)],
                         ids=["bogus", "cuda_without_a_gpu"])
def test_a_backend_that_cannot_run_is_refused_at_construction(backend, error):
    if backend == "cuda" and torch.cuda.is_available():
        pytest.skip("the cuda backend can run here")
    with pytest.raises(error, match=f"backend={backend!r}"):
        FabricGradientClipping(backend=backend)


DOCS = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"
EXAMPLES = [block for block in re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)
            if "gradclip.integrations.fabric" in block]


def test_the_docs_show_fabric():
    assert any("FabricGradientClipping()" in code and "clip_gradients" in code for code in EXAMPLES)


@pytest.mark.parametrize("code", EXAMPLES, ids=[f"example-{i}" for i in range(len(EXAMPLES))])
def test_documented_example_runs(code, recorder):
    exec(compile(code, str(DOCS), "exec"), {"__name__": "__example__"})
    assert recorder.calls["gradclip norm"] >= 1 and recorder.calls["torch norm"] == 0
