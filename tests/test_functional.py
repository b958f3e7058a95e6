"""The functional API gives torch.nn.utils' numbers, for every backend that runs here."""

from __future__ import annotations

import copy
import math
import threading

import pytest
import torch
from conftest import HAS_CUDA, gpu, on_device, random_tensors
from reference import storage_rtol

import gradclip

NORM_TYPES = [2.0, 1.0, math.inf, 3.0]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SHAPES = [(), (1,), (7,), (33, 5), (0,), (2, 3, 4), (129,)]
NONEMPTY_SHAPES = [s for s in SHAPES if math.prod(s) > 0]  # torch's inf norm refuses empty ones

# The returned norm: float32 accumulation against torch's, which rounds 16-bit norms.
NORM_RTOL = {torch.float32: 2e-5, torch.float64: 1e-12, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def _params(gen, device, dtypes, shapes=SHAPES, scale=1.0, with_grad=True):
    if isinstance(dtypes, torch.dtype):
        dtypes = [dtypes] * len(shapes)
    values = random_tensors(gen, shapes, dtypes, on_device(device))
    grads = random_tensors(gen, shapes, dtypes, on_device(device), scale)
    params = [torch.nn.Parameter(v) for v in values]
    if with_grad:
        for p, g in zip(params, grads):
            p.grad = g
    return params


def _twin(params):
    twin = copy.deepcopy(params)
    for p, q in zip(params, twin):
        q.grad = None if p.grad is None else p.grad.clone()
    return twin


def _grad_rtol(dtype: torch.dtype) -> float:
    # The clip factor can differ by torch's rounding of a 16-bit norm, then one more rounding.
    return 2 * NORM_RTOL[dtype] + storage_rtol(dtype)


def _assert_grads_close(ours, theirs, rtol=None):
    for p, q in zip(ours, theirs):
        if p.grad is None:
            assert q.grad is None
            continue
        rtol = rtol or _grad_rtol(p.grad.dtype)
        torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=1e-30, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("clipping", [True, False], ids=["clipping", "no-clip"])
def test_clip_grad_norm_matches_torch(backend_device, gen, dtype, norm_type, clipping):
    backend, device = backend_device
    ours = _params(gen, device, dtype, SHAPES if norm_type != math.inf else NONEMPTY_SHAPES)
    theirs = _twin(ours)
    torch_norm = torch.nn.utils.get_total_norm([q.grad for q in theirs], norm_type).item()
    max_norm = torch_norm * (0.3 if clipping else 2.0)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)
    norm = gradclip.clip_grad_norm_(ours, max_norm, norm_type, backend=backend)
    torch.testing.assert_close(norm.double(), expected.double(), rtol=NORM_RTOL[dtype], atol=0)
    _assert_grads_close(ours, theirs)
    if not clipping:
        assert all(torch.equal(p.grad, q.grad) for p, q in zip(ours, theirs)), \
            "nothing to clip: the gradients must be bitwise what they were"


