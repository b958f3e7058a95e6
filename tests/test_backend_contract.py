"""The op contract (gradclip/backends/base.py), checked for every backend that runs here
against the float64 oracle in reference.py: the one home of what every backend must do.

Each test runs over ``backend_device``: the reference backend and the Triton kernels in the
interpreter on the CPU, and on a GPU also the reference, cuda and triton backends on CUDA.
Sizes stay small on the CPU (the interpreter's blocks are 32 elements and its chunks 64,
so small lists still span many chunks); the GPU run adds sizes past its chunks, thousands
of tensors over several launches, and more than 2**31 elements. What only one backend
does (its tables and caches, launch splitting, the build, graph capture, fast paths) is
tested in that backend's file; host synchronisation in test_no_host_sync.py, the op
registrations in test_opcheck.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DTYPE_MIXES, FLOAT_DTYPES, on_device, random_tensors
from reference import assert_stats_match, expected_stats, norm_rtol, storage_rtol

from gradclip.backends import dispatch, get_backend, resolve
from gradclip.backends.base import COEF, FOUND_INF, NORM, coef_of

NORM_TYPES = [2.0, 1.0, math.inf, 3.5, 0.5]
SMALL_SHAPES = [(), (0,), (1,), (7,), (33, 5), (0, 3), (129,), (2, 3, 4)]
LARGE_SHAPES = [(1 << 16,), (65537,), (3, 100_003), (1 << 20,), (257, 4099)]


def _backend(name: str, device: str):
    return resolve(name, on_device(device))


def _shapes(device: str) -> list[tuple[int, ...]]:
    return SMALL_SHAPES + (LARGE_SHAPES if device == "cuda" else [])


def _tensors(gen, device, mix, shapes=None, scale=1.0, offset=0):
    """Fresh normal tensors of ``shapes`` (by default every shape the device checks), the
    dtypes of ``mix`` in turn; with ``offset`` > 0 each is a view that starts ``offset``
    elements into its storage (not 16-byte aligned)."""
    shapes = shapes or _shapes(device)
    dtypes = [mix[i % len(mix)] for i in range(len(shapes))]
    tensors = random_tensors(gen, shapes, dtypes, on_device(device), scale)
    return [_misaligned(t, offset) for t in tensors] if offset else tensors


def _misaligned(t: torch.Tensor, offset: int) -> torch.Tensor:
    storage = torch.zeros(t.numel() + offset, dtype=t.dtype, device=t.device)
    view = storage[offset:].view(t.shape)
    return view.copy_(t)


def _sizes(gen, count: int, largest: int) -> list[tuple[int]]:
    return [(int(n),) for n in torch.randint(0, largest, (count,), generator=gen)]


def _edge_sizes(device: str) -> list[int]:
    """Element counts at and around the block and chunk edges: the interpreter's 32-element
    blocks and 64-element chunks on the CPU; on a GPU Triton's 4096-element blocks and
    chunks of up to 65536 elements, and the CUDA extension's 64 KiB chunks (8192 float64,
    16384 float32, 32768 16-bit elements), plus odd sizes of many chunks."""
    edges = [32, 64, 128] if device == "cpu" else [4096, 8192, 16384, 32768, 65536, 5 * 65536]
    sizes = sorted({n + d for n in edges for d in (-1, 0, 1)})
    return [1, 7] + sizes + ([1 << 22, 5_000_011] if device == "cuda" else [])


def _rescaled(t: torch.Tensor, factor) -> torch.Tensor:
    """``t * factor`` as the contract rounds a rescale (base.py), on the CPU: a tensor that
    is not float64 multiplied in float32 by the factor rounded to float32, the product
    rounded once to its dtype; a float64 tensor in float64."""
    compute = torch.float64 if t.dtype == torch.float64 else torch.float32
    factor = torch.as_tensor(factor).detach().cpu().reshape(()).to(compute)
    return (t.detach().cpu().to(compute) * factor).to(t.dtype)


def _assert_rescaled(name, device, after, before, factor) -> None:
    """``after`` is ``before`` rescaled by ``factor`` (NaN where ``before * factor`` is NaN):
    exactly as the contract rounds it for the fused backends, whose kernels all do. The
    reference backend multiplies with torch's foreach ops, which may round otherwise (on the
    CPU a float64 factor of a float32 tensor is not rounded to float32 first; torch's CUDA
    ``mul_`` rounds a 0-d factor to a 16-bit tensor's dtype first): within one rounding
    there, subnormals within one unit."""
    want, got = _rescaled(before, factor), after.detach().cpu()
    if name == "reference":
        atol = 6e-8 if after.dtype == torch.float16 else 0
        torch.testing.assert_close(got, want, rtol=storage_rtol(after.dtype), atol=atol, equal_nan=True)
    else:
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


_SAME_SIZE_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(_SAME_SIZE_INT[t.element_size()])


def _plant_nan_payloads(tensors):
    """A signalling NaN with a payload in each non-empty tensor: any multiply quiets it."""
    payloads = {2: 0x7C01, 4: 0x7F800123, 8: 0x7FF0000000000123}
    for t in tensors:
        if t.numel():
            _bits(t)[0] = payloads[t.element_size()] if t.dtype != torch.bfloat16 else 0x7F81


def _assert_untouched(name, device, tensors, before) -> None:
    """Bit for bit what they were. The reference backend off the CPU decides on the device
    and multiplies by 1 instead (documented in base.py): every value is kept, NaN payloads
    may not be."""
    for t, b in zip(tensors, before):
        if name == "reference" and device != "cpu":
            assert torch.equal(t.nan_to_num(), b.nan_to_num()) and torch.equal(t.isnan(), b.isnan())
        else:
            assert torch.equal(_bits(t), _bits(b)), f"{t.dtype} {tuple(t.shape)} was rewritten"


# -- norm_stats ----------------------------------------------------------------------------

@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("mix", list(DTYPE_MIXES))
def test_norm_stats_match_float64_reference(backend_device, gen, mix, norm_type):
    name, device = backend_device
    tensors = _tensors(gen, device, DTYPE_MIXES[mix])
    stats = _backend(name, device).norm_stats(tensors, norm_type, 1.0)
    # A p < 1 norm raises the power sum's rounding error to the power 1/p.
    rtol = 1e-4 if norm_type < 1 and mix != "fp64" else None
    assert_stats_match(stats, tensors, norm_type, 1.0, rtol=rtol)


@pytest.mark.parametrize("mix, norm_type", [(mix, 2.0) for mix in ("fp32", "bf16", "fp16", "fp64")]
                         + [("mixed", 2.0), ("mixed", math.inf)])
def test_sizes_around_block_and_chunk_edges(backend_device, gen, mix, norm_type):
    """Full chunks, one element more or less, odd tails past one chunk: read once by the
    norm and rescaled in place by clip_grads_, every element and no other."""
    name, device = backend_device
    tensors = _tensors(gen, device, DTYPE_MIXES[mix], [(n,) for n in _edge_sizes(device)], scale=0.5)
    backend = _backend(name, device)
    assert_stats_match(backend.norm_stats(tensors, norm_type, 1.0), tensors, norm_type, 1.0)
    before = [t.clone() for t in tensors]
    stats = backend.clip_grads_(tensors, norm_type, 0.1)
    assert_stats_match(stats, before, norm_type, 0.1)
    assert stats[COEF].item() < 1
    for t, b in zip(tensors, before):
        _assert_rescaled(name, device, t, b, stats[COEF])


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
@pytest.mark.parametrize("mix", ["f32-f16", "f64-f32"])
def test_inv_scale_gives_norm_of_unscaled_values(backend_device, gen, mix, norm_type):
    """Under AMP the norm is of ``x * inv_scale``; a float64 input makes stats (and the
    coefficient) float64, whatever the dtype of ``inv_scale``."""
    name, device = backend_device
    inv_scale = 2.0 ** -16
    dtypes = [torch.float32, torch.float16] if mix == "f32-f16" else [torch.float64, torch.float32]
    tensors = _tensors(gen, device, dtypes, scale=2.0 ** 10)
    scale_tensor = torch.tensor([inv_scale], dtype=dtypes[0], device=on_device(device))
    stats = _backend(name, device).norm_stats(tensors, norm_type, 1.0, scale_tensor)
    assert_stats_match(stats, tensors, norm_type, 1.0, inv_scale)


@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.5, 8.0, math.inf])
@pytest.mark.parametrize("log2_scale", [0, 8, 16, 24])
def test_amp_norm_is_of_the_unscaled_values_whatever_the_scale(backend_device, gen, norm_type,
                                                               log2_scale):
    """The norm under AMP is the unscaled gradients' norm: a large scale must not overflow
    the power sum (2**16 and an 8-norm overflowed float32 when scaled after the power)."""
    name, device = backend_device
    scale = 2.0 ** log2_scale
    unscaled = _tensors(gen, device, [torch.float32, torch.bfloat16], scale=3.0)
    scaled = [(t.double() * scale).to(t.dtype) for t in unscaled]
    inv_scale = torch.tensor([1.0 / scale], device=scaled[0].device)
    stats = _backend(name, device).norm_stats(scaled, norm_type, 5.0, inv_scale)
    assert_stats_match(stats, scaled, norm_type, 5.0, 1.0 / scale)
    assert math.isfinite(stats[NORM].item()) and stats[FOUND_INF].item() == 0.0


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["first", "last"])
@pytest.mark.parametrize("norm_type", NORM_TYPES[:4])
def test_nonfinite_element_sets_found_inf(backend_device, gen, bad, where, norm_type):
    name, device = backend_device
    tensors = _tensors(gen, device, [torch.float32, torch.bfloat16])
    victim = tensors[0] if where == "first" else tensors[-1]
    victim.view(-1)[-1] = bad
    stats = _backend(name, device).norm_stats(tensors, norm_type, 1.0)
    assert_stats_match(stats, tensors, norm_type, 1.0)
    assert stats[FOUND_INF].item() == 1.0
    if math.isnan(bad):
        assert math.isnan(stats[NORM].item()) and math.isnan(stats[COEF].item())
    else:
        assert stats[NORM].item() == math.inf


def test_overflowing_sum_is_not_a_nonfinite_element(backend_device):
    name, device = backend_device
    big = torch.full((64,), 3e38, dtype=torch.float32, device=on_device(device))
    stats = _backend(name, device).norm_stats([big, torch.ones(3, device=big.device)], 2.0, 1.0)
    assert stats[NORM].item() == math.inf, "a float32 sum of squares of 3e38 overflows"
    assert stats[FOUND_INF].item() == 0.0, "but no element is inf or NaN"


@pytest.mark.parametrize("op", ["norm_stats", "clip_grads_"])
@pytest.mark.parametrize("position", ["first", "middle", "last", "only", "all"])
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_empty_tensors_anywhere(backend_device, gen, position, norm_type, op):
    """Empty tensors add nothing to any norm and are never written; a list of empty
    tensors alone has stats [0, 1, 0]."""
    name, device = backend_device
    sizes = [(5,), (130,), (9,)] if device == "cpu" else [(100,), (70_000,), (9,)]
    tensors = _tensors(gen, device, [torch.float32, torch.bfloat16], sizes)
    empty = torch.empty(0, device=on_device(device))
    tensors = {"first": [empty] + tensors,
               "middle": tensors[:2] + [empty.bfloat16()] + tensors[2:],
               "last": tensors + [empty, empty.bfloat16()],
               "only": [empty],
               "all": [empty, torch.empty(0, 3, dtype=torch.bfloat16, device=empty.device), empty.half()],
               }[position]
    before = [t.clone() for t in tensors]
    stats = getattr(_backend(name, device), op)(tensors, norm_type, 0.1)
    assert_stats_match(stats, before, norm_type, 0.1)
    if position in ("only", "all"):
        assert stats.tolist() == [0.0, 1.0, 0.0]
    for t, b in zip(tensors, before):
        _assert_rescaled(name, device, t, b, stats[COEF] if op == "clip_grads_" else 1.0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("offset", [1, 3])
def test_misaligned_views(backend_device, gen, dtype, offset):
    """Views that start ``offset`` elements into their storage (not 16-byte aligned: no
    vector access may assume it) are read by every norm and rescaled exactly, and nothing
    around them, before or after, is written."""
    name, device = backend_device
    n = 300 if device == "cpu" else 100_003
    storages = random_tensors(gen, [(n + offset + 2,)] * 3, dtype, on_device(device))
    views = [s[offset:offset + n - k] for k, s in enumerate(storages)]
    backend = _backend(name, device)
    for norm_type in (1.0, math.inf, 3.5):
        assert_stats_match(backend.norm_stats(views, norm_type, 0.5), views, norm_type, 0.5)
    stats = backend.norm_stats(views, 2.0, 0.5)
    assert_stats_match(stats, views, 2.0, 0.5)
    before = [s.clone() for s in storages]
    backend.scale_(views, coef_of(stats))
    for k, (s, b) in enumerate(zip(storages, before)):
        end = offset + n - k
        assert torch.equal(s[:offset], b[:offset]) and torch.equal(s[end:], b[end:]), "wrote outside the view"
        _assert_rescaled(name, device, s[offset:end], b[offset:end], stats[COEF])


@pytest.mark.parametrize("with_strided", [False, True], ids=["dense", "with-strided"])
def test_dense_permuted_and_strided_tensors(backend_device, gen, with_strided):
    """Tensors whose dims are permuted (a transpose, channels_last) are clipped and clamped
    like contiguous ones; so is a view that is not dense (a strided slice), and the
    elements it skips are not written. Through the dispatcher: a backend may leave what it
    does not take to the reference backend (base.py)."""
    name, device = backend_device
    storage = _tensors(gen, device, [torch.float32, torch.bfloat16, torch.bfloat16, torch.float32],
                       [(4, 6, 5, 3), (24, 40), (24, 40), (20, 30)], scale=2.0)
    strided = storage[2][:, ::2]
    tensors = [storage[0].to(memory_format=torch.channels_last), storage[1].t(), storage[3]]
    if with_strided:
        tensors.insert(1, strided)
    skipped = storage[2][:, 1::2].clone()
    before = [t.clone() for t in tensors]
    backend = _backend(name, device)
    assert_stats_match(dispatch.call(backend, "norm_stats", tensors, 1.0, 1.0), before, 1.0, 1.0)
    stats = dispatch.call(backend, "clip_grads_", tensors, 2.0, 1.0)
    assert_stats_match(stats, before, 2.0, 1.0)
    for t, b in zip(tensors, before):
        if t is not strided:
            _assert_rescaled(name, device, t, b, stats[COEF])
        else:  # may be left to torch's mul_, which rounds a 0-d factor to bf16 first
            torch.testing.assert_close(t, _rescaled(b, stats[COEF]).to(t.device),
                                       rtol=storage_rtol(b.dtype), atol=0)
    clipped = [t.clone() for t in tensors]
    dispatch.call(backend, "clamp_", tensors, 0.05)
    assert all(torch.equal(t, c.clamp(-0.05, 0.05)) for t, c in zip(tensors, clipped))
    assert torch.equal(storage[2][:, 1::2], skipped), "wrote outside the strided view"


@pytest.mark.parametrize("mix", ["mixed16-32", "mixed"])
def test_results_are_bitwise_deterministic(backend_device, gen, mix):
    name, device = backend_device
    tensors = _tensors(gen, device, DTYPE_MIXES[mix])
    backend = _backend(name, device)
    for norm_type in (2.0, 1.0, 3.5):
        first = backend.norm_stats(tensors, norm_type, 0.5)
        for _ in range(2):
            assert torch.equal(backend.norm_stats(tensors, norm_type, 0.5), first)


def test_agrees_with_reference_backend(backend_device, gen):
    name, device = backend_device
    tensors = _tensors(gen, device, DTYPE_MIXES["mixed"])
    ours = _backend(name, device).norm_stats(tensors, 2.0, 1.0)
    reference = get_backend("reference").norm_stats(tensors, 2.0, 1.0)
    torch.testing.assert_close(ours, reference, rtol=2e-5, atol=0)


def test_many_tensors_over_several_launches(backend_device, gen):
    """Hundreds of tensors on the CPU; on a GPU more than one launch holds (the CUDA
    extension takes 1280 tensors per launch) and thousands."""
    name, device = backend_device
    backend = _backend(name, device)
    for count, largest in ((1300, 4097), (5000, 3000)) if device == "cuda" else ((100, 70),):
        shapes = _sizes(gen, count, largest) + [(0,)]
        tensors = _tensors(gen, device, DTYPE_MIXES["mixed16-32"], shapes)
        assert_stats_match(backend.norm_stats(tensors, 2.0, 1.0), tensors, 2.0, 1.0)
        before = [t.clone() for t in tensors]
        stats = backend.clip_grads_(tensors, 2.0, 1.0)
        assert_stats_match(stats, before, 2.0, 1.0)
        for t, b in zip(tensors, before):
            _assert_rescaled(name, device, t, b, stats[COEF])


# -- the coefficient -----------------------------------------------------------------------

@pytest.mark.parametrize("norm_type", NORM_TYPES[:4])
@pytest.mark.parametrize("max_norm", [0.0, 0.5, 1e6, math.inf])
def test_coefficient_follows_max_norm(backend_device, gen, max_norm, norm_type):
    name, device = backend_device
    tensors = _tensors(gen, device, [torch.float32, torch.float16])
    stats = _backend(name, device).norm_stats(tensors, norm_type, max_norm)
    assert_stats_match(stats, tensors, norm_type, max_norm)
    if max_norm == math.inf:
        assert stats[COEF].item() == 1.0


@pytest.mark.parametrize("amp", [False, True], ids=["plain", "amp"])
@pytest.mark.parametrize("mix", ["mixed16-32", "mixed"], ids=["f32-stats", "f64-stats"])
def test_coefficient_is_torchs_to_the_bit(backend_device, gen, mix, amp):
    """``stats[COEF]`` of ``norm_stats`` and ``clip_grads_`` is torch's clip_grad_norm_
    factor of ``stats[NORM]`` to the bit: ``clamp(reciprocal(norm + 1e-6) * max_norm,
    max=1)`` in the stats' dtype, times ``inv_scale`` under AMP. (A max_norm that is not a
    power of two tells this order of operations from ``max_norm / (norm + 1e-6)``; the two
    give the same bits for about 3 norms in 4, so the check runs over 6 norms.)"""
    name, device = backend_device
    base = _tensors(gen, device, DTYPE_MIXES[mix])
    inv_scale = torch.tensor(1 / 1024, device=base[0].device) if amp else None
    backend = _backend(name, device)
    factors = [1.0] + (torch.rand(5, generator=gen, dtype=torch.float64) * 8 + 0.1).tolist()
    for i, factor in enumerate(factors):
        tensors = [(t.double() * factor).to(t.dtype) for t in base]
        for max_norm in (0.3, 3.0, 1e9, math.inf) if i == 0 else (0.3, 3.0):
            _check_coefficient_bits(backend, tensors, max_norm, inv_scale)


def _check_coefficient_bits(backend, tensors, max_norm, inv_scale):
    for stats in (backend.norm_stats(tensors, 2.0, max_norm, inv_scale),
                  backend.clip_grads_([t.clone() for t in tensors], 2.0, max_norm, inv_scale)):
        want = torch.clamp(torch.reciprocal(stats[NORM] + 1e-6) * max_norm, max=1.0)
        if inv_scale is not None:
            want = want * inv_scale.to(stats.dtype)
        assert torch.equal(stats[COEF], want), (max_norm, stats, want)


# -- scale_ ----------------------------------------------------------------------------------

@pytest.mark.parametrize("factor", [0.37, math.nan], ids=["0.37", "nan"])
@pytest.mark.parametrize("mix", ["mixed", "bf16", "fp16"])
def test_scale_multiplies_every_tensor(backend_device, gen, mix, factor):
    """By the factor, with the contract's rounding; by NaN, every element becomes NaN."""
    name, device = backend_device
    tensors = _tensors(gen, device, DTYPE_MIXES[mix])
    before = [t.clone() for t in tensors]
    scale = torch.tensor([factor], device=tensors[0].device)
    _backend(name, device).scale_(tensors, scale)
    for t, b in zip(tensors, before):
        _assert_rescaled(name, device, t, b, scale)


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_scale_by_one_leaves_tensors_bitwise_untouched(backend_device, gen, scale_dtype):
    name, device = backend_device
    tensors = _tensors(gen, device, DTYPE_MIXES["mixed"])
    _plant_nan_payloads(tensors)
    before = [t.clone() for t in tensors]
    versions = [t._version for t in tensors]
    _backend(name, device).scale_(tensors, torch.ones(1, dtype=scale_dtype, device=tensors[0].device))
    _assert_untouched(name, device, tensors, before)
    assert all(t._version >= v for t, v in zip(tensors, versions))


