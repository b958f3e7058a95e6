"""What only the triton backend does: its chunk tables and their cache, what its kernels
take (dense tensors; the rest is left to the reference backend), its status, launches
that fail halfway, torch.compile through its registered ops, and CUDA graphs.

On the CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set here when
there is no GPU and nothing set it before triton was imported) on small tensors; on a GPU
(``-m gpu``) at full sizes. What every backend must compute (norms, coefficients,
non-finite values, rescaling, empty and misaligned tensors, determinism) is checked for
this one too by ``test_backend_contract.py``; host synchronisation in
``test_no_host_sync.py``; the ``gradclip_triton::`` registrations in ``test_opcheck.py``.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from reference import expected_stats  # noqa: E402

from gradclip.backends.base import NORM  # noqa: E402
from gradclip.backends.reference import ReferenceBackend  # noqa: E402
from gradclip.backends.triton import INTERPRETER_CONFIG, TritonBackend, TritonConfig  # noqa: E402

# The interpreter evaluates log2(0) for the general p-norm in numpy, which warns.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(
        not INTERPRETING, reason="CPU runs need the triton interpreter (TRITON_INTERPRET=1)")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available() or INTERPRETING, reason="needs a CUDA GPU, no interpreter")]),
]
def requires_gpu(test):
    """Marks a test ``gpu``; it also skips under the interpreter."""
    return pytest.mark.gpu(pytest.mark.skipif(INTERPRETING, reason="needs a GPU, no interpreter")(test))

MIXED = (torch.float32, torch.bfloat16, torch.float16)
WITH_F64 = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# Sizes around the block and chunk edges: the interpreter config has 32-element blocks
# and chunks of at most 64; the GPU default 4096-element blocks and chunks up to 65536
# (the edges of every dtype are checked by test_backend_contract.py).
SIZES = {
    "cpu": [0, 1, (), 31, 33, 64, 0, 65, 130, 0],
    "cuda": [0, 1, (), 4095, 4097, 65536, 0, 65537, 1_000_003, 0],
}


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def fresh_backend(device) -> TritonBackend:
    """A backend with its own table cache (the default one is shared)."""
    return TritonBackend(INTERPRETER_CONFIG if device.type == "cpu" else TritonConfig())


def make_tensors(device, dtypes=MIXED, sizes=None, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    sizes = SIZES[device.type] if sizes is None else sizes
    tensors = []
    for i, size in enumerate(sizes):
        shape = () if size == () else (size,)
        t = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
        tensors.append(t.to(device=device, dtype=dtypes[i % len(dtypes)]))
    return tensors


def fp64_norm(tensors, norm_type, inv_scale=1.0):
    return expected_stats(tensors, norm_type, math.inf, inv_scale)[0]


def rtol(device):
    return 1e-5 if device.type == "cpu" else 1e-4


def snapshot(tensors):
    return [t.clone() for t in tensors]


def assert_scaled_close(x, y):
    """Scaled gradients against the reference's: 16-bit results may differ by one rounding
    (the reference's CUDA mul_ rounds the factor first), subnormals by one unit."""
    two_bytes = x.element_size() == 2
    torch.testing.assert_close(x, y, rtol=1e-2 if two_bytes else 1e-4,
                               atol=1e-7 if two_bytes else 0)


def assert_same_values(xs, ys):
    """Equal values and dtypes (any NaN equals any NaN: payloads differ by platform)."""
    for x, y in zip(xs, ys):
        assert x.dtype == y.dtype
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)


# -- availability ---------------------------------------------------------------------

def test_status_says_why(monkeypatch):
    backend = TritonBackend()
    status = backend.status()
    if INTERPRETING:
        assert status.available and "interpreter" in status.reason
        assert backend.supports(torch.device("cpu"))
        assert not backend.supports(torch.device("cuda"))
    from gradclip.backends import triton as triton_module

    monkeypatch.setattr(triton_module, "_STATUS_CACHE", {})  # what is cached here stays here
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    status = backend.status()
    assert not status.available and "TRITON_INTERPRET" in status.reason
    assert not backend.supports(torch.device("cpu"))


# -- what the kernels take -------------------------------------------------------------------

