"""The triton backend against an fp64 reference and the reference backend.

On the CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set here when
there is no GPU and nothing set it before triton was imported) on small tensors; on a
GPU (``-m gpu``) the same properties are checked at full sizes, plus CUDA graphs and
64-bit offsets. The generic contract suite over all backends lives in
``test_backend_contract.py``; this file covers what is particular to this backend:
chunking, alignment, the metadata cache, the registered ops.
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

from gradclip.backends import dispatch  # noqa: E402
from gradclip.backends.base import COEF, FOUND_INF, NORM, clip_coefficient  # noqa: E402
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

NORM_TYPES = [2.0, 1.0, math.inf, 3.5]
MIXED = (torch.float32, torch.bfloat16, torch.float16)
WITH_F64 = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# Sizes around the block and chunk edges: the interpreter config has 32-element blocks
# and chunks of at most 64; the GPU default 4096-element blocks and chunks up to 65536.
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


def same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` are one device when 0 is the current one."""
    def index(d: torch.device):
        if d.index is not None or d.type != "cuda":
            return d.index
        return torch.cuda.current_device()

    return a.type == b.type and index(a) == index(b)


def scaled(t, factor):
    """``t * factor`` as the kernels compute it: in float32 (float64 for float64), rounded once.

    (torch's own CUDA ``mul_`` by a 0-d bfloat16/float16 operand rounds the factor to the
    tensor's dtype first; the kernels keep the factor's float32 value.)
    """
    compute = torch.float64 if t.dtype == torch.float64 else torch.float32
    return (t.to(compute) * factor.to(compute).reshape(())).to(t.dtype)


def assert_same_values(xs, ys):
    """Equal values and dtypes (any NaN equals any NaN: payloads differ by platform)."""
    for x, y in zip(xs, ys):
        assert x.dtype == y.dtype
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)


def assert_untouched(xs, ys):
    for x, y in zip(xs, ys):
        assert x.dtype == y.dtype and torch.equal(x.view(-1).view(torch.uint8),
                                                  y.view(-1).view(torch.uint8))


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


# -- the norm ---------------------------------------------------------------------------

@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtypes", [MIXED, WITH_F64, (torch.float32,), (torch.bfloat16,)],
                         ids=["f32-bf16-f16", "with-f64", "f32", "bf16"])
def test_norm_matches_fp64_reference(device, norm_type, dtypes):
    tensors = make_tensors(device, dtypes)
    stats = fresh_backend(device).norm_stats(tensors, norm_type, max_norm=1.0)
    assert stats.shape == (3,) and same_device(stats.device, device)
    assert stats.dtype == (torch.float64 if torch.float64 in dtypes else torch.float32)
    assert stats[NORM].item() == pytest.approx(fp64_norm(tensors, norm_type), rel=rtol(device))
    assert stats[FOUND_INF].item() == 0.0


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("max_norm", [0.5, 1e9, math.inf, 0.0])
def test_stats_match_reference_backend(device, norm_type, max_norm):
    tensors = make_tensors(device, WITH_F64 if norm_type == 2.0 else MIXED, seed=1)
    ours = fresh_backend(device).norm_stats(tensors, norm_type, max_norm)
    ref = ReferenceBackend().norm_stats(tensors, norm_type, max_norm)
    assert ours.dtype == ref.dtype
    torch.testing.assert_close(ours, ref, rtol=rtol(device), atol=0)


@pytest.mark.parametrize("dtypes", [MIXED, WITH_F64], ids=["f32-acc", "f64-acc"])
@pytest.mark.parametrize("max_norm", [0.5, 3.0, 1e9, math.inf])
@pytest.mark.parametrize("amp", [False, True])
def test_coefficient_rounds_as_torch(device, dtypes, max_norm, amp):
    tensors = make_tensors(device, dtypes, seed=2)
    inv_scale = torch.tensor([1 / 1024], device=device) if amp else None
    stats = fresh_backend(device).norm_stats(tensors, 2.0, max_norm, inv_scale)
    expected = clip_coefficient(stats[NORM], max_norm, inv_scale).reshape(())
    assert torch.equal(stats[COEF], expected), (stats, expected)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_inv_scale_applies_before_the_norm(device, norm_type):
    tensors = make_tensors(device, seed=3, scale=1024.0)
    inv_scale = torch.tensor(1 / 1024, device=device)
    stats = fresh_backend(device).norm_stats(tensors, norm_type, 1.0, inv_scale)
    expected = fp64_norm(tensors, norm_type, 1 / 1024)
    assert stats[NORM].item() == pytest.approx(expected, rel=rtol(device))
    coef = min(1.0, 1.0 / (stats[NORM].item() + 1e-6)) / 1024
    assert stats[COEF].item() == pytest.approx(coef, rel=1e-6)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "+inf", "-inf"])