def test_scale_skips_when_found_inf_is_set(backend_device, gen):
    name, device = backend_device
    tensors = _tensors(gen, device, DTYPE_MIXES["mixed"])
    _plant_nan_payloads(tensors)
    before = [t.clone() for t in tensors]
    dev = tensors[0].device
    backend = _backend(name, device)
    quarter = torch.tensor([0.25], device=dev)
    backend.scale_(tensors, quarter, torch.ones(1, device=dev))
    _assert_untouched(name, device, tensors, before)
    backend.scale_(tensors, quarter, torch.zeros(1, device=dev))
    for t, b in zip(tensors, before):
        _assert_rescaled(name, device, t, b, quarter)


@pytest.mark.parametrize("op", ["scale_", "clip_grads_", "clamp_"])
def test_writes_bump_the_autograd_version(backend_device, gen, op):
    """As torch's in-place ops do, so that autograd sees a tensor changed in place."""
    name, device = backend_device
    tensors = _tensors(gen, device, DTYPE_MIXES["mixed"], scale=3.0)
    versions = [t._version for t in tensors]
    backend = _backend(name, device)
    {"scale_": lambda: backend.scale_(tensors, torch.tensor([0.5], device=tensors[0].device)),
     "clip_grads_": lambda: backend.clip_grads_(tensors, 2.0, 0.1),
     "clamp_": lambda: backend.clamp_(tensors, 0.5)}[op]()
    assert all(t._version > v for t, v in zip(tensors, versions)), \
        "an in-place write must bump the version counter, as torch's mul_ does"