def test_dense_lists_run_in_the_kernels_and_others_are_left_to_the_reference(device):
    """Dense tensors, permuted or not, run in the kernels (a table is built for them); for a
    list with one that is not dense every op returns NotImplemented before writing anything,
    and the dispatcher runs the reference backend (the values: test_backend_contract.py)."""
    base = torch.randn(6, 8, 5, 3, device=device)
    dense = [base.to(memory_format=torch.channels_last), base.permute(3, 2, 1, 0)]
    backend = fresh_backend(device)
    backend.clip_grads_(snapshot(dense), 2.0, 1.0)
    assert backend.cache_info()["misses"] == 1, "dense lists run in the kernels"
    mixed = dense[:1] + [torch.randn(16, 9, device=device)[:, ::2]]
    before = snapshot(mixed)
    half = torch.tensor([0.5], device=device)
    for op, args in (("norm_stats", (2.0, 1.0)), ("clip_grads_", (2.0, 0.1)), ("scale_", (half,)),
                     ("clamp_", (0.1,)), ("norm_stats_per_tensor", (2.0, 1.0)),
                     ("clip_per_tensor_", (2.0, 0.1)),
                     ("scale_per_tensor_", (torch.tensor([0.5, 0.5], device=device),))):
        assert getattr(backend, op)(mixed, *args) is NotImplemented, op
    assert backend.agc_(snapshot(mixed), mixed, 0.01, 1e-3, 2.0) is NotImplemented
    assert all(torch.equal(t, b) for t, b in zip(mixed, before))
    assert backend.cache_info()["misses"] == 1, "no table for a list the kernels do not take"


# -- the metadata cache ---------------------------------------------------------------------

def test_a_rebuilt_table_gives_the_same_bits(device):
    tensors = make_tensors(device, WITH_F64, seed=5)
    backend = fresh_backend(device)
    first = backend.norm_stats(tensors, 2.0, 0.5)
    backend.clear_cache()
    assert torch.equal(backend.norm_stats(tensors, 2.0, 0.5), first)
    assert backend.cache_info()["misses"] == 2


def test_cache_hits_for_the_same_list_and_misses_for_another(device):
    backend = fresh_backend(device)
    tensors = make_tensors(device, seed=11)
    backend.norm_stats(tensors, 2.0, 1.0)
    backend.clip_grads_(tensors, 2.0, 1e9)
    backend.scale_(tensors, torch.ones(1, device=device))
    assert backend.cache_info()["misses"] == 1 and backend.cache_info()["hits"] == 2
    # The same tensors in a new list object (as a training loop builds every step) hit.
    backend.norm_stats(list(tensors), 2.0, 1.0)
    assert backend.cache_info()["hits"] == 3
    backend.norm_stats(tensors[:-2] + [torch.randn(5, device=device)], 2.0, 1.0)
    assert backend.cache_info()["misses"] == 2


def test_cache_never_reuses_stale_metadata(device):
    backend = fresh_backend(device)
    # bfloat16-representable float32 values: the bfloat16 view of them is finite too
    storage = torch.randn(200, device=device).bfloat16().float()
    cases = [
        [storage[:100]],                               # the reference list
        [storage[:50]],                                # same pointer, fewer elements
        [storage[:200]],                               # same pointer, more elements
        [storage[:100].view(torch.bfloat16)],          # same pointer, another dtype
        [storage[:100], storage[100:150]],             # one more tensor
        [storage[100:150], storage[:100]],             # reordered
    ]
    for tensors in cases * 2:
        stats = backend.norm_stats(tensors, 2.0, 1.0)
        assert stats[NORM].item() == pytest.approx(fp64_norm(tensors, 2.0), rel=rtol(device))
    info = backend.cache_info()
    assert info["misses"] == len(cases) and info["hits"] == len(cases)


def test_cache_is_bounded(device):
    backend = fresh_backend(device)
    for k in range(20):
        backend.norm_stats([torch.randn(3 + k, device=device)], 2.0, 1.0)
    assert backend.cache_info()["entries"] <= 8


# -- torch.compile through the registered ops ----------------------------------------------

def test_torch_compile_fullgraph(device):
    backend = TritonBackend()     # the registered ops run the default backend

    def clip(grads):
        return backend.clip_grads_(grads, 2.0, 0.5)

    compiled = torch.compile(clip, fullgraph=True,
                             backend="aot_eager" if device.type == "cpu" else "inductor")
    tensors = make_tensors(device, sizes=[3, 0, 40, ()], seed=13)
    expected = snapshot(tensors)
    stats_eager = clip(expected)
    stats = compiled(tensors)
    torch.testing.assert_close(stats, stats_eager)
    assert_same_values(tensors, expected)


# -- GPU only -------------------------------------------------------------------------------