def test_mixed_dtypes_in_one_call_match_torch(backend_device, gen):
    backend, device = backend_device
    ours = _params(gen, device, [DTYPES[i % 4] for i in range(len(SHAPES))], scale=2.0)
    theirs = _twin(ours)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    norm = gradclip.clip_grad_norm_(ours, 1.0, backend=backend)
    assert norm.dtype == torch.float64, "a float64 gradient makes the norm float64"
    torch.testing.assert_close(norm, expected.double(), rtol=1e-3, atol=0)
    # torch rounds the 16-bit tensors' norms, which moves the factor of every dtype.
    _assert_grads_close(ours, theirs, rtol=_grad_rtol(torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_get_total_norm_matches_torch(backend_device, gen, dtype, norm_type):
    backend, device = backend_device
    tensors = random_tensors(gen, NONEMPTY_SHAPES, dtype, on_device(device))
    expected = torch.nn.utils.get_total_norm(tensors, norm_type)
    norm = gradclip.get_total_norm(tensors, norm_type, backend=backend)
    torch.testing.assert_close(norm.double(), expected.double(), rtol=NORM_RTOL[dtype], atol=0)


def test_get_total_norm_takes_empty_tensors_with_inf_norm(backend_device, gen):
    backend, device = backend_device
    tensors = random_tensors(gen, [(0,), (5,), (0, 2)], torch.float32, on_device(device))
    norm = gradclip.get_total_norm(tensors, math.inf, backend=backend)
    assert norm.item() == tensors[1].abs().max().item()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_clip_grads_with_norm_matches_torch(backend_device, gen, dtype):
    backend, device = backend_device
    ours = _params(gen, device, dtype, scale=3.0)
    theirs = _twin(ours)
    total = torch.nn.utils.get_total_norm([q.grad for q in theirs])
    torch.nn.utils.clip_grads_with_norm_(theirs, 1.0, total)
    gradclip.clip_grads_with_norm_(ours, 1.0, total, backend=backend)
    _assert_grads_close(ours, theirs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_clip_grad_value_matches_torch_bitwise(backend_device, gen, dtype):
    backend, device = backend_device
    ours = _params(gen, device, dtype, scale=2.0)
    theirs = _twin(ours)
    torch.nn.utils.clip_grad_value_(theirs, 0.75)
    gradclip.clip_grad_value_(ours, 0.75, backend=backend)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(ours, theirs))


def test_input_forms_give_the_same_norm(backend_device, gen):
    backend, device = backend_device
    params = _params(gen, device, torch.float32, scale=0.01)
    params[3].grad = None
    expected = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    forms = {
        "list": lambda: params,
        "tuple": lambda: tuple(params),
        "generator": lambda: (p for p in params),
        "module.parameters()": lambda: torch.nn.ParameterList(params).parameters(),
    }
    for form, make in forms.items():
        norm = gradclip.clip_grad_norm_(make(), 1e9, backend=backend)
        torch.testing.assert_close(norm, expected, rtol=2e-5, atol=0, msg=form)


def test_single_tensor_is_accepted(backend_device, gen):
    backend, device = backend_device
    (param,) = _params(gen, device, torch.float32, shapes=[(50,)], scale=3.0)
    (twin,) = _twin([param])
    expected = torch.nn.utils.clip_grad_norm_(twin, 1.0)
    torch.testing.assert_close(gradclip.clip_grad_norm_(param, 1.0, backend=backend), expected)
    torch.testing.assert_close(param.grad, twin.grad)
    torch.testing.assert_close(gradclip.get_total_norm(param.grad, backend=backend),
                               torch.nn.utils.get_total_norm(param.grad))


def test_no_gradients_give_a_zero_norm_like_torch(backend_device, gen):
    backend, device = backend_device
    params = _params(gen, device, torch.float32, with_grad=False)
    for inputs in ([], params):
        norm = gradclip.clip_grad_norm_(inputs, 1.0, backend=backend)
        expected = torch.nn.utils.clip_grad_norm_(inputs, 1.0)
        assert torch.equal(norm, expected) and norm.device == expected.device
    assert torch.equal(gradclip.get_total_norm([], backend=backend), torch.tensor(0.0))
    gradclip.clip_grad_value_(params, 1.0, backend=backend)
    gradclip.clip_grads_with_norm_(params, 1.0, torch.tensor(5.0), backend=backend)
    assert all(p.grad is None for p in params)


def test_empty_generator_warns_like_torch(backend_device):
    backend, _ = backend_device
    with pytest.warns(UserWarning, match="empty generator") as caught:
        gradclip.clip_grad_norm_((p for p in []), 1.0, backend=backend)
    assert caught[0].filename == __file__, "the warning must point at the caller's line"


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_nonfinite_gradients_match_torch(backend_device, gen, bad, norm_type):
    backend, device = backend_device
    ours = _params(gen, device, torch.float32, NONEMPTY_SHAPES)
    ours[-1].grad.view(-1)[0] = bad
    theirs = _twin(ours)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type)
    norm = gradclip.clip_grad_norm_(ours, 1.0, norm_type, backend=backend)
    torch.testing.assert_close(norm, expected, equal_nan=True)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.grad, q.grad, equal_nan=True, rtol=1e-6, atol=1e-30)