@pytest.mark.parametrize("where", ["first", "last"])
def test_nonfinite_values(device, norm_type, value, where):
    tensors = make_tensors(device, seed=4)
    target = next(t for t in (tensors if where == "first" else reversed(tensors)) if t.numel() > 1)
    target.view(-1)[0 if where == "first" else -1] = value
    stats = fresh_backend(device).norm_stats(tensors, norm_type, 1.0)
    assert stats[FOUND_INF].item() == 1.0
    if math.isnan(value):
        assert math.isnan(stats[NORM].item()) and math.isnan(stats[COEF].item())
    else:
        assert stats[NORM].item() == math.inf
    ref = ReferenceBackend().norm_stats(tensors, norm_type, 1.0)
    torch.testing.assert_close(stats, ref, equal_nan=True)


def test_overflowing_sum_is_not_found_inf(device):
    tensors = [torch.full((40,), 1e30, device=device), torch.ones(3, device=device)]
    stats = fresh_backend(device).norm_stats(tensors, 2.0, 1.0)
    assert stats[NORM].item() == math.inf and stats[FOUND_INF].item() == 0.0


@pytest.mark.parametrize("dtypes", [MIXED, WITH_F64], ids=["f32-acc", "f64-acc"])
def test_results_are_bitwise_deterministic(device, dtypes):
    tensors = make_tensors(device, dtypes, seed=5)
    backend = fresh_backend(device)
    first = backend.norm_stats(tensors, 2.0, 0.5)
    for _ in range(3):
        assert torch.equal(backend.norm_stats(tensors, 2.0, 0.5), first)
    backend.clear_cache()
    assert torch.equal(backend.norm_stats(tensors, 2.0, 0.5), first)


def test_empty_tensors_only(device):
    tensors = [torch.empty(0, device=device), torch.empty(0, 3, device=device, dtype=torch.bfloat16)]
    stats = fresh_backend(device).norm_stats(tensors, 2.0, 1.0)
    assert stats.tolist() == [0.0, 1.0, 0.0]


# -- rescaling ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtypes", [MIXED, WITH_F64], ids=["f32-acc", "f64-acc"])
def test_clip_scales_by_the_coefficient(device, dtypes):
    tensors = make_tensors(device, dtypes, seed=6)
    before = snapshot(tensors)
    stats = fresh_backend(device).clip_grads_(tensors, 2.0, 0.5)
    assert stats[COEF].item() < 1.0
    assert_same_values(tensors, [scaled(t, stats[COEF]) for t in before])


def test_no_clip_leaves_grads_untouched(device):
    tensors = make_tensors(device, WITH_F64, seed=7)
    before = snapshot(tensors)
    stats = fresh_backend(device).clip_grads_(tensors, 2.0, 1e9)
    assert stats[COEF].item() == 1.0
    assert_untouched(tensors, before)


def test_skip_when_found_inf(device):
    tensors = make_tensors(device, seed=8)
    tensors[-2].view(-1)[3] = math.inf
    before = snapshot(tensors)
    stats = fresh_backend(device).clip_grads_(tensors, 2.0, 1e-3, torch.tensor(0.5, device=device))
    assert stats[FOUND_INF].item() == 1.0
    assert_untouched(tensors, before)


def test_nan_norm_without_amp_scales_by_nan_as_torch(device):
    tensors = make_tensors(device, seed=9)
    tensors[3].view(-1)[0] = math.nan
    fresh_backend(device).clip_grads_(tensors, 2.0, 1.0)
    assert all(t.isnan().all() for t in tensors if t.numel())


@pytest.mark.parametrize("scale, found, changes", [
    (0.25, None, True), (1.0, None, False), (0.25, 0.0, True), (0.25, 1.0, False),
    (math.nan, None, True)])
