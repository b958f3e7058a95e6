"""gradclip.integrations.lightning: with FusedGradientClipping, a Lightning Trainer's
gradient_clip_val clips with gradclip and trains to the same weights as Lightning's own
clipping: by norm and by value, in 32-true, bf16-mixed and 16-mixed, and under
strategy="ddp" with two CPU processes.

Run as a script (``python tests/test_integrations_lightning.py OUT_DIR``) this file is the
DDP training script: Lightning's "ddp" launcher starts the second process by running it
again, so the check below starts it in a subprocess.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

L = pytest.importorskip("lightning") if __name__ != "__main__" else __import__("lightning")

from lightning.pytorch.plugins.precision import DoublePrecision, FSDPPrecision, MixedPrecision, Precision  # noqa: E402

import gradclip  # noqa: E402
import gradclip.functional  # noqa: E402
from gradclip.integrations import FrameworkClipsWarning, _common  # noqa: E402
from gradclip.integrations.lightning import LIGHTNING_VERSIONS, FusedGradientClipping  # noqa: E402

MAX_STEPS = 4
# Small enough that every step clips, by norm and by value (the tests check that it does).
CLIP_VAL = 0.05


class Recorder:
    """Replaces functions by wrappers that count calls and keep what they return."""

    def __init__(self):
        self.calls: dict[str, int] = {}
        self.returned: dict[str, list] = {}
        self._restore: list = []

    def watch(self, owner, name: str, label: str) -> None:
        original = getattr(owner, name)
        self.calls[label], self.returned[label] = 0, []

        def counted(*args, **kwargs):
            self.calls[label] += 1
            result = original(*args, **kwargs)
            self.returned[label].append(result)
            return result

        setattr(owner, name, counted)
        self._restore.append((owner, name, original))

    def restore(self) -> None:
        for owner, name, original in reversed(self._restore):
            setattr(owner, name, original)
        self._restore.clear()

    def reset(self) -> None:
        for label in self.calls:
            self.calls[label], self.returned[label] = 0, []


def watch_clipping() -> Recorder:
    """Counts gradclip's and torch's clipping functions (Lightning calls torch's through
    ``torch.nn.utils`` at call time)."""
    recorder = Recorder()
    recorder.watch(gradclip.functional, "clip_grad_norm_", "gradclip norm")
    recorder.watch(gradclip.functional, "clip_grad_value_", "gradclip value")
    recorder.watch(torch.nn.utils, "clip_grad_norm_", "torch norm")
    recorder.watch(torch.nn.utils, "clip_grad_value_", "torch value")
    return recorder


@pytest.fixture(autouse=True)
def no_notice_given(monkeypatch):
    """Each test starts with no integration notice given yet in this process."""
    monkeypatch.setattr(_common, "_announced", set())
    monkeypatch.setattr(_common, "_warned", set())


@pytest.fixture
def recorder():
    recorder = watch_clipping()
    yield recorder
    recorder.restore()


class TinyRegression(L.LightningModule):
    def __init__(self, fused: bool = False):
        super().__init__()
        self.fused = fused
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x).float(), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, fused=self.fused)


def loader(batch_size: int = 16) -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(MAX_STEPS * 2 * batch_size, 16, generator=generator)
    y = 10 * torch.randn(MAX_STEPS * 2 * batch_size, 1, generator=generator)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


def fit(algorithm: str, precision: str, callbacks: list, fused: bool = False, **trainer_args):
    """Trains TinyRegression for MAX_STEPS; returns the trainer and the final weights."""
    torch.manual_seed(0)
    model = TinyRegression(fused)
    if precision == "16-mixed":
        # Lightning turns "16-mixed" into bf16 on the CPU; its fp16 plugin with torch's
        # CPU scaler runs the GPU's code path: scale, unscale, then clip.
        trainer_args["plugins"] = [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0**12))]
    elif "plugins" not in trainer_args:
        trainer_args["precision"] = precision
    trainer = L.Trainer(accelerator="cpu", max_steps=MAX_STEPS, gradient_clip_val=CLIP_VAL,
                        gradient_clip_algorithm=algorithm, callbacks=callbacks, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, **trainer_args)
    trainer.fit(model, loader())
    return trainer, {name: t.detach().clone() for name, t in model.state_dict().items()}


def assert_same_weights(expected: dict, actual: dict) -> None:
    assert expected.keys() == actual.keys()
    for name in expected:
        # The norms may differ in the last bit (gradclip sums the per-tensor norms in
        # another order), so the clip factor and the weights may too.
        torch.testing.assert_close(actual[name], expected[name], msg=name)


def as_floats(norms: list) -> list[float]:
    return [float(n) for n in norms]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_norm_clipping_matches_lightning(precision, recorder):
    _, expected = fit("norm", precision, [])
    torch_norms = as_floats(recorder.returned["torch norm"])
    assert len(torch_norms) == MAX_STEPS and min(torch_norms) > CLIP_VAL, "every step must clip"
    assert recorder.calls["gradclip norm"] == 0

    recorder.reset()
    callback = FusedGradientClipping()
    _, weights = fit("norm", precision, [callback])

    assert recorder.calls["torch norm"] == 0
    assert as_floats(recorder.returned["gradclip norm"]) == pytest.approx(torch_norms, rel=1e-6)
    assert float(callback.last_norm) == pytest.approx(torch_norms[-1], rel=1e-6)
    assert_same_weights(expected, weights)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_value_clipping_matches_lightning(precision, recorder):
    _, expected = fit("value", precision, [])
    assert recorder.calls["torch value"] == MAX_STEPS and recorder.calls["gradclip value"] == 0

    recorder.reset()
    _, weights = fit("value", precision, [FusedGradientClipping()])

    assert recorder.calls["gradclip value"] == MAX_STEPS and recorder.calls["torch value"] == 0
    assert_same_weights(expected, weights)


def test_teardown_gives_the_plugin_back_to_lightning(recorder):
    trainer, _ = fit("norm", "32-true", [FusedGradientClipping()])
    plugin = trainer.precision_plugin
    assert not {"clip_gradients", "clip_grad_by_norm", "clip_grad_by_value"} & plugin.__dict__.keys()

    recorder.reset()
    model = torch.nn.Linear(4, 4)
    model(torch.randn(2, 4)).sum().backward()
    plugin.clip_gradients(torch.optim.SGD(model.parameters(), lr=0.1), 1.0, "norm")
    assert recorder.calls["torch norm"] == 1 and recorder.calls["gradclip norm"] == 0


def test_fused_optimizer_under_bf16_mixed_is_clipped_not_refused(recorder):
    """Lightning refuses to clip for an optimizer that unscales in its step, even in
    bf16-mixed where no scaler exists; with the callback it is clipped, as torch would."""
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        fit("norm", "bf16-mixed", [], fused=True)
    _, expected = fit("norm", "bf16-mixed", [], fused=False)

    recorder.reset()
    _, weights = fit("norm", "bf16-mixed", [FusedGradientClipping()], fused=True)
    assert recorder.calls["gradclip norm"] == MAX_STEPS
    assert_same_weights(expected, weights)


def test_fused_optimizer_under_16_mixed_keeps_lightnings_refusal():
    """Under 16-mixed the scaler has not unscaled the gradients of such an optimizer, so
    clipping them would clip scaled gradients: the refusal stands."""
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        fit("norm", "16-mixed", [FusedGradientClipping()], fused=True)


def test_plugins_that_clip_their_own_way_are_left_alone():
    callback = FusedGradientClipping()
    fsdp = FSDPPrecision("32-true")
    with pytest.warns(FrameworkClipsWarning, match="FSDPPrecision overrides clip_grad_by_norm.*FSDP v1"):
        assert not callback.install(fsdp)
    assert "clip_grad_by_norm" not in fsdp.__dict__

    double = DoublePrecision()
    assert callback.install(double)
    assert "clip_grad_by_norm" in double.__dict__
    callback.uninstall(double)
    assert "clip_grad_by_norm" not in double.__dict__


@contextlib.contextmanager
def one_process_group(tmp_path):
    """A gloo group of one process, for DTensor gradients on a mesh of one CPU."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        yield torch.distributed.device_mesh.init_device_mesh("cpu", (1,))
    finally:
        torch.distributed.destroy_process_group()