def test_error_if_nonfinite_raises_before_touching_gradients(backend_device, gen):
    backend, device = backend_device
    params = _params(gen, device, torch.float32, scale=10.0)
    params[2].grad.view(-1)[0] = math.nan
    before = [p.grad.clone() for p in params]
    with pytest.raises(RuntimeError, match="non-finite"):
        gradclip.clip_grad_norm_(params, 1.0, error_if_nonfinite=True, backend=backend)
    with pytest.raises(RuntimeError, match="non-finite"):
        gradclip.get_total_norm([p.grad for p in params], error_if_nonfinite=True, backend=backend)
    for p, b in zip(params, before):
        assert torch.equal(p.grad.nan_to_num(), b.nan_to_num())


def test_error_if_nonfinite_clips_finite_gradients(backend_device, gen):
    backend, device = backend_device
    ours = _params(gen, device, torch.float32, scale=10.0)
    theirs = _twin(ours)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0, error_if_nonfinite=True)
    norm = gradclip.clip_grad_norm_(ours, 1.0, error_if_nonfinite=True, backend=backend)
    torch.testing.assert_close(norm, expected, rtol=2e-5, atol=0)
    _assert_grads_close(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_norm_of_16_bit_gradients_is_float32(backend_device, gen, dtype):
    backend, device = backend_device
    params = _params(gen, device, dtype)
    assert gradclip.clip_grad_norm_(params, 1.0, backend=backend).dtype == torch.float32
    assert gradclip.get_total_norm([p.grad for p in params], backend=backend).dtype == torch.float32


def test_norm_type_accepts_what_torch_accepts(gen):
    params = _params(gen, "cpu", torch.float32, NONEMPTY_SHAPES)
    for norm_type in (2, "inf", "2.0", torch.tensor(2.0)):
        expected = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type)
        torch.testing.assert_close(gradclip.get_total_norm([p.grad for p in params], norm_type),
                                   expected)


@pytest.mark.parametrize("call, match", [
    (lambda ps: gradclip.clip_grad_norm_(ps, -1.0), "max_norm must be >= 0"),
    (lambda ps: gradclip.clip_grad_norm_(ps, math.nan), "max_norm must be >= 0"),
    (lambda ps: gradclip.clip_grads_with_norm_(ps, -0.5, torch.tensor(1.0)), "max_norm must be >= 0"),
    (lambda ps: gradclip.clip_grad_norm_(ps, 1.0, norm_type=0), "norm_type must be > 0"),
    (lambda ps: gradclip.clip_grad_norm_(ps, 1.0, norm_type=-math.inf), "norm_type must be > 0"),
    (lambda ps: gradclip.get_total_norm([p.grad for p in ps], norm_type=math.nan), "norm_type must be > 0"),
    (lambda ps: gradclip.clip_grad_value_(ps, -0.1), "clip_value must be >= 0"),
    (lambda ps: gradclip.clip_grad_value_(ps, math.nan), "clip_value must be >= 0"),
    (lambda ps: gradclip.clip_grad_norm_(ps, 1.0, backend="cudnn"), "is not a backend"),
], ids=["max_norm<0", "max_norm=nan", "with_norm max_norm<0", "norm_type=0", "norm_type=-inf",
        "norm_type=nan", "clip_value<0", "clip_value=nan", "backend=cudnn"])
def test_bad_arguments_raise_value_error(gen, call, match):
    params = _params(gen, "cpu", torch.float32)
    before = [p.grad.clone() for p in params]
    with pytest.raises(ValueError, match=match):
        call(params)
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before))


@pytest.mark.parametrize("call", [
    lambda ps: gradclip.clip_grad_norm_(ps, "one"),
    lambda ps: gradclip.clip_grad_norm_(ps, 1.0, norm_type=None),
    lambda ps: gradclip.clip_grad_value_(ps, [1.0]),
], ids=["max_norm str", "norm_type None", "clip_value list"])
def test_arguments_of_the_wrong_type_raise_type_error(gen, call):
    with pytest.raises(TypeError):
        call(_params(gen, "cpu", torch.float32))


