"""The op contract (gradclip/backends/base.py), checked for every backend that runs here
against the float64 oracle in reference.py. Sizes stay small on the CPU (the Triton
interpreter runs there); the GPU run adds sizes past one chunk and thousands of tensors."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DTYPE_MIXES, HAS_CUDA, on_device, random_tensors
from reference import assert_stats_match, storage_rtol

from gradclip.backends import get_backend, resolve
from gradclip.backends.base import COEF, FOUND_INF, NORM

NORM_TYPES = [2.0, 1.0, math.inf, 3.5]
SMALL_SHAPES = [(), (0,), (1,), (7,), (33, 5), (0, 3), (129,), (2, 3, 4)]
LARGE_SHAPES = [(1 << 16,), (65537,), (3, 100_003), (1 << 20,), (257, 4099)]


def _backend(name: str, device: str):
    return resolve(name, on_device(device))


def _shapes(device: str) -> list[tuple[int, ...]]:
    return SMALL_SHAPES + (LARGE_SHAPES if device == "cuda" else [])


def _tensors(gen, device, mix, shapes=None, scale=1.0):
    shapes = shapes or _shapes(device)
    dtypes = [mix[i % len(mix)] for i in range(len(shapes))]
    return random_tensors(gen, shapes, dtypes, on_device(device), scale)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("mix", list(DTYPE_MIXES))
def test_norm_stats_match_float64_reference(backend_device, gen, mix, norm_type):
    name, device = backend_device
    tensors = _tensors(gen, device, DTYPE_MIXES[mix])
    stats = _backend(name, device).norm_stats(tensors, norm_type, 1.0)
    assert_stats_match(stats, tensors, norm_type, 1.0)


@pytest.mark.parametrize("max_norm", [0.0, 0.5, 1e6, math.inf])
def test_coefficient_follows_max_norm(backend_device, gen, max_norm):
    name, device = backend_device
    tensors = _tensors(gen, device, [torch.float32])
    stats = _backend(name, device).norm_stats(tensors, 2.0, max_norm)
    assert_stats_match(stats, tensors, 2.0, max_norm)
    if max_norm == math.inf:
        assert stats[COEF].item() == 1.0


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_inv_scale_gives_norm_of_unscaled_values(backend_device, gen, norm_type):
    name, device = backend_device
    inv_scale = 2.0 ** -16
    tensors = _tensors(gen, device, [torch.float32, torch.float16], scale=2.0 ** 10)
    scale_tensor = torch.tensor([inv_scale], device=on_device(device))
    stats = _backend(name, device).norm_stats(tensors, norm_type, 1.0, scale_tensor)
    assert_stats_match(stats, tensors, norm_type, 1.0, inv_scale)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["first", "last"])
@pytest.mark.parametrize("norm_type", NORM_TYPES)
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


def test_overflowing_sum_is_not_a_nonfinite_element(backend_device):
    name, device = backend_device
    big = torch.full((64,), 3e38, dtype=torch.float32, device=on_device(device))
    stats = _backend(name, device).norm_stats([big], 2.0, 1.0)
    assert stats[NORM].item() == math.inf, "a float32 sum of squares of 3e38 overflows"
    assert stats[FOUND_INF].item() == 0.0, "but no element is inf or NaN"


def test_many_tensors_in_one_call(backend_device, gen):
    name, device = backend_device
    count = 5000 if device == "cuda" else 300
    shapes = [(int(n),) for n in torch.randint(0, 70, (count,), generator=gen)]
    tensors = _tensors(gen, device, DTYPE_MIXES["mixed16-32"], shapes)
    stats = _backend(name, device).norm_stats(tensors, 2.0, 1.0)
    assert_stats_match(stats, tensors, 2.0, 1.0)


@pytest.mark.parametrize("position", ["first", "middle", "last", "only"])
def test_empty_tensors_anywhere(backend_device, gen, position):
    name, device = backend_device
    tensors = _tensors(gen, device, [torch.float32], [(5,), (130,), (9,)])
    empty = torch.empty(0, device=on_device(device))
    index = {"first": 0, "middle": 2, "last": 3, "only": 0}[position]
    tensors = [empty] if position == "only" else tensors[:index] + [empty] + tensors[index:]
    stats = _backend(name, device).norm_stats(tensors, 2.0, 1.0)
    assert_stats_match(stats, tensors, 2.0, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("offset", [1, 3])
def test_misaligned_views(backend_device, gen, dtype, offset):
    name, device = backend_device
    n = 1000 if device == "cpu" else 100_003
    base = random_tensors(gen, [(n + offset,)], dtype, on_device(device))[0]
    view = base[offset:]
    backend = _backend(name, device)
    stats = backend.norm_stats([view], 2.0, 1.0)
    assert_stats_match(stats, [view], 2.0, 1.0)
    before = base.clone()
    backend.scale_([view], torch.tensor([0.5], device=base.device))
    assert torch.equal(base[:offset], before[:offset]), "wrote outside the view"
    torch.testing.assert_close(view, before[offset:] * 0.5, rtol=storage_rtol(dtype), atol=0)


def test_results_are_bitwise_deterministic(backend_device, gen):
    name, device = backend_device
    tensors = _tensors(gen, device, DTYPE_MIXES["mixed16-32"])
    backend = _backend(name, device)
    first = backend.norm_stats(tensors, 2.0, 1.0)
    for _ in range(5):
        assert torch.equal(backend.norm_stats(tensors, 2.0, 1.0), first)


def test_agrees_with_reference_backend(backend_device, gen):
    name, device = backend_device
    tensors = _tensors(gen, device, DTYPE_MIXES["mixed"])
    ours = _backend(name, device).norm_stats(tensors, 2.0, 1.0)
    reference = get_backend("reference").norm_stats(tensors, 2.0, 1.0)
    torch.testing.assert_close(ours, reference, rtol=2e-5, atol=0)


@pytest.mark.parametrize("mix", ["mixed", "bf16"])
def test_scale_multiplies_every_tensor(backend_device, gen, mix):
    name, device = backend_device
    tensors = _tensors(gen, device, DTYPE_MIXES[mix])
    before = [t.clone() for t in tensors]
    factor = torch.tensor([0.37], device=tensors[0].device)
    _backend(name, device).scale_(tensors, factor)
    for t, b in zip(tensors, before):
        expected = (b.double() * factor.item()).to(t.dtype)
        # torch's CUDA mul_ (the reference backend) rounds the factor to float16 first:
        # within rtol, except for subnormals, which get one unit.
        atol = 6e-8 if t.dtype == torch.float16 else 0
        torch.testing.assert_close(t, expected, rtol=storage_rtol(t.dtype), atol=atol)


_SAME_SIZE_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(_SAME_SIZE_INT[t.element_size()])


def _plant_nan_payloads(tensors):
    """A signalling NaN with a payload in each non-empty tensor: any multiply quiets it."""
    payloads = {2: 0x7C01, 4: 0x7F800123, 8: 0x7FF0000000000123}
    for t in tensors:
        if t.numel():
            _bits(t)[0] = payloads[t.element_size()] if t.dtype != torch.bfloat16 else 0x7F81


def test_scale_by_one_leaves_tensors_bitwise_untouched(backend_device, gen):
    name, device = backend_device
    tensors = _tensors(gen, device, DTYPE_MIXES["mixed"])
    _plant_nan_payloads(tensors)
    before = [t.clone() for t in tensors]
    versions = [t._version for t in tensors]
    _backend(name, device).scale_(tensors, torch.ones(1, device=tensors[0].device))
    if name == "reference" and device != "cpu":
        # Documented in base.py: on a GPU the reference multiplies by 1 (no host sync),
        # which keeps every value but may quiet NaNs.
        for t, b in zip(tensors, before):
            assert torch.equal(t.nan_to_num(), b.nan_to_num()) and torch.equal(t.isnan(), b.isnan())
        return
    for t, b in zip(tensors, before):
        assert torch.equal(_bits(t), _bits(b)), f"{t.dtype} {tuple(t.shape)} was rewritten"
    assert all(t._version >= v for t, v in zip(tensors, versions))


def test_scale_bumps_the_autograd_version_of_what_it_may_write(backend_device, gen):
    name, device = backend_device
    tensors = _tensors(gen, device, DTYPE_MIXES["mixed"])
    versions = [t._version for t in tensors]
    _backend(name, device).scale_(tensors, torch.tensor([0.5], device=tensors[0].device))
    assert all(t._version > v for t, v in zip(tensors, versions)), \
        "an in-place write must bump the version counter, as torch's mul_ does"


def test_clamp_clamps_in_one_call_and_bumps_versions(backend_device, gen):
    name, device = backend_device
    tensors = _tensors(gen, device, DTYPE_MIXES["mixed"], scale=3.0)
    tensors[3].view(-1)[0] = math.nan
    before = [t.clone() for t in tensors]
    versions = [t._version for t in tensors]
    _backend(name, device).clamp_(tensors, 0.75)
    for t, b in zip(tensors, before):
        torch.testing.assert_close(t, b.clamp(-0.75, 0.75), rtol=0, atol=0, equal_nan=True)
    assert all(t._version > v for t, v in zip(tensors, versions))


def test_scale_skips_when_found_inf_is_set(backend_device, gen):
    name, device = backend_device
    tensors = _tensors(gen, device, [torch.float32, torch.bfloat16])
    before = [t.clone() for t in tensors]
    dev = tensors[0].device
    backend = _backend(name, device)
    backend.scale_(tensors, torch.tensor([0.25], device=dev), torch.ones(1, device=dev))
    assert all(torch.equal(t, b) for t, b in zip(tensors, before))
    backend.scale_(tensors, torch.tensor([0.25], device=dev), torch.zeros(1, device=dev))
    assert all(torch.equal(t, (b.double() * 0.25).to(b.dtype)) for t, b in zip(tensors, before))


@pytest.mark.parametrize("amp", [False, True], ids=["plain", "amp"])
def test_clip_grads_rescales_by_the_coefficient(backend_device, gen, amp):
    name, device = backend_device
    tensors = _tensors(gen, device, [torch.float32], scale=3.0)
    before = [t.clone() for t in tensors]
    dev = tensors[0].device
    inv_scale = 0.5 if amp else None
    stats = _backend(name, device).clip_grads_(
        tensors, 2.0, 1.0, None if inv_scale is None else torch.tensor([inv_scale], device=dev))
    assert_stats_match(stats, before, 2.0, 1.0, inv_scale)
    coef = stats[COEF].item()
    assert coef < 1.0
    for t, b in zip(tensors, before):
        torch.testing.assert_close(t, b * coef, rtol=1e-6, atol=0)


def test_clip_grads_with_amp_leaves_nonfinite_grads_alone(backend_device, gen):
    name, device = backend_device
    tensors = _tensors(gen, device, [torch.float32], scale=3.0)
    tensors[-1].view(-1)[0] = math.inf
    before = [t.clone() for t in tensors]
    dev = tensors[0].device
    stats = _backend(name, device).clip_grads_(tensors, 2.0, 1.0, torch.tensor([0.5], device=dev))
    assert stats[FOUND_INF].item() == 1.0
    assert all(torch.equal(t, b) for t, b in zip(tensors, before))


def test_clamp_bounds_every_tensor(backend_device, gen):
    name, device = backend_device
    tensors = _tensors(gen, device, DTYPE_MIXES["mixed"], scale=2.0)
    before = [t.clone() for t in tensors]
    _backend(name, device).clamp_(tensors, 0.5)
    for t, b in zip(tensors, before):
        assert torch.equal(t, b.clamp(-0.5, 0.5))


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_sizes_past_one_chunk_and_odd_tails(backend_device, gen):
    name, device = backend_device
    if device != "cuda":
        pytest.skip("large sizes run on the GPU only")
    shapes = [(n,) for n in (16383, 16384, 16385, 65535, 65536, 65537, 1 << 22, 5_000_011)]
    for mix in ("fp32", "bf16", "mixed"):
        tensors = _tensors(gen, device, DTYPE_MIXES[mix], shapes)
        assert_stats_match(_backend(name, device).norm_stats(tensors, 2.0, 1.0), tensors, 2.0, 1.0)


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
