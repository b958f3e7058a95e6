"""Backend selection: one dispatch point, the environment variable, and clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import HAS_CUDA
from torch.utils._python_dispatch import TorchDispatchMode

import gradclip
from gradclip.backends import dispatch
from gradclip.backends.base import Backend, BackendStatus, BackendUnavailableError


@pytest.fixture(autouse=True)
def fresh_dispatch(monkeypatch):
    """Each test starts with no remembered auto choice and no GRADCLIP_BACKEND."""
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setattr(dispatch, "_auto_choice", {})


def test_available_backends_explains_every_backend():
    statuses = gradclip.available_backends()
    assert list(statuses) == ["cuda", "triton", "reference"]
    for name, status in statuses.items():
        assert isinstance(status, BackendStatus)
        assert len(status.reason) > 10, f"{name}: say why, not just yes or no"
    assert statuses["reference"].available


@pytest.mark.skipif(HAS_CUDA, reason="checks the reasons given without a GPU")
def test_without_gpu_the_cuda_backend_says_why():
    status = gradclip.available_backends()["cuda"]
    assert not status.available
    assert "CUDA" in status.reason or "cuda" in status.reason


def test_backends_command_prints_each_backend():
    out = subprocess.run([sys.executable, "-m", "gradclip", "backends"], capture_output=True,
                         text=True, check=True).stdout
    for name in ("cuda", "triton", "reference"):
        assert any(line.startswith(name) for line in out.splitlines()), out


def test_auto_on_cpu_tensors_picks_the_reference():
    assert dispatch.resolve("auto", torch.device("cpu")).name == "reference"


def test_environment_variable_chooses_for_auto(monkeypatch):
    calls = []
    reference = dispatch.get_backend("reference")
    monkeypatch.setattr(reference, "norm_stats",
                        lambda *args, **kwargs: calls.append(1) or torch.zeros(3))
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    gradclip.get_total_norm([torch.randn(4)])
    assert calls == [1]
    assert dispatch.requested_backend("auto") == "reference"


def test_torch_is_the_reference_backends_former_name(monkeypatch):
    assert dispatch.get_backend("torch") is dispatch.get_backend("reference")
    assert dispatch.requested_backend("torch") == "reference"
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert dispatch.requested_backend("auto") == "reference"


def test_explicit_argument_overrides_the_environment(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    assert dispatch.requested_backend("reference") == "reference"


def test_unknown_backend_in_environment_is_a_value_error(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "apex")
    with pytest.raises(ValueError, match="GRADCLIP_BACKEND='apex'"):
        gradclip.get_total_norm([torch.randn(4)])


def test_backend_must_be_a_string():
    with pytest.raises(TypeError, match="backend must be a string"):
        gradclip.get_total_norm([torch.randn(4)], backend=None)


class _Broken(Backend):
    """Claims to be available, then fails to load, as a failed compile would."""

    name = "cuda"

    def status(self):
        return BackendStatus(True, "pretends to be there")

    def supports(self, device):
        return True

    def load(self):
        raise BackendUnavailableError("nvcc exited with status 1")


def test_auto_falls_back_with_a_warning_when_a_backend_fails_to_load(monkeypatch):
    monkeypatch.setitem(dispatch._instances, "cuda", _Broken())
    monkeypatch.setitem(dispatch._AUTO_ORDER, "cpu", ("cuda", "reference"))
    with pytest.warns(RuntimeWarning, match="nvcc exited"):
        chosen = dispatch.resolve("auto", torch.device("cpu"))
    assert chosen.name == "reference"


def test_explicit_backend_that_fails_to_load_raises(monkeypatch):
    monkeypatch.setitem(dispatch._instances, "cuda", _Broken())
    with pytest.raises(BackendUnavailableError, match="nvcc exited"):
        gradclip.get_total_norm([torch.randn(4)], backend="cuda")


def test_explicit_backend_that_cannot_run_raises_with_the_reason(monkeypatch):
    missing = dispatch._MissingBackend("triton", "triton is not installed")
    monkeypatch.setitem(dispatch._instances, "triton", missing)
    with pytest.raises(BackendUnavailableError, match="triton is not installed"):
        gradclip.clip_grad_norm_([torch.nn.Parameter(torch.randn(3))], 1.0, backend="triton")
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    with pytest.raises(BackendUnavailableError, match="triton is not installed"):
        gradclip.get_total_norm([torch.randn(4)])


def test_auto_choice_is_remembered_per_device():
    first = dispatch.resolve("auto", torch.device("cpu"))
    assert dispatch._auto_choice[torch.device("cpu")] is first
    assert dispatch.resolve("auto", torch.device("cpu")) is first


class _TakesWholeLists(Backend):
    """Accepts any list whole, and records what each op was given."""

    name = "reference"

    def __init__(self):
        self.calls = []

    def status(self):
        return BackendStatus(True, "test double")

    def supports(self, device):
        return True

    def accepts(self, tensors):
        return True

    def norm_stats(self, tensors, norm_type, max_norm, inv_scale=None):
        self.calls.append(("norm_stats", len(tensors)))
        return torch.zeros(3)

    def scale_(self, tensors, scale, found_inf=None):
        self.calls.append(("scale_", len(tensors)))

    def clamp_(self, tensors, clip_value):
        self.calls.append(("clamp_", len(tensors)))


def test_a_backend_that_accepts_the_list_gets_it_whole_without_the_python_split(monkeypatch):
    double = _TakesWholeLists()
    monkeypatch.setitem(dispatch._instances, "reference", double)

    def no_split(*args):
        raise AssertionError("the list was split in Python")

    monkeypatch.setattr(dispatch, "_split", no_split)
    tensors = [torch.randn(3) for _ in range(5)]
    dispatch.norm_stats(tensors, 2.0, 1.0, backend="reference")
    dispatch.scale_(tensors, torch.ones(1), backend="reference")
    dispatch.clip_grads_(tensors, 2.0, 1.0, backend="reference")
    dispatch.clamp_(tensors, 1.0, backend="reference")
    assert double.calls == [("norm_stats", 5), ("scale_", 5), ("norm_stats", 5), ("scale_", 5),
                            ("clamp_", 5)]


# -- per-tensor results in input order, without a host-built index (issue 21, item 6) -------

class FailOnHostData(TorchDispatchMode):
    """Fails where a tensor is made from host data (``torch.tensor(list)``: ``lift_fresh``),
    as an index of input positions would be: on a GPU a synchronising copy, which a CUDA
    graph cannot capture."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.lift_fresh.default:
            raise AssertionError("a tensor was built from host data")
        return func(*args, **(kwargs or {}))