# -- clip_grads_ -----------------------------------------------------------------------------

@pytest.mark.parametrize("amp", [False, True], ids=["plain", "amp"])
@pytest.mark.parametrize("mix", ["mixed16-32", "mixed"], ids=["f32-stats", "f64-stats"])
def test_clip_grads_rescales_by_the_coefficient(backend_device, gen, mix, amp):
    name, device = backend_device
    tensors = _tensors(gen, device, DTYPE_MIXES[mix], scale=3.0)
    before = [t.clone() for t in tensors]
    dev = tensors[0].device
    inv_scale = 0.5 if amp else None
    stats = _backend(name, device).clip_grads_(
        tensors, 2.0, 1.0, None if inv_scale is None else torch.tensor([inv_scale], device=dev))
    assert_stats_match(stats, before, 2.0, 1.0, inv_scale)
    assert stats[COEF].item() < 1.0
    for t, b in zip(tensors, before):
        _assert_rescaled(name, device, t, b, stats[COEF])


def test_no_clip_leaves_grads_bitwise_untouched(backend_device, gen):
    """A norm below max_norm: the coefficient is exactly 1 and no bit changes."""
    name, device = backend_device
    tensors = _tensors(gen, device, DTYPE_MIXES["mixed"])
    before = [t.clone() for t in tensors]
    stats = _backend(name, device).clip_grads_(tensors, 2.0, 1e9)
    assert stats[COEF].item() == 1.0
    assert all(torch.equal(_bits(t), _bits(b)) for t, b in zip(tensors, before))