def test_scale_(device, scale, found, changes):
    tensors = make_tensors(device, WITH_F64, seed=10)
    before = snapshot(tensors)
    factor = torch.tensor([scale], device=device)
    found_inf = None if found is None else torch.tensor([found], device=device)
    fresh_backend(device).scale_(tensors, factor, found_inf)
    if changes:
        assert_same_values(tensors, [scaled(t, factor) for t in before])
    else:
        assert_untouched(tensors, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_misaligned_views(device, dtype):
    # Views at storage offset 1: not 16-byte aligned, so the kernels must not use vector
    # accesses on them, and must not touch the elements around them.
    n = SIZES[device.type][-2]
    buffers = [torch.randn(n + 2, device=device).to(dtype) for _ in range(3)]
    views = [b[1:1 + n - k] for k, b in enumerate(buffers)]
    backend = fresh_backend(device)
    stats = backend.norm_stats(views, 2.0, 0.5)
    assert stats[NORM].item() == pytest.approx(fp64_norm(views, 2.0), rel=rtol(device))
    before = snapshot(buffers)
    expected = [scaled(v, stats[COEF]) for v in views]
    backend.scale_(views, stats[COEF:FOUND_INF])
    assert_same_values(views, expected)
    for k, (b, old) in enumerate(zip(buffers, before)):
        assert torch.equal(b[0], old[0]) and torch.equal(b[1 + n - k:], old[1 + n - k:])


def _with_layout(tensors):
    """Copies with the same strides (``clone`` makes a non-dense tensor contiguous)."""
    return [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)
            for t in tensors]


def test_dense_permuted_and_non_dense_tensors(device):
    """Dense tensors, permuted or not, run in the kernels; a list with one that is not dense
    is returned (NotImplemented, nothing written) and the dispatcher runs the reference."""
    base = torch.randn(6, 8, 5, 3, device=device)
    dense = [base.to(memory_format=torch.channels_last), base.permute(3, 2, 1, 0)]
    strided = torch.randn(16, 9, device=device)[:, ::2]
    backend = fresh_backend(device)
    for tensors, kernel_runs in ((dense, True), (dense[:1] + [strided], False)):
        misses = backend.cache_info()["misses"]
        expected = ReferenceBackend().norm_stats(tensors, 2.0, 1.0)
        torch.testing.assert_close(dispatch.call(backend, "norm_stats", tensors, 2.0, 1.0), expected,
                                   rtol=rtol(device), atol=0)
        assert backend.cache_info()["misses"] == misses + kernel_runs
        clipped, reference = _with_layout(tensors), _with_layout(tensors)
        if not kernel_runs:
            assert backend.norm_stats(tensors, 2.0, 1.0) is NotImplemented
            assert backend.clip_grads_(clipped, 2.0, 1.0) is NotImplemented
            assert_same_values(clipped, tensors)
        dispatch.call(backend, "clip_grads_", clipped, 2.0, 1.0)
        ReferenceBackend().clip_grads_(reference, 2.0, 1.0)
        for x, y in zip(clipped, reference):
            torch.testing.assert_close(x, y, rtol=rtol(device), atol=0)


# -- the metadata cache ---------------------------------------------------------------------

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
@pytest.mark.slow
@requires_gpu
def test_offsets_past_2_pow_31_elements():
    device = torch.device("cuda")
    n = (1 << 31) + 4099
    big = torch.full((n,), 0.5, dtype=torch.bfloat16, device=device)
    big[-1] = 3.0
    small = torch.full((7,), 2.0, device=device)
    backend = fresh_backend(device)
    assert backend.norm_stats([small, big], math.inf, 1.0)[NORM].item() == 3.0
    expected = math.sqrt((n - 1) * 0.25 + 9.0 + 7 * 4.0)
    assert backend.norm_stats([small, big], 2.0, 1.0)[NORM].item() == pytest.approx(expected, rel=1e-4)
    backend.scale_([small, big], torch.tensor([2.0], device=device))
    assert big[-1].item() == 6.0 and big[-2].item() == 1.0 and big[1 << 31].item() == 1.0
    assert big[0].item() == 1.0 and small[0].item() == 4.0
    del big
    torch.cuda.empty_cache()


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_small_tensors(dtype):
    device = torch.device("cuda")
    grads = make_tensors(device, (dtype,), sizes=[4096] * 2000 + [0, 17], seed=15)
    expected = snapshot(grads)
    ref = ReferenceBackend().clip_grads_(expected, 2.0, 1.0)
    stats = fresh_backend(device).clip_grads_(grads, 2.0, 1.0)
    torch.testing.assert_close(stats, ref, rtol=1e-4, atol=0)
    for x, y in zip(grads, expected):
        torch.testing.assert_close(x, y, rtol=1e-2 if dtype == torch.bfloat16 else 1e-4, atol=0)


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