def _mixed_list(gen, with_complex):
    dtypes = [torch.float32, torch.bfloat16, torch.float64, torch.float16, torch.float32]
    tensors = [torch.randn(5 + i, generator=gen).to(dtype) * 3 for i, dtype in enumerate(dtypes)]
    if with_complex:
        tensors.insert(2, torch.randn(4, dtype=torch.complex64, generator=gen) * 3)
        tensors.append(torch.randn(3, dtype=torch.complex128, generator=gen) * 3)
    return tensors


@pytest.mark.parametrize("with_complex", [False, True], ids=["one-part", "parts"])
def test_per_tensor_ops_keep_input_order_without_a_host_index(gen, with_complex):
    """A mixed-dtype list (one part) and a list the dispatcher splits (complex tensors go
    to the reference): norms come back and factors go out in input order, reordered on the
    device."""
    tensors = _mixed_list(gen, with_complex)
    want = [float(t.abs().double().norm()) for t in tensors]
    coefs = torch.linspace(0.1, 0.9, len(tensors), dtype=torch.float64)
    expected = [t * c.item() for t, c in zip(tensors, coefs)]
    with FailOnHostData():
        norms = dispatch.tensor_norms(tensors, 2.0)
        stats, more = dispatch.norm_stats_per_tensor(tensors, 2.0, 1.0)
        dispatch.scale_per_tensor_(tensors, coefs)
        clipped = dispatch.clip_per_tensor_([t.clone() for t in expected], 2.0, 0.5)
    assert norms.tolist() == pytest.approx(want, rel=2e-5) and torch.equal(norms, more)
    assert clipped.tolist() == pytest.approx([w * c.item() for w, c in zip(want, coefs)], rel=2e-2)
    for t, e in zip(tensors, expected):
        torch.testing.assert_close(t, e, rtol=1e-2, atol=0)


@pytest.mark.gpu
def test_split_per_tensor_ops_are_captured_by_a_cuda_graph(gen):
    """A list split in parts (complex tensors apart) on a GPU: the reordering of norms and
    factors is captured (no host index to upload) and follows the data on replay."""
    tensors = [t.cuda() for t in _mixed_list(gen, with_complex=True)]
    fresh = [t.clone() for t in tensors]
    coefs = torch.linspace(0.1, 0.9, len(tensors), device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        dispatch.tensor_norms(tensors, 2.0)
        dispatch.scale_per_tensor_(tensors, coefs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        norms = dispatch.tensor_norms(tensors, 2.0)
        dispatch.scale_per_tensor_(tensors, coefs)
    for t, f in zip(tensors, fresh):
        t.copy_(f * 2)
    graph.replay()
    want = [2 * float(f.abs().double().norm()) for f in fresh]
    assert norms.tolist() == pytest.approx(want, rel=2e-5)
    for t, f, c in zip(tensors, fresh, coefs.tolist()):
        torch.testing.assert_close(t, f * 2 * c, rtol=1e-2, atol=0)