def test_clip_grads_with_amp_leaves_nonfinite_grads_alone(backend_device, gen):
    """Under AMP an inf or NaN skips the step: the gradients stay as they were, bit for bit
    (a multiply by 1 would quiet the NaNs' payloads)."""
    name, device = backend_device
    tensors = _tensors(gen, device, DTYPE_MIXES["mixed"], scale=3.0)
    _plant_nan_payloads(tensors[:3])
    tensors[-1].view(-1)[0] = math.inf
    before = [t.clone() for t in tensors]
    dev = tensors[0].device
    stats = _backend(name, device).clip_grads_(tensors, 2.0, 1.0, torch.tensor([2.0 ** -10], device=dev))
    assert stats[FOUND_INF].item() == 1.0
    _assert_untouched(name, device, tensors, before)


def test_nan_without_amp_scales_every_tensor_by_nan_as_torch(backend_device, gen):
    """Without AMP a NaN norm gives a NaN coefficient, and every gradient becomes NaN, as
    torch.nn.utils.clip_grad_norm_ makes them."""
    name, device = backend_device
    tensors = _tensors(gen, device, DTYPE_MIXES["mixed"])
    tensors[3].view(-1)[0] = math.nan
    stats = _backend(name, device).clip_grads_(tensors, 2.0, 1.0)
    assert math.isnan(stats[NORM].item()) and math.isnan(stats[COEF].item())
    assert stats[FOUND_INF].item() == 1.0
    assert all(bool(t.isnan().all()) for t in tensors if t.numel())


