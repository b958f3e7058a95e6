"""Shared fixtures: which (backend, device) pairs run here, and fresh random data per test."""

from __future__ import annotations

import os
import random

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Before anything imports triton: run the Triton kernels on the CPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import gradclip  # noqa: E402
from gradclip.backends import get_backend  # noqa: E402

gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def runnable_backends() -> list[tuple[str, str]]:
    """(backend, device) pairs to test. On a GPU machine every fused backend must run:
    one that cannot fails its tests instead of being skipped."""
    pairs = [("reference", "cpu")]
    if HAS_CUDA:
        return pairs + [("reference", "cuda"), ("cuda", "cuda"), ("triton", "cuda")]
    if get_backend("triton").status().available:
        pairs.append(("triton", "cpu"))
    return pairs


BACKEND_DEVICES = runnable_backends()


@pytest.fixture(params=BACKEND_DEVICES, ids=[f"{b}-{d}" for b, d in BACKEND_DEVICES])
def backend_device(request) -> tuple[str, str]:
    return request.param


@pytest.fixture
def gen() -> torch.Generator:
    """A generator with a fresh seed per test; the seed is printed for reproduction."""
    seed = random.randrange(2**31)
    print(f"random seed: {seed}")
    return torch.Generator().manual_seed(seed)


def random_tensors(gen: torch.Generator, shapes, dtypes, device="cpu", scale=1.0):
    """Fresh normal data, made on the CPU (reproducible from the seed) then moved."""
    if isinstance(dtypes, torch.dtype):
        dtypes = [dtypes] * len(shapes)
    return [(torch.randn(shape, generator=gen, dtype=torch.float64) * scale)
            .to(dtype=dtype).to(device) for shape, dtype in zip(shapes, dtypes)]


def on_device(device: str):
    return torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device(device)


__all__ = ["BACKEND_DEVICES", "FLOAT_DTYPES", "HAS_CUDA", "gpu", "gradclip", "random_tensors"]