def test_sparse_gradients_are_rejected_clearly(backend_device):
    backend, device = backend_device
    param = torch.nn.Parameter(torch.randn(4, 3, device=on_device(device)))
    param.grad = torch.randn(4, 3, device=on_device(device)).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        gradclip.clip_grad_norm_([param], 1.0, backend=backend)


def test_integer_tensors_are_rejected_clearly():
    with pytest.raises(TypeError, match="float16, bfloat16, float32 and float64"):
        gradclip.get_total_norm([torch.arange(5)])


@gpu
def test_gradients_on_several_devices_match_torch(gen):
    ours = _params(gen, "cpu", torch.float32, scale=3.0)
    ours += _params(gen, "cuda", torch.float32, scale=3.0)
    theirs = _twin(ours)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    norm = gradclip.clip_grad_norm_(ours, 1.0)
    assert norm.device == ours[0].device
    torch.testing.assert_close(norm, expected, rtol=2e-5, atol=0)
    _assert_grads_close(ours, theirs)


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only message")
def test_explicit_cuda_backend_without_gpu_says_why(gen):
    params = _params(gen, "cpu", torch.float32)
    with pytest.raises(gradclip.BackendUnavailableError, match="backend='cuda'"):
        gradclip.clip_grad_norm_(params, 1.0, backend="cuda")


@gpu
def test_amp_stats_over_several_devices_match_one_device(gen):
    from gradclip.backends import norm_stats

    tensors = random_tensors(gen, [(50,), (70,)], torch.float32, "cpu", scale=64.0)
    tensors += random_tensors(gen, [(30,)], torch.float32, "cuda", scale=64.0)
    inv_scale = torch.tensor([1 / 64], device="cuda")
    stats = norm_stats(tensors, 2.0, 1.0, inv_scale)
    expected = norm_stats([t.cuda() for t in tensors], 2.0, 1.0, inv_scale)
    torch.testing.assert_close(stats.cuda(), expected, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------
# In-place writes are visible to autograd; threads; complex gradients
# ---------------------------------------------------------------------------------------


def test_clipping_a_grad_saved_for_double_backward_is_detected_like_torch(backend_device, gen):
    """torch's clip bumps the version counter of what it writes, so a gradient saved by a
    create_graph=True backward cannot then be used silently after clipping."""
    backend, device = backend_device
    for clip in (torch.nn.utils.clip_grad_norm_,
                 lambda ps, m: gradclip.clip_grad_norm_(ps, m, backend=backend)):
        x = torch.nn.Parameter(random_tensors(gen, [(5,)], torch.float32, on_device(device))[0])
        (x ** 3).sum().backward(create_graph=True)
        penalty = (x.grad ** 2).sum()  # saves x.grad for its backward
        clip([x], 1e-3)  # clips: the grad is written
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            penalty.backward()


def test_clip_grad_value_bumps_versions(backend_device, gen):
    backend, device = backend_device
    params = _params(gen, device, torch.float32, scale=3.0)
    versions = [p.grad._version for p in params]
    gradclip.clip_grad_value_(params, 0.5, backend=backend)
    assert all(p.grad._version > v for p, v in zip(params, versions))


def test_threads_clipping_different_models_get_serial_results(backend_device, gen):
    """Each thread clips its own model; every result must equal the one-thread run."""
    backend, device = backend_device
    models = [_params(gen, device, [torch.float32, torch.bfloat16], scale=2.0) for _ in range(4)]
    expected = []
    for params in models:
        twin = _twin(params)
        norms = [gradclip.clip_grad_norm_(twin, 0.5 + i, backend=backend) for i in range(3)]
        expected.append((norms, [p.grad for p in twin]))
    results, errors = [None] * len(models), []

    def work(i):
        try:
            norms = [gradclip.clip_grad_norm_(models[i], 0.5 + k, backend=backend) for k in range(3)]
            results[i] = norms
        except Exception as error:  # surfaced below, with the thread's traceback
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(models))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for params, norms, (want_norms, want_grads) in zip(models, results, expected):
        assert [n.item() for n in norms] == [n.item() for n in want_norms]
        for p, g in zip(params, want_grads):
            assert torch.equal(p.grad, g)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.0])