# -- clamp_ ------------------------------------------------------------------------------------

@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "offset1"])
def test_clamp_bounds_every_tensor_and_keeps_nan(backend_device, gen, offset):
    name, device = backend_device
    tensors = _tensors(gen, device, DTYPE_MIXES["mixed"], scale=3.0, offset=offset)
    tensors[3].view(-1)[0] = math.nan
    before = [t.clone() for t in tensors]
    _backend(name, device).clamp_(tensors, 0.75)
    for t, b in zip(tensors, before):
        torch.testing.assert_close(t, b.clamp(-0.75, 0.75), rtol=0, atol=0, equal_nan=True)


# -- the per-tensor ops over many tensors (their semantics in full: test_tensor_norms.py,
# test_per_tensor.py and test_per_tensor_rounding.py, through the public functions) --------

def _per_tensor_lists(gen, device):
    """(tensors, label) lists: a few large tensors, then many small ones (over several
    launches on a GPU), in three dtypes, some as misaligned views, the last one empty."""
    if device == "cuda":
        plans = [(5, 200_000), (1300, 3000)]
    else:
        plans = [(4, 300), (60, 70)]
    for count, largest in plans:
        shapes = _sizes(gen, count - 1, largest) + [(0,)]
        mix = [torch.bfloat16, torch.float32, torch.float16]
        tensors = [_misaligned(t, i % 2) for i, t in enumerate(_tensors(gen, device, mix, shapes))]
        yield tensors, f"{count} tensors"