def test_dtensor_gradients_clip_with_gradclip(tmp_path, recorder):
    """DTensor gradients (ModelParallelStrategy: FSDP2, tensor parallelism) go to
    gradclip's distributed clip; last_norm is the global norm as a plain tensor."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    callback = FusedGradientClipping()
    plugin = Precision()
    assert callback.install(plugin)
    with one_process_group(tmp_path) as mesh:
        weight = torch.nn.Parameter(distribute_tensor(torch.randn(4, 4), mesh, [Shard(1)]))
        weight.grad = distribute_tensor(torch.full((4, 4), 2.0), mesh, [Shard(1)])
        bias = torch.nn.Parameter(distribute_tensor(torch.randn(4), mesh, [Replicate()]))
        bias.grad = distribute_tensor(torch.full((4,), 2.0), mesh, [Replicate()])
        plugin.clip_gradients(torch.optim.SGD([weight, bias], lr=0.1), 1.0, "norm")
        assert recorder.calls["torch norm"] == 0 and recorder.calls["gradclip norm"] == 1
        norm = math.sqrt(20 * 4.0)
        assert type(callback.last_norm) is torch.Tensor
        assert callback.last_norm.item() == pytest.approx(norm)
        torch.testing.assert_close(weight.grad.full_tensor(), torch.full((4, 4), 2.0 / (norm + 1e-6)))
        plugin.clip_gradients(torch.optim.SGD([weight, bias], lr=0.1), 0.1, "value")
        assert recorder.calls["gradclip value"] == 1


class PlainSubclass(Precision):
    """A plugin of the user's that overrides nothing about clipping."""

    def main_params(self, optimizer):
        return super().main_params(optimizer)