@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize("new_list_in_capture", [False, True])
def test_cuda_graph_capture_and_replay(amp, new_list_in_capture):
    device = torch.device("cuda")
    backend = fresh_backend(device)
    dtypes = MIXED if amp else WITH_F64
    grads = make_tensors(device, dtypes, seed=14)
    inv_scale = torch.tensor([0.5], device=device) if amp else None
    if new_list_in_capture:
        # The kernels are compiled, but this list's table was never built: capture refuses it.
        backend.clip_grads_(make_tensors(device, dtypes, seed=0), 2.0, 1e9, inv_scale)
        torch.cuda.synchronize()
        with pytest.raises(RuntimeError, match="once eagerly before capturing"):
            with torch.cuda.graph(torch.cuda.CUDAGraph()):
                backend.clip_grads_(grads, 2.0, 0.5, inv_scale)
    backend.clip_grads_(grads, 2.0, 1e9, inv_scale)
    torch.cuda.synchronize()
    source = snapshot(grads)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        stats = backend.clip_grads_(grads, 2.0, 0.5, inv_scale)
    backend.clear_cache()  # a table a graph uses must outlive the cache entry
    for step in range(3):
        for g, s in zip(grads, source):
            g.copy_(s * (step + 1))
        expected = snapshot(grads)
        ref = ReferenceBackend().clip_grads_(expected, 2.0, 0.5, inv_scale)
        graph.replay()
        torch.testing.assert_close(stats, ref, rtol=1e-4, atol=0)
        for x, y in zip(grads, expected):
            assert_scaled_close(x, y)
    assert backend.cache_info()["held"] >= 1


@pytest.mark.gpu
@requires_gpu
def test_torch_compile_reduce_overhead():
    device = torch.device("cuda")
    backend = TritonBackend()

    @torch.compile(mode="reduce-overhead", fullgraph=True)
    def clip(grads):
        return backend.clip_grads_(grads, 2.0, 0.5)

    grads = make_tensors(device, MIXED, seed=18)
    source = snapshot(grads)
    for step in range(4):
        for g, s in zip(grads, source):
            g.copy_(s * (step + 1))
        expected = snapshot(grads)
        ref = ReferenceBackend().clip_grads_(expected, 2.0, 0.5)
        stats = clip(grads)
        torch.testing.assert_close(stats.clone(), ref, rtol=1e-4, atol=0)
        for x, y in zip(grads, expected):
            assert_scaled_close(x, y)


# ---------------------------------------------------------------------------------------
# Faults and host-side costs
# ---------------------------------------------------------------------------------------


@pytest.mark.skipif(not INTERPRETING, reason="interrupts a launch in the interpreter")
def test_an_interrupted_norm_launch_does_not_change_later_results(monkeypatch):
    """Programs that ran before a launch failed took tickets; the next launch on the same
    (cached) table must still wait for all of its own programs."""
    from gradclip.backends import triton_kernels

    backend = fresh_backend(torch.device("cpu"))
    tensors = make_tensors(torch.device("cpu"), dtypes=(torch.float32,), sizes=[300, 70, 5])
    expected = backend.norm_stats(tensors, 2.0, 1.0)
    real = triton_kernels.norm_kernel

    class Interrupted:
        def __getitem__(self, grid):
            def launch(meta, *args, **kwargs):
                meta[:1] += grid[0] - 1  # all programs but the last took their ticket
                raise RuntimeError("interrupted")
            return launch

    monkeypatch.setattr(triton_kernels, "norm_kernel", Interrupted())
    with pytest.raises(RuntimeError, match="interrupted"):
        backend.norm_stats(tensors, 2.0, 1.0)
    monkeypatch.setattr(triton_kernels, "norm_kernel", real)
    assert torch.equal(backend.norm_stats(tensors, 2.0, 1.0), expected)
    assert backend.cache_info()["misses"] == 1, "the same cached table served every call"


def test_status_is_looked_up_once(monkeypatch):
    import importlib.util

    from gradclip.backends import triton as triton_module

    calls = []
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(triton_module, "_STATUS_CACHE", {})
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: calls.append(name) or find_spec(name, *args))
    backend = TritonBackend()
    for _ in range(5):
        assert backend.status().available
    p = torch.nn.Parameter(torch.randn(8, device="cuda" if torch.cuda.is_available() else "cpu"))
    p.grad = torch.randn_like(p)
    import gradclip

    for _ in range(3):
        gradclip.clip_grad_norm_([p], 1.0, backend="triton")
    assert calls.count("triton") == 1