@pytest.mark.parametrize("norm_type", [2.0, math.inf, 3.0])
def test_per_tensor_norms_of_many_tensors_match_float64(backend_device, gen, norm_type):
    name, device = backend_device
    backend = _backend(name, device)
    for tensors, label in _per_tensor_lists(gen, device):
        stats, norms = backend.norm_stats_per_tensor(tensors, norm_type, 1.0)
        assert_stats_match(stats, tensors, norm_type, 1.0)
        want = torch.tensor([expected_stats([t], norm_type, math.inf)[0] for t in tensors],
                            dtype=torch.float64)
        torch.testing.assert_close(norms.cpu().double(), want, rtol=norm_rtol(tensors), atol=0,
                                   msg=lambda m: f"{label}: {m}")


def test_clip_per_tensor_writes_only_tensors_over_the_limit(backend_device, gen):
    """Each tensor over the limit is rescaled by its own factor, the others are not written;
    then through the dispatcher with a strided view among them (one a backend may leave to
    the reference)."""
    name, device = backend_device
    backend = _backend(name, device)
    for tensors, label in _per_tensor_lists(gen, device):
        for t in tensors[::2]:
            t.mul_(1e-4)  # these stay below the limit
        strided = torch.randn(40, 6, generator=gen).to(on_device(device))[:, ::2]
        for clip, tensors in ((backend.clip_per_tensor_, tensors),
                              (lambda *args: dispatch.call(backend, "clip_per_tensor_", *args),
                               tensors + [strided])):
            before = [t.clone() for t in tensors]
            norms = clip(tensors, 2.0, 0.5)
            coefs = torch.clamp(torch.reciprocal(norms.cpu() + 1e-6) * 0.5, max=1.0)
            assert bool((coefs < 1).any()) and bool((coefs == 1).any()), label
            for t, b, coef in zip(tensors, before, coefs):
                if coef.item() == 1.0:
                    assert torch.equal(_bits(t), _bits(b)), f"{label}: a tensor below the limit was written"
                else:
                    torch.testing.assert_close(t, (b.double() * coef.item()).to(b.dtype),
                                               rtol=2 * storage_rtol(b.dtype), atol=0)