def test_complex_gradients_are_clipped_like_torch(gen, norm_type):
    real = _params(gen, "cpu", torch.float32, shapes=[(4, 3), (5,)], scale=3.0)
    params = [torch.nn.Parameter(torch.complex(p.detach(), p.detach().flip(0))) for p in real]
    for p, r in zip(params, real):
        p.grad = torch.complex(r.grad, 2 * r.grad)
    params.append(torch.nn.Parameter(torch.randn(3, generator=gen)))
    params[-1].grad = torch.randn(3, generator=gen)  # a real one in the same call
    theirs = _twin(params)
    norm = gradclip.clip_grad_norm_(params, 1.0, norm_type)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type)
    assert norm.item() == pytest.approx(expected.item(), rel=1e-5)
    _assert_grads_close(params, theirs, rtol=1e-5)


def test_complex_gradients_are_refused_by_fused_backends_and_clamp(gen):
    p = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    p.grad = torch.randn(3, dtype=torch.complex64)
    with pytest.raises(TypeError, match="complex"):
        gradclip.clip_grad_norm_([p], 1.0, backend="triton")
    with pytest.raises(TypeError, match="complex"):
        gradclip.clip_grad_value_([p], 1.0)


@pytest.mark.parametrize("amp", [False, True], ids=["plain", "amp"])
def test_a_device_threshold_clips_like_the_same_float(backend_device, gen, amp):
    """The clip pipeline takes a threshold kept on the device (adaptive rules) and gives
    what the same float threshold gives (which takes the backend's fused path)."""
    from gradclip import pipeline

    backend, device = backend_device
    dev = on_device(device)
    ours = _params(gen, device, [torch.float32, torch.bfloat16], scale=3.0)
    theirs = _twin(ours)
    inv_scale = torch.tensor([0.5], device=dev) if amp else None
    grads = [p.grad for p in ours if p.grad is not None]
    clipped = pipeline.clip_(grads, 2.0, torch.tensor(0.7, device=dev), inv_scale=inv_scale,
                             backend=backend)
    expected = pipeline.clip_([p.grad for p in theirs if p.grad is not None], 2.0, 0.7,
                              inv_scale=inv_scale, backend=backend)
    assert expected.stats is not None  # the float went the fused way
    for name in ("norm", "coef", "factor", "found_inf"):
        torch.testing.assert_close(getattr(clipped, name), getattr(expected, name),
                                   rtol=1e-6, atol=0, msg=name)
    _assert_grads_close(ours, theirs, rtol=1e-6)


def test_the_host_computes_torchs_clip_factor_to_the_bit():
    """On the CPU the reference backend computes the factor of a norm it read on the host
    in Python floats (float32 steps rounded through ctypes): bit for bit what torch's
    tensor ops give, over norms and thresholds of every magnitude and the edge cases."""
    from gradclip.backends.base import clip_coefficient, host_clip_coefficient

    gen = torch.Generator().manual_seed(0)
    exponents = torch.empty(4000, dtype=torch.float64).uniform_(-45, 38, generator=gen)
    norms = (torch.rand(4000, dtype=torch.float64, generator=gen) * 10.0 ** exponents).tolist()
    norms += [0.0, 1e-45, 1e-6, 0.999999, 1.0, 3.4e38, math.inf, math.nan]
    thresholds = [1.0, 0.5, 1e-6, 7.3, 3e38, math.inf]
    for dtype in (torch.float32, torch.float64):
        for max_norm in thresholds:
            values = torch.tensor(norms, dtype=dtype)
            want = clip_coefficient(values, max_norm).tolist()
            got = [host_clip_coefficient(v, max_norm, dtype) for v in values.tolist()]
            same = [a == b or (a != a and b != b) for a, b in zip(want, got)]
            assert all(same), (dtype, max_norm, next(v for v, ok in zip(norms, same) if not ok))