class ClipsItsOwnWay(Precision):
    def clip_grad_by_norm(self, optimizer, clip_val):
        raise AssertionError("not called in this test")


def test_a_plugin_subclass_that_keeps_lightnings_clipping_clips_with_gradclip(recorder):
    _, expected = fit("norm", "32-true", [], plugins=[PlainSubclass()])
    torch_norms = as_floats(recorder.returned["torch norm"])
    recorder.reset()
    _, weights = fit("norm", "32-true", [FusedGradientClipping()], plugins=[PlainSubclass()])
    assert recorder.calls["torch norm"] == 0
    assert as_floats(recorder.returned["gradclip norm"]) == pytest.approx(torch_norms, rel=1e-6)
    assert_same_weights(expected, weights)


def test_a_plugin_that_overrides_a_clipping_method_is_left_alone_saying_which():
    match = "ClipsItsOwnWay overrides clip_grad_by_norm, so it clips its own way"
    with pytest.warns(FrameworkClipsWarning, match=match):
        assert not FusedGradientClipping().install(ClipsItsOwnWay())


class FailsAtStep(TinyRegression):
    def training_step(self, batch, batch_idx):
        if batch_idx == 2:
            raise KeyError("the user's bug")
        return super().training_step(batch, batch_idx)


def test_a_failing_fit_gives_the_plugin_back_to_lightning(recorder):
    callback = FusedGradientClipping()
    trainer = L.Trainer(accelerator="cpu", max_steps=MAX_STEPS, gradient_clip_val=CLIP_VAL,
                        callbacks=[callback], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(KeyError, match="the user's bug"):
        trainer.fit(FailsAtStep(), loader())
    assert recorder.calls["gradclip norm"] == 2, "gradclip clipped the steps before the failure"
    plugin = trainer.precision_plugin
    assert not {"clip_gradients", "clip_grad_by_norm", "clip_grad_by_value"} & plugin.__dict__.keys()


def test_first_clip_logs_one_info_line(caplog, recorder):
    with caplog.at_level(logging.INFO, logger="gradclip"):
        fit("norm", "32-true", [FusedGradientClipping(backend="reference")])
    lines = [r.getMessage() for r in caplog.records if r.name == "gradclip"]
    assert len(lines) == 1, lines
    assert all(word in lines[0] for word in ("gradclip clips", "lightning", "backend reference",
                                             "Precision.clip_grad_by_norm"))


@pytest.mark.parametrize("backend,error", [("bogus", ValueError), ("cuda", gradclip.BackendUnavailableError)],
                         ids=["bogus", "cuda_without_a_gpu"])
def test_a_backend_that_cannot_run_is_refused_at_construction(backend, error):
    if backend == "cuda" and torch.cuda.is_available():
        pytest.skip("the cuda backend can run here")
    with pytest.raises(error, match=f"backend={backend!r}"):
        FusedGradientClipping(backend=backend)


def test_16_mixed_on_the_cpu_has_no_scaler_so_a_fused_optimizer_is_clipped(recorder):
    """Lightning runs precision="16-mixed" on the CPU as bf16-mixed, without a scaler: the
    refusal of fused optimizers that Lightning keeps under a scaler does not apply."""
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        fit("norm", "bf16-mixed", [], fused=True)
    _, expected = fit("norm", "bf16-mixed", [])
    recorder.reset()
    trainer = L.Trainer(accelerator="cpu", precision="16-mixed", max_steps=MAX_STEPS,
                        gradient_clip_val=CLIP_VAL, callbacks=[FusedGradientClipping()], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    assert trainer.precision_plugin.scaler is None
    torch.manual_seed(0)
    model = TinyRegression(fused=True)
    trainer.fit(model, loader())
    assert recorder.calls["gradclip norm"] == MAX_STEPS
    assert_same_weights(expected, {name: t.detach() for name, t in model.state_dict().items()})


def test_the_docs_say_when_lightnings_refusal_stays():
    text = " ".join(DOCS.read_text().split())
    assert "Under `16-mixed` that refusal stays" not in text
    assert "whenever the plugin has a `GradScaler`" in text


@pytest.mark.parametrize("version", ["2.0.9", "3.0.0"])
def test_unsupported_lightning_versions_are_refused(version, monkeypatch):
    monkeypatch.setattr(_common.metadata, "version", lambda name: version)
    with pytest.raises(RuntimeError, match=f"supports lightning >= 2.1.0, < 3; {version} is installed"):
        _common.require("lightning", *LIGHTNING_VERSIONS, extra="lightning")


DOCS = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"
EXAMPLES = [block for block in re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)
            if "gradclip.integrations.lightning" in block]


def test_the_docs_show_the_callback():
    assert any("callbacks=[" in code and "gradient_clip_val" in code for code in EXAMPLES)


@pytest.mark.parametrize("code", EXAMPLES, ids=[f"example-{i}" for i in range(len(EXAMPLES))])
def test_documented_example_runs(code, recorder):
    exec(compile(code, str(DOCS), "exec"), {"__name__": "__example__"})
    assert recorder.calls["gradclip norm"] == 4 and recorder.calls["torch norm"] == 0


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    """strategy="ddp", 2 CPU processes (gloo): the same weights as Lightning's clipping,
    on both ranks, and gradclip clipped on both."""
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])))
    for name in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    result = subprocess.run([sys.executable, __file__, str(tmp_path)], env=env, cwd=repo,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    for rank in ranks:
        assert rank["calls"]["torch norm"] == 0
        assert rank["calls"]["gradclip norm"] == MAX_STEPS
        assert min(rank["torch norms"]) > CLIP_VAL, "every step must clip"
        assert rank["gradclip norms"] == pytest.approx(rank["torch norms"], rel=1e-6)
        assert_same_weights(rank["torch weights"], rank["gradclip weights"])
    assert ranks[0]["gradclip norms"] == ranks[1]["gradclip norms"], "DDP reduced the gradients"
    assert_same_weights(ranks[0]["gradclip weights"], ranks[1]["gradclip weights"])


def ddp_script(out_dir: Path) -> None:
    """Both ranks: train with Lightning's clipping, then with the callback; save what each did."""
    recorder = watch_clipping()
    _, torch_weights = fit("norm", "32-true", [], strategy="ddp", devices=2)
    torch_norms = as_floats(recorder.returned["torch norm"])
    recorder.reset()
    trainer, gradclip_weights = fit("norm", "32-true", [FusedGradientClipping()], strategy="ddp", devices=2)
    torch.save({"calls": dict(recorder.calls), "torch norms": torch_norms,
                "gradclip norms": as_floats(recorder.returned["gradclip norm"]),
                "torch weights": torch_weights, "gradclip weights": gradclip_weights},
               out_dir / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    ddp_script(Path(sys.argv[1]))
