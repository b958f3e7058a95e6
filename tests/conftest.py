"""Shared fixtures: which (backend, device) pairs run here, and fresh random data per test.

Every test that needs a GPU carries the ``gpu`` marker (``pytest -m gpu`` selects them
all): mark it with :data:`gpu`, or take a ``cuda`` pair of :func:`backend_device`, which is
marked for you; marked tests skip without a CUDA device. Random data comes from
:func:`gen`, whose seed is printed and can be pinned with ``GRADCLIP_TEST_SEED``.
"""

from __future__ import annotations

import fcntl
import os
import random
import re
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Before anything imports triton: run the Triton kernels on the CPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import gradclip  # noqa: E402
from gradclip.backends import get_backend  # noqa: E402

gpu = pytest.mark.gpu
SEED_ENV = "GRADCLIP_TEST_SEED"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Dtype mixes the backends are checked over: one dtype, all four, and 16-bit among 32-bit.
DTYPE_MIXES = {
    "fp32": [torch.float32],
    "bf16": [torch.bfloat16],
    "fp16": [torch.float16],
    "fp64": [torch.float64],
    "mixed": [torch.float32, torch.bfloat16, torch.float16, torch.float64],
    "mixed16-32": [torch.bfloat16, torch.float32, torch.float16],
}


class FailOnHostReads(TorchDispatchMode):
    """Fails on ``aten._local_scalar_dense``: what ``.item()``, ``bool()`` and every other
    host read of a tensor lower to, on any device."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "_local_scalar_dense" in str(func):
            raise AssertionError("host synchronisation (aten._local_scalar_dense)")
        return func(*args, **(kwargs or {}))


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
# The wrapper and the scalers do not depend on the backend: their tests run on the
# reference backend on the CPU (and every backend on a GPU, where the fused fast paths
# differ); the Triton interpreter, slow, gets a smoke test of its own.
WRAPPER_BACKEND_DEVICES = [pair for pair in BACKEND_DEVICES if pair != ("triton", "cpu")]


def _backend_params(pairs):
    return [pytest.param(pair, marks=[gpu] if pair[1] == "cuda" else [], id=f"{pair[0]}-{pair[1]}")
            for pair in pairs]


@pytest.fixture(params=_backend_params(BACKEND_DEVICES))
def backend_device(request) -> tuple[str, str]:
    return request.param


@pytest.fixture(params=_backend_params(WRAPPER_BACKEND_DEVICES))
def wrapper_backend_device(request) -> tuple[str, str]:
    return request.param


def test_seed() -> int:
    """``$GRADCLIP_TEST_SEED`` when set (to replay a failure), else a fresh random seed."""
    pinned = os.environ.get(SEED_ENV, "").strip()
    return int(pinned) if pinned else random.randrange(2**31)


test_seed.__test__ = False  # a helper, not a test


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded per test; the seed is printed (shown with a failure's output)
    and recorded in the test report, so that ``GRADCLIP_TEST_SEED=<seed>`` replays it."""
    seed = test_seed()
    print(f"random seed: {seed} (replay: {SEED_ENV}={seed})")
    request.node.user_properties.append(("seed", seed))
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def gpu_memory_to_itself(tmp_path_factory):
    """For a test of several GiB on the GPU: under pytest-xdist (``-n``) the workers share
    one GPU, so such tests take turns (a lock file in the run's shared temp folder), and
    each hands its cached blocks back before the next one starts."""
    lock = tmp_path_factory.getbasetemp().parent / "gradclip-gpu-memory.lock"
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def random_tensors(gen: torch.Generator, shapes, dtypes, device="cpu", scale=1.0):
    """Fresh normal data, made on the CPU (reproducible from the seed) then moved."""
    if isinstance(dtypes, torch.dtype):
        dtypes = [dtypes] * len(shapes)
    return [(torch.randn(shape, generator=gen, dtype=torch.float64) * scale)
            .to(dtype=dtype).to(device) for shape, dtype in zip(shapes, dtypes)]


# A documented example states what a print shows with a trailing "# -> <text>" comment;
# "..." in the text matches anything. Other comments after a print are prose.
_EXPECTED = re.compile(r"print\(.*\)\s*#\s*->\s*(.+?)\s*$")


def python_blocks(path) -> list[str]:
    """The ```python blocks of a markdown file, in order."""
    return re.findall(r"```python\n(.*?)```", Path(path).read_text(), flags=re.S)


def run_example(code: str) -> dict[int, list[str]]:
    """Run a documented example as a user would (its own namespace), and check that each
    print marked "# -> <text>" printed that text every time it ran. Returns what each
    line printed, by line number."""
    printed: dict[int, list[str]] = {}

    def recording_print(*args, sep=" ", end="\n", file=None, flush=False):
        line = sys._getframe(1).f_lineno
        printed.setdefault(line, []).append(sep.join(map(str, args)))

    exec(compile(code, "<example>", "exec"), {"__name__": "__example__", "print": recording_print})
    for number, line in enumerate(code.splitlines(), start=1):
        match = _EXPECTED.search(line)
        if match is None:
            continue
        pattern = ".*".join(map(re.escape, match.group(1).split("...")))
        assert number in printed, f"line {number} printed nothing: {line.strip()}"
        for text in printed[number]:
            assert re.fullmatch(pattern, text, flags=re.S), (
                f"line {number} printed {text!r}, the docs say {match.group(1)!r}")
    return printed


def on_device(device: str):
    return torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device(device)


__all__ = ["BACKEND_DEVICES", "DTYPE_MIXES", "FLOAT_DTYPES", "FailOnHostReads", "HAS_CUDA", "gpu", "gradclip", "random_tensors"]
