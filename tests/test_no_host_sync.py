"""No backend op synchronises with the host (gradclip/backends/base.py): every decision of a
clip (found_inf, a factor of exactly 1, a tensor below its limit) is taken on the device.

Checked for every backend that runs here, after a warm-up call (kernels compiled, tables
built), and for a list the backend has not seen before:

- on the CPU, by :class:`conftest.FailOnHostReads`, which fails on
  ``aten._local_scalar_dense``, what every host read of a tensor lowers to: the Triton
  kernels in the interpreter, and the reference backend's device path (the one it takes
  off the CPU; on CPU tensors it decides on the host, where there is nothing to wait for,
  so that path is forced here);
- on a GPU, by ``torch.cuda.set_sync_debug_mode("error")``, for the cuda, triton and
  reference backends (the extension's fast path is C++, which a dispatch mode cannot see).

The wrappers' own no-sync checks (the optimizer, the AMP scaler, gradient health, the spike
guard, log_metrics, the rules) stay with their features' tests.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from conftest import DTYPE_MIXES, FailOnHostReads, on_device, random_tensors

import gradclip
from gradclip.backends import reference, resolve
from gradclip.backends.base import coef_of, found_inf_of

# 0-d, 1-d, Linear, conv and empty tensors, and ones longer than the interpreter's chunks
SHAPES = [(), (7,), (8, 5), (4, 3, 3, 3), (0,), (0, 3), (150,), (3, 150)]


@pytest.fixture
def device_path(backend_device, monkeypatch):
    """``backend_device``, with the reference backend on CPU tensors made to decide on the
    device, as it does on a GPU."""
    if backend_device == ("reference", "cpu"):
        monkeypatch.setattr(reference, "_decides_on_host", lambda device: False)
    return backend_device


@contextlib.contextmanager
def no_host_sync(device: str):
    """Fails on a host synchronisation inside: CUDA's sync debug mode on a GPU, a dispatch
    mode that fails on host reads on the CPU."""
    if device != "cuda":
        with FailOnHostReads():
            yield
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _tensors(gen, device, scale=1.0):
    mix = DTYPE_MIXES["mixed"]
    return random_tensors(gen, SHAPES, [mix[i % len(mix)] for i in range(len(SHAPES))],
                          on_device(device), scale)


def _params(gen, device):
    """Parameters whose gradients are over and under the limits (per tensor and per unit)."""
    params = []
    for i, (w, g) in enumerate(zip(_tensors(gen, device), _tensors(gen, device))):
        p = torch.nn.Parameter(w)
        p.grad = g * (0.01 if i % 2 else 3.0)
        params.append(p)
    return params


def test_global_ops_read_nothing_on_the_host(device_path, gen):
    name, device = device_path
    backend = resolve(name, on_device(device))
    grads = _tensors(gen, device, scale=3.0)
    dev = grads[0].device
    inv_scale = torch.tensor([0.5], device=dev)
    backend.clip_grads_(grads, 2.0, 1.0, inv_scale)  # compiles the variants, builds the table
    backend.clip_grads_(grads, 2.0, 1.0)
    backend.clamp_(grads, 10.0)
    others = _tensors(gen, device)
    with no_host_sync(device):
        backend.clip_grads_(grads, 2.0, 1.0, inv_scale)  # a cached table
        stats = backend.norm_stats(grads, math.inf, 1e9)
        backend.scale_(grads, coef_of(stats), found_inf_of(stats))  # a factor of exactly 1
        backend.scale_(grads, torch.tensor([0.5], device=dev))
        backend.clamp_(grads, 10.0)
        backend.clip_grads_(others, 2.0, 1.0)  # a list not seen before: its table built and copied


def test_per_tensor_clips_read_nothing_on_the_host(device_path, gen):
    name, device = device_path
    params = _params(gen, device)
    gradclip.clip_grad_norm_per_tensor_(params, 1.0, backend=name)  # builds the tables
    gradclip.adaptive_clip_grad_(params, backend=name)
    with no_host_sync(device):
        gradclip.clip_grad_norm_per_tensor_(params, 1.0, backend=name)
        gradclip.adaptive_clip_grad_(params, backend=name)
        gradclip.AGC().clip_(params, backend=name)


def test_per_tensor_norms_read_nothing_on_the_host(device_path, gen):
    name, device = device_path
    tensors = _tensors(gen, device)
    gradclip.tensor_norms(tensors, backend=name)  # builds and caches the tables
    with no_host_sync(device):
        gradclip.tensor_norms(tensors, backend=name)