def test_scale_per_tensor_leaves_factors_of_one_untouched(backend_device, gen):
    name, device = backend_device
    sizes = [(100,), (70_000 if device == "cuda" else 150,), (0,), (9,)]
    tensors = _tensors(gen, device, [torch.float16, torch.float64], sizes)
    _plant_nan_payloads(tensors[3:])
    before = [t.clone() for t in tensors]
    coefs = torch.tensor([1.0, 0.5, 0.25, 1.0], device=tensors[0].device)
    _backend(name, device).scale_per_tensor_(tensors, coefs)
    _assert_untouched(name, device, [tensors[0], tensors[3]], [before[0], before[3]])
    _assert_rescaled(name, device, tensors[1], before[1], 0.5)


# -- GPU only: more than 2**31 elements ----------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("offset", [0, 1])
def test_more_than_two_to_the_31_elements(backend_device, gen, offset, gpu_memory_to_itself):
    """Element and byte offsets past int32, in one tensor (a misaligned view of it too)."""
    name, device = backend_device
    if device != "cuda":
        pytest.skip("2**31 elements: on a GPU only")
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs about 30 GB of GPU memory")
    n = 2**31 + 37
    storage = torch.empty(n + offset, dtype=torch.bfloat16, device="cuda")
    seed = int(torch.randint(2**31, (1,), generator=gen))
    storage.normal_(generator=torch.Generator("cuda").manual_seed(seed))
    view = storage[offset:]
    view[-1] = 40.0  # the last element, past 2**31, is the largest
    small = _tensors(gen, device, [torch.float32], [(1000,)])[0]
    backend = _backend(name, device)
    assert backend.norm_stats([small, view], math.inf, 1.0)[NORM].item() == 40.0
    expected = torch.linalg.vector_norm(torch.stack([
        torch.linalg.vector_norm(view, dtype=torch.float64),
        torch.linalg.vector_norm(small, dtype=torch.float64)])).item()
    probes = torch.tensor([0, 1 << 31, n - 2, n - 1], device="cuda")
    probed = view[probes].clone()
    head = storage[:offset].clone()
    stats = backend.clip_grads_([small, view], 2.0, 1.0)
    assert math.isclose(stats[NORM].item(), expected, rel_tol=1e-4)
    assert stats[COEF].item() < 1e-3
    _assert_rescaled(name, device, view[probes], probed, stats[COEF])
    assert torch.equal(storage[:offset], head), "wrote before the view"
    del storage, view
    torch.cuda.empty_cache()
